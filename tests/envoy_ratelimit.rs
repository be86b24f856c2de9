//! Per-key rate limits against the real Envoy at --concurrency 2: one budget across workers,
//! Retry-After that works, shared agent budgets, rotation keeping the quota, flat memory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{assert_denied, record};
use keyward_testkit::{poll_until, request, Echo, Envoy, EnvoyOptions, Keyward, Response};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn inline(keys: Vec<Value>, extra: Value) -> (Envoy, Echo) {
    let mut config = json!({"snapshot": {"version": 1, "keys": keys}});
    if let (Some(c), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    let echo = Echo::start(0).unwrap();
    let envoy = Envoy::start(&EnvoyOptions::new(config, echo.port()));
    (envoy, echo)
}

fn get(envoy: &Envoy, key: &str) -> Response {
    envoy.get("/v1/x", &[("x-api-key", key.as_bytes())])
}

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(&format!("wasmcustom.keyward.{name}")).unwrap_or(0)
}

#[test]
fn a_20_per_second_key_driven_at_100_per_second_admits_about_20_a_second() {
    let key = "rate-test-key-20-per-second";
    let (envoy, _echo) = inline(vec![record(key, "key_rl", json!({"rate_limit": "20/s"}))], json!({}));
    let (ok, limited) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let before = envoy.worker_connections();
    let port = envoy.port;
    let started = Instant::now();
    // Ten clients, each a new connection every 100 ms: about 100 requests a second for 5 s.
    let clients: Vec<_> = (0..10)
        .map(|c| {
            let (ok, limited) = (Arc::clone(&ok), Arc::clone(&limited));
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(c * 10));
                let begin = Instant::now();
                for i in 0..50u32 {
                    let due = Duration::from_millis(u64::from(i) * 100);
                    if let Some(wait) = due.checked_sub(begin.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    let r = request(port, "GET", "/v1/x", &[("x-api-key", key.as_bytes())]).unwrap();
                    match r.status {
                        200 => ok.fetch_add(1, Ordering::Relaxed),
                        429 => limited.fetch_add(1, Ordering::Relaxed),
                        other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&r.body)),
                    };
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = envoy.worker_connections();
    let served: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let (ok, limited) = (ok.load(Ordering::Relaxed), limited.load(Ordering::Relaxed));
    poll_until(Duration::from_secs(5), "the counters to be flushed", || (stat(&envoy, "denied.rate_limited") == limited).then_some(()));
    let attempts: Vec<u64> = ["cas_attempts_1", "cas_attempts_2", "cas_attempts_3", "cas_attempts_4_or_more"].iter().map(|n| stat(&envoy, &format!("rate_limit.{n}"))).collect();
    eprintln!(
        "20/s key, {} requests in {elapsed:.2} s: {ok} admitted, {limited} limited; connections per worker {served:?}; CAS attempts 1/2/3/4+: {attempts:?}; contention fail-open: {}",
        ok + limited,
        stat(&envoy, "rate_limit.contention_allowed")
    );
    assert!(served.len() == 2 && served.iter().all(|&n| n > 50), "both workers must take part: {served:?}");
    // 20 at once, then never more than 20 in any second: at most 20 per started second. The
    // window counts conservatively (BENCHMARKS.md), so a little less than 20 a second may pass.
    // The clients aim at 5 s; on a loaded machine the run may last longer.
    let most = 20.0 * elapsed.ceil();
    let least = 20.0 * elapsed.floor() * 0.9;
    assert!((least..=most).contains(&(ok as f64)), "admitted {ok} over {elapsed:.2} s, expected {least}..={most}");
    assert_eq!(stat(&envoy, "denied.rate_limited"), limited);
}

/// Issue 12: `60/min` means 60 at once for an idle client, then a 429 whose Retry-After is
/// when the first of them leaves the minute; a burst lowers the first.
#[test]
fn sixty_a_minute_admits_sixty_at_once_then_429_until_the_minute_has_passed_issue_12() {
    let (full, limited, bursty, default_burst) = ("rate-test-60-min-0001", "rate-test-1-s-0001", "rate-test-burst-10-0001", "rate-test-default-burst-0001");
    let (envoy, _echo) = inline(
        vec![
            record(full, "key_60", json!({"rate_limit": "60/min"})),
            record(limited, "key_2s", json!({"rate_limit": "2/s"})),
            record(bursty, "key_b10", json!({"rate_limit": "60/min", "rate_burst": 10})),
        ],
        json!({}),
    );
    let before = envoy.worker_connections();
    let t0 = Instant::now();
    for i in 1..=60 {
        let r = get(&envoy, full);
        assert_eq!(r.status, 200, "request {i} of 60: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("ratelimit"), Some(format!("\"default\";r={};t=60", 60 - i).as_str()), "request {i}");
        assert_eq!(r.header("ratelimit-policy"), Some("\"default\";q=60;w=60"));
    }
    let served: Vec<u64> = envoy.worker_connections().iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(served.iter().filter(|&&n| n > 0).count() == 2, "both workers took part: {served:?}");
    let r = get(&envoy, full);
    assert_denied(&r, 429, "RATE_LIMITED", full.as_bytes(), "the 61st");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    let elapsed = t0.elapsed().as_secs();
    assert!((60u64.saturating_sub(elapsed + 1)..=60).contains(&retry), "Retry-After {retry} s, {elapsed} s after the first");
    assert_eq!(r.json()["error"]["details"]["retry_after_seconds"], retry);
    assert!(r.header("ratelimit").unwrap().starts_with("\"default\";r=0;t="), "{:?}", r.header("ratelimit"));

    // A burst of 10: ten at once, then one every second (60/min).
    for i in 1..=10 {
        assert_eq!(get(&envoy, bursty).status, 200, "burst request {i}");
    }
    let r = get(&envoy, bursty);
    assert_denied(&r, 429, "RATE_LIMITED", bursty.as_bytes(), "the 11th of a burst of 10");
    assert_eq!(r.header("retry-after"), Some("1"));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(get(&envoy, bursty).status, 200, "waiting Retry-After is enough");

    // Retry-After is enough, and exact: 2/s, two at once, then wait.
    assert_eq!(get(&envoy, limited).status, 200);
    assert_eq!(get(&envoy, limited).status, 200);
    let r = get(&envoy, limited);
    assert_denied(&r, 429, "RATE_LIMITED", limited.as_bytes(), "the third of 2/s");
    assert_eq!(r.header("retry-after"), Some("1"));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(get(&envoy, limited).status, 200, "waiting Retry-After seconds is enough");
    drop(envoy);

    // The configuration's rate_limit_burst applies to records without a burst of their own.
    let (envoy, _echo) = inline(vec![record(default_burst, "key_db", json!({"rate_limit": "60/min"}))], json!({"rate_limit_burst": 5}));
    let statuses: Vec<u16> = (0..6).map(|_| get(&envoy, default_burst).status).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
}

#[test]
fn retry_after_is_honoured_and_the_ratelimit_fields_are_sent() {
    let key = "rate-test-key-2-per-second";
    let (envoy, _echo) = inline(vec![record(key, "key_rl2", json!({"rate_limit": "2/s"}))], json!({}));
    let first = get(&envoy, key);
    assert_eq!(first.status, 200);
    assert_eq!(first.header("ratelimit-policy"), Some("\"default\";q=2;w=1"));
    let state = first.header("ratelimit").unwrap().to_string();
    assert!(state.starts_with("\"default\";r=") && state.contains(";t="), "{state}");
    let limited = poll_until(Duration::from_secs(5), "a 429", || {
        let r = get(&envoy, key);
        (r.status == 429).then_some(r)
    });
    assert_denied(&limited, 429, "RATE_LIMITED", key.as_bytes(), "over the limit");
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert_eq!(limited.json()["error"]["details"]["retry_after_seconds"], retry);
    assert_eq!(limited.header("ratelimit-policy"), Some("\"default\";q=2;w=1"));
    assert!(limited.header("ratelimit").unwrap().contains(";r=0;"), "{:?}", limited.header("ratelimit"));
    std::thread::sleep(Duration::from_secs(retry));
    assert_eq!(get(&envoy, key).status, 200, "waiting Retry-After seconds is enough");
    // Keys without a limit get no fields.
    let (plain, _echo2) = inline(vec![record("plain-key-without-limit", "key_plain", json!({}))], json!({}));
    assert!(get(&plain, "plain-key-without-limit").header("ratelimit").is_none());
}

#[test]
fn the_ratelimit_fields_can_be_hidden() {
    let key = "rate-test-key-hidden";
    let (envoy, _echo) = inline(vec![record(key, "key_h", json!({"rate_limit": "1/min"}))], json!({"rate_limit_headers": false}));
    let r = get(&envoy, key);
    assert_eq!(r.status, 200);
    assert!(r.header("ratelimit").is_none() && r.header("ratelimit-policy").is_none());
    let r = poll_until(Duration::from_secs(5), "a 429", || {
        let r = get(&envoy, key);
        (r.status == 429).then_some(r)
    });
    assert!(r.header("ratelimit").is_none() && r.header("retry-after").is_some());
}

#[test]
fn an_agent_limit_is_shared_and_a_rotation_keeps_the_budget() {
    let keyward = Keyward::start();
    let echo = Echo::start(0).unwrap();
    let config = json!({"control_plane": {"cluster": "keyward", "feed_wait_secs": 5}});
    let mut opts = EnvoyOptions::new(config, echo.port());
    opts.control_plane_port = Some(keyward.port);
    let envoy = Envoy::start(&opts);
    let json_out = |args: &[&str]| -> Value { serde_json::from_str(&keyward.cli(args)).unwrap() };
    // 6 a minute: six at once, then none until the minute has passed.
    let a = json_out(&["agent", "create", "team", "--scopes", "read:all", "--rate", "6/min", "--json"]);
    let b = json_out(&["key", "create", "--agent", "team", "--name", "second", "--json"]);
    let (a, b) = (a["secret"].as_str().unwrap().to_string(), b["secret"].as_str().unwrap().to_string());
    poll_until(Duration::from_secs(10), "the agent's first key", || (get(&envoy, &a).status == 200).then_some(()));
    for i in 2..=6 {
        assert_eq!(get(&envoy, &a).status, 200, "request {i} of the six");
    }
    assert_eq!(get(&envoy, &a).status, 429);
    // `b` was created after `a` and may arrive in a later feed answer: wait until it is known.
    let b_first = poll_until(Duration::from_secs(10), "the agent's second key to be known", || {
        let r = get(&envoy, &b);
        (r.code().as_deref() != Some("INVALID_API_KEY")).then_some(r)
    });
    assert_denied(&b_first, 429, "RATE_LIMITED", b.as_bytes(), "the second key draws on the same agent budget");

    // A key with its own limit, rotated: the new key continues the old key's budget.
    let c = json_out(&["key", "create", "--agent", "team", "--name", "own", "--rate", "6/min", "--json"]);
    let (c_id, c) = (c["key"]["id"].as_str().unwrap().to_string(), c["secret"].as_str().unwrap().to_string());
    poll_until(Duration::from_secs(10), "the own-limit key", || (get(&envoy, &c).status == 200).then_some(()));
    for i in 2..=6 {
        assert_eq!(get(&envoy, &c).status, 200, "request {i} of the six");
    }
    assert_eq!(get(&envoy, &c).status, 429);
    let rotated = json_out(&["key", "rotate", &c_id, "--grace", "1h", "--json"]);
    let d = rotated["new"]["secret"].as_str().unwrap().to_string();
    let first = poll_until(Duration::from_secs(10), "the rotated key to be known", || {
        let r = get(&envoy, &d);
        (r.code().as_deref() != Some("INVALID_API_KEY")).then_some(r)
    });
    assert_denied(&first, 429, "RATE_LIMITED", d.as_bytes(), "the new key continues the old budget");
    // A key created afresh with the same limit has a budget of its own.
    let e = json_out(&["key", "create", "--agent", "team", "--name", "fresh", "--rate", "6/min", "--json"]);
    let e = e["secret"].as_str().unwrap().to_string();
    poll_until(Duration::from_secs(10), "the fresh key", || (get(&envoy, &e).status == 200).then_some(()));
}

#[test]
fn rate_limit_state_does_not_grow_with_time() {
    let keys: Vec<String> = (0..3).map(|i| format!("rate-growth-key-{i}-0123456789")).collect();
    let records = keys.iter().enumerate().map(|(i, k)| record(k, &format!("key_g{i}"), json!({"rate_limit": "5/s"}))).collect();
    let (envoy, _echo) = inline(records, json!({}));
    let mut created = Vec::new();
    let mut heap = Vec::new();
    // Twelve one-second windows of steady traffic on three limited keys.
    for _ in 0..12 {
        let second = Instant::now();
        while second.elapsed() < Duration::from_secs(1) {
            for k in &keys {
                get(&envoy, k);
            }
        }
        created.push(stat(&envoy, "rate_limit.buckets_created"));
        heap.push(envoy.heap_allocated());
    }
    eprintln!("buckets created per second: {created:?}; heap allocated: {heap:?}");
    // Counters are flushed once a second, so the first sample may lag; after that, flat at 3.
    assert!(created.iter().all(|&n| n <= 3) && created[2..].iter().all(|&n| n == 3), "one shared-data entry per bucket, whatever the time: {created:?}");
}

#[test]
fn cas_retries_under_contention_stay_within_the_bound() {
    // A limit too high to bind: every request updates the bucket, from both workers at once.
    let key = "rate-contention-key-0123456789";
    let (envoy, _echo) = inline(vec![record(key, "key_c", json!({"rate_limit": "100000/s"}))], json!({}));
    let port = envoy.port;
    let clients: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..250 {
                    let r = request(port, "GET", "/v1/x", &[("x-api-key", key.as_bytes())]).unwrap();
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for c in clients {
        if c.join().is_err() {
            panic!("a client failed; Envoy log:\n{}", envoy.log().lines().filter(|l| !l.contains("server.cc")).collect::<Vec<_>>().join("\n"));
        }
    }
    let total = || ["cas_attempts_1", "cas_attempts_2", "cas_attempts_3", "cas_attempts_4_or_more"].iter().map(|n| stat(&envoy, &format!("rate_limit.{n}"))).sum::<u64>();
    poll_until(Duration::from_secs(5), "the counters to be flushed", || (total() == 2000).then_some(()));
    let attempts: Vec<u64> = ["cas_attempts_1", "cas_attempts_2", "cas_attempts_3", "cas_attempts_4_or_more"].iter().map(|n| stat(&envoy, &format!("rate_limit.{n}"))).collect();
    let contended = stat(&envoy, "rate_limit.contention_allowed");
    eprintln!("2000 requests from 8 clients on one bucket: CAS attempts 1/2/3/4+ = {attempts:?}, fail-open on contention: {contended}");
    assert_eq!(attempts.iter().sum::<u64>(), 2000);
    assert_eq!(contended, 0, "eight attempts were not enough");
}
