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
