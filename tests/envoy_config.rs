//! Configuration against the real Envoy: a bad plugin configuration is refused, naming the
//! field; the README's example compiles.

// Helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::type_complexity)]

mod common;

use keyward_testkit::{workspace_root, Echo, Envoy, EnvoyOptions};
use serde_json::json;

#[test]
fn bad_plugin_config_is_refused_by_envoy_with_the_field_named() {
    let echo = Echo::start(0).unwrap();
    let cases = [
        (json!({"rules": [{"path": {"prefix": "/a"}, "scopes": []}, {"path": {"regex": "("}, "scopes": ["read:all"]}]}), "rules[1].path.regex"),
        (json!({"snapshot": {"keys": [{"digest": "not-a-digest", "id": "k", "agent": "a"}]}}), "snapshot.keys[0].digest"),
        (json!({"snapshot": {"keys": [{"key": "plaintext-key", "id": "k", "agent": "a"}]}}), "snapshot.keys[0].key"),
        (json!({"max_key_length": 1}), "max_key_length"),
    ];
    for (config, field) in cases {
        let failed = match Envoy::try_start(&EnvoyOptions::new(config.clone(), echo.port())) {
            Ok(_) => panic!("Envoy accepted {config}"),
            Err(f) => f,
        };
        assert!(failed.status.is_some_and(|s| !s.success()), "Envoy should exit non-zero: {:?}", failed.status);
        let line = failed.log.lines().find(|l| l.contains("rejecting configuration"));
        let line = line.unwrap_or_else(|| panic!("no rejection logged for {config}:\n{}", failed.log));
        assert!(line.contains(field), "{field} not named in: {line}");
    }
}

#[test]
fn demo_keys_printed_by_xtask_match_the_local_stack_digests() {
    let local = std::fs::read_to_string(workspace_root().join("envoy/static.yaml")).unwrap();
    let xtask = std::fs::read_to_string(workspace_root().join("xtask/src/main.rs")).unwrap();
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let keys: Vec<&str> = xtask
        .lines()
        .filter(|l| l.contains("pub const DEMO_"))
        .filter_map(|l| l.split('"').nth(1))
        .collect();
    assert_eq!(keys.len(), 2);
    for key in keys {
        let digest = keyward_core::Digest::of(key.as_bytes()).to_hex();
        assert!(local.contains(&digest), "envoy/static.yaml lacks the digest of {key}");
        assert!(!local.contains(key), "envoy/static.yaml holds a plaintext key");
        assert!(readme.contains(key), "README.md does not show the demo key {key}");
    }
}

#[test]
fn readme_configuration_example_compiles() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let start = readme.find("<!-- config-example -->").expect("README.md has a <!-- config-example --> block");
    let block = &readme[start..];
    let body_start = block.find("```json\n").expect("json fence") + "```json\n".len();
    let body_end = block[body_start..].find("```").expect("closing fence");
    let example = &block[body_start..body_start + body_end];
    let config = keyward_core::Config::from_json(example.as_bytes()).unwrap_or_else(|e| panic!("README example: {e}"));
    assert!(!config.rules.is_empty());
    assert!(config.snapshot.is_some());
}
