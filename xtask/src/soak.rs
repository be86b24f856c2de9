//! `cargo xtask soak --minutes N`: sustained load through Envoy (`--concurrency 2`, the release
//! keyward.wasm fed by a release `keyward serve`) while keys are created, revoked and rotated
//! continuously. Samples Envoy's RSS, its heap (`/memory`) and the filter's own
//! `keyward.vm_memory_bytes` (the sum of every VM's linear memory) over time, checks on the way
//! that revocations and new keys take effect, and says whether memory stayed flat once warm.

use crate::Result;
use crate::bench::{control_plane, keys};
use crate::wrk::{Load, Summary, Wrk};
use keyward_testkit::{request, send_raw, Echo, Envoy, EnvoyOptions, Keyward, TempDir, ADMIN_TOKEN};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Options {
    pub minutes: f64,
    pub out: PathBuf,
    /// libkeyward.so instead of keyward.wasm (the testkit starts the shell `KEYWARD_SHELL` names).
    pub native: bool,
}

struct Sample {
    at_secs: f64,
    rss_mib: f64,
    heap_mib: f64,
    vm_mib: f64,
    requests: u64,
    churn: u64,
}

fn post(port: u16, path: &str, body: &Value) -> Result<Value> {
    let text = body.to_string();
    let raw = format!(
        "POST {path} HTTP/1.1\r\nhost: keyward\r\nconnection: close\r\nauthorization: Bearer {ADMIN_TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
        text.len()
    );
    let r = send_raw(port, raw.as_bytes()).map_err(|e| format!("POST {path}: {e}"))?;
    if r.status >= 300 {
        return Err(format!("POST {path}: {} {}", r.status, String::from_utf8_lossy(&r.body)).into());
    }
    Ok(r.json())
}

/// Keys churn: create, check it opens, rotate it (short grace), revoke the old one, check it is
/// refused. Returns the number of admin operations.
fn churn(serve_port: u16, envoy_port: u16, stop: &AtomicBool, ops: &AtomicU64, errors: &AtomicU64) {
    let mut n = 0u64;
    let wait_status = |key: &str, want: u16| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if request(envoy_port, "GET", "/soak", &[("x-api-key", key.as_bytes())]).is_ok_and(|r| r.status == want) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let step = || -> Result<bool> {
            let created = post(serve_port, "/v1/keys", &json!({"agent": "churn", "name": format!("k{n}")}))?;
            let (id, secret) = (created["key"]["id"].as_str().unwrap_or(""), created["secret"].as_str().unwrap_or(""));
            let mut ok = wait_status(secret, 200);
            let rotated = post(serve_port, &format!("/v1/keys/{id}/rotate"), &json!({"grace": "1s"}))?;
            let (new_id, new_secret) = (rotated["new"]["key"]["id"].as_str().unwrap_or(""), rotated["new"]["secret"].as_str().unwrap_or(""));
            ok &= wait_status(new_secret, 200);
            post(serve_port, &format!("/v1/keys/{new_id}/revoke"), &json!({}))?;
            ok &= wait_status(new_secret, 401);
            Ok(ok)
        };
        match step() {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        ops.fetch_add(3, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn run(opts: &Options) -> Result {
    let total = Duration::from_secs_f64(opts.minutes * 60.0);
    let interval = Duration::from_secs_f64((total.as_secs_f64() / 30.0).clamp(2.0, 60.0));
    let dir = TempDir::new("soak")?;
    let load_keys = keys(1_000, "soak");
    let (serve, _ids): (Keyward, Vec<String>) = control_plane(&load_keys, None)?;
    serve.cli(&["agent", "create", "churn", "--scopes", "read:all"]);
    let keys_file = dir.path().join("load.keys");
    std::fs::write(&keys_file, load_keys.iter().map(|k| format!("{k}\n")).collect::<String>())?;
    let echo = Echo::start(0)?;
    let config = json!({
        "rules": [{"methods": ["GET"], "scopes": ["read:all"]}],
        "control_plane": {"cluster": "keyward", "feed_wait_secs": 15, "usage_report_secs": 5}
    });
    let mut eo = EnvoyOptions::new(config, echo.port());
    eo.concurrency = 2;
    eo.control_plane_port = Some(serve.port);
    eo.node_id = "soak".into();
    let envoy = Envoy::try_start(&eo).map_err(|f| format!("Envoy did not start: {}", f.log))?;
    // Wait for the first snapshot.
    let start = Instant::now();
    while request(envoy.port, "GET", "/soak", &[("x-api-key", load_keys[0].as_bytes())]).map(|r| r.status).unwrap_or(0) != 200 {
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!("the snapshot never arrived:\n{}", envoy.log()).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    eprintln!("xtask: soak for {:.1} min, sampling every {:.0} s", opts.minutes, interval.as_secs_f64());
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let churn_errors = Arc::new(AtomicU64::new(0));
    let churner = {
        let (stop, ops, errors) = (Arc::clone(&stop), Arc::clone(&ops), Arc::clone(&churn_errors));
        let (sp, ep) = (serve.port, envoy.port);
        std::thread::spawn(move || churn(sp, ep, &stop, &ops, &errors))
    };
    let load = Wrk::new(dir.path())?.start(&Load {
        port: envoy.port,
        path: "/soak",
        keys: &keys_file,
        threads: 2,
        connections: 16,
        secs: total.as_secs().max(1),
        delay_ms: None,
        cpus: None,
    })?;
    let began = Instant::now();
    let mut samples = Vec::new();
    let sample = |envoy: &Envoy| Sample {
        at_secs: began.elapsed().as_secs_f64(),
        rss_mib: envoy.rss_bytes() as f64 / 1048576.0,
        heap_mib: envoy.heap_allocated() as f64 / 1048576.0,
        vm_mib: envoy.stat("wasmcustom.keyward.vm_memory_bytes").unwrap_or(0) as f64 / 1048576.0,
        requests: envoy.stat("wasmcustom.keyward.allowed").unwrap_or(0),
        churn: ops.load(Ordering::Relaxed),
    };
    samples.push(sample(&envoy));
    while began.elapsed() < total {
        std::thread::sleep(interval.min(total.saturating_sub(began.elapsed())).max(Duration::from_millis(100)));
        let s = sample(&envoy);
        eprintln!(
            "xtask: soak {:>6.0} s  RSS {:>7.1} MiB  heap {:>6.1} MiB  wasm {:>6.1} MiB  allowed {:>9}  churn ops {}",
            s.at_secs, s.rss_mib, s.heap_mib, s.vm_mib, s.requests, s.churn
        );
        samples.push(s);
    }
    stop.store(true, Ordering::Relaxed);
    // A summary wrk failed to print leaves its figures unknown, not the soak's report unwritten.
    let summary = load.finish().inspect_err(|e| eprintln!("xtask: soak: no summary from wrk: {e}")).ok();
    let _ = churner.join();
    let report = report(opts, &samples, summary.as_ref(), churn_errors.load(Ordering::Relaxed), &envoy);
    std::fs::write(&opts.out, &report).map_err(|e| format!("{}: {e}", opts.out.display()))?;
    println!("{report}");
    eprintln!("xtask: wrote {}", opts.out.display());
    drop(echo);
    Ok(())
}

fn report(opts: &Options, samples: &[Sample], wrk: Option<&Summary>, churn_errors: u64, envoy: &Envoy) -> String {
    let mut r = String::new();
    let (flag, module) = if opts.native { (" --native", "libkeyward.so (the native shell)") } else { ("", "keyward.wasm") };
    let _ = writeln!(r, "## Soak: {:.0} minutes (`cargo xtask soak --minutes {}{flag}`)\n", opts.minutes, opts.minutes);
    let _ = writeln!(
        r,
        "Envoy 1.40 `--concurrency 2`, release {module} fed by a release `keyward serve`; wrk (2 threads, 16 connections) \
         over 1,000 keys; a churn loop creates a key, waits for it to open, rotates it, waits for the new key, revokes it and \
         waits for the refusal, every ~0.1 s. Machine: {}, commit {}.\n",
        crate::bench::machine(),
        crate::bench::git_commit()
    );
    let _ = writeln!(r, "| time (s) | Envoy RSS (MiB) | Envoy heap (MiB) | wasm linear memory, all VMs (MiB; none in the native shell) | requests allowed | churn ops |");
    let _ = writeln!(r, "|---:|---:|---:|---:|---:|---:|");
    for s in samples {
        let _ = writeln!(r, "| {:.0} | {:.1} | {:.1} | {:.1} | {} | {} |", s.at_secs, s.rss_mib, s.heap_mib, s.vm_mib, s.requests, s.churn);
    }
    let log = envoy.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("][warning]") || l.contains("][error]") || l.contains("][critical]")).collect();
    let mut seen: Vec<String> = Vec::new();
    for w in &warnings {
        // The message without its timestamp and thread id.
        let msg = w.splitn(4, "] ").nth(3).unwrap_or(w).to_string();
        if !seen.contains(&msg) && seen.len() < 5 {
            seen.push(msg);
        }
    }
    let distinct: String = seen.iter().map(|m| format!("\n- `{m}`")).collect();
    let warm = samples.len() / 3;
    if let (Some(w), Some(last)) = (samples.get(warm), samples.last()) {
        let grew = |a: f64, b: f64| if a > 0.0 { (b - a) / a * 100.0 } else { 0.0 };
        let vm_flat = last.vm_mib <= w.vm_mib;
        let _ = writeln!(
            r,
            "\nFrom warm (t = {:.0} s) to the end: RSS {:.1} -> {:.1} MiB ({:+.1}%), heap {:.1} -> {:.1} MiB ({:+.1}%), \
             wasm memory {:.1} -> {:.1} MiB ({}). Keys created meanwhile (2 per churn cycle of 3 ops): {}, so the heap grew \
             {:.0} bytes per key created: the snapshot has no delete (shared data, or the native shell's map), so each key ever issued keeps a small entry. wrk: {} requests, {} non-2xx, {} socket errors. Churn checks failed: {churn_errors}. \
             Envoy log lines at warning or above: {}.{}",
            w.at_secs,
            w.rss_mib,
            last.rss_mib,
            grew(w.rss_mib, last.rss_mib),
            w.heap_mib,
            last.heap_mib,
            grew(w.heap_mib, last.heap_mib),
            w.vm_mib,
            last.vm_mib,
            if vm_flat { "flat" } else { "GREW" },
            (last.churn - w.churn) * 2 / 3,
            (last.heap_mib - w.heap_mib) * 1048576.0 / (((last.churn - w.churn) * 2 / 3).max(1) as f64),
            known(wrk, |w| w.requests),
            known(wrk, |w| w.non2xx),
            known(wrk, |w| w.errors),
            warnings.len(),
            distinct
        );
    }
    r
}

/// One of wrk's figures, or "?" when wrk printed no summary.
fn known(wrk: Option<&Summary>, figure: fn(&Summary) -> u64) -> String {
    wrk.map_or_else(|| "?".to_string(), |w| figure(w).to_string())
}
