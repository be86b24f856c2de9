//! What `cargo xtask bench` measures: the Envoy configurations under test (no filter, the no-op
//! wasm floor, api_key_auth, Lua, ext_authz, and keyward fed three key sets), the upstream they
//! proxy to, and the deterministic keys they are loaded with.

use crate::Result;
use keyward_core::{keyformat, Digest};
use keyward_testkit::{listener_bootstrap, loopback_cluster, named_wasm_filter, native_filter, wasm_filter, Envoy, EnvoyOptions, Keyward, Shell};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Deterministic keyward-format keys (valid checksums), so every run presents the same set.
pub(crate) fn keys(n: usize, salt: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            let seed = Digest::of(format!("bench {salt} {i}").as_bytes());
            let bytes = seed.0.iter().chain(Digest::of(&seed.0).0.iter()).copied().collect::<Vec<u8>>();
            keyformat::generate("kw_live", bytes.into_iter().cycle()).unwrap_or_default()
        })
        .collect()
}

/// A bootstrap with one listener through `filters` (then the router) to the `upstream` cluster.
pub(super) fn bootstrap(node: &str, filters: Vec<Value>, clusters: Vec<Value>) -> Value {
    let routes = json!([{"name": "bench", "match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]);
    listener_bootstrap(node, routes, filters, clusters)
}

fn api_key_auth(keys: &[String]) -> Value {
    let credentials: Vec<Value> = keys.iter().enumerate().map(|(i, k)| json!({"key": k, "client": format!("client-{i}")})).collect();
    json!({
        "name": "envoy.filters.http.api_key_auth",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
            "credentials": credentials,
            "key_sources": [{"header": "x-api-key"}]
        }
    })
}

fn lua(keys: &[String]) -> Value {
    let mut code = String::from("local keys = {\n");
    for k in keys {
        let _ = writeln!(code, "  [\"{k}\"] = true,");
    }
    code.push_str(
        "}\nfunction envoy_on_request(handle)\n  local key = handle:headers():get(\"x-api-key\")\n  if key == nil or not keys[key] then\n    handle:respond({[\":status\"] = \"401\"}, \"invalid key\")\n  end\nend\n",
    );
    json!({
        "name": "envoy.filters.http.lua",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua", "default_source_code": {"inline_string": code}}
    })
}

fn ext_authz() -> Value {
    json!({
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "http_service": {
                "server_uri": {"uri": "http://127.0.0.1", "cluster": "authz", "timeout": "1s"},
                "authorization_request": {"allowed_headers": {"patterns": [{"exact": "x-api-key"}]}}
            },
            "transport_api_version": "V3"
        }
    })
}

/// The upstream every configuration proxies to: an Envoy answering 200 itself, on CPU 1.
pub(super) fn upstream() -> Result<Envoy> {
    let routes = json!([{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]);
    let config = listener_bootstrap("upstream", routes, vec![], vec![]);
    start(config, 1, "1")
}

pub(super) fn start(config: Value, concurrency: u32, cpus: &str) -> Result<Envoy> {
    let mut opts = EnvoyOptions::new(json!({}), 0);
    opts.bootstrap = Some(config);
    opts.concurrency = concurrency;
    opts.pin_cpus = Some(cpus.to_string());
    opts.extra_args = vec!["--component-log-level".into(), "wasm:info,dynamic_modules:info".into()];
    Envoy::try_start(&opts).map_err(|f| format!("Envoy did not start ({:?}):\n{}", f.status, f.log).into())
}

/// One configuration under test.
pub(super) struct Subject {
    pub name: String,
    pub envoy: Envoy,
    /// The keys wrk presents (a sample of the loaded set for the largest).
    pub keys_file: PathBuf,
    pub start_secs: f64,
}

fn write_keys(dir: &Path, name: &str, keys: &[String], max: usize) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.keys"));
    let step = keys.len().div_ceil(max).max(1);
    let body: String = keys.iter().step_by(step).map(|k| format!("{k}\n")).collect();
    std::fs::write(&path, body)?;
    Ok(path)
}

/// A `keyward serve` with `keys` imported for one agent (`rate` adds a per-key limit), and the
/// ids of the imported keys in the same order.
pub(crate) fn control_plane(keys: &[String], rate: Option<&str>) -> Result<(Keyward, Vec<String>)> {
    let keyward = Keyward::start();
    keyward.cli(&["agent", "create", "bench", "--scopes", "read:all"]);
    let mut ids = Vec::new();
    if !keys.is_empty() {
        let mut args = vec!["key", "import", "--agent", "bench", "--batch", "--json"];
        if let Some(r) = rate {
            args.extend(["--rate", r]);
        }
        let lines: String = keys.iter().map(|k| format!("{k}\n")).collect();
        let out: Value = serde_json::from_str(&keyward.cli_stdin(&args, &lines))?;
        ids = out["ids"].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()).unwrap_or_default();
    }
    Ok((keyward, ids))
}

/// Waits until `envoy` has applied the snapshot `serve` holds. It asks `serve` once and then
/// watches the Envoy's own gauge (`keyward.feed.applied_version`) every 100 ms: `GET /v1/status`
/// counts the active keys, about 120 ms at a million, and polling it would slow the very feed
/// being timed (a 4.4 s apply took 15 s with it polled every 20 ms).
pub(crate) fn wait_applied(envoy: &Envoy, serve: &Keyward, shell: Shell) -> Result {
    let version = serve.api_get("/v1/status")["snapshot_version"].as_u64().ok_or("GET /v1/status: no snapshot_version")?;
    let deadline = Instant::now() + Duration::from_secs(900);
    let gauge = format!("{}keyward.feed.applied_version", shell.stats_prefix());
    while envoy.stat(&gauge).is_none_or(|v| v < version) {
        if Instant::now() > deadline {
            return Err(format!("the snapshot (version {version}) was not applied in 900 s:\n{}", envoy.log()).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// keyward's filter in `shell`, with `config`.
pub(crate) fn keyward_in(shell: Shell, config: &Value) -> Value {
    match shell {
        Shell::Wasm => wasm_filter(&keyward_testkit::wasm_path(), config),
        Shell::Native => native_filter(config),
    }
}

/// The no-op filter: the wasm floor (configuration 2), built by `cargo xtask bench`.
pub(super) fn noop_wasm() -> PathBuf {
    keyward_testkit::workspace_root().join("target/wasm32-wasip1/release/noop.wasm")
}

/// The eight configurations, started and ready, in the order of the table.
pub(super) struct Started {
    pub subjects: Vec<Subject>,
    /// For configurations 6, 7 and 8: the `keyward serve` feeding each, its keys' ids and keys.
    pub serves: Vec<(Keyward, Vec<String>, Vec<String>)>,
    /// For the keyward configurations, in order: (shell, keys in the snapshot, full snapshot
    /// applied in ms, import s).
    pub apply_ms: Vec<(Shell, usize, f64, f64)>,
}

/// Starts the five reference configurations (the first four on `small`'s keys, ext_authz asking
/// the server on `authz_port`) and keyward fed each of `sets` by its own `keyward serve`, the
/// last with scopes and a rate limit. Key files for wrk go to `dir`.
pub(super) fn start_all(dir: &Path, up_port: u16, authz_port: u16, sets: [&Vec<String>; 3]) -> Result<Started> {
    let small = sets[0];
    let mut subjects: Vec<Subject> = Vec::new();
    let small_file = write_keys(dir, "small", small, 100_000)?;
    let plain = |name: &str, filters: Vec<Value>, extra: Vec<Value>| -> Result<Subject> {
        let mut clusters = vec![loopback_cluster("upstream", up_port)];
        clusters.extend(extra);
        let started = Instant::now();
        let envoy = start(bootstrap(name, filters, clusters), 1, "0")?;
        Ok(Subject { name: name.to_string(), envoy, keys_file: small_file.clone(), start_secs: started.elapsed().as_secs_f64() })
    };
    eprintln!("bench: starting the five reference configurations");
    subjects.push(plain("1 no auth filter", vec![], vec![])?);
    subjects.push(plain("2 no-op wasm (floor)", vec![named_wasm_filter("noop", &noop_wasm(), &json!({}))], vec![])?);
    subjects.push(plain("3 api_key_auth", vec![api_key_auth(small)], vec![])?);
    subjects.push(plain("4 Lua lookup", vec![lua(small)], vec![])?);
    subjects.push(plain("5 ext_authz (HTTP)", vec![ext_authz()], vec![loopback_cluster("authz", authz_port)])?);

    let mut serves = Vec::new();
    let mut apply_ms = Vec::new();
    let mut imports = Vec::new();
    for (set, scoped) in sets.into_iter().zip([false, false, true]) {
        eprintln!("bench: loading {} keys into keyward serve", set.len());
        let t = Instant::now();
        let (serve, ids) = control_plane(set, scoped.then_some("1000000/s"))?;
        imports.push(t.elapsed().as_secs_f64());
        serves.push((serve, ids, set.clone()));
    }
    // Configurations 6 to 8 are keyward.wasm, 9 to 11 libkeyward.so, fed by the same serves.
    for (shell, first, what) in [(Shell::Wasm, 6, "keyward"), (Shell::Native, 9, "keyward native")] {
        for (i, ((serve, _, set), scoped)) in serves.iter().zip([false, false, true]).enumerate() {
            let n = set.len();
            let label = if scoped { format!("{} {what}, {n} keys, scopes + rate limit", first + i) } else { format!("{} {what}, {n} keys", first + i) };
            let node = format!("bench-{}-{n}", if shell == Shell::Native { "native" } else { "wasm" });
            let mut config = json!({"control_plane": {"cluster": "keyward", "feed_wait_secs": 15}});
            if scoped {
                config["rules"] = json!([{"methods": ["GET"], "scopes": ["read:all"]}]);
                config["rate_limit_burst"] = json!("limit");
            }
            let boot = bootstrap(&node, vec![keyward_in(shell, &config)], vec![loopback_cluster("upstream", up_port), loopback_cluster("keyward", serve.port)]);
            let started = Instant::now();
            let envoy = start(boot, 1, "0")?;
            let ready = started.elapsed().as_secs_f64();
            wait_applied(&envoy, serve, shell)?;
            let log = envoy.log();
            let applied = log.lines().find_map(|l| l.split("full snapshot version ").nth(1)?.split(" applied in ").nth(1)?.split(' ').next()?.parse::<f64>().ok()).unwrap_or(f64::NAN);
            apply_ms.push((shell, n + 1, applied, imports[i]));
            let keys_file = write_keys(dir, &format!("set{i}"), set, 100_000)?;
            subjects.push(Subject { name: label, envoy, keys_file, start_secs: ready });
        }
    }
    Ok(Started { subjects, serves, apply_ms })
}

/// The reference configurations, for `envoy --mode validate` in the tests.
#[cfg(test)]
fn reference_bootstraps(keys: &[String], noop: &Path) -> Vec<(&'static str, Value)> {
    vec![
        ("no filter", bootstrap("v", vec![], vec![loopback_cluster("upstream", 1)])),
        ("noop", bootstrap("v", vec![named_wasm_filter("noop", noop, &json!({}))], vec![loopback_cluster("upstream", 1)])),
        ("api_key_auth", bootstrap("v", vec![api_key_auth(keys)], vec![loopback_cluster("upstream", 1)])),
        ("lua", bootstrap("v", vec![lua(keys)], vec![loopback_cluster("upstream", 1)])),
        ("ext_authz", bootstrap("v", vec![ext_authz()], vec![loopback_cluster("upstream", 1), loopback_cluster("authz", 2)])),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyward_testkit::TempDir;
    use std::process::Command;

    #[test]
    fn reference_configurations_pass_envoy_validate() {
        let dir = TempDir::new("bench-validate").unwrap();
        let noop = noop_wasm();
        for (name, config) in reference_bootstraps(&keys(3, "v"), &noop) {
            if name == "noop" && !noop.is_file() {
                continue; // Built by `cargo xtask bench`; the other four need nothing.
            }
            let file = dir.path().join(format!("{name}.json"));
            std::fs::write(&file, config.to_string()).unwrap();
            let out = Command::new(keyward_testkit::envoy_bin()).args(["--mode", "validate", "-c"]).arg(&file).output().unwrap();
            assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    #[test]
    fn bench_keys_are_valid_keyward_keys_and_stable() {
        let a = keys(3, "x");
        assert_eq!(a, keys(3, "x"));
        for k in &a {
            assert_eq!(keyformat::check(&["kw".into()], k), keyformat::FormatCheck::Valid, "{k}");
        }
    }
}
