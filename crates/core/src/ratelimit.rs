//! Per-key rate limits: GCRA (the generic cell rate algorithm) over one shared value per bucket.
//!
//! A limit of `N` per period `P` has emission interval `T = P / N`. The bucket's only state is
//! its theoretical arrival time (TAT). A request at `now` is admitted if `now >= TAT - tau`,
//! and then `TAT = max(TAT, now) + T`; a refused request writes nothing. `tau = (burst - 1) * T`
//! lets `burst` requests through back to back after an idle period.
//!
//! Guarantees (see ARCHITECTURE.md): over any window of length `P`, at most `N + burst - 1`
//! requests are admitted; under steady overload the admitted rate converges to `N` per `P`,
//! because a late arrival (within `tau`) does not push the schedule back. The default burst, 2,
//! is the smallest that absorbs arrival jitter.

use crate::snapshot::RateLimit;

/// What one bucket says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted: store `new_tat`.
    Allow { new_tat: u64, remaining: u64, reset_us: u64 },
    /// Refused: come back in `retry_after_us`.
    Limit { retry_after_us: u64, reset_us: u64 },
}

/// The effective burst for a limit: at least 1, at most `N`.
pub fn effective_burst(limit: RateLimit, burst: Burst) -> u64 {
    let n = u64::from(limit.count);
    match burst {
        Burst::Requests(b) => u64::from(b).clamp(1, n.max(1)),
        Burst::Limit => n.max(1),
    }
}

/// How many requests may arrive back to back after an idle period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Burst {
    Requests(u32),
    /// The limit's own `N`: token-bucket semantics (at most `2N - 1` in a window).
    Limit,
}

impl Default for Burst {
    fn default() -> Self {
        Burst::Requests(2)
    }
}

/// Emission interval in microseconds (at least 1).
pub fn interval_us(limit: RateLimit) -> u64 {
    (u64::from(limit.period_secs) * 1_000_000 / u64::from(limit.count.max(1))).max(1)
}

/// Decides one request. `tat` is the stored TAT (microseconds), `None` for a fresh bucket.
pub fn gcra(now_us: u64, tat: Option<u64>, limit: RateLimit, burst: Burst) -> Verdict {
    let t = interval_us(limit);
    let b = effective_burst(limit, burst);
    let tau = (b - 1) * t;
    let tat = tat.unwrap_or(now_us);
    let allow_at = tat.saturating_sub(tau);
    if now_us < allow_at {
        return Verdict::Limit { retry_after_us: allow_at - now_us, reset_us: tat.saturating_sub(now_us) };
    }
    let new_tat = tat.max(now_us) + t;
    // Requests admissible right now after this one: how far the schedule is from its limit.
    let slack = (now_us + tau + t).saturating_sub(new_tat);
    Verdict::Allow { new_tat, remaining: slack / t, reset_us: new_tat.saturating_sub(now_us) }
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

/// The shared store the limiter's state lives in (Envoy shared data in the filter).
pub trait Store {
    type Error;
    /// The value and its CAS token.
    fn get(&self, key: &str) -> Result<Versioned, Self::Error>;
    /// Writes if `cas` still matches (or unconditionally with `None`); `Ok(false)` on mismatch.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, Self::Error>;
}

/// The limiter's answer for one request, with how many store attempts it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub attempts: u32,
    /// The retry bound was hit: admitted without updating the bucket (fail open on contention).
    pub contended: bool,
    /// The bucket did not exist before this request.
    pub created: bool,
}

/// Shared-data key of a bucket.
pub fn bucket_key(bucket: &str) -> String {
    format!("keyward.rl.{bucket}")
}

/// Applies GCRA to `bucket` in `store` with compare-and-swap, at most `max_attempts` times.
pub fn check<S: Store>(store: &S, bucket: &str, now_us: u64, limit: RateLimit, burst: Burst, max_attempts: u32) -> Result<Outcome, S::Error> {
    let key = bucket_key(bucket);
    let mut created = false;
    for attempt in 1..=max_attempts.max(1) {
        let (value, cas) = store.get(&key)?;
        let tat = value.as_deref().and_then(|v| std::str::from_utf8(v).ok()).and_then(|v| v.parse::<u64>().ok());
        created |= value.is_none();
        let verdict = gcra(now_us, tat, limit, burst);
        let Verdict::Allow { new_tat, .. } = verdict else {
            return Ok(Outcome { verdict, attempts: attempt, contended: false, created: false });
        };
        if store.set(&key, new_tat.to_string().as_bytes(), cas)? {
            return Ok(Outcome { verdict, attempts: attempt, contended: false, created });
        }
    }
    let verdict = gcra(now_us, None, limit, burst);
    Ok(Outcome { verdict, attempts: max_attempts, contended: true, created })
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
        let mut tat = None;
        let mut admitted = Vec::new();
        for &t in times {
            if let Verdict::Allow { new_tat, .. } = gcra(t, tat, limit, burst) {
                tat = Some(new_tat);
                admitted.push(t);
            }
        }
        admitted
    }

    fn max_in_any_window(admitted: &[u64], window: u64) -> usize {
        admitted.iter().map(|&start| admitted.iter().filter(|&&t| t >= start && t < start + window).count()).max().unwrap_or(0)
    }

    #[test]
    fn steady_overload_converges_to_n_per_window() {
        // 20/s offered 100/s with jitter for 5 s.
        let times: Vec<u64> = (0..500u64).map(|i| i * 10_000 + (i * 7919 % 9_000)).collect();
        let admitted = run(&times, lim(20, 1), Burst::default());
        assert!((100..=102).contains(&admitted.len()), "{}", admitted.len());
        assert!(max_in_any_window(&admitted, SEC) <= 21, "{}", max_in_any_window(&admitted, SEC));
    }

    #[test]
    fn any_window_admits_at_most_n_plus_burst_minus_one() {
        for (limit, burst) in [(lim(20, 1), Burst::Requests(2)), (lim(5, 60), Burst::Requests(1)), (lim(10, 1), Burst::Limit), (lim(3, 1), Burst::Requests(3))] {
            let period = u64::from(limit.period_secs) * SEC;
            // Bursty, idle, then saturating arrivals.
            let mut times: Vec<u64> = (0..50).map(|i| i * 1000).collect();
            times.extend((0..2000u64).map(|i| 3 * period + i * (period / 400 + 1)));
            let admitted = run(&times, limit, burst);
            let b = effective_burst(limit, burst) as usize;
            assert!(max_in_any_window(&admitted, period) < limit.count as usize + b, "{limit:?} {burst:?}");
        }
    }

    #[test]
    fn burst_then_spacing() {
        let admitted = run(&[0, 0, 0, 10_000, 50_000, 60_000, 100_000], lim(20, 1), Burst::Requests(2));
        assert_eq!(admitted, [0, 0, 50_000, 100_000]);
        let admitted = run(&[0; 30], lim(20, 1), Burst::Limit);
        assert_eq!(admitted.len(), 20);
    }

    #[test]
    fn retry_after_is_exact_and_rounds_up() {
        let mut tat = None;
        for _ in 0..2 {
            if let Verdict::Allow { new_tat, .. } = gcra(0, tat, lim(2, 1), Burst::Requests(2)) {
                tat = Some(new_tat);
            }
        }
        let Verdict::Limit { retry_after_us, .. } = gcra(0, tat, lim(2, 1), Burst::Requests(2)) else { panic!("not limited") };
        assert_eq!(retry_after_us, 500_000);
        assert_eq!(whole_seconds_up(retry_after_us), 1);
        assert_eq!(whole_seconds_up(1), 1);
        assert_eq!(whole_seconds_up(2_000_001), 3);
        // Waiting exactly that long is admitted.
        assert!(matches!(gcra(retry_after_us, tat, lim(2, 1), Burst::Requests(2)), Verdict::Allow { .. }));
    }

    #[test]
    fn headers_follow_the_draft() {
        let [policy, state] = headers(lim(100, 60), 42, 1_500_000);
        assert_eq!(policy, ("ratelimit-policy", "\"default\";q=100;w=60".to_string()));
        assert_eq!(state, ("ratelimit", "\"default\";r=42;t=2".to_string()));
    }

    struct Mem {
        map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        /// Simulate another worker writing between get and set this many times.
        interfere: RefCell<u32>,
    }

    impl Store for Mem {
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
        let o = check(&store, "k:a", 0, lim(10, 1), Burst::default(), 4).unwrap();
        assert_eq!((o.attempts, o.contended, o.created), (1, false, true));
        *store.interfere.borrow_mut() = 2;
        let o = check(&store, "k:a", 1, lim(10, 1), Burst::default(), 4).unwrap();
        assert_eq!((o.attempts, o.contended, o.created), (3, false, false));
        *store.interfere.borrow_mut() = 10;
        let o = check(&store, "k:a", SEC, lim(10, 1), Burst::default(), 4).unwrap();
        assert!(o.contended && matches!(o.verdict, Verdict::Allow { .. }), "{o:?}");
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
                    check(&store, b, now, lim(20, 1), Burst::default(), 4).unwrap();
                }
            }
            sizes.push(store.map.borrow().len());
        }
        assert!(sizes.iter().all(|&n| n == buckets.len()), "entries grew: {:?}", &sizes[..5]);
    }
}
