//! Rule and path matching, through the whole decision, on hostile methods, paths, hosts and
//! headers. Input: `method\npath\nauthority\nroute-scopes\nheader:value\n…`.
#![no_main]

use keyward_core::decision::{decide, Decision, Request};
use keyward_core::{Config, Digest};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const GOOD: &str = "legacy-reader-key-0001";
const ADMIN: &str = "legacy-admin-key-0001";

fn config() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| {
        let reader = Digest::of(GOOD.as_bytes()).to_hex();
        let admin = Digest::of(ADMIN.as_bytes()).to_hex();
        let json = format!(
            r#"{{
            "rules": [
                {{"path": {{"exact": "/healthz"}}, "public": true}},
                {{"path": {{"prefix": "/admin"}}, "scopes": ["admin"]}},
                {{"path": {{"regex": "/v1/projects/[0-9]+/secrets(/.*)?"}}, "scopes": ["secrets"]}},
                {{"host": "*.internal.example.com", "scopes": ["internal"]}},
                {{"methods": ["POST", "PUT", "PATCH", "DELETE"], "scopes": ["write:all"]}},
                {{"methods": ["GET", "HEAD"], "scopes": ["read:all"]}}
            ],
            "default": {{"scopes": ["admin"]}},
            "snapshot": {{"version": 1, "keys": [
                {{"digest": "{reader}", "id": "key_r", "agent": "reader", "scopes": ["read:all"], "path_prefixes": ["/v1/projects/42"]}},
                {{"digest": "{admin}", "id": "key_a", "agent": "root", "scopes": ["admin"], "expires_at": "2100-01-01T00:00:00Z"}}
            ]}}
        }}"#
        );
        Config::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("fixture config: {e}"))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let mut next = || String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let (method, path, authority, route) = (next(), next(), next(), next());
    let headers: Vec<(String, Vec<u8>)> = lines
        .filter_map(|l| {
            let at = l.iter().position(|b| *b == b':')?;
            Some((String::from_utf8_lossy(&l[..at]).to_ascii_lowercase(), l[at + 1..].to_vec()))
        })
        .collect();
    let config = config();
    let snapshot = config.snapshot.as_ref().unwrap_or_else(|| panic!("fixture has a snapshot"));
    let now = || 1_900_000_000;
    let req = Request {
        method: &method,
        path: &path,
        authority: &authority,
        headers: &headers,
        tls_connection: false,
        route_scopes: if route.is_empty() { None } else { Some(&route) },
        now: &now,
    };
    match decide(config, snapshot, &req) {
        Decision::Allow(identity) => {
            // Only a presented, known key opens anything, and the reader key never opens /admin.
            let presented = |k: &str| headers.iter().any(|(_, v)| v.windows(k.len()).any(|w| w == k.as_bytes()));
            assert!(presented(GOOD) || presented(ADMIN), "allowed without a known key");
            if identity.record.agent == "reader" {
                let p = keyward_core::rules::path_only(&path);
                assert!(p.starts_with("/v1/projects/42"), "reader key allowed outside its path prefix: {path:?}");
                assert!(route.is_empty() || !route.split([' ', ',']).any(|s| s == "admin"), "reader allowed on an admin route");
            }
        }
        Decision::Public => {
            assert!(route.is_empty(), "route metadata scopes overridden by a public rule: {path:?}");
            assert_eq!(keyward_core::rules::path_only(&path), "/healthz", "public outside /healthz: {path:?}");
        }
        _ => {}
    }
});
