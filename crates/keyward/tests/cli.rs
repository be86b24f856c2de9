//! The real `keyward` binary: every command, its errors, `--json`, `--url`, and the README.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;

fn version(dir: &Dir) -> u64 {
    kw(dir, &["status", "--json"]).ok().json()["snapshot_version"].as_u64().unwrap()
}

#[test]
fn agent_commands_work_end_to_end() {
    let dir = Dir::new("agent");
    let out = kw(&dir, &["agent", "create", "billing", "--scopes", "read:all,write:all", "--rate", "100/min", "--description", "Billing service"]).ok();
    assert!(out.stdout.contains("Created agent billing"), "{}", out.stdout);
    assert!(out.stdout.contains("\"Production\""));
    let secret = out.stdout.lines().map(str::trim).find(|l| l.starts_with("kw_live_")).expect("the key is printed").to_string();
    assert!(out.stdout.contains("shown once"));

    let list = kw(&dir, &["agent", "list"]).ok().stdout;
    assert!(list.starts_with("NAME") && list.contains("billing") && list.contains("100/min"), "{list}");
    let list = kw(&dir, &["agent", "list", "--json"]).ok().json();
    assert_eq!(list[0]["scopes"], serde_json::json!(["read:all", "write:all"]));

    let show = kw(&dir, &["agent", "show", "billing"]).ok().stdout;
    assert!(show.contains("Billing service") && show.contains("Production"), "{show}");
    assert!(!show.contains(&secret), "show printed the full key");
    assert_eq!(kw(&dir, &["agent", "show", "billing", "--json"]).ok().json()["keys"].as_array().unwrap().len(), 1);

    assert_eq!(kw(&dir, &["agent", "disable", "billing", "--json"]).ok().json()["enabled"], false);
    let snap = kw(&dir, &["snapshot"]).ok().json();
    assert_eq!(snap["keys"][0]["agent_enabled"], false);
    assert_eq!(kw(&dir, &["agent", "enable", "billing", "--json"]).ok().json()["enabled"], true);

    kw(&dir, &["agent", "delete", "billing"]).ok();
    assert_eq!(kw(&dir, &["agent", "list", "--json"]).ok().json(), serde_json::json!([]));
    let snap = kw(&dir, &["snapshot"]).ok().json();
    assert_eq!(snap["keys"][0]["status"], "revoked", "deleting an agent revokes its keys");
}

#[test]
fn key_commands_work_end_to_end() {
    let dir = Dir::new("key");
    kw(&dir, &["scope", "add", "webhook", "--description", "Receive webhooks"]).ok();
    kw(&dir, &["agent", "create", "crm", "--scopes", "admin,webhook"]).ok();
    let created = kw(&dir, &["key", "create", "--agent", "crm", "--name", "sync", "--scopes", "read:all", "--ttl", "90d", "--rate", "10/s", "--path-prefix", "/v1/projects/42", "--json"]).ok().json();
    let secret = created["secret"].as_str().unwrap().to_string();
    let id = created["key"]["id"].as_str().unwrap().to_string();
    assert_eq!(created["key"]["path_prefixes"], serde_json::json!(["/v1/projects/42"]));

    let list = kw(&dir, &["key", "list"]).ok().stdout;
    let header = list.lines().next().unwrap();
    for col in ["ID", "NAME", "KEY", "AGENT", "SCOPES", "CREATED", "EXPIRES", "LAST USED", "STATUS"] {
        assert!(header.contains(col), "{header}");
    }
    let masked = format!("kw_live_…{}", &secret[secret.len() - 4..]);
    assert!(list.contains(&masked), "masked key {masked} not in:\n{list}");
    assert!(!list.contains(&secret));

    let expires = kw(&dir, &["key", "create", "--agent", "crm", "--name", "dated", "--expires", "2099-01-01T00:00:00Z", "--json"]).ok().json();
    assert_eq!(expires["key"]["expires_at"], "2099-01-01T00:00:00Z");

    let rotated = kw(&dir, &["key", "rotate", &id, "--grace", "2h", "--json"]).ok().json();
    assert_eq!(rotated["old"]["status"], "expiring");
    assert_eq!(rotated["new"]["key"]["name"], "sync");
    let human = kw(&dir, &["key", "rotate", rotated["new"]["key"]["id"].as_str().unwrap()]).ok().stdout;
    assert!(human.contains("the old key works until"), "{human}");

    let revoked = kw(&dir, &["key", "revoke", &id, "--json"]).ok().json();
    assert_eq!(revoked["status"], "revoked");

    let imported = kw_in(&dir.0, &["key", "import", "--agent", "crm", "--name", "kong", "--json"], Some("kong-legacy-key-0123456789\n")).ok().json();
    assert_eq!(imported["imported"], true);
    assert_eq!(imported["masked"], "kong…6789");
    let digest = keyward_core::Digest::of(b"apisix-key").to_hex();
    kw(&dir, &["key", "import", "--agent", "crm", "--name", "apisix", "--digest", &digest]).ok();
    let snap = kw(&dir, &["snapshot"]).ok();
    assert!(snap.stdout.contains(&digest));
    assert!(snap.stdout.contains(&keyward_core::Digest::of(b"kong-legacy-key-0123456789").to_hex()));

    let by_agent = kw(&dir, &["key", "list", "--agent", "crm", "--json"]).ok().json();
    assert_eq!(by_agent.as_array().unwrap().len(), 7);

    // A batch migration: one change, many keys; one bad line refuses all of it.
    let before = version(&dir);
    let lines = format!("legacy-key-aaaaaaaaaaaaaaaa\n# a comment\nsha256:{}\n\n", keyward_core::Digest::of(b"legacy-key-b").to_hex());
    let bad = format!("{lines}not a key\n");
    let out = kw_in(&dir.0, &["key", "import", "--agent", "crm", "--batch", "--name", "kong"], Some(&bad));
    assert!(out.stderr.starts_with("error: the key on stdin: line 5:"), "{}", out.stderr);
    assert_eq!(version(&dir), before, "a refused batch changed the store");
    let out = kw_in(&dir.0, &["key", "import", "--agent", "crm", "--batch", "--name", "kong", "--json"], Some(&lines)).ok().json();
    assert_eq!(out["imported"], 2);
    assert_eq!(version(&dir), before + 1, "a batch is one change");
    let names: Vec<String> = kw(&dir, &["key", "list", "--json"]).ok().json().as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap().to_string()).collect();
    assert!(names.contains(&"kong-1".to_string()) && names.contains(&"kong-3".to_string()), "{names:?}");

    let status = kw(&dir, &["status"]).ok().stdout;
    assert!(status.contains("snapshot version:") && status.contains("envoys:"), "{status}");
    let audit = kw(&dir, &["audit", "--json"]).ok().json();
    let actions: Vec<&str> = audit.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["scope.add", "agent.create", "key.create", "key.create", "key.rotate", "key.rotate", "key.revoke", "key.import", "key.import", "key.import_batch"]);
    assert!(audit.as_array().unwrap().iter().all(|e| e["actor"] == "cli:tester"));
    let text = kw(&dir, &["audit"]).ok().stdout;
    assert!(text.contains("key.revoke"));
}

#[test]
fn bad_arguments_name_themselves_and_change_nothing() {
    let dir = Dir::new("errors");
    kw(&dir, &["agent", "create", "crm", "--scopes", "read:all"]).ok();
    kw(&dir, &["key", "create", "--agent", "crm", "--name", "dup"]).ok();
    let before = version(&dir);
    let cases: &[(&[&str], &str)] = &[
        (&["agent", "create", "crm", "--scopes", "read:all"], "NAME"),
        (&["agent", "create", "bad/name", "--scopes", "read:all"], "NAME"),
        (&["agent", "create", "x", "--scopes", ""], "--scopes"),
        (&["agent", "create", "x", "--scopes", "a\"b"], "--scopes"),
        (&["agent", "create", "x", "--scopes", "a", "--rate", "5/week"], "--rate"),
        // Positional arguments are named as the user typed them (regression: issue 12, bug 6).
        (&["agent", "show", "ghost"], "NAME"),
        (&["agent", "disable", "ghost"], "NAME"),
        (&["agent", "delete", "ghost"], "NAME"),
        (&["agent", "update", "ghost", "--description", "x"], "NAME"),
        (&["agent", "update", "crm", "--add-scope", "Read:All"], "--add-scope"),
        (&["agent", "update", "crm", "--remove-scope", "admin"], "--remove-scope"),
        (&["agent", "update", "crm", "--burst", "5"], "--burst"),
        (&["agent", "update", "crm"], "error"),
        (&["key", "update", "key_missing", "--name", "x"], "ID"),
        (&["key", "update", "key_missing", "--ttl", "0s"], "--ttl"),
        (&["key", "create", "--agent", "crm", "--scopes", "read_all"], "--scopes"),
        (&["key", "create", "--agent", "crm", "--rate", "10/s", "--burst", "11"], "--burst"),
        (&["key", "rotate", "key_missing", "--ttl", "soon"], "--ttl"),
        (&["scope", "remove", "read:all"], "NAME"),
        (&["scope", "add", "Bad Scope"], "NAME"),
        (&["scope", "imply", "admin", "nosuch"], "B"),
        (&["key", "create", "--agent", "ghost"], "--agent"),
        (&["key", "create", "--agent", "crm", "--scopes", "admin"], "--scopes"),
        (&["key", "create", "--agent", "crm", "--expires", "2001-01-01T00:00:00Z"], "--expires"),
        (&["key", "create", "--agent", "crm", "--expires", "soon"], "--expires"),
        (&["key", "create", "--agent", "crm", "--ttl", "1y"], "--ttl"),
        (&["key", "create", "--agent", "crm", "--rate", "1/fortnight"], "--rate"),
        (&["key", "create", "--agent", "crm", "--name", "dup"], "--name"),
        (&["key", "create", "--agent", "crm", "--path-prefix", "v1"], "--path-prefix"),
        (&["key", "import", "--agent", "crm", "--digest", "123"], "--digest"),
        (&["key", "revoke", "key_missing"], "ID"),
        (&["key", "rotate", "key_missing"], "ID"),
        (&["key", "list", "--agent", "ghost"], "--agent"),
        (&["--key-prefix", "bad-", "key", "create", "--agent", "crm"], "--key-prefix"),
    ];
    for (args, flag) in cases {
        let out = kw(&dir, args);
        assert_ne!(out.code, 0, "{args:?} succeeded");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout: {}", out.stdout);
        if *flag == "error" {
            // No single argument is at fault: a plain message (regression: issue 12, bug 2).
            assert!(out.stderr.starts_with("error: ") && !out.stderr.starts_with("error: error"), "{args:?}: {}", out.stderr);
        } else {
            assert!(out.stderr.starts_with(&format!("error: {flag}: ")), "{args:?}: {}", out.stderr);
        }
        assert_eq!(version(&dir), before, "{args:?} changed the store");
    }
    // The agent-scoped subcommands say which agent they could not find.
    let out = kw(&dir, &["agent", "show", "ghost"]);
    assert!(out.stderr.contains("\"ghost\""), "{}", out.stderr);
    // Clap refuses malformed invocations itself, naming the argument.
    let out = kw(&dir, &["key", "create", "--agent", "crm", "--ttl", "1d", "--expires", "2099-01-01T00:00:00Z"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("--ttl") && out.stderr.contains("--expires"), "{}", out.stderr);
    let out = kw(&dir, &["agent", "create", "x"]);
    assert!(out.stderr.contains("--scopes"), "{}", out.stderr);
    // --json errors are JSON on stderr.
    let out = kw(&dir, &["key", "revoke", "key_missing", "--json"]);
    let err: serde_json::Value = serde_json::from_str(out.stderr.trim()).unwrap();
    assert_eq!((err["error"]["code"].as_str(), err["error"]["details"]["field"].as_str()), (Some("NOT_FOUND"), Some("id")));
    assert_eq!(version(&dir), before);
}

#[test]
fn without_connection_flags_the_default_store_is_used() {
    let dir = Dir::new("default");
    let mut cmd = bin();
    let out = cmd
        .args(["agent", "create", "local", "--scopes", "read:all"])
        .env_remove("KEYWARD_DB")
        .env_remove("KEYWARD_URL")
        .env("XDG_DATA_HOME", dir.0.join("data"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.0.join("data/keyward/keyward.db").is_file());
}

#[test]
fn the_cli_over_the_api_keeps_the_same_rules() {
    let dir = Dir::new("url");
    let token = "cli-test-admin-token-0123456789";
    let server = Server::start(&dir, Some(token), &[]);
    let other = Dir::new("url-client");
    let remote = |args: &[&str]| {
        let mut all = vec!["--url", server.url.as_str(), "--token", token];
        all.extend_from_slice(args);
        kw_in(&other.0, &all, None)
    };
    let created = remote(&["agent", "create", "remote", "--scopes", "read:all", "--json"]).ok().json();
    assert!(created["secret"].as_str().unwrap().starts_with("kw_live_"));
    let k = remote(&["key", "create", "--agent", "remote", "--name", "k1", "--json"]).ok().json();
    let id = k["key"]["id"].as_str().unwrap();
    remote(&["key", "rotate", id, "--grace", "1h"]).ok();
    assert_eq!(remote(&["key", "list", "--json"]).ok().json().as_array().unwrap().len(), 3);
    assert_eq!(remote(&["status", "--json"]).ok().json()["agents"], 1);
    let out = remote(&["key", "create", "--agent", "remote", "--scopes", "write:all"]);
    assert!(out.stderr.starts_with("error: --scopes: "), "{}", out.stderr);
    let out = remote(&["agent", "create", "remote", "--scopes", "read:all"]);
    assert!(out.stderr.starts_with("error: NAME: "), "{}", out.stderr);
    let out = kw_in(&other.0, &["--url", server.url.as_str(), "--token", "wrong-token-000000000", "agent", "list"], None);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains("admin token"), "{}", out.stderr);
    let out = kw_in(&other.0, &["--url", server.url.as_str(), "agent", "list"], None);
    assert!(out.stderr.contains("--token"), "{}", out.stderr);
    // The server's store holds what the remote CLI did.
    assert_eq!(kw_in(&dir.0, &["--db", dir.db().to_str().unwrap(), "agent", "list", "--json"], None).ok().json()[0]["name"], "remote");
}

#[test]
fn serve_prints_a_generated_admin_token_once_and_keeps_only_its_digest() {
    let dir = Dir::new("token");
    let mut server = Server::start(&dir, None, &[]);
    let out = keyward_testkit_poll(|| server.stdout().lines().map(str::trim).find(|l| l.starts_with("kwadm_")).map(str::to_string));
    let token = out;
    let ok = kw_in(&dir.0, &["--url", server.url.as_str(), "--token", &token, "agent", "list", "--json"], None);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    server.kill9();
    let again = Server::start(&dir, None, &[]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!again.stdout().contains("kwadm_"), "the token was printed twice");
    let ok = kw_in(&dir.0, &["--url", again.url.as_str(), "--token", &token, "agent", "list"], None);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let db = std::fs::read(dir.db()).unwrap();
    assert!(!db.windows(token.len()).any(|w| w == token.as_bytes()), "the admin token is stored in plaintext");
}

fn keyward_testkit_poll<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn readme_cli_reference_matches_help() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let subcommands = |args: &[&str]| -> Vec<String> {
        let mut cmd = bin();
        let out = cmd.args(args).arg("--help").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split("Commands:")
            .nth(1)
            .unwrap_or("")
            .lines()
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .filter(|c| c != "help")
            .collect()
    };
    let top = subcommands(&[]);
    assert!(top.len() >= 6, "{top:?}");
    for c in &top {
        assert!(readme.contains(&format!("keyward {c}")), "README.md lacks `keyward {c}`");
    }
    for group in ["agent", "key", "scope", "admin", "admin-token", "store"] {
        for c in subcommands(&[group]) {
            assert!(readme.contains(&format!("keyward {group} {c}")), "README.md lacks `keyward {group} {c}`");
        }
    }
    // And nothing in the README's CLI table that the binary lacks.
    let section = readme.split("## CLI reference").nth(1).unwrap().split("\n## ").next().unwrap();
    for line in section.lines().filter(|l| l.starts_with("| `keyward ")) {
        let words: Vec<&str> = line.trim_start_matches("| `keyward ").split(['`', ' ']).collect();
        assert!(top.iter().any(|c| c == words[0]), "README documents unknown `keyward {}`", words[0]);
        if ["agent", "key", "scope", "admin", "admin-token", "store"].contains(&words[0]) {
            assert!(subcommands(&[words[0]]).iter().any(|c| c == words[1]), "README documents unknown `keyward {} {}`", words[0], words[1]);
        }
    }
}
