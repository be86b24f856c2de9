//! Fleet rate limits, the control plane's side, against the real `keyward serve` and a real
//! `redis-server` (testkit's `Redis`; `cargo xtask test` provides REDIS_SERVER_BIN): fake Envoys
//! post rate reports to `POST /v1/feed/rates` as the filter's fetcher does, with no Envoy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use keyward_testkit::{keyward_bin, poll_until, request, Keyward, Redis, ADMIN_TOKEN};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A bucket as the filter reports it: (name, count, period_secs, admitted).
type B<'a> = (&'a str, u32, u32, u64);

/// Posts `envoy`'s rate report; the answer and how long it took.
fn report(k: &Keyward, envoy: &str, buckets: &[B<'_>]) -> (Value, Duration) {
    let buckets: Vec<Value> =
        buckets.iter().map(|(b, count, period, admitted)| json!({"bucket": b, "count": count, "period_secs": period, "admitted": admitted})).collect();
    let started = Instant::now();
    let resp = k.feed_post("/v1/feed/rates", &json!({"envoy": envoy, "buckets": buckets}));
    let took = started.elapsed();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    (resp.json(), took)
}

/// What the other Envoys admitted in each bucket, from a global answer.
fn others(answer: &Value) -> Vec<u64> {
    assert_eq!(answer["mode"], "global", "{answer}");
    answer["buckets"].as_array().unwrap().iter().map(|b| b["others"].as_u64().unwrap()).collect()
}

/// An Envoy's feed request (no wait): it is connected for 2 s after the answer.
fn feed(k: &Keyward, envoy: &str) {
    let resp = request(k.port, "GET", &format!("/v1/feed?envoy={envoy}&since=0"), &[]).unwrap();
    assert_eq!(resp.status, 200);
}

fn metrics(k: &Keyward) -> String {
    String::from_utf8(request(k.port, "GET", "/metrics", &[]).unwrap().body).unwrap()
}

/// The value of the metric line `name` (with its labels), if present.
fn metric(k: &Keyward, name: &str) -> Option<f64> {
    metrics(k).lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// `keyward status` through the admin API (`--url`), with `args`.
fn remote_status(k: &Keyward, args: &[&str]) -> String {
    let out = std::process::Command::new(keyward_bin())
        .args(["--url", &k.url(), "status"])
        .args(args)
        .env("KEYWARD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env_remove("KEYWARD_DB")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `status --json`'s `rate_limits`, from the CLI on the store and through the API, once both
/// satisfy `want` (the replica writes its view every 2 s).
fn rate_limits_when(k: &Keyward, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let local = poll_until(Duration::from_secs(8), what, || {
        let v: Value = serde_json::from_str(&k.cli(&["status", "--json"])).unwrap();
        want(&v["rate_limits"]).then(|| v["rate_limits"].clone())
    });
    let remote: Value = serde_json::from_str(&remote_status(k, &["--json"])).unwrap();
    assert!(want(&remote["rate_limits"]), "{what}: through the API: {}", remote["rate_limits"]);
    local
}

#[test]
fn without_a_rate_store_reports_are_split_across_the_connected_envoys() {
    let k = Keyward::start();
    let (a, _) = report(&k, "edge-1", &[("k:key_a", 50, 1, 10)]);
    assert_eq!(a, json!({"mode": "split", "envoys": 1, "buckets": []}), "the reporting Envoy counts itself");
    // An Envoy heard on the feed counts, as `keyward status` counts it.
    feed(&k, "edge-2");
    assert_eq!(report(&k, "edge-1", &[]).0["envoys"], 2);
    assert_eq!(report(&k, "edge-3", &[("a:agt_x", 10, 60, 1)]).0, json!({"mode": "split", "envoys": 3, "buckets": []}));
    let rl = rate_limits_when(&k, "status to say split across 3", |r| r["mode"] == "split" && r["envoys"] == 3);
    assert!(rl.get("store").is_none() && rl.get("healthy").is_none(), "{rl}");
    for text in [k.cli(&["status"]), remote_status(&k, &[])] {
        assert!(text.contains("rate limits:      split across 3 Envoys (no --rate-store)"), "{text}");
    }
    // Envoys that go quiet leave the fleet within a few seconds: the share grows back.
    let alone = poll_until(Duration::from_secs(6), "edge-2 and edge-3 to leave the fleet", || {
        let (a, _) = report(&k, "edge-1", &[]);
        (a["envoys"] == 1).then_some(a)
    });
    assert_eq!(alone["mode"], "split");
    let m = metrics(&k);
    assert!(metric(&k, r#"keyward_rate_reports_total{mode="split"}"#).unwrap() >= 4.0, "{m}");
    assert!(!m.contains("keyward_rate_store_up"), "no rate store, no rate store series: {m}");
}

#[test]
fn global_counts_sum_the_other_envoys_and_exclude_the_reporter_s_own() {
    let redis = Redis::start();
    let k = Keyward::start_with(&["--rate-store", &redis.url()], &[]);
    let b = |admitted| [("k:key_g", 1000, 60, admitted)];
    assert_eq!(others(&report(&k, "edge-1", &b(10)).0), [0]);
    assert_eq!(others(&report(&k, "edge-2", &b(5)).0), [10]);
    let (a, _) = report(&k, "edge-3", &b(7));
    assert_eq!((others(&a), &a["envoys"]), (vec![15], &json!(3)));
    assert_eq!(others(&report(&k, "edge-1", &b(0)).0), [12], "edge-1's own 10 are not others'");
    assert_eq!(others(&report(&k, "edge-2", &b(0)).0), [17]);
    assert_eq!(others(&report(&k, "edge-1", &b(3)).0), [12]);
    // Several buckets in one report, answered in order, each on its own count.
    let (a, _) = report(&k, "edge-2", &[("a:agt_1", 100, 60, 4), ("k:key_g", 1000, 60, 0), ("k:key_new", 5, 1, 0)]);
    assert_eq!(others(&a), [0, 20, 0]);
    assert_eq!(a["buckets"][0]["bucket"], "a:agt_1");
    assert_eq!(others(&report(&k, "edge-1", &[("a:agt_1", 100, 60, 0)]).0), [4]);
    // The counts live in Redis: one hash per bucket and sub-window (a tenth of the period),
    // kept for the period and two sub-windows.
    // (The reports may straddle two sub-windows: the fields are summed over the bucket's keys.)
    let keys = redis.command(&["KEYS", "kwrl:{k:key_g}:6000:*"]).unwrap();
    let mut sums = std::collections::BTreeMap::<String, u64>::new();
    for key in keys.as_array().unwrap().iter().map(|k| k.as_str().unwrap()) {
        let ttl = redis.command(&["PTTL", key]).unwrap().as_i64().unwrap();
        assert!(ttl > 60_000 && ttl <= 72_000, "{key}: PTTL {ttl}");
        let hash = redis.command(&["HGETALL", key]).unwrap();
        for pair in hash.as_array().unwrap().chunks(2) {
            *sums.entry(pair[0].as_str().unwrap().into()).or_default() += pair[1].as_str().unwrap().parse::<u64>().unwrap();
        }
    }
    let want: std::collections::BTreeMap<String, u64> = [("_total", 25), ("e:edge-1", 13), ("e:edge-2", 5), ("e:edge-3", 7)].map(|(f, n)| (f.to_string(), n)).into();
    assert_eq!(sums, want);
    assert!(redis.command(&["KEYS", "kwrl:{k:key_new}:*"]).unwrap().as_array().unwrap().is_empty(), "a bucket nobody used writes nothing");
    // keyward status, on the store and through the API: global, healthy, the hot buckets.
    let rl = rate_limits_when(&k, "status to show the hot buckets", |r| r["hot"].as_array().is_some_and(|h| h.len() == 2));
    assert_eq!((&rl["mode"], &rl["healthy"], &rl["store"]), (&json!("global"), &json!(true), &json!(redis.url())), "{rl}");
    assert_eq!(rl["hot"][0], json!({"bucket": "k:key_g", "used": 25, "count": 1000, "period_secs": 60}));
    assert_eq!(rl["hot"][1], json!({"bucket": "a:agt_1", "used": 4, "count": 100, "period_secs": 60}));
    for text in [k.cli(&["status"]), remote_status(&k, &[])] {
        assert!(text.contains(&format!("rate limits:      global via Redis {}, healthy since ", redis.url())), "{text}");
        let row = text.lines().find(|l| l.starts_with("k:key_g")).unwrap_or_else(|| panic!("no hot bucket row in {text}"));
        assert_eq!(row.split_whitespace().collect::<Vec<_>>(), ["k:key_g", "25", "1000/min", "2%"], "{text}");
    }
    let m = metrics(&k);
    assert_eq!(metric(&k, "keyward_rate_store_up"), Some(1.0), "{m}");
    assert_eq!(metric(&k, r#"keyward_rate_reports_total{mode="global"}"#), Some(8.0), "{m}");
    assert_eq!(metric(&k, "keyward_rate_store_failures_total"), Some(0.0), "{m}");
}

#[test]
fn a_bucket_s_counts_age_out_after_its_period() {
    let redis = Redis::start();
    let k = Keyward::start_with(&["--rate-store", &redis.url()], &[]);
    let added = Instant::now();
    report(&k, "edge-1", &[("k:key_age", 50, 1, 10)]);
    assert_eq!(others(&report(&k, "edge-2", &[("k:key_age", 50, 1, 0)]).0), [10]);
    // The window is the last eleven sub-windows of 100 ms: the 10 leave it 1 to 1.1 s after
    // they were added (never early; up to one sub-window late: conservative).
    poll_until(Duration::from_secs(3), "edge-1's 10 to age out", || (others(&report(&k, "edge-2", &[("k:key_age", 50, 1, 0)]).0) == [0]).then_some(()));
    let aged = added.elapsed();
    // (The upper bound leaves room for a loaded machine's slow answers.)
    assert!(aged >= Duration::from_millis(1_000) && aged < Duration::from_millis(3_000), "aged out after {aged:?}");
    // A minute's bucket still holds what a second's has forgotten.
    report(&k, "edge-1", &[("k:key_min", 50, 60, 10)]);
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(others(&report(&k, "edge-2", &[("k:key_min", 50, 60, 0)]).0), [10]);
}

#[test]
fn a_killed_redis_is_answered_split_within_the_bound_and_global_again_after_restart() {
    let mut redis = Redis::start();
    let k = Keyward::start_with(&["--rate-store", &redis.url()], &[]);
    feed(&k, "edge-2");
    assert_eq!(others(&report(&k, "edge-1", &[("k:key_k", 100, 60, 10)]).0), [0]);
    redis.kill();
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let (a, took) = report(&k, "edge-1", &[("k:key_k", 100, 60, 1)]);
        assert_eq!((&a["mode"], &a["buckets"]), (&json!("split"), &json!([])), "{a}");
        assert!(a["envoys"].as_u64().unwrap() >= 1);
        slowest = slowest.max(took);
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("Redis killed: slowest answer {slowest:?}");
    assert!(slowest < Duration::from_millis(1_000), "a report waited {slowest:?} on a dead Redis");
    assert!(metric(&k, "keyward_rate_store_failures_total").unwrap() >= 10.0, "{}", metrics(&k));
    assert_eq!(metric(&k, "keyward_rate_store_up"), Some(0.0));
    let rl = rate_limits_when(&k, "status to say Redis is unreachable", |r| r["healthy"] == false);
    assert_eq!(rl["mode"], "split");
    let text = k.cli(&["status"]);
    let line = text.lines().find(|l| l.starts_with("rate limits:")).unwrap_or_default();
    assert!(line.starts_with("rate limits:      split across ") && line.contains(&format!(": Redis {} UNREACHABLE since ", redis.url())), "{text}");
    // Back: global again within the back-off (2 s at most), from an empty Redis.
    redis.restart();
    let back = Instant::now();
    let a = poll_until(Duration::from_secs(5), "global mode after Redis restarts", || {
        let (a, _) = report(&k, "edge-2", &[("k:key_k", 100, 60, 2)]);
        (a["mode"] == "global").then_some(a)
    });
    eprintln!("Redis restarted: global again after {:?}", back.elapsed());
    assert_eq!(others(&a), [0], "a restarted Redis starts empty");
    assert_eq!(others(&report(&k, "edge-1", &[("k:key_k", 100, 60, 0)]).0), [2]);
    rate_limits_when(&k, "status to say Redis is healthy again", |r| r["healthy"] == true && r["mode"] == "global");
    assert_eq!(metric(&k, "keyward_rate_store_up"), Some(1.0));
    let log = k.log();
    let warnings = log.lines().filter(|l| l.contains("the rate store failed")).count();
    assert!((1..=2).contains(&warnings), "a failing rate store is logged once per 10 s, not per report:\n{log}");
}

#[test]
fn a_hung_redis_is_answered_split_within_the_bound() {
    let redis = Redis::start();
    let k = Keyward::start_with(&["--rate-store", &redis.url()], &[]);
    assert_eq!(others(&report(&k, "edge-1", &[("k:key_h", 100, 60, 10)]).0), [0]);
    // SIGSTOP: connections open and accepted by the kernel, nothing answered.
    redis.pause();
    let mut times = Vec::new();
    for _ in 0..12 {
        let (a, took) = report(&k, "edge-1", &[("k:key_h", 100, 60, 1)]);
        assert_eq!(a["mode"], "split", "{a}");
        times.push(took);
        std::thread::sleep(Duration::from_millis(100));
    }
    let slowest = *times.iter().max().unwrap();
    eprintln!("Redis hung (SIGSTOP): answers took {times:?}");
    assert!(slowest < Duration::from_millis(1_000), "a report waited {slowest:?} on a hung Redis");
    redis.resume();
    poll_until(Duration::from_secs(5), "global mode after Redis resumes", || (report(&k, "edge-2", &[]).0["mode"] == "global").then_some(()));
}

#[test]
fn a_busy_store_does_not_hold_a_rate_report_up() {
    let redis = Redis::start();
    let k = Keyward::start_with(&["--rate-store", &redis.url()], &[]);
    feed(&k, "edge-2");
    assert_eq!(report(&k, "edge-1", &[]).0["envoys"], 2);
    // Another writer holds the SQLite file's write lock (for up to serve's 5 s busy timeout):
    // writing a new Envoy as seen waits for it, the answer does not.
    let holder = rusqlite::Connection::open(k.db()).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (a, took) = report(&k, "edge-3", &[("k:key_b", 10, 1, 1)]);
    assert!(took < Duration::from_millis(1_000), "a report waited {took:?} on a busy store");
    assert_eq!((&a["mode"], &a["envoys"]), (&json!("global"), &json!(2)), "counted in Redis, with the last fleet size read: {a}");
    holder.execute_batch("ROLLBACK").unwrap();
    poll_until(Duration::from_secs(8), "edge-3 to be seen once the store is free", || {
        feed(&k, "edge-2");
        (report(&k, "edge-3", &[]).0["envoys"] == 3).then_some(())
    });
}

#[test]
fn reports_that_name_nothing_sensible_are_refused_with_the_field() {
    let k = Keyward::start();
    let post = |body: &Value| {
        let resp = k.feed_post("/v1/feed/rates", body);
        (resp.status, resp.json())
    };
    let bucket = |name: &str, count: u32, period: u32| json!({"bucket": name, "count": count, "period_secs": period, "admitted": 1});
    for (body, field) in [
        (json!({"envoy": "refused", "buckets": [bucket("k:a", 10, 0)]}), "period_secs"),
        (json!({"envoy": "refused", "buckets": [bucket("k:a", 0, 1)]}), "count"),
        (json!({"envoy": "refused", "buckets": [bucket(&"k".repeat(201), 10, 1)]}), "bucket"),
        (json!({"envoy": "refused", "buckets": [bucket("", 10, 1)]}), "bucket"),
        (json!({"envoy": "", "buckets": []}), "envoy"),
        (json!({"envoy": "refused", "buckets": vec![bucket("k:a", 10, 1); 2_001]}), "buckets"),
        (json!({"buckets": []}), "request"),
        (json!({"envoy": "refused", "buckets": [], "extra": 1}), "request"),
    ] {
        let (status, v) = post(&body);
        assert_eq!((status, v["error"]["code"].as_str(), v["error"]["details"]["field"].as_str()), (400, Some("VALIDATION_ERROR"), Some(field)), "{v}");
    }
    let (_, v) = post(&json!({"envoy": "refused", "buckets": [bucket("k:a", 10, 1), bucket("a:agt_z", 10, 0)]}));
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("buckets[1].period_secs") && message.contains("a:agt_z"), "{message}");
    let (_, v) = post(&json!({"envoy": "refused", "buckets": vec![bucket("k:a", 10, 1); 2_001]}));
    assert!(v["error"]["message"].as_str().unwrap().contains("at most 2000 buckets"), "{v}");
    // 2,000 buckets pass; a body over 1 MiB does not.
    assert_eq!(post(&json!({"envoy": "e1", "buckets": vec![bucket("k:a", 10, 1); 2_000]})).0, 200);
    let (status, v) = post(&json!({"envoy": "refused", "buckets": vec![bucket(&"k".repeat(200), 10, 1); 5_000]}));
    assert_eq!((status, v["error"]["code"].as_str()), (413, Some("PAYLOAD_TOO_LARGE")), "{v}");
    // A refused report counts for nothing: its Envoy was never seen.
    let status: Value = serde_json::from_str(&k.cli(&["status", "--json"])).unwrap();
    let seen: Vec<&str> = status["envoys"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(seen, ["e1"]);
}

#[test]
fn a_rate_store_that_is_not_redis_is_refused_at_start_and_its_password_never_shows() {
    let dir = common::Dir::new("rates-url");
    for url in ["rediss://:s3cret@127.0.0.1:6379", "unix:///tmp/redis.sock", "127.0.0.1:6379"] {
        let out = common::bin()
            .args(["serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(dir.db())
            .env("KEYWARD_RATE_STORE", url)
            .env("KEYWARD_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("--rate-store") && stderr.contains("redis://host:port"), "{url}: {stderr}");
        assert!(!stderr.contains("s3cret"), "{stderr}");
    }
    // A Redis refusing the password is unreachable: split, and shown without the password.
    let redis = Redis::start();
    let url = redis.url().replace("redis://", "redis://:s3cret@");
    let k = Keyward::start_with(&[], &[("KEYWARD_RATE_STORE", &url)]);
    let (a, _) = report(&k, "edge-1", &[("k:key_p", 10, 1, 1)]);
    assert_eq!(a["mode"], "split", "{a}");
    let rl = rate_limits_when(&k, "status to say the store is unreachable", |r| r["healthy"] == false);
    assert_eq!(rl["store"], redis.url().replace("redis://", "redis://:***@"));
    for text in [k.cli(&["status", "--json"]), k.cli(&["status"]), remote_status(&k, &[]), metrics(&k), k.log()] {
        assert!(!text.contains("s3cret"), "{text}");
    }
    // An empty KEYWARD_RATE_STORE is unset.
    let k = Keyward::start_with(&[], &[("KEYWARD_RATE_STORE", "")]);
    assert_eq!(report(&k, "edge-1", &[]).0["mode"], "split");
}

/// Two replicas on one PostgreSQL and one Redis: the Envoys of both are one fleet, their
/// counts one count, and `keyward status` merges what both replicas say.
#[test]
fn replicas_on_postgres_share_the_fleet_and_the_counts() {
    let pg = common::postgres_database("rates");
    let redis = Redis::start();
    let a = Keyward::start_replica_with(&pg, "kw-a", &["--rate-store", &redis.url()], &[]);
    let b = Keyward::start_replica_with(&pg, "kw-b", &["--rate-store", &redis.url()], &[]);
    assert_eq!(others(&report(&a, "edge-1", &[("k:key_r", 100, 60, 6)]).0), [0]);
    let (ans, _) = report(&b, "edge-2", &[("k:key_r", 100, 60, 4)]);
    assert_eq!((others(&ans), &ans["envoys"]), (vec![6], &json!(2)));
    assert_eq!(others(&report(&a, "edge-1", &[("k:key_r", 100, 60, 0)]).0), [4]);
    let rl = rate_limits_when(&a, "status to merge both replicas", |r| r["mode"] == "global" && r["hot"][0]["used"] == 10);
    assert_eq!(rl["store"], redis.url());
    let status: Value = serde_json::from_str(&a.cli(&["status", "--json"])).unwrap();
    let replicas: Vec<&str> = status["replicas"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(replicas, ["kw-a", "kw-b"]);
}

/// Latency of one report against a local Redis, by its size: printed (`--nocapture`), and at
/// each size the median report answered `global` within the bound (a loaded machine may push
/// one past it, into `split`).
#[test]
fn report_latency_by_size_stays_within_the_bound() {
    let redis = Redis::start();
    let k = Keyward::start_with(&["--rate-store", &redis.url()], &[]);
    let names: Vec<String> = (0..2_000).map(|i| format!("k:key_{i:04}")).collect();
    for size in [1usize, 100, 2_000] {
        let buckets: Vec<B<'_>> = names[..size].iter().map(|n| (n.as_str(), 100, 60, 1)).collect();
        let (mut times, mut global) = (Vec::new(), 0);
        for i in 0..9 {
            let (a, took) = report(&k, &format!("edge-{}", i % 3), &buckets);
            if a["mode"] == "global" {
                assert_eq!(a["buckets"].as_array().map(Vec::len), Some(size), "{a}");
                global += 1;
            }
            times.push(took);
        }
        times.sort();
        eprintln!("rate report of {size} buckets: median {:?} (min {:?}, max {:?}), {global} of 9 global", times[4], times[0], times[8]);
        assert!(global >= 5, "{size} buckets: only {global} of 9 reports were counted in Redis in time");
        assert!(times[4] < Duration::from_millis(400), "{size} buckets: median {:?}", times[4]);
    }
}
