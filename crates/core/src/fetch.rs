//! The fetcher as a sans-IO state machine: the lease, the feed's back-off and paging, the order
//! in which a page is written, usage batching and the fleet's rate sync.
//!
//! A shell (the proxy-wasm filter's `fetcher`, later an Envoy dynamic module) gathers the few
//! shared-data entries an input needs, calls one of [`Fetch`]'s inputs (a tick at time t, a
//! response, a queue message) and runs the [`Command`]s it returns, in order. Commands whose
//! outcome matters answer back: [`Command::ClaimLease`] with [`Fetch::lease_claimed`],
//! [`Command::Send`] with [`Fetch::sent`], [`Command::Dispatch`] with [`Fetch::dispatched`],
//! [`Command::Apply`] with [`Fetch::applied`]. Nothing here reads a clock or does I/O.
//!
//! A lease instead of a bootstrap singleton, because Istio's `WasmPlugin` gives no custom
//! bootstrap: whichever VM holds the lease fetches, and if it dies the lease lapses and another
//! VM takes over within [`LEASE_MS`].

pub mod rates;

use crate::config::ControlPlane;
use crate::digest::Digest;
use crate::feed::{parse_page, Epochs, FeedAsk, FeedCursor, FeedError, RateAnswer, RateMode, RateReport, UsageReport, LINES_FORMAT};
use crate::scope::Implications;
use crate::snapshot::tag_entry;
use crate::url::encode_component as encode;
use crate::usage::{self, Usage, UsageCounts};
use rates::{AdmittedCounts, RateCounts, RateSync, RATES_QUEUE};
use std::time::Duration;

/// How long a lease lasts without renewal.
pub const LEASE_MS: u64 = 2_000;
/// How often the lease is renewed (or, by the others, checked), well inside `LEASE_MS`.
pub const LEASE_CHECK_MS: u64 = 250;
pub const BACKOFF_MIN_MS: u64 = 250;
pub const BACKOFF_MAX_MS: u64 = 10_000;
/// Keys per usage report: at most about 500 bytes each (a 128-character id, every code
/// counted), so a report stays under the 1 MiB body limit of `POST /v1/feed/usage`. More keys
/// go out in further reports, one per tick.
pub const USAGE_BATCH: usize = 1_000;

/// Prefix of every entry: plugins on one Istio proxy share a namespace (no `vm_id` there).
pub const PREFIX: &str = "keyward.";
pub const STATE_KEY: &str = "keyward.state";
/// `<owner> <expiry ms>`, written with CAS.
pub const LEASE_KEY: &str = "keyward.lease";
pub const ENVOY_ID_KEY: &str = "keyward.envoy";
/// The apply generation. Its CAS token (which Envoy changes on every write) identifies the
/// generation; its value is non-empty while the fetcher writes a page's records and empty
/// otherwise. Every request reads it: an empty value costs no allocation in the VM.
pub const GENERATION_KEY: &str = "keyward.gen";
pub const USAGE_QUEUE: &str = "keyward.usage";
/// The live feed epochs ([`Epochs`]): written only by the fetcher, only while the generation is
/// odd, so a worker reads it again whenever the generation moved (and on every request while it
/// is odd), never on a steady request. Absent until the first apply that names a store.
pub const EPOCHS_KEY: &str = "keyward.epochs";

pub fn record_key(digest: &Digest) -> String {
    format!("{PREFIX}k.{}", digest.to_hex())
}

/// One shared-data write, without CAS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub key: String,
    pub value: String,
}

impl Write {
    /// Before a page's records are written: the generation becomes odd, so no worker caches a
    /// record meanwhile.
    pub fn begin_apply() -> Write {
        Write { key: GENERATION_KEY.to_string(), value: "applying".to_string() }
    }

    /// After the page's records and the state: a new, even generation, so every worker drops
    /// the records it cached before.
    pub fn end_apply() -> Write {
        Write { key: GENERATION_KEY.to_string(), value: String::new() }
    }

    /// Only between [`Write::begin_apply`] and [`Write::end_apply`].
    pub fn epochs(epochs: &Epochs) -> Write {
        Write { key: EPOCHS_KEY.to_string(), value: epochs.encode() }
    }
}

/// What the fetcher has applied, as every worker sees it (`keyward.state`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    /// A complete snapshot has been applied at least once.
    pub loaded: bool,
    /// The last completely applied version.
    pub applied: u64,
    /// When the feed last answered (ms since the epoch).
    pub last_heard_ms: u64,
    /// Mid-delta position, when a delta spans pages.
    pub cursor: Option<FeedCursor>,
}

impl State {
    pub fn encode(&self) -> String {
        let (cv, cid) = match &self.cursor {
            Some(c) => (c.version.to_string(), c.id.clone()),
            None => ("-".into(), "-".into()),
        };
        format!("{} {} {} {cv} {cid}", if self.loaded { "L" } else { "-" }, self.applied, self.last_heard_ms)
    }

    pub fn decode(s: &str) -> Option<State> {
        let mut f = s.split(' ');
        let loaded = match f.next()? {
            "L" => true,
            "-" => false,
            _ => return None,
        };
        let applied = f.next()?.parse().ok()?;
        let last_heard_ms = f.next()?.parse().ok()?;
        let cursor = match (f.next()?, f.next()?) {
            ("-", "-") => None,
            (v, id) => Some(FeedCursor { version: v.parse().ok()?, id: id.to_string() }),
        };
        Some(State { loaded, applied, last_heard_ms, cursor })
    }

    /// The same snapshot content: nothing applied in between (the feed's last answer may differ).
    pub fn same_snapshot(&self, other: &State) -> bool {
        self.loaded == other.loaded && self.applied == other.applied && self.cursor == other.cursor
    }

    /// How requests may use the shared keys now: the whole snapshot; part of the first one,
    /// while it loads; or none.
    pub fn keys(&self, now_ms: u64, max_age_secs: Option<u32>) -> Keys {
        match (self.loaded, &self.cursor) {
            _ if !self.fresh(now_ms, max_age_secs) => Keys::None,
            (true, _) => Keys::Whole,
            (false, Some(_)) => Keys::Partial,
            (false, None) => Keys::None,
        }
    }

    fn fresh(&self, now_ms: u64, max_age_secs: Option<u32>) -> bool {
        max_age_secs.is_none_or(|max| now_ms.saturating_sub(self.last_heard_ms) <= u64::from(max) * 1000)
    }
}

/// Which keys a request may be judged against ([`State::keys`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// The snapshot is loaded: a key absent from it is unknown (401).
    Whole,
    /// The first snapshot is loading, and at least one page of it is written: a key found is
    /// judged, and a key not found yet is unavailable (503), never unknown, since it may be on
    /// a page still to come. A found key's record is as current as the page it came on, and
    /// any later change to it has a higher version, so it comes on a later page of this load.
    Partial,
    /// Nothing to judge by (503, or `fail_open`).
    None,
}

/// The fetcher's counters and gauges; the shell maps each to its host's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Pages,
    Rejected,
    Errors,
    Version,
    UsageReports,
    Resets,
    /// Rate-limit reports answered (`keyward.rate_limit.syncs`), failed, fallbacks from global
    /// counts to this Envoy's share, and buckets found exhausted by the other Envoys.
    RateSyncs,
    RateSyncFailures,
    RateFallbacks,
    RateExhausted,
    /// 1 while this Envoy judges by fleet-wide counts, 0 while it enforces its share.
    RateGlobal,
}

impl Metric {
    pub const ALL: [Metric; 11] = [
        Metric::Pages,
        Metric::Rejected,
        Metric::Errors,
        Metric::Version,
        Metric::UsageReports,
        Metric::Resets,
        Metric::RateSyncs,
        Metric::RateSyncFailures,
        Metric::RateFallbacks,
        Metric::RateExhausted,
        Metric::RateGlobal,
    ];

    /// Its stat name, under `wasmcustom.`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Pages => "keyward.feed.pages_applied",
            Metric::Rejected => "keyward.feed.pages_rejected",
            Metric::Errors => "keyward.feed.errors",
            Metric::Version => "keyward.feed.applied_version",
            Metric::UsageReports => "keyward.feed.usage_reports",
            Metric::Resets => "keyward.feed.resets",
            Metric::RateSyncs => "keyward.rate_limit.syncs",
            Metric::RateSyncFailures => "keyward.rate_limit.sync_failures",
            Metric::RateFallbacks => "keyward.rate_limit.fallbacks",
            Metric::RateExhausted => "keyward.rate_limit.exhausted",
            Metric::RateGlobal => "keyward.rate_limit.global",
        }
    }

    pub fn is_gauge(self) -> bool {
        matches!(self, Metric::Version | Metric::RateGlobal)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// The queues from every VM to the lease holder's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    Usage,
    Rates,
}

impl Queue {
    pub fn name(self) -> &'static str {
        match self {
            Queue::Usage => USAGE_QUEUE,
            Queue::Rates => RATES_QUEUE,
        }
    }
}

/// The fetcher's HTTP calls to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `GET /v1/feed`
    Poll,
    /// `POST /v1/feed/usage`
    Usage,
    /// `POST /v1/feed/rates`
    Rates,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub call: Call,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub timeout: Duration,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// What the shell runs, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Write `keyward.lease` with `cas`, read it back, and answer [`Fetch::lease_claimed`] with
    /// whether it reads `value` (without a CAS token two VMs may both write: the last one wins).
    ClaimLease { value: String, cas: Option<u32> },
    /// This VM now holds the lease: register the queues the others send to.
    RegisterQueues,
    /// Enqueue `text` on the lease holder's `queue`; answer [`Fetch::sent`].
    Send { queue: Queue, text: String },
    /// Answer [`Fetch::dispatched`] with the call's token or why it was not sent.
    Dispatch(Request),
    /// A page: write these in order, stop at the first failure, and answer [`Fetch::applied`].
    Apply(Vec<Write>),
    /// A write whose failure is only logged.
    Set(Write),
    /// [`crate::ratelimit::set_others`] on one bucket, [`rates::SET_ATTEMPTS`] times at most.
    SetOthers { bucket: String, others: u64, until_us: u64 },
    Increment(Metric, u64),
    Record(Metric, u64),
    Log(Level, String),
}

/// `keyward.state` and `keyward.epochs`, read for a poll and for its answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedView {
    pub state: State,
    pub epochs: Epochs,
}

/// Where this Envoy's name in `keyward status` comes from: its bootstrap `node.id`, else the
/// id its VMs share in `keyward.envoy`, else a new one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvoyView {
    pub node: Option<String>,
    pub stored: Option<String>,
}

/// What [`Fetch::on_tick`] needs read, after the lease: see [`Fetch::wants`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wants {
    pub feed: bool,
    pub envoy: bool,
}

/// The entries a tick reads, those it [`Wants`] (`None` otherwise; `Err` if the read failed).
#[derive(Debug, Clone, Default)]
pub struct View {
    pub feed: Option<Result<FeedView, String>>,
    pub envoy: Option<Result<EnvoyView, String>>,
}

/// An HTTP answer: its `:status` (absent when the call failed) and the body read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    pub status: Option<String>,
    pub body: Vec<u8>,
}

/// A page's outcome, kept between [`Command::Apply`] and [`Fetch::applied`].
#[derive(Debug)]
struct Applying {
    version: u64,
    records: usize,
    complete: bool,
    changed: bool,
    /// The state and epochs as written: the next poll asks from them.
    wrote: FeedView,
}

/// Why a poll's answer was not applied: a page refused whole, or anything else.
enum Fault {
    Page(FeedError),
    Other(String),
}

impl From<FeedError> for Fault {
    fn from(e: FeedError) -> Fault {
        Fault::Page(e)
    }
}

/// The fetcher of one VM. Every VM has one; only the lease holder polls and reports.
#[derive(Debug)]
pub struct Fetch {
    cp: ControlPlane,
    implications: Implications,
    /// This VM's identity for the lease.
    owner: String,
    leader: bool,
    envoy_id: Option<String>,
    /// The poll in flight (its token once dispatched) and what it asked for: its answer is
    /// read against it.
    poll: Option<(Option<u32>, FeedAsk)>,
    applying: Option<Applying>,
    full_sync_started_ms: Option<u64>,
    next_poll_ms: u64,
    backoff_ms: u64,
    /// The usage report in flight and the counts it carries.
    report: Option<(Option<u32>, UsageCounts)>,
    last_report_ms: u64,
    /// Usage gathered for the next report (leader) or the next enqueue (others).
    pending: UsageCounts,
    last_flush_ms: u64,
    /// The last report left keys behind: send the next batch on the next tick.
    report_more: bool,
    last_lease_ms: u64,
    /// Fleet rate limits: the leader's reports and answers.
    rates: RateSync,
    rate_call: Option<(Option<u32>, RateReport)>,
    /// A worker's admissions until it hands them to the leader, and whether any is urgent.
    rates_local: AdmittedCounts,
    rates_local_urgent: bool,
    last_rates_flush_ms: u64,
    /// The last rate report failed (logged once until one succeeds again).
    rates_failing: bool,
    /// What the feed is told this Envoy runs (`shell=`): `native` from libkeyward.so; none from
    /// keyward.wasm, so that an older `keyward serve` sees the requests it always saw.
    shell: Option<&'static str>,
}

fn log(level: Level, message: String) -> Command {
    Command::Log(level, message)
}

impl Fetch {
    pub fn new(cp: ControlPlane, implications: Implications, seed: u64) -> Fetch {
        Fetch {
            cp,
            implications,
            owner: Digest::of(&seed.to_le_bytes()).short(),
            leader: false,
            envoy_id: None,
            poll: None,
            applying: None,
            full_sync_started_ms: None,
            next_poll_ms: 0,
            backoff_ms: BACKOFF_MIN_MS,
            report: None,
            last_report_ms: 0,
            pending: UsageCounts::default(),
            last_flush_ms: 0,
            report_more: false,
            last_lease_ms: 0,
            rates: RateSync::default(),
            rate_call: None,
            rates_local: AdmittedCounts::new(),
            rates_local_urgent: false,
            last_rates_flush_ms: 0,
            rates_failing: false,
            shell: None,
        }
    }

    /// Says `shell` in every feed request (`keyward status` shows it).
    pub fn with_shell(mut self, shell: &'static str) -> Fetch {
        self.shell = Some(shell);
        self
    }

    pub fn leader(&self) -> bool {
        self.leader
    }

    /// Whether this tick checks the lease: the shell then reads it for [`Fetch::on_lease`].
    pub fn lease_due(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_lease_ms) >= LEASE_CHECK_MS
    }

    /// The lease entry as read (`value`, with its CAS token): claim it (renew it) unless
    /// another VM holds it unexpired.
    pub fn on_lease(&mut self, now_ms: u64, value: Option<&str>, cas: Option<u32>) -> Vec<Command> {
        self.last_lease_ms = now_ms;
        let current = value.and_then(|v| {
            let (owner, exp) = v.split_once(' ')?;
            Some((owner, exp.parse::<u64>().ok()?))
        });
        if let Some((owner, expiry)) = current {
            if owner != self.owner && expiry > now_ms {
                return self.lease_claimed(now_ms, false);
            }
        }
        vec![Command::ClaimLease { value: format!("{} {}", self.owner, now_ms + LEASE_MS), cas }]
    }

    /// The lease entry could not be read: try again at the next check, holding what was held.
    pub fn on_lease_unreadable(&mut self, now_ms: u64) {
        self.last_lease_ms = now_ms;
    }

    /// Whether this VM holds the lease now.
    pub fn lease_claimed(&mut self, now_ms: u64, held: bool) -> Vec<Command> {
        let was = std::mem::replace(&mut self.leader, held);
        if !held || was {
            return Vec::new();
        }
        // Another VM may have written the fleet meanwhile; poll at once.
        self.rates.became_leader();
        self.next_poll_ms = now_ms;
        vec![log(Level::Info, format!("this VM ({}) now fetches the snapshot feed", self.owner)), Command::RegisterQueues]
    }

    /// What the shell reads for [`Fetch::on_tick`] (after the lease).
    pub fn wants(&self, now_ms: u64) -> Wants {
        Wants { feed: self.leader && self.poll.is_none() && now_ms >= self.next_poll_ms, envoy: self.leader && self.envoy_id.is_none() }
    }

    /// A tick at `now_ms`: hand this worker's counts on (or take them into the reports), and
    /// as the lease holder start a poll, a rate report or a usage report when due.
    pub fn on_tick(&mut self, now_ms: u64, view: &View, usage: &Usage, rates: &RateCounts) -> Vec<Command> {
        let mut out = Vec::new();
        // This worker's rate-limit admissions: the leader's go into its next report; another
        // worker's to the leader, every half sync interval, or at once on an early push.
        let (admitted, urgent) = rates.take();
        if self.leader {
            let local = std::mem::take(&mut self.rates_local);
            self.rates.add(local, self.rates_local_urgent, now_ms);
            self.rates_local_urgent = false;
            self.rates.add(admitted, urgent, now_ms);
        } else {
            rates::merge(&mut self.rates_local, admitted);
            self.rates_local_urgent |= urgent;
            let half = u64::from(self.cp.rate_sync_ms / 2);
            if !self.rates_local.is_empty() && (self.rates_local_urgent || now_ms.saturating_sub(self.last_rates_flush_ms) >= half) {
                self.last_rates_flush_ms = now_ms;
                out.push(Command::Send { queue: Queue::Rates, text: rates::message(&self.rates_local, self.rates_local_urgent) });
            }
        }
        // Gather this worker's usage once a second.
        if now_ms.saturating_sub(self.last_flush_ms) >= 1_000 {
            self.last_flush_ms = now_ms;
            usage::merge(&mut self.pending, usage.take());
            if !self.leader && !self.pending.is_empty() {
                out.push(Command::Send { queue: Queue::Usage, text: usage::lines(&self.pending) });
            }
        }
        if !self.leader {
            return out;
        }
        if self.poll.is_none() && now_ms >= self.next_poll_ms {
            let feed = match &view.feed {
                Some(Ok(feed)) => Ok(feed),
                Some(Err(e)) => Err(e.clone()),
                None => Err("the shared state was not read".to_string()),
            };
            if let Err(e) = self.start_poll(now_ms, feed, view.envoy.as_ref(), &mut out) {
                out.extend(self.fail(now_ms, &e));
            }
        }
        if self.rate_call.is_none() && self.rates.due(now_ms, u64::from(self.cp.rate_sync_ms)) {
            match self.envoy_id(now_ms, view.envoy.as_ref(), &mut out) {
                Ok(envoy) => out.push(self.start_rate_sync(envoy, now_ms)),
                Err(e) => out.push(log(Level::Warn, format!("fetcher tick: {e}"))),
            }
        }
        let due = self.report_more || now_ms.saturating_sub(self.last_report_ms) >= u64::from(self.cp.usage_report_secs) * 1000;
        if due && self.report.is_none() && !self.pending.is_empty() {
            self.last_report_ms = now_ms;
            match self.envoy_id(now_ms, view.envoy.as_ref(), &mut out) {
                Ok(envoy) => out.push(self.start_report(envoy)),
                Err(e) => out.push(log(Level::Warn, format!("fetcher tick: {e}"))),
            }
        }
        out
    }

    /// A message from another VM's [`Command::Send`] (the lease holder's queues).
    pub fn on_queue(&mut self, queue: Queue, text: &str, now_ms: u64) {
        match queue {
            Queue::Usage => usage::merge(&mut self.pending, usage::parse_lines(text)),
            Queue::Rates => {
                let (counts, urgent) = rates::parse_message(text);
                self.rates.add(counts, urgent, now_ms);
            }
        }
    }

    /// Whether a [`Command::Send`] reached the lease holder: if not (no holder yet, or it
    /// moved), keep what was counted for the next one.
    pub fn sent(&mut self, queue: Queue, delivered: bool) {
        if !delivered {
            return;
        }
        match queue {
            Queue::Usage => self.pending.clear(),
            Queue::Rates => {
                self.rates_local.clear();
                self.rates_local_urgent = false;
            }
        }
    }

    /// The outcome of a [`Command::Dispatch`]: the call's token, or why it was not sent.
    pub fn dispatched(&mut self, now_ms: u64, call: Call, token: Result<u32, String>) -> Vec<Command> {
        match (call, token) {
            (Call::Poll, Ok(t)) => {
                if let Some((token, _)) = &mut self.poll {
                    *token = Some(t);
                }
                Vec::new()
            }
            (Call::Usage, Ok(t)) => {
                if let Some((token, _)) = &mut self.report {
                    *token = Some(t);
                }
                Vec::new()
            }
            (Call::Rates, Ok(t)) => {
                if let Some((token, _)) = &mut self.rate_call {
                    *token = Some(t);
                }
                Vec::new()
            }
            (Call::Poll, Err(e)) => {
                self.poll = None;
                self.fail(now_ms, &e)
            }
            (Call::Usage, Err(e)) => {
                if let Some((_, sent)) = self.report.take() {
                    usage::merge(&mut self.pending, sent);
                }
                vec![log(Level::Warn, format!("fetcher tick: {e}"))]
            }
            (Call::Rates, Err(e)) => {
                if let Some((_, sent)) = self.rate_call.take() {
                    self.rates.failed(&sent);
                }
                vec![log(Level::Warn, format!("fetcher tick: {e}"))]
            }
        }
    }

    /// Which call `token` answers, and how many bytes of its `body_size` to read (none of a
    /// feed page over `max_feed_bytes`: it is refused unread).
    pub fn expects(&self, token: u32, body_size: usize) -> Option<(Call, usize)> {
        let is = |t: Option<u32>| t == Some(token);
        if self.poll.as_ref().is_some_and(|(t, _)| is(*t)) {
            Some((Call::Poll, if body_size > self.cp.max_feed_bytes { 0 } else { body_size }))
        } else if self.rate_call.as_ref().is_some_and(|(t, _)| is(*t)) {
            Some((Call::Rates, body_size.min(1 << 20)))
        } else if self.report.as_ref().is_some_and(|(t, _)| is(*t)) {
            Some((Call::Usage, 0))
        } else {
            None
        }
    }

    /// The answer to call `token` (see [`Fetch::expects`]); for a poll, `feed` is the shared
    /// state and epochs as read now.
    pub fn on_response(&mut self, now_ms: u64, token: u32, body_size: usize, answer: Result<Answer, String>, feed: Option<Result<FeedView, String>>) -> Vec<Command> {
        match self.expects(token, body_size).map(|(call, _)| call) {
            Some(Call::Poll) => {
                let Some((_, asked)) = self.poll.take() else { return Vec::new() };
                match self.apply_page(now_ms, body_size, answer, feed, &asked) {
                    Ok(out) => out,
                    Err(Fault::Page(e)) => {
                        let mut out = vec![
                            log(Level::Error, format!("snapshot feed: rejected a page, keeping the last good snapshot: {e}")),
                            Command::Increment(Metric::Rejected, 1),
                        ];
                        out.extend(self.fail(now_ms, "page rejected"));
                        out
                    }
                    Err(Fault::Other(e)) => self.fail(now_ms, &e),
                }
            }
            Some(Call::Rates) => match self.rate_call.take() {
                Some((_, sent)) => self.on_rate_answer(&sent, answer, now_ms),
                None => Vec::new(),
            },
            Some(Call::Usage) => {
                let Some((_, sent)) = self.report.take() else { return Vec::new() };
                match answer {
                    Ok(Answer { status: Some(s), .. }) if s == "200" || s == "204" => vec![Command::Increment(Metric::UsageReports, 1)],
                    // A refusal will not change on a retry: keeping the counts would grow them forever.
                    Ok(Answer { status: Some(s), .. }) if s.starts_with('4') => {
                        self.report_more = false;
                        vec![log(Level::Error, format!("usage report refused with HTTP {s}; dropping the counts of {} keys", sent.len()))]
                    }
                    other => {
                        let why = match other {
                            Ok(Answer { status: Some(s), .. }) => format!("HTTP {s}"),
                            Ok(Answer { status: None, .. }) => "no response".to_string(),
                            Err(e) => e,
                        };
                        usage::merge(&mut self.pending, sent);
                        vec![log(Level::Warn, format!("usage report failed ({why}); keeping the counts for the next one"))]
                    }
                }
            }
            None => Vec::new(),
        }
    }

    /// The outcome of a [`Command::Apply`]: on success the next poll goes out at once (its
    /// `since` is the version just applied: from then on every worker enforces it).
    pub fn applied(&mut self, now_ms: u64, result: Result<(), String>) -> Vec<Command> {
        let Some(a) = self.applying.take() else { return Vec::new() };
        if let Err(e) = result {
            return self.fail(now_ms, &e);
        }
        let mut out = vec![Command::Increment(Metric::Pages, 1), Command::Record(Metric::Version, a.wrote.state.applied)];
        if a.changed {
            out.push(log(Level::Info, format!("snapshot feed: applied {} records, version {}{}", a.records, a.version, if a.complete { "" } else { " (more to come)" })));
            if a.complete {
                if let Some(started) = self.full_sync_started_ms.take() {
                    out.push(log(Level::Info, format!("full snapshot version {} applied in {} ms", a.version, now_ms.saturating_sub(started))));
                }
            }
        }
        self.backoff_ms = BACKOFF_MIN_MS;
        self.next_poll_ms = now_ms;
        if self.leader {
            if let Err(e) = self.start_poll(now_ms, Ok(&a.wrote), None, &mut out) {
                out.extend(self.fail(now_ms, &e));
            }
        }
        out
    }

    /// This Envoy's name in `keyward status`, resolved once.
    fn envoy_id(&mut self, now_ms: u64, view: Option<&Result<EnvoyView, String>>, out: &mut Vec<Command>) -> Result<String, String> {
        if let Some(id) = &self.envoy_id {
            return Ok(id.clone());
        }
        let view = match view {
            Some(Ok(v)) => v,
            Some(Err(e)) => return Err(e.clone()),
            None => return Err("this Envoy's id was not read".to_string()),
        };
        let known = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        let id = match known(&view.node).or_else(|| known(&view.stored)) {
            Some(id) => id,
            None => {
                let id = format!("envoy-{}", Digest::of(format!("{}{now_ms}", self.owner).as_bytes()).short());
                out.push(Command::Set(Write { key: ENVOY_ID_KEY.to_string(), value: id.clone() }));
                id
            }
        };
        self.envoy_id = Some(id.clone());
        Ok(id)
    }

    fn request(&self, call: Call, path: &str, body: Option<Vec<u8>>, timeout: Duration) -> Request {
        let method = if call == Call::Poll { "GET" } else { "POST" };
        let mut headers: Vec<(String, String)> = vec![
            (":method".into(), method.into()),
            (":path".into(), path.into()),
            (":authority".into(), self.cp.authority.clone()),
            ("accept".into(), "application/json".into()),
        ];
        if let Some(t) = &self.cp.token {
            headers.push(("authorization".into(), format!("Bearer {t}")));
        }
        if method == "POST" {
            headers.push(("content-type".into(), "application/json".into()));
        }
        Request { call, cluster: self.cp.cluster.clone(), headers, body, timeout }
    }

    fn start_poll(&mut self, now_ms: u64, feed: Result<&FeedView, String>, envoy: Option<&Result<EnvoyView, String>>, out: &mut Vec<Command>) -> Result<(), String> {
        let FeedView { state, epochs } = feed?;
        let envoy = self.envoy_id(now_ms, envoy, out)?;
        let ask = epochs.ask(state.loaded, state.applied, state.cursor.as_ref());
        // Until a snapshot is loaded, or while a reset starts over, do not wait: ask now.
        let wait = if state.loaded && !ask.restart { self.cp.feed_wait_secs } else { 0 };
        let mut path = format!("/v1/feed?envoy={}&wait={wait}&since={}&format={LINES_FORMAT}&max_bytes={}", encode(&envoy), ask.since, self.cp.max_feed_bytes);
        if let Some(after) = &ask.after {
            path.push_str(&format!("&after={}", encode(after)));
        }
        // Always sent, empty before a store is known: a control plane tells a filter that
        // understands `store` and `reset` by it.
        path.push_str(&format!("&store={}", encode(ask.store.as_deref().unwrap_or(""))));
        if let Some(shell) = self.shell {
            path.push_str(&format!("&shell={shell}"));
        }
        if !state.loaded && state.cursor.is_none() {
            self.full_sync_started_ms = Some(now_ms);
        }
        out.push(Command::Dispatch(self.request(Call::Poll, &path, None, Duration::from_secs(u64::from(wait) + 10))));
        self.poll = Some((None, ask));
        Ok(())
    }

    fn fail(&mut self, now_ms: u64, why: &str) -> Vec<Command> {
        let out = vec![log(Level::Warn, format!("snapshot feed: {why}; retrying in {} ms", self.backoff_ms)), Command::Increment(Metric::Errors, 1)];
        self.next_poll_ms = now_ms + self.backoff_ms;
        self.backoff_ms = (self.backoff_ms * 2).min(BACKOFF_MAX_MS);
        out
    }

    /// A poll's answer: validate the whole page, then the writes that apply it.
    fn apply_page(&mut self, now_ms: u64, body_size: usize, answer: Result<Answer, String>, feed: Option<Result<FeedView, String>>, asked: &FeedAsk) -> Result<Vec<Command>, Fault> {
        if body_size > self.cp.max_feed_bytes {
            return Err(FeedError::TooLarge { size: body_size, max: self.cp.max_feed_bytes }.into());
        }
        let answer = answer.map_err(Fault::Other)?;
        match answer.status.as_deref() {
            Some("200") => {}
            other => return Err(Fault::Other(format!("feed answered HTTP {}", other.unwrap_or("(no response)")))),
        }
        // Validate the whole page before writing any of it.
        let mut page = parse_page(&answer.body, self.cp.max_feed_bytes, &self.implications)?;
        let FeedView { state, epochs } = feed.unwrap_or_else(|| Err("the shared state was not read".to_string())).map_err(Fault::Other)?;
        let step = epochs.step(asked, &page)?;
        // The generation is odd while records (or the live epochs) are being written, and
        // changes again after the state (see the filter's `shared::generation`): a worker caches
        // nothing while it is odd and drops its cache whenever it changed, so once any worker
        // refuses a key no worker accepts it again. A reset makes its epoch live before its
        // records are written and, on its last page, the only live one: from the next
        // generation on, no worker finds a record the new store lacks. The next feed request
        // (`since` = this version) is sent only after `end_apply` (see `applied`): from then on
        // every worker enforces this version on its next request.
        let live = |e: &Epochs| (e.committed.n, e.pending.as_ref().map(|p| p.epoch.n));
        let records = page.records.len();
        let bracket = records > 0 || step.before.is_some() || live(&step.after) != live(&epochs);
        let mut out = Vec::new();
        let mut writes = Vec::new();
        if bracket {
            writes.push(Write::begin_apply());
        }
        if step.begins_reset {
            out.push(Command::Increment(Metric::Resets, 1));
            out.push(log(
                Level::Warn,
                format!(
                    "snapshot feed: reset to store {} version {}: its whole snapshot replaces the one held (store {}); keys it lacks are refused once it is applied",
                    page.store.as_deref().unwrap_or("(unnamed)"),
                    page.version,
                    epochs.committed.store.as_deref().unwrap_or("(unnamed)"),
                ),
            ));
        }
        if let Some(before) = &step.before {
            writes.push(Write::epochs(before));
        }
        for (digest, record) in std::mem::take(&mut page.records) {
            writes.push(Write { key: record_key(&digest), value: tag_entry(step.tag, record) });
        }
        let mut state = state;
        let changed = records > 0 || state.applied != page.version || !state.loaded || step.after != epochs;
        state.last_heard_ms = now_ms;
        if page.complete {
            state.loaded = true;
            state.applied = page.version;
            state.cursor = None;
        } else {
            state.cursor = page.cursor.clone();
        }
        writes.push(Write { key: STATE_KEY.to_string(), value: state.encode() });
        if step.after != epochs || step.before.is_some() {
            writes.push(Write::epochs(&step.after));
        }
        if bracket {
            writes.push(Write::end_apply());
        }
        out.push(Command::Apply(writes));
        self.applying = Some(Applying {
            version: page.version,
            records,
            complete: page.complete,
            changed,
            wrote: FeedView { state, epochs: step.after },
        });
        Ok(out)
    }

    /// Reports the buckets that moved (or a heartbeat) to `POST /v1/feed/rates`.
    fn start_rate_sync(&mut self, envoy: String, now_ms: u64) -> Command {
        let report = self.rates.report(envoy, now_ms);
        let body = serde_json::to_vec(&report).unwrap_or_default();
        // Never longer than a few sync intervals: a slow control plane costs freshness, not requests.
        let timeout = Duration::from_millis((u64::from(self.cp.rate_sync_ms) * 4).clamp(500, 5_000));
        self.rate_call = Some((None, report));
        Command::Dispatch(self.request(Call::Rates, "/v1/feed/rates", Some(body), timeout))
    }

    fn on_rate_answer(&mut self, sent: &RateReport, answer: Result<Answer, String>, now_ms: u64) -> Vec<Command> {
        let was_global = self.rates.fleet().is_some_and(|f| f.global);
        let answer = match answer {
            Ok(Answer { status: Some(s), body }) if s == "200" => serde_json::from_slice::<RateAnswer>(&body).map_err(|e| format!("an answer it cannot read: {e}")),
            Ok(Answer { status: Some(s), .. }) if s.starts_with('4') => Err(format!("refused with HTTP {s}; dropping its counts")),
            Ok(Answer { status, .. }) => {
                self.rates.failed(sent);
                Err(format!("HTTP {}; keeping its counts for the next one", status.as_deref().unwrap_or("(no response)")))
            }
            Err(e) => {
                self.rates.failed(sent);
                Err(e)
            }
        };
        let mut out = Vec::new();
        match answer {
            Ok(answer) => {
                let (writes, exhausted) = self.rates.apply(sent, &answer, now_ms, u64::from(self.cp.rate_sync_ms));
                out.extend(writes);
                out.push(Command::Increment(Metric::RateSyncs, 1));
                if exhausted > 0 {
                    out.push(Command::Increment(Metric::RateExhausted, exhausted));
                }
                let global = answer.mode == RateMode::Global;
                out.push(Command::Record(Metric::RateGlobal, u64::from(global)));
                if was_global && !global {
                    out.push(Command::Increment(Metric::RateFallbacks, 1));
                    out.push(log(Level::Warn, format!("rate limits: the control plane has no fleet-wide counts now; each of {} Envoys enforces its share", answer.envoys.max(1))));
                } else if global && !was_global {
                    out.push(log(Level::Info, format!("rate limits: fleet-wide counts across {} Envoys", answer.envoys.max(1))));
                }
                if self.rates_failing {
                    self.rates_failing = false;
                    out.push(log(Level::Info, "rate limits: reports reach the control plane again".to_string()));
                }
            }
            Err(why) => {
                out.push(Command::Increment(Metric::RateSyncFailures, 1));
                if was_global {
                    out.push(Command::Increment(Metric::RateFallbacks, 1));
                    out.push(Command::Record(Metric::RateGlobal, 0));
                }
                if !self.rates_failing {
                    self.rates_failing = true;
                    out.push(log(Level::Warn, format!("rate limits: report to the control plane failed ({why}); each bucket falls back to this Envoy's last share until one succeeds")));
                }
            }
        }
        out
    }

    fn start_report(&mut self, envoy: String) -> Command {
        let sent = usage::take_batch(&mut self.pending, USAGE_BATCH);
        self.report_more = !self.pending.is_empty();
        let report = UsageReport { envoy, usage: sent.iter().map(|(id, c)| c.to_report(id)).collect() };
        let body = serde_json::to_vec(&report).unwrap_or_default();
        self.report = Some((None, sent));
        Command::Dispatch(self.request(Call::Usage, "/v1/feed/usage", Some(body), Duration::from_secs(10)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::{Epoch, Reset};
    use serde_json::json;

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

    fn fetch(seed: u64) -> Fetch {
        Fetch::new(cp(), Implications::default(), seed)
    }

    /// A VM that took the lease at `now`.
    fn leader(now: u64) -> Fetch {
        let mut f = fetch(1);
        assert!(matches!(f.on_lease(now, None, None)[..], [Command::ClaimLease { .. }]));
        assert_eq!(f.lease_claimed(now, true), vec![log(Level::Info, format!("this VM ({}) now fetches the snapshot feed", f.owner)), Command::RegisterQueues]);
        f
    }

    fn view(feed: FeedView) -> View {
        View { feed: Some(Ok(feed)), envoy: Some(Ok(EnvoyView { node: Some("e1".into()), stored: None })) }
    }

    fn requests(commands: &[Command]) -> Vec<&Request> {
        commands.iter().filter_map(|c| if let Command::Dispatch(r) = c { Some(r) } else { None }).collect()
    }

    fn logs(commands: &[Command]) -> Vec<&str> {
        commands.iter().filter_map(|c| if let Command::Log(_, m) = c { Some(m.as_str()) } else { None }).collect()
    }

    /// Ticks with nothing counted; dispatches get tokens 1, 2, … in order, and `poll` the
    /// poll's, if one went out.
    fn tick(f: &mut Fetch, now: u64, feed: FeedView, poll: &mut u32) -> Vec<Command> {
        let out = f.on_tick(now, &view(feed), &Usage::default(), &RateCounts::default());
        for r in requests(&out) {
            let token = *poll + 100;
            if r.call == Call::Poll {
                *poll = token;
            }
            assert!(f.dispatched(now, r.call, Ok(token)).is_empty());
        }
        out
    }

    fn polls(commands: &[Command]) -> usize {
        requests(commands).iter().filter(|r| r.call == Call::Poll).count()
    }

    fn answer(status: &str, body: serde_json::Value) -> Result<Answer, String> {
        Ok(Answer { status: Some(status.into()), body: body.to_string().into_bytes() })
    }

    /// Two VMs share one lease entry, CAS token included; the holder stops renewing after 250 ms.
    #[test]
    fn the_lease_is_taken_over_after_the_holder_stops_renewing() {
        let mut entry: (Option<String>, u32) = (None, 0);
        let mut vms = [fetch(1), fetch(2)];
        let mut check = |vm: usize, now: u64| -> bool {
            let f = &mut vms[vm];
            let cas = entry.0.as_ref().map(|_| entry.1);
            let mut commands = f.on_lease(now, entry.0.as_deref(), cas);
            if let [Command::ClaimLease { value, cas }] = &commands[..] {
                // Envoy's CAS: a write with a stale token fails; every write takes a new token.
                let held = cas.is_none_or(|c| c == entry.1);
                if held {
                    entry = (Some(value.clone()), entry.1 + 1);
                }
                commands = f.lease_claimed(now, held);
            }
            let _ = commands;
            f.leader()
        };
        let table: &[(usize, u64, bool)] = &[
            (0, 0, true),
            (1, 0, false),
            (0, 250, true),
            (1, 500, false),
            (1, 2_249, false),
            (1, 2_250, true),
            (0, 2_500, false),
            (1, 2_500, true),
        ];
        for &(vm, now, want) in table {
            assert_eq!(check(vm, now), want, "VM {vm} at {now} ms");
        }
        assert!(!fetch(3).lease_due(LEASE_CHECK_MS - 1) && fetch(3).lease_due(LEASE_CHECK_MS), "checked every {LEASE_CHECK_MS} ms");
    }

    #[test]
    fn backoff_doubles_caps_at_ten_seconds_and_resets_after_a_success() {
        let mut f = leader(0);
        let mut token = 0;
        let mut now = 0;
        let mut fail = |f: &mut Fetch, now: &mut u64| -> u64 {
            assert!(f.wants(*now).feed, "a poll is due at {now}");
            let out = tick(f, *now, FeedView::default(), &mut token);
            assert_eq!(polls(&out), 1);
            let out = f.on_response(*now, token, 0, answer("503", json!({})), Some(Ok(FeedView::default())));
            let retry: u64 = logs(&out)[0].split("retrying in ").nth(1).and_then(|s| s.strip_suffix(" ms")).and_then(|s| s.parse().ok()).unwrap();
            assert!(out.contains(&Command::Increment(Metric::Errors, 1)));
            assert!(!f.wants(*now + retry - 1).feed, "no poll before the back-off");
            *now += retry;
            retry
        };
        let waits: Vec<u64> = (0..8).map(|_| fail(&mut f, &mut now)).collect();
        assert_eq!(waits, [250, 500, 1_000, 2_000, 4_000, 8_000, 10_000, 10_000]);
        let out = tick(&mut f, now, FeedView::default(), &mut token);
        assert_eq!(polls(&out), 1);
        let out = f.on_response(now, token, 0, answer("200", json!({"version": 1, "complete": true, "keys": []})), Some(Ok(FeedView::default())));
        assert!(matches!(out[..], [Command::Apply(_)]));
        let out = f.applied(now, Ok(()));
        assert_eq!(requests(&out).len(), 1, "the next poll goes out at once");
        token += 1;
        f.dispatched(now, Call::Poll, Ok(token));
        let out = f.on_response(now, token, 0, Err("timeout".into()), Some(Ok(FeedView::default())));
        assert_eq!(logs(&out), ["snapshot feed: timeout; retrying in 250 ms"]);
    }

    #[test]
    fn a_page_that_fails_validation_is_rejected_whole() {
        let good = json!({"digest": Digest::of(b"k1").to_hex(), "id": "k1", "agent": "a"});
        let bad = json!({"digest": "zz", "id": "k2", "agent": "a"});
        let table: &[(&str, serde_json::Value, usize, &str)] = &[
            ("a bad record after a good one", json!({"version": 2, "complete": true, "keys": [good, bad]}), 0, "keys[1].digest"),
            ("an incomplete page without a cursor", json!({"version": 2, "complete": false, "keys": [good]}), 0, "no cursor"),
            ("another store without a reset", json!({"version": 2, "complete": true, "store": "B", "keys": [good]}), 0, "without a reset"),
            ("over max_feed_bytes", json!({}), (1 << 20) + 1, "exceeds max_feed_bytes"),
        ];
        let a = FeedView { state: State { loaded: true, applied: 1, ..State::default() }, epochs: Epochs { committed: Epoch { n: 0, store: Some("A".into()) }, pending: None } };
        for (name, body, size, why) in table {
            let mut f = leader(0);
            let mut token = 0;
            tick(&mut f, 0, a.clone(), &mut token);
            let size = if *size == 0 { body.to_string().len() } else { *size };
            let out = f.on_response(0, token, size, answer("200", body.clone()), Some(Ok(a.clone())));
            assert!(!out.iter().any(|c| matches!(c, Command::Apply(_) | Command::Set(_))), "{name}: nothing written");
            assert!(logs(&out)[0].starts_with("snapshot feed: rejected a page, keeping the last good snapshot") && logs(&out)[0].contains(why), "{name}: {out:?}");
            assert_eq!(out[1..], [Command::Increment(Metric::Rejected, 1), log(Level::Warn, "snapshot feed: page rejected; retrying in 250 ms".into()), Command::Increment(Metric::Errors, 1)], "{name}");
            assert!(!f.wants(249).feed && f.wants(250).feed, "{name}: backs off");
        }
    }

    /// The writes of one page, by key (`k.` a record), and what follows them.
    #[test]
    fn pages_are_written_in_the_apply_order() {
        let (d1, d2) = (Digest::of(b"k1"), Digest::of(b"k2"));
        let key = |d: &Digest, id: &str| json!({"digest": d.to_hex(), "id": id, "agent": "a"});
        let a = Epochs { committed: Epoch { n: 0, store: Some("A".into()) }, pending: None };
        let loaded = FeedView { state: State { loaded: true, applied: 1, ..State::default() }, epochs: a.clone() };
        let reset_b = |cursor| Epochs { committed: a.committed.clone(), pending: Some(Reset { epoch: Epoch { n: 1, store: Some("B".into()) }, cursor }) };
        let b = Epochs { committed: Epoch { n: 1, store: Some("B".into()) }, pending: None };
        let table: Vec<(&str, serde_json::Value, Vec<String>)> = vec![
            (
                "a delta page",
                json!({"version": 2, "complete": true, "store": "A", "keys": [key(&d1, "k1"), key(&d2, "k2")]}),
                vec!["gen applying".into(), format!("k.{} 0", d1.short()), format!("k.{} 0", d2.short()), "state L 2".into(), "gen ".into()],
            ),
            ("nothing new", json!({"version": 1, "complete": true, "store": "A", "keys": []}), vec!["state L 1".into()]),
            (
                "a reset page",
                json!({"version": 7, "complete": true, "store": "B", "reset": true, "keys": [key(&d2, "k2")]}),
                vec!["gen applying".into(), format!("epochs {}", reset_b(None).encode()), format!("k.{} 1", d2.short()), "state L 7".into(), format!("epochs {}", b.encode()), "gen ".into()],
            ),
        ];
        for (name, body, want) in table {
            let mut f = leader(0);
            let mut token = 0;
            tick(&mut f, 0, loaded.clone(), &mut token);
            let out = f.on_response(5, token, body.to_string().len(), answer("200", body.clone()), Some(Ok(loaded.clone())));
            let Some(Command::Apply(writes)) = out.last() else { panic!("{name}: {out:?}") };
            let got: Vec<String> = writes
                .iter()
                .map(|w| match w.key.as_str() {
                    GENERATION_KEY => format!("gen {}", w.value),
                    EPOCHS_KEY => format!("epochs {}", w.value),
                    STATE_KEY => format!("state {}", w.value.split(' ').take(2).collect::<Vec<_>>().join(" ")),
                    k => format!("k.{} {}", &k[10..22], crate::KeyRecord::decode_entry(&w.value).map_or(99, |(e, _)| e)),
                })
                .collect();
            assert_eq!(got, want, "{name}");
            assert_eq!(out.contains(&Command::Increment(Metric::Resets, 1)), name == "a reset page", "{name}");
            let version = body["version"].as_u64().unwrap();
            let after = f.applied(6, Ok(()));
            assert_eq!(after[..2], [Command::Increment(Metric::Pages, 1), Command::Record(Metric::Version, version)], "{name}");
            let next = requests(&after);
            assert!(next[0].header(":path").unwrap().contains(&format!("&since={version}&")), "{name}: {next:?}");
        }
    }

    /// 5,000 keys counted by one worker go out as five reports of 1,000, one per tick.
    #[test]
    fn a_usage_report_of_5000_keys_goes_out_in_5_batches_over_successive_ticks() {
        let mut f = leader(0);
        let usage = Usage::default();
        for i in 0..5_000 {
            usage.allowed(&Digest::of(format!("k{i}").as_bytes()), &format!("key_{i}"), 100);
        }
        let (mut token, mut keys, mut batches) = (0, std::collections::HashSet::new(), 0);
        for n in 0..8u64 {
            let now = 10_000 + n * 25;
            let out = f.on_tick(now, &view(FeedView::default()), &usage, &RateCounts::default());
            for r in requests(&out) {
                token += 1;
                f.dispatched(now, r.call, Ok(token));
                if r.call == Call::Usage {
                    let report: UsageReport = serde_json::from_slice(r.body.as_deref().unwrap_or_default()).unwrap();
                    assert_eq!((report.envoy.as_str(), report.usage.len()), ("e1", USAGE_BATCH));
                    keys.extend(report.usage.into_iter().map(|u| u.key_id));
                    batches += 1;
                    assert_eq!(f.on_response(now, token, 0, answer("204", json!(null)), None), [Command::Increment(Metric::UsageReports, 1)]);
                }
            }
        }
        assert_eq!((batches, keys.len()), (5, 5_000));
    }

    #[test]
    fn a_4xx_drops_a_usage_report_s_counts_and_a_5xx_or_no_answer_keeps_them() {
        let table: &[(&str, Result<Answer, String>, bool)] = &[
            ("400", answer("400", json!({})), false),
            ("413", answer("413", json!({})), false),
            ("503", answer("503", json!({})), true),
            ("a timeout", Ok(Answer { status: None, body: vec![] }), true),
            ("a failed read", Err("hostcall get_buffer failed".into()), true),
        ];
        for (name, reply, kept) in table {
            let mut f = leader(0);
            let usage = Usage::default();
            usage.allowed(&Digest::of(b"k"), "key_1", 100);
            let reports = |f: &mut Fetch, now: u64| -> Vec<Request> {
                let out = f.on_tick(now, &view(FeedView::default()), &usage, &RateCounts::default());
                requests(&out).into_iter().filter(|r| r.call == Call::Usage).cloned().collect()
            };
            assert_eq!(reports(&mut f, 10_000).len(), 1, "{name}");
            f.dispatched(10_000, Call::Usage, Ok(7));
            let out = f.on_response(10_000, 7, 0, reply.clone(), None);
            assert_eq!(matches!(out[..], [Command::Log(Level::Error, _)]), !kept, "{name}: {out:?}");
            let again = reports(&mut f, 15_000);
            assert_eq!(again.len(), usize::from(*kept), "{name}: the counts went out again");
        }
    }

    #[test]
    fn a_worker_hands_its_counts_to_the_leader_and_keeps_them_until_delivered() {
        let mut w = fetch(2);
        let usage = Usage::default();
        usage.allowed(&Digest::of(b"k"), "key_1", 100);
        let send = |w: &mut Fetch, now| w.on_tick(now, &View::default(), &usage, &RateCounts::default());
        let out = send(&mut w, 1_000);
        let [Command::Send { queue: Queue::Usage, text }] = &out[..] else { panic!("{out:?}") };
        w.sent(Queue::Usage, false);
        assert_eq!(send(&mut w, 2_000), out, "not delivered: sent again");
        w.sent(Queue::Usage, true);
        assert!(send(&mut w, 3_000).is_empty());
        let mut l = leader(0);
        l.on_queue(Queue::Usage, text, 3_000);
        assert_eq!(l.pending["key_1"].count, 1);
    }

    #[test]
    fn state_round_trips() {
        for s in [
            State::default(),
            State { loaded: true, applied: 42, last_heard_ms: 1_800_000_000_000, cursor: None },
            State { loaded: false, applied: 0, last_heard_ms: 5, cursor: Some(FeedCursor { version: 7, id: "key_x".into() }) },
        ] {
            assert_eq!(State::decode(&s.encode()), Some(s.clone()));
        }
        assert_eq!(State::decode("garbage"), None);
    }

    #[test]
    fn whole_keys_need_a_load_and_respect_max_age() {
        let s = State { loaded: true, applied: 1, last_heard_ms: 10_000, cursor: None };
        assert_eq!(s.keys(10_000, None), Keys::Whole);
        assert_eq!(s.keys(40_000, Some(30)), Keys::Whole);
        assert_eq!(s.keys(40_001, Some(30)), Keys::None);
        assert_eq!(State::default().keys(0, None), Keys::None);
    }

    #[test]
    fn the_first_snapshot_serves_in_part_once_a_page_of_it_is_written() {
        let cursor = Some(FeedCursor { version: 1, id: "key_9".into() });
        let check = |loaded: bool, cursor: Option<FeedCursor>, now_ms: u64, want: Keys| {
            let s = State { loaded, applied: 0, last_heard_ms: 10_000, cursor };
            assert_eq!(s.keys(now_ms, Some(30)), want, "{s:?} at {now_ms}");
        };
        check(false, None, 10_000, Keys::None);
        check(false, cursor.clone(), 10_000, Keys::Partial);
        check(false, cursor.clone(), 40_001, Keys::None);
        check(true, None, 10_000, Keys::Whole);
        check(true, cursor, 10_000, Keys::Whole);
        check(true, None, 40_001, Keys::None);
    }
}
