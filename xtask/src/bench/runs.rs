//! Running the configurations: the warm-up and the interleaved rounds under wrk (throughput,
//! then latency at a paced rate, with Envoy's CPU time), memory at scale, and how fast a
//! revocation reaches Envoy.

use super::subjects::{bootstrap, control_plane, keyward_in, start, wait_applied, Subject};
use super::Plan;
use crate::wrk::{Load, Wrk};
use crate::Result;
use keyward_testkit::{loopback_cluster, poll_until, request, Envoy, Keyward, Shell};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Sample {
    pub rps: f64,
    pub cpu_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// wrk on CPU 1 (the Envoy under test has CPU 0), one thread, presenting `s`'s keys.
fn load(s: &Subject, connections: u32, secs: u32, delay_ms: Option<u32>) -> Load<'_> {
    Load { port: s.envoy.port, path: "/bench", keys: &s.keys_file, threads: 1, connections, secs: secs.into(), delay_ms, cpus: Some("1") }
}

fn measure(s: &Subject, plan: &Plan, wrk: &Wrk) -> Result<Sample> {
    let cpu0 = s.envoy.cpu_seconds();
    let t = wrk.run(&load(s, 16, plan.throughput_secs, None))?;
    let cpu1 = s.envoy.cpu_seconds();
    let requests = t.requests as f64;
    let non2xx = t.non2xx + t.errors;
    if requests == 0.0 || non2xx > 0 {
        return Err(format!("{}: {non2xx} failed requests of {requests}: {t}", s.name).into());
    }
    let rps = requests / (t.duration_us as f64 / 1e6);
    let connections = 8;
    let delay_ms = connections * 1000 / plan.moderate_rate;
    let l = wrk.run(&load(s, connections, plan.latency_secs, Some(delay_ms)))?;
    Ok(Sample { rps, cpu_us: (cpu1 - cpu0) * 1e6 / requests, p50_us: l.p50_us as f64, p99_us: l.p99_us as f64 })
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A warm-up run of each configuration, then `plan.rounds` rounds, each measuring every
/// configuration once, starting one further along each round. wrk's script goes to `dir`.
pub(super) fn rounds(subjects: &[Subject], plan: &Plan, dir: &Path) -> Result<Vec<Vec<Sample>>> {
    let wrk = Wrk::new(dir)?;
    eprintln!("bench: warm-up");
    for s in subjects {
        wrk.run(&load(s, 16, 1, None))?;
    }
    let n = subjects.len();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); n];
    for round in 0..plan.rounds {
        eprintln!("bench: round {} of {}", round + 1, plan.rounds);
        for k in 0..n {
            let i = (round + k) % n;
            samples[i].push(measure(&subjects[i], plan, &wrk)?);
        }
    }
    Ok(samples)
}

pub(super) struct Scale {
    /// (keys, RSS MiB: keyward.wasm at concurrency 1 and 2, libkeyward.so at concurrency 1)
    pub memory: Vec<(usize, f64, f64, f64)>,
}

fn rss_mib(e: &Envoy) -> f64 {
    std::thread::sleep(Duration::from_millis(300));
    e.rss_bytes() as f64 / 1_048_576.0
}

pub(super) fn scale(small: &[String], mid: &[String], large: &[String], up_port: u16) -> Result<Scale> {
    let mut memory = Vec::new();
    let sets: [&[String]; 4] = [&[], small, mid, large];
    for set in sets {
        let (serve, _) = control_plane(set, None)?;
        // keyward.wasm with 1 and 2 workers, then libkeyward.so with 1.
        let mut rss = [0.0; 3];
        for (slot, (shell, concurrency)) in [(Shell::Wasm, 1u32), (Shell::Wasm, 2), (Shell::Native, 1)].into_iter().enumerate() {
            let node = format!("scale-{}-{concurrency}-{slot}", set.len());
            let config = json!({"control_plane": {"cluster": "keyward", "feed_wait_secs": 15}});
            let boot = bootstrap(&node, vec![keyward_in(shell, &config)], vec![loopback_cluster("upstream", up_port), loopback_cluster("keyward", serve.port)]);
            let envoy = start(boot, concurrency, if concurrency == 1 { "0" } else { "0,1" })?;
            wait_applied(&envoy, &serve, shell)?;
            rss[slot] = rss_mib(&envoy);
        }
        memory.push((set.len(), rss[0], rss[1], rss[2]));
    }
    Ok(Scale { memory })
}

/// Revokes keys of the running control planes and times the refusal at the Envoy under test.
/// The first five keys of each set for the first subjects, the next five for the second.
pub(super) fn propagation(serves: &[(Keyward, Vec<String>, Vec<String>)], subjects: &[Subject], skip: usize) -> Result<Vec<(usize, f64)>> {
    let mut out = Vec::new();
    for ((serve, ids, keys), subject) in serves.iter().zip(subjects) {
        let mut times = Vec::new();
        for (id, key) in ids.iter().zip(keys).skip(skip).take(5) {
            let t0 = Instant::now();
            serve.api_post(&format!("/v1/keys/{id}/revoke"), &json!({}));
            poll_until(Duration::from_secs(10), "the revocation", || {
                let r = request(subject.envoy.port, "GET", "/bench", &[("x-api-key", key.as_bytes())]).ok()?;
                (r.status == 401).then_some(())
            });
            times.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        out.push((keys.len(), median(times)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
