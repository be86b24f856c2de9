//! What reaches the upstream: identity in, credential and spoofed identity out; and hostile
//! headers, which get the contract's 401 and never a 5xx.

// Helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::type_complexity)]

mod common;

use common::*;
use keyward_testkit::poll_until;
use serde_json::json;

#[test]
fn identity_headers_arrive_upstream_and_the_credential_does_not() {
    let stack = start();
    let good = good_key();
    for (name, value) in [("x-api-key", good.clone()), ("authorization", format!("Bearer {good}"))] {
        let r = stack.envoy.get("/v1/items?page=2", &[(name, value.as_bytes())]);
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(r.upstream_header("x-keyward-key-id").as_deref(), Some("key_good"));
        assert_eq!(r.upstream_header("x-keyward-agent").as_deref(), Some("agent-key_good"));
        assert_eq!(r.upstream_header("x-keyward-scopes").as_deref(), Some("read:all"));
        assert_eq!(r.upstream_header(name), None, "{name} was forwarded");
        assert!(!String::from_utf8_lossy(&r.body).contains(&good), "the key reached the upstream via {name}");
    }
    // Effective scopes include implications.
    let r = stack.envoy.get("/v1/x", &[("x-api-key", ADMIN_KEY.as_bytes())]);
    assert_eq!(r.upstream_header("x-keyward-scopes").as_deref(), Some("admin read:all write:all"));
    // Another scheme in Authorization is not ours: it is left alone.
    let r = stack.envoy.get("/v1/x", &[("x-api-key", good.as_bytes()), ("authorization", b"Basic dXNlcjpwYXNz")]);
    assert_eq!(r.upstream_header("authorization").as_deref(), Some("Basic dXNlcjpwYXNz"));
}

#[test]
fn query_parameter_source_is_stripped_from_the_forwarded_path() {
    let mut config = plugin_config();
    config["query_param"] = json!("api_key");
    let stack = start_with(config);
    let good = good_key();
    let r = stack.envoy.get(&format!("/v1/items?page=2&api_key={good}&sort=asc"), &[]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["path"], "/v1/items?page=2&sort=asc");
    assert_eq!(r.upstream_header("x-keyward-key-id").as_deref(), Some("key_good"));
    assert!(!String::from_utf8_lossy(&r.body).contains(&good));
}

#[test]
fn query_parameter_source_is_off_by_default() {
    let stack = start();
    let r = stack.envoy.get(&format!("/v1/items?api_key={}", good_key()), &[]);
    assert_denied(&r, 401, "MISSING_API_KEY", b"", "query parameter ignored by default");
}

#[test]
fn credential_header_is_kept_when_stripping_is_off() {
    let mut config = plugin_config();
    config["strip_credential"] = json!(false);
    let stack = start_with(config);
    let good = good_key();
    let r = stack.envoy.get("/v1/x", &[("x-api-key", good.as_bytes())]);
    assert_eq!(r.upstream_header("x-api-key").as_deref(), Some(good.as_str()));
}

#[test]
fn spoofed_identity_headers_from_the_client_are_removed() {
    let stack = start();
    let good = good_key();
    let spoof: [(&str, &[u8]); 4] = [
        ("x-keyward-agent", b"evil"),
        ("X-Keyward-Key-Id", b"key_admin"),
        ("x-keyward-scopes", b"admin"),
        ("x-keyward-anything", b"1"),
    ];
    let mut headers = spoof.to_vec();
    headers.push(("x-api-key", good.as_bytes()));
    let r = stack.envoy.get("/v1/x", &headers);
    assert_eq!(r.status, 200);
    let upstream = r.upstream_headers();
    let ours: Vec<_> = upstream.iter().filter(|(n, _)| n.starts_with("x-keyward-")).collect();
    assert_eq!(ours.len(), 3, "{ours:?}");
    assert_eq!(r.upstream_header("x-keyward-agent").as_deref(), Some("agent-key_good"));
    assert_eq!(r.upstream_header("x-keyward-key-id").as_deref(), Some("key_good"));
    assert_eq!(r.upstream_header("x-keyward-scopes").as_deref(), Some("read:all"));
    // On a public route too: no identity at all reaches the upstream.
    let r = stack.envoy.get("/public/x", &spoof);
    assert_eq!(r.status, 200);
    assert!(r.upstream_headers().iter().all(|(n, _)| !n.starts_with("x-keyward-")), "{:?}", r.upstream_headers());
}

#[test]
fn hostile_headers_get_the_contract_401_and_never_a_5xx() {
    let stack = start();
    let good = good_key();
    let big = "k".repeat(10 * 1024);
    let cases: Vec<(&str, Vec<(&str, Vec<u8>)>, &str)> = vec![
        ("10 KB x-api-key", vec![("x-api-key", big.clone().into_bytes())], "MALFORMED_API_KEY"),
        ("10 KB Bearer", vec![("authorization", format!("Bearer {big}").into_bytes())], "MALFORMED_API_KEY"),
        ("empty Bearer", vec![("authorization", b"Bearer".to_vec())], "MALFORMED_API_KEY"),
        ("Bearer and spaces", vec![("authorization", b"Bearer    ".to_vec())], "MALFORMED_API_KEY"),
        ("Bearer with no space", vec![("authorization", format!("Bearer{good}").into_bytes())], "MALFORMED_API_KEY"),
        ("Bearer and a tab", vec![("authorization", format!("Bearer\t{good}").into_bytes())], "MALFORMED_API_KEY"),
        ("tab inside the key", vec![("x-api-key", b"abc\tdef".to_vec())], "MALFORMED_API_KEY"),
        ("space inside the key", vec![("x-api-key", b"abc def".to_vec())], "MALFORMED_API_KEY"),
        ("non-ASCII Bearer", vec![("authorization", "Bearer ключ-доступа".as_bytes().to_vec())], "MALFORMED_API_KEY"),
        ("non-ASCII x-api-key", vec![("x-api-key", "clé-🔑".as_bytes().to_vec())], "MALFORMED_API_KEY"),
        ("Latin-1 byte", vec![("x-api-key", b"cl\xe9".to_vec())], "MALFORMED_API_KEY"),
        ("duplicated x-api-key", vec![("x-api-key", good.clone().into_bytes()), ("x-api-key", ADMIN_KEY.as_bytes().to_vec())], "MALFORMED_API_KEY"),
        ("both headers, different", vec![("authorization", format!("Bearer {ADMIN_KEY}").into_bytes()), ("x-api-key", good.clone().into_bytes())], "MALFORMED_API_KEY"),
        ("two Authorization headers", vec![("authorization", format!("Bearer {good}").into_bytes()), ("authorization", format!("Bearer {ADMIN_KEY}").into_bytes())], "MALFORMED_API_KEY"),
        ("comma-joined keys", vec![("x-api-key", format!("{good},{ADMIN_KEY}").into_bytes())], "MALFORMED_API_KEY"),
        ("empty x-api-key", vec![("x-api-key", Vec::new())], "MALFORMED_API_KEY"),
        ("odd header-name casing", vec![("X-API-KEY", b"never-issued-key".to_vec())], "INVALID_API_KEY"),
        ("Bearer, doubled scheme", vec![("authorization", format!("Bearer Bearer {good}").into_bytes())], "MALFORMED_API_KEY"),
        ("Basic scheme only", vec![("authorization", b"Basic dXNlcjpwYXNz".to_vec())], "MISSING_API_KEY"),
        ("garbage checksum key", vec![("x-api-key", b"kw_live_garbage_zzzzzz".to_vec())], "MALFORMED_API_KEY"),
        ("many x-api-key copies", (0..50).map(|i| ("x-api-key", format!("key-{i:04}").into_bytes())).collect(), "MALFORMED_API_KEY"),
    ];
    for (name, headers, code) in &cases {
        let hs: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        let r = keyward_testkit::request(stack.envoy.port, "GET", "/v1/x", &hs).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(r.status < 500, "{name}: {} {}", r.status, String::from_utf8_lossy(&r.body));
        let presented = headers.first().map(|(_, v)| v.clone()).unwrap_or_default();
        assert_denied(&r, 401, code, &presented, name);
    }
    // The same key sent twice is one credential.
    let r = stack.envoy.get("/v1/x", &[("x-api-key", good.as_bytes()), ("authorization", format!("Bearer {good}").as_bytes())]);
    assert_eq!(r.status, 200);
    // The filter survived all of it: every case was counted as a denial, none as an error.
    let denied = |code: &str| stack.envoy.stat(&format!("wasmcustom.keyward.denied.{code}")).unwrap_or(0);
    poll_until(std::time::Duration::from_secs(5), "the counters to be flushed", || {
        (denied("malformed_api_key") + denied("invalid_api_key") + denied("missing_api_key") >= cases.len() as u64).then_some(())
    });
    assert_eq!(stack.envoy.stat("wasmcustom.keyward.internal_errors"), Some(0));
    assert!(!stack.envoy.log().contains("panic"), "{}", stack.envoy.log());
}
