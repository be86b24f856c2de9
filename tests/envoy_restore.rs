//! A control plane whose store is restored or replaced, against the real Envoy (two workers) and
//! the real `keyward serve`: the keys the new store lacks must stop working, whatever its version.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::assert_denied;
use keyward_core::Digest;
use keyward_testkit::{poll_until, Echo, Envoy, EnvoyOptions, Keyward, TempDir};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const NODE: &str = "envoy-restore-test";

struct Stack {
    envoy: Envoy,
    keyward: Keyward,
    _echo: Echo,
}

impl Stack {
    /// `keyward serve` on a fresh store A, and an Envoy fed by it.
    fn start() -> Stack {
        let keyward = Keyward::start();
        let echo = Echo::start(0).unwrap();
        let config = json!({
            "rules": [{"scopes": ["read:all"]}],
            "control_plane": {"cluster": "keyward", "feed_wait_secs": 5, "usage_report_secs": 1}
        });
        let mut opts = EnvoyOptions::new(config, echo.port());
        opts.control_plane_port = Some(keyward.port);
        opts.node_id = NODE.into();
        let envoy = Envoy::start(&opts);
        assert_eq!(opts.concurrency, 2);
        Stack { envoy, keyward, _echo: echo }
    }

    fn get(&self, key: &str) -> keyward_testkit::Response {
        self.envoy.get("/v1/things", &[("x-api-key", key.as_bytes())])
    }

    /// Waits until `keyward status` shows this Envoy at the store's version: the fetcher asked
    /// again after applying it whole. Returns that version.
    fn wait_applied(&self) -> u64 {
        poll_until(Duration::from_secs(20), "the Envoy to apply the store's version", || {
            let status = self.keyward.api_get("/v1/status");
            let envoy = status["envoys"].as_array()?.iter().find(|e| e["id"] == NODE)?.clone();
            (envoy["applied_version"] == status["snapshot_version"]).then(|| status["snapshot_version"].as_u64()).flatten()
        })
    }

    fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.keyward.cli(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("keyward {args:?}: {e}: {out}"))
    }

    fn resets(&self) -> u64 {
        self.envoy.stat("wasmcustom.keyward.feed.resets").unwrap_or(0)
    }

    /// Store A: agent `a1` with K1 and K2, plus `extra` agents (each a change). Returns (K1, K2).
    fn store_a(&self, extra: usize) -> (String, String) {
        let k1 = self.cli_json(&["agent", "create", "a1", "--scopes", "read:all", "--json"])["secret"].as_str().unwrap().to_string();
        let k2 = self.cli_json(&["key", "create", "--agent", "a1", "--name", "second", "--json"])["secret"].as_str().unwrap().to_string();
        for i in 0..extra {
            self.keyward.cli(&["agent", "create", &format!("filler-a{i}"), "--scopes", "read:all"]);
        }
        (k1, k2)
    }

    /// Stops serve, builds store B in a new file (another store id) holding K2 (imported by
    /// digest) but not K1, with `extra` more changes and `bulk` more keys (one change), and
    /// serves it on the same port. Returns B's version.
    /// Store B's version before serve starts on it, and the version the Envoy then applied.
    fn replace_with_store_b(&mut self, dir: &TempDir, k2: &str, extra: usize, bulk: usize) -> (u64, u64) {
        self.keyward.kill9();
        self.keyward.set_db(&dir.path().join("restored.db"));
        self.keyward.cli(&["agent", "create", "a1", "--scopes", "read:all"]);
        self.keyward.cli(&["key", "import", "--agent", "a1", "--name", "second", "--digest", &Digest::of(k2.as_bytes()).to_hex()]);
        for i in 0..extra {
            self.keyward.cli(&["agent", "create", &format!("filler-b{i}"), "--scopes", "read:all"]);
        }
        if bulk > 0 {
            let lines: String = (0..bulk).map(|i| format!("sha256:{}\n", Digest::of(format!("bulk-{i}").as_bytes()).to_hex())).collect();
            self.keyward.cli_stdin(&["key", "import", "--agent", "a1", "--batch", "--name", "bulk"], &lines);
        }
        let status: serde_json::Value = serde_json::from_str(&self.keyward.cli(&["status", "--json"])).unwrap();
        let before = status["snapshot_version"].as_u64().unwrap();
        self.keyward.restart();
        (before, self.wait_applied())
    }
}

/// K1 is unknown (401 `INVALID_API_KEY`) and K2 works, on both workers, many times over.
fn assert_only_k2_works(stack: &Stack, k1: &str, k2: &str) {
    let before = stack.envoy.worker_connections();
    let mut served = Vec::new();
    for i in 0..400 {
        assert_denied(&stack.get(k1), 401, "INVALID_API_KEY", k1.as_bytes(), "a key the restored store lacks");
        let r = stack.get(k2);
        assert_eq!(r.status, 200, "a key the restored store has: {}", String::from_utf8_lossy(&r.body));
        let after = stack.envoy.worker_connections();
        assert_eq!(after.len(), 2, "expected two workers: {after:?}");
        served = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        if i >= 19 && served.iter().all(|&n| n >= 4) {
            return;
        }
    }
    panic!("both workers must be exercised, got {served:?} after 400 rounds");
}

fn applied_a(extra: usize) -> (Stack, String, String, u64) {
    let stack = Stack::start();
    let (k1, k2) = stack.store_a(extra);
    let version = stack.wait_applied();
    for _ in 0..10 {
        assert_eq!((stack.get(&k1).status, stack.get(&k2).status), (200, 200), "store A's keys work");
    }
    (stack, k1, k2, version)
}

/// Store B holds 6,000 more keys, so its reset spans two pages (5,000 records each at most);
/// K2, which both stores have, is accepted all along.
#[test]
fn a_restored_store_at_a_lower_version_leaves_no_key_it_lacks_working_on_any_worker() {
    let (mut stack, k1, k2, a_version) = applied_a(5);
    let dir = TempDir::new("restore").unwrap();
    let stop = AtomicBool::new(false);
    let b_version = std::thread::scope(|scope| {
        let (port, stop, key) = (stack.envoy.port, &stop, k2.as_bytes());
        let hammer = scope.spawn(move || {
            let mut refused = Vec::new();
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = keyward_testkit::request(port, "GET", "/v1/things", &[("x-api-key", key)]).unwrap();
                sent += 1;
                if r.status != 200 {
                    refused.push((r.status, String::from_utf8_lossy(&r.body).to_string()));
                }
            }
            (sent, refused)
        });
        let b_version = stack.replace_with_store_b(&dir, &k2, 0, 6_000);
        stop.store(true, Ordering::Relaxed);
        let (sent, refused) = hammer.join().unwrap();
        assert!(sent > 0 && refused.is_empty(), "K2 refused during the restore: {refused:?} of {sent}");
        eprintln!("K2: {sent} requests during the restore, every one accepted");
        b_version
    });
    let (b_version, applied) = b_version;
    assert!(b_version < a_version, "store B ({b_version}) is behind what the Envoy applied ({a_version})");
    assert!(applied > a_version, "versions only move forward for the Envoy: it applied {applied} after {a_version}");
    assert_only_k2_works(&stack, &k1, &k2);
    assert_eq!(stack.resets(), 1, "one reset");
    let log = stack.envoy.log();
    assert!(log.contains("snapshot feed: reset to store"), "the fetcher says so");
    assert!(log.contains("(more to come)"), "the reset took more than one page");
    assert!(stack.keyward.log().contains("feed reset"), "so does serve");
}

#[test]
fn another_store_at_a_higher_version_leaves_no_key_it_lacks_working_on_any_worker() {
    let (mut stack, k1, k2, a_version) = applied_a(0);
    let dir = TempDir::new("restore").unwrap();
    let (b_version, _) = stack.replace_with_store_b(&dir, &k2, a_version as usize + 3, 0);
    assert!(b_version > a_version, "store B ({b_version}) is past what the Envoy applied ({a_version}): only its id tells");
    assert_only_k2_works(&stack, &k1, &k2);
    assert_eq!(stack.resets(), 1, "one reset");
}

#[test]
fn the_same_store_restarted_sends_no_reset_and_its_keys_keep_working() {
    let (mut stack, k1, k2, a_version) = applied_a(2);
    stack.keyward.restart();
    // A change after the restart: the Envoy applied it through the same store, as a delta.
    let k3 = stack.cli_json(&["key", "create", "--agent", "a1", "--name", "third", "--json"])["secret"].as_str().unwrap().to_string();
    assert_eq!(stack.wait_applied(), a_version + 1);
    poll_until(Duration::from_secs(5), "the new key", || (stack.get(&k3).status == 200).then_some(()));
    for _ in 0..20 {
        assert_eq!((stack.get(&k1).status, stack.get(&k2).status), (200, 200));
    }
    assert_eq!(stack.resets(), 0, "no reset counted");
    assert!(!stack.envoy.log().contains("snapshot feed: reset"), "no reset logged");
    assert!(!stack.keyward.log().contains("feed reset"), "serve sent none");
    let applied: Vec<String> = stack.envoy.log().lines().filter_map(|l| l.split("snapshot feed: applied ").nth(1)).map(str::to_string).collect();
    assert_eq!(applied.last().map(String::as_str), Some(format!("1 records, version {}", a_version + 1).as_str()), "a delta, not the snapshot: {applied:?}");
}
