//! The fetcher: one VM per Envoy, the holder of a CAS lease in shared data, long-polls the
//! control plane's feed, validates each page whole, writes it to shared data, and reports the
//! usage every worker gathered.
//!
//! A lease instead of a bootstrap singleton, because Istio's `WasmPlugin` gives no custom
//! bootstrap: whichever VM holds the lease fetches, and if it dies the lease lapses and another
//! VM takes over within `LEASE_MS`.

use crate::fleet::{Admitted, AdmittedCounts, RateCounts, RateSync, RATES_QUEUE};
use crate::host::{CallResponse, EnvoyHost, Host, HostError, LogLevel, MetricKind};
use crate::shared::{self, State, ENVOY_ID_KEY, LEASE_KEY, STATE_KEY, USAGE_QUEUE};
use keyward_core::config::ControlPlane;
use keyward_core::feed::{parse_page, Epochs, FeedAsk, FeedError, RateAnswer, RateMode, RateReport, UsageReport};
use keyward_core::usage::{self, Usage, UsageCounts};
use keyward_core::scope::Implications;
use keyward_core::url::encode_component as encode;
use keyward_core::Digest;
use std::time::Duration;

/// How long a lease lasts without renewal.
pub const LEASE_MS: u64 = 2_000;
/// Tick period of every VM with a control plane: the state refresh that drops the VM's record
/// cache when the snapshot moved (so a change is enforced at most one tick after it is written),
/// counters, and the fetcher's turn. A tick without work costs one shared-data read.
pub const TICK: Duration = Duration::from_millis(25);
/// How often the lease is renewed (or, by the others, checked), well inside `LEASE_MS`.
const LEASE_CHECK_MS: u64 = 250;
const BACKOFF_MIN_MS: u64 = 250;
const BACKOFF_MAX_MS: u64 = 10_000;

/// Keys per usage report: at most about 500 bytes each (a 128-character id, every code
/// counted), so a report stays under the 1 MiB body limit of `POST /v1/feed/usage`. More keys
/// go out in further reports, one per tick.
const USAGE_BATCH: usize = 1_000;

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("{0}")]
    Host(#[from] HostError),
    #[error("feed answered HTTP {0}")]
    Status(String),
    #[error("{0}")]
    Feed(#[from] FeedError),
}

/// Counter and gauge ids of the fetcher, under `wasmcustom.keyward.feed.*`.
#[derive(Debug, Clone, Default)]
pub struct FeedMetrics {
    pub pages: u32,
    pub rejected: u32,
    pub errors: u32,
    pub version: u32,
    pub usage_reports: u32,
    pub resets: u32,
    /// Rate-limit reports answered (`keyward.rate_limit.syncs`), failed, fallbacks from global
    /// counts to this Envoy's share, and buckets found exhausted by the other Envoys.
    pub rate_syncs: u32,
    pub rate_sync_failures: u32,
    pub rate_fallbacks: u32,
    pub rate_exhausted: u32,
    /// 1 while this Envoy judges by fleet-wide counts, 0 while it enforces its share.
    pub rate_global: u32,
}

impl FeedMetrics {
    pub fn define<H: Host>(host: &H) -> Result<FeedMetrics, HostError> {
        Ok(FeedMetrics {
            pages: host.define_metric(MetricKind::Counter, "keyward.feed.pages_applied")?,
            rejected: host.define_metric(MetricKind::Counter, "keyward.feed.pages_rejected")?,
            errors: host.define_metric(MetricKind::Counter, "keyward.feed.errors")?,
            version: host.define_metric(MetricKind::Gauge, "keyward.feed.applied_version")?,
            usage_reports: host.define_metric(MetricKind::Counter, "keyward.feed.usage_reports")?,
            resets: host.define_metric(MetricKind::Counter, "keyward.feed.resets")?,
            rate_syncs: host.define_metric(MetricKind::Counter, "keyward.rate_limit.syncs")?,
            rate_sync_failures: host.define_metric(MetricKind::Counter, "keyward.rate_limit.sync_failures")?,
            rate_fallbacks: host.define_metric(MetricKind::Counter, "keyward.rate_limit.fallbacks")?,
            rate_exhausted: host.define_metric(MetricKind::Counter, "keyward.rate_limit.exhausted")?,
            rate_global: host.define_metric(MetricKind::Gauge, "keyward.rate_limit.global")?,
        })
    }
}

pub struct Fetcher {
    cp: ControlPlane,
    implications: Implications,
    metrics: FeedMetrics,
    /// This VM's identity for the lease.
    owner: String,
    leader: bool,
    envoy_id: Option<String>,
    poll: Option<u32>,
    /// What the poll in flight asked for: its answer is read against it.
    asked: Option<FeedAsk>,
    full_sync_started_ms: Option<u64>,
    next_poll_ms: u64,
    backoff_ms: u64,
    report: Option<(u32, UsageCounts)>,
    last_report_ms: u64,
    /// The usage queue this VM consumes (leader) or feeds (others).
    consumer_queue: Option<u32>,
    producer_queue: Option<u32>,
    /// Usage gathered for the next report (leader) or the next enqueue (others).
    pending: UsageCounts,
    last_flush_ms: u64,
    /// The last report left keys behind: send the next batch on the next tick.
    report_more: bool,
    last_lease_ms: u64,
    /// Fleet rate limits: the leader's reports and answers (see `fleet`).
    rates: RateSync,
    rate_call: Option<(u32, RateReport)>,
    /// A worker's admissions until it hands them to the leader, and whether any is urgent.
    rates_local: AdmittedCounts,
    rates_local_urgent: bool,
    last_rates_flush_ms: u64,
    rates_consumer: Option<u32>,
    rates_producer: Option<u32>,
    /// The last rate report failed (logged once until one succeeds again).
    rates_failing: bool,
}

/// Sends `msg` to the lease holder's queue `name`, resolving it first (kept in `queue`); false
/// if there is no holder yet, or it moved (resolved again next time): keep what was counted.
fn to_leader(queue: &mut Option<u32>, name: &str, msg: &str) -> Result<bool, HostError> {
    if queue.is_none() {
        let vm_id = EnvoyHost.property(&["plugin_vm_id"])?.and_then(|v| String::from_utf8(v).ok()).unwrap_or_default();
        *queue = EnvoyHost.resolve_queue(&vm_id, name)?;
    }
    let Some(id) = *queue else {
        return Ok(false);
    };
    if EnvoyHost.enqueue(id, msg.as_bytes()).is_err() {
        *queue = None;
        return Ok(false);
    }
    Ok(true)
}

impl Fetcher {
    pub fn new(cp: ControlPlane, implications: Implications, metrics: FeedMetrics, seed: u64) -> Fetcher {
        Fetcher {
            cp,
            implications,
            metrics,
            owner: Digest::of(&seed.to_le_bytes()).short(),
            leader: false,
            envoy_id: None,
            poll: None,
            asked: None,
            full_sync_started_ms: None,
            next_poll_ms: 0,
            backoff_ms: BACKOFF_MIN_MS,
            report: None,
            last_report_ms: 0,
            consumer_queue: None,
            producer_queue: None,
            pending: UsageCounts::new(),
            last_flush_ms: 0,
            report_more: false,
            last_lease_ms: 0,
            rates: RateSync::default(),
            rate_call: None,
            rates_local: AdmittedCounts::new(),
            rates_local_urgent: false,
            last_rates_flush_ms: 0,
            rates_consumer: None,
            rates_producer: None,
            rates_failing: false,
        }
    }

    pub fn on_tick(&mut self, now_ms: u64, usage: &Usage, rates: &RateCounts) {
        if let Err(e) = self.tick(now_ms, usage, rates) {
            EnvoyHost.log(LogLevel::Warn, &format!("fetcher tick: {e}"));
        }
    }

    fn tick(&mut self, now_ms: u64, usage: &Usage, rates: &RateCounts) -> Result<(), HostError> {
        let was_leader = self.leader;
        if now_ms.saturating_sub(self.last_lease_ms) >= LEASE_CHECK_MS {
            self.last_lease_ms = now_ms;
            self.leader = self.hold_lease(now_ms)?;
        }
        if self.leader && !was_leader {
            EnvoyHost.log(LogLevel::Info, &format!("this VM ({}) now fetches the snapshot feed", self.owner));
            self.consumer_queue = Some(EnvoyHost.register_queue(USAGE_QUEUE)?);
            self.rates_consumer = Some(EnvoyHost.register_queue(RATES_QUEUE)?);
            self.rates.became_leader();
            self.next_poll_ms = now_ms;
        }
        // This worker's rate-limit admissions: the leader's go into its next report; another
        // worker's to the leader, every half sync interval, or at once on an early push.
        let (admitted, urgent) = rates.take();
        if self.leader {
            let local = std::mem::take(&mut self.rates_local);
            self.rates.add(local, self.rates_local_urgent, now_ms);
            self.rates_local_urgent = false;
            self.rates.add(admitted, urgent, now_ms);
        } else {
            crate::fleet::merge(&mut self.rates_local, admitted);
            self.rates_local_urgent |= urgent;
            let half = u64::from(self.cp.rate_sync_ms / 2);
            if !self.rates_local.is_empty() && (self.rates_local_urgent || now_ms.saturating_sub(self.last_rates_flush_ms) >= half) {
                self.last_rates_flush_ms = now_ms;
                self.enqueue_rates()?;
            }
        }
        // Gather this worker's usage once a second.
        if now_ms.saturating_sub(self.last_flush_ms) >= 1_000 {
            self.last_flush_ms = now_ms;
            let local = usage.take();
            usage::merge(&mut self.pending, local);
            if !self.leader && !self.pending.is_empty() {
                self.enqueue_pending()?;
            }
        }
        if !self.leader {
            return Ok(());
        }
        if self.poll.is_none() && now_ms >= self.next_poll_ms {
            if let Err(e) = self.start_poll(now_ms) {
                self.fail(now_ms, &e.to_string());
            }
        }
        if self.rate_call.is_none() && self.rates.due(now_ms, u64::from(self.cp.rate_sync_ms)) {
            self.start_rate_sync(now_ms)?;
        }
        let due = self.report_more || now_ms.saturating_sub(self.last_report_ms) >= u64::from(self.cp.usage_report_secs) * 1000;
        if due && self.report.is_none() && !self.pending.is_empty() {
            self.last_report_ms = now_ms;
            self.start_report()?;
        }
        Ok(())
    }

    /// Takes or renews the lease; true if this VM holds it.
    fn hold_lease(&mut self, now_ms: u64) -> Result<bool, HostError> {
        let (value, cas) = EnvoyHost.shared_get(LEASE_KEY)?;
        let current = value.as_deref().and_then(|v| std::str::from_utf8(v).ok()).and_then(|v| {
            let (owner, exp) = v.split_once(' ')?;
            Some((owner.to_string(), exp.parse::<u64>().ok()?))
        });
        if let Some((owner, expiry)) = &current {
            if *owner != self.owner && *expiry > now_ms {
                return Ok(false);
            }
        }
        let claim = format!("{} {}", self.owner, now_ms + LEASE_MS);
        if !EnvoyHost.shared_set(LEASE_KEY, claim.as_bytes(), cas)? {
            return Ok(false);
        }
        // Without a CAS token (no lease yet) two VMs may both write: the last write wins.
        let (value, _) = EnvoyHost.shared_get(LEASE_KEY)?;
        Ok(value.as_deref() == Some(claim.as_bytes()))
    }

    /// This Envoy's name in `keyward status`: its bootstrap `node.id`, or a random id shared by
    /// its VMs.
    fn envoy_id(&mut self, now_ms: u64) -> Result<String, HostError> {
        if let Some(id) = &self.envoy_id {
            return Ok(id.clone());
        }
        let node = EnvoyHost.property(&["xds", "node", "id"])?.and_then(|v| String::from_utf8(v).ok()).filter(|s| !s.is_empty());
        let id = match node {
            Some(id) => id,
            None => {
                let (value, _) = EnvoyHost.shared_get(ENVOY_ID_KEY)?;
                match value.and_then(|v| String::from_utf8(v).ok()).filter(|s| !s.is_empty()) {
                    Some(id) => id,
                    None => {
                        let id = format!("envoy-{}", Digest::of(format!("{}{now_ms}", self.owner).as_bytes()).short());
                        EnvoyHost.shared_set(ENVOY_ID_KEY, id.as_bytes(), None)?;
                        id
                    }
                }
            }
        };
        self.envoy_id = Some(id.clone());
        Ok(id)
    }

    fn headers<'a>(&'a self, method: &'a str, path: &'a str, auth: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut h = vec![(":method", method), (":path", path), (":authority", self.cp.authority.as_str()), ("accept", "application/json")];
        if self.cp.token.is_some() {
            h.push(("authorization", auth));
        }
        if method == "POST" {
            h.push(("content-type", "application/json"));
        }
        h
    }

    fn start_poll(&mut self, now_ms: u64) -> Result<(), HostError> {
        let state = State::read(&EnvoyHost)?;
        let epochs = shared::read_epochs(&EnvoyHost)?;
        let envoy = self.envoy_id(now_ms)?;
        let ask = epochs.ask(state.loaded, state.applied, state.cursor.as_ref());
        // Until a snapshot is loaded, or while a reset starts over, do not wait: ask now.
        let wait = if state.loaded && !ask.restart { self.cp.feed_wait_secs } else { 0 };
        let mut path = format!("/v1/feed?envoy={}&wait={wait}&since={}", encode(&envoy), ask.since);
        if let Some(after) = &ask.after {
            path.push_str(&format!("&after={}", encode(after)));
        }
        // Always sent, empty before a store is known: a control plane tells a filter that
        // understands `store` and `reset` by it.
        path.push_str(&format!("&store={}", encode(ask.store.as_deref().unwrap_or(""))));
        if !state.loaded && state.cursor.is_none() {
            self.full_sync_started_ms = Some(now_ms);
        }
        let auth = self.cp.token.as_ref().map(|t| format!("Bearer {t}")).unwrap_or_default();
        let headers = self.headers("GET", &path, &auth);
        let timeout = Duration::from_secs(u64::from(wait) + 10);
        self.poll = Some(EnvoyHost.dispatch(&self.cp.cluster, &headers, None, timeout)?);
        self.asked = Some(ask);
        Ok(())
    }

    fn fail(&mut self, now_ms: u64, why: &str) {
        EnvoyHost.log(LogLevel::Warn, &format!("snapshot feed: {why}; retrying in {} ms", self.backoff_ms));
        let _ = EnvoyHost.increment(self.metrics.errors, 1);
        self.next_poll_ms = now_ms + self.backoff_ms;
        self.backoff_ms = (self.backoff_ms * 2).min(BACKOFF_MAX_MS);
    }

    pub fn on_http_call_response(&mut self, token: u32, body_size: usize, now_ms: u64) {
        if self.poll == Some(token) {
            self.poll = None;
            match self.apply_response(body_size, now_ms) {
                Ok(()) => {
                    self.backoff_ms = BACKOFF_MIN_MS;
                    self.next_poll_ms = now_ms;
                    if self.leader {
                        if let Err(e) = self.start_poll(now_ms) {
                            self.fail(now_ms, &e.to_string());
                        }
                    }
                }
                Err(FetchError::Feed(e)) => {
                    EnvoyHost.log(LogLevel::Error, &format!("snapshot feed: rejected a page, keeping the last good snapshot: {e}"));
                    let _ = EnvoyHost.increment(self.metrics.rejected, 1);
                    self.fail(now_ms, "page rejected");
                }
                Err(e) => self.fail(now_ms, &e.to_string()),
            }
        } else if self.rate_call.as_ref().is_some_and(|(t, _)| *t == token) {
            if let Some((_, sent)) = self.rate_call.take() {
                self.on_rate_answer(&sent, body_size, now_ms);
            }
        } else if self.report.as_ref().is_some_and(|(t, _)| *t == token) {
            if let Some((_, sent)) = self.report.take() {
                match EnvoyHost.call_response(0) {
                    Ok(CallResponse { status: Some(status), .. }) if status == "200" || status == "204" => {
                        let _ = EnvoyHost.increment(self.metrics.usage_reports, 1);
                    }
                    // A refusal will not change on a retry: keeping the counts would grow them forever.
                    Ok(CallResponse { status: Some(status), .. }) if status.starts_with('4') => {
                        EnvoyHost.log(LogLevel::Error, &format!("usage report refused with HTTP {status}; dropping the counts of {} keys", sent.len()));
                        self.report_more = false;
                    }
                    other => {
                        EnvoyHost.log(LogLevel::Warn, &format!("usage report failed ({other:?}); keeping the counts for the next one"));
                        usage::merge(&mut self.pending, sent);
                    }
                }
            }
        }
    }

    fn apply_response(&mut self, body_size: usize, now_ms: u64) -> Result<(), FetchError> {
        if body_size > self.cp.max_feed_bytes {
            return Err(FeedError::TooLarge { size: body_size, max: self.cp.max_feed_bytes }.into());
        }
        let CallResponse { status, body } = EnvoyHost.call_response(body_size)?;
        match status.as_deref() {
            Some("200") => {}
            other => return Err(FetchError::Status(other.unwrap_or("(no response)").to_string())),
        }
        // Validate the whole page before writing any of it.
        let page = parse_page(&body, self.cp.max_feed_bytes, &self.implications)?;
        let asked = self.asked.take().ok_or(FeedError::Inconsistent("an answer to no request"))?;
        let epochs = shared::read_epochs(&EnvoyHost)?;
        let step = epochs.step(&asked, &page)?;
        // The generation is odd while records (or the live epochs) are being written, and
        // changes again after the state (see `shared::generation`): a worker caches nothing
        // while it is odd and drops its cache whenever it changed, so once any worker refuses a
        // key no worker accepts it again. A reset makes its epoch live before its records are
        // written and, on its last page, the only live one: from the next generation on, no
        // worker finds a record the new store lacks. The next feed request (`since` = this
        // version) is sent only after `end_apply`: from then on every worker enforces this
        // version on its next request.
        let live = |e: &Epochs| (e.committed.n, e.pending.as_ref().map(|p| p.epoch.n));
        let bracket = !page.records.is_empty() || step.before.is_some() || live(&step.after) != live(&epochs);
        if bracket {
            shared::begin_apply(&EnvoyHost)?;
        }
        if step.begins_reset {
            let _ = EnvoyHost.increment(self.metrics.resets, 1);
            EnvoyHost.log(
                LogLevel::Warn,
                &format!(
                    "snapshot feed: reset to store {} version {}: its whole snapshot replaces the one held (store {}); keys it lacks are refused once it is applied",
                    page.store.as_deref().unwrap_or("(unnamed)"),
                    page.version,
                    epochs.committed.store.as_deref().unwrap_or("(unnamed)"),
                ),
            );
        }
        if let Some(before) = &step.before {
            shared::write_epochs(&EnvoyHost, before)?;
        }
        for (digest, record) in &page.records {
            EnvoyHost.shared_set(&shared::record_key(digest), record.encode_entry(step.tag).as_bytes(), None)?;
        }
        let mut state = State::read(&EnvoyHost)?;
        let changed = !page.records.is_empty() || state.applied != page.version || !state.loaded || step.after != epochs;
        state.last_heard_ms = now_ms;
        if page.complete {
            state.loaded = true;
            state.applied = page.version;
            state.cursor = None;
        } else {
            state.cursor = page.cursor.clone();
        }
        EnvoyHost.shared_set(STATE_KEY, state.encode().as_bytes(), None)?;
        if step.after != epochs || step.before.is_some() {
            shared::write_epochs(&EnvoyHost, &step.after)?;
        }
        if bracket {
            shared::end_apply(&EnvoyHost)?;
        }
        let _ = EnvoyHost.increment(self.metrics.pages, 1);
        let _ = EnvoyHost.record(self.metrics.version, state.applied);
        if changed {
            EnvoyHost.log(
                LogLevel::Info,
                &format!("snapshot feed: applied {} records, version {}{}", page.records.len(), page.version, if page.complete { "" } else { " (more to come)" }),
            );
            if page.complete {
                if let Some(started) = self.full_sync_started_ms.take() {
                    EnvoyHost.log(LogLevel::Info, &format!("full snapshot version {} applied in {} ms", page.version, now_ms.saturating_sub(started)));
                }
            }
        }
        Ok(())
    }

    fn enqueue_pending(&mut self) -> Result<(), HostError> {
        let msg = usage::lines(&self.pending);
        if to_leader(&mut self.producer_queue, USAGE_QUEUE, &msg)? {
            self.pending.clear();
        }
        Ok(())
    }

    pub fn on_queue_ready(&mut self, queue: u32) {
        if Some(queue) == self.rates_consumer {
            while let Ok(Some(msg)) = EnvoyHost.dequeue(queue) {
                let text = String::from_utf8_lossy(&msg);
                let urgent = text.starts_with("U\n");
                let counts: AdmittedCounts = text.lines().filter_map(Admitted::parse_line).map(|(b, a)| (b.to_string(), a)).collect();
                // The leader's clock: the tick's is not at hand here, and a bucket's watch only
                // needs it to the second.
                let now = EnvoyHost.now_millis().unwrap_or(0);
                self.rates.add(counts, urgent, now);
            }
            return;
        }
        if Some(queue) != self.consumer_queue {
            return;
        }
        while let Ok(Some(msg)) = EnvoyHost.dequeue(queue) {
            usage::merge(&mut self.pending, usage::parse_lines(&String::from_utf8_lossy(&msg)));
        }
    }

    /// Hands this worker's rate-limit admissions to the leader (`U` first: an early push).
    fn enqueue_rates(&mut self) -> Result<(), HostError> {
        let mut msg = String::from(if self.rates_local_urgent { "U\n" } else { "" });
        for (bucket, a) in &self.rates_local {
            msg.push_str(&Admitted::line(bucket, a));
        }
        if to_leader(&mut self.rates_producer, RATES_QUEUE, &msg)? {
            self.rates_local.clear();
            self.rates_local_urgent = false;
        }
        Ok(())
    }

    /// Reports the buckets that moved (or a heartbeat) to `POST /v1/feed/rates`.
    fn start_rate_sync(&mut self, now_ms: u64) -> Result<(), HostError> {
        let envoy = self.envoy_id(now_ms)?;
        let report = self.rates.report(envoy, now_ms);
        let body = serde_json::to_vec(&report).unwrap_or_default();
        let auth = self.cp.token.as_ref().map(|t| format!("Bearer {t}")).unwrap_or_default();
        let headers = self.headers("POST", "/v1/feed/rates", &auth);
        // Never longer than a few sync intervals: a slow control plane costs freshness, not requests.
        let timeout = Duration::from_millis((u64::from(self.cp.rate_sync_ms) * 4).clamp(500, 5_000));
        match EnvoyHost.dispatch(&self.cp.cluster, &headers, Some(&body), timeout) {
            Ok(token) => self.rate_call = Some((token, report)),
            Err(e) => {
                self.rates.failed(&report);
                return Err(e);
            }
        }
        Ok(())
    }

    fn on_rate_answer(&mut self, sent: &RateReport, body_size: usize, now_ms: u64) {
        let was_global = self.rates.fleet().is_some_and(|f| f.global);
        let answer = match EnvoyHost.call_response(body_size.min(1 << 20)) {
            Ok(CallResponse { status: Some(status), body }) if status == "200" => serde_json::from_slice::<RateAnswer>(&body).map_err(|e| format!("an answer it cannot read: {e}")),
            Ok(CallResponse { status: Some(status), .. }) if status.starts_with('4') => Err(format!("refused with HTTP {status}; dropping its counts")),
            Ok(CallResponse { status, .. }) => {
                self.rates.failed(sent);
                Err(format!("HTTP {}; keeping its counts for the next one", status.as_deref().unwrap_or("(no response)")))
            }
            Err(e) => {
                self.rates.failed(sent);
                Err(e.to_string())
            }
        };
        match answer.and_then(|a| {
            let sync_ms = u64::from(self.cp.rate_sync_ms);
            self.rates.apply(&EnvoyHost, sent, &a, now_ms, sync_ms).map(|exhausted| (a, exhausted)).map_err(|e| e.to_string())
        }) {
            Ok((answer, exhausted)) => {
                let _ = EnvoyHost.increment(self.metrics.rate_syncs, 1);
                if exhausted > 0 {
                    let _ = EnvoyHost.increment(self.metrics.rate_exhausted, exhausted);
                }
                let global = answer.mode == RateMode::Global;
                let _ = EnvoyHost.record(self.metrics.rate_global, u64::from(global));
                if was_global && !global {
                    let _ = EnvoyHost.increment(self.metrics.rate_fallbacks, 1);
                    EnvoyHost.log(LogLevel::Warn, &format!("rate limits: the control plane has no fleet-wide counts now; each of {} Envoys enforces its share", answer.envoys.max(1)));
                } else if global && !was_global {
                    EnvoyHost.log(LogLevel::Info, &format!("rate limits: fleet-wide counts across {} Envoys", answer.envoys.max(1)));
                }
                if self.rates_failing {
                    self.rates_failing = false;
                    EnvoyHost.log(LogLevel::Info, "rate limits: reports reach the control plane again");
                }
            }
            Err(why) => {
                let _ = EnvoyHost.increment(self.metrics.rate_sync_failures, 1);
                if was_global {
                    let _ = EnvoyHost.increment(self.metrics.rate_fallbacks, 1);
                    let _ = EnvoyHost.record(self.metrics.rate_global, 0);
                }
                if !self.rates_failing {
                    self.rates_failing = true;
                    EnvoyHost.log(LogLevel::Warn, &format!("rate limits: report to the control plane failed ({why}); each bucket falls back to this Envoy's last share until one succeeds"));
                }
            }
        }
    }

    fn start_report(&mut self) -> Result<(), HostError> {
        let now = self.last_report_ms;
        let envoy = self.envoy_id(now)?;
        let sent = usage::take_batch(&mut self.pending, USAGE_BATCH);
        self.report_more = !self.pending.is_empty();
        let report = UsageReport {
            envoy,
            usage: sent.iter().map(|(id, c)| c.to_report(id)).collect(),
        };
        let body = serde_json::to_vec(&report).unwrap_or_default();
        let auth = self.cp.token.as_ref().map(|t| format!("Bearer {t}")).unwrap_or_default();
        let headers = self.headers("POST", "/v1/feed/usage", &auth);
        match EnvoyHost.dispatch(&self.cp.cluster, &headers, Some(&body), Duration::from_secs(10)) {
            Ok(token) => self.report = Some((token, sent)),
            Err(e) => {
                usage::merge(&mut self.pending, sent);
                return Err(e);
            }
        }
        Ok(())
    }
}
