//! The admin API under attack, against the real `keyward serve`: token guessing is cut off per
//! client address, bodies are bounded, and neither keys nor tokens reach the log at trace level.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use keyward_control::api::{AUTH_FAILURES_ALLOWED, MAX_BODY_BYTES, USAGE_MAX_BODY_BYTES};
use serde_json::json;
use std::time::Duration;

const TOKEN: &str = "security-admin-token-0123456789ab";
const FEED_TOKEN: &str = "security-feed-token-0123456789ab";

/// `method path` with an optional bearer token and body: status, `Retry-After`, body.
fn call(url: &str, method: &str, path: &str, token: Option<&str>, body: Option<Vec<u8>>) -> (u16, Option<String>, serde_json::Value) {
    let mut req = ureq::request(method, &format!("{url}{path}")).timeout(Duration::from_secs(10));
    if let Some(t) = token {
        req = req.set("authorization", &format!("Bearer {t}"));
    }
    let result = match body {
        Some(b) => req.set("content-type", "application/json").send_bytes(&b),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let status = resp.status();
    let retry = resp.header("retry-after").map(str::to_string);
    (status, retry, resp.into_json().unwrap_or(serde_json::Value::Null))
}

#[test]
fn token_guessing_is_cut_off_per_address_and_nothing_secret_is_logged() {
    let dir = Dir::new("security");
    let server = Server::start(&dir, Some(TOKEN), &[("KEYWARD_LOG", "trace"), ("KEYWARD_FEED_TOKEN", FEED_TOKEN)]);
    let (status, _, created) = call(&server.url, "POST", "/v1/agents", Some(TOKEN), Some(br#"{"name":"a","scopes":["read:all"]}"#.to_vec()));
    assert_eq!(status, 201, "{created}");
    let key = created["secret"].as_str().unwrap().to_string();

    let guesses: Vec<String> = (0..AUTH_FAILURES_ALLOWED).map(|i| format!("guess-{i:04}-0123456789abcdef")).collect();
    for g in &guesses {
        let (status, _, body) = call(&server.url, "GET", "/v1/status", Some(g), None);
        assert_eq!((status, body["error"]["code"].as_str()), (401, Some("UNAUTHORIZED")));
    }
    // The limit is reached: refused before the token is compared, even the right one.
    let (status, retry, body) = call(&server.url, "GET", "/v1/status", Some("one-more-guess-0123456789"), None);
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("TOO_MANY_ATTEMPTS")), "{body}");
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let (status, _, _) = call(&server.url, "GET", "/v1/status", Some(TOKEN), None);
    assert_eq!(status, 429, "a blocked address learns nothing, not even from the right token");
    // The feed token is guarded by the same counter.
    let (status, _, _) = call(&server.url, "GET", "/v1/feed?since=0", Some("feed-guess-0123456789abc"), None);
    assert_eq!(status, 429);
    // Unauthenticated probes stay cheap and open.
    assert_eq!(call(&server.url, "GET", "/healthz", None, None).0, 200);

    let log = server.log();
    assert!(log.contains("TRACE") || log.contains("DEBUG"), "serve did not log at trace level");
    assert!(log.contains("wrong or missing token"), "failed attempts are logged (without the token)");
    for secret in [TOKEN, FEED_TOKEN, key.as_str()].into_iter().chain(guesses.iter().map(String::as_str)) {
        assert!(!log.contains(secret), "{secret:?} appears in the trace-level log");
    }
}

#[test]
fn request_bodies_are_bounded() {
    let dir = Dir::new("bodies");
    let server = Server::start(&dir, Some(TOKEN), &[]);
    let filler = "x".repeat(MAX_BODY_BYTES + 1);
    let big = format!(r#"{{"name":"a","description":"{filler}"}}"#).into_bytes();
    let (status, _, body) = call(&server.url, "POST", "/v1/agents", Some(TOKEN), Some(big));
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("PAYLOAD_TOO_LARGE")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains(&MAX_BODY_BYTES.to_string()), "{body}");
    // Usage reports have their own, larger bound.
    let huge = vec![b' '; USAGE_MAX_BODY_BYTES + 1];
    let (status, _, body) = call(&server.url, "POST", "/v1/feed/usage", None, Some(huge));
    assert_eq!(status, 413);
    assert!(body["error"]["message"].as_str().unwrap_or("").contains(&USAGE_MAX_BODY_BYTES.to_string()), "the usage route names its own bound: {body}");
    let ok = json!({"envoy": "e", "usage": []}).to_string().into_bytes();
    assert_eq!(call(&server.url, "POST", "/v1/feed/usage", None, Some(ok)).0, 200);
    // Nothing was created by the refused request.
    let (_, _, agents) = call(&server.url, "GET", "/v1/agents", Some(TOKEN), None);
    assert_eq!(agents.as_array().map(Vec::len).or(agents["agents"].as_array().map(Vec::len)), Some(0), "{agents}");
}

#[test]
fn the_guard_counts_per_address_and_forgets_after_its_window() {
    use keyward_control::api::{AuthGuard, AUTH_WINDOW};
    let guard = AuthGuard::default();
    let t0 = std::time::Instant::now();
    let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
    for _ in 0..AUTH_FAILURES_ALLOWED - 1 {
        guard.failed(a, t0);
    }
    assert_eq!(guard.blocked(a, t0), None, "below the limit");
    guard.failed(a, t0);
    assert_eq!(guard.blocked(a, t0), Some(AUTH_WINDOW.as_secs()));
    assert_eq!(guard.blocked(b, t0), None, "another address is not affected");
    assert_eq!(guard.blocked(a, t0 + AUTH_WINDOW), None, "forgotten after the window");
    guard.failed(a, t0 + AUTH_WINDOW);
    assert_eq!(guard.blocked(a, t0 + AUTH_WINDOW), None, "a new window starts from one failure");
}
