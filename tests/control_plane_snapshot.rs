//! Keys made by the control plane's store work in the real Envoy: `keyward snapshot` output is
//! exactly what the filter's inline `snapshot` accepts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::assert_denied;
use keyward_control::model::{ImportKey, NewAgent, NewKey, RotateKey};
use keyward_control::store::Store;
use keyward_testkit::{Echo, Envoy, EnvoyOptions};
use serde_json::json;

#[test]
fn keys_created_by_the_control_plane_are_enforced_by_envoy() {
    let mut store = Store::memory().unwrap();
    let agent = |store: &mut Store, name: &str, scopes: &[&str]| {
        store.create_agent(&NewAgent { name: name.into(), scopes: scopes.iter().map(|s| s.to_string()).collect(), ..Default::default() }).unwrap()
    };
    let shop = agent(&mut store, "shop", &["read:all", "write:all"]);
    let key = |store: &mut Store, req: NewKey| store.create_key(&req).unwrap();
    let ro = key(&mut store, NewKey { agent: "shop".into(), name: Some("ro".into()), scopes: Some(vec!["read:all".into()]), ..Default::default() });
    let narrow = key(&mut store, NewKey { agent: "shop".into(), name: Some("p42".into()), path_prefixes: vec!["/v1/projects/42".into()], ..Default::default() });
    let doomed = key(&mut store, NewKey { agent: "shop".into(), name: Some("doomed".into()), ..Default::default() });
    store.revoke_key(&doomed.key.id).unwrap();
    let rotated = store.rotate_key(&ro.key.id, &RotateKey { grace: Some("1h".into()), ..Default::default() }).unwrap();
    let off = agent(&mut store, "off", &["read:all"]);
    store.set_agent_enabled("off", false, None).unwrap();
    store
        .import_key(&ImportKey { key: NewKey { agent: "shop".into(), name: Some("kong".into()), ..Default::default() }, secret: Some("kong-legacy-key-0123456789".into()), digest: None, allow_weak: false })
        .unwrap();

    let snapshot = serde_json::to_value(store.snapshot().unwrap()).unwrap();
    assert!(!snapshot.to_string().contains(&shop.secret), "a plaintext key in the snapshot");
    let config = json!({
        "rules": [{"methods": ["POST", "PUT", "PATCH", "DELETE"], "scopes": ["write:all"]}, {"scopes": ["read:all"]}],
        "snapshot": snapshot,
    });
    let echo = Echo::start(0).unwrap();
    let envoy = Envoy::start(&EnvoyOptions::new(config, echo.port()));
    let get = |k: &str| envoy.get("/v1/orders", &[("authorization", format!("Bearer {k}").as_bytes())]);

    let r = get(&shop.secret);
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream_header("x-keyward-agent").as_deref(), Some("shop"));
    assert_eq!(r.upstream_header("x-keyward-key-id").as_deref(), Some(shop.key.id.as_str()));
    assert_eq!(r.upstream_header("x-keyward-scopes").as_deref(), Some("read:all write:all"));

    let post = keyward_testkit::request(envoy.port, "POST", "/v1/orders", &[("x-api-key", rotated.new.secret.as_bytes())]).unwrap();
    assert_denied(&post, 403, "INSUFFICIENT_SCOPE", rotated.new.secret.as_bytes(), "a read-only key posting");
    assert_eq!(get(&ro.secret).status, 200, "the old key works during the grace period");
    assert_eq!(get(&rotated.new.secret).status, 200, "the new key works at once");
    assert_denied(&get(&doomed.secret), 401, "REVOKED_API_KEY", doomed.secret.as_bytes(), "revoked");
    assert_denied(&get(&off.secret), 403, "ACCESS_DISABLED", off.secret.as_bytes(), "agent disabled");
    assert_denied(&get(&narrow.secret), 403, "INSUFFICIENT_SCOPE", narrow.secret.as_bytes(), "outside its path");
    assert_eq!(envoy.get("/v1/projects/42/x", &[("x-api-key", narrow.secret.as_bytes())]).status, 200);
    assert_eq!(get("kong-legacy-key-0123456789").status, 200, "an imported key works unchanged");
    assert_denied(&get(&format!("{}x", shop.secret)), 401, "MALFORMED_API_KEY", shop.secret.as_bytes(), "checksum");
}
