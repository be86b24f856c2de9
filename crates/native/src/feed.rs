//! The native fetcher: `keyward_core::fetch::Fetch` (the feed's paging and back-off, usage
//! and rate reports) run on Envoy's main thread, with the process's memory where the wasm shell
//! has shared data.
//!
//! - **Ticks.** A thread of the module's commits an event to the configuration's scheduler every
//!   [`TICK`]; Envoy runs it on the main thread (`on_http_filter_config_scheduled`), where the
//!   fetcher takes its turn. The thread is joined and the scheduler deleted when Envoy destroys
//!   the configuration.
//! - **Calls.** Through an Envoy cluster, as the wasm shell's are (`config_http_callout`): TLS,
//!   mTLS and service discovery stay Envoy's. The answer comes to
//!   `on_http_filter_config_http_callout_done`, on the main thread.
//! - **The snapshot.** The fetcher's writes are applied to a [`Published`] view: key records in
//!   flat tables ([`Records`]: 64 shards and a delta over them, no allocation per key), the
//!   state and the live epochs. A page's writes make a new view, swapped in whole (`arc-swap`): a request loads the
//!   current one without a lock and sees a page entirely or not at all, and every worker sees
//!   the same view, so a key refused once is refused on every worker from then on.
//! - **One feed per source, shared by configurations.** A listener reload makes a new filter
//!   configuration while the old one drains. Both get the same [`FeedShared`] (by cluster and
//!   authority, [`feed_for`]), so the new one answers from what the old one loaded, as every
//!   wasm VM reads the one shared data. Each configuration runs a fetcher; the lease in
//!   `FeedShared` (the core's, with a CAS token as Envoy's shared data has) picks the one that
//!   polls and reports. A fetcher gives the lease up when its configuration is destroyed, so
//!   the next one takes over at its next lease check (250 ms), not after the lease lapses.

use crate::abi::{self, ConfigEnvoyPtr, EnvoyBuffer, EnvoyHeader, ModuleBuffer, ModuleHeader, SchedulerPtr};
use crate::envoy;
use crate::records::{self, Records};
use arc_swap::ArcSwap;
use keyward_core::config::ControlPlane;
use keyward_core::feed::Epochs;
use keyward_core::fetch::rates::{RateCounts, FLEET_KEY, SET_ATTEMPTS};
use keyward_core::fetch::{Answer, Call, Command, EnvoyView, Fetch, FeedView, Keys, Level, Metric, State, View, Write, ENVOY_ID_KEY, EPOCHS_KEY, GENERATION_KEY, PREFIX, STATE_KEY};
use keyward_core::ratelimit::{self, Fleet};
use keyward_core::scope::Implications;
use keyward_core::usage::Usage;
use keyward_core::{Digest, KeyLookup, KeyRecord, LookupError};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often the fetcher takes its turn, as in the wasm shell.
pub const TICK: Duration = Duration::from_millis(25);

/// What requests judge against: written only by the fetcher, a whole page at a time.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub state: State,
    pub epochs: Epochs,
    /// Each key's shared-data entry (`KeyRecord::encode_entry`), by digest.
    pub records: Records,
}

/// What the fetchers of one feed and the requests share; every field may be read from any
/// worker.
#[derive(Default)]
pub struct FeedShared {
    pub keys: ArcSwap<Published>,
    pub fleet: ArcSwap<Fleet>,
    /// Usage and admissions counted by requests, taken by the lease holder on its tick.
    pub usage: Mutex<Usage>,
    pub rates: Mutex<RateCounts>,
    /// Which fetcher polls: `fetch::LEASE_KEY`'s value, with its CAS token.
    lease: Mutex<Lease>,
    /// The id `keyward serve` gave this Envoy (`fetch::ENVOY_ID_KEY`).
    envoy_id: Mutex<Option<String>>,
}

/// The lease entry, as shared data holds it: a value and a token every write changes.
#[derive(Debug, Default)]
struct Lease {
    value: Option<String>,
    cas: u32,
}

/// A feed's source: the cluster and the authority the fetcher calls.
type Source = (String, String);

/// Every feed in the process, by source: the configurations alive share one each.
static FEEDS: Mutex<Vec<(Source, Weak<FeedShared>)>> = Mutex::new(Vec::new());

/// The feed from `cp`'s cluster and authority: the live one, or a new one, empty.
pub fn feed_for(cp: &ControlPlane) -> Arc<FeedShared> {
    let source = (cp.cluster.clone(), cp.authority.clone());
    let mut feeds = FEEDS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    feeds.retain(|(_, feed)| feed.strong_count() > 0);
    if let Some(feed) = feeds.iter().find(|(s, _)| *s == source).and_then(|(_, feed)| feed.upgrade()) {
        return feed;
    }
    let feed = Arc::new(FeedShared::default());
    feeds.push((source, Arc::downgrade(&feed)));
    feed
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The keys a request is judged against: the published view, whole or (while the first
/// snapshot loads) in part, as `fetch::Keys` says.
pub struct FeedKeys {
    pub view: Arc<Published>,
    pub keys: Keys,
}

impl FeedKeys {
    pub fn load(shared: &FeedShared, max_snapshot_age_secs: Option<u32>) -> FeedKeys {
        let view = shared.keys.load_full();
        // The clock matters only with a maximum age.
        let keys = view.state.keys(if max_snapshot_age_secs.is_some() { now_ms() } else { 0 }, max_snapshot_age_secs);
        FeedKeys { view, keys }
    }
}

impl KeyLookup for FeedKeys {
    fn lookup(&self, digest: &Digest) -> Result<Option<Cow<'_, KeyRecord>>, LookupError> {
        // Not found while the first snapshot loads: it may be on a page still to come.
        let absent = match self.keys {
            Keys::None => return Err(LookupError::Unavailable),
            Keys::Partial => Err(LookupError::Unavailable),
            Keys::Whole => Ok(None),
        };
        let Some(entry) = self.view.records.get(digest) else { return absent };
        match KeyRecord::decode_entry(entry) {
            // An older store's record, which a reset has replaced: absent.
            Some((epoch, _)) if !self.view.epochs.live(epoch) => absent,
            Some((_, record)) => Ok(Some(Cow::Owned(record))),
            // The fetcher writes only valid entries.
            None => Err(LookupError::Fault),
        }
    }
}

/// The tick thread and the scheduler it commits to.
struct Ticker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    scheduler: SchedulerPtr,
}

/// The scheduler's pointer, handed to the tick thread: Envoy documents `commit` as safe from
/// any thread, and the pointer outlives the thread (joined before the scheduler is deleted).
struct SendScheduler(SchedulerPtr);
// SAFETY: see above; the thread only passes the pointer back to Envoy's `commit`.
unsafe impl Send for SendScheduler {}

impl Ticker {
    fn start(config_envoy: ConfigEnvoyPtr) -> Result<Ticker, String> {
        // SAFETY: inside config_new, on Envoy's live configuration.
        let scheduler = unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(config_envoy) };
        if scheduler.is_null() {
            return Err("control_plane: Envoy gave no scheduler for the fetcher's ticks".into());
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let target = SendScheduler(scheduler);
        let thread = std::thread::Builder::new().name("keyward-tick".into()).spawn(move || {
            let target = target;
            // Every TICK until the sender is dropped (the configuration is being destroyed).
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                // SAFETY: the scheduler is deleted only after this thread is joined.
                unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(target.0, 0) };
            }
        });
        match thread {
            Ok(thread) => Ok(Ticker { stop: Some(stop), thread: Some(thread), scheduler }),
            Err(e) => {
                // SAFETY: made above and never handed out.
                unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler) };
                Err(format!("control_plane: starting the fetcher's tick thread: {e}"))
            }
        }
    }

    /// Stops and joins the thread, then deletes the scheduler.
    fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if !self.scheduler.is_null() {
            // SAFETY: nothing commits to it any more (the thread is joined).
            unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.scheduler) };
            self.scheduler = std::ptr::null_mut();
        }
    }
}

/// The fetcher of one configuration; only ever touched on Envoy's main thread.
pub struct Fetcher {
    fetch: Fetch,
    shared: Arc<FeedShared>,
    /// Envoy's configuration object, valid until `on_http_filter_config_destroy`.
    config_envoy: ConfigEnvoyPtr,
    /// Envoy's id of each of `Metric::ALL`, in order.
    metrics: Vec<usize>,
    /// `node.id`, read once at the start.
    node: Option<String>,
    ticker: Ticker,
}

/// Makes each fetcher's lease owner unique, even for two configurations made in one millisecond.
static FETCHERS: AtomicU64 = AtomicU64::new(0);

impl Fetcher {
    /// Inside config_new: defines the fetcher's stats and starts its ticks.
    pub fn start(config_envoy: ConfigEnvoyPtr, cp: &ControlPlane, shared: Arc<FeedShared>, implications: Implications) -> Result<Fetcher, String> {
        let mut metrics = Vec::new();
        for m in Metric::ALL {
            metrics.push(crate::define_metric(config_envoy, m.name(), m.is_gauge())?);
        }
        let seed = now_ms() ^ (u64::from(std::process::id()) << 32) ^ FETCHERS.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let fetch = Fetch::new(cp.clone(), implications, seed).with_shell("native");
        let ticker = Ticker::start(config_envoy)?;
        envoy::log(abi::LOG_INFO, &format!("snapshot feed via cluster {}, every {} ms", cp.cluster, TICK.as_millis()));
        Ok(Fetcher { fetch, shared, config_envoy, metrics, node: node_id(), ticker })
    }

    /// Before Envoy destroys the configuration: no tick runs after this returns, and the lease,
    /// if this fetcher held it, is free for the feed's other configurations at once.
    pub fn stop(&mut self) {
        self.ticker.stop();
        if self.fetch.leader() {
            let mut lease = self.shared.lease.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *lease = Lease { value: None, cas: lease.cas.wrapping_add(1) };
        }
    }

    fn envoy_id(&self) -> Option<String> {
        self.shared.envoy_id.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn feed_view(&self) -> FeedView {
        let view = self.shared.keys.load();
        FeedView { state: view.state.clone(), epochs: view.epochs.clone() }
    }

    pub fn on_tick(&mut self) {
        let now = now_ms();
        if self.fetch.lease_due(now) {
            let (value, cas) = {
                let lease = self.shared.lease.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                (lease.value.clone(), lease.cas)
            };
            let commands = self.fetch.on_lease(now, value.as_deref(), Some(cas));
            self.run(now, commands);
        }
        let wants = self.fetch.wants(now);
        let view = View {
            feed: wants.feed.then(|| Ok(self.feed_view())),
            envoy: wants.envoy.then(|| Ok(EnvoyView { node: self.node.clone(), stored: self.envoy_id() })),
        };
        let commands = if self.fetch.leader() {
            let (Ok(usage), Ok(rates)) = (self.shared.usage.lock(), self.shared.rates.lock()) else {
                return envoy::log(abi::LOG_ERROR, "fetcher tick: the usage counts are poisoned");
            };
            self.fetch.on_tick(now, &view, &usage, &rates)
        } else {
            // The counts are the feed's, in memory the lease holder reads: only it takes them.
            self.fetch.on_tick(now, &view, &Usage::default(), &RateCounts::default())
        };
        self.run(now, commands);
    }

    /// An answer to one of the fetcher's calls.
    ///
    /// # Safety
    /// `headers` and `chunks` must be Envoy's arrays of `headers_size` and `chunks_size` entries
    /// (or null), valid for this call.
    pub unsafe fn on_callout_done(&mut self, callout_id: u64, result: u32, headers: *const EnvoyHeader, headers_size: usize, chunks: *const EnvoyBuffer, chunks_size: usize) {
        let now = now_ms();
        let Ok(token) = u32::try_from(callout_id) else { return };
        // SAFETY: per this function's contract.
        let (headers, chunks) = unsafe { (slice(headers, headers_size), slice(chunks, chunks_size)) };
        // SAFETY: Envoy's buffers, valid for this call; copied out now.
        let body: Vec<u8> = chunks.iter().flat_map(|c| unsafe { c.bytes() }.iter().copied()).collect();
        let Some((call, read)) = self.fetch.expects(token, body.len()) else { return };
        let answer = if result == abi::CALLOUT_DONE {
            // SAFETY: as above.
            let status = headers.iter().find(|h| unsafe { h.key.bytes() } == b":status").map(|h| String::from_utf8_lossy(unsafe { h.value.bytes() }).into_owned());
            Ok(Answer { status, body: body.get(..read.min(body.len())).unwrap_or_default().to_vec() })
        } else {
            Err(format!("the call failed (callout result {result})"))
        };
        let feed = (call == Call::Poll).then(|| Ok(self.feed_view()));
        let commands = self.fetch.on_response(now, token, body.len(), answer, feed);
        self.run(now, commands);
    }

    /// Runs `commands` in order; an answer's own commands run before the rest.
    fn run(&mut self, now_ms: u64, commands: Vec<Command>) {
        let mut todo = VecDeque::from(commands);
        while let Some(command) = todo.pop_front() {
            for next in self.execute(now_ms, command).into_iter().rev() {
                todo.push_front(next);
            }
        }
    }

    fn execute(&mut self, now_ms: u64, command: Command) -> Vec<Command> {
        match command {
            Command::ClaimLease { value, cas } => {
                // Envoy's shared-data CAS: a write with a stale token fails, and every write
                // takes a new one. All on the main thread, so nothing runs between read and write.
                let held = {
                    let mut lease = self.shared.lease.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let held = cas.is_none_or(|c| c == lease.cas);
                    if held {
                        *lease = Lease { value: Some(value), cas: lease.cas.wrapping_add(1) };
                    }
                    held
                };
                return self.fetch.lease_claimed(now_ms, held);
            }
            // Nothing to register: requests count into memory the lease holder reads.
            Command::RegisterQueues => {}
            // A fetcher sends only what it counted while it held the lease (a non-holder is
            // handed no counts): kept for when it holds the lease again.
            Command::Send { queue, .. } => self.fetch.sent(queue, false),
            Command::Dispatch(r) => {
                let token = self.dispatch(&r.cluster, &r.headers, r.body.as_deref(), r.timeout);
                return self.fetch.dispatched(now_ms, r.call, token);
            }
            Command::Apply(writes) => {
                let result = self.publish(&writes);
                return self.fetch.applied(now_ms, result);
            }
            Command::Set(w) => {
                if let Err(e) = self.publish(std::slice::from_ref(&w)) {
                    envoy::log(abi::LOG_WARN, &format!("fetcher tick: {e}"));
                }
            }
            Command::SetOthers { bucket, others, until_us } => {
                if ratelimit::set_others(&*crate::filter::BUCKETS, &bucket, others, until_us, SET_ATTEMPTS).is_err() {
                    envoy::log(abi::LOG_WARN, &format!("fetcher tick: setting the fleet's count on bucket {bucket} failed"));
                }
            }
            Command::Increment(m, n) => self.metric(m, n, false),
            Command::Record(m, v) => self.metric(m, v, true),
            Command::Log(level, message) => {
                let level = match level {
                    Level::Info => abi::LOG_INFO,
                    Level::Warn => abi::LOG_WARN,
                    Level::Error => abi::LOG_ERROR,
                };
                envoy::log(level, &message);
            }
        }
        Vec::new()
    }

    fn metric(&self, m: Metric, value: u64, record: bool) {
        let Some(&id) = self.metrics.get(m as usize) else { return };
        let gauge = m.is_gauge();
        // SAFETY: the configuration is live (this runs in one of its main-thread hooks).
        unsafe {
            if gauge && record {
                abi::envoy_dynamic_module_callback_http_filter_config_set_gauge(self.config_envoy, id, std::ptr::null(), 0, value);
            } else {
                abi::envoy_dynamic_module_callback_http_filter_config_increment_counter(self.config_envoy, id, std::ptr::null(), 0, value);
            }
        }
    }

    fn dispatch(&self, cluster: &str, headers: &[(String, String)], body: Option<&[u8]>, timeout: Duration) -> Result<u32, String> {
        let list: Vec<ModuleHeader> = headers.iter().map(|(n, v)| ModuleHeader { key: ModuleBuffer::of(n.as_bytes()), value: ModuleBuffer::of(v.as_bytes()) }).collect();
        let mut id = 0u64;
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1);
        // SAFETY: the live configuration, on the main thread; Envoy copies the headers and body.
        let result = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.config_envoy,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                list.as_ptr(),
                list.len(),
                body.map_or(ModuleBuffer::NULL, ModuleBuffer::of),
                timeout_ms,
            )
        };
        match result {
            abi::CALLOUT_SUCCESS => u32::try_from(id).map_err(|_| format!("callout id {id} out of range")),
            abi::CALLOUT_CLUSTER_NOT_FOUND => Err(format!("cluster {cluster} not found")),
            other => Err(format!("Envoy refused the call to cluster {cluster} ({other})")),
        }
    }

    /// Applies `writes` in order to a copy of the published view, then swaps it in whole.
    fn publish(&mut self, writes: &[Write]) -> Result<(), String> {
        let mut next = Published::clone(&self.shared.keys.load());
        let mut touched_keys = false;
        let mut records = Vec::new();
        for w in writes {
            match w.key.as_str() {
                // The generation brackets a page for workers reading shared data one entry at a
                // time; here the whole page is swapped in at once.
                GENERATION_KEY => {}
                STATE_KEY => {
                    next.state = State::decode(&w.value).ok_or("the fetcher wrote an undecodable state")?;
                    touched_keys = true;
                }
                EPOCHS_KEY => {
                    next.epochs = Epochs::decode(&w.value).ok_or("the fetcher wrote undecodable epochs")?;
                    touched_keys = true;
                }
                ENVOY_ID_KEY => *self.shared.envoy_id.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(w.value.clone()),
                FLEET_KEY => self.shared.fleet.store(Arc::new(Fleet::decode(&w.value).unwrap_or_default())),
                key => {
                    let hex = key.strip_prefix(PREFIX).and_then(|k| k.strip_prefix("k.")).ok_or_else(|| format!("unexpected write to {key}"))?;
                    let digest = Digest::from_hex(hex).ok_or_else(|| format!("a record key that is not a digest: {key}"))?;
                    records.push((digest.0, w.value.as_str()));
                    touched_keys = true;
                }
            }
        }
        if touched_keys {
            next.records.write_page(records)?;
            if next.records.fold_due(next.state.cursor.is_none()) {
                // Each step holds the same records (see `records`): published as it goes, so
                // each replaced shard is freed at once.
                for shard in 0..records::SHARDS {
                    next.records.fold_shard(shard)?;
                    self.shared.keys.store(Arc::new(next.clone()));
                }
                next.records.clear_delta();
            }
            self.shared.keys.store(Arc::new(next));
        }
        Ok(())
    }
}

/// An array Envoy lends, as a slice (empty when null).
///
/// # Safety
/// `ptr` must be null or point to `len` initialised entries valid for the returned lifetime.
unsafe fn slice<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: per this function's contract.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

/// This Envoy's `node.id`, which names it in `keyward status` (the wasm shell reads it as the
/// property `xds.node.id`; a dynamic module has no such read outside a request). Envoy takes it
/// from `--service-node`, else from the bootstrap's `node.id`: read here from this process's
/// command line and the bootstrap file (`-c`/`--config-path`, YAML or JSON), with
/// `--config-yaml` applied over it as Envoy merges it. `None` if there is none: the fetcher then
/// names the Envoy itself, as the wasm shell does without a node id.
pub fn node_id() -> Option<String> {
    let cmdline = std::fs::read("/proc/self/cmdline").ok()?;
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    node_id_from(&args, |path| std::fs::read_to_string(path).ok())
}

fn node_id_from(args: &[String], read: impl Fn(&str) -> Option<String>) -> Option<String> {
    let flag = |names: &[&str]| -> Option<String> {
        let mut found = None;
        for (i, a) in args.iter().enumerate() {
            for name in names {
                if a == name {
                    found = args.get(i + 1).cloned();
                } else if let Some(v) = a.strip_prefix(&format!("{name}=")) {
                    found = Some(v.to_string());
                }
            }
        }
        found
    };
    let known = |s: Option<String>| s.filter(|s| !s.is_empty());
    if let Some(node) = known(flag(&["--service-node"])) {
        return Some(node);
    }
    let id_in = |text: &str| -> Option<String> {
        let doc: serde_json::Value = serde_norway::from_str(text).ok()?;
        known(doc.get("node")?.get("id")?.as_str().map(str::to_string))
    };
    let overlay = flag(&["--config-yaml"]).and_then(|y| id_in(&y));
    overlay.or_else(|| flag(&["-c", "--config-path"]).and_then(|p| read(&p)).and_then(|t| id_in(&t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(cluster: &str, authority: &str) -> ControlPlane {
        ControlPlane {
            cluster: cluster.into(),
            authority: authority.into(),
            feed_wait_secs: 20,
            max_snapshot_age_secs: None,
            usage_report_secs: 10,
            max_feed_bytes: 1 << 20,
            token: None,
            rate_sync_ms: 1_000,
        }
    }

    #[test]
    fn configurations_of_one_source_share_its_feed_while_one_of_them_lives() {
        let a = feed_for(&cp("keyward", "keyward"));
        let reloaded = feed_for(&ControlPlane { feed_wait_secs: 5, ..cp("keyward", "keyward") });
        assert!(Arc::ptr_eq(&a, &reloaded), "a reload with other settings shares the snapshot");
        assert!(!Arc::ptr_eq(&a, &feed_for(&cp("other", "keyward"))), "another cluster is another feed");
        assert!(!Arc::ptr_eq(&a, &feed_for(&cp("keyward", "tenant-b"))), "another authority is another feed");
        let weak = Arc::downgrade(&a);
        drop((a, reloaded));
        assert!(weak.upgrade().is_none(), "the registry holds no feed alive");
        assert_eq!(feed_for(&cp("keyward", "keyward")).keys.load().records.sizes(), (0, 0), "a new feed starts empty");
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_node_id_comes_from_the_flag_then_the_inline_yaml_then_the_bootstrap_file() {
        let yaml = |path: &str| (path == "/etc/envoy/envoy.yaml").then(|| "node:\n  id: edge-1\n  cluster: c\nadmin: {}\n".to_string());
        let json = |path: &str| (path == "b.json").then(|| r#"{"node": {"id": "json-node"}, "static_resources": {}}"#.to_string());
        assert_eq!(node_id_from(&args(&["envoy", "-c", "/etc/envoy/envoy.yaml"]), yaml).as_deref(), Some("edge-1"));
        assert_eq!(node_id_from(&args(&["envoy", "--config-path=b.json", "--concurrency", "2"]), json).as_deref(), Some("json-node"));
        assert_eq!(node_id_from(&args(&["envoy", "-c", "/etc/envoy/envoy.yaml", "--service-node", "flag-node"]), yaml).as_deref(), Some("flag-node"));
        assert_eq!(node_id_from(&args(&["envoy", "-c", "/etc/envoy/envoy.yaml", "--config-yaml", "node: {id: overlay}"]), yaml).as_deref(), Some("overlay"));
        assert_eq!(node_id_from(&args(&["envoy", "-c", "missing.yaml"]), yaml), None);
        assert_eq!(node_id_from(&args(&["envoy", "-c", "/etc/envoy/envoy.yaml", "--service-node", ""]), yaml).as_deref(), Some("edge-1"));
    }
}
