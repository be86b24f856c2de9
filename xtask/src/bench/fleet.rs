//! `cargo xtask bench --fleet`: rate limits across three Envoys, in one run: keyward with a
//! rate store (Redis), keyward split-only, and Envoy's own `local_ratelimit` set to the same
//! limit on each Envoy, each under a round-robin and a 90/5/5 spread of one key at twice its
//! limit. The section goes between the soak's and the stores' markers, so neither a full
//! `cargo xtask bench` nor `bench --stores` rewrites it.

use crate::Result;
use keyward_testkit::fleet::{drive, Shape, Stack, Tally, ENVOYS};
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

pub const FLEET_MARKER: &str = "<!-- fleet: written by `cargo xtask bench --fleet` -->";
const LIMIT: u32 = 50;
const OFFERED: u32 = 100;

struct Row {
    config: &'static str,
    shape: String,
    tally: Tally,
}

pub fn run(out: &Path, quick: bool) -> Result {
    let started = Instant::now();
    let secs = if quick { 5 } else { 20 };
    let shapes = [Shape::RoundRobin, Shape::Skew(vec![90, 5, 5])];
    let mut rows = Vec::new();
    let mut measure = |config: &'static str, stack: &Stack| {
        for shape in &shapes {
            let key = stack.key(&format!("bench-{}", rows.len()), LIMIT);
            eprintln!("bench --fleet: {config}, {}", shape.label());
            let tally = drive(&stack.ports(), &key, "/v1/items", OFFERED, Duration::from_secs(secs), shape, |_| {});
            rows.push(Row { config, shape: shape.label(), tally });
        }
    };
    measure("keyward, global (Redis)", &Stack::keyward(true));
    measure("keyward, split only", &Stack::keyward(false));
    measure("Envoy local_ratelimit, 50/s per Envoy", &Stack::local_ratelimit(LIMIT));
    let section = report(&rows, secs, started.elapsed());
    print!("{section}");
    let old = std::fs::read_to_string(out).unwrap_or_default();
    let stores = old.find(super::store::STORES_MARKER).unwrap_or(old.len());
    let start = old.find(FLEET_MARKER).unwrap_or(stores).min(stores);
    let new = format!("{}\n\n{}\n\n{}", old[..start].trim_end(), section.trim(), &old[stores..]);
    std::fs::write(out, format!("{}\n", new.trim())).map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!("bench --fleet: wrote the fleet section of {} in {:.0} s", out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

fn report(rows: &[Row], secs: u64, took: Duration) -> String {
    let budget = u64::from(LIMIT) * secs;
    let mut r = format!("{FLEET_MARKER}\n\n## Rate limits across a fleet\n\n");
    let _ = writeln!(
        r,
        "{ENVOYS} Envoys (`--concurrency 2`) on one `keyward serve`; one key limited to {LIMIT}/s, sent at {OFFERED}/s for {secs} s \
         (the fleet's budget: {budget}), each request to one Envoy, round-robin or 90/5/5; `rate_sync_ms` 250. \
         Envoy's `local_ratelimit` has the same limit as a token bucket on each Envoy. One run, {} on this 2-core machine \
         (`cargo xtask bench --fleet`).\n",
        humantime(took)
    );
    r.push_str("| configuration | spread | admitted | vs the budget | 429 | admitted per Envoy |\n|---|---|---:|---:|---:|---|\n");
    for row in rows {
        let per: Vec<String> = row.tally.per_envoy.iter().map(|(a, _)| a.to_string()).collect();
        let _ = writeln!(
            r,
            "| {} | {} | {} | {:.2}× | {} | {} |",
            row.config,
            row.shape,
            row.tally.admitted,
            row.tally.admitted as f64 / budget as f64,
            row.tally.limited,
            per.join(" / ")
        );
    }
    r
}

fn humantime(d: Duration) -> String {
    format!("{:.0} s", d.as_secs_f64())
}
