//! The store under a crash, and what it keeps: SIGKILL mid-burst loses nothing acknowledged;
//! no full key is ever written to the database, the logs or the audit log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use keyward_control::store::Store;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "durability-admin-token-0123456789";

fn post(url: &str, path: &str, body: serde_json::Value) -> Result<serde_json::Value, String> {
    ureq::post(&format!("{url}{path}"))
        .set("authorization", &format!("Bearer {TOKEN}"))
        .timeout(Duration::from_secs(10))
        .send_json(body)
        .map_err(|e| e.to_string())?
        .into_json()
        .map_err(|e| e.to_string())
}

#[test]
fn sigkill_mid_burst_loses_no_acknowledged_creation() {
    let dir = Dir::new("sigkill");
    let mut server = Server::start(&dir, Some(TOKEN), &[]);
    post(&server.url, "/v1/agents", json!({"name": "burst", "scopes": ["read:all"]})).unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (url, acked) = (server.url.clone(), Arc::clone(&acked));
            std::thread::spawn(move || {
                for i in 0..250 {
                    match post(&url, "/v1/keys", json!({"agent": "burst", "name": format!("k-{w}-{i}")})) {
                        Ok(v) => acked.lock().unwrap().push(v["key"]["id"].as_str().unwrap().to_string()),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.lock().unwrap().len() < 300 {
        assert!(Instant::now() < deadline, "the burst is too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.kill9();
    for w in workers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() < 1000, "the kill landed after the burst; nothing was tested");

    let mut store = Store::open(&dir.db()).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    assert_eq!(store.schema_version().unwrap(), keyward_control::store::SCHEMA_VERSION as i64);
    let present: std::collections::HashSet<String> = store.list_keys(Some("burst")).unwrap().into_iter().map(|k| k.id).collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !present.contains(*id)).collect();
    assert!(lost.is_empty(), "{} acknowledged creations lost: {lost:?}", lost.len());
    // Versions strictly increase, one per change, and the store's version is the last one.
    let audit = store.audit(10_000).unwrap();
    assert_eq!(audit.len(), present.len(), "one audit entry per creation (the Production key has none of its own)");
    assert!(audit.windows(2).all(|w| w[0].version < w[1].version && w[0].seq < w[1].seq));
    assert_eq!(store.snapshot_version().unwrap(), audit.last().unwrap().version);
    drop(store);

    // And the service comes back on the same file.
    let server = Server::start(&dir, Some(TOKEN), &[]);
    let after = post(&server.url, "/v1/keys", json!({"agent": "burst", "name": "after-restart"})).unwrap();
    assert_eq!(after["key"]["status"], "active");
    eprintln!("acknowledged before SIGKILL: {}, present after restart: {}", acked.len(), present.len());
}

#[test]
fn no_full_key_reaches_the_database_the_logs_or_the_audit_log() {
    let dir = Dir::new("secrets");
    let server = Server::start(&dir, Some(TOKEN), &[("KEYWARD_LOG", "trace")]);
    let mut secrets = Vec::new();
    let created = post(&server.url, "/v1/agents", json!({"name": "api-agent", "scopes": ["read:all"]})).unwrap();
    secrets.push(created["secret"].as_str().unwrap().to_string());
    for i in 0..5 {
        let k = post(&server.url, "/v1/keys", json!({"agent": "api-agent", "name": format!("k{i}")})).unwrap();
        secrets.push(k["secret"].as_str().unwrap().to_string());
    }
    let id = post(&server.url, "/v1/keys", json!({"agent": "api-agent", "name": "rot"})).unwrap();
    secrets.push(id["secret"].as_str().unwrap().to_string());
    let rotated = post(&server.url, &format!("/v1/keys/{}/rotate", id["key"]["id"].as_str().unwrap()), json!({})).unwrap();
    secrets.push(rotated["new"]["secret"].as_str().unwrap().to_string());
    let imported_secret = "imported-legacy-key-0123456789abcdef";
    post(&server.url, "/v1/keys/import", json!({"agent": "api-agent", "name": "legacy", "secret": imported_secret})).unwrap();
    secrets.push(imported_secret.to_string());
    // The CLI, straight to the file.
    let out = kw_in(&dir.0, &["--db", dir.db().to_str().unwrap(), "key", "create", "--agent", "api-agent", "--name", "cli", "--json"], None).ok();
    secrets.push(out.json()["secret"].as_str().unwrap().to_string());

    let mut haystacks: Vec<(String, Vec<u8>)> = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", dir.db().display());
        if let Ok(bytes) = std::fs::read(&path) {
            haystacks.push((path, bytes));
        }
    }
    haystacks.push(("serve log (trace)".into(), server.log().into_bytes()));
    let db = dir.db();
    let db = db.to_str().unwrap();
    for args in [&["--db", db, "audit", "--json"][..], &["--db", db, "key", "list", "--json"], &["--db", db, "agent", "show", "api-agent"], &["--db", db, "snapshot"]] {
        let out = kw_in(&dir.0, args, None).ok();
        haystacks.push((format!("keyward {}", args[2..].join(" ")), format!("{}{}", out.stdout, out.stderr).into_bytes()));
    }
    assert!(server.log().contains("TRACE") || server.log().contains("DEBUG"), "the server did not log at trace level");
    for secret in &secrets {
        for (name, bytes) in &haystacks {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "a full key appears in {name}");
        }
        // Its digest is what the store holds.
        let digest = keyward_core::Digest::of(secret.as_bytes()).to_hex();
        let stored = haystacks.iter().take_while(|(n, _)| n.contains("keyward.db")).any(|(_, b)| b.windows(64).any(|w| w == digest.as_bytes()));
        assert!(stored, "the digest of a key is not in the database files");
    }
}

#[test]
fn ten_thousand_keys_are_created_through_the_api_and_all_listed() {
    let dir = Dir::new("10k");
    let server = Server::start(&dir, Some(TOKEN), &[]);
    post(&server.url, "/v1/agents", json!({"name": "bulk", "scopes": ["read:all"]})).unwrap();
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let url = server.url.clone();
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().build();
                for i in 0..2500 {
                    agent
                        .post(&format!("{url}/v1/keys"))
                        .set("authorization", &format!("Bearer {TOKEN}"))
                        .send_json(json!({"agent": "bulk", "name": format!("k-{w}-{i}")}))
                        .unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = started.elapsed();
    let mut store = Store::open(&dir.db()).unwrap();
    assert_eq!(store.list_keys(Some("bulk")).unwrap().len(), 10_001);
    assert_eq!(store.snapshot().unwrap().keys.len(), 10_001);
    eprintln!("created 10,000 keys through the API (4 clients) in {:.2}s ({:.0} keys/s)", elapsed.as_secs_f64(), 10_000.0 / elapsed.as_secs_f64());
}
