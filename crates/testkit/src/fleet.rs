//! A load driver for rate limits across several Envoys: one key, sent at a fixed rate, spread
//! over the Envoys by a shape (round-robin, or skewed like a sticky load balancer), with a hook
//! to break things mid-run. Used by `tests/envoy_fleet.rs` and `cargo xtask bench --fleet`.

use std::time::{Duration, Instant};

/// How requests are spread over the Envoys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// Request `i` goes to Envoy `i mod n`.
    RoundRobin,
    /// Weights per Envoy, e.g. `[90, 5, 5]`: out of every `sum` requests, `w[k]` go to Envoy `k`.
    Skew(Vec<u32>),
}

impl Shape {
    /// The Envoy request `i` goes to.
    pub fn pick(&self, i: u64, envoys: usize) -> usize {
        match self {
            Shape::RoundRobin => (i % envoys.max(1) as u64) as usize,
            Shape::Skew(w) => {
                let total: u64 = w.iter().map(|x| u64::from(*x)).sum::<u64>().max(1);
                let mut slot = i % total;
                for (k, weight) in w.iter().enumerate() {
                    if slot < u64::from(*weight) {
                        return k.min(envoys.saturating_sub(1));
                    }
                    slot -= u64::from(*weight);
                }
                0
            }
        }
    }

    pub fn label(&self) -> String {
        match self {
            Shape::RoundRobin => "round-robin".into(),
            Shape::Skew(w) => w.iter().map(u32::to_string).collect::<Vec<_>>().join("/"),
        }
    }
}

/// What a run got back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// 2xx answers.
    pub admitted: u64,
    /// 429 answers.
    pub limited: u64,
    /// 5xx answers, and requests that got no answer.
    pub errors: u64,
    /// Anything else (401, 403, …).
    pub other: u64,
    /// Per Envoy: admitted, limited.
    pub per_envoy: Vec<(u64, u64)>,
    /// The slowest answer.
    pub slowest: Duration,
    /// The first few error descriptions.
    pub error_samples: Vec<String>,
}

impl Tally {
    pub fn sent(&self) -> u64 {
        self.admitted + self.limited + self.errors + self.other
    }
}

/// Sends `GET path` with `x-api-key: key` at `per_second` for `duration`, spread over `ports`
/// by `shape`, each request on a new connection. `during` is called before each request with
/// the time since the start (stop Redis at 7 s, say). Requests are paced to their slots; one
/// that falls behind is sent at once.
pub fn drive(ports: &[u16], key: &str, path: &str, per_second: u32, duration: Duration, shape: &Shape, mut during: impl FnMut(Duration)) -> Tally {
    let mut tally = Tally { per_envoy: vec![(0, 0); ports.len()], ..Tally::default() };
    let total = (u128::from(per_second) * duration.as_millis() / 1000) as u64;
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_micros(i * 1_000_000 / u64::from(per_second.max(1)));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        during(start.elapsed());
        let k = shape.pick(i, ports.len());
        let sent = Instant::now();
        let answer = crate::request(ports[k], "GET", path, &[("x-api-key", key.as_bytes())]);
        tally.slowest = tally.slowest.max(sent.elapsed());
        match answer {
            Ok(r) if (200..300).contains(&r.status) => {
                tally.admitted += 1;
                tally.per_envoy[k].0 += 1;
            }
            Ok(r) if r.status == 429 => {
                tally.limited += 1;
                tally.per_envoy[k].1 += 1;
            }
            Ok(r) if r.status >= 500 => {
                tally.errors += 1;
                if tally.error_samples.len() < 5 {
                    tally.error_samples.push(format!("envoy {k} at {:?}: {} {}", start.elapsed(), r.status, String::from_utf8_lossy(&r.body)));
                }
            }
            Ok(_) => tally.other += 1,
            Err(e) => {
                tally.errors += 1;
                if tally.error_samples.len() < 5 {
                    tally.error_samples.push(format!("envoy {k} at {:?}: {e}", start.elapsed()));
                }
            }
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_spread_requests_as_their_weights_say() {
        let count = |shape: &Shape| {
            let mut c = [0u32; 3];
            for i in 0..100 {
                c[shape.pick(i, 3)] += 1;
            }
            c
        };
        assert_eq!(count(&Shape::RoundRobin), [34, 33, 33]);
        assert_eq!(count(&Shape::Skew(vec![90, 5, 5])), [90, 5, 5]);
        assert_eq!(Shape::Skew(vec![90, 5, 5]).label(), "90/5/5");
    }
}
