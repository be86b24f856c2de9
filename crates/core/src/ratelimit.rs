//! Per-key rate limits: a conservative sliding window over sub-windows, plus a GCRA term for a
//! burst below the limit, all in one shared value per bucket.
//!
//! The contract (PRODUCT.md "Rate limits mean what users read") for a limit of `N` per period
//! `P` with burst `B` (1 ≤ `B` ≤ `N`, default `N`):
//! 1. an idle client may send `B` requests at once;
//! 2. no window of length `P` admits more than `N` requests.
//!
//! **The window.** `P` is cut into `k = SLOTS - 1` sub-windows of `s = ⌈P / k⌉`. The value keeps,
//! for each of the last `SLOTS` sub-windows, how many requests it admitted and when it admitted
//! the last of them. A sub-window's requests count against the limit until its *last* admission
//! is `P` old; counting each one as late as the latest of its sub-window can only overcount, so
//! every window `(t - P, t]` holds at most `N` admissions, exactly, whatever the arrivals (the
//! slot for sub-window `i` is reused by `i + SLOTS`, whose start is `P` after sub-window `i`'s
//! end, so a slot is always dead when it is reused; a live one is merged into, conservatively).
//! The price is under-admission: a request admitted early in a sub-window holds its unit of quota
//! until the sub-window's last one is `P` old, at most `s = P / k` longer than an exact sliding
//! log would. A client that sends its whole quota at once (the usual overload shape: admissions
//! cluster at the start of each window) loses nothing; a client paced evenly at or above the
//! limit loses up to about `1 / k` of its requests (measured: up to 2.9% with `k = 32`, 1000/h).
//! `cargo xtask bench` measures this against an exact sliding window (BENCHMARKS.md,
//! "Rate-limit accuracy").
//!
//! **The burst.** With `B < N`, a GCRA term also applies: emission interval `T = P / N`,
//! tolerance `(B - 1) T`, one theoretical arrival time (TAT). A request must pass both. With
//! `B = N` the term is off: GCRA alone with burst `N` admits up to `2N - 1` in a window.
//!
//! Why not alternatives: a fixed-window counter admits `2N` across a boundary and needs a reset;
//! GCRA alone breaks (2) at `B = N` and (1) at `B < N`; an exact sliding log costs `N` timestamps
//! per bucket. Per-window keys are impossible: shared data has no delete.
//!
//! **Answers.** `Retry-After` is the exact wait until both terms admit one more request (the
//! window's count falls below `N` when the oldest sub-windows age out; the TAT moves by `T`), so
//! a client that waits that long is admitted. `RateLimit: r=` is how many more requests would be
//! admitted right now; `t=` is how long until the whole budget (`B` at once) is back.
//!
//! The value is `VALUE_LEN` bytes, decoded to and encoded from the stack: a request allocates
//! nothing here beyond the host's copy of the value.

use crate::snapshot::RateLimit;

/// Ring slots in a bucket's value: `SLOTS - 1` sub-windows per period, plus the one being aged
/// out. Chosen from the measured error table (BENCHMARKS.md): with 32 sub-windows a client paced
/// at the limit gets within 3% of the exact answer (16 lost about 5%), for 405 bytes per bucket (417 with the fleet figure).
pub const SLOTS: usize = 33;

/// Bytes of a bucket's value: a format tag, the TAT, the fleet's other admissions
/// `(others u32, trusted until u64)`, then `(count u32, last admission u64)` per slot,
/// little-endian.
pub const VALUE_LEN: usize = 1 + 8 + 12 + SLOTS * 12;

/// The value's format; `W` was the format before fleets (no fleet figure), still read.
const TAG: u8 = b'X';
const OLD_TAG: u8 = b'W';
const OLD_VALUE_LEN: usize = 1 + 8 + SLOTS * 12;
/// Where the slots start in a value.
const SLOTS_AT: usize = 1 + 8 + 12;

/// How many requests may arrive back to back after an idle period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Burst {
    /// At most this many (clamped to `1..=N`).
    Requests(u32),
    /// The limit's own `N`: the whole quota at once.
    #[default]
    Limit,
}

/// The effective burst for a limit: at least 1, at most `N`.
pub fn effective_burst(limit: RateLimit, burst: Burst) -> u64 {
    let n = u64::from(limit.count.max(1));
    match burst {
        Burst::Requests(b) => u64::from(b).clamp(1, n),
        Burst::Limit => n,
    }
}

/// The burst that applies to a key: its own (`rate_burst`), else the configured default.
pub fn burst_for(record_burst: Option<u32>, default: Burst) -> Burst {
    record_burst.map_or(default, Burst::Requests)
}

fn period_us(limit: RateLimit) -> u64 {
    u64::from(limit.period_secs.max(1)) * 1_000_000
}

/// GCRA emission interval in microseconds (at least 1).
pub fn interval_us(limit: RateLimit) -> u64 {
    (period_us(limit) / u64::from(limit.count.max(1))).max(1)
}

/// Sub-window length in microseconds: `⌈P / (SLOTS - 1)⌉`, so that `SLOTS - 1` of them cover `P`.
pub fn sub_window_us(limit: RateLimit) -> u64 {
    period_us(limit).div_ceil(SLOTS as u64 - 1).max(1)
}

/// One bucket's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// GCRA theoretical arrival time (µs); 0 when the burst term has never applied.
    pub tat: u64,
    /// Requests the *other* Envoys of the fleet admitted in the bucket's current window, as the
    /// control plane last said (global mode), and until when that figure is trusted (µs; 0:
    /// never said). An untrusted figure means split mode for this bucket.
    pub others: u32,
    pub others_until: u64,
    /// Per slot: requests admitted in that sub-window, and the time of the last of them (µs).
    pub slots: [(u32, u64); SLOTS],
}

impl Default for Window {
    fn default() -> Self {
        Window { tat: 0, others: 0, others_until: 0, slots: [(0, 0); SLOTS] }
    }
}

/// What this Envoy knows of its fleet, as the control plane last said (see [`admit_in_fleet`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fleet {
    /// Envoys sharing each limit, this one included (at least 1).
    pub envoys: u32,
    /// The control plane counts admissions fleet-wide (a rate store): a bucket with a trusted
    /// `others` figure is judged against the whole limit, less what the others admitted.
    pub global: bool,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet { envoys: 1, global: false }
    }
}

impl Fleet {
    /// This Envoy's share of `n` in split mode: `n / envoys`, rounded down, at least 1.
    pub fn share(&self, n: u32) -> u32 {
        (n / self.envoys.max(1)).max(1)
    }

    /// The shared-data form: `<envoys> <global 0|1>`.
    pub fn encode(&self) -> String {
        format!("{} {}", self.envoys, u8::from(self.global))
    }

    pub fn decode(s: &str) -> Option<Fleet> {
        let (envoys, global) = s.split_once(' ')?;
        let envoys: u32 = envoys.parse().ok().filter(|n| *n >= 1)?;
        let global = match global {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        Some(Fleet { envoys, global })
    }
}

impl Window {
    pub fn encode(&self) -> [u8; VALUE_LEN] {
        let mut out = [0u8; VALUE_LEN];
        out[0] = TAG;
        out[1..9].copy_from_slice(&self.tat.to_le_bytes());
        out[9..13].copy_from_slice(&self.others.to_le_bytes());
        out[13..21].copy_from_slice(&self.others_until.to_le_bytes());
        for (i, (count, last)) in self.slots.iter().enumerate() {
            let at = SLOTS_AT + i * 12;
            out[at..at + 4].copy_from_slice(&count.to_le_bytes());
            out[at + 4..at + 12].copy_from_slice(&last.to_le_bytes());
        }
        out
    }

    /// Decodes [`Window::encode`]'s output; `None` for anything else (an older format included:
    /// the bucket then starts afresh).
    pub fn decode(v: &[u8]) -> Option<Window> {
        let u64_at = |at: usize| -> Option<u64> { Some(u64::from_le_bytes(v.get(at..at + 8)?.try_into().ok()?)) };
        let u32_at = |at: usize| -> Option<u32> { Some(u32::from_le_bytes(v.get(at..at + 4)?.try_into().ok()?)) };
        // The format before fleets (no fleet figure) is still read, so a filter upgraded while
        // the older one drains keeps the budget; it is written back in the new format.
        let (mut w, slots_at) = match (v.first(), v.len()) {
            (Some(&TAG), VALUE_LEN) => (Window { tat: u64_at(1)?, others: u32_at(9)?, others_until: u64_at(13)?, ..Window::default() }, SLOTS_AT),
            (Some(&OLD_TAG), OLD_VALUE_LEN) => (Window { tat: u64_at(1)?, ..Window::default() }, 9),
            _ => return None,
        };
        for (i, slot) in w.slots.iter_mut().enumerate() {
            let at = slots_at + i * 12;
            let count = u32_at(at)?;
            *slot = (count, u64_at(at + 4)?);
        }
        Some(w)
    }

    /// The latest admission recorded (0 for a fresh bucket).
    fn latest(&self) -> u64 {
        self.slots.iter().map(|s| s.1).max().unwrap_or(0)
    }

    /// Requests that still count against the limit at `now`.
    fn live(&self, now: u64, period: u64) -> u64 {
        self.slots.iter().filter(|s| s.0 > 0 && s.1.saturating_add(period) > now).map(|s| u64::from(s.0)).sum()
    }
}

/// What one bucket says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted (the window was updated): `remaining` more would be admitted right now, and the
    /// whole budget is back in `reset_us`.
    Allow { remaining: u64, reset_us: u64 },
    /// Refused (nothing changed): one more request will be admitted in `retry_after_us`.
    Limit { retry_after_us: u64, reset_us: u64 },
}

/// Decides one request at `now_us` against `w`, and records it in `w` if admitted: one Envoy
/// alone (the fleet's figures in `w` are not used).
pub fn admit(now_us: u64, w: &mut Window, limit: RateLimit, burst: Burst) -> Verdict {
    admit_with(now_us, w, limit, burst, 0)
}

/// [`admit`] for one Envoy of a fleet. In global mode, while the bucket's `others` figure is
/// trusted, the request is judged against the whole limit, counting what the other Envoys
/// admitted in the window besides this one's own admissions. Otherwise (split mode, or the
/// figure is stale: the control plane or its rate store is out of reach) against this
/// Envoy's share of the limit and of the burst: `n / envoys`, at least 1.
pub fn admit_in_fleet(now_us: u64, w: &mut Window, limit: RateLimit, burst: Burst, fleet: Fleet) -> Verdict {
    if fleet.global && w.others_until > now_us {
        return admit_with(now_us, w, limit, burst, u64::from(w.others));
    }
    if fleet.envoys <= 1 {
        return admit_with(now_us, w, limit, burst, 0);
    }
    let share = RateLimit { count: fleet.share(limit.count.max(1)), period_secs: limit.period_secs };
    let burst = match burst {
        Burst::Requests(b) => Burst::Requests(fleet.share(b.max(1))),
        Burst::Limit => Burst::Limit,
    };
    admit_with(now_us, w, share, burst, 0)
}

/// The limiter, with `extra` requests admitted elsewhere counted as live for the whole window.
fn admit_with(now_us: u64, w: &mut Window, limit: RateLimit, burst: Burst, extra: u64) -> Verdict {
    let n = u64::from(limit.count.max(1));
    let period = period_us(limit);
    let b = effective_burst(limit, burst);
    // Time never runs backwards for a bucket: a worker whose clock is behind counts as now.
    let now = now_us.max(w.latest());
    let live = w.live(now, period) + extra;
    // The window: when would the count fall below N? Drop the oldest live slots until it does.
    // If the others' admissions alone fill it, one sub-window: the figure is refreshed sooner.
    let window_wait = if live < n {
        0
    } else if extra >= n {
        sub_window_us(limit)
    } else {
        let mut live_slots = [(0u32, 0u64); SLOTS];
        let mut k = 0;
        for s in w.slots.iter().filter(|s| s.0 > 0 && s.1.saturating_add(period) > now) {
            live_slots[k] = *s;
            k += 1;
        }
        live_slots[..k].sort_unstable_by_key(|s| s.1);
        let mut left = live;
        let mut at = now;
        for (count, last) in &live_slots[..k] {
            left -= u64::from(*count);
            at = last.saturating_add(period);
            if left < n {
                break;
            }
        }
        at - now
    };
    // The burst term, only when it is tighter than the window.
    let t = interval_us(limit);
    let tau = (b - 1) * t;
    let gcra_wait = if b < n { w.tat.saturating_sub(tau).saturating_sub(now) } else { 0 };
    if window_wait > 0 || gcra_wait > 0 {
        let retry = window_wait.max(gcra_wait);
        let reset = w.latest().saturating_add(period).saturating_sub(now).max(if b < n { w.tat.saturating_sub(now) } else { 0 }).max(retry);
        return Verdict::Limit { retry_after_us: retry, reset_us: reset };
    }
    // Admit: count it in its sub-window's slot.
    let sub = sub_window_us(limit);
    let index = now / sub;
    let slot = &mut w.slots[(index % SLOTS as u64) as usize];
    let same = slot.0 > 0 && slot.1 / sub == index;
    let alive = slot.0 > 0 && slot.1.saturating_add(period) > now;
    *slot = (if same || alive { slot.0.saturating_add(1) } else { 1 }, now);
    let mut remaining = n.saturating_sub(live + 1);
    let mut reset = period;
    if b < n {
        w.tat = w.tat.max(now).saturating_add(t);
        // Requests admissible right now after this one, by the burst term.
        remaining = remaining.min(now.saturating_add(tau + t).saturating_sub(w.tat) / t);
        reset = reset.max(w.tat.saturating_sub(now));
    }
    Verdict::Allow { remaining, reset_us: reset }
}

/// Whole seconds for `Retry-After` and `t=`: rounded up, at least 1 for a wait.
pub fn whole_seconds_up(us: u64) -> u64 {
    us.div_ceil(1_000_000).max(1)
}

/// The IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers): the policy, and the
/// current state of it for this key.
pub fn headers(limit: RateLimit, remaining: u64, reset_us: u64) -> [(&'static str, String); 2] {
    [
        ("ratelimit-policy", format!("\"default\";q={};w={}", limit.count, limit.period_secs)),
        ("ratelimit", format!("\"default\";r={remaining};t={}", reset_us.div_ceil(1_000_000))),
    ]
}

/// A stored value and its CAS token (`None` if absent).
pub type Versioned = (Option<Vec<u8>>, Option<u32>);

/// A bucket's new value from its current one (`None`: leave it as it is).
pub type Update<'a> = dyn FnMut(Option<&[u8]>) -> Option<Vec<u8>> + 'a;

/// The shared store the limiter's state lives in (Envoy shared data in the filter).
pub trait BucketStore {
    type Error;
    /// The value and its CAS token.
    fn get(&self, key: &str) -> Result<Versioned, Self::Error>;
    /// Writes if `cas` still matches (or unconditionally with `None`); `Ok(false)` on mismatch.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, Self::Error>;
    /// Reads the bucket and writes what `f` returns for it (nothing for `None`) as one atomic
    /// step, if the store can: one in the process's memory holds the bucket's lock across both,
    /// so no request ever retries. `None` if it cannot (shared data): the limiter then reads and
    /// writes with compare-and-swap.
    fn update(&self, _key: &str, _f: &mut Update<'_>) -> Option<Result<(), Self::Error>> {
        None
    }
}

/// The limiter's answer for one request, with how many store attempts it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub verdict: Verdict,
    pub attempts: u32,
    /// The retry bound was hit: admitted without updating the bucket (fail open on contention).
    pub contended: bool,
    /// The bucket did not exist before this request.
    pub created: bool,
}

pub const BUCKET_PREFIX: &str = "keyward.rl.";

/// Shared-data key of a bucket.
pub fn bucket_key(bucket: &str) -> String {
    format!("{BUCKET_PREFIX}{bucket}")
}

/// Calls `f` with the bucket's shared-data key, built on the stack (buckets are at most 160
/// bytes; a longer one, which compiled records never hold, is built on the heap).
fn with_bucket_key<R>(bucket: &str, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = [0u8; 192];
    let len = BUCKET_PREFIX.len() + bucket.len();
    if len <= buf.len() {
        buf[..BUCKET_PREFIX.len()].copy_from_slice(BUCKET_PREFIX.as_bytes());
        buf[BUCKET_PREFIX.len()..len].copy_from_slice(bucket.as_bytes());
        if let Ok(key) = std::str::from_utf8(&buf[..len]) {
            return f(key);
        }
    }
    f(&bucket_key(bucket))
}

/// Applies the limiter to `bucket` in `store` with compare-and-swap, at most `max_attempts` times,
/// as one Envoy of `fleet` ([`admit_in_fleet`]).
pub fn check<S: BucketStore>(store: &S, bucket: &str, now_us: u64, limit: RateLimit, burst: Burst, fleet: Fleet, max_attempts: u32) -> Result<Checked, S::Error> {
    with_bucket_key(bucket, |key| {
        let mut created = false;
        let mut verdict = None;
        let atomic = store.update(key, &mut |value| {
            created = value.is_none();
            let mut w = value.and_then(Window::decode).unwrap_or_default();
            let v = admit_in_fleet(now_us, &mut w, limit, burst, fleet);
            verdict = Some(v);
            (!matches!(v, Verdict::Limit { .. })).then(|| w.encode().to_vec())
        });
        if let (Some(result), Some(verdict)) = (atomic, verdict) {
            result?;
            let created = created && !matches!(verdict, Verdict::Limit { .. });
            return Ok(Checked { verdict, attempts: 1, contended: false, created });
        }
        for attempt in 1..=max_attempts.max(1) {
            let (value, cas) = store.get(key)?;
            created |= value.is_none();
            let mut w = value.as_deref().and_then(Window::decode).unwrap_or_default();
            let verdict = admit_in_fleet(now_us, &mut w, limit, burst, fleet);
            if matches!(verdict, Verdict::Limit { .. }) {
                return Ok(Checked { verdict, attempts: attempt, contended: false, created: false });
            }
            if store.set(key, &w.encode(), cas)? {
                return Ok(Checked { verdict, attempts: attempt, contended: false, created });
            }
        }
        let verdict = admit_in_fleet(now_us, &mut Window::default(), limit, burst, fleet);
        Ok(Checked { verdict, attempts: max_attempts, contended: true, created })
    })
}

/// Records the fleet's figure for `bucket`: the other Envoys admitted `others` in its current
/// window, trusted until `until_us`. Creates the bucket if absent (so this Envoy's first request
/// counts the others too). Gives up after `max_attempts` contended writes: the next sync says it
/// again. Returns whether it was written.
pub fn set_others<S: BucketStore>(store: &S, bucket: &str, others: u64, until_us: u64, max_attempts: u32) -> Result<bool, S::Error> {
    with_bucket_key(bucket, |key| {
        let mut set = |value: Option<&[u8]>| {
            let mut w = value.and_then(Window::decode).unwrap_or_default();
            w.others = u32::try_from(others).unwrap_or(u32::MAX);
            w.others_until = until_us;
            Some(w.encode().to_vec())
        };
        if let Some(result) = store.update(key, &mut set) {
            return result.map(|()| true);
        }
        for _ in 0..max_attempts.max(1) {
            let (value, cas) = store.get(key)?;
            let mut w = value.as_deref().and_then(Window::decode).unwrap_or_default();
            w.others = u32::try_from(others).unwrap_or(u32::MAX);
            w.others_until = until_us;
            if store.set(key, &w.encode(), cas)? {
                return Ok(true);
            }
        }
        Ok(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    const SEC: u64 = 1_000_000;

    fn lim(count: u32, period_secs: u32) -> RateLimit {
        RateLimit { count, period_secs }
    }

    /// Runs requests at the given times through one bucket; returns admission times.
    fn run(times: &[u64], limit: RateLimit, burst: Burst) -> Vec<u64> {
        let mut w = Window::default();
        times.iter().copied().filter(|&t| matches!(admit(t, &mut w, limit, burst), Verdict::Allow { .. })).collect()
    }

    fn max_in_any_window(admitted: &[u64], window: u64) -> usize {
        // Windows (t - P, t] ending at each admission.
        admitted.iter().map(|&end| admitted.iter().filter(|&&t| t <= end && t + window > end).count()).max().unwrap_or(0)
    }

    /// The table: arrivals, limit, burst → how many are admitted, and the most in any window.
    #[test]
    fn admissions_follow_the_contract() {
        let check = |name: &str, times: Vec<u64>, limit: RateLimit, burst: Burst, want_admitted: usize| {
            let admitted = run(&times, limit, burst);
            let period = u64::from(limit.period_secs) * SEC;
            assert_eq!(admitted.len(), want_admitted, "{name}: admitted");
            assert!(max_in_any_window(&admitted, period) <= limit.count as usize, "{name}: more than N in a window");
        };
        check("60/min idle, 61 at once: all 60", vec![0; 61], lim(60, 60), Burst::Limit, 60);
        check("60/min, burst 10: 10 at once", vec![0; 61], lim(60, 60), Burst::Requests(10), 10);
        check("60/min, burst above N is N", vec![0; 61], lim(60, 60), Burst::Requests(500), 60);
        check("burst 0 is 1", vec![0; 5], lim(60, 60), Burst::Requests(0), 1);
        check("60 at once, then 60 more at 59.9 s: none", [vec![0; 60], vec![59_900_000; 60]].concat(), lim(60, 60), Burst::Limit, 60);
        check("60 at once, then 60 more at 60 s: all", [vec![0; 60], vec![60 * SEC; 60]].concat(), lim(60, 60), Burst::Limit, 120);
        check("window edge: 30 late, 60 early next window", [vec![59 * SEC; 30], vec![61 * SEC; 60]].concat(), lim(60, 60), Burst::Limit, 60);
        check("20/s offered 100/s for 5 s", (0..500u64).map(|i| i * 10_000).collect(), lim(20, 1), Burst::Limit, 100);
        check("burst 2 paces the rest", vec![0, 0, 0, 10_000, 50_000, 60_000, 100_000], lim(20, 1), Burst::Requests(2), 4);
        check("1/day", vec![0, SEC, 86_399 * SEC, 86_400 * SEC], lim(1, 86_400), Burst::Limit, 2);
    }

    #[test]
    fn any_window_admits_at_most_n_whatever_the_arrivals() {
        for (limit, burst) in [(lim(20, 1), Burst::Requests(2)), (lim(5, 60), Burst::Requests(1)), (lim(10, 1), Burst::Limit), (lim(3, 1), Burst::Requests(3)), (lim(100, 60), Burst::Limit)] {
            let period = u64::from(limit.period_secs) * SEC;
            // Bursty, idle, saturating, then pseudo-random arrivals.
            let mut times: Vec<u64> = (0..50).map(|i| i * 1000).collect();
            times.extend((0..2000u64).map(|i| 3 * period + i * (period / 400 + 1)));
            let mut x = 12345u64;
            let mut t = 10 * period;
            for _ in 0..3000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                t += (x >> 33) % (period / 50 + 1);
                times.push(t);
            }
            let admitted = run(&times, limit, burst);
            assert!(max_in_any_window(&admitted, period) <= limit.count as usize, "{limit:?} {burst:?}");
        }
    }

    #[test]
    fn a_client_paced_at_the_limit_loses_little() {
        // 60/min paced exactly at 1/s for an hour: an exact sliding window admits all 3600.
        let admitted = run(&(0..3600u64).map(|i| i * SEC).collect::<Vec<_>>(), lim(60, 60), Burst::Limit);
        assert!(admitted.len() >= 3600 * 97 / 100, "{}", admitted.len());
    }

    #[test]
    fn retry_after_is_exact() {
        let check = |setup: &[u64], at: u64, limit: RateLimit, burst: Burst, want_us: u64| {
            let mut w = Window::default();
            for &t in setup {
                admit(t, &mut w, limit, burst);
            }
            let Verdict::Limit { retry_after_us, reset_us } = admit(at, &mut w, limit, burst) else { panic!("not limited: {setup:?}") };
            assert_eq!(retry_after_us, want_us, "{setup:?} at {at}");
            assert!(reset_us >= retry_after_us);
            // Waiting exactly that long is admitted, a microsecond less is not.
            assert!(matches!(admit(at + retry_after_us - 1, &mut w.clone(), limit, burst), Verdict::Limit { .. }));
            assert!(matches!(admit(at + retry_after_us, &mut w, limit, burst), Verdict::Allow { .. }));
        };
        check(&[0; 60], 0, lim(60, 60), Burst::Limit, 60 * SEC);
        check(&[0; 60], 10 * SEC, lim(60, 60), Burst::Limit, 50 * SEC);
        check(&[0, 0, 30 * SEC], 31 * SEC, lim(3, 60), Burst::Limit, 29 * SEC);
        check(&[0, 0], 0, lim(2, 1), Burst::Limit, SEC);
        check(&[0, 0], 0, lim(20, 1), Burst::Requests(2), 50_000);
        assert_eq!(whole_seconds_up(1), 1);
        assert_eq!(whole_seconds_up(0), 1);
        assert_eq!(whole_seconds_up(2_000_001), 3);
    }

    #[test]
    fn remaining_and_reset_describe_the_budget() {
        let mut w = Window::default();
        let check = |w: &mut Window, at: u64, limit: RateLimit, burst: Burst, want: (u64, u64)| {
            let Verdict::Allow { remaining, reset_us } = admit(at, w, limit, burst) else { panic!("limited") };
            assert_eq!((remaining, reset_us), want);
        };
        check(&mut w, 0, lim(60, 60), Burst::Limit, (59, 60 * SEC));
        check(&mut w, SEC, lim(60, 60), Burst::Limit, (58, 60 * SEC));
        let mut w = Window::default();
        check(&mut w, 0, lim(60, 60), Burst::Requests(5), (4, 60 * SEC));
        check(&mut w, 0, lim(60, 60), Burst::Requests(5), (3, 60 * SEC));
    }

    #[test]
    fn headers_follow_the_draft() {
        let [policy, state] = headers(lim(100, 60), 42, 1_500_000);
        assert_eq!(policy, ("ratelimit-policy", "\"default\";q=100;w=60".to_string()));
        assert_eq!(state, ("ratelimit", "\"default\";r=42;t=2".to_string()));
    }

    #[test]
    fn values_round_trip_and_old_values_start_afresh() {
        let mut w = Window::default();
        for t in [0, 5, 70_000, 2 * SEC] {
            admit(t, &mut w, lim(7, 1), Burst::Requests(3));
        }
        assert_eq!(Window::decode(&w.encode()), Some(w));
        for bad in [&b""[..], b"1234567", &[b'X'; VALUE_LEN - 1], &[b'W'; VALUE_LEN]] {
            assert_eq!(Window::decode(bad), None);
        }
        // The format before fleets: the same window, no fleet figure.
        let encoded = w.encode();
        let mut old = vec![b'W'];
        old.extend_from_slice(&encoded[1..9]);
        old.extend_from_slice(&encoded[SLOTS_AT..]);
        assert_eq!(Window::decode(&old), Some(Window { others: 0, others_until: 0, ..w }));
    }

    #[test]
    fn any_stored_value_is_judged_without_overflow() {
        let mut w = Window { tat: u64::MAX, others: u32::MAX, others_until: u64::MAX, slots: [(u32::MAX, u64::MAX - 1); SLOTS] };
        for now in [0, 1, u64::MAX / 2, u64::MAX] {
            for burst in [Burst::Limit, Burst::Requests(1)] {
                let _ = admit(now, &mut w.clone(), lim(u32::MAX, 86_400), burst);
                let _ = admit(now, &mut w, lim(1, 1), burst);
            }
        }
    }

    #[test]
    fn a_clock_behind_and_a_changed_period_stay_conservative() {
        let mut w = Window::default();
        for _ in 0..10 {
            admit(100 * SEC, &mut w, lim(10, 60), Burst::Limit);
        }
        // Another worker's clock 1 s behind: still full.
        assert!(matches!(admit(99 * SEC, &mut w, lim(10, 60), Burst::Limit), Verdict::Limit { .. }));
        // The limit is edited to 10/h: the ten admissions still count.
        assert!(matches!(admit(200 * SEC, &mut w, lim(10, 3600), Burst::Limit), Verdict::Limit { .. }));
    }

    struct Mem {
        map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        /// Simulate another worker writing between get and set this many times.
        interfere: RefCell<u32>,
    }

    impl BucketStore for Mem {
        type Error = ();
        fn get(&self, key: &str) -> Result<Versioned, ()> {
            Ok(self.map.borrow().get(key).map_or((None, None), |(v, c)| (Some(v.clone()), Some(*c))))
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, ()> {
            let mut map = self.map.borrow_mut();
            if *self.interfere.borrow() > 0 {
                *self.interfere.borrow_mut() -= 1;
                if let Some(e) = map.get_mut(key) {
                    e.1 += 1;
                }
                return Ok(false);
            }
            let current = map.get(key).map(|e| e.1);
            if cas.is_some() && cas != current {
                return Ok(false);
            }
            map.insert(key.to_string(), (value.to_vec(), current.unwrap_or(0) + 1));
            Ok(true)
        }
    }

    #[test]
    fn cas_retries_and_fails_open_at_the_bound() {
        let store = Mem { map: RefCell::default(), interfere: RefCell::new(0) };
        let o = check(&store, "k:a", 0, lim(10, 1), Burst::default(), Fleet::default(), 4).unwrap();
        assert_eq!((o.attempts, o.contended, o.created), (1, false, true));
        assert!(store.map.borrow().contains_key("keyward.rl.k:a"));
        *store.interfere.borrow_mut() = 2;
        let o = check(&store, "k:a", 1, lim(10, 1), Burst::default(), Fleet::default(), 4).unwrap();
        assert_eq!((o.attempts, o.contended, o.created), (3, false, false));
        *store.interfere.borrow_mut() = 10;
        let o = check(&store, "k:a", SEC, lim(10, 1), Burst::default(), Fleet::default(), 4).unwrap();
        assert!(o.contended && matches!(o.verdict, Verdict::Allow { .. }), "{o:?}");
        *store.interfere.borrow_mut() = 0;
        let long = "x".repeat(300);
        check(&store, &long, 0, lim(10, 1), Burst::default(), Fleet::default(), 4).unwrap();
        assert!(store.map.borrow().contains_key(&bucket_key(&long)));
    }

    #[test]
    fn ten_minutes_of_windows_keep_one_entry_per_bucket() {
        // 600 one-second windows, compressed: simulated time, many requests per window.
        let store = Mem { map: RefCell::default(), interfere: RefCell::new(0) };
        let buckets = ["k:key_a", "k:key_b", "a:agt_c"];
        let mut sizes = Vec::new();
        for window in 0..600u64 {
            for i in 0..30u64 {
                let now = window * SEC + i * 33_000;
                for b in buckets {
                    check(&store, b, now, lim(20, 1), Burst::default(), Fleet::default(), 4).unwrap();
                }
            }
            sizes.push(store.map.borrow().len());
        }
        assert!(sizes.iter().all(|&n| n == buckets.len()), "entries grew: {:?}", &sizes[..5]);
    }
}

#[cfg(test)]
mod fleet_tests {
    use super::*;

    const SEC: u64 = 1_000_000;

    fn lim(count: u32, period_secs: u32) -> RateLimit {
        RateLimit { count, period_secs }
    }

    fn admitted(w: &mut Window, times: &[u64], limit: RateLimit, burst: Burst, fleet: Fleet) -> usize {
        times.iter().filter(|&&t| matches!(admit_in_fleet(t, w, limit, burst, fleet), Verdict::Allow { .. })).count()
    }

    /// The table: fleet, the bucket's figure from the control plane, arrivals → admitted.
    #[test]
    fn a_fleet_member_admits_its_share_or_the_limit_less_the_others() {
        let at_once = vec![0u64; 100];
        let split = |envoys| Fleet { envoys, global: false };
        let global = |envoys| Fleet { envoys, global: true };
        let fresh = |others| Window { others, others_until: 10 * SEC, ..Window::default() };
        let stale = |others| Window { others, others_until: 0, ..Window::default() };
        let table: &[(&str, Fleet, Window, RateLimit, Burst, usize)] = &[
            ("alone: the whole limit", split(1), Window::default(), lim(50, 1), Burst::Limit, 50),
            ("split in 3: a third, rounded down", split(3), Window::default(), lim(50, 1), Burst::Limit, 16),
            ("split: a tiny limit is at least 1", split(3), Window::default(), lim(2, 1), Burst::Limit, 1),
            ("split: the burst is shared too", split(2), Window::default(), lim(50, 1), Burst::Requests(10), 5),
            ("global: the limit less the others", global(3), fresh(30), lim(50, 1), Burst::Limit, 20),
            ("global: exhausted by the others", global(3), fresh(50), lim(50, 1), Burst::Limit, 0),
            ("global: more than the limit from the others", global(3), fresh(80), lim(50, 1), Burst::Limit, 0),
            ("global, figure stale: the share", global(3), stale(0), lim(50, 1), Burst::Limit, 16),
            ("split mode ignores a fresh figure", split(3), fresh(0), lim(50, 1), Burst::Limit, 16),
        ];
        for (name, fleet, w, limit, burst, want) in table {
            let mut w = *w;
            assert_eq!(admitted(&mut w, &at_once, *limit, *burst, *fleet), *want, "{name}");
        }
    }

    #[test]
    fn a_bucket_exhausted_by_the_others_says_when_to_retry() {
        let mut w = Window { others: 50, others_until: 10 * SEC, ..Window::default() };
        let Verdict::Limit { retry_after_us, .. } = admit_in_fleet(0, &mut w, lim(50, 1), Burst::Limit, Fleet { envoys: 3, global: true }) else {
            panic!("admitted")
        };
        assert_eq!(retry_after_us, sub_window_us(lim(50, 1)));
    }

    #[test]
    fn the_others_figure_is_written_without_touching_the_window_and_survives_encoding() {
        let mut w = Window::default();
        admit(0, &mut w, lim(10, 1), Burst::Limit);
        w.others = 7;
        w.others_until = 123;
        assert_eq!(Window::decode(&w.encode()), Some(w));
        let fleet = Fleet { envoys: 4, global: true };
        assert_eq!(Fleet::decode(&fleet.encode()), Some(fleet));
        for bad in ["", "0 1", "3", "3 2", "x 1"] {
            assert_eq!(Fleet::decode(bad), None, "{bad:?}");
        }
    }
}
