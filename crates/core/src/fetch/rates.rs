//! Rate limits across a fleet of Envoys, the fetcher's side. No request waits on the network:
//! a request reads and CASes only its bucket in shared data, as with one Envoy.
//!
//! - In global mode every worker counts what it admits per bucket ([`RateCounts`], in VM
//!   memory; in split mode nothing is counted, the control plane needs no counts) and hands the
//!   counts to the fetcher's VM on its tick through the `keyward.rates` queue ([`Admitted`]
//!   lines), at once when a bucket has used half its budget here (the early push), else every
//!   half sync interval.
//! - The lease holder reports the buckets that moved to the control plane every `rate_sync_ms`
//!   (and at least once a second) and gets back how many Envoys share each limit and, when the
//!   control plane has a rate store, how many requests the *other* Envoys admitted in each
//!   bucket's window ([`RateSync`]). Its answer becomes [`Command`]s: `keyward.fleet` (every VM
//!   reads it on its tick) and each bucket's figure, trusted for a few sync intervals.
//! - A request is then judged by [`crate::ratelimit::admit_in_fleet`]: against the whole limit
//!   less the others' admissions while the figure is trusted, else against this Envoy's share
//!   of the limit. A lost control plane or rate store leaves each Envoy its last share.

use super::{Command, Write};
use crate::feed::{BucketReport, RateAnswer, RateMode, RateReport, RATE_REPORT_MAX_BUCKETS};
use crate::ratelimit::Fleet;
use crate::snapshot::RateLimit;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// `<envoys> <global 0|1>`: the fleet as the control plane last described it.
pub const FLEET_KEY: &str = "keyward.fleet";
/// Workers hand their admissions to the fetcher's VM through this queue.
pub const RATES_QUEUE: &str = "keyward.rates";
/// The fetcher reports at least this often, even with nothing admitted, to learn its share.
pub const HEARTBEAT_MS: u64 = 1_000;
/// A bucket's figure from the control plane is trusted for this many sync intervals (at least
/// [`MIN_TRUST_MS`]); then the bucket falls back to this Envoy's share until the next answer.
const TRUST_SYNCS: u64 = 4;
const MIN_TRUST_MS: u64 = 1_000;
/// Attempts to write a bucket's figure against concurrent requests.
pub const SET_ATTEMPTS: u32 = 4;

/// One bucket's admissions since they were last handed on, with its limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admitted {
    pub count: u32,
    pub period_secs: u32,
    pub admitted: u64,
}

impl Admitted {
    /// The queue's line form: `bucket \t count \t period \t admitted`.
    pub fn line(bucket: &str, a: &Admitted) -> String {
        format!("{bucket}\t{}\t{}\t{}\n", a.count, a.period_secs, a.admitted)
    }

    pub fn parse_line(line: &str) -> Option<(&str, Admitted)> {
        let mut f = line.split('\t');
        let bucket = f.next().filter(|b| !b.is_empty())?;
        let a = Admitted { count: f.next()?.parse().ok()?, period_secs: f.next()?.parse().ok()?, admitted: f.next()?.parse().ok()? };
        Some((bucket, a))
    }
}

/// Admissions per bucket, keyed by bucket name.
pub type AdmittedCounts = HashMap<String, Admitted>;

/// A worker's hand-over on the `keyward.rates` queue: `U` first for an early push, then one
/// [`Admitted::line`] per bucket.
pub fn message(counts: &AdmittedCounts, urgent: bool) -> String {
    let mut text = String::from(if urgent { "U\n" } else { "" });
    for (bucket, a) in counts {
        text.push_str(&Admitted::line(bucket, a));
    }
    text
}

/// Reads a [`message`]: its counts, and whether it is an early push. A line that cannot be
/// read is skipped.
pub fn parse_message(text: &str) -> (AdmittedCounts, bool) {
    let counts = text.lines().filter_map(Admitted::parse_line).map(|(b, a)| (b.to_string(), a)).collect();
    (counts, text.starts_with("U\n"))
}

pub fn merge(into: &mut AdmittedCounts, from: AdmittedCounts) {
    for (bucket, a) in from {
        let e = into.entry(bucket).or_insert(Admitted { admitted: 0, ..a });
        e.count = a.count;
        e.period_secs = a.period_secs;
        e.admitted += a.admitted;
    }
}

/// What a worker admitted since its last hand-over. A request adds one without allocating
/// (the bucket's name is copied once per hand-over).
#[derive(Debug, Default)]
pub struct RateCounts {
    counts: RefCell<AdmittedCounts>,
    /// A bucket used half its budget here: hand over on the next tick.
    urgent: Cell<bool>,
}

impl RateCounts {
    /// One admitted request; `urgent`: report it on the next tick (see [`crate::authorize::crossed_half`]).
    pub fn admitted(&self, bucket: &str, limit: RateLimit, urgent: bool) {
        self.add(bucket, limit, 1);
        if urgent {
            self.urgent.set(true);
        }
    }

    /// One refused request: nothing admitted, but the bucket is still in use here, so the
    /// fetcher keeps asking for its figure (the others may have used the budget up).
    pub fn refused(&self, bucket: &str, limit: RateLimit) {
        self.add(bucket, limit, 0);
    }

    fn add(&self, bucket: &str, limit: RateLimit, n: u64) {
        let mut counts = self.counts.borrow_mut();
        match counts.get_mut(bucket) {
            Some(a) => a.admitted += n,
            None => {
                counts.insert(bucket.to_string(), Admitted { count: limit.count, period_secs: limit.period_secs, admitted: n });
            }
        }
    }

    /// Everything counted since the last call, and whether any of it is urgent.
    pub fn take(&self) -> (AdmittedCounts, bool) {
        (std::mem::take(&mut *self.counts.borrow_mut()), self.urgent.replace(false))
    }
}

/// A bucket the fetcher keeps reporting while it is live here, so its figure stays fresh.
#[derive(Debug, Clone, Copy)]
struct Watched {
    count: u32,
    period_secs: u32,
    last_moved_ms: u64,
}

/// The fetcher's side: what to report, and what to do with the answer. Pure but for
/// [`RateSync::apply`], whose shared-data writes are commands.
#[derive(Debug, Default)]
pub struct RateSync {
    /// Admitted since the last report, from every worker.
    pending: AdmittedCounts,
    watched: HashMap<String, Watched>,
    urgent: bool,
    last_sent_ms: u64,
    /// The fleet last written to shared data.
    fleet: Option<Fleet>,
}

impl RateSync {
    pub fn add(&mut self, counts: AdmittedCounts, urgent: bool, now_ms: u64) {
        for (bucket, a) in &counts {
            self.watched.insert(bucket.clone(), Watched { count: a.count, period_secs: a.period_secs, last_moved_ms: now_ms });
        }
        merge(&mut self.pending, counts);
        self.urgent |= urgent;
    }

    /// A report is due: an early push, admissions and a sync interval gone by, or a heartbeat.
    pub fn due(&self, now_ms: u64, sync_ms: u64) -> bool {
        let since = now_ms.saturating_sub(self.last_sent_ms);
        (self.urgent && !self.pending.is_empty()) || (since >= sync_ms && !self.pending.is_empty()) || since >= HEARTBEAT_MS
    }

    /// The next report: the buckets that moved, then the live ones still watched (admitted 0),
    /// at most [`RATE_REPORT_MAX_BUCKETS`]; what does not fit waits for the next one.
    pub fn report(&mut self, envoy: String, now_ms: u64) -> RateReport {
        self.last_sent_ms = now_ms;
        self.urgent = false;
        // Buckets idle for longer than their period (and a margin) are no longer watched.
        self.watched.retain(|_, w| now_ms.saturating_sub(w.last_moved_ms) <= u64::from(w.period_secs) * 1000 + 2 * HEARTBEAT_MS);
        let mut buckets = Vec::new();
        let moved: Vec<String> = self.pending.keys().take(RATE_REPORT_MAX_BUCKETS).cloned().collect();
        for bucket in moved {
            if let Some(a) = self.pending.remove(&bucket) {
                buckets.push(BucketReport { bucket, count: a.count, period_secs: a.period_secs, admitted: a.admitted });
            }
        }
        let room = RATE_REPORT_MAX_BUCKETS.saturating_sub(buckets.len());
        let sent: std::collections::HashSet<&str> = buckets.iter().map(|b| b.bucket.as_str()).collect();
        let idle: Vec<BucketReport> = self
            .watched
            .iter()
            .filter(|(b, _)| !sent.contains(b.as_str()))
            .take(room)
            .map(|(b, w)| BucketReport { bucket: b.clone(), count: w.count, period_secs: w.period_secs, admitted: 0 })
            .collect();
        buckets.extend(idle);
        RateReport { envoy, buckets }
    }

    /// A report that failed (no answer, a 5xx): its admissions go into the next one. A refused
    /// one (4xx) is dropped by the caller: it would be refused again.
    pub fn failed(&mut self, sent: &RateReport) {
        for b in sent.buckets.iter().filter(|b| b.admitted > 0) {
            let e = self.pending.entry(b.bucket.clone()).or_insert(Admitted { count: b.count, period_secs: b.period_secs, admitted: 0 });
            e.admitted += b.admitted;
        }
    }

    /// Applies an answer: the fleet for every VM, and each bucket's figure (global mode), as
    /// the writes to run. Also returns how many buckets the other Envoys have exhausted.
    pub fn apply(&mut self, sent: &RateReport, answer: &RateAnswer, now_ms: u64, sync_ms: u64) -> (Vec<Command>, u64) {
        let mut out = Vec::new();
        let fleet = Fleet { envoys: answer.envoys.max(1), global: answer.mode == RateMode::Global };
        // Written on every answer, not only on a change: a write that failed is made good by
        // the next answer, and another VM may have written it meanwhile.
        out.push(Command::Set(Write { key: FLEET_KEY.to_string(), value: fleet.encode() }));
        self.fleet = Some(fleet);
        if !fleet.global {
            return (out, 0);
        }
        let until_us = now_ms.saturating_add((sync_ms * TRUST_SYNCS).max(MIN_TRUST_MS)).saturating_mul(1000);
        let asked: HashMap<&str, u32> = sent.buckets.iter().map(|b| (b.bucket.as_str(), b.count)).collect();
        let mut exhausted = 0;
        for b in &answer.buckets {
            // Only buckets this Envoy asked about: the answer cannot plant others.
            let Some(&count) = asked.get(b.bucket.as_str()) else { continue };
            if b.others >= u64::from(count) {
                exhausted += 1;
            }
            out.push(Command::SetOthers { bucket: b.bucket.clone(), others: b.others, until_us });
        }
        (out, exhausted)
    }

    /// The fleet as last written (for the log when it changes).
    pub fn fleet(&self) -> Option<Fleet> {
        self.fleet
    }

    /// This VM just took the lease: another may have written the fleet meanwhile.
    pub fn became_leader(&mut self) {
        self.fleet = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorize::crossed_half;

    fn lim(count: u32) -> RateLimit {
        RateLimit { count, period_secs: 1 }
    }

    #[test]
    fn admissions_round_trip_through_the_queue_and_merge() {
        let a = Admitted { count: 50, period_secs: 1, admitted: 7 };
        let line = Admitted::line("k:key_1", &a);
        assert_eq!(line, "k:key_1\t50\t1\t7\n");
        assert_eq!(Admitted::parse_line(line.trim_end()), Some(("k:key_1", a)));
        for bad in ["", "\t50\t1\t7", "k:a\t50\t1", "k:a\tx\t1\t7"] {
            assert_eq!(Admitted::parse_line(bad), None, "{bad:?}");
        }
        let one = AdmittedCounts::from([("k:a".to_string(), a)]);
        assert_eq!(parse_message(&message(&one, true)), (one.clone(), true), "an early push");
        assert_eq!(parse_message(&message(&one, false)), (one, false));
        let mut total = AdmittedCounts::new();
        merge(&mut total, AdmittedCounts::from([("k:a".to_string(), a)]));
        merge(&mut total, AdmittedCounts::from([("k:a".to_string(), a)]));
        assert_eq!(total["k:a"].admitted, 14);
    }

    #[test]
    fn a_worker_counts_per_bucket_and_pushes_early_once_past_half_its_budget() {
        let c = RateCounts::default();
        c.admitted("k:a", lim(50), false);
        c.admitted("k:a", lim(50), false);
        c.refused("k:b", lim(50));
        let (counts, urgent) = c.take();
        assert_eq!((counts["k:a"].admitted, counts["k:b"].admitted, urgent), (2, 0, false));
        c.admitted("k:a", lim(50), true);
        assert!(c.take().1);
        assert!(c.take().0.is_empty());
        // Only the admission that crosses half is urgent.
        let crossing: Vec<u64> = (0..50).rev().filter(|&r| crossed_half(r, 50)).collect();
        assert_eq!(crossing, [24]);
        assert_eq!((0..16).rev().filter(|&r| crossed_half(r, 16)).collect::<Vec<_>>(), [7]);
    }

    /// The sync's timing: what makes a report due.
    #[test]
    fn a_report_is_due_on_an_early_push_a_sync_interval_or_a_heartbeat() {
        let one = |urgent| AdmittedCounts::from([("k:a".to_string(), Admitted { count: 50, period_secs: 1, admitted: 1 })]).into_iter().map(|x| (x, urgent)).next();
        let table: &[(&str, Option<bool>, u64, bool)] = &[
            ("nothing, soon after the last", None, 100, false),
            ("nothing, a heartbeat later", None, HEARTBEAT_MS, true),
            ("admissions before the interval", Some(false), 100, false),
            ("admissions after the interval", Some(false), 250, true),
            ("an early push at once", Some(true), 30, true),
        ];
        for (name, add, at, want) in table {
            let mut s = RateSync::default();
            s.report("e".into(), 1_000);
            if let Some(((bucket, a), urgent)) = add.and_then(&one) {
                s.add(AdmittedCounts::from([(bucket, a)]), urgent, 1_000);
            }
            assert_eq!(s.due(1_000 + at, 250), *want, "{name}");
        }
    }

    #[test]
    fn reports_carry_moved_buckets_then_watched_ones_and_failures_carry_over() {
        let mut s = RateSync::default();
        s.add(AdmittedCounts::from([("k:a".to_string(), Admitted { count: 50, period_secs: 1, admitted: 5 })]), false, 0);
        let first = s.report("e".into(), 0);
        assert_eq!(first.buckets.iter().map(|b| (b.bucket.as_str(), b.admitted)).collect::<Vec<_>>(), [("k:a", 5)]);
        // Nothing moved: still watched (admitted 0) while live, then dropped.
        let second = s.report("e".into(), 500);
        assert_eq!(second.buckets.iter().map(|b| (b.bucket.as_str(), b.admitted)).collect::<Vec<_>>(), [("k:a", 0)]);
        assert!(s.report("e".into(), 10_000).buckets.is_empty());
        // A failed report's admissions go out with the next one.
        s.failed(&first);
        assert_eq!(s.report("e".into(), 10_100).buckets[0].admitted, 5);
    }

    #[test]
    fn a_report_holds_at_most_the_bound_and_the_rest_waits() {
        let mut s = RateSync::default();
        let many: AdmittedCounts = (0..RATE_REPORT_MAX_BUCKETS + 5).map(|i| (format!("k:{i}"), Admitted { count: 5, period_secs: 60, admitted: 1 })).collect();
        s.add(many, false, 0);
        let first = s.report("e".into(), 0);
        assert_eq!(first.buckets.len(), RATE_REPORT_MAX_BUCKETS);
        let second = s.report("e".into(), 250);
        assert_eq!(second.buckets.iter().filter(|b| b.admitted == 1).count(), 5);
    }
}
