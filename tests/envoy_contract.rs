//! The contract table, proven against the real Envoy 1.40 binary running the built keyward.wasm.

// Helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::type_complexity)]

mod common;

use common::*;
use keyward_testkit::{poll_until, request};
use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

struct Case<'a> {
    name: &'a str,
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, Vec<u8>)>,
    status: u16,
    /// `None` for an upstream 200.
    code: Option<&'a str>,
    /// A substring of `WWW-Authenticate`, or `None` for no such header.
    challenge: Option<&'a str>,
}

fn case<'a>(name: &'a str, method: &'a str, path: &'a str, headers: Vec<(&'a str, Vec<u8>)>, status: u16, code: Option<&'a str>, challenge: Option<&'a str>) -> Case<'a> {
    Case { name, method, path, headers, status, code, challenge }
}

fn key(k: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![("x-api-key", k.as_bytes().to_vec())]
}

#[test]
fn every_contract_row_but_429_and_503_is_answered_as_specified() {
    let stack = start();
    let good = good_key();
    let mut bad_checksum = good.clone();
    bad_checksum.replace_range(10..11, if &good[10..11] == "A" { "B" } else { "A" });
    let cases = vec![
        case("no credential", "GET", "/v1/x", vec![], 401, Some("MISSING_API_KEY"), Some(r#"Bearer realm="keyward-test""#)),
        case("empty bearer", "GET", "/v1/x", vec![("authorization", b"Bearer ".to_vec())], 401, Some("MALFORMED_API_KEY"), Some(r#"error="invalid_request""#)),
        case("bad characters", "GET", "/v1/x", key("clé-du-coffre"), 401, Some("MALFORMED_API_KEY"), Some(r#"error="invalid_request""#)),
        case("over the length bound", "GET", "/v1/x", key(&"k".repeat(257)), 401, Some("MALFORMED_API_KEY"), Some(r#"error="invalid_request""#)),
        case("failed checksum", "GET", "/v1/x", key(&bad_checksum), 401, Some("MALFORMED_API_KEY"), Some(r#"error="invalid_request""#)),
        case("two different credentials", "GET", "/v1/x", vec![("x-api-key", good.as_bytes().to_vec()), ("authorization", format!("Bearer {ADMIN_KEY}").into_bytes())], 401, Some("MALFORMED_API_KEY"), Some(r#"error="invalid_request""#)),
        case("unknown key", "GET", "/v1/x", key("never-issued-key-0001"), 401, Some("INVALID_API_KEY"), Some(r#"error="invalid_token""#)),
        case("revoked key", "GET", "/v1/x", key(REVOKED_KEY), 401, Some("REVOKED_API_KEY"), Some(r#"error="invalid_token""#)),
        case("expired key", "GET", "/v1/x", key(EXPIRED_KEY), 401, Some("EXPIRED_API_KEY"), Some(r#"error="invalid_token""#)),
        case("agent disabled", "GET", "/v1/x", key(DISABLED_KEY), 403, Some("ACCESS_DISABLED"), None),
        case("lacks write:all", "POST", "/v1/x", key(&good), 403, Some("INSUFFICIENT_SCOPE"), Some(r#"error="insufficient_scope", scope="write:all""#)),
        case("lacks admin", "GET", "/admin/users", key(&good), 403, Some("INSUFFICIENT_SCOPE"), Some(r#"scope="admin""#)),
        case("restricted to another path", "GET", "/v1/projects/43", key(PROJECT_KEY), 403, Some("INSUFFICIENT_SCOPE"), Some(r#"error="insufficient_scope""#)),
        case("valid key, x-api-key", "GET", "/v1/x", key(&good), 200, None, None),
        case("valid key, Bearer", "GET", "/v1/x", vec![("authorization", format!("Bearer {good}").into_bytes())], 200, None, None),
        case("valid key, lowercase scheme", "GET", "/v1/x", vec![("authorization", format!("bearer {good}").into_bytes())], 200, None, None),
        case("admin implies write:all", "POST", "/v1/x", key(ADMIN_KEY), 200, None, None),
        case("admin route with admin", "GET", "/admin/users", key(ADMIN_KEY), 200, None, None),
        case("inside the path restriction", "GET", "/v1/projects/42/items", key(PROJECT_KEY), 200, None, None),
        case("unmatched route takes any valid key", "GET", "/anything", key(WEBHOOK_KEY), 200, None, None),
        case("public route without a key", "GET", "/public/docs", vec![], 200, None, None),
    ];
    for c in &cases {
        let headers: Vec<(&str, &[u8])> = c.headers.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        let r = request(stack.envoy.port, c.method, c.path, &headers).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let presented = c.headers.first().map(|(_, v)| v.clone()).unwrap_or_default();
        match c.code {
            Some(code) => assert_denied(&r, c.status, code, &presented, c.name),
            None => {
                assert_eq!(r.status, c.status, "{}: {}", c.name, String::from_utf8_lossy(&r.body));
                assert_eq!(r.json()["path"], c.path, "{}: the upstream did not answer", c.name);
            }
        }
        assert_eq!(r.header("www-authenticate").is_some(), c.challenge.is_some(), "{}: {:?}", c.name, r.header("www-authenticate"));
        if let Some(want) = c.challenge {
            let got = r.header("www-authenticate").unwrap_or_default();
            assert!(got.starts_with("Bearer ") && got.contains(want), "{}: WWW-Authenticate {got:?} lacks {want:?}", c.name);
        }
    }
    // Details the contract names.
    let expired = stack.envoy.get("/v1/x", &[("x-api-key", EXPIRED_KEY.as_bytes())]).json();
    assert_eq!(expired["error"]["details"]["expired_at"], "2020-01-01T00:00:00Z");
    let scope = request(stack.envoy.port, "POST", "/v1/x", &[("x-api-key", good.as_bytes())]).unwrap().json();
    assert_eq!(scope["error"]["details"]["required_scopes"], json!(["write:all"]));
}

/// The bodies, byte for byte (field order included): issue 12's error details.
#[test]
fn error_bodies_carry_their_details_exactly_issue_12() {
    let stack = start();
    let body = |headers: &[(&str, &[u8])]| String::from_utf8(stack.envoy.get("/v1/x", headers).body).unwrap();
    let check = |name: &str, got: String, want: &str| assert_eq!(got, want, "{name}");
    check(
        "no credential",
        body(&[]),
        r#"{"success":false,"error":{"code":"MISSING_API_KEY","message":"No API key was presented. Send it in the authorization header as 'Bearer <key>' or the x-api-key header.","details":{"header":"authorization"}}}"#,
    );
    check(
        "revoked",
        body(&[("x-api-key", REVOKED_KEY.as_bytes())]),
        r#"{"success":false,"error":{"code":"REVOKED_API_KEY","message":"The API key has been revoked.","details":{"key_id":"key_revoked"}}}"#,
    );
    check(
        "expired",
        body(&[("x-api-key", EXPIRED_KEY.as_bytes())]),
        r#"{"success":false,"error":{"code":"EXPIRED_API_KEY","message":"The API key expired at 2020-01-01T00:00:00Z.","details":{"expired_at":"2020-01-01T00:00:00Z","key_id":"key_expired"}}}"#,
    );
    check(
        "disabled without a reason",
        body(&[("x-api-key", DISABLED_KEY.as_bytes())]),
        r#"{"success":false,"error":{"code":"ACCESS_DISABLED","message":"API access is disabled for this key's agent.","details":{}}}"#,
    );
    check(
        "disabled with a reason",
        body(&[("x-api-key", PLAN_KEY.as_bytes())]),
        r#"{"success":false,"error":{"code":"ACCESS_DISABLED","message":"Your plan does not include \"API\" access","details":{}}}"#,
    );
    drop(stack);
    // Only the x-api-key header enabled: that is the header named.
    let mut config = plugin_config();
    config["bearer_header"] = json!(null);
    let stack = start_with(config);
    let r = stack.envoy.get("/v1/x", &[]);
    assert_denied(&r, 401, "MISSING_API_KEY", b"", "x-api-key only");
    assert_eq!(r.json()["error"]["details"], json!({"header": "x-api-key"}));
}

#[test]
fn plain_http_is_refused_when_tls_is_required() {
    let mut config = plugin_config();
    config["require_tls"] = json!(true);
    let stack = start_with(config.clone());
    let good = good_key();
    let r = stack.envoy.get("/v1/x", &[("x-api-key", good.as_bytes())]);
    assert_denied(&r, 403, "TLS_REQUIRED", good.as_bytes(), "plain HTTP");
    // x-forwarded-proto is not trusted unless configured.
    let r = stack.envoy.get("/v1/x", &[("x-api-key", good.as_bytes()), ("x-forwarded-proto", b"https")]);
    assert_denied(&r, 403, "TLS_REQUIRED", good.as_bytes(), "untrusted x-forwarded-proto");
    drop(stack);

    config["trust_forwarded_proto"] = json!(true);
    let stack = start_with(config);
    let r = stack.envoy.get("/v1/x", &[("x-api-key", good.as_bytes()), ("x-forwarded-proto", b"https")]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = stack.envoy.get("/v1/x", &[("x-api-key", good.as_bytes())]);
    assert_denied(&r, 403, "TLS_REQUIRED", good.as_bytes(), "trusted x-forwarded-proto: http");
}

#[test]
fn route_metadata_scopes_win_over_rules() {
    let stack = start();
    // The rules say /meta-admin is public; the route's metadata says it needs admin.
    let r = stack.envoy.get("/meta-admin/x", &[]);
    assert_denied(&r, 401, "MISSING_API_KEY", b"", "metadata makes the public rule private");
    let good = good_key();
    let r = stack.envoy.get("/meta-admin/x", &[("x-api-key", good.as_bytes())]);
    assert_denied(&r, 403, "INSUFFICIENT_SCOPE", good.as_bytes(), "metadata requires admin");
    assert_eq!(r.json()["error"]["details"]["required_scopes"], json!(["admin"]));
    let r = stack.envoy.get("/meta-admin/x", &[("x-api-key", ADMIN_KEY.as_bytes())]);
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream_header("x-keyward-key-id").as_deref(), Some("key_admin"));
}

#[test]
fn key_expiring_in_one_second_flips_from_200_to_401_without_a_config_change() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    // Leave room for Envoy to start, then watch the last second before expiry.
    let expires_at = now + 8;
    let mut config = plugin_config();
    config["snapshot"]["keys"] = json!([record("soon-expiring-key-1", "key_soon", json!({"expires_at": expires_at}))]);
    let stack = start_with(config);
    let unix = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let headers: [(&str, &[u8]); 1] = [("x-api-key", b"soon-expiring-key-1")];
    poll_until(Duration::from_secs(10), "one second before expiry", || (unix() >= expires_at as f64 - 1.0).then_some(()));
    let before = stack.envoy.get("/v1/x", &headers);
    let asked_at = unix();
    assert!(asked_at < expires_at as f64, "too slow to observe the key before expiry");
    assert_eq!(before.status, 200, "one second before expiry");
    let after = poll_until(Duration::from_secs(5), "the key to expire", || {
        let r = stack.envoy.get("/v1/x", &headers);
        (r.status != 200).then_some((r, unix()))
    });
    assert_denied(&after.0, 401, "EXPIRED_API_KEY", b"soon-expiring-key-1", "after expiry");
    assert!(after.1 >= expires_at as f64, "refused before its expiry time");
    assert!(after.1 < expires_at as f64 + 1.5, "kept working {:.2}s past expiry", after.1 - expires_at as f64);
    let expired_at = keyward_core::time::format_rfc3339(expires_at as i64);
    assert_eq!(after.0.json()["error"]["details"]["expired_at"], expired_at.as_str());
}

#[test]
fn denials_and_allows_are_counted_in_envoy_stats() {
    let stack = start();
    let good = good_key();
    stack.envoy.get("/v1/x", &[("x-api-key", good.as_bytes())]);
    stack.envoy.get("/v1/x", &[("x-api-key", good.as_bytes())]);
    stack.envoy.get("/v1/x", &[]);
    stack.envoy.get("/v1/x", &[("x-api-key", REVOKED_KEY.as_bytes())]);
    stack.envoy.get("/public/x", &[]);
    let stat = |name: &str| stack.envoy.stat(&format!("wasmcustom.keyward.{name}"));
    // Counters reach Envoy on the filter's next tick.
    poll_until(Duration::from_secs(5), "the counters to be flushed", || (stat("allowed") == Some(2) && stat("denied.revoked_api_key") == Some(1)).then_some(()));
    assert_eq!(stat("allowed"), Some(2));
    assert_eq!(stat("public"), Some(1));
    assert_eq!(stat("denied.missing_api_key"), Some(1));
    assert_eq!(stat("denied.revoked_api_key"), Some(1));
    assert_eq!(stat("denied.invalid_api_key"), Some(0));
    assert_eq!(stat("internal_errors"), Some(0));
}

#[test]
fn tls_connections_pass_when_tls_is_required() {
    let dir = keyward_testkit::TempDir::new("tls").unwrap();
    let (cert, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key_file)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (Debian package openssl) makes the test certificate");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let echo = keyward_testkit::Echo::start(0).unwrap();
    let mut config = plugin_config();
    config["require_tls"] = json!(true);
    let mut opts = keyward_testkit::EnvoyOptions::new(config, echo.port());
    opts.tls = Some((cert, key_file));
    let envoy = keyward_testkit::Envoy::start(&opts);
    let good = good_key();
    let curl = |key: &str| {
        let out = std::process::Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("x-api-key: {key}"))
            .arg(format!("https://127.0.0.1:{}/v1/x", envoy.port))
            .output()
            .expect("curl (Debian package curl) speaks TLS to Envoy");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(curl(&good), "200", "a TLS request with a good key");
    assert_eq!(curl(REVOKED_KEY), "401", "TLS does not bypass the key checks");
}
