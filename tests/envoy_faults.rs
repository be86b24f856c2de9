//! Faults, each against the real Envoy (`--concurrency 2`) and the real `keyward serve`, with
//! what users see stated and checked: serve killed in the middle of a full snapshot, the
//! database locked by another writer, the disk full, Envoy reloading a new filter config (good
//! and bad), and a wasm VM crash under `FAIL_RELOAD`. Nothing acknowledged is ever lost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyward_core::{keyformat, Digest};
use keyward_testkit::{poll_until, request, send_raw, Echo, Envoy, EnvoyOptions, Keyward, TempDir, ADMIN_TOKEN};
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

fn feed_config() -> Value {
    json!({
        "rules": [{"methods": ["GET"], "scopes": ["read:all"]}],
        "control_plane": {"cluster": "keyward", "feed_wait_secs": 5, "usage_report_secs": 1}
    })
}

fn envoy_for(keyward: &Keyward, echo: &Echo, config: Value) -> Envoy {
    let mut opts = EnvoyOptions::new(config, echo.port());
    opts.concurrency = 2;
    opts.control_plane_port = Some(keyward.port);
    opts.node_id = "faults".into();
    Envoy::start(&opts)
}

fn status_of(envoy: &Envoy, key: &str) -> (u16, Option<String>) {
    let r = envoy.get("/v1/x", &[("x-api-key", key.as_bytes())]);
    (r.status, r.code())
}

fn wait_status(envoy: &Envoy, key: &str, want: u16, what: &str) {
    poll_until(Duration::from_secs(30), what, || (status_of(envoy, key).0 == want).then_some(()));
}

fn post(keyward: &Keyward, path: &str, body: &Value) -> keyward_testkit::Response {
    let text = body.to_string();
    let raw = format!(
        "POST {path} HTTP/1.1\r\nhost: keyward\r\nconnection: close\r\nauthorization: Bearer {ADMIN_TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
        text.len()
    );
    send_raw(keyward.port, raw.as_bytes()).unwrap()
}

fn create_key(keyward: &Keyward, agent: &str) -> keyward_testkit::Response {
    post(keyward, "/v1/keys", &json!({"agent": agent}))
}

fn key_count(keyward: &Keyward) -> usize {
    let out: Value = serde_json::from_str(&keyward.cli(&["key", "list", "--json"])).unwrap();
    out.as_array().map(Vec::len).or_else(|| out["keys"].as_array().map(Vec::len)).unwrap_or(0)
}

/// Fault 1: `keyward serve` SIGKILLed while Envoy is part-way through a 200,000-key full
/// snapshot. Users see 503 KEYS_UNAVAILABLE (with Retry-After) until a whole snapshot is in:
/// never a half-applied one. After serve restarts, the full snapshot completes and every key,
/// first page and last, works.
#[test]
fn serve_killed_mid_snapshot_leaves_no_half_applied_state() {
    let keyward = Keyward::start();
    keyward.cli(&["agent", "create", "bulk", "--scopes", "read:all"]);
    let keys: Vec<String> = (0..200_000u32)
        .map(|i| keyformat::generate("kw_live", Digest::of(&i.to_le_bytes()).0.iter().chain(Digest::of(&(i + 7).to_le_bytes()).0.iter()).copied().cycle()).unwrap())
        .collect();
    let lines: String = keys.iter().map(|k| format!("{k}\n")).collect();
    keyward.cli_stdin(&["key", "import", "--agent", "bulk", "--batch"], &lines);
    let (first, last) = (keys[0].clone(), keys[keys.len() - 1].clone());

    let echo = Echo::start(0).unwrap();
    let mut keyward = keyward;
    let envoy = envoy_for(&keyward, &echo, feed_config());
    // Kill serve once Envoy has applied at least one page of the 40, but not all.
    poll_until(Duration::from_secs(60), "the first snapshot page", || {
        (envoy.stat("wasmcustom.keyward.feed.pages_applied").unwrap_or(0) >= 1).then_some(())
    });
    keyward.kill9();
    let pages_at_kill = envoy.stat("wasmcustom.keyward.feed.pages_applied").unwrap_or(0);
    assert!(pages_at_kill < 40, "the snapshot completed before the kill ({pages_at_kill} pages); the test needs more keys");

    // Part of the snapshot is in shared data: a key on a written page is served, and every other
    // key answers 503 (it may be on a page to come), never 401. Every 100th key, both kinds.
    let (mut served, mut unavailable) = (0, 0);
    for key in keys.iter().step_by(100) {
        let r = envoy.get("/v1/x", &[("x-api-key", key.as_bytes())]);
        match (r.status, r.code().as_deref()) {
            (200, _) => served += 1,
            (503, Some("KEYS_UNAVAILABLE")) => {
                assert!(r.header("retry-after").is_some());
                unavailable += 1;
            }
            other => panic!("a valid key answered {other:?} from a partial snapshot ({pages_at_kill} pages applied)"),
        }
    }
    assert!(served > 0 && unavailable > 0, "{served} served, {unavailable} unavailable; pages applied at kill: {pages_at_kill}");
    let r = envoy.get("/v1/x", &[("x-api-key", b"never-issued-key-xyz")]);
    assert_eq!(r.status, 503, "no key is unknown before the snapshot is whole");

    keyward.restart();
    let started = Instant::now();
    // Whole once a key can be unknown; then every key works.
    wait_status(&envoy, "never-issued-key-xyz", 401, "the whole snapshot after serve restarts");
    for key in keys.iter().step_by(100).chain([&first, &last]) {
        assert_eq!(status_of(&envoy, key).0, 200);
    }
    eprintln!("fault 1: killed after {pages_at_kill} of 40 pages; whole snapshot served {:?} after restart", started.elapsed());
    assert_eq!(envoy.stat("wasmcustom.keyward.internal_errors").unwrap_or(0), 0);
}

/// Fault 2: another process holds the database's write lock longer than serve's 5 s busy
/// timeout. Changes fail cleanly (API 503 STORE_BUSY with Retry-After; CLI exit 1 saying the
/// database is locked) and change nothing; Envoy keeps serving every key it has; once the lock
/// is gone, changes work again.
#[test]
fn a_locked_database_refuses_changes_cleanly_and_envoy_keeps_serving() {
    let keyward = Keyward::start();
    let made: Value = serde_json::from_str(&keyward.cli(&["agent", "create", "app", "--scopes", "read:all", "--json"])).unwrap();
    let key = made["secret"].as_str().unwrap().to_string();
    let echo = Echo::start(0).unwrap();
    let envoy = envoy_for(&keyward, &echo, feed_config());
    wait_status(&envoy, &key, 200, "the key to work");
    let before = key_count(&keyward);

    // Another writer: sqlite3 from Python holds an exclusive lock for 12 s, longer than the API's
    // wait and the CLI's wait (5 s each) together.
    let db = keyward.db();
    let mut locker = Command::new("python3")
        .args(["-c", "import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(12); c.execute('ROLLBACK')"])
        .arg(&db)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(locker.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "locked");
    }
    let t = Instant::now();
    let r = create_key(&keyward, "app");
    assert_eq!((r.status, r.code().as_deref()), (503, Some("STORE_BUSY")), "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("retry-after"), Some("1"));
    eprintln!("fault 2: API answered 503 STORE_BUSY after {:?}", t.elapsed());
    let out = Command::new(keyward_testkit::keyward_bin()).arg("--db").arg(&db).args(["key", "create", "--agent", "app"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("locked by another writer; nothing was changed"), "{stderr}");
    // The data plane does not notice.
    assert_eq!(status_of(&envoy, &key).0, 200);
    let _ = locker.wait();
    assert_eq!(key_count(&keyward), before, "a refused change left something behind");
    let r = create_key(&keyward, "app");
    assert_eq!(r.status, 201);
    let fresh = r.json()["secret"].as_str().unwrap().to_string();
    wait_status(&envoy, &fresh, 200, "a key created after the lock is gone");
}

/// A small tmpfs for the data folder; unmounted on drop.
struct SmallDisk {
    dir: TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u32) -> SmallDisk {
        let dir = TempDir::new("smalldisk").unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "keyward-test"]).arg(dir.path()).output();
        match out {
            Ok(o) if o.status.success() => SmallDisk { dir },
            Ok(o) => panic!(
                "cannot mount a {megabytes} MiB tmpfs for the disk-full test ({}). It needs root (CAP_SYS_ADMIN), as CI has.",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("cannot run mount (util-linux) for the disk-full test: {e}"),
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Fault 3: the data folder's disk fills up. Changes fail (API 507 STORE_FULL) and change
/// nothing; every acknowledged key is still there, the database passes its integrity check, and
/// once space is freed changes work again. Envoy keeps serving throughout.
#[test]
fn a_full_disk_refuses_changes_and_loses_nothing_acknowledged() {
    let disk = SmallDisk::mount(4);
    let db = disk.dir.path().join("keyward.db");
    let mut keyward = Keyward::stopped(0);
    keyward.set_db(&db);
    keyward.restart();
    keyward.cli(&["agent", "create", "app", "--scopes", "read:all"]);
    let echo = Echo::start(0).unwrap();
    let envoy = envoy_for(&keyward, &echo, feed_config());
    let first = create_key(&keyward, "app").json()["secret"].as_str().unwrap().to_string();
    wait_status(&envoy, &first, 200, "the first key");

    // Fill the disk, leaving a few KiB.
    let filler = disk.dir.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let mut acknowledged = Vec::new();
    let mut refusal = None;
    for _ in 0..200 {
        let r = create_key(&keyward, "app");
        match r.status {
            201 => acknowledged.push(r.json()["key"]["id"].as_str().unwrap().to_string()),
            _ => {
                refusal = Some((r.status, r.code()));
                break;
            }
        }
    }
    let refusal = refusal.expect("the disk never filled up");
    assert_eq!(refusal, (507, Some("STORE_FULL".to_string())), "what a full disk answers");
    eprintln!("fault 3: {} keys acknowledged on the nearly full disk, then {refusal:?}", acknowledged.len());
    assert_eq!(status_of(&envoy, &first).0, 200, "Envoy keeps serving");

    std::fs::remove_file(&filler).unwrap();
    let r = create_key(&keyward, "app");
    assert_eq!(r.status, 201, "changes work again once space is freed: {}", String::from_utf8_lossy(&r.body));
    let listed = keyward.cli(&["key", "list", "--json"]);
    for id in &acknowledged {
        assert!(listed.contains(id.as_str()), "acknowledged key {id} is gone");
    }
    keyward.kill9();
    let check = Command::new("python3")
        .args(["-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('PRAGMA integrity_check').fetchone()[0])"])
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "ok");
}

/// Fault 4: Envoy takes a new filter configuration (LDS from a watched file, as a control plane
/// or a config reload delivers it). A good one applies to new requests with no failed request
/// in between; a bad one is refused by `on_configure`, Envoy keeps the old listener, and says
/// why in its log.
#[test]
fn envoy_reloads_a_new_filter_config_and_refuses_a_bad_one() {
    let keyward = Keyward::start();
    let made: Value = serde_json::from_str(&keyward.cli(&["agent", "create", "app", "--scopes", "read:all", "--json"])).unwrap();
    let key = made["secret"].as_str().unwrap().to_string();
    let echo = Echo::start(0).unwrap();
    let dir = TempDir::new("lds").unwrap();
    let lds = dir.path().join("lds.json");
    let listener = |config: &Value| {
        let mut opts = EnvoyOptions::new(config.clone(), echo.port());
        opts.control_plane_port = Some(keyward.port);
        let boot = keyward_testkit::keyward_bootstrap(&opts);
        let mut l = boot["static_resources"]["listeners"][0].clone();
        l["@type"] = json!("type.googleapis.com/envoy.config.listener.v3.Listener");
        l["address"]["socket_address"]["port_value"] = json!(0);
        (json!({"resources": [l]}), boot)
    };
    let write_lds = |v: &Value| {
        let tmp = dir.path().join("lds.tmp");
        std::fs::write(&tmp, v.to_string()).unwrap();
        std::fs::rename(&tmp, &lds).unwrap();
    };
    let (resources, mut boot) = listener(&feed_config());
    write_lds(&resources);
    boot["static_resources"]["listeners"] = json!([]);
    boot["dynamic_resources"] = json!({"lds_config": {"resource_api_version": "V3",
        "path_config_source": {"path": lds.display().to_string(), "watched_directory": {"path": dir.path().display().to_string()}}}});
    let mut opts = EnvoyOptions::new(feed_config(), echo.port());
    opts.concurrency = 2;
    opts.bootstrap = Some(boot);
    // A replaced listener drains for a second, then its filter configuration goes.
    opts.extra_args = vec!["--drain-time-s".into(), "1".into()];
    let envoy = Envoy::start(&opts);
    wait_status(&envoy, &key, 200, "the key to work");

    // Load runs through both reloads: no request may fail with a 5xx.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = envoy.port;
    let load = {
        let (stop, key) = (std::sync::Arc::clone(&stop), key.clone());
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeMap::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let s = request(port, "GET", "/v1/x", &[("x-api-key", key.as_bytes())]).map(|r| r.status).unwrap_or(0);
                *seen.entry(s).or_insert(0u32) += 1;
            }
            seen
        })
    };
    // A good new config: GET now needs `admin`.
    let mut stricter = feed_config();
    stricter["rules"] = json!([{"methods": ["GET"], "scopes": ["admin"]}]);
    write_lds(&listener(&stricter).0);
    poll_until(Duration::from_secs(20), "the new config to apply", || (status_of(&envoy, &key).0 == 403).then_some(()));
    // A bad one: refused, and the previous (stricter) config keeps serving.
    let rejected_before = envoy.stat("listener_manager.lds.update_rejected").unwrap_or(0);
    let mut bad = feed_config();
    bad["rules"] = json!([{"path": {"regex": "("}, "scopes": ["x"]}]);
    write_lds(&listener(&bad).0);
    poll_until(Duration::from_secs(20), "Envoy to refuse the bad config", || {
        (envoy.stat("listener_manager.lds.update_rejected").unwrap_or(0) > rejected_before).then_some(())
    });
    assert_eq!(status_of(&envoy, &key), (403, Some("INSUFFICIENT_SCOPE".into())), "the good config still serves");
    assert!(envoy.log().contains("rules[0].path.regex"), "the log names the bad field");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = load.join().unwrap();
    eprintln!("fault 4: statuses during the reloads: {seen:?}");
    assert!(seen.keys().all(|s| *s == 200 || *s == 403), "a request failed during a reload: {seen:?}");

    // Once the first listener's filter chain has drained (1 s) and its configuration is gone,
    // the new configuration's fetcher takes the feed over, and a key made now works.
    poll_until(Duration::from_secs(20), "the new configuration's fetcher to take the feed over", || {
        (envoy.log().matches("now fetches the snapshot feed").count() >= 2).then_some(())
    });
    let admin: Value = serde_json::from_str(&keyward.cli(&["agent", "create", "operator", "--scopes", "admin", "--json"])).unwrap();
    wait_status(&envoy, admin["secret"].as_str().unwrap(), 200, "a key made after the first configuration went");
}

/// Fault 5: a wasm VM traps (a test-only build lets a request trigger it). Under
/// `failure_policy: FAIL_RELOAD` the request that crashed it gets 503 from Envoy, the VM is
/// rebuilt, and later requests are judged normally again, keys from the feed included.
#[test]
fn a_crashed_vm_is_reloaded_under_fail_reload() {
    let keyward = Keyward::start();
    let made: Value = serde_json::from_str(&keyward.cli(&["agent", "create", "app", "--scopes", "read:all", "--json"])).unwrap();
    let key = made["secret"].as_str().unwrap().to_string();
    let echo = Echo::start(0).unwrap();
    let mut opts = EnvoyOptions::new(feed_config(), echo.port());
    opts.concurrency = 1;
    opts.control_plane_port = Some(keyward.port);
    opts.bootstrap = Some(keyward_testkit::envoy_bootstrap(&keyward_testkit::fault_wasm_path(), &opts));
    let envoy = Envoy::start(&opts);
    wait_status(&envoy, &key, 200, "the key to work");

    let crashed = envoy.get("/v1/x", &[("x-api-key", key.as_bytes()), ("x-keyward-fault", b"trap")]);
    assert_eq!(crashed.status, 503, "the request that trapped the VM: {}", String::from_utf8_lossy(&crashed.body));
    let t = Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    poll_until(Duration::from_secs(30), "the VM to be reloaded", || {
        let s = status_of(&envoy, &key).0;
        *statuses.entry(s).or_insert(0u32) += 1;
        (s == 200).then_some(())
    });
    eprintln!("fault 5: judged again {:?} after the trap; statuses meanwhile {statuses:?}", t.elapsed());
    assert!(statuses.keys().all(|s| *s == 200 || *s == 503), "{statuses:?}");
    // Still a real judge, not fail-open: no key is refused, a wrong one too.
    assert_eq!(status_of(&envoy, "faults-unknown-key-0001"), (401, Some("INVALID_API_KEY".into())));
    assert_eq!(envoy.get("/v1/x", &[]).status, 401);
    let log = envoy.log();
    assert!(log.contains("Function: proxy_on_request_headers failed") || log.contains("unreachable"), "{log}");
}
