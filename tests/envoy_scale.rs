//! A full snapshot of 100,000 keys through the real feed into a real Envoy: how long it takes to
//! apply, and what it costs in memory, against the same Envoy with no keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use keyward_testkit::{poll_until, Echo, Envoy, EnvoyOptions, Keyward};
use serde_json::json;
use std::time::{Duration, Instant};

const KEYS: usize = 100_000;

fn envoy_for(keyward: &Keyward, echo: &Echo, node: &str) -> Envoy {
    let config = json!({"control_plane": {"cluster": "keyward", "feed_wait_secs": 5}});
    let mut opts = EnvoyOptions::new(config, echo.port());
    opts.control_plane_port = Some(keyward.port);
    opts.node_id = node.into();
    Envoy::start(&opts)
}

fn wait_applied(keyward: &Keyward, node: &str, timeout: Duration) {
    poll_until(timeout, "the full snapshot to be applied", || {
        let status = keyward.api_get("/v1/status");
        let e = status["envoys"].as_array()?.iter().find(|e| e["id"] == node)?.clone();
        (e["applied_version"] == status["snapshot_version"]).then_some(())
    });
}

#[test]
fn a_full_snapshot_of_100k_keys_is_applied_and_its_memory_measured() {
    let keyward = Keyward::start();
    let echo = Echo::start(0).unwrap();
    keyward.cli(&["agent", "create", "bulk", "--scopes", "read:all"]);

    // Baseline: the same Envoy with the one Production key.
    let empty = envoy_for(&keyward, &echo, "envoy-empty");
    wait_applied(&keyward, "envoy-empty", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let (rss0, heap0) = (empty.rss_bytes(), empty.heap_allocated());
    drop(empty);

    let lines: String = (0..KEYS).map(|i| format!("scale-test-key-{i:08}-0123456789\n")).collect();
    let started = Instant::now();
    keyward.cli_stdin(&["key", "import", "--agent", "bulk", "--batch"], &lines);
    eprintln!("imported {KEYS} keys in one change in {:.2} s", started.elapsed().as_secs_f64());

    let t0 = Instant::now();
    let full = envoy_for(&keyward, &echo, "envoy-full");
    let ready = t0.elapsed();
    wait_applied(&keyward, "envoy-full", Duration::from_secs(120));
    let applied = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let (rss1, heap1) = (full.rss_bytes(), full.heap_allocated());
    let log = full.log();
    let reported = log.lines().find_map(|l| l.split("full snapshot version ").nth(1)).unwrap_or("(not logged)").to_string();
    // Every key is there: the first, the last, and one in the middle.
    for i in [0, KEYS / 2, KEYS - 1] {
        let key = format!("scale-test-key-{i:08}-0123456789");
        assert_eq!(full.get("/v1/x", &[("x-api-key", key.as_bytes())]).status, 200, "{key}");
    }
    assert_eq!(full.get("/v1/x", &[("x-api-key", b"scale-test-key-99999999-0123456789")]).status, 401);
    eprintln!(
        "full snapshot of {} keys: Envoy ready {:.2} s after start, applied (status) {:.2} s after start; filter log: {reported}",
        KEYS + 1,
        ready.as_secs_f64(),
        applied.as_secs_f64()
    );
    eprintln!(
        "memory: RSS {:.1} MiB with 1 key, {:.1} MiB with {} keys (+{:.0} bytes/key); heap allocated {:.1} -> {:.1} MiB",
        rss0 as f64 / 1048576.0,
        rss1 as f64 / 1048576.0,
        KEYS + 1,
        (rss1 as f64 - rss0 as f64) / KEYS as f64,
        heap0 as f64 / 1048576.0,
        heap1 as f64 / 1048576.0
    );
    assert!(rss1 > rss0, "the keys must cost something");
}
