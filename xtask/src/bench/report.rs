//! BENCHMARKS.md: the markdown of each section, and rewriting one section of the file while
//! keeping the others (the soak's, the fleet's and the stores' are written by other commands).

use keyward_testkit::Shell;
use super::rate_error::rate_error_rows;
use super::runs::{median, Sample, Scale};
use super::subjects::Subject;
use super::{Plan, SOAK_MARKER};
use crate::Result;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const INSTRUCTIONS_HEADING: &str = "## Instructions per request (callgrind)";
const RATE_HEADING: &str = "## Rate-limit accuracy";

pub(super) fn report(plan: &Plan, subjects: &[Subject], samples: &[Vec<Sample>], apply: &[(Shell, usize, f64, f64)], scale: &Scale, propagation: &[(&str, usize, f64)], took: Duration) -> String {
    let mut r = String::new();
    let date = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let _ = writeln!(r, "# keyward benchmarks\n");
    let _ = writeln!(
        r,
        "Written by `cargo xtask bench{}` on {date}, commit {}, machine: {}. Envoy {} (`--concurrency 1`, pinned to CPU 0); wrk, the upstream (a direct-response Envoy), the ext_authz server and `keyward serve` on CPU 1. {} interleaved rounds after a warm-up; throughput: wrk, 1 thread, 16 connections, {} s; latency: 8 connections paced to {} requests/s for {} s. Every request presents a different valid key drawn from the loaded set. Took {:.0} s.\n",
        if plan.rounds < 7 { " --quick" } else { "" },
        git_commit(),
        machine(),
        keyward_testkit::ENVOY_VERSION,
        plan.rounds,
        plan.throughput_secs,
        plan.moderate_rate,
        plan.latency_secs,
        took.as_secs_f64()
    );
    let _ = writeln!(r, "## Per request\n");
    let _ = writeln!(r, "Medians over rounds. Ratios are computed per round, then the median is taken: `/1` against no filter, `/2` against the no-op wasm floor. CPU is Envoy's only (the ext_authz server's own CPU is not counted).\n");
    let _ = writeln!(r, "| configuration | req/s | /1 | /2 | Envoy CPU µs/req | /1 | /2 | p50 µs | /1 | /2 | p99 µs | /1 | /2 |");
    let _ = writeln!(r, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let ratio = |i: usize, base: usize, f: fn(&Sample) -> f64| median(samples[i].iter().zip(&samples[base]).map(|(a, b)| f(a) / f(b)).collect());
    for (i, s) in subjects.iter().enumerate() {
        let m = |f: fn(&Sample) -> f64| median(samples[i].iter().map(f).collect());
        let rps: fn(&Sample) -> f64 = |x| x.rps;
        let cpu: fn(&Sample) -> f64 = |x| x.cpu_us;
        let p50: fn(&Sample) -> f64 = |x| x.p50_us;
        let p99: fn(&Sample) -> f64 = |x| x.p99_us;
        let _ = writeln!(
            r,
            "| {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} |",
            s.name,
            m(rps),
            ratio(i, 0, rps),
            ratio(i, 1, rps),
            m(cpu),
            ratio(i, 0, cpu),
            ratio(i, 1, cpu),
            m(p50),
            ratio(i, 0, p50),
            ratio(i, 1, p50),
            m(p99),
            ratio(i, 0, p99),
            ratio(i, 1, p99),
        );
    }
    let _ = writeln!(r, "\n## Scale\n");
    let _ = writeln!(r, "| keys in the snapshot | Envoy RSS, keyward.wasm, 1 worker (MiB) | keyward.wasm, 2 workers (MiB) | per extra worker (MiB) | libkeyward.so, 1 worker (MiB) |");
    let _ = writeln!(r, "|---|---|---|---|---|");
    for (n, c1, c2, native) in &scale.memory {
        let _ = writeln!(r, "| {n} | {c1:.1} | {c2:.1} | {:.1} | {native:.1} |", c2 - c1);
    }
    let _ = writeln!(r, "\n| shell | keys (incl. the agent's first key) | full snapshot applied in (ms, filter log) | `key import --batch` (s) |");
    let _ = writeln!(r, "|---|---|---|---|");
    for (shell, n, ms, import) in apply {
        let shell = if *shell == Shell::Native { "libkeyward.so" } else { "keyward.wasm" };
        let _ = writeln!(r, "| {shell} | {n} | {ms:.0} | {import:.1} |");
    }
    let _ = writeln!(r, "\n| shell | keys | one revocation to refusal at Envoy, median of 5 (ms) |");
    let _ = writeln!(r, "|---|---|---|");
    for (shell, n, ms) in propagation {
        let _ = writeln!(r, "| {shell} | {n} | {ms:.1} |");
    }
    let size = |f: &str| std::fs::metadata(keyward_testkit::workspace_root().join(f)).map(|m| m.len()).unwrap_or(0);
    let _ = writeln!(
        r,
        "\n`keyward.wasm`: {} bytes; `noop.wasm`: {} bytes; `libkeyward.so`: {} bytes. Envoy start to ready (one start each): no filter {:.2} s, no-op wasm {:.2} s, keyward.wasm (1,000 keys, before the snapshot) {:.2} s, libkeyward.so {:.2} s: the VM start (V8 compile and instantiate, per worker plus the main thread) is about the difference.",
        size("target/wasm32-wasip1/release/keyward.wasm"),
        size("target/wasm32-wasip1/release/noop.wasm"),
        size("target/native/libkeyward.so"),
        subjects[0].start_secs,
        subjects[1].start_secs,
        subjects[5].start_secs,
        subjects.get(8).map_or(f64::NAN, |s| s.start_secs)
    );
    r
}

pub(super) fn rate_error_section() -> String {
    let mut r = format!(
        "\n{RATE_HEADING}\n\nThe core's limiter (`keyward_core::ratelimit::admit`, {} slots: {} sub-windows per period, \
         burst = N) against the exact sliding-window answer (admit a request iff fewer than N were admitted in the \
         window of the limit's length that ends with it), over 200 windows of simulated arrivals per row \
         (deterministic; `cargo xtask bench --rate-error`). \"most in a window\" is the largest number admitted \
         in any window of the limit's length, over every window: never above N. The difference is under-admission: \
         a request counts until the last one of its sub-window is a period old.\n\n\
         | arrivals | limit | admitted, exact | admitted, keyward | difference | most in a window |\n|---|---|---:|---:|---:|---:|\n",
        keyward_core::ratelimit::SLOTS,
        keyward_core::ratelimit::SLOTS - 1
    );
    for (name, n, exact, ours, most) in rate_error_rows() {
        let unit = match n {
            10 => "10/s",
            60 => "60/min",
            _ => "1000/h",
        };
        let diff = (ours as f64 - exact as f64) / exact.max(1) as f64 * 100.0;
        let _ = writeln!(r, "| {name} | {unit} | {exact} | {ours} | {diff:+.1}% | {most} (N = {n}) |");
    }
    r
}

pub(super) fn instruction_report(counts: &[(String, f64)]) -> String {
    if counts.is_empty() {
        return String::new();
    }
    let row = |number: &str| counts.iter().find(|(n, _)| n.starts_with(number)).map_or(f64::NAN, |(_, v)| *v);
    // A direct-response row is set against the direct-response floor and no filter (12 and 13).
    let (floor, none) = (row("2 "), row("1 "));
    let (direct_floor, direct_none) = (row("13 "), row("12 "));
    let mut r = String::from(
        "\n## Instructions per request (callgrind)\n\nEnvoy `--concurrency 1` under `valgrind --tool=callgrind`, \
         instructions in user space over 2,000 keep-alive requests after a warm-up, less what the \
         same Envoy executes idle for as long (timers: keyward's 25 ms tick) (repeatable to 0.3% \
         here, whatever the machine's load; the kernel's share of a request, which CPU time includes, \
         is not counted, so these ratios are larger than the CPU-time ones). Keyward runs in feed \
         mode; with 1,000 keys every key is in each VM's record cache, with 100,000 keys cycled \
         in order none is. keyward native (libkeyward.so) reads the snapshot the module holds in \
         memory, with no cache and no hostcall. Rows 12 to 15 answer on a `direct_response` route \
         (Envoy replies itself, no upstream), set against rows 12 and 13.\n\n| configuration | instructions per request | vs no-op wasm | vs no filter |\n|---|---:|---:|---:|\n",
    );
    for (name, v) in counts {
        let (floor, none) = if name.ends_with("direct response") { (direct_floor, direct_none) } else { (floor, none) };
        let _ = writeln!(r, "| {name} | {v:.0} | {:.2}× | {:.2}× |", v / floor, v / none);
    }
    r
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']).to_string()).unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = mem.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok()).unwrap_or(0.0);
    // The machine's, not this process's: `bench` pins itself to one CPU.
    let cores = cpu.lines().filter(|l| l.starts_with("processor")).count();
    format!("{cores} × {model}, {:.0} GiB", total / 1_048_576.0)
}

pub(crate) fn git_commit() -> String {
    let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(keyward_testkit::workspace_root()).output();
    let dirty = Command::new("git").args(["status", "--porcelain", "--untracked-files=no"]).current_dir(keyward_testkit::workspace_root()).output();
    let rev = out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let dirty = dirty.map(|o| !o.stdout.is_empty()).unwrap_or(false);
    if dirty {
        format!("{rev} (with uncommitted changes)")
    } else {
        rev
    }
}

/// Writes a full run's `report` to `out`, keeping the soak's section (`cargo xtask soak`,
/// pasted below the marker) and whatever follows it.
pub(super) fn write_keeping_soak(out: &Path, report: String) -> Result {
    let kept = std::fs::read_to_string(out)
        .ok()
        .and_then(|old| old.find(SOAK_MARKER).map(|at| old[at..].to_string()))
        .unwrap_or_default();
    let report = if kept.is_empty() { report } else { format!("{}\n{kept}", report.trim_end()) };
    std::fs::write(out, &report).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(())
}

/// Writes the callgrind `section` over that section of `out` (or before the soak's), keeping
/// the rest of the file.
pub(super) fn write_instructions_section(out: &Path, section: &str) -> Result {
    let old = std::fs::read_to_string(out).unwrap_or_default();
    let start = old.find(INSTRUCTIONS_HEADING).map(|i| old[..i].trim_end().len()).unwrap_or(old.find(SOAK_MARKER).unwrap_or(old.len()));
    let end = old.find(SOAK_MARKER).unwrap_or(old.len()).max(start);
    let new = format!("{}\n\n{}\n\n{}", old[..start].trim_end(), section.trim(), &old[end..]);
    std::fs::write(out, new.trim_start()).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(())
}

/// Writes the rate-limit accuracy `section` over that section of `out` (or before the
/// callgrind table, or the soak's section), keeping the rest of the file.
pub(super) fn write_rate_error_section(out: &Path, section: &str) -> Result {
    let old = std::fs::read_to_string(out).unwrap_or_default();
    let new = match old.find(RATE_HEADING) {
        Some(start) => {
            let end = old[start + RATE_HEADING.len()..].find("\n## ").map_or(old.len(), |i| start + RATE_HEADING.len() + i);
            let end = old[start..end].find(SOAK_MARKER).map_or(end, |i| start + i);
            format!("{}\n\n{}\n\n{}", old[..start].trim_end(), section.trim(), old[end..].trim_start())
        }
        None => {
            let at = old.find(INSTRUCTIONS_HEADING).or_else(|| old.find(SOAK_MARKER)).unwrap_or(old.len());
            format!("{}\n\n{}\n\n{}", old[..at].trim_end(), section.trim(), &old[at..])
        }
    };
    std::fs::write(out, new.trim_start()).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(())
}
