//! Two `keyward serve` replicas on one real PostgreSQL, behind a real Envoy (two workers) whose
//! feed cluster lists both: a change through either replica is enforced at once, the Envoy moves
//! to the survivor when its replica dies, and concurrent writers on both never share or skip a
//! version. Needs `KEYWARD_TEST_POSTGRES` (`cargo xtask test` starts a throwaway server).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyward_testkit::{poll_until, Echo, Envoy, EnvoyOptions, Keyward};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const NODE: &str = "envoy-replicas-test";

struct Stack {
    envoy: Envoy,
    replicas: Vec<Keyward>,
    _echo: Echo,
}

fn start(tag: &str) -> Stack {
    let url = keyward_testkit::postgres::fresh_database(tag).unwrap_or_else(|e| panic!("{e}"));
    let replicas = vec![Keyward::start_replica(&url, "a"), Keyward::start_replica(&url, "b")];
    let echo = Echo::start(0).unwrap();
    let config = json!({
        "rules": [{"methods": ["GET"], "scopes": ["read:all"]}],
        "control_plane": {"cluster": "keyward", "feed_wait_secs": 5, "usage_report_secs": 1}
    });
    let mut opts = EnvoyOptions::new(config, echo.port());
    opts.control_plane_replicas = replicas.iter().map(|r| r.port).collect();
    opts.node_id = NODE.into();
    opts.concurrency = 2;
    let envoy = Envoy::start(&opts);
    let stack = Stack { envoy, replicas, _echo: echo };
    stack.holder();
    stack
}

impl Stack {
    fn get(&self, key: &str) -> u16 {
        self.envoy.get("/v1/things", &[("x-api-key", key.as_bytes())]).status
    }

    /// The index of the replica holding the Envoy's feed now, once it has applied the store.
    fn holder(&self) -> usize {
        poll_until(Duration::from_secs(20), "the Envoy to apply the store through a replica", || {
            let alive = self.replicas.iter().find(|r| r.is_running())?;
            let status = alive.api_get("/v1/status");
            let e = status["envoys"].as_array()?.iter().find(|e| e["id"] == NODE)?.clone();
            if e["applied_version"] != status["snapshot_version"] || e["state"] != "connected" {
                return None;
            }
            let name = e["replica"].as_str()?;
            self.replicas.iter().position(|r| r.replica() == Some(name) && r.is_running())
        })
    }
}

fn created(v: &Value) -> (String, String) {
    (v["key"]["id"].as_str().unwrap().to_string(), v["secret"].as_str().unwrap().to_string())
}

/// Waits for `status` on `key` through the Envoy, returning how long it took.
fn until_status(stack: &Stack, key: &str, status: u16, within: Duration) -> Duration {
    let start = Instant::now();
    poll_until(within, &format!("{status} for the key through Envoy"), || (stack.get(key) == status).then_some(()));
    start.elapsed()
}

#[test]
fn a_change_through_one_replica_is_enforced_by_an_envoy_fed_by_the_other_within_a_second() {
    let stack = start("replicas_change");
    let holder = stack.holder();
    let other = &stack.replicas[1 - holder];
    let started = Instant::now();
    let agent = other.api_post("/v1/agents?wait=false", &json!({"name": "demo", "scopes": ["read:all"]}));
    let (id, secret) = created(&agent);
    let took = until_status(&stack, &secret, 200, Duration::from_secs(1));
    eprintln!("created through replica {} (the Envoy's feed is on {}): 200 after {:.0} ms", 1 - holder, holder, took.as_secs_f64() * 1e3);
    assert!(started.elapsed() < Duration::from_secs(2));
    let revoked = other.api_post(&format!("/v1/keys/{id}/revoke?wait=false"), &json!({}));
    assert_eq!(revoked["status"], "revoked", "{revoked}");
    let took = until_status(&stack, &secret, 401, Duration::from_secs(1));
    eprintln!("revoked through the other replica: 401 after {:.0} ms", took.as_secs_f64() * 1e3);
    // The status reads the same on both replicas, and names a replica for the Envoy's feed (the
    // round-robin cluster sends each long-poll to either, so which one may change between reads).
    let (a, b) = (stack.replicas[0].api_get("/v1/status"), stack.replicas[1].api_get("/v1/status"));
    assert_eq!(a["snapshot_version"], b["snapshot_version"]);
    assert_eq!(a["envoys"][0]["id"], b["envoys"][0]["id"]);
    for status in [&a, &b] {
        assert!(["a", "b"].contains(&status["envoys"][0]["replica"].as_str().unwrap_or("")), "{status}");
    }
    let names: Vec<&str> = a["replicas"].as_array().unwrap().iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    // A change that waits for the Envoys is applied by the time it answers, through either.
    let waited = other.api_post("/v1/agents", &json!({"name": "waited", "scopes": ["read:all"]}));
    assert_eq!(waited["applied"]["envoys"], 1, "{waited}");
    assert_eq!(waited["applied"]["pending"].as_array().map(Vec::len), Some(0), "{waited}");
    assert_eq!(stack.get(waited["secret"].as_str().unwrap()), 200);
}

#[test]
fn killing_the_replica_holding_the_feed_moves_the_envoy_to_the_other_and_loses_no_change() {
    let mut stack = start("replicas_failover");
    let holder = stack.holder();
    let survivor = 1 - holder;
    // Changes acknowledged just before the kill, through the replica about to die.
    let before = stack.replicas[holder].api_post("/v1/agents?wait=false", &json!({"name": "before", "scopes": ["read:all"]}));
    let (_, before_secret) = created(&before);
    stack.replicas[holder].kill9();
    let killed = Instant::now();
    let after = stack.replicas[survivor].api_post("/v1/agents?wait=false", &json!({"name": "after", "scopes": ["read:all"]}));
    let (_, after_secret) = created(&after);
    let took = until_status(&stack, &after_secret, 200, Duration::from_secs(15));
    eprintln!("replica {holder} killed: a change through replica {survivor} enforced after {:.0} ms", killed.elapsed().as_secs_f64() * 1e3);
    let _ = took;
    assert_eq!(stack.get(&before_secret), 200, "the change acknowledged before the kill is kept");
    assert_eq!(stack.holder(), survivor, "the survivor holds the feed now");
    poll_until(Duration::from_secs(10), "the dead replica to drop from status", || {
        let status = stack.replicas[survivor].api_get("/v1/status");
        (status["replicas"].as_array()?.len() == 1).then_some(())
    });
}

/// Four writers, two on each replica, 2,000 changes in all: versions strictly increasing per
/// writer and gap-free overall, the audit log complete, every acknowledged change present.
#[test]
fn concurrent_writers_across_both_replicas_never_share_or_skip_a_version() {
    let stack = start("replicas_writers");
    let start_version = stack.replicas[0].api_get("/v1/status")["snapshot_version"].as_u64().unwrap();
    stack.replicas[0].api_post("/v1/agents?wait=false", &json!({"name": "shared", "scopes": ["read:all"]}));
    const PER_WRITER: usize = 500;
    let results: Vec<Vec<(u64, String)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|w| {
                let replica = &stack.replicas[w % 2];
                scope.spawn(move || {
                    let mut mine = Vec::with_capacity(PER_WRITER);
                    for i in 0..PER_WRITER {
                        let r = replica.api_post("/v1/keys?wait=false", &json!({"agent": "shared", "name": format!("w{w}-{i}")}));
                        let version = r["applied"]["version"].as_u64().unwrap_or_else(|| panic!("writer {w}, change {i}: {r}"));
                        mine.push((version, r["key"]["id"].as_str().unwrap().to_string()));
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all = Vec::new();
    for mine in &results {
        assert!(mine.windows(2).all(|w| w[0].0 < w[1].0), "a writer saw its versions go backwards");
        all.extend(mine.iter().map(|m| m.0));
    }
    all.sort_unstable();
    let first = start_version + 2;
    assert_eq!(all, (first..first + 2000).collect::<Vec<_>>(), "versions shared or skipped");
    let status = stack.replicas[1].api_get("/v1/status");
    assert_eq!(status["snapshot_version"].as_u64(), Some(first + 1999));
    let audit = stack.replicas[1].api_get("/v1/audit?limit=10000");
    let versions: Vec<u64> = audit.as_array().unwrap().iter().filter_map(|e| e["version"].as_u64()).collect();
    assert_eq!(versions, (1..=first + 1999).collect::<Vec<_>>(), "the audit log is complete and in order");
    let keys = stack.replicas[0].api_get("/v1/keys?agent=shared");
    let present: std::collections::HashSet<&str> = keys.as_array().unwrap().iter().filter_map(|k| k["id"].as_str()).collect();
    for (_, id) in results.iter().flatten() {
        assert!(present.contains(id.as_str()), "acknowledged key {id} is missing");
    }
}

/// Wrong tokens count across replicas: ten in all, spread over both, block the address on both,
/// and the right token is refused there too until the window ends.
#[test]
fn wrong_tokens_are_counted_across_replicas() {
    let url = keyward_testkit::postgres::fresh_database("replicas_guard").unwrap_or_else(|e| panic!("{e}"));
    let replicas = [Keyward::start_replica(&url, "a"), Keyward::start_replica(&url, "b")];
    let wrong = [("authorization", b"Bearer not-the-admin-token-000000".as_slice())];
    for i in 0..10 {
        let r = keyward_testkit::request(replicas[i % 2].port, "GET", "/v1/agents", &wrong).unwrap();
        assert_eq!(r.status, 401, "attempt {i}");
    }
    let right = format!("Bearer {}", keyward_testkit::ADMIN_TOKEN);
    for (i, replica) in replicas.iter().enumerate() {
        let blocked = poll_until(Duration::from_secs(2), "the address to be blocked on every replica", || {
            let r = keyward_testkit::request(replica.port, "GET", "/v1/agents", &[("authorization", right.as_bytes())]).unwrap();
            (r.status == 429).then_some(r)
        });
        assert!(blocked.header("retry-after").is_some(), "replica {i}: 429 without Retry-After");
    }
}

/// An Envoy ahead of a PostgreSQL store (restored from a dump without `rekey`): the replica
/// moves the store past it, answers the whole snapshot, and keeps serving.
#[test]
fn a_feed_request_ahead_of_a_postgres_store_moves_it_forward_and_the_replica_keeps_serving() {
    let url = keyward_testkit::postgres::fresh_database("replicas_ahead").unwrap_or_else(|e| panic!("{e}"));
    let replica = Keyward::start_replica(&url, "a");
    replica.api_post("/v1/agents?wait=false", &json!({"name": "demo", "scopes": ["read:all"]}));
    let r = keyward_testkit::request(replica.port, "GET", "/v1/feed?since=40&store=&envoy=ahead", &[]).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let page = r.json();
    assert_eq!((page["version"].as_u64(), page["reset"].as_bool()), (Some(41), Some(true)), "{page}");
    assert_eq!(page["keys"].as_array().map(Vec::len), Some(1), "{page}");
    for path in ["/readyz", "/v1/status"] {
        let auth = format!("Bearer {}", keyward_testkit::ADMIN_TOKEN);
        let r = keyward_testkit::request(replica.port, "GET", path, &[("authorization", auth.as_bytes())]).unwrap();
        assert_eq!(r.status, 200, "{path} after the advance: {}", String::from_utf8_lossy(&r.body));
    }
    let created = replica.api_post("/v1/agents?wait=false", &json!({"name": "after", "scopes": ["read:all"]}));
    assert_eq!(created["applied"]["version"].as_u64(), Some(42), "{created}");
}
