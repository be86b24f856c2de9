//! Issue 12 through the real binary: edits, the scope catalogue, what a change says about its
//! reach, and the bugs a new user's first trial found (each a regression test).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{bin, kw, Dir, Server};
use std::io::{BufRead, BufReader};
use std::process::Stdio;

const TOKEN: &str = "lifecycle-admin-token-0123456789";

#[test]
fn agent_and_key_updates_through_the_cli_say_what_changed() {
    let dir = Dir::new("update");
    kw(&dir, &["scope", "add", "webhook", "--description", "Receive webhooks"]).ok();
    let created = kw(&dir, &["agent", "create", "crm", "--scopes", "read:all", "--json"]).ok().json();
    let id = created["key"]["id"].as_str().unwrap().to_string();
    // Seed 000's capability toggles.
    let v = kw(&dir, &["agent", "update", "crm", "--add-scope", "webhook", "--rate", "100/min", "--burst", "20", "--json"]).ok().json();
    assert_eq!(v["scopes"], serde_json::json!(["read:all", "webhook"]));
    assert_eq!((v["rate_limit"].as_str(), v["burst"].as_u64()), (Some("100/min"), Some(20)));
    let v = kw(&dir, &["agent", "update", "crm", "--remove-scope", "webhook", "--rate", "none", "--json"]).ok().json();
    assert_eq!((v["scopes"].clone(), v["rate_limit"].clone(), v["burst"].clone()), (serde_json::json!(["read:all"]), serde_json::Value::Null, serde_json::Value::Null));
    // Seed 004: edit the key.
    let k = kw(&dir, &["key", "update", &id, "--name", "Primary", "--ttl", "30d", "--rate", "10/s", "--path-prefix", "/v1/a", "--path-prefix", "/v1/b", "--json"]).ok().json();
    assert_eq!((k["name"].as_str(), k["rate_limit"].as_str()), (Some("Primary"), Some("10/s")));
    assert_eq!(k["path_prefixes"], serde_json::json!(["/v1/a", "/v1/b"]));
    assert!(k["expires_at"].is_string());
    let k = kw(&dir, &["key", "update", &id, "--no-expiry", "--no-path-prefix", "--rate", "none", "--json"]).ok().json();
    assert_eq!((k["expires_at"].clone(), k["rate_limit"].clone(), k["path_prefixes"].clone()), (serde_json::Value::Null, serde_json::Value::Null, serde_json::json!([])));
    let shown = kw(&dir, &["key", "show", &id]).ok().stdout;
    assert!(shown.contains("Primary") && shown.contains("expires:      never"), "{shown}");
    let human = kw(&dir, &["agent", "update", "crm", "--description", "CRM sync"]).ok();
    assert!(human.stdout.contains("Updated agent crm"), "{}", human.stdout);
    let audit = kw(&dir, &["audit", "--json"]).ok().json();
    let last = audit.as_array().unwrap().last().unwrap();
    assert_eq!(last["action"], "agent.update");
    assert_eq!(last["details"]["changes"]["after"]["description"], "CRM sync");
    let scopes = kw(&dir, &["scope", "list"]).ok().stdout;
    assert!(scopes.contains("webhook") && scopes.contains("Receive webhooks") && scopes.contains("read:all write:all"), "{scopes}");
    let implied = kw(&dir, &["scope", "imply", "admin", "webhook"]).ok().stdout;
    assert!(implied.contains("implies read:all webhook write:all"), "{implied}");
}

#[test]
fn a_change_to_a_store_nobody_serves_says_no_envoy_will_see_it() {
    let dir = Dir::new("noserve");
    let out = kw(&dir, &["agent", "create", "crm", "--scopes", "read:all"]).ok();
    assert!(out.stderr.contains("no control plane is serving this store: no Envoy will see this change until `keyward serve` runs"), "{}", out.stderr);
    // In --json too: on stderr, and as `applied.serving: false`.
    let out = kw(&dir, &["key", "create", "--agent", "crm", "--json"]).ok();
    assert_eq!(out.json()["applied"]["serving"], false);
    assert!(out.stderr.contains("no control plane is serving"), "{}", out.stderr);
    let status = kw(&dir, &["status", "--json"]).ok().json();
    assert_eq!(status["serving"], false);
    assert!(kw(&dir, &["status"]).ok().stdout.contains("NOT SERVING"));
    // With serve running on the store, the change is published; no Envoy is connected here.
    let _serve = Server::start(&dir, Some(TOKEN), &[]);
    let out = kw(&dir, &["key", "create", "--agent", "crm"]).ok();
    assert!(out.stdout.contains("No Envoy is connected"), "{}\n{}", out.stdout, out.stderr);
    assert!(!out.stderr.contains("no control plane"), "{}", out.stderr);
    let out = kw(&dir, &["key", "create", "--agent", "crm", "--json"]).ok().json();
    assert_eq!((out["applied"]["serving"].as_bool(), out["applied"]["waited"].as_bool(), out["applied"]["envoys"].as_u64()), (Some(true), Some(true), Some(0)));
    let out = kw(&dir, &["--no-wait", "key", "create", "--agent", "crm", "--json"]).ok().json();
    assert_eq!(out["applied"]["waited"], false);
    assert_eq!(kw(&dir, &["status", "--json"]).ok().json()["serving"], true);
}

#[test]
fn regression_issue_12_bug_1_a_closed_pipe_ends_key_list_quietly() {
    let dir = Dir::new("pipe");
    kw(&dir, &["agent", "create", "crm", "--scopes", "read:all"]).ok();
    // Enough keys that `key list` outlives a reader that takes one line (64 KiB pipe buffer).
    let digests: String = (0..1500).map(|i| format!("sha256:{}\n", keyward_core::Digest::of(format!("k{i}").as_bytes()).to_hex())).collect();
    common::kw_in(&dir.0, &["key", "import", "--agent", "crm", "--batch"], Some(&digests)).ok();
    let mut child = bin()
        .args(["key", "list"])
        .env("KEYWARD_DB", dir.db())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    // The reader is gone (`| head -1`).
    let out = child.wait_with_output().unwrap();
    assert!(first.starts_with("ID"), "{first}");
    assert_ne!(out.status.code(), Some(101), "panicked: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn regression_issue_12_bugs_2_and_3_url_without_scheme_and_a_wrong_token() {
    let dir = Dir::new("url");
    let serve = Server::start(&dir, Some(TOKEN), &[]);
    let bare = serve.url.trim_start_matches("http://").to_string();
    let out = kw(&dir, &["--url", &bare, "--token", TOKEN, "agent", "list"]).ok();
    assert!(out.stdout.contains("NAME"), "{}", out.stdout);
    let out = kw(&dir, &["--url", &bare, "--token", "wrong-token-0123456789", "agent", "list"]);
    assert_eq!(out.code, 3);
    assert_eq!(out.stderr.trim(), "error: the admin token is not valid");
    let out = kw(&dir, &["--url", "ftp://127.0.0.1:1", "--token", TOKEN, "agent", "list"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.starts_with("error: --url: "), "{}", out.stderr);
    // Through the API, a change reports its reach the same way.
    let out = kw(&dir, &["--url", &bare, "--token", TOKEN, "agent", "create", "crm", "--scopes", "read:all", "--json"]).ok().json();
    assert_eq!((out["applied"]["serving"].as_bool(), out["applied"]["waited"].as_bool()), (Some(true), Some(true)));
    let out = kw(&dir, &["--url", &bare, "--token", TOKEN, "--no-wait", "agent", "update", "crm", "--description", "x", "--json"]).ok().json();
    assert_eq!(out["applied"]["waited"], false);
}

#[test]
fn regression_issue_12_bug_4_reading_a_missing_store_is_an_error_and_creates_nothing() {
    let dir = Dir::new("missing");
    let db = dir.0.join("nowhere/keyward.db");
    let db = db.to_str().unwrap();
    for args in [&["--db", db, "agent", "list"][..], &["--db", db, "key", "list"], &["--db", db, "status"], &["--db", db, "audit"]] {
        let out = kw(&dir, args);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stderr.starts_with("error: --db: no keyward store at "), "{}", out.stderr);
        assert!(!dir.0.join("nowhere").exists(), "{args:?} created the folder");
    }
    // The first write creates it.
    kw(&dir, &["--db", db, "agent", "create", "crm", "--scopes", "read:all"]).ok();
    kw(&dir, &["--db", db, "agent", "list"]).ok();
}

#[test]
fn regression_issue_12_bug_5_imports_the_filter_refuses_are_refused() {
    let dir = Dir::new("import");
    kw(&dir, &["agent", "create", "crm", "--scopes", "read:all"]).ok();
    let before = kw(&dir, &["key", "list", "--json"]).ok().json().as_array().unwrap().len();
    for (key, want) in [("kw_live_abcdefabcdefabcdefabcdef_000000", "checksum"), ("short", "easy to guess")] {
        let out = common::kw_in(&dir.0, &["key", "import", "--agent", "crm"], Some(key));
        assert_eq!(out.code, 2, "{key}: {}", out.stderr);
        assert!(out.stderr.contains(want), "{}", out.stderr);
    }
    let long = "x".repeat(300);
    let out = common::kw_in(&dir.0, &["key", "import", "--agent", "crm"], Some(&long));
    assert!(out.stderr.contains("over 256"), "{}", out.stderr);
    assert_eq!(kw(&dir, &["key", "list", "--json"]).ok().json().as_array().unwrap().len(), before);
    common::kw_in(&dir.0, &["key", "import", "--agent", "crm", "--allow-weak"], Some("short")).ok();
}

#[test]
fn regression_issue_12_bug_8_serve_help_describes_the_feed() {
    let out = bin().args(["serve", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("later"), "{text}");
    assert!(text.contains("snapshot feed"), "{text}");
}

#[test]
fn regression_issue_12_bug_10_admin_token_rotate_prints_a_token_serve_accepts() {
    let dir = Dir::new("token");
    kw(&dir, &["agent", "create", "crm", "--scopes", "read:all"]).ok();
    let serve = Server::start(&dir, None, &[]);
    let printed = || serve.stdout().lines().map(str::trim).find(|l| l.starts_with("kwadm_")).map(str::to_string);
    let mut old = None;
    for _ in 0..250 {
        old = printed();
        if old.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let old = old.unwrap_or_else(|| panic!("serve printed no token: {}", serve.stdout()));
    let out = kw(&dir, &["admin-token", "rotate"]).ok();
    let new = out.stdout.lines().map(str::trim).find(|l| l.starts_with("kwadm_")).unwrap().to_string();
    assert_ne!(old, new);
    let bare = serve.url.clone();
    let accepted = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        kw(&dir, &["--url", &bare, "--token", &new, "agent", "list"]).code == 0
    });
    assert!(accepted, "serve never accepted the rotated token");
    assert_eq!(kw(&dir, &["--url", &bare, "--token", &old, "agent", "list"]).code, 3);
    let audit = kw(&dir, &["audit", "--json"]).ok().json();
    assert!(audit.as_array().unwrap().iter().any(|e| e["action"] == "admin_token.rotate"));
    assert!(!audit.to_string().contains(&new));
}

#[test]
fn not_found_through_the_api_reads_like_on_the_file() {
    let dir = Dir::new("notfound");
    let serve = Server::start(&dir, Some(TOKEN), &[]);
    let out = kw(&dir, &["--url", &serve.url, "--token", TOKEN, "agent", "show", "nosuch"]);
    assert_eq!(out.code, 2);
    assert_eq!(out.stderr.trim(), "error: NAME: agent \"nosuch\" not found");
}

#[test]
fn a_refused_first_write_leaves_no_store_behind() {
    let dir = Dir::new("firstwrite");
    let db = dir.0.join("new/keyward.db");
    let db = db.to_str().unwrap();
    let out = kw(&dir, &["--db", db, "agent", "create", "x", "--scopes", "nosuch"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.starts_with("error: --scopes: "), "{}", out.stderr);
    assert!(!dir.0.join("new").exists(), "a refused first write created the folder");
    let out = common::kw_in(&dir.0, &["--db", db, "key", "import", "--agent", "nobody"], Some("some-legacy-key-0123456789"));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(!dir.0.join("new").exists(), "an import into a missing store created it");
}

#[test]
fn concurrent_commands_never_mistake_each_other_for_serve() {
    let dir = Dir::new("probe");
    kw(&dir, &["agent", "create", "crm", "--scopes", "read:all"]).ok();
    let children: Vec<_> = (0..40)
        .map(|_| bin().args(["status", "--json"]).env("KEYWARD_DB", dir.db()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap())
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["serving"], false, "a CLI's probe looked like a running serve");
    }
}

#[test]
fn scope_imply_names_its_positional_arguments() {
    let dir = Dir::new("imply");
    kw(&dir, &["agent", "create", "crm", "--scopes", "read:all"]).ok();
    let out = kw(&dir, &["scope", "imply", "nosuch", "admin"]);
    assert!(out.stderr.starts_with("error: A: "), "{}", out.stderr);
    let out = kw(&dir, &["scope", "imply", "admin", "nosuch"]);
    assert!(out.stderr.starts_with("error: B: "), "{}", out.stderr);
    let out = kw(&dir, &["key", "list", "--json"]).ok().json();
    let id = out[0]["id"].as_str().unwrap().to_string();
    kw(&dir, &["key", "update", &id, "--scopes", "read:all"]).ok();
    let k = kw(&dir, &["key", "update", &id, "--inherit-scopes", "--json"]).ok().json();
    assert_eq!(k["own_scopes"], serde_json::Value::Null);
}
