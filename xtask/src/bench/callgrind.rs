//! `cargo xtask bench --instructions` and the last table of a full run: instructions Envoy
//! executes per request, counted by valgrind's callgrind.

use super::subjects::{bootstrap, keyward_in};
use crate::Result;
use keyward_testkit::{listener_bootstrap, loopback_cluster, named_wasm_filter, poll_until, request, Envoy, EnvoyOptions, Keyward, Shell, TempDir};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The callgrind table's configurations: no filter, the no-op floor, and keyward fed 1,000 and
/// 100,000 keys by `sets` (each a serve and the keys it holds; the first five may be revoked),
/// and 1,000 keys with a per-key limit never reached (`rated`: the rate-limit path, admitted);
/// then no filter, the floor and both shells on 100,000 keys again on a direct-response route.
pub(super) fn instructions_table(up_port: u16, noop: &Path, sets: [(&Keyward, &Vec<String>); 2], rated: (&Keyward, &Vec<String>)) -> Result<Vec<(String, f64)>> {
    eprintln!("bench: instructions per request (callgrind)");
    let feed_in = |shell: Shell, serve: &Keyward| {
        let config = json!({"control_plane": {"cluster": "keyward", "feed_wait_secs": 15}});
        bootstrap("bench-cg", vec![keyward_in(shell, &config)], vec![loopback_cluster("upstream", up_port), loopback_cluster("keyward", serve.port)])
    };
    let feed = |serve: &Keyward| feed_in(Shell::Wasm, serve);
    let small = sets[0].1;
    let mut configs = vec![
        ("1 no auth filter".to_string(), bootstrap("cg", vec![], vec![loopback_cluster("upstream", up_port)]), small[5..].to_vec()),
        ("2 no-op wasm (floor)".to_string(), bootstrap("cg", vec![named_wasm_filter("noop", noop, &json!({}))], vec![loopback_cluster("upstream", up_port)]), small[5..].to_vec()),
    ];
    for (i, (serve, set)) in sets.into_iter().enumerate() {
        // The propagation measurement revoked the first ten keys of each set (five per shell).
        configs.push((format!("{} keyward, {} keys", 6 + i, set.len()), feed(serve), set[10..].to_vec()));
    }
    configs.push((format!("9 keyward, {} keys, rate-limited", rated.1.len()), feed(rated.0), rated.1[5..].to_vec()));
    // The native shell on the same serves.
    for (i, (serve, set)) in sets.into_iter().enumerate() {
        configs.push((format!("{} keyward native, {} keys", 10 + i, set.len()), feed_in(Shell::Native, serve), set[10..].to_vec()));
    }
    // The same filters on a route Envoy answers itself (`direct_response`, 200): no upstream
    // connection, so a filter's share of a request shows against a smaller whole.
    let direct = |node: &str, filters: Vec<Value>, clusters: Vec<Value>| {
        let routes = json!([{"name": "bench", "match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]);
        listener_bootstrap(node, routes, filters, clusters)
    };
    let direct_feed = |shell: Shell, serve: &Keyward| {
        let config = json!({"control_plane": {"cluster": "keyward", "feed_wait_secs": 15}});
        direct("bench-cg-direct", vec![keyward_in(shell, &config)], vec![loopback_cluster("keyward", serve.port)])
    };
    let (mid_serve, mid) = sets[1];
    configs.push(("12 no auth filter, direct response".to_string(), direct("cg-direct", vec![], vec![]), small[5..].to_vec()));
    configs.push(("13 no-op wasm, direct response".to_string(), direct("cg-direct", vec![named_wasm_filter("noop", noop, &json!({}))], vec![]), small[5..].to_vec()));
    configs.push((format!("14 keyward, {} keys, direct response", mid.len()), direct_feed(Shell::Wasm, mid_serve), mid[10..].to_vec()));
    configs.push((format!("15 keyward native, {} keys, direct response", mid.len()), direct_feed(Shell::Native, mid_serve), mid[10..].to_vec()));
    instruction_counts(configs)
}

/// Requests measured per configuration under callgrind.
const CG_REQUESTS: usize = 2_000;

/// Sends `n` keep-alive GETs, each with the next key, and checks each answer is 200.
fn keepalive_requests(port: u16, keys: &[String], n: usize) -> Result {
    use std::io::{BufRead, BufReader, Read, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    for i in 0..n {
        let key = &keys[i % keys.len()];
        write!(writer, "GET /bench HTTP/1.1\r\nhost: bench\r\nx-api-key: {key}\r\n\r\n")?;
        let mut status = String::new();
        reader.read_line(&mut status)?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        if !status.contains(" 200 ") {
            return Err(format!("request {i}: {}", status.trim()).into());
        }
    }
    Ok(())
}

/// Instructions Envoy executes per request (all threads, user space), counted by callgrind over
/// `CG_REQUESTS` keep-alive requests after a warm-up: deterministic to well under 1% on a noisy
/// machine, where CPU time swings tenfold. It leaves out the kernel (sockets), which CPU time
/// includes, so its ratios are larger than CPU-time ratios.
///
/// For investigations: `KEYWARD_BENCH_CG_ONLY=6,7` measures only those rows, and
/// `KEYWARD_BENCH_CG_KEEP=DIR` keeps each row's callgrind dumps there for `callgrind_annotate`.
fn instruction_counts(configs: Vec<(String, Value, Vec<String>)>) -> Result<Vec<(String, f64)>> {
    let only: Option<Vec<String>> = std::env::var("KEYWARD_BENCH_CG_ONLY").ok().map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let keep = std::env::var_os("KEYWARD_BENCH_CG_KEEP").map(std::path::PathBuf::from);
    let mut out = Vec::new();
    for (name, boot, keys) in configs {
        if only.as_ref().is_some_and(|only| !only.iter().any(|row| name.split(' ').next() == Some(row.as_str()))) {
            continue;
        }
        let dir = TempDir::new("callgrind")?;
        let file = dir.path().join("cg.out");
        let mut opts = EnvoyOptions::new(json!({}), 0);
        opts.bootstrap = Some(boot);
        opts.concurrency = 1;
        opts.pin_cpus = Some("0".into());
        opts.wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--smc-check=all-non-file"].map(String::from).to_vec();
        opts.wrapper.push(format!("--callgrind-out-file={}", file.display()));
        let envoy = Envoy::try_start(&opts).map_err(|f| format!("{name} under valgrind did not start: {}", f.log))?;
        // The whole snapshot, not just its first pages (a key on a page already written is
        // served before the last one is in): a key never issued is no longer 503.
        poll_until(Duration::from_secs(900), "the keys under callgrind", || {
            let status = |key: &[u8]| request(envoy.port, "GET", "/bench", &[("x-api-key", key)]).ok().map(|r| r.status);
            (status(keys[0].as_bytes())? == 200 && status(b"bench-never-issued-key")? != 503).then_some(())
        });
        keepalive_requests(envoy.port, &keys, 300)?;
        let pid = envoy.pid().to_string();
        let control = |args: &[&str]| -> Result {
            let out = Command::new("callgrind_control").args(args).arg(&pid).output().map_err(|e| format!("callgrind_control: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("callgrind_control {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into())
            }
        };
        let dumped = |n: u32| -> u64 {
            let text = std::fs::read_to_string(format!("{}.{n}", file.display())).unwrap_or_default();
            text.lines().filter_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:"))).filter_map(|v| v.trim().parse().ok()).max().unwrap_or(0)
        };
        // Phase 1: the requests. Phase 2: as long again with no requests, to subtract what the
        // timers cost meanwhile (under valgrind a request takes ~50× longer, so a filter's
        // periodic work would otherwise be charged to its requests ~50× over).
        control(&["-i", "on"])?;
        let t = Instant::now();
        keepalive_requests(envoy.port, &keys, CG_REQUESTS)?;
        let busy_secs = t.elapsed().as_secs_f64();
        control(&["-i", "off"])?;
        control(&["-d"])?;
        control(&["-i", "on"])?;
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(busy_secs.max(2.0)));
        let idle_secs = t.elapsed().as_secs_f64();
        control(&["-i", "off"])?;
        control(&["-d"])?;
        std::thread::sleep(Duration::from_secs(1));
        let (busy, idle) = (dumped(1), dumped(2));
        if let Some(keep) = &keep {
            std::fs::create_dir_all(keep)?;
            for n in [1, 2] {
                let row = name.split(' ').next().unwrap_or("row");
                std::fs::copy(format!("{}.{n}", file.display()), keep.join(format!("cg.{row}.{n}")))?;
            }
        }
        if busy == 0 {
            return Err(format!("{name}: callgrind counted nothing").into());
        }
        let total = (busy as f64 - idle as f64 / idle_secs * busy_secs).max(0.0);
        eprintln!("bench: {name}: {busy} instructions in {busy_secs:.1} s of requests, {idle} in {idle_secs:.1} s idle");
        let per = total / CG_REQUESTS as f64;
        eprintln!("bench: {name}: {per:.0} instructions per request");
        out.push((name, per));
        drop(envoy);
    }
    Ok(out)
}
