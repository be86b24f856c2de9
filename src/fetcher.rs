//! The fetcher's shell: runs `keyward_core::fetch::Fetch` (the lease, the feed, usage and rate
//! reports) against a [`Host`]. It gathers the shared-data entries an input needs, calls the
//! machine and runs the commands it returns, in order, answering those that ask for it. It
//! decides nothing.

use crate::host::{Host, HostError, LogLevel, MetricKind, SharedBuckets};
use crate::shared::{self, ENVOY_ID_KEY, LEASE_KEY};
use keyward_core::config::ControlPlane;
use keyward_core::fetch::rates::{RateCounts, SET_ATTEMPTS};
use keyward_core::fetch::{Answer, Call, Command, EnvoyView, Fetch, FeedView, Level, Metric, Queue, State, View};
use keyward_core::ratelimit;
use keyward_core::scope::Implications;
use keyward_core::usage::Usage;
use std::collections::VecDeque;
use std::time::Duration;

pub use keyward_core::fetch::LEASE_MS;

/// Tick period of every VM with a control plane: the state refresh that drops the VM's record
/// cache when the snapshot moved (so a change is enforced at most one tick after it is written),
/// counters, and the fetcher's turn. A tick without work costs one shared-data read.
pub const TICK: Duration = Duration::from_millis(25);

/// Counter and gauge ids of the fetcher's [`Metric`]s, under `wasmcustom.`.
#[derive(Debug, Clone, Default)]
pub struct FeedMetrics([u32; Metric::ALL.len()]);

impl FeedMetrics {
    pub fn define<H: Host>(host: &H) -> Result<FeedMetrics, HostError> {
        let mut ids = [0; Metric::ALL.len()];
        for (id, m) in ids.iter_mut().zip(Metric::ALL) {
            *id = host.define_metric(if m.is_gauge() { MetricKind::Gauge } else { MetricKind::Counter }, m.name())?;
        }
        Ok(FeedMetrics(ids))
    }

    fn id(&self, metric: Metric) -> u32 {
        self.0[metric as usize]
    }
}

/// The queues this VM consumes (once it held the lease) and sends to (the holder's).
#[derive(Debug, Default)]
struct Queues {
    usage_in: Option<u32>,
    rates_in: Option<u32>,
    usage_out: Option<u32>,
    rates_out: Option<u32>,
}

pub struct Fetcher {
    fetch: Fetch,
    metrics: FeedMetrics,
    queues: Queues,
}

fn read_feed<H: Host>(host: &H) -> Result<FeedView, String> {
    // A state entry that cannot be decoded is read as none: the full snapshot asked for then
    // rewrites it.
    let state = match shared::read_state(host) {
        Err(e) if e.status == crate::host::Status::ParseFailure => State::default(),
        other => other.map_err(|e| e.to_string())?,
    };
    let epochs = shared::read_epochs(host).map_err(|e| e.to_string())?;
    Ok(FeedView { state, epochs })
}

fn text(bytes: Option<Vec<u8>>) -> Option<String> {
    bytes.and_then(|v| String::from_utf8(v).ok())
}

fn read_envoy<H: Host>(host: &H) -> Result<EnvoyView, String> {
    let node = text(host.property(&["xds", "node", "id"]).map_err(|e| e.to_string())?);
    let stored = text(host.shared_get(ENVOY_ID_KEY).map_err(|e| e.to_string())?.0);
    Ok(EnvoyView { node, stored })
}

/// Enqueues `msg` on the lease holder's queue `name`, resolving it first (kept in `queue`);
/// false if there is no holder yet, or it moved (resolved again next time).
fn to_leader<H: Host>(host: &H, queue: &mut Option<u32>, name: &str, msg: &str) -> Result<bool, HostError> {
    if queue.is_none() {
        let vm_id = text(host.property(&["plugin_vm_id"])?).unwrap_or_default();
        *queue = host.resolve_queue(&vm_id, name)?;
    }
    let Some(id) = *queue else {
        return Ok(false);
    };
    if host.enqueue(id, msg.as_bytes()).is_err() {
        *queue = None;
        return Ok(false);
    }
    Ok(true)
}

/// Writes the lease with `cas` and reads it back.
fn claim<H: Host>(host: &H, value: &str, cas: Option<u32>) -> Result<bool, HostError> {
    Ok(host.shared_set(LEASE_KEY, value.as_bytes(), cas)? && host.shared_get(LEASE_KEY)?.0.as_deref() == Some(value.as_bytes()))
}

impl Fetcher {
    pub fn new(cp: ControlPlane, implications: Implications, metrics: FeedMetrics, seed: u64) -> Fetcher {
        Fetcher { fetch: Fetch::new(cp, implications, seed), metrics, queues: Queues::default() }
    }

    pub fn on_tick<H: Host>(&mut self, host: &H, now_ms: u64, usage: &Usage, rates: &RateCounts) {
        if self.fetch.lease_due(now_ms) {
            match host.shared_get(LEASE_KEY) {
                Ok((value, cas)) => {
                    let value = value.map(|v| String::from_utf8_lossy(&v).into_owned());
                    let commands = self.fetch.on_lease(now_ms, value.as_deref(), cas);
                    self.run(host, now_ms, commands);
                }
                Err(e) => {
                    self.fetch.on_lease_unreadable(now_ms);
                    return host.log(LogLevel::Warn, &format!("fetcher tick: {e}"));
                }
            }
        }
        if self.fetch.leader() && (self.queues.usage_in.is_none() || self.queues.rates_in.is_none()) {
            // A registration that failed when the lease was taken: again, until both hold.
            self.run(host, now_ms, vec![Command::RegisterQueues]);
        }
        let wants = self.fetch.wants(now_ms);
        let view = View { feed: wants.feed.then(|| read_feed(host)), envoy: wants.envoy.then(|| read_envoy(host)) };
        let commands = self.fetch.on_tick(now_ms, &view, usage, rates);
        self.run(host, now_ms, commands);
    }

    pub fn on_http_call_response<H: Host>(&mut self, host: &H, token: u32, body_size: usize, now_ms: u64) {
        let Some((call, read)) = self.fetch.expects(token, body_size) else { return };
        let answer = host.call_response(read).map(|r| Answer { status: r.status, body: r.body }).map_err(|e| e.to_string());
        let feed = (call == Call::Poll).then(|| read_feed(host));
        let commands = self.fetch.on_response(now_ms, token, body_size, answer, feed);
        self.run(host, now_ms, commands);
    }

    pub fn on_queue_ready<H: Host>(&mut self, host: &H, queue: u32) {
        let kind = match Some(queue) {
            q if q == self.queues.rates_in => Queue::Rates,
            q if q == self.queues.usage_in => Queue::Usage,
            _ => return,
        };
        while let Ok(Some(msg)) = host.dequeue(queue) {
            // The leader's clock: a bucket's watch only needs it to the second.
            let now = host.now_millis().unwrap_or(0);
            self.fetch.on_queue(kind, &String::from_utf8_lossy(&msg), now);
        }
    }

    /// Runs `commands` in order; an answer's own commands run before the rest.
    fn run<H: Host>(&mut self, host: &H, now_ms: u64, commands: Vec<Command>) {
        let mut todo = VecDeque::from(commands);
        while let Some(command) = todo.pop_front() {
            for next in self.execute(host, now_ms, command).into_iter().rev() {
                todo.push_front(next);
            }
        }
    }

    fn execute<H: Host>(&mut self, host: &H, now_ms: u64, command: Command) -> Vec<Command> {
        let warn = |e: HostError| host.log(LogLevel::Warn, &format!("fetcher tick: {e}"));
        match command {
            Command::ClaimLease { value, cas } => match claim(host, &value, cas) {
                Ok(held) => return self.fetch.lease_claimed(now_ms, held),
                Err(e) => warn(e),
            },
            Command::RegisterQueues => {
                for (queue, id) in [(Queue::Usage, &mut self.queues.usage_in), (Queue::Rates, &mut self.queues.rates_in)] {
                    match host.register_queue(queue.name()) {
                        Ok(registered) => *id = Some(registered),
                        Err(e) => warn(e),
                    }
                }
            }
            Command::Send { queue, text } => {
                let out = match queue {
                    Queue::Usage => &mut self.queues.usage_out,
                    Queue::Rates => &mut self.queues.rates_out,
                };
                let delivered = to_leader(host, out, queue.name(), &text).unwrap_or_else(|e| {
                    warn(e);
                    false
                });
                self.fetch.sent(queue, delivered);
            }
            Command::Dispatch(r) => {
                let headers: Vec<(&str, &str)> = r.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                let token = host.dispatch(&r.cluster, &headers, r.body.as_deref(), r.timeout).map_err(|e| e.to_string());
                return self.fetch.dispatched(now_ms, r.call, token);
            }
            Command::Apply(writes) => {
                let result = writes.iter().try_for_each(|w| shared::write(host, w)).map_err(|e| e.to_string());
                return self.fetch.applied(now_ms, result);
            }
            Command::Set(w) => shared::write(host, &w).unwrap_or_else(warn),
            Command::SetOthers { bucket, others, until_us } => {
                if let Err(e) = ratelimit::set_others(&SharedBuckets(host), &bucket, others, until_us, SET_ATTEMPTS) {
                    warn(e);
                }
            }
            Command::Increment(m, n) => {
                let _ = host.increment(self.metrics.id(m), n);
            }
            Command::Record(m, v) => {
                let _ = host.record(self.metrics.id(m), v);
            }
            Command::Log(level, message) => {
                let level = match level {
                    Level::Info => LogLevel::Info,
                    Level::Warn => LogLevel::Warn,
                    Level::Error => LogLevel::Error,
                };
                host.log(level, &message);
            }
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{CallResponse, FakeHost};
    use keyward_core::fetch::USAGE_QUEUE;
    use keyward_core::Digest;

    fn cp() -> ControlPlane {
        ControlPlane {
            cluster: "keyward".into(),
            authority: "keyward.local".into(),
            feed_wait_secs: 30,
            max_snapshot_age_secs: None,
            usage_report_secs: 5,
            max_feed_bytes: 1 << 20,
            token: Some("t0k".into()),
            rate_sync_ms: 250,
        }
    }

    /// Two VMs of one Envoy: the lease holder polls, applies a page to shared data, and reports
    /// the usage the other VM handed over through the queue.
    #[test]
    fn the_lease_holder_polls_applies_and_reports_what_another_vm_counted() {
        let host = FakeHost::new();
        host.set_property(&["xds", "node", "id"], b"node-1");
        let metrics = FeedMetrics::define(&host).unwrap();
        let (mut a, mut b) = (Fetcher::new(cp(), Implications::default(), metrics.clone(), 1), Fetcher::new(cp(), Implications::default(), metrics, 2));
        let (usage, rates) = (Usage::default(), RateCounts::default());
        a.on_tick(&host, 10_000, &usage, &rates);
        b.on_tick(&host, 10_000, &usage, &rates);
        assert!(a.fetch.leader() && !b.fetch.leader());
        assert_eq!(host.logged("now fetches the snapshot feed").len(), 1);
        let get = |host: &FakeHost| host.take_dispatched().into_iter().filter(|d| d.header(":method") == Some("GET")).collect::<Vec<_>>();
        let polls = get(&host);
        assert_eq!(polls.len(), 1, "only the holder polls");
        let poll = &polls[0];
        assert_eq!((poll.cluster.as_str(), poll.timeout), ("keyward", Duration::from_secs(10)));
        assert_eq!(poll.header(":path"), Some("/v1/feed?envoy=node-1&wait=0&since=0&format=2&max_bytes=1048576&store="));
        assert_eq!((poll.header(":method"), poll.header("authorization")), (Some("GET"), Some("Bearer t0k")));

        let digest = Digest::of(b"secret");
        let body = format!("keyward-feed 2\nversion 3\ncomplete\nstore A\nkeys 1\n{}\t2\tkey_1\ta\ta\t\t1\t\t\t\t\t\t\t\nend\n", digest.to_hex());
        *host.response.borrow_mut() = CallResponse { status: Some("200".into()), body: body.clone().into_bytes() };
        a.on_http_call_response(&host, poll.token, body.len(), 10_005);
        assert!(host.shared_text(&shared::record_key(&digest)).is_some_and(|r| r.contains("key_1")));
        assert!(host.shared_text(shared::STATE_KEY).is_some_and(|s| s.starts_with("L 3 10005 ")));
        assert_eq!(shared::generation(&host).unwrap() % 2, 0, "the apply is closed");
        assert_eq!((host.metric("keyward.feed.pages_applied"), host.metric("keyward.feed.applied_version")), (Some(1), Some(3)));
        assert_eq!(host.logged("snapshot feed: applied 1 records, version 3").len(), 1);
        let next = get(&host);
        assert_eq!(next[0].header(":path"), Some("/v1/feed?envoy=node-1&wait=30&since=3&format=2&max_bytes=1048576&store=A"));
        assert_eq!(next[0].timeout, Duration::from_secs(40));

        usage.allowed(&digest, "key_1", 100);
        b.on_tick(&host, 11_000, &usage, &rates);
        let queue = host.resolve_queue("", USAGE_QUEUE).unwrap().unwrap();
        a.on_queue_ready(&host, queue);
        a.on_tick(&host, 15_005, &Usage::default(), &rates);
        let reports: Vec<_> = host.take_dispatched().into_iter().filter(|d| d.header(":path") == Some("/v1/feed/usage")).collect();
        assert_eq!(reports.len(), 1);
        assert!(String::from_utf8_lossy(&reports[0].body).contains(r#"{"key_id":"key_1","count":1,"last_used":100}"#));
        assert_eq!(reports[0].header("content-type"), Some("application/json"));
    }
}
