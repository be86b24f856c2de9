//! Fixtures shared by the real-Envoy tests: keys, a plugin configuration, routes.
#![allow(dead_code)]

use keyward_core::{keyformat, Digest};
use keyward_testkit::{Echo, Envoy, EnvoyOptions, Response};
use serde_json::{json, Value};

/// A keyward-format key with a valid checksum, scopes `read:all`.
pub fn good_key() -> String {
    keyformat::generate("kw_live", (11u8..=240).cycle()).expect("enough bytes")
}
/// An imported (foreign-format) key with `admin`.
pub const ADMIN_KEY: &str = "legacy-admin-key-0001";
pub const REVOKED_KEY: &str = "legacy-revoked-key-0001";
pub const EXPIRED_KEY: &str = "legacy-expired-key-0001";
pub const DISABLED_KEY: &str = "legacy-disabled-key-0001";
/// An agent disabled with a reason (`agent disable --reason`).
pub const PLAN_KEY: &str = "legacy-plan-key-0001";
pub const PROJECT_KEY: &str = "legacy-project-key-0001";
pub const WEBHOOK_KEY: &str = "legacy-webhook-key-0001";

pub fn record(key: &str, id: &str, extra: Value) -> Value {
    let mut v = json!({"digest": Digest::of(key.as_bytes()).to_hex(), "id": id, "agent": format!("agent-{id}"), "scopes": ["read:all"]});
    if let (Some(obj), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        obj.extend(extra.clone());
    }
    v
}

pub fn snapshot_keys() -> Vec<Value> {
    vec![
        record(&good_key(), "key_good", json!({})),
        record(ADMIN_KEY, "key_admin", json!({"scopes": ["admin"]})),
        record(REVOKED_KEY, "key_revoked", json!({"status": "revoked"})),
        record(EXPIRED_KEY, "key_expired", json!({"expires_at": "2020-01-01T00:00:00Z"})),
        record(DISABLED_KEY, "key_disabled", json!({"agent_enabled": false})),
        record(PLAN_KEY, "key_plan", json!({"agent_enabled": false, "disabled_reason": "Your plan does not include \"API\" access"})),
        record(PROJECT_KEY, "key_project", json!({"path_prefixes": ["/v1/projects/42"]})),
        record(WEBHOOK_KEY, "key_webhook", json!({"scopes": ["webhook"]})),
    ]
}

/// The plugin configuration most tests run with.
pub fn plugin_config() -> Value {
    json!({
        "realm": "keyward-test",
        "rules": [
            {"path": {"prefix": "/public"}, "public": true},
            {"path": {"prefix": "/meta-admin"}, "public": true},
            {"methods": ["POST"], "path": {"prefix": "/v1"}, "scopes": ["write:all"]},
            {"path": {"prefix": "/admin"}, "scopes": ["admin"]},
        ],
        "snapshot": {"version": 1, "keys": snapshot_keys()}
    })
}

/// Routes: `/meta-admin` carries `filter_metadata.keyward.scopes: admin`; the rest go to echo.
pub fn routes() -> Value {
    json!([
        {"name": "meta-admin", "match": {"prefix": "/meta-admin"}, "route": {"cluster": "echo"},
         "metadata": {"filter_metadata": {"keyward": {"scopes": "admin"}}}},
        {"name": "everything-else", "match": {"prefix": "/"}, "route": {"cluster": "echo"}}
    ])
}

pub struct Stack {
    pub envoy: Envoy,
    pub echo: Echo,
}

pub fn start_with(plugin_config: Value) -> Stack {
    let echo = Echo::start(0).expect("echo upstream");
    let mut opts = EnvoyOptions::new(plugin_config, echo.port());
    opts.routes = Some(routes());
    let envoy = Envoy::start(&opts);
    Stack { envoy, echo }
}

pub fn start() -> Stack {
    start_with(plugin_config())
}

/// Asserts a contract error response: status, `error.code`, JSON content type, no key echoed.
pub fn assert_denied(r: &Response, status: u16, code: &str, presented: &[u8], ctx: &str) {
    assert_eq!(r.status, status, "{ctx}: body {}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.code().as_deref(), Some(code), "{ctx}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{ctx}");
    let body = r.json();
    assert_eq!(body["success"], false, "{ctx}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{ctx}");
    // What was presented as the key: the header value without a `Bearer` scheme.
    let presented = match presented.get(..6) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer") => &presented[6..],
        _ => presented,
    };
    let presented: &[u8] = {
        let start = presented.iter().position(|b| !b" \t".contains(b)).unwrap_or(presented.len());
        &presented[start..]
    };
    if presented.len() >= 4 {
        let echoed = r.body.windows(presented.len()).any(|w| w == presented);
        assert!(!echoed, "{ctx}: the body echoes the presented key");
    }
}
