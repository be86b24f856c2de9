//! Admins and roles against the real `keyward serve`: the server enforces each role, the audit
//! log names who acted, a disabled or replaced token is refused at once, only digests are
//! stored, and the CLI's `admin` and `audit` filters work the same on the store and over `--url`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use keyward_control::api::ROUTES;
use keyward_control::model::*;
use keyward_control::store::{Location, Store};
use serde_json::{json, Value};
use std::time::Duration;

const TOKEN: &str = "admins-bootstrap-token-0123456789";

/// `method path` with a bearer token and a JSON body: the status and the body.
fn call(url: &str, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    let req = ureq::request(method, &format!("{url}{path}")).timeout(Duration::from_secs(10)).set("authorization", &format!("Bearer {token}"));
    let result = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    (resp.status(), resp.into_json().unwrap_or(Value::Null))
}

/// A store, a `keyward serve` on it, and the CLI both on the store and through the server.
struct Stack {
    dir: Dir,
    server: Server,
    /// How the CLI on the store names it: `--db FILE` or `--store postgres://…`.
    store_args: Vec<String>,
}

impl Stack {
    fn sqlite(tag: &str) -> Stack {
        let dir = Dir::new(tag);
        let server = Server::start(&dir, Some(TOKEN), &[]);
        let store_args = vec!["--db".into(), dir.db().display().to_string()];
        Stack { dir, server, store_args }
    }

    fn postgres(tag: &str) -> Stack {
        let url = postgres_database(tag);
        let dir = Dir::new(tag);
        let server = Server::start(&dir, Some(TOKEN), &[("KEYWARD_STORE", &url)]);
        Stack { dir, server, store_args: vec!["--store".into(), url] }
    }

    /// The CLI on the store itself, as `cli:tester`.
    fn local(&self, args: &[&str]) -> Out {
        let mut all: Vec<&str> = self.store_args.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        kw_in(&self.dir.0, &all, None)
    }

    /// The CLI through the server's admin API with `token`.
    fn remote(&self, token: &str, args: &[&str]) -> Out {
        let mut all = vec!["--url", self.server.url.as_str(), "--token", token];
        all.extend_from_slice(args);
        kw_in(&self.dir.0, &all, None)
    }

    fn call(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        call(&self.server.url, method, path, token, body)
    }

    /// Creates an admin through the API with the bootstrap token; its personal token.
    fn admin(&self, name: &str, role: &str) -> String {
        let made = self.remote(TOKEN, &["admin", "create", name, "--role", role, "--json"]).ok().json();
        assert_eq!((made["name"].as_str(), made["role"].as_str(), made["status"].as_str()), (Some(name), Some(role), Some("active")));
        made["token"].as_str().unwrap().to_string()
    }

    fn audit(&self) -> Vec<Value> {
        self.local(&["audit", "--limit", "1000", "--json"]).ok().json().as_array().unwrap().clone()
    }
}

/// `(actor, action)` of each audit entry, oldest first.
fn acts(entries: &[Value]) -> Vec<(String, String)> {
    entries.iter().map(|e| (e["actor"].as_str().unwrap().to_string(), e["action"].as_str().unwrap().to_string())).collect()
}

fn pair(actor: &str, action: &str) -> (String, String) {
    (actor.to_string(), action.to_string())
}

/// The role each change of the admin API needs (PRODUCT.md, "admins"): any change to agents or
/// keys takes an editor; the scope catalogue and the admins take an owner. Reads take any role.
fn role_needed(method: &str, path: &str) -> &'static str {
    match (method, path) {
        ("GET", _) => "viewer",
        (_, p) if p.starts_with("/v1/scopes") || p.starts_with("/v1/admins") => "owner",
        (_, p) if p.starts_with("/v1/agents") || p.starts_with("/v1/keys") => "editor",
        other => panic!("{other:?}: a new change route; say here which role it needs"),
    }
}

fn rank(role: &str) -> u8 {
    ["viewer", "editor", "owner"].iter().position(|r| *r == role).unwrap() as u8
}

/// The admin API's routes (not the feed, not the probes), with their path parameters filled.
fn admin_routes(agent: &str, key: &str) -> Vec<(&'static str, &'static str, String)> {
    ROUTES
        .iter()
        .filter(|(_, p)| p.starts_with("/v1/") && !p.starts_with("/v1/feed"))
        .map(|(m, p)| (*m, *p, p.replace("{name}", agent).replace("{id}", key)))
        .collect()
}

#[test]
fn every_change_needs_its_role_and_a_refusal_changes_nothing() {
    let stack = Stack::sqlite("roles-table");
    let tokens = [("viewer", stack.admin("vera", "viewer")), ("editor", stack.admin("eddie", "editor")), ("owner", stack.admin("olivia", "owner"))];
    let created = stack.remote(TOKEN, &["agent", "create", "crm", "--scopes", "read:all", "--json"]).ok().json();
    let key = created["key"]["id"].as_str().unwrap().to_string();
    let before = stack.audit();
    let version = stack.local(&["status", "--json"]).ok().json()["snapshot_version"].clone();

    // Every change route, every role, aimed at nothing that exists (or with an empty body), so
    // that an allowed request fails on its own terms (400, 404) and none changes anything.
    for (method, route, path) in admin_routes("nobody", "key_nobody").into_iter().filter(|(m, _, _)| *m != "GET") {
        let need = role_needed(method, route);
        for (role, token) in &tokens {
            let (status, body) = stack.call(method, &path, token, Some(json!({})));
            if rank(role) < rank(need) {
                assert_eq!((status, body["error"]["code"].as_str()), (403, Some("FORBIDDEN")), "{role} {method} {path}: {body}");
                let message = body["error"]["message"].as_str().unwrap();
                assert!(message.contains(&format!("the {role} role cannot")) && message.contains(&format!("the {need} role")), "{message}");
            } else {
                assert!(![401, 403, 404, 405].contains(&status) || body["error"]["code"] == "NOT_FOUND" && !body["error"]["message"].as_str().unwrap().starts_with("there is no route"), "{role} {method} {path}: {status} {body}");
            }
        }
    }
    assert_eq!(stack.audit(), before, "a refused (or failed) change was audited");
    assert_eq!(stack.local(&["status", "--json"]).ok().json()["snapshot_version"], version);

    // Every read answers every role, the admins included.
    for (method, _, path) in admin_routes("crm", &key).into_iter().filter(|(m, _, _)| *m == "GET") {
        for (role, token) in &tokens {
            let (status, body) = stack.call(method, &path, token, None);
            assert_eq!(status, 200, "{role} {method} {path}: {body}");
        }
    }
    let (_, admins) = stack.call("GET", "/v1/admins", &tokens[0].1, None);
    let names: Vec<&str> = admins.as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["eddie", "olivia", "vera"]);
    assert!(!admins.to_string().contains("kwadm_") && !admins.to_string().contains("digest"), "the admin list shows a token: {admins}");
}

/// The roles in use, through the CLI over the API: what each may do, and who the audit log says
/// did it. The same on both engines.
fn roles_are_enforced_and_the_audit_log_names_the_admin(stack: Stack) {
    let vera = stack.admin("vera", "viewer");
    let eddie = stack.admin("eddie", "editor");
    let olivia = stack.admin("olivia", "owner");
    let created = stack.remote(TOKEN, &["agent", "create", "crm", "--scopes", "read:all", "--json"]).ok().json();
    let key = created["key"]["id"].as_str().unwrap().to_string();
    let before = stack.audit();

    // A viewer reads everything and changes nothing.
    let refused: &[&[&str]] = &[
        &["agent", "create", "billing", "--scopes", "read:all"],
        &["key", "revoke", &key],
        &["key", "create", "--agent", "crm"],
        &["agent", "disable", "crm"],
        &["scope", "add", "billing:read"],
        &["admin", "create", "mallory", "--role", "owner"],
        &["admin", "disable", "eddie"],
        &["admin", "token", "eddie"],
    ];
    for args in refused {
        let out = stack.remote(&vera, args);
        assert_eq!(out.code, 3, "{args:?}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{args:?}: {}", out.stdout);
        assert!(out.stderr.starts_with("error: ") && out.stderr.contains("the viewer role cannot"), "{args:?}: {}", out.stderr);
    }
    for args in [&["agent", "list"][..], &["key", "list"], &["agent", "show", "crm"], &["scope", "list"], &["status"], &["audit"], &["admin", "list"], &["usage"], &["snapshot"]] {
        stack.remote(&vera, args).ok();
    }
    assert_eq!(stack.audit(), before, "a viewer changed something");

    // An editor manages agents and keys, not the catalogue or the admins.
    stack.remote(&eddie, &["agent", "create", "billing", "--scopes", "read:all"]).ok();
    let k = stack.remote(&eddie, &["key", "create", "--agent", "crm", "--name", "ci", "--json"]).ok().json();
    stack.remote(&eddie, &["key", "revoke", k["key"]["id"].as_str().unwrap()]).ok();
    for args in [&["scope", "add", "billing:read"][..], &["scope", "imply", "admin", "read:all"], &["admin", "create", "mallory", "--role", "viewer"]] {
        let out = stack.remote(&eddie, args);
        assert_eq!(out.code, 3, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains("the editor role cannot"), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains("it takes the owner role"), "{}", out.stderr);
    }
    let (status, body) = stack.call("POST", "/v1/scopes", &eddie, Some(json!({"name": "billing:read"})));
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("FORBIDDEN")), "{body}");

    // An owner does all of it.
    stack.remote(&olivia, &["scope", "add", "billing:read", "--description", "Read invoices"]).ok();
    stack.remote(&olivia, &["agent", "update", "billing", "--add-scope", "billing:read"]).ok();
    stack.remote(&olivia, &["admin", "create", "frank", "--role", "viewer"]).ok();
    stack.remote(&olivia, &["admin", "disable", "frank"]).ok();
    // And the CLI on the store is `cli:tester`, as before admins existed.
    stack.local(&["agent", "disable", "crm"]).ok();

    let after = stack.audit();
    assert_eq!(
        acts(&after[before.len()..]),
        [
            pair("eddie", "agent.create"),
            pair("eddie", "key.create"),
            pair("eddie", "key.revoke"),
            pair("olivia", "scope.add"),
            pair("olivia", "agent.update"),
            pair("olivia", "admin.create"),
            pair("olivia", "admin.disable"),
            pair("cli:tester", "agent.disable"),
        ]
    );
    // The bootstrap token is `api`.
    assert_eq!(acts(&before), [pair("api", "admin.create"), pair("api", "admin.create"), pair("api", "admin.create"), pair("api", "agent.create")]);
}

#[test]
fn roles_are_enforced_and_the_audit_log_names_the_admin_on_sqlite() {
    roles_are_enforced_and_the_audit_log_names_the_admin(Stack::sqlite("roles"));
}

#[test]
fn roles_are_enforced_and_the_audit_log_names_the_admin_on_postgres() {
    roles_are_enforced_and_the_audit_log_names_the_admin(Stack::postgres("roles"));
}

#[test]
fn a_disabled_admin_or_a_replaced_token_gets_401_at_once_and_no_token_is_stored() {
    let stack = Stack::sqlite("tokens");
    // An admin made by the CLI on the store works through the server at once.
    let out = stack.local(&["admin", "create", "eddie", "--role", "editor"]).ok();
    let first = out.stdout.lines().map(str::trim).find(|l| l.starts_with("kwadm_")).expect("the token is printed").to_string();
    assert_eq!(out.stdout.matches(&first).count(), 1, "the token is printed once: {}", out.stdout);
    assert!(out.stdout.contains("shown once") && out.stdout.contains("only its SHA-256 digest is kept"), "{}", out.stdout);
    assert!(out.stdout.contains("--token") && out.stdout.contains("/console"), "says how to use it: {}", out.stdout);
    let unauthorized = |token: &str| {
        let (status, body) = stack.call("GET", "/v1/agents", token, None);
        status == 401 && body["error"]["code"] == "UNAUTHORIZED"
    };
    assert_eq!(stack.call("GET", "/v1/agents", &first, None).0, 200);

    // Disabled: refused at once, with no wait for any watcher; enabled: the same token again.
    stack.local(&["admin", "disable", "eddie"]).ok();
    assert!(unauthorized(&first));
    let listed = stack.local(&["admin", "list", "--json"]).ok().json();
    assert_eq!((listed[0]["status"].as_str(), listed[0]["disabled_at"].is_string()), (Some("disabled"), true));
    let out = stack.remote(&first, &["agent", "list"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    stack.local(&["admin", "enable", "eddie"]).ok();
    assert_eq!(stack.call("GET", "/v1/agents", &first, None).0, 200);

    // A new token over the API: the old one is refused at once, the new one works.
    let renewed = stack.remote(TOKEN, &["admin", "token", "eddie", "--json"]).ok().json();
    let second = renewed["token"].as_str().unwrap().to_string();
    assert!(second.starts_with("kwadm_") && second != first);
    assert!(unauthorized(&first));
    assert_eq!(stack.call("GET", "/v1/agents", &second, None).0, 200);
    // A new token from the CLI on the store, in human form, printed once.
    let out = stack.local(&["admin", "token", "eddie"]).ok();
    let third = out.stdout.lines().map(str::trim).find(|l| l.starts_with("kwadm_")).unwrap().to_string();
    assert_eq!(out.stdout.matches("kwadm_").count(), 1, "{}", out.stdout);
    assert!(out.stdout.contains("the old one") && out.stdout.contains("shown once"), "{}", out.stdout);
    assert!(unauthorized(&second));
    // Not even its own token: that takes an owner.
    let own = stack.remote(&third, &["admin", "token", "eddie", "--json"]);
    assert_eq!(own.code, 3, "an editor does not manage admins, even itself: {}", own.stderr);
    assert_eq!(stack.call("GET", "/v1/agents", &third, None).0, 200);
    // A disabled admin gets no new token until it is enabled again.
    stack.remote(TOKEN, &["admin", "disable", "eddie"]).ok();
    assert!(unauthorized(&third));
    let out = stack.remote(TOKEN, &["admin", "token", "eddie"]);
    assert!(out.code != 0 && out.stderr.starts_with("error: NAME: ") && out.stderr.contains("disabled"), "{}", out.stderr);

    // No token in any file: the store (and its WAL), the lock, serve's log.
    let tokens = [TOKEN, &first, &second, &third];
    let mut files = 0;
    for entry in std::fs::read_dir(&stack.dir.0).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        files += 1;
        let bytes = std::fs::read(&path).unwrap();
        for t in tokens {
            assert!(!bytes.windows(t.len()).any(|w| w == t.as_bytes()), "{} holds a token in plaintext", path.display());
        }
    }
    assert!(files >= 2, "the store and serve's log were read");
    let digest = keyward_core::Digest::of(third.as_bytes()).to_hex();
    let db = std::fs::read(stack.dir.db()).unwrap();
    let wal = std::fs::read(stack.dir.0.join("keyward.db-wal")).unwrap_or_default();
    let holds = |bytes: &[u8]| bytes.windows(digest.len()).any(|w| w == digest.as_bytes());
    assert!(holds(&db) || holds(&wal), "the token's digest is what the store keeps");
}

#[test]
fn bad_admin_arguments_name_themselves_and_change_nothing() {
    let stack = Stack::sqlite("admin-errors");
    stack.local(&["admin", "create", "eddie", "--role", "editor"]).ok();
    let vera = stack.admin("vera", "viewer");
    let state = || (stack.local(&["admin", "list", "--json"]).ok().json(), stack.audit());
    let before = state();
    let cases: &[(&[&str], &str)] = &[
        (&["admin", "create", "root", "--role", "root"], "--role"),
        (&["admin", "create", "root", "--role", "Owner"], "--role"),
        (&["admin", "create", "bad/name", "--role", "viewer"], "NAME"),
        (&["admin", "create", "api", "--role", "viewer"], "NAME"),
        (&["admin", "create", "eddie", "--role", "owner"], "NAME"),
        (&["admin", "disable", "ghost"], "NAME"),
        (&["admin", "enable", "ghost"], "NAME"),
        (&["admin", "token", "ghost"], "NAME"),
    ];
    for backend in ["store", "api"] {
        let run = |args: &[&str]| if backend == "store" { stack.local(args) } else { stack.remote(TOKEN, args) };
        for (args, flag) in cases {
            let out = run(args);
            assert_eq!(out.code, 2, "{backend} {args:?}: {}", out.stderr);
            assert!(out.stdout.is_empty(), "{backend} {args:?} printed {}", out.stdout);
            assert!(out.stderr.starts_with(&format!("error: {flag}: ")), "{backend} {args:?}: {}", out.stderr);
            assert_eq!(state(), before, "{backend} {args:?} changed something");
        }
        let out = run(&["admin", "token", "ghost"]);
        assert!(out.stderr.contains("\"ghost\""), "{backend}: the missing admin is named: {}", out.stderr);
        let out = run(&["admin", "create", "x", "--role", "root"]);
        assert!(out.stderr.contains("owner, editor or viewer"), "{backend}: the roles are listed: {}", out.stderr);
        // --json errors are JSON on stderr, naming the field.
        let out = run(&["admin", "create", "x", "--role", "root", "--json"]);
        let err: Value = serde_json::from_str(out.stderr.trim()).unwrap();
        assert_eq!((err["error"]["code"].as_str(), err["error"]["details"]["field"].as_str()), (Some("VALIDATION_ERROR"), Some("role")));
    }
    // Clap refuses a missing --role itself, naming it.
    let out = stack.local(&["admin", "create", "x"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("--role"), "{}", out.stderr);
    // A role that may not: refused as FORBIDDEN, exit 3, nothing changed.
    let out = stack.remote(&vera, &["admin", "create", "x", "--role", "viewer"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains("it takes the owner role"), "{}", out.stderr);
    assert_eq!(state(), before);
    // A refused first write leaves no store behind.
    let empty = Dir::new("admin-first");
    let out = kw(&empty, &["admin", "create", "x", "--role", "root"]);
    assert!(out.stderr.starts_with("error: --role: "), "{}", out.stderr);
    assert!(!empty.db().exists(), "a refused admin create made a store");
    kw(&empty, &["admin", "create", "first", "--role", "owner"]).ok();
    assert_eq!(kw(&empty, &["admin", "list", "--json"]).ok().json()[0]["name"], "first");
}

#[test]
fn audit_filters_by_actor_agent_and_action_on_both_backends() {
    let stack = Stack::sqlite("audit-filters");
    let eddie = stack.admin("eddie", "editor");
    stack.local(&["agent", "create", "crm", "--scopes", "read:all"]).ok();
    stack.remote(&eddie, &["agent", "create", "billing", "--scopes", "read:all"]).ok();
    let k = stack.remote(&eddie, &["key", "create", "--agent", "crm", "--name", "ci", "--json"]).ok().json();
    let id = k["key"]["id"].as_str().unwrap().to_string();
    stack.remote(TOKEN, &["key", "revoke", &id]).ok();
    stack.local(&["key", "create", "--agent", "billing", "--name", "ci"]).ok();
    stack.remote(&eddie, &["agent", "update", "crm", "--description", "CRM sync"]).ok();
    // A name with `_`, which SQL LIKE would take for any one character.
    stack.local(&["agent", "create", "crm_x", "--scopes", "read:all"]).ok();
    stack.local(&["agent", "create", "crmAx", "--scopes", "read:all"]).ok();

    let check = |filters: &[&str], want: &[(&str, &str)]| {
        let want: Vec<(String, String)> = want.iter().map(|(a, b)| pair(a, b)).collect();
        let mut args = vec!["audit", "--json"];
        args.extend_from_slice(filters);
        let on_store = stack.local(&args).ok().json();
        assert_eq!(acts(on_store.as_array().unwrap()), want, "{filters:?} on the store");
        let over_api = stack.remote(&eddie, &args).ok().json();
        assert_eq!(over_api, on_store, "{filters:?}: the API and the store disagree");
    };
    check(&["--actor", "eddie"], &[("eddie", "agent.create"), ("eddie", "key.create"), ("eddie", "agent.update")]);
    check(&["--actor", "api"], &[("api", "admin.create"), ("api", "key.revoke")]);
    check(&["--actor", "cli:tester"], &[("cli:tester", "agent.create"), ("cli:tester", "key.create"), ("cli:tester", "agent.create"), ("cli:tester", "agent.create")]);
    check(&["--agent", "crm"], &[("cli:tester", "agent.create"), ("eddie", "key.create"), ("api", "key.revoke"), ("eddie", "agent.update")]);
    check(&["--agent", "crm_x"], &[("cli:tester", "agent.create")]);
    check(&["--action", "key"], &[("eddie", "key.create"), ("api", "key.revoke"), ("cli:tester", "key.create")]);
    check(&["--action", "key.revoke"], &[("api", "key.revoke")]);
    check(&["--action", "admin"], &[("api", "admin.create")]);
    check(&["--agent", "billing", "--actor", "cli:tester"], &[("cli:tester", "key.create")]);
    check(&["--agent", "crm", "--action", "agent", "--actor", "eddie"], &[("eddie", "agent.update")]);
    check(&["--actor", "nobody"], &[]);
    check(&["--action", "key", "--limit", "1"], &[("cli:tester", "key.create")]);
    // The human table says the same.
    let text = stack.local(&["audit", "--actor", "eddie"]).ok().stdout;
    assert!(text.starts_with("SEQ") && text.lines().count() == 4 && text.contains("agent.update"), "{text}");
}

#[test]
fn admin_and_admin_token_say_which_is_which() {
    let top = bin().arg("--help").output().unwrap();
    let top = String::from_utf8_lossy(&top.stdout).to_string();
    let line = |name: &str| top.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap_or_else(|| panic!("no {name} in {top}")).to_string();
    assert!(line("admin").contains("personal token") && line("admin").contains("owner, editor, viewer"), "{}", line("admin"));
    assert!(line("admin-token").contains("bootstrap") && line("admin-token").contains("keyward admin"), "{}", line("admin-token"));
    let help = bin().args(["admin", "create", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    assert!(help.contains("--role") && help.contains("owner") && help.contains("editor") && help.contains("viewer"), "{help}");
}

/// Both engines, each on a fresh store. The SQLite file lives as long as the returned dir.
fn engines(tag: &str) -> Vec<(Location, Option<Dir>)> {
    let dir = Dir::new(tag);
    let sqlite = Location::Sqlite(dir.db());
    let pg = Location::parse(&postgres_database(tag)).unwrap();
    vec![(sqlite, Some(dir)), (pg, None)]
}

#[test]
fn admins_and_the_filtered_audit_read_the_same_on_both_engines() {
    let mut seen = Vec::new();
    for (loc, _dir) in engines("admins") {
        let mut s = Store::open_at(&loc).unwrap();
        s.actor = "cli:tester".into();
        let made = s.create_admin(&NewAdmin { name: "eddie".into(), role: "editor".into() }).unwrap();
        s.create_admin(&NewAdmin { name: "vera".into(), role: "viewer".into() }).unwrap();
        assert_eq!(s.create_admin(&NewAdmin { name: "eddie".into(), role: "owner".into() }).unwrap_err().code(), "CONFLICT", "{loc:?}");
        assert_eq!(s.create_admin(&NewAdmin { name: "x".into(), role: "root".into() }).unwrap_err().field(), Some("role"), "{loc:?}");
        let digest = keyward_core::Digest::of(made.token.as_bytes());
        assert_eq!(s.admin_by_token(&digest).unwrap(), Some(Actor { name: "eddie".into(), role: AdminRole::Editor }), "{loc:?}");
        s.set_admin_enabled("vera", false).unwrap();
        assert!(matches!(s.set_admin_enabled("ghost", false), Err(keyward_control::error::Error::NotFound { .. })), "{loc:?}");
        let renewed = s.new_admin_token("eddie").unwrap();
        assert_eq!(s.admin_by_token(&digest).unwrap(), None, "{loc:?}: the old token stops working");
        assert!(s.admin_by_token(&keyward_core::Digest::of(renewed.token.as_bytes())).unwrap().is_some());

        // Changes by three actors, about two agents (one with `_` in its name).
        s.actor = "eddie".into();
        s.create_agent(&NewAgent { name: "crm".into(), scopes: vec!["read:all".into()], ..Default::default() }).unwrap();
        let k = s.create_key(&NewKey { agent: "crm".into(), name: Some("ci".into()), ..Default::default() }).unwrap();
        s.actor = "api".into();
        s.create_agent(&NewAgent { name: "crm_x".into(), scopes: vec!["read:all".into()], ..Default::default() }).unwrap();
        s.create_agent(&NewAgent { name: "crmAx".into(), scopes: vec!["read:all".into()], ..Default::default() }).unwrap();
        s.revoke_key(&k.key.id).unwrap();
        s.actor = "olivia".into();
        s.update_agent("crm", &AgentUpdate { description: Some("CRM".into()), ..Default::default() }).unwrap();

        let mut filtered = |actor: Option<&str>, agent: Option<&str>, action: Option<&str>, limit: u32| -> Vec<String> {
            let f = AuditFilter { actor: actor.map(str::to_string), agent: agent.map(str::to_string), action: action.map(str::to_string) };
            s.audit_filtered(limit, &f).unwrap().into_iter().map(|e| format!("{} {}", e.actor, e.action)).collect()
        };
        let results = vec![
            filtered(None, None, None, 100),
            filtered(Some("eddie"), None, None, 100),
            filtered(None, Some("crm"), None, 100),
            filtered(None, Some("crm_x"), None, 100),
            filtered(None, None, Some("key"), 100),
            filtered(None, None, Some("admin"), 100),
            filtered(None, None, Some("admin.token"), 100),
            filtered(Some("api"), Some("crm"), Some("key.revoke"), 100),
            filtered(None, None, Some("agent"), 2),
        ];
        let want: Vec<Vec<&str>> = vec![
            vec![
                "cli:tester admin.create",
                "cli:tester admin.create",
                "cli:tester admin.disable",
                "cli:tester admin.token",
                "eddie agent.create",
                "eddie key.create",
                "api agent.create",
                "api agent.create",
                "api key.revoke",
                "olivia agent.update",
            ],
            vec!["eddie agent.create", "eddie key.create"],
            vec!["eddie agent.create", "eddie key.create", "api key.revoke", "olivia agent.update"],
            vec!["api agent.create"],
            vec!["eddie key.create", "api key.revoke"],
            vec!["cli:tester admin.create", "cli:tester admin.create", "cli:tester admin.disable", "cli:tester admin.token"],
            vec!["cli:tester admin.token"],
            vec!["api key.revoke"],
            vec!["api agent.create", "olivia agent.update"],
        ];
        assert_eq!(results, want, "{loc:?}");
        let admins = s.list_admins().unwrap();
        let summary: Vec<String> = admins.iter().map(|a| format!("{} {} {}", a.name, a.role.as_str(), a.status)).collect();
        assert_eq!(summary, ["eddie editor active", "vera viewer disabled"], "{loc:?}");
        seen.push((results, summary));
    }
    assert_eq!(seen[0], seen[1], "SQLite and PostgreSQL disagree");
}
