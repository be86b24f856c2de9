//! `cargo xtask bench --rate-error`: the core's rate limiter against the exact sliding-window
//! answer, over simulated arrivals (no Envoy: a pure simulation, the same on every run).

/// One simulated arrival pattern: arrival times (µs) over `windows` periods of a limit of `n`.
struct Pattern {
    name: &'static str,
    arrivals: fn(n: u64, period: u64, windows: u64, rng: &mut Rng) -> Vec<u64>,
}

/// xorshift64*: deterministic, so the table is the same on every run.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn paced(n: u64, period: u64, windows: u64, factor: f64) -> Vec<u64> {
    let gap = period as f64 / (n as f64 * factor);
    (0..).map(|i| (i as f64 * gap) as u64).take_while(|&t| t < windows * period).collect()
}

fn poisson(n: u64, period: u64, windows: u64, factor: f64, rng: &mut Rng) -> Vec<u64> {
    let mean = period as f64 / (n as f64 * factor);
    let mut t = 0.0;
    let mut out = Vec::new();
    loop {
        t += -mean * (1.0 - rng.unit()).ln();
        if t >= (windows * period) as f64 {
            return out;
        }
        out.push(t as u64);
    }
}

const PATTERNS: [Pattern; 6] = [
    Pattern { name: "paced at the limit", arrivals: |n, p, w, _| paced(n, p, w, 1.0) },
    Pattern { name: "paced at 2× the limit", arrivals: |n, p, w, _| paced(n, p, w, 2.0) },
    Pattern {
        name: "N just before and N just after each window edge",
        arrivals: |n, p, w, _| (1..w).flat_map(|k| (0..n).map(move |_| k * p - 1_000).chain((0..n).map(move |_| k * p + 1_000))).collect(),
    },
    Pattern {
        name: "bursts of N/4 at random times, 1× on average",
        arrivals: |n, p, w, rng| {
            let mut out: Vec<u64> = poisson(4, p, w, 1.0, rng).into_iter().flat_map(|t| std::iter::repeat_n(t, (n / 4).max(1) as usize)).collect();
            out.sort_unstable();
            out
        },
    },
    Pattern { name: "Poisson at the limit", arrivals: |n, p, w, rng| poisson(n, p, w, 1.0, rng) },
    Pattern { name: "Poisson at 2× the limit", arrivals: |n, p, w, rng| poisson(n, p, w, 2.0, rng) },
];

/// The exact sliding-window answer: admit iff fewer than `n` admissions in `(t - period, t]`.
fn exact_admissions(arrivals: &[u64], n: u64, period: u64) -> Vec<u64> {
    let mut admitted: Vec<u64> = Vec::new();
    let mut oldest = 0;
    for &t in arrivals {
        while oldest < admitted.len() && admitted[oldest] + period <= t {
            oldest += 1;
        }
        if ((admitted.len() - oldest) as u64) < n {
            admitted.push(t);
        }
    }
    admitted
}

fn keyward_admissions(arrivals: &[u64], limit: keyward_core::RateLimit) -> Vec<u64> {
    use keyward_core::ratelimit::{admit, Burst, Verdict, Window};
    let mut w = Window::default();
    arrivals.iter().copied().filter(|&t| matches!(admit(t, &mut w, limit, Burst::Limit), Verdict::Allow { .. })).collect()
}

/// The most admissions in any window `(t - period, t]`.
fn most_in_a_window(admitted: &[u64], period: u64) -> usize {
    let mut most = 0;
    let mut start = 0;
    for (end, &t) in admitted.iter().enumerate() {
        while admitted[start] + period <= t {
            start += 1;
        }
        most = most.max(end + 1 - start);
    }
    most
}

/// Rows of the table: (pattern, N, exact, keyward, most in a window).
pub(super) fn rate_error_rows() -> Vec<(&'static str, u64, usize, usize, usize)> {
    const WINDOWS: u64 = 200;
    let mut rows = Vec::new();
    for pattern in &PATTERNS {
        for (n, period_secs) in [(10u32, 1u32), (60, 60), (1000, 3600)] {
            let limit = keyward_core::RateLimit { count: n, period_secs };
            let period = u64::from(period_secs) * 1_000_000;
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(n));
            let arrivals = (pattern.arrivals)(u64::from(n), period, WINDOWS, &mut rng);
            let exact = exact_admissions(&arrivals, u64::from(n), period);
            let ours = keyward_admissions(&arrivals, limit);
            rows.push((pattern.name, u64::from(n), exact.len(), ours.len(), most_in_a_window(&ours, period)));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_never_admits_more_than_n_in_a_window_and_stays_near_the_exact_answer() {
        for (name, n, exact, ours, most) in rate_error_rows() {
            assert!(most as u64 <= n, "{name}, N = {n}: {most} in one window");
            assert!(ours <= exact && ours as f64 >= exact as f64 * 0.9, "{name}, N = {n}: {ours} against {exact}");
        }
    }
}
