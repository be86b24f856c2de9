//! The admin API, called in-process through its `Router`: every operation, every validation
//! error, and the admin token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use keyward_control::api::{router, AppState, MAX_BODY_BYTES};
use keyward_control::store::Store;
use keyward_core::Digest;
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

const TOKEN: &str = "test-admin-token-0123456789";

struct Api {
    app: axum::Router,
    state: Arc<AppState>,
}

fn api() -> Api {
    let mut store = Store::memory().unwrap();
    store.actor = "api".into();
    let state = Arc::new(AppState::new(store, Digest::of(TOKEN.as_bytes()), None).unwrap());
    Api { app: router(Arc::clone(&state)), state }
}

impl Api {
    async fn call_with(&self, method: &str, path: &str, body: Option<Value>, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let resp = self.app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("{method} {path}: not JSON: {}", String::from_utf8_lossy(&bytes)));
        (status, value)
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_with(method, path, body, Some(TOKEN)).await
    }

    /// A GET answered with whatever it is: its status, content type and body.
    async fn get_raw(&self, path: &str) -> (StatusCode, String, Vec<u8>) {
        let req = Request::builder().method("GET").uri(path).header("authorization", format!("Bearer {TOKEN}"));
        let resp = self.app.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let (status, kind) = (resp.status(), resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string());
        (status, kind, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
    }

    fn version(&self) -> u64 {
        self.state.store.lock().unwrap().snapshot_version().unwrap()
    }

    async fn agent(&self, name: &str, scopes: &[&str]) -> Value {
        let (s, v) = self.call("POST", "/v1/agents", Some(json!({"name": name, "scopes": scopes}))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }
}

fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str, field: Option<&str>) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["success"], false);
    assert_eq!(got.1["error"]["code"], code, "{}", got.1);
    assert!(got.1["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    if let Some(f) = field {
        assert_eq!(got.1["error"]["details"]["field"], f, "{}", got.1);
    }
}

#[tokio::test]
async fn health_and_readiness_need_no_token() {
    let api = api();
    let (s, v) = api.call_with("GET", "/healthz", None, None).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, v) = api.call_with("GET", "/readyz", None, None).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ready")));
}

#[tokio::test]
async fn a_missing_or_wrong_token_gets_401_json() {
    let api = api();
    for token in [None, Some("wrong-token"), Some("")] {
        let got = api.call_with("GET", "/v1/agents", None, token).await;
        assert_error(&got, StatusCode::UNAUTHORIZED, "UNAUTHORIZED", None);
        let got = api.call_with("POST", "/v1/agents", Some(json!({"name": "x", "scopes": ["a"]})), token).await;
        assert_error(&got, StatusCode::UNAUTHORIZED, "UNAUTHORIZED", None);
    }
    assert_eq!(api.version(), 0, "an unauthorised request changed the store");
}

#[tokio::test]
async fn agent_lifecycle() {
    let api = api();
    let created = api.agent("billing", &["read:all", "write:all"]).await;
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("kw_live_"));
    assert_eq!(created["key"]["name"], "Production");
    assert_eq!(created["agent"]["active_keys"], 1);
    assert!(!created["key"]["masked"].as_str().unwrap().contains(&secret[8..20]));

    let (s, list) = api.call("GET", "/v1/agents", None).await;
    assert_eq!((s, list.as_array().unwrap().len()), (StatusCode::OK, 1));
    let (s, shown) = api.call("GET", "/v1/agents/billing", None).await;
    assert_eq!((s, shown["keys"].as_array().unwrap().len()), (StatusCode::OK, 1));

    let (s, v) = api.call("POST", "/v1/agents/billing/disable", None).await;
    assert_eq!((s, v["enabled"].as_bool()), (StatusCode::OK, Some(false)));
    let (s, v) = api.call("POST", "/v1/agents/billing/enable", None).await;
    assert_eq!((s, v["enabled"].as_bool()), (StatusCode::OK, Some(true)));

    let before = api.version();
    let (s, _) = api.call("DELETE", "/v1/agents/billing", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(api.version(), before + 1);
    // Deleting revokes every key; the snapshot says so.
    let (_, snap) = api.call("GET", "/v1/snapshot", None).await;
    assert_eq!(snap["keys"][0]["status"], "revoked");
    assert_error(&api.call("GET", "/v1/agents/billing", None).await, StatusCode::NOT_FOUND, "NOT_FOUND", Some("agent"));
    // The name is free again.
    api.agent("billing", &["read:all"]).await;
}

#[tokio::test]
async fn agent_validation_errors_change_nothing() {
    let api = api();
    api.agent("taken", &["read:all"]).await;
    let before = api.version();
    let cases = [
        (json!({"name": "", "scopes": ["read:all"]}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "name"),
        (json!({"name": "a/b", "scopes": ["read:all"]}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "name"),
        (json!({"name": "x", "scopes": []}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "scopes"),
        (json!({"name": "x", "scopes": ["read all"]}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "scopes"),
        (json!({"name": "x", "scopes": ["a"], "rate": "10/week"}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "rate"),
        (json!({"name": "x", "scopes": ["a"], "description": "a\u{0}b"}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "description"),
        (json!({"name": "taken", "scopes": ["read:all"]}), StatusCode::CONFLICT, "CONFLICT", "name"),
        (json!({"name": "x", "scopes": ["a"], "colour": "red"}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "request"),
        (json!("not an object"), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "request"),
    ];
    for (body, status, code, field) in cases {
        let got = api.call("POST", "/v1/agents", Some(body.clone())).await;
        assert_error(&got, status, code, Some(field));
    }
    for path in ["/v1/agents/nobody/disable", "/v1/agents/nobody/enable"] {
        assert_error(&api.call("POST", path, None).await, StatusCode::NOT_FOUND, "NOT_FOUND", Some("agent"));
    }
    assert_error(&api.call("DELETE", "/v1/agents/nobody", None).await, StatusCode::NOT_FOUND, "NOT_FOUND", Some("agent"));
    assert_eq!(api.version(), before, "a refused request changed the store");
}

#[tokio::test]
async fn key_lifecycle_create_list_revoke_rotate_import() {
    let api = api();
    let (s, _) = api.call("POST", "/v1/scopes", Some(json!({"name": "webhook", "description": "Receive webhooks"}))).await;
    assert_eq!(s, StatusCode::CREATED);
    api.agent("crm", &["admin", "webhook"]).await;
    // admin implies read:all, so a read:all key narrows the agent.
    let (s, k) = api
        .call("POST", "/v1/keys", Some(json!({"agent": "crm", "name": "sync", "scopes": ["read:all"], "ttl": "90d", "rate": "10/s", "path_prefixes": ["/v1/projects/42"]})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{k}");
    let id = k["key"]["id"].as_str().unwrap().to_string();
    assert_eq!(k["key"]["scopes"], json!(["read:all"]));
    assert_eq!(k["key"]["rate_limit"], "10/s");
    assert_eq!(k["key"]["status"], "active");

    let (_, keys) = api.call("GET", "/v1/keys?agent=crm", None).await;
    assert_eq!(keys.as_array().unwrap().len(), 2);

    let (s, rotated) = api.call("POST", &format!("/v1/keys/{id}/rotate"), Some(json!({"grace": "1h"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{rotated}");
    assert_eq!(rotated["old"]["status"], "expiring");
    assert_eq!(rotated["old"]["rotated_to"], rotated["new"]["key"]["id"]);
    assert_eq!(rotated["new"]["key"]["name"], "sync");
    assert_eq!(rotated["new"]["key"]["scopes"], json!(["read:all"]));
    assert_eq!(rotated["new"]["key"]["path_prefixes"], json!(["/v1/projects/42"]));
    assert_eq!(rotated["new"]["key"]["rate_limit"], "10/s");
    assert_ne!(rotated["new"]["secret"], k["secret"]);
    // Both keys are live in the snapshot during the grace period.
    let (_, snap) = api.call("GET", "/v1/snapshot", None).await;
    let live = snap["keys"].as_array().unwrap().iter().filter(|r| r["status"] == "active").count();
    assert_eq!(live, 3);

    let (s, revoked) = api.call("POST", &format!("/v1/keys/{id}/revoke"), None).await;
    assert_eq!((s, revoked["status"].as_str()), (StatusCode::OK, Some("revoked")));

    let (s, imported) = api.call("POST", "/v1/keys/import", Some(json!({"agent": "crm", "name": "from-kong", "secret": "kong-legacy-key-abcdef0123"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{imported}");
    assert_eq!(imported["imported"], true);
    let digest = Digest::of(b"apisix-key").to_hex();
    let (s, _) = api.call("POST", "/v1/keys/import", Some(json!({"agent": "crm", "name": "from-apisix", "digest": digest}))).await;
    assert_eq!(s, StatusCode::CREATED);
    let (_, snap) = api.call("GET", "/v1/snapshot", None).await;
    let digests: Vec<&str> = snap["keys"].as_array().unwrap().iter().map(|r| r["digest"].as_str().unwrap()).collect();
    assert!(digests.contains(&digest.as_str()));
    assert!(digests.contains(&Digest::of(b"kong-legacy-key-abcdef0123").to_hex().as_str()));
    assert!(!snap.to_string().contains("kong-legacy-key"), "a plaintext key reached the snapshot");
}

#[tokio::test]
async fn key_validation_errors_change_nothing() {
    let api = api();
    api.agent("crm", &["read:all"]).await;
    let (_, first) = api.call("POST", "/v1/keys", Some(json!({"agent": "crm", "name": "dup"}))).await;
    let id = first["key"]["id"].as_str().unwrap().to_string();
    let before = api.version();
    let cases = [
        (json!({"agent": "ghost"}), StatusCode::NOT_FOUND, "NOT_FOUND", "agent"),
        (json!({"agent": "crm", "scopes": ["write:all"]}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "scopes"),
        (json!({"agent": "crm", "scopes": ["admin"]}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "scopes"),
        (json!({"agent": "crm", "scopes": ["bad scope"]}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "scopes"),
        (json!({"agent": "crm", "expires_at": "2020-01-01T00:00:00Z"}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "expires_at"),
        (json!({"agent": "crm", "expires_at": "next week"}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "expires_at"),
        (json!({"agent": "crm", "expires_at": "2030-01-01T00:00:00Z", "ttl": "1d"}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "expires_at"),
        (json!({"agent": "crm", "ttl": "forever"}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "ttl"),
        (json!({"agent": "crm", "rate": "ten/s"}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "rate"),
        (json!({"agent": "crm", "rate": "0/s"}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "rate"),
        (json!({"agent": "crm", "path_prefixes": ["v1/x"]}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "path_prefixes"),
        (json!({"agent": "crm", "name": "dup"}), StatusCode::CONFLICT, "CONFLICT", "name"),
        (json!({"agent": "crm", "name": ""}), StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "name"),
    ];
    for (body, status, code, field) in cases {
        let got = api.call("POST", "/v1/keys", Some(body.clone())).await;
        assert_error(&got, status, code, Some(field));
    }
    let imports = [
        (json!({"agent": "crm"}), StatusCode::BAD_REQUEST, "key"),
        (json!({"agent": "crm", "secret": "abc def"}), StatusCode::BAD_REQUEST, "key"),
        (json!({"agent": "crm", "digest": "xyz"}), StatusCode::BAD_REQUEST, "digest"),
        (json!({"agent": "crm", "secret": "k", "digest": Digest::of(b"k").to_hex()}), StatusCode::BAD_REQUEST, "digest"),
        (json!({"agent": "crm", "name": "again", "secret": first["secret"]}), StatusCode::CONFLICT, "key"),
    ];
    for (body, status, field) in imports {
        let got = api.call("POST", "/v1/keys/import", Some(body.clone())).await;
        assert_eq!(got.0, status, "{body}: {}", got.1);
        assert_eq!(got.1["error"]["details"]["field"], field, "{body}");
    }
    assert_error(&api.call("POST", "/v1/keys/key_nope/revoke", None).await, StatusCode::NOT_FOUND, "NOT_FOUND", Some("id"));
    assert_error(&api.call("POST", "/v1/keys/key_nope/rotate", None).await, StatusCode::NOT_FOUND, "NOT_FOUND", Some("id"));
    assert_error(&api.call("POST", &format!("/v1/keys/{id}/rotate"), Some(json!({"grace": "soon"}))).await, StatusCode::BAD_REQUEST, "VALIDATION_ERROR", Some("grace"));
    assert_error(&api.call("GET", "/v1/keys?agent=ghost", None).await, StatusCode::NOT_FOUND, "NOT_FOUND", Some("agent"));
    assert_error(&api.call("GET", "/v1/audit?limit=many", None).await, StatusCode::BAD_REQUEST, "VALIDATION_ERROR", Some("limit"));
    assert_eq!(api.version(), before, "a refused request changed the store");
    // Revoking twice, or rotating a revoked key, is a conflict.
    api.call("POST", &format!("/v1/keys/{id}/revoke"), None).await;
    assert_error(&api.call("POST", &format!("/v1/keys/{id}/revoke"), None).await, StatusCode::CONFLICT, "CONFLICT", Some("id"));
    assert_error(&api.call("POST", &format!("/v1/keys/{id}/rotate"), None).await, StatusCode::CONFLICT, "CONFLICT", Some("id"));
}

#[tokio::test]
async fn status_and_audit_report_changes() {
    let api = api();
    api.agent("a", &["read:all"]).await;
    api.agent("b", &["read:all"]).await;
    let (s, st) = api.call("GET", "/v1/status", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!((st["snapshot_version"].as_u64(), st["agents"].as_u64(), st["active_keys"].as_u64()), (Some(2), Some(2), Some(2)));
    let (_, audit) = api.call("GET", "/v1/audit?limit=10", None).await;
    let entries = audit.as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["action"], "agent.create");
    assert_eq!(entries[0]["actor"], "api");
    assert!(entries[0]["version"].as_u64() < entries[1]["version"].as_u64());
}

#[tokio::test]
async fn oversized_bodies_and_unknown_routes_get_json_errors() {
    let api = api();
    let big = json!({"name": "x".repeat(MAX_BODY_BYTES), "scopes": ["a"]});
    assert_error(&api.call("POST", "/v1/agents", Some(big)).await, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", None);
    assert_eq!(api.version(), 0);
    assert_error(&api.call("GET", "/v2/nothing", None).await, StatusCode::NOT_FOUND, "NOT_FOUND", None);
}

// ---- Issue 12: manage keys over their whole life ----

/// Every answer to a change carries `applied`; without Envoys, nobody is waited for.
fn applied_ok(v: &Value) {
    let a = &v["applied"];
    assert_eq!(a["serving"], true, "{v}");
    assert_eq!(a["envoys"], 0, "{v}");
    assert!(a["version"].as_u64().unwrap() > 0, "{v}");
}

#[tokio::test]
async fn agent_edits_are_one_change_each_with_before_and_after_in_the_audit() {
    let api = api();
    api.agent("crm", &["read:all"]).await;
    let key = api.call("POST", "/v1/keys", Some(json!({"agent": "crm", "name": "narrow", "scopes": ["read:all"]}))).await.1;
    let key_id = key["key"]["id"].as_str().unwrap().to_string();
    let before = api.version();
    // Seed 000's capability toggle: add write:all.
    let (s, v) = api.call("PATCH", "/v1/agents/crm", Some(json!({"add_scopes": ["write:all"], "rate": "60/min", "burst": 10, "description": "CRM sync"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    applied_ok(&v);
    assert_eq!(v["scopes"], json!(["read:all", "write:all"]));
    assert_eq!((v["rate_limit"].as_str(), v["burst"].as_u64(), v["description"].as_str()), (Some("60/min"), Some(10), Some("CRM sync")));
    assert_eq!(api.version(), before + 1, "one edit, one version");
    assert_eq!(v["applied"]["version"], before + 1);
    let (_, audit) = api.call("GET", "/v1/audit?limit=1", None).await;
    let entry = &audit[0];
    assert_eq!(entry["action"], "agent.update");
    assert_eq!(entry["details"]["changes"]["before"], json!({"scopes": ["read:all"], "rate": null, "burst": null, "description": ""}));
    assert_eq!(entry["details"]["changes"]["after"], json!({"scopes": ["read:all", "write:all"], "rate": "60/min", "burst": 10, "description": "CRM sync"}));
    // The feed delta carries every key of the agent, with the agent's new limit and burst.
    let (_, page) = api.call("GET", &format!("/v1/feed?since={before}"), None).await;
    let records = page["keys"].as_array().unwrap();
    assert_eq!(records.len(), 2, "{page}");
    assert!(records.iter().all(|r| r["rate_limit"] == "60/min" && r["rate_burst"] == 10), "{page}");
    assert_eq!(page["implications"], json!({"admin": ["read:all", "write:all"]}));
    // `rate: null` removes the limit and its burst; replacing scopes narrows the keys.
    let (s, v) = api.call("PATCH", "/v1/agents/crm", Some(json!({"rate": null}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["rate_limit"].clone(), v["burst"].clone()), (Value::Null, Value::Null));
    let (_, k) = api.call("GET", &format!("/v1/keys/{key_id}"), None).await;
    assert_eq!(k["rate_limit"], Value::Null);
    // Removing read:all from the agent narrows the key that had it at once: key ∩ agent.
    api.call("PATCH", "/v1/agents/crm", Some(json!({"scopes": ["write:all"]}))).await;
    let (_, k) = api.call("GET", &format!("/v1/keys/{key_id}"), None).await;
    assert_eq!((k["scopes"].clone(), k["own_scopes"].clone()), (json!([]), json!(["read:all"])), "{k}");
    let (_, snap) = api.call("GET", "/v1/snapshot", None).await;
    let rec = snap["keys"].as_array().unwrap().iter().find(|r| r["id"] == key_id.as_str()).unwrap().clone();
    assert_eq!(rec["scopes"], json!([]), "the filter gets the narrowed set");
    // Adding it back restores the key.
    api.call("PATCH", "/v1/agents/crm", Some(json!({"add_scopes": ["read:all"]}))).await;
    let (_, k) = api.call("GET", &format!("/v1/keys/{key_id}"), None).await;
    assert_eq!(k["scopes"], json!(["read:all"]));
}

#[tokio::test]
async fn agent_edits_keep_every_creation_rule() {
    let api = api();
    api.agent("crm", &["read:all"]).await;
    let before = api.version();
    for (body, field) in [
        (json!({}), "request"),
        (json!({"scopes": []}), "scopes"),
        (json!({"scopes": ["Read:All"]}), "scopes"),
        (json!({"add_scopes": ["nosuch"]}), "add_scopes"),
        (json!({"remove_scopes": ["admin"]}), "remove_scopes"),
        (json!({"remove_scopes": ["read:all"]}), "scopes"),
        (json!({"scopes": ["admin"], "add_scopes": ["read:all"]}), "scopes"),
        (json!({"rate": "5/week"}), "rate"),
        (json!({"burst": 3}), "burst"),
        (json!({"rate": "10/s", "burst": 11}), "burst"),
        (json!({"description": "a\nb"}), "description"),
        (json!({"color": "red"}), "request"),
    ] {
        assert_error(&api.call("PATCH", "/v1/agents/crm", Some(body.clone())).await, StatusCode::BAD_REQUEST, "VALIDATION_ERROR", Some(field));
    }
    assert_error(&api.call("PATCH", "/v1/agents/ghost", Some(json!({"description": "x"}))).await, StatusCode::NOT_FOUND, "NOT_FOUND", Some("agent"));
    assert_eq!(api.version(), before, "a refused edit changed the store");
    // The suggestion names the nearest catalogue scope, in words an API user can act on.
    let (_, v) = api.call("PATCH", "/v1/agents/crm", Some(json!({"scopes": ["Read:All"]}))).await;
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("did you mean \"read:all\""), "{message}");
    assert!(!message.contains("--"), "REST messages name no CLI flags: {message}");
}

#[tokio::test]
async fn key_edits_keep_every_creation_rule_and_record_before_and_after() {
    let api = api();
    api.agent("crm", &["admin"]).await;
    let (_, k) = api.call("POST", "/v1/keys", Some(json!({"agent": "crm", "name": "sync", "ttl": "90d"}))).await;
    let id = k["key"]["id"].as_str().unwrap().to_string();
    let path = format!("/v1/keys/{id}");
    // Seed 004: "edit the key, and add the necessary scope".
    let (s, v) = api.call("PATCH", &path, Some(json!({"name": "sync-2", "scopes": ["read:all"], "rate": "10/s", "burst": 5, "path_prefixes": ["/v1/projects/42"], "ttl": "30d"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    applied_ok(&v);
    assert_eq!(v["name"], "sync-2");
    assert_eq!(v["scopes"], json!(["read:all"]));
    assert_eq!((v["rate_limit"].as_str(), v["burst"].as_u64()), (Some("10/s"), Some(5)));
    assert_eq!(v["path_prefixes"], json!(["/v1/projects/42"]));
    let (_, audit) = api.call("GET", "/v1/audit?limit=1", None).await;
    let changes = &audit[0]["details"]["changes"];
    assert_eq!(audit[0]["action"], "key.update");
    assert_eq!(changes["before"]["name"], "sync");
    assert_eq!(changes["after"]["name"], "sync-2");
    assert_eq!(changes["before"]["scopes"], Value::Null);
    assert_eq!(changes["after"]["scopes"], json!(["read:all"]));
    assert!(!audit.to_string().contains("digest"), "the audit log holds no digests or keys");
    // null clears: no expiry, the agent's scopes, the agent's limit; [] removes path prefixes.
    let (s, v) = api.call("PATCH", &path, Some(json!({"expires_at": null, "scopes": null, "rate": null, "path_prefixes": []}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["expires_at"].clone(), v["own_scopes"].clone(), v["rate_limit"].clone(), v["burst"].clone()), (Value::Null, Value::Null, Value::Null, Value::Null));
    assert_eq!(v["scopes"], json!(["admin", "read:all", "write:all"]));
    assert_eq!(v["path_prefixes"], json!([]));
    let before = api.version();
    for (body, field) in [
        (json!({}), "request"),
        (json!({"scopes": ["webhook"]}), "scopes"),
        (json!({"scopes": []}), "scopes"),
        (json!({"expires_at": "2001-01-01T00:00:00Z"}), "expires_at"),
        (json!({"expires_at": "2099-01-01T00:00:00Z", "ttl": "1d"}), "expires_at"),
        (json!({"ttl": "0s"}), "ttl"),
        (json!({"rate": "1/fortnight"}), "rate"),
        (json!({"burst": 2}), "burst"),
        (json!({"path_prefixes": ["v1"]}), "path_prefixes"),
        (json!({"name": "bad/name"}), "name"),
    ] {
        assert_error(&api.call("PATCH", &path, Some(body.clone())).await, StatusCode::BAD_REQUEST, "VALIDATION_ERROR", Some(field));
    }
    // Names stay unique among the agent's live keys.
    api.call("POST", "/v1/keys", Some(json!({"agent": "crm", "name": "other"}))).await;
    assert_error(&api.call("PATCH", &path, Some(json!({"name": "other"}))).await, StatusCode::CONFLICT, "CONFLICT", Some("name"));
    assert_error(&api.call("PATCH", "/v1/keys/key_nope", Some(json!({"name": "x"}))).await, StatusCode::NOT_FOUND, "NOT_FOUND", Some("id"));
    assert_eq!(api.version(), before + 1, "only the second key's creation changed the store");
    api.call("POST", &format!("{path}/revoke"), None).await;
    assert_error(&api.call("PATCH", &path, Some(json!({"name": "x"}))).await, StatusCode::CONFLICT, "CONFLICT", Some("id"));
}

#[tokio::test]
async fn get_key_shows_one_key_masked() {
    let api = api();
    let created = api.agent("crm", &["read:all"]).await;
    let id = created["key"]["id"].as_str().unwrap();
    let (s, k) = api.call("GET", &format!("/v1/keys/{id}"), None).await;
    assert_eq!(s, StatusCode::OK, "{k}");
    assert_eq!(k["id"], id);
    assert_eq!(k["masked"], created["key"]["masked"]);
    assert!(!k.to_string().contains(created["secret"].as_str().unwrap()));
    assert_error(&api.call("GET", "/v1/keys/key_nope", None).await, StatusCode::NOT_FOUND, "NOT_FOUND", Some("id"));
}

#[tokio::test]
async fn unknown_routes_and_methods_get_the_json_error_body() {
    let api = api();
    let (s, v) = api.call("GET", "/v1/nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "NOT_FOUND");
    assert!(v["error"]["message"].as_str().unwrap().contains("GET /v1/nope"), "{v}");
    let (s, v) = api.call("PUT", "/v1/agents", None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(v["error"]["code"], "METHOD_NOT_ALLOWED");
    assert_eq!(v["success"], false);
}

#[tokio::test]
async fn rotation_gives_the_new_key_a_lifetime_of_its_own() {
    let api = api();
    api.agent("crm", &["read:all"]).await;
    let mk = |ttl: Option<&str>| {
        let body = match ttl {
            Some(t) => json!({"agent": "crm", "ttl": t}),
            None => json!({"agent": "crm"}),
        };
        let api = &api;
        async move { api.call("POST", "/v1/keys", Some(body)).await.1["key"]["id"].as_str().unwrap().to_string() }
    };
    let day = 86_400;
    let expiry = |v: &Value| keyward_core::time::parse_rfc3339(v.as_str().unwrap()).unwrap();
    let now = keyward_control::store::now_unix();
    // Default: the old key's original lifetime (90 days), counted from now.
    let id = mk(Some("90d")).await;
    let (s, r) = api.call("POST", &format!("/v1/keys/{id}/rotate"), Some(json!({}))).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert!((expiry(&r["new"]["key"]["expires_at"]) - (now + 90 * day)).abs() <= 5, "{r}");
    // Its own: a TTL, or no expiry at all.
    let id = mk(Some("90d")).await;
    let (_, r) = api.call("POST", &format!("/v1/keys/{id}/rotate"), Some(json!({"ttl": "7d"}))).await;
    assert!((expiry(&r["new"]["key"]["expires_at"]) - (now + 7 * day)).abs() <= 5, "{r}");
    let id = mk(Some("90d")).await;
    let (_, r) = api.call("POST", &format!("/v1/keys/{id}/rotate"), Some(json!({"no_expiry": true}))).await;
    assert_eq!(r["new"]["key"]["expires_at"], Value::Null);
    // A key that never expired keeps no expiry.
    let id = mk(None).await;
    let (_, r) = api.call("POST", &format!("/v1/keys/{id}/rotate"), Some(json!({}))).await;
    assert_eq!(r["new"]["key"]["expires_at"], Value::Null);
    let id = mk(None).await;
    for (body, field) in [(json!({"ttl": "1d", "no_expiry": true}), "no_expiry"), (json!({"ttl": "soon"}), "ttl"), (json!({"expires_at": "2001-01-01T00:00:00Z"}), "expires_at")] {
        assert_error(&api.call("POST", &format!("/v1/keys/{id}/rotate"), Some(body)).await, StatusCode::BAD_REQUEST, "VALIDATION_ERROR", Some(field));
    }
}

#[tokio::test]
async fn the_scope_catalogue_is_the_one_source_of_scopes_and_implications() {
    let api = api();
    let (_, scopes) = api.call("GET", "/v1/scopes", None).await;
    let names: Vec<&str> = scopes.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["read:all", "write:all", "admin"], "seed 004's catalogue");
    assert_eq!(scopes[2]["implies"], json!(["read:all", "write:all"]));
    assert!(scopes[0]["description"].as_str().unwrap().contains("Read access"));
    // Unknown scopes are refused at creation too, with the nearest name.
    let (s, v) = api.call("POST", "/v1/agents", Some(json!({"name": "a", "scopes": ["read_all"]}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("did you mean \"read:all\""), "{v}");
    let (s, v) = api.call("POST", "/v1/scopes", Some(json!({"name": "billing:read", "description": "Read invoices"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    applied_ok(&v);
    assert_error(&api.call("POST", "/v1/scopes", Some(json!({"name": "billing:read"}))).await, StatusCode::CONFLICT, "CONFLICT", Some("name"));
    assert_error(&api.call("POST", "/v1/scopes", Some(json!({"name": "Billing Read"}))).await, StatusCode::BAD_REQUEST, "VALIDATION_ERROR", Some("name"));
    api.agent("fin", &["admin"]).await;
    // admin now implies billing:read: every key is re-sent with the new implications.
    let before = api.version();
    let (s, v) = api.call("POST", "/v1/scopes/admin/implies", Some(json!({"implies": "billing:read"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["implies"], json!(["billing:read", "read:all", "write:all"]));
    let (_, page) = api.call("GET", &format!("/v1/feed?since={before}"), None).await;
    assert_eq!(page["implications"]["admin"], json!(["billing:read", "read:all", "write:all"]));
    assert_eq!(page["keys"][0]["scopes"], json!(["admin", "billing:read", "read:all", "write:all"]), "{page}");
    assert_error(&api.call("POST", "/v1/scopes/admin/implies", Some(json!({"implies": "nosuch"}))).await, StatusCode::BAD_REQUEST, "VALIDATION_ERROR", Some("implies"));
    // A scope in use cannot be removed; an unused one can, with its implications.
    api.agent("reader", &["billing:read"]).await;
    assert_error(&api.call("DELETE", "/v1/scopes/billing:read", None).await, StatusCode::CONFLICT, "CONFLICT", Some("name"));
    api.call("DELETE", "/v1/agents/reader", None).await;
    // fin carries admin, which implies it: still in use.
    assert_error(&api.call("DELETE", "/v1/scopes/billing:read", None).await, StatusCode::CONFLICT, "CONFLICT", Some("name"));
    let (s, v) = api.call("POST", "/v1/scopes/admin/implies", Some(json!({"implies": "billing:read", "remove": true}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = api.call("DELETE", "/v1/scopes/billing:read", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, scopes) = api.call("GET", "/v1/scopes", None).await;
    assert_eq!(scopes[2]["implies"], json!(["read:all", "write:all"]));
    assert_error(&api.call("DELETE", "/v1/scopes/nosuch", None).await, StatusCode::NOT_FOUND, "NOT_FOUND", Some("name"));
}

#[tokio::test]
async fn disabling_with_a_reason_puts_it_in_the_snapshot_and_enabling_clears_it() {
    let api = api();
    api.agent("crm", &["read:all"]).await;
    let reason = "Your plan does not include API access";
    let (s, v) = api.call("POST", "/v1/agents/crm/disable", Some(json!({"reason": reason}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["disabled_reason"], reason);
    let (_, snap) = api.call("GET", "/v1/snapshot", None).await;
    assert_eq!(snap["keys"][0]["disabled_reason"], reason);
    assert_eq!(snap["keys"][0]["agent_enabled"], false);
    api.call("POST", "/v1/agents/crm/enable", None).await;
    let (_, snap) = api.call("GET", "/v1/snapshot", None).await;
    assert_eq!(snap["keys"][0].get("disabled_reason"), None);
    assert_error(&api.call("POST", "/v1/agents/crm/disable", Some(json!({"reason": "x".repeat(201)}))).await, StatusCode::BAD_REQUEST, "VALIDATION_ERROR", Some("reason"));
}

#[tokio::test]
async fn wait_false_answers_at_once_and_says_so() {
    let api = api();
    let (s, v) = api.call("POST", "/v1/agents?wait=false", Some(json!({"name": "a", "scopes": ["read:all"]}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["applied"]["waited"], false);
    assert_error(&api.call("POST", "/v1/agents?wait=maybe", Some(json!({"name": "b", "scopes": ["read:all"]}))).await, StatusCode::BAD_REQUEST, "VALIDATION_ERROR", Some("wait"));
}

#[tokio::test]
async fn usage_counts_refused_requests_by_code() {
    let api = api();
    let created = api.agent("crm", &["read:all"]).await;
    let id = created["key"]["id"].as_str().unwrap();
    let now = keyward_control::store::now_unix();
    let report = json!({"envoy": "e1", "usage": [{"key_id": id, "count": 5, "last_used": now, "denied": {"RATE_LIMITED": 3, "INSUFFICIENT_SCOPE": 1, "bogus code": 9}}]});
    let (s, v) = api.call("POST", "/v1/feed/usage", Some(report)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, rows) = api.call("GET", "/v1/usage", None).await;
    assert_eq!(rows[0]["count"], 5);
    assert_eq!(rows[0]["denied"], json!({"INSUFFICIENT_SCOPE": 1, "RATE_LIMITED": 3}));
    // A key that was only refused (no use, `last_used` 0) is not "last used" in 1970.
    let other = api.call("POST", "/v1/keys", Some(json!({"agent": "crm", "name": "quiet"}))).await.1["key"]["id"].as_str().unwrap().to_string();
    let report = json!({"envoy": "e1", "usage": [{"key_id": other, "count": 0, "last_used": 0, "denied": {"REVOKED_API_KEY": 2}}]});
    assert_eq!(api.call("POST", "/v1/feed/usage", Some(report)).await.0, StatusCode::OK);
    let (_, k) = api.call("GET", &format!("/v1/keys/{other}"), None).await;
    assert_eq!(k["last_used_at"], Value::Null, "{k}");
    let (_, rows) = api.call("GET", "/v1/usage?since=2h", None).await;
    let row = rows.as_array().unwrap().iter().find(|r| r["key_id"] == other.as_str()).unwrap();
    assert_eq!((row["count"].as_u64(), row["denied"]["REVOKED_API_KEY"].as_u64()), (Some(0), Some(2)), "{rows}");
}

#[tokio::test]
async fn imports_the_filter_would_always_refuse_are_refused() {
    let api = api();
    api.agent("crm", &["read:all"]).await;
    let good = keyward_control::store::generate_key("kw_live").unwrap();
    let mut bad_sum = good.clone();
    let last = bad_sum.pop().unwrap();
    bad_sum.push(if last == 'a' { 'b' } else { 'a' });
    for (secret, want) in [
        (bad_sum.as_str(), "checksum"),
        (&*"x".repeat(257), "over 256"),
        ("abc12", "easy to guess"),
    ] {
        let (s, v) = api.call("POST", "/v1/keys/import", Some(json!({"agent": "crm", "secret": secret}))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(want), "{v}");
    }
    let (s, v) = api.call("POST", "/v1/keys/import", Some(json!({"agent": "crm", "secret": "abc12", "allow_weak": true}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = api.call("POST", "/v1/keys/import", Some(json!({"agent": "crm", "secret": good}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

// ---- Issue 12, from review ----

#[tokio::test]
async fn an_envoy_ahead_of_the_store_gets_the_whole_snapshot_at_once_and_counts_as_behind() {
    let api = api();
    api.agent("crm", &["read:all"]).await;
    let v = api.version();
    let started = std::time::Instant::now();
    let (s, page) = api.call("GET", &format!("/v1/feed?envoy=edge-a&since={}&wait=15", v + 50), None).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "a restored store must not hold the Envoy's request");
    assert_eq!((page["complete"].as_bool(), page["keys"].as_array().map(Vec::len)), (Some(true), Some(1)), "{page}");
    // The store moved past the Envoy: what it gets is newer than what it held.
    assert_eq!(page["version"].as_u64(), Some(v + 51), "{page}");
    let (_, status) = api.call("GET", "/v1/status", None).await;
    let envoy = &status["envoys"][0];
    assert_eq!((envoy["applied_version"].as_u64(), envoy["lag"].as_u64()), (Some(0), Some(v + 51)), "{status}");
    let (_, audit) = api.call("GET", "/v1/audit?limit=1", None).await;
    assert_eq!(audit[0]["action"], "store.advance", "{audit}");
    // A request far beyond any real version moves nothing.
    let (_, page) = api.call("GET", &format!("/v1/feed?envoy=edge-a&since={}", u64::MAX - 1), None).await;
    assert_eq!(page["version"].as_u64(), Some(v + 51), "{page}");
}

/// The reset rule: every page names the store; an Envoy naming another store, or ahead of this
/// one, gets the whole snapshot from 0 with `reset`; one naming this store, or none yet (`store=`
/// empty), gets the plain delta. A filter older than resets sends no `store=` and gets neither
/// field (it refuses fields it does not know), and the whole snapshot when it is ahead.
/// The page format of a filter from before resets.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct OlderFeedMessage {
    version: u64,
    complete: bool,
    cursor: Option<Value>,
    implications: Option<Value>,
    keys: Vec<Value>,
}

#[tokio::test]
async fn the_feed_names_its_store_and_resets_an_envoy_holding_another_store_s_records() {
    let api = api();
    api.agent("crm", &["read:all"]).await;
    api.agent("erp", &["read:all"]).await;
    let v = api.version();
    let (_, full) = api.call("GET", "/v1/feed?since=0&store=", None).await;
    let store = full["store"].as_str().unwrap().to_string();
    assert!(keyward_core::feed::valid_store_id(&store), "{full}");
    assert_eq!(full.get("reset"), None, "a first load is no reset: {full}");
    let check = |query: String, want_reset: bool, want_keys: usize| {
        let api = &api;
        let store = store.clone();
        async move {
            let started = std::time::Instant::now();
            let (s, page) = api.call("GET", &format!("/v1/feed?envoy=edge-r&wait=15&{query}"), None).await;
            assert_eq!(s, StatusCode::OK, "{query}: {page}");
            assert!(started.elapsed() < std::time::Duration::from_secs(5), "{query}: answered at once");
            assert_eq!(page["store"].as_str(), Some(store.as_str()), "{query}: {page}");
            assert_eq!(page["reset"].as_bool().unwrap_or(false), want_reset, "{query}: {page}");
            assert_eq!(page["keys"].as_array().map(Vec::len), Some(want_keys), "{query}: {page}");
        }
    };
    check(format!("since={}&store=AnotherStore1", v), true, 2).await;
    check(format!("since={}&store={store}", v - 1), false, 1).await;
    check(format!("since={}&store=", v - 1), false, 1).await;
    check(format!("since={}&after=zzz&store=AnotherStore1", v - 1), true, 2).await;
    // Ahead of the store: a reset, and the store moves past the Envoy each time.
    check(format!("since={}&store={store}", v + 50), true, 2).await;
    check(format!("since={}&store=", v + 100), true, 2).await;
    for (query, keys) in [(format!("since={}", v + 101), 0), (format!("since={}", v + 200), 2)] {
        let (_, page) = api.call("GET", &format!("/v1/feed?envoy=edge-old&{query}"), None).await;
        assert_eq!((page.get("store"), page.get("reset")), (None, None), "an older filter: {page}");
        assert_eq!(page["keys"].as_array().map(Vec::len), Some(keys), "{query}: {page}");
        serde_json::from_value::<OlderFeedMessage>(page).unwrap();
    }
    let (_, status) = api.call("GET", "/v1/status", None).await;
    assert_eq!(status["envoys"][0]["applied_version"].as_u64(), Some(0), "a reset Envoy has applied nothing of this store: {status}");
    let got = api.call("GET", "/v1/feed?since=0&store=a%20b", None).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "VALIDATION_ERROR", Some("store"));
}

/// The feed's two forms: a filter that asks for the line form (`format=2`) gets it; one that
/// does not (every filter from before it) gets JSON, as before. Both carry the same records, as
/// the filter stores them; a format the control plane does not know is refused, naming it.
#[tokio::test]
async fn an_older_filter_is_served_json_and_a_newer_one_the_line_form_of_the_same_page() {
    use keyward_core::feed::{parse_page, LINES_CONTENT_TYPE};
    use keyward_core::scope::Implications;
    let api = api();
    api.agent("crm", &["admin"]).await;
    let (_, k) = api.call("POST", "/v1/keys", Some(json!({"agent": "crm", "name": "ci key", "scopes": ["read:all"], "rate": "10/min", "ttl": "1d", "path_prefixes": ["/v1/a"]}))).await;
    assert!(k["key"]["id"].is_string(), "{k}");
    let (s, v) = api.call("POST", "/v1/agents/crm/disable", Some(json!({"reason": "Plan ended: <b>\"é\"</b>"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for query in ["since=0", "since=0&store=", "since=0&store=AnotherStore1"] {
        let (s, kind, json) = api.get_raw(&format!("/v1/feed?{query}")).await;
        assert_eq!((s, kind.as_str()), (StatusCode::OK, "application/json"), "{query}");
        let (s1, kind1, json1) = api.get_raw(&format!("/v1/feed?{query}&format=1")).await;
        assert_eq!((s1, kind1, &json1), (s, kind, &json), "format=1 is the default");
        let (s, kind, lines) = api.get_raw(&format!("/v1/feed?{query}&format=2")).await;
        assert_eq!((s, kind.as_str()), (StatusCode::OK, LINES_CONTENT_TYPE), "{query}");
        let text = String::from_utf8(lines.clone()).unwrap();
        assert!(text.starts_with("keyward-feed 2\n") && text.ends_with("\nend\n"), "{text}");
        let other = Implications::new(&[("read:all".to_string(), vec!["x".to_string()])].into_iter().collect()).unwrap();
        let from_json = parse_page(&json, 1 << 20, &other).unwrap();
        let from_lines = parse_page(&lines, 1 << 20, &other).unwrap();
        assert_eq!(from_lines, from_json, "{query}: {text}");
        assert_eq!(from_lines.records.len(), 2, "{text}");
        assert!(text.contains("\tPlan ended: <b>\"é\"</b>\n"), "the reason as stored: {text}");
    }
    let got = api.call("GET", "/v1/feed?since=0&format=json", None).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "VALIDATION_ERROR", Some("format"));
    // A filter's max_feed_bytes (max_bytes=) ends a line page early, with a cursor: its pages
    // carry every record once, in order.
    let (_, _, whole) = api.get_raw("/v1/feed?since=0&format=2").await;
    let whole = parse_page(&whole, 1 << 20, &Implications::default()).unwrap();
    let (mut since, mut after, mut got) = (0, String::new(), Vec::new());
    loop {
        let (s, _, body) = api.get_raw(&format!("/v1/feed?since={since}{after}&format=2&max_bytes=300")).await;
        assert_eq!(s, StatusCode::OK);
        assert!(body.len() <= 300 || got.is_empty(), "{}", String::from_utf8_lossy(&body));
        let page = parse_page(&body, 1 << 20, &Implications::default()).unwrap();
        assert_eq!(page.records.len(), 1, "one record fits in 300 bytes");
        got.extend(page.records);
        match page.cursor {
            Some(c) => (since, after) = (c.version, format!("&after={}", c.id)),
            None => break,
        }
    }
    assert_eq!(got, whole.records);
}

#[tokio::test]
async fn a_scope_carried_through_an_implication_cannot_be_removed() {
    let api = api();
    api.agent("acme", &["admin"]).await;
    let got = api.call("DELETE", "/v1/scopes/write:all", None).await;
    assert_error(&got, StatusCode::CONFLICT, "CONFLICT", Some("name"));
    assert!(got.1["error"]["message"].as_str().unwrap().contains("implied by admin"), "{}", got.1);
    let (_, scopes) = api.call("GET", "/v1/scopes", None).await;
    assert_eq!(scopes[2]["implies"], json!(["read:all", "write:all"]));
}

#[tokio::test]
async fn expired_and_rotated_keys_cannot_be_edited_back_to_life() {
    let api = api();
    api.agent("crm", &["read:all"]).await;
    let (_, k) = api.call("POST", "/v1/keys", Some(json!({"agent": "crm", "name": "old"}))).await;
    let id = k["key"]["id"].as_str().unwrap().to_string();
    api.call("POST", &format!("/v1/keys/{id}/rotate"), Some(json!({"grace": "1h"}))).await;
    let got = api.call("PATCH", &format!("/v1/keys/{id}"), Some(json!({"expires_at": null}))).await;
    assert_error(&got, StatusCode::CONFLICT, "CONFLICT", Some("id"));
    assert!(got.1["error"]["message"].as_str().unwrap().contains("was rotated to"), "{}", got.1);
    let (_, k) = api.call("POST", "/v1/keys", Some(json!({"agent": "crm", "name": "brief", "ttl": "1s"}))).await;
    let brief = k["key"]["id"].as_str().unwrap().to_string();
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let got = api.call("PATCH", &format!("/v1/keys/{brief}"), Some(json!({"expires_at": null}))).await;
    assert_error(&got, StatusCode::CONFLICT, "CONFLICT", Some("id"));
}

#[tokio::test]
async fn null_is_refused_for_fields_that_cannot_be_cleared() {
    let api = api();
    let created = api.agent("crm", &["read:all"]).await;
    let id = created["key"]["id"].as_str().unwrap();
    let before = api.version();
    for (path, body) in [
        ("/v1/agents/crm".to_string(), json!({"description": null})),
        ("/v1/agents/crm".to_string(), json!({"scopes": null, "rate": "1/s"})),
        (format!("/v1/keys/{id}"), json!({"name": null})),
        (format!("/v1/keys/{id}"), json!({"path_prefixes": null, "rate": "1/s"})),
    ] {
        let got = api.call("PATCH", &path, Some(body.clone())).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "VALIDATION_ERROR", Some("request"));
        assert!(got.1["error"]["message"].as_str().unwrap().contains("null is not allowed"), "{body}: {}", got.1);
    }
    assert_eq!(api.version(), before);
}

/// A snapshot of more than one page: each continuation is read ahead while the Envoy applies
/// the page before, and answers exactly what a read at that moment would; once the store
/// moves, a page read ahead is not answered (the continuation is read again, at the new version).
#[tokio::test]
async fn pages_read_ahead_answer_what_a_read_would_and_never_a_moved_store_s() {
    let api = api();
    api.agent("bulk", &["read:all"]).await;
    let lines: Vec<String> = (0..keyward_control::store::FEED_PAGE * 2 + 10).map(|i| format!("sha256:{}", Digest::of(format!("bulk {i}").as_bytes()).to_hex())).collect();
    let template = keyward_control::model::NewKey { agent: "bulk".into(), ..Default::default() };
    api.state.store.lock().unwrap().import_batch(&template, &lines, false).unwrap();
    api.state.refresh_version().unwrap();
    let pages = |after: Option<(u64, String)>| {
        let api = &api;
        async move {
            let path = match &after {
                Some((v, id)) => format!("/v1/feed?envoy=edge-p&since={v}&after={id}&store="),
                None => "/v1/feed?envoy=edge-p&since=0&store=".to_string(),
            };
            let (s, page) = api.call("GET", &path, None).await;
            assert_eq!(s, StatusCode::OK, "{page}");
            page
        }
    };
    let cursor = |page: &Value| page["cursor"].as_object().map(|c| (c["version"].as_u64().unwrap(), c["id"].as_str().unwrap().to_string()));
    let first = pages(None).await;
    let c1 = cursor(&first).expect("more than one page");
    // Give the read-ahead its time, then compare with a read made now, bypassing it.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let direct = serde_json::to_value(api.state.store.lock().unwrap().feed_page(c1.0, Some(&c1.1), keyward_control::store::FEED_PAGE).unwrap()).unwrap();
    let second = pages(Some(c1.clone())).await;
    assert_eq!(second["keys"], direct["keys"], "the page read ahead is the page");
    assert_eq!((second["version"].clone(), second["cursor"].clone()), (direct["version"].clone(), direct["cursor"].clone()));
    // The third page was read ahead at this version; a change lands before it is asked for.
    let c2 = cursor(&second).expect("a third page");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    api.agent("late", &["read:all"]).await;
    let moved = api.version();
    let third = pages(Some(c2)).await;
    assert_eq!(third["version"].as_u64(), Some(moved), "read again at the new version: {}", third["version"]);
    assert_eq!(third["complete"].as_bool(), Some(true));
    assert_eq!(first["keys"].as_array().unwrap().len() + second["keys"].as_array().unwrap().len() + third["keys"].as_array().unwrap().len(), lines.len() + 2, "every key once: the imported, and the keys the two agents were made with");
}
