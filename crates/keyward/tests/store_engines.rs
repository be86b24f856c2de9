//! The store's behaviour on both engines: the same scenarios on a SQLite file and on a real
//! PostgreSQL database (`KEYWARD_TEST_POSTGRES`, which `cargo xtask test` provides).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use keyward_control::model::*;
use keyward_control::store::{Location, Store, SCHEMA_VERSION};
use keyward_core::feed::{KeyUsage, UsageReport};

/// Both engines, each on a fresh store. The SQLite file lives as long as the returned dir.
fn engines(tag: &str) -> Vec<(Location, Option<common::Dir>)> {
    let dir = common::Dir::new(tag);
    let sqlite = Location::Sqlite(dir.db());
    let pg = Location::parse(&common::postgres_database(tag)).unwrap();
    vec![(sqlite, Some(dir)), (pg, None)]
}

fn agent(name: &str, scopes: &[&str]) -> NewAgent {
    NewAgent { name: name.into(), scopes: scopes.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

#[test]
fn a_whole_key_lifecycle_reads_the_same_on_both_engines() {
    let mut seen = Vec::new();
    for (loc, _dir) in engines("lifecycle") {
        let mut s = Store::open_at(&loc).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION as i64, "{loc:?}");
        let created = s.create_agent(&agent("billing", &["read:all", "write:all"])).unwrap();
        s.add_scope(&NewScope { name: "billing:read".into(), description: "Read invoices".into() }).unwrap();
        s.imply_scope("read:all", &Imply { implies: "billing:read".into(), remove: false }).unwrap();
        let k = s
            .create_key(&NewKey { agent: "billing".into(), name: Some("ci".into()), scopes: Some(vec!["read:all".into()]), rate: Some("100/s".into()), burst: Some(20), ..Default::default() })
            .unwrap();
        assert_eq!(k.key.scopes, ["billing:read", "read:all"], "{loc:?}: implications expand");
        let dup = s.create_key(&NewKey { agent: "billing".into(), name: Some("ci".into()), ..Default::default() }).unwrap_err();
        assert_eq!(dup.code(), "CONFLICT", "{loc:?}");
        let upd = s.update_key(&k.key.id, &KeyUpdate { name: Some("ci-2".into()), rate: Some(Some("none".into())), ..Default::default() }).unwrap();
        assert_eq!((upd.name.as_str(), upd.rate_limit.clone()), ("ci-2", None), "{loc:?}");
        let rotated = s.rotate_key(&k.key.id, &RotateKey { grace: Some("1h".into()), ..Default::default() }).unwrap();
        assert_eq!(rotated.old.rotated_to.as_deref(), Some(rotated.new.key.id.as_str()));
        s.revoke_key(&created.key.id).unwrap();
        let lines: Vec<String> = (0..1200).map(|i| format!("legacy-key-number-{i:06}-abcdef")).collect();
        let ids = s.import_batch(&NewKey { agent: "billing".into(), name: Some("legacy".into()), ..Default::default() }, &lines, false).unwrap();
        assert_eq!(ids.len(), 1200);
        let again = s.import_batch(&NewKey { agent: "billing".into(), name: Some("other".into()), ..Default::default() }, &lines[5..6], false).unwrap_err();
        assert!(again.to_string().contains("already registered"), "{loc:?}: {again}");
        s.update_agent("billing", &AgentUpdate { remove_scopes: vec!["write:all".into()], ..Default::default() }).unwrap();
        s.set_agent_enabled("billing", false, Some("unpaid invoice")).unwrap();
        let in_use = s.remove_scope("billing:read").unwrap_err();
        assert_eq!(in_use.code(), "CONFLICT", "{loc:?}: implied by a carried scope");
        let scopes: Vec<String> = s.list_scopes().unwrap().into_iter().map(|v| format!("{}:{}:{}", v.name, v.agents, v.keys)).collect();
        // Every change is one version, one audit entry, in order, with no gap.
        let version = s.snapshot_version().unwrap();
        let audit: Vec<u64> = s.audit(1000).unwrap().iter().map(|e| e.version).collect();
        assert_eq!(audit, (1..=version).collect::<Vec<_>>(), "{loc:?}");
        // The feed pages through every record exactly once, consistent with its version.
        let mut since_cursor: Option<(u64, String)> = None;
        let mut digests = std::collections::BTreeSet::new();
        loop {
            let page = match &since_cursor {
                Some((v, id)) => s.feed_page(*v, Some(id), 250).unwrap(),
                None => s.feed_page(0, None, 250).unwrap(),
            };
            assert_eq!(page.version, version);
            assert!(page.store.as_deref().is_some_and(|id| id.starts_with("st_")), "{loc:?}: the store says who it is");
            for k in &page.keys {
                assert!(digests.insert(k.digest.clone()), "{loc:?}: {} twice", k.id);
                assert!(!k.agent_enabled, "{loc:?}: the disabled agent travels with every key");
            }
            match page.cursor {
                Some(c) => since_cursor = Some((c.version, c.id)),
                None => break,
            }
        }
        assert_eq!(digests.len(), 1203, "{loc:?}");
        let snap = s.snapshot().unwrap();
        assert_eq!(snap.keys.len(), 1203);
        assert_eq!(snap.version, version);
        // Usage lands, and only for keys the store knows.
        let report = UsageReport {
            envoy: "e1".into(),
            usage: vec![
                KeyUsage { key_id: rotated.new.key.id.clone(), count: 3, last_used: 1_700_000_000, denied: [("RATE_LIMITED".to_string(), 2)].into() },
                KeyUsage { key_id: "key_unknown".into(), count: 1, last_used: 1_700_000_000, denied: Default::default() },
            ],
        };
        assert_eq!(s.record_usage(&report).unwrap(), 1);
        assert_eq!(s.record_usage(&report).unwrap(), 1);
        let usage = s.usage(Some("billing"), 1_600_000_000).unwrap();
        assert_eq!(usage.len(), 2, "{loc:?}: {usage:?}");
        let used = usage.iter().find(|u| u.count > 0).unwrap();
        assert_eq!(used.count, 6, "{loc:?}");
        let refused = usage.iter().find(|u| !u.denied.is_empty()).unwrap();
        assert_eq!(refused.denied.get("RATE_LIMITED"), Some(&4), "{loc:?}");
        assert_eq!(s.get_key(&rotated.new.key.id).unwrap().last_used_at.as_deref(), Some("2023-11-14T22:13:20Z"));
        // Acknowledgements and replicas.
        s.replica = Some("r1".into());
        s.replica_seen("r1", 1).unwrap();
        s.envoy_seen("e1", Some(version), keyward_control::store::now_unix() + 30, None).unwrap();
        s.is_server = true;
        let status = s.status().unwrap();
        assert_eq!(status.envoys.len(), 1);
        assert_eq!(status.envoys[0].replica.as_deref(), Some("r1"));
        assert_eq!(status.envoys[0].state, "connected");
        assert_eq!(status.replicas.len(), 1);
        assert_eq!(s.envoys_applied(version).unwrap(), (vec!["e1".to_string()], vec![]));
        s.forget_open_feeds(Some("r1")).unwrap();
        assert_eq!(s.envoys_applied(version).unwrap(), (vec![], vec![]));
        // What the two engines said, minus ids and times.
        let mut keys: Vec<String> = s.list_keys(Some("billing")).unwrap().iter().map(|k| format!("{} {} {:?} {}", k.name, k.status, k.scopes, k.masked.len())).collect();
        keys.sort();
        seen.push((scopes, keys, version, status.active_keys));
    }
    assert_eq!(seen[0], seen[1], "SQLite and PostgreSQL disagree");
}

/// What running replicas say of their rate limits (`runtime`), and the fleet a limit is split
/// across, on both engines: no audit entry, no version, and a rate report never shortens an
/// open feed request.
#[test]
fn runtime_views_and_the_fleet_read_the_same_on_both_engines() {
    use keyward_control::store::RATES_RUNTIME_PREFIX;
    for (loc, _dir) in engines("runtime") {
        let mut s = Store::open_at(&loc).unwrap();
        s.is_server = true;
        s.replica = Some("kw-a".into());
        let now = keyward_control::store::now_unix();
        assert_eq!(s.status().unwrap().rate_limits, None, "{loc:?}: no replica has said anything");
        let view = RatesRuntime {
            store: Some("redis://r:6379".into()),
            healthy: true,
            since: now - 5,
            hot: vec![HotBucket { bucket: "k:key_1".into(), used: 7, count: 10, period_secs: 1 }],
        };
        s.put_runtime("rates:kw-a", &serde_json::to_string(&view).unwrap()).unwrap();
        s.put_runtime("rates:kw-a", &serde_json::to_string(&view).unwrap()).unwrap();
        s.put_runtime("other:kw-a", "{}").unwrap();
        assert_eq!(s.runtime(RATES_RUNTIME_PREFIX, now - 10).unwrap().len(), 1, "{loc:?}");
        assert!(s.runtime(RATES_RUNTIME_PREFIX, now + 60).unwrap().is_empty(), "{loc:?}: an old view is not shown");
        assert_eq!((s.snapshot_version().unwrap(), s.audit(10).unwrap().len()), (0, 0), "{loc:?}: neither versioned nor audited");
        // The fleet: Envoys with an open feed request, or reporting rates.
        s.envoy_seen("e-feed", Some(0), now + 60, Some("native")).unwrap();
        s.envoy_seen("e-gone", Some(0), now - 5, None).unwrap();
        s.envoy_reported("e-rates").unwrap();
        s.envoy_reported("e-feed").unwrap();
        assert_eq!(s.fleet_size().unwrap(), 2, "{loc:?}");
        let status = s.status().unwrap();
        let feed = status.envoys.iter().find(|e| e.id == "e-feed").unwrap();
        assert!(feed.connected, "{loc:?}");
        // Which shell each runs: what its feed requests said, and keyward.wasm (which never
        // says) otherwise; a rate report leaves it alone.
        let shells: Vec<(&str, &str)> = status.envoys.iter().map(|e| (e.id.as_str(), e.shell.as_str())).collect();
        assert_eq!(shells, [("e-feed", "native"), ("e-gone", "wasm"), ("e-rates", "wasm")], "{loc:?}");
        let (done, _) = s.envoys_applied(0).unwrap();
        assert_eq!(done, ["e-feed", "e-rates"], "{loc:?}: a report keeps the open feed's window");
        let rl = status.rate_limits.unwrap();
        assert_eq!((rl.mode.as_str(), rl.envoys, rl.healthy, rl.hot.len()), ("global", 2, Some(true), 1), "{loc:?}");
        assert_eq!(rl.since, Some(keyward_core::time::format_rfc3339(now - 5)));
    }
}

#[test]
fn the_audit_log_refuses_edits_in_the_database_itself() {
    let url = common::postgres_database("audit");
    let mut s = Store::open_at(&Location::parse(&url).unwrap()).unwrap();
    s.create_agent(&agent("a", &["read:all"])).unwrap();
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    for sql in ["UPDATE audit SET actor = 'mallory'", "DELETE FROM audit", "TRUNCATE audit"] {
        let err = client.batch_execute(sql).unwrap_err();
        assert!(format!("{err:?}").contains("append-only"), "{sql}: {err:?}");
    }
    assert_eq!(s.audit(10).unwrap().len(), 1);
}

#[test]
fn a_newer_postgres_schema_is_refused_and_a_migrated_one_reopens() {
    let url = common::postgres_database("schema");
    let loc = Location::parse(&url).unwrap();
    let mut s = Store::open_at(&loc).unwrap();
    s.create_agent(&agent("a", &["read:all"])).unwrap();
    let id = s.store_id().unwrap();
    drop(s);
    let s = Store::open_at(&loc).unwrap();
    assert_eq!(s.store_id().unwrap(), id, "the identity survives a reopen");
    assert_eq!(s.snapshot_version().unwrap(), 1);
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    client.batch_execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'").unwrap();
    let err = Store::open_at(&loc).err().unwrap().to_string();
    assert!(err.contains("newer than this keyward"), "{err}");
}

/// Writers on separate connections (as separate replicas are) never share a version or skip
/// one, and every acknowledged change is in the store and its audit log.
#[test]
fn concurrent_writers_get_strictly_increasing_gap_free_versions() {
    for (loc, _dir) in engines("writers") {
        let mut first = Store::open_at(&loc).unwrap();
        first.create_agent(&agent("shared", &["read:all"])).unwrap();
        let acknowledged = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for w in 0..4 {
                let (loc, acknowledged) = (&loc, &acknowledged);
                scope.spawn(move || {
                    let mut s = Store::open_at(loc).unwrap();
                    for i in 0..40 {
                        let req = NewKey { agent: "shared".into(), name: Some(format!("w{w}-{i}")), ..Default::default() };
                        // SQLite may answer busy under contention; a busy answer changed nothing.
                        match s.create_key(&req) {
                            Ok(k) => acknowledged.lock().unwrap().push((s.last_change.unwrap(), k.key.id)),
                            Err(e) => assert!(e.store_fault().is_some(), "{loc:?}: {e}"),
                        }
                    }
                });
            }
        });
        let acknowledged = acknowledged.into_inner().unwrap();
        let mut versions: Vec<u64> = acknowledged.iter().map(|a| a.0).collect();
        versions.sort_unstable();
        let unique: std::collections::BTreeSet<u64> = versions.iter().copied().collect();
        assert_eq!(unique.len(), versions.len(), "{loc:?}: a version was given twice");
        let total = first.snapshot_version().unwrap();
        assert_eq!(total, 1 + versions.len() as u64, "{loc:?}: a refused change left a gap or a change went missing");
        let audit: Vec<u64> = first.audit(10_000).unwrap().iter().map(|e| e.version).collect();
        assert_eq!(audit, (1..=total).collect::<Vec<_>>(), "{loc:?}");
        for (_, id) in &acknowledged {
            first.get_key(id).unwrap();
        }
        assert!(acknowledged.len() >= 150, "{loc:?}: only {} of 160 changes landed", acknowledged.len());
    }
}

/// PostgreSQL restarted or failed over: the change in flight fails as busy (nothing changed),
/// and the next one reconnects.
#[test]
fn a_lost_postgres_connection_fails_one_change_cleanly_and_the_next_reconnects() {
    let url = common::postgres_database("reconnect");
    let mut s = Store::open_at(&Location::parse(&url).unwrap()).unwrap();
    s.create_agent(&agent("a", &["read:all"])).unwrap();
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let db = url.rsplit('/').next().unwrap();
    admin
        .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", &[&db])
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let first = s.create_agent(&agent("b", &["read:all"]));
    if let Err(e) = &first {
        assert!(e.store_fault().is_some(), "a lost connection is a busy store, not a 500: {e:?}");
        assert_eq!(e.status(), 503);
    }
    let second = s.create_agent(&agent("c", &["read:all"])).unwrap();
    assert_eq!(second.agent.name, "c");
    let names: Vec<String> = s.list_agents().unwrap().into_iter().map(|a| a.name).collect();
    let want: Vec<&str> = if first.is_ok() { vec!["a", "b", "c"] } else { vec!["a", "c"] };
    assert_eq!(names, want);
    let versions: Vec<u64> = s.audit(10).unwrap().iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=want.len() as u64).collect::<Vec<_>>(), "a failed change left no gap");
}

fn keyward(args: &[&str]) -> common::Out {
    let out = common::bin().args(args).env_remove("KEYWARD_STORE").env_remove("KEYWARD_DB").env_remove("KEYWARD_URL").output().unwrap();
    common::Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// A PostgreSQL binary (`pg_dump`, `pg_restore`), from Debian's versioned directory or PATH.
fn pg_tool(name: &str) -> std::path::PathBuf {
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin").join(name)).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    found.sort();
    found.pop().or_else(|| {
        std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()))
    })
    .unwrap_or_else(|| panic!("{name} not found: install Debian's postgresql package (`cargo xtask test` does), or put {name} on PATH"))
}

/// The documented PostgreSQL backup path: `pg_dump`, `pg_restore` into a new database, then
/// `keyward store rekey`; the restored store has every key, a new identity and a higher version.
#[test]
fn a_postgres_store_survives_pg_dump_and_pg_restore_and_rekey_moves_it_forward() {
    let url = common::postgres_database("dump");
    let dir = common::Dir::new("dump");
    assert_eq!(keyward(&["--store", &url, "agent", "create", "billing", "--scopes", "read:all", "--json"]).ok().code, 0);
    keyward(&["--store", &url, "key", "create", "--agent", "billing", "--name", "ci"]).ok();
    let before: serde_json::Value = keyward(&["--store", &url, "status", "--json"]).ok().json();
    let dump = dir.0.join("keyward.dump");
    let out = std::process::Command::new(pg_tool("pg_dump")).args(["-Fc", "-f"]).arg(&dump).arg(&url).output().unwrap();
    assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
    let restored = common::postgres_database("restored");
    let out = std::process::Command::new(pg_tool("pg_restore")).args(["--no-owner", "-d", &restored]).arg(&dump).output().unwrap();
    assert!(out.status.success(), "pg_restore: {}", String::from_utf8_lossy(&out.stderr));
    let loc = Location::parse(&restored).unwrap();
    let old_id = Store::open_at(&loc).unwrap().store_id().unwrap();
    let rekey = keyward(&["--store", &restored, "store", "rekey", "--json"]).ok().json();
    let after: serde_json::Value = keyward(&["--store", &restored, "status", "--json"]).ok().json();
    assert_eq!(after["active_keys"], before["active_keys"]);
    assert_eq!(after["snapshot_version"].as_u64(), Some(before["snapshot_version"].as_u64().unwrap() + 1));
    assert_ne!(rekey["store_id"].as_str(), Some(old_id.as_str()), "a new identity");
    // The audit log came along, append-only still, and says what happened.
    let audit: serde_json::Value = keyward(&["--store", &restored, "audit", "--json"]).ok().json();
    let actions: Vec<&str> = audit.as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions, ["agent.create", "key.create", "store.rekey"]);
    let mut client = postgres::Client::connect(&restored, postgres::NoTls).unwrap();
    assert!(client.batch_execute("DELETE FROM audit").is_err(), "the restored audit log is still append-only");
}

/// `store backup` while `serve` runs, then `store restore`: the data is the backup's, the
/// version is above both, and the identity is new; bad arguments name themselves.
#[test]
fn a_sqlite_backup_taken_online_restores_with_versions_moving_forward() {
    let dir = common::Dir::new("backup");
    let db = dir.db();
    let db_s = db.to_str().unwrap();
    keyward(&["--db", db_s, "agent", "create", "kept", "--scopes", "read:all"]).ok();
    let mut serve = common::bin()
        .args(["--db", db_s, "serve", "--listen", "127.0.0.1:0"])
        .env("KEYWARD_ADMIN_TOKEN", "backup-test-admin-token-0123456789")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let backup = dir.0.join("backup.db");
    let b = backup.to_str().unwrap();
    let out = keyward(&["--db", db_s, "store", "backup", b, "--json"]).ok().json();
    assert_eq!(out["snapshot_version"], 1);
    let again = keyward(&["--db", db_s, "store", "backup", b]);
    assert_eq!(again.code, 2);
    assert!(again.stderr.contains("error: FILE:") && again.stderr.contains("exists"), "{}", again.stderr);
    keyward(&["--db", db_s, "agent", "create", "lost", "--scopes", "read:all", "--no-wait"]).ok();
    keyward(&["--db", db_s, "agent", "create", "lost2", "--scopes", "read:all", "--no-wait"]).ok();
    let old_id = Store::open(&db).unwrap().store_id().unwrap();
    let restored = keyward(&["--db", db_s, "store", "restore", b, "--json"]).ok().json();
    assert_eq!(restored["backup_version"], 1);
    assert_eq!(restored["snapshot_version"], 4, "above the store's 3 and the backup's 1");
    let s = Store::open(&db).unwrap();
    assert_ne!(s.store_id().unwrap(), old_id);
    let mut s = s;
    let names: Vec<String> = s.list_agents().unwrap().into_iter().map(|a| a.name).collect();
    assert_eq!(names, ["kept"]);
    assert_eq!(s.snapshot().unwrap().keys.len(), 1);
    let missing = keyward(&["--db", db_s, "store", "restore", "/nonexistent/backup.db"]);
    assert_eq!(missing.code, 2);
    assert!(missing.stderr.contains("FILE") && missing.stderr.contains("is not a file"), "{}", missing.stderr);
    let _ = serve.kill();
    let _ = serve.wait();
}

/// `store copy` SQLite → PostgreSQL → SQLite: the same snapshot (version, identity, records),
/// the same audit log, and a target that already holds data is refused untouched.
#[test]
fn a_store_copied_to_postgres_and_back_is_the_same_store() {
    let dir = common::Dir::new("copy");
    let src = dir.db();
    let mut s = Store::open(&src).unwrap();
    s.create_agent(&agent("billing", &["read:all", "write:all"])).unwrap();
    s.add_scope(&NewScope { name: "billing:read".into(), description: "Read invoices".into() }).unwrap();
    let k = s.create_key(&NewKey { agent: "billing".into(), name: Some("ci".into()), scopes: Some(vec!["read:all".into()]), ..Default::default() }).unwrap();
    s.rotate_key(&k.key.id, &RotateKey::default()).unwrap();
    let lines: Vec<String> = (0..2500).map(|i| format!("copied-legacy-key-{i:06}-abcdef")).collect();
    s.import_batch(&NewKey { agent: "billing".into(), name: Some("legacy".into()), ..Default::default() }, &lines, false).unwrap();
    s.record_usage(&UsageReport { envoy: "e".into(), usage: vec![KeyUsage { key_id: k.key.id.clone(), count: 2, last_used: 1_700_000_000, denied: Default::default() }] }).unwrap();
    s.put_runtime("rates:kw-0", r#"{"healthy":true}"#).unwrap();
    let (snap, audit, id) = (s.snapshot().unwrap(), s.audit(100).unwrap(), s.store_id().unwrap());
    drop(s);
    let pg = common::postgres_database("copy");
    let back = dir.0.join("back.db");
    let sqlite_url = format!("sqlite://{}", src.display());
    let back_url = format!("sqlite://{}", back.display());
    let out = keyward(&["store", "copy", "--from", &sqlite_url, "--to", &pg, "--json"]).ok().json();
    assert_eq!(out["rows"]["keys"], 2503, "{out}: Production, ci, its rotation and 2,500 imported");
    keyward(&["store", "copy", "--from", &pg, "--to", &back_url]).ok();
    for loc in [Location::parse(&pg).unwrap(), Location::Sqlite(back.clone())] {
        let mut t = Store::open_at(&loc).unwrap();
        let copied = t.snapshot().unwrap();
        assert_eq!(copied.version, snap.version, "{loc:?}");
        assert_eq!(copied.keys, snap.keys, "{loc:?}");
        assert_eq!(copied.implications, snap.implications, "{loc:?}");
        assert_eq!(t.store_id().unwrap(), id, "{loc:?}: the same store, so Envoys carry on");
        let a = t.audit(100).unwrap();
        assert_eq!(a.iter().map(|e| (e.seq, e.action.clone(), e.version)).collect::<Vec<_>>(), audit.iter().map(|e| (e.seq, e.action.clone(), e.version)).collect::<Vec<_>>());
        assert_eq!(t.usage(None, 0).unwrap().len(), 1, "{loc:?}");
        assert!(t.runtime("", 0).unwrap().is_empty(), "{loc:?}: what running processes said is not data");
        // The copy goes on: a change takes the next version and the next audit sequence.
        t.create_agent(&agent("after", &["read:all"])).unwrap();
        assert_eq!(t.audit(1).unwrap()[0].seq, audit.last().unwrap().seq + 1, "{loc:?}");
    }
    let refused = keyward(&["store", "copy", "--from", &sqlite_url, "--to", &pg]);
    assert_eq!(refused.code, 2);
    assert!(refused.stderr.contains("--to") && refused.stderr.contains("already holds data"), "{}", refused.stderr);
    let bad = keyward(&["store", "copy", "--from", "mysql://x/y", "--to", &pg]);
    assert!(bad.stderr.contains("--from"), "{}", bad.stderr);
}

/// Two replicas moving the version past two Envoys at once, while a change holds the version
/// row: the version only ever rises, and ends past both.
#[test]
fn concurrent_advances_never_move_the_version_backwards() {
    let url = common::postgres_database("advance");
    let loc = Location::parse(&url).unwrap();
    let mut s = Store::open_at(&loc).unwrap();
    s.create_agent(&agent("a", &["read:all"])).unwrap();
    let mut holder = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut tx = holder.transaction().unwrap();
    tx.execute("UPDATE meta SET value = value WHERE name = 'snapshot_version'", &[]).unwrap();
    std::thread::scope(|scope| {
        let a = scope.spawn(|| Store::open_at(&loc).unwrap().advance_past(100).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(150));
        let b = scope.spawn(|| Store::open_at(&loc).unwrap().advance_past(50).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(150));
        tx.commit().unwrap();
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        assert!(a > 100 && b > 50, "{a} {b}");
    });
    assert_eq!(s.snapshot_version().unwrap(), 101);
    let versions: Vec<u64> = s.audit(10).unwrap().iter().map(|e| e.version).collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "the version went backwards: {versions:?}");
}
