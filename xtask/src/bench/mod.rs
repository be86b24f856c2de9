//! `cargo xtask bench`: keyward side by side with every alternative, in one run, on the same
//! Envoy 1.40 binary, the same proxied route and the same upstream.
//!
//! Method: each Envoy under test runs with `--concurrency 1`, pinned to CPU 0; `wrk`, the
//! upstream (a direct-response Envoy), the ext_authz server and `keyward serve` share CPU 1.
//! After a warm-up, every configuration runs once per round in rotating order; each run
//! measures throughput (closed loop) and then latency at a fixed moderate rate. Envoy's CPU
//! time comes from `/proc/<pid>/stat`. Ratios are computed per round, then the median is taken.
//!
//! `subjects` is what is measured, `runs` the rounds under wrk, `callgrind` the instruction
//! counts, `rate_error` the limiter's simulation, `report` the markdown; `fleet` and `store`
//! are `bench --fleet` and `bench --stores`.

mod callgrind;
pub mod fleet;
mod rate_error;
mod report;
mod runs;
pub mod store;
mod subjects;

pub(crate) use report::{git_commit, machine};
pub(crate) use subjects::{control_plane, keys};

use crate::Result;
use keyward_testkit::{auth_server, TempDir};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where BENCHMARKS.md's soak section starts; a bench run rewrites everything above it.
pub const SOAK_MARKER: &str = "<!-- soak: written by `cargo xtask soak`, kept by `cargo xtask bench` -->";

pub struct Options {
    pub quick: bool,
    /// Where the report goes.
    pub out: PathBuf,
}

struct Plan {
    rounds: usize,
    throughput_secs: u32,
    latency_secs: u32,
    /// Keys loaded for configurations 6, 7 and 8.
    sizes: [usize; 3],
    /// Requests per second of the latency runs.
    moderate_rate: u32,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan { rounds: 2, throughput_secs: 1, latency_secs: 1, sizes: [1_000, 5_000, 10_000], moderate_rate: 500 }
        } else {
            Plan { rounds: 7, throughput_secs: 3, latency_secs: 2, sizes: [1_000, 100_000, 1_000_000], moderate_rate: 1_000 }
        }
    }
}

pub fn run(opts: &Options) -> Result {
    let plan = Plan::new(opts.quick);
    pin_to_cpu_1()?;
    let dir = TempDir::new("bench")?;
    let t_total = Instant::now();
    eprintln!("bench: generating keys");
    let small = keys(plan.sizes[0], "a");
    let mid = keys(plan.sizes[1], "b");
    let large = keys(plan.sizes[2], "c");
    let up = subjects::upstream()?;
    let up_port = up.port;
    let authz = auth_server(small.iter().cloned().collect())?;
    let started = subjects::start_all(dir.path(), up_port, authz.port(), [&small, &mid, &large])?;
    let samples = runs::rounds(&started.subjects, &plan, dir.path())?;

    eprintln!("bench: scale measurements");
    let scale = runs::scale(&small, &mid, &large, up_port)?;
    // The wasm subjects revoke each set's first five keys, the native ones the next five.
    let mut propagation: Vec<(&str, usize, f64)> = runs::propagation(&started.serves, &started.subjects[5..8], 0)?.into_iter().map(|(n, ms)| ("keyward.wasm", n, ms)).collect();
    propagation.extend(runs::propagation(&started.serves, &started.subjects[8..11], 5)?.into_iter().map(|(n, ms)| ("libkeyward.so", n, ms)));
    let instructions = if plan.rounds >= 7 {
        let rated = keys(1_000, "r");
        let (serve_rated, _) = control_plane(&rated, Some("1000000/s"))?;
        let sets = [(&started.serves[0].0, &small), (&started.serves[1].0, &mid)];
        callgrind::instructions_table(up_port, &subjects::noop_wasm(), sets, (&serve_rated, &rated))?
    } else {
        Vec::new()
    };
    drop(up);
    drop(authz);

    let mut report = report::report(&plan, &started.subjects, &samples, &started.apply_ms, &scale, &propagation, t_total.elapsed());
    report.push_str(&report::rate_error_section());
    report.push_str(&report::instruction_report(&instructions));
    print!("{report}");
    // The soak's section (`cargo xtask soak`, pasted below the marker) outlives a new bench run.
    report::write_keeping_soak(&opts.out, report)?;
    eprintln!("bench: wrote {} in {:.0} s", opts.out.display(), t_total.elapsed().as_secs_f64());
    Ok(())
}

/// Moves this process, and so every child it starts from now on (`keyward serve`, the CLI, the
/// ext_authz server, wrk), to CPU 1; each Envoy under test runs under `taskset -c 0`.
fn pin_to_cpu_1() -> Result {
    let pid = std::process::id().to_string();
    let status = std::process::Command::new("taskset").args(["-a", "-p", "-c", "1", &pid]).stdout(std::process::Stdio::null()).status();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("taskset -a -p -c 1 {pid} failed: {s}").into()),
        Err(e) => Err(format!("cannot run taskset (Debian package util-linux): {e}").into()),
    }
}

/// `cargo xtask bench --instructions`: only the callgrind table, written over that section of
/// `out` (the rest of the file is kept).
pub fn run_instructions(out: &Path) -> Result {
    let up = subjects::upstream()?;
    let small = keys(1_000, "a");
    let mid = keys(100_000, "b");
    let (serve_small, _) = control_plane(&small, None)?;
    let (serve_mid, _) = control_plane(&mid, None)?;
    let rated = keys(1_000, "r");
    let (serve_rated, _) = control_plane(&rated, Some("1000000/s"))?;
    let counts = callgrind::instructions_table(up.port, &subjects::noop_wasm(), [(&serve_small, &small), (&serve_mid, &mid)], (&serve_rated, &rated))?;
    let section = report::instruction_report(&counts);
    print!("{section}");
    report::write_instructions_section(out, &section)?;
    eprintln!("bench: wrote the instructions section of {}", out.display());
    Ok(())
}

/// `cargo xtask bench --rate-error`: only the rate-limit accuracy table (a pure simulation of
/// the core's limiter, a few seconds), written over that section of `out`.
pub fn run_rate_error(out: &Path) -> Result {
    let section = report::rate_error_section();
    print!("{section}");
    report::write_rate_error_section(out, &section)?;
    eprintln!("bench: wrote the rate-limit accuracy section of {}", out.display());
    Ok(())
}
