//! Snapshot push against the real Envoy (two workers) and the real `keyward serve`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::assert_denied;
use keyward_testkit::{poll_until, request, Echo, Envoy, EnvoyOptions, Keyward};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn feed_config(extra: Value) -> Value {
    let mut cp = json!({"cluster": "keyward", "feed_wait_secs": 5, "usage_report_secs": 1});
    if let (Some(cp), Some(extra)) = (cp.as_object_mut(), extra.as_object()) {
        cp.extend(extra.clone());
    }
    json!({
        "rules": [
            {"path": {"exact": "/healthz"}, "public": true},
            {"methods": ["POST", "PUT", "PATCH", "DELETE"], "scopes": ["write:all"]},
            {"methods": ["GET"], "scopes": ["read:all"]}
        ],
        "control_plane": cp
    })
}

struct Stack {
    envoy: Envoy,
    keyward: Keyward,
    _echo: Echo,
}

fn start_with(keyward: Keyward, config: Value) -> Stack {
    let echo = Echo::start(0).unwrap();
    let mut opts = EnvoyOptions::new(config, echo.port());
    opts.control_plane_port = Some(keyward.port);
    opts.node_id = "envoy-feed-test".into();
    let envoy = Envoy::start(&opts);
    Stack { envoy, keyward, _echo: echo }
}

fn start() -> Stack {
    let stack = start_with(Keyward::start(), feed_config(json!({})));
    stack.wait_applied();
    stack
}

impl Stack {
    fn get(&self, key: &str) -> keyward_testkit::Response {
        self.envoy.get("/v1/things", &[("x-api-key", key.as_bytes())])
    }

    /// Waits until `keyward status` shows this Envoy at the store's version.
    fn wait_applied(&self) -> Value {
        poll_until(Duration::from_secs(20), "the Envoy to apply the store's version", || {
            let status = self.keyward.api_get("/v1/status");
            let envoy = status["envoys"].as_array()?.iter().find(|e| e["id"] == "envoy-feed-test")?.clone();
            (envoy["applied_version"] == status["snapshot_version"]).then_some(status)
        })
    }

    fn create_agent(&self, name: &str, scopes: &str) -> (String, String) {
        let out: Value = serde_json::from_str(&self.keyward.cli(&["agent", "create", name, "--scopes", scopes, "--json"])).unwrap();
        (out["key"]["id"].as_str().unwrap().to_string(), out["secret"].as_str().unwrap().to_string())
    }
}

#[test]
fn a_key_created_by_the_cli_works_through_envoy_at_once_and_status_shows_the_applied_version() {
    let stack = start();
    let before = stack.get("kw_live_never_issued_000000");
    assert_denied(&before, 401, "MALFORMED_API_KEY", b"", "garbage checksum");
    let created_at = Instant::now();
    let (id, secret) = stack.create_agent("demo", "read:all");
    let first_ok = poll_until(Duration::from_secs(5), "the new key to work", || (stack.get(&secret).status == 200).then(Instant::now));
    let took = first_ok - created_at;
    eprintln!("commit (CLI exit) to first 200: {:.1} ms", took.as_secs_f64() * 1000.0);
    let r = stack.get(&secret);
    assert_eq!(r.upstream_header("x-keyward-key-id").as_deref(), Some(id.as_str()));
    assert_eq!(r.upstream_header("x-keyward-agent").as_deref(), Some("demo"));
    let status = stack.wait_applied();
    let envoy = &status["envoys"][0];
    assert_eq!(envoy["lag"], 0);
    assert_eq!(envoy["connected"], true, "the fetcher's long-poll is open");
    let text = stack.keyward.cli(&["status"]);
    assert!(text.contains("envoy-feed-test"), "{text}");
}
