//! A real Envoy process running keyward (`keyward.wasm`, or `libkeyward.so` under
//! `KEYWARD_SHELL=native`), on free loopback ports, killed on drop.

use crate::{envoy_bin, native_path, poll_until, request, wasm_path, Shell, TempDir};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// How to start Envoy.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// The filter's plugin configuration (serialised to the `StringValue`).
    pub plugin_config: Value,
    /// Routes of the single virtual host; default: everything to the `echo` cluster.
    pub routes: Option<Value>,
    pub upstream_port: u16,
    pub concurrency: u32,
    /// Extra Envoy arguments, e.g. `--component-log-level wasm:trace`.
    pub extra_args: Vec<String>,
    /// Serve TLS on the listener with this (certificate, private key) PEM pair.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Add a `keyward` cluster reaching `keyward serve` on this loopback port.
    pub control_plane_port: Option<u16>,
    /// `keyward serve` replicas the `keyward` cluster balances over (instead of one port), with
    /// health checks and outlier detection as `envoy/local-postgres.yaml` has them.
    pub control_plane_replicas: Vec<u16>,
    /// The bootstrap's `node.id`.
    pub node_id: String,
    /// Run Envoy under `taskset -c <cpus>`.
    pub pin_cpus: Option<String>,
    /// A complete bootstrap to run instead of the generated one (listener must be named "main").
    pub bootstrap: Option<Value>,
    /// A command Envoy runs under, e.g. `valgrind --tool=callgrind …` (after `taskset`).
    pub wrapper: Vec<String>,
}

impl EnvoyOptions {
    pub fn new(plugin_config: Value, upstream_port: u16) -> Self {
        EnvoyOptions {
            plugin_config,
            routes: None,
            upstream_port,
            concurrency: 2,
            extra_args: Vec::new(),
            tls: None,
            control_plane_port: None,
            control_plane_replicas: Vec::new(),
            node_id: "keyward-test".into(),
            pin_cpus: None,
            bootstrap: None,
            wrapper: Vec::new(),
        }
    }
}

/// keyward's filter entry in the shell under test ([`Shell::current`]).
pub fn keyward_filter(plugin_config: &Value) -> Value {
    match Shell::current() {
        Shell::Wasm => wasm_filter(&wasm_path(), plugin_config),
        Shell::Native => native_filter(plugin_config),
    }
}

/// The `envoy.filters.http.dynamic_modules` entry for `libkeyward.so`: the same plugin
/// configuration, as a `StringValue`. Envoy finds the module by name in
/// `$ENVOY_DYNAMIC_MODULES_SEARCH_PATH`, which [`Envoy::start`] sets under the native shell.
pub fn native_filter(plugin_config: &Value) -> Value {
    json!({
        "name": "envoy.filters.http.dynamic_modules",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
            "dynamic_module_config": {"name": "keyward"},
            "filter_name": "keyward",
            "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": plugin_config.to_string()}
        }
    })
}

/// The `envoy.filters.http.wasm` entry for `keyward.wasm`.
pub fn wasm_filter(wasm: &Path, plugin_config: &Value) -> Value {
    named_wasm_filter("keyward", wasm, plugin_config)
}

/// The `envoy.filters.http.wasm` entry for any proxy-wasm module, with `name` as its plugin
/// name, root id and VM id (`cargo xtask bench` runs the no-op filter as "noop").
pub fn named_wasm_filter(name: &str, wasm: &Path, plugin_config: &Value) -> Value {
    json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": name,
                "vm_config": {
                    "vm_id": name,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm.display().to_string()}}
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": plugin_config.to_string()
                },
                "failure_policy": "FAIL_RELOAD"
            }
        }
    })
}

/// A bootstrap with one listener ("main", port 0) through `http_filters` and then the router,
/// routing with `routes`, and an admin on port 0.
pub fn listener_bootstrap(node: &str, routes: Value, mut http_filters: Vec<Value>, clusters: Vec<Value>) -> Value {
    http_filters.push(json!({"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}));
    json!({
        "node": {"id": node, "cluster": "keyward-test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "route_config": {"name": "local", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
                        "http_filters": http_filters
                    }
                }]}]
            }],
            "clusters": clusters
        }
    })
}

/// A STATIC cluster to one loopback port.
pub fn loopback_cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}
    })
}

/// A cluster over several loopback replicas that skips a dead one: active health checks on
/// `/healthz` every second and ejection at the first refused connection.
pub fn replicas_cluster(name: &str, ports: &[u16]) -> Value {
    let endpoints: Vec<Value> =
        ports.iter().map(|p| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}})).collect();
    json!({
        "name": name, "type": "STATIC", "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN",
        "health_checks": [{"timeout": "1s", "interval": "1s", "no_traffic_interval": "1s", "unhealthy_threshold": 2, "healthy_threshold": 1,
                           "http_health_check": {"path": "/healthz"}}],
        "outlier_detection": {"split_external_local_origin_errors": true, "consecutive_local_origin_failure": 1,
                              "enforcing_consecutive_local_origin_failure": 100, "interval": "1s", "base_ejection_time": "2s", "max_ejection_percent": 50},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]}
    })
}

/// A complete bootstrap as [`envoy_bootstrap`] makes it, with keyward in the shell under test.
pub fn keyward_bootstrap(opts: &EnvoyOptions) -> Value {
    bootstrap_with(keyward_filter(&opts.plugin_config), opts)
}

/// A complete bootstrap: one listener (port 0) through the wasm filter `wasm` to the `echo`
/// cluster, with the path normalisation of the configs in `envoy/`.
pub fn envoy_bootstrap(wasm: &Path, opts: &EnvoyOptions) -> Value {
    bootstrap_with(wasm_filter(wasm, &opts.plugin_config), opts)
}

fn bootstrap_with(filter: Value, opts: &EnvoyOptions) -> Value {
    let routes = opts.routes.clone().unwrap_or_else(|| json!([{"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "echo"}}]));
    let mut clusters = vec![loopback_cluster("echo", opts.upstream_port)];
    if let Some(port) = opts.control_plane_port {
        clusters.push(loopback_cluster("keyward", port));
    }
    if !opts.control_plane_replicas.is_empty() {
        clusters.push(replicas_cluster("keyward", &opts.control_plane_replicas));
    }
    let mut config = listener_bootstrap(&opts.node_id, routes, vec![filter], clusters);
    let hcm = &mut config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    hcm["normalize_path"] = json!(true);
    hcm["merge_slashes"] = json!(true);
    hcm["path_with_escaped_slashes_action"] = json!("UNESCAPE_AND_REDIRECT");
    if let Some((cert, key)) = &opts.tls {
        config["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {"tls_certificates": [{
                    "certificate_chain": {"filename": cert.display().to_string()},
                    "private_key": {"filename": key.display().to_string()}
                }]}
            }
        });
    }
    config
}

/// A running Envoy. Killed on drop.
pub struct Envoy {
    child: Child,
    dir: TempDir,
    pub admin_port: u16,
    pub port: u16,
}

/// Envoy exited instead of becoming ready.
#[derive(Debug)]
pub struct Failed {
    pub status: Option<ExitStatus>,
    pub log: String,
}

fn spawn(dir: &TempDir, config: &Value, opts: &EnvoyOptions) -> std::io::Result<Child> {
    let cfg = dir.path().join("envoy.json");
    std::fs::write(&cfg, serde_json::to_vec_pretty(config)?)?;
    let log = std::fs::File::create(dir.path().join("envoy.log"))?;
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if let Some(cpus) = &opts.pin_cpus {
        argv.extend(["taskset".into(), "-c".into(), cpus.into()]);
    }
    argv.extend(opts.wrapper.iter().map(Into::into));
    argv.push(envoy_bin().into());
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    // The native shell's module: under KEYWARD_SHELL=native (its filter may come later, by LDS),
    // and wherever a configuration names it (the bench runs both shells).
    if Shell::current() == Shell::Native || config.to_string().contains("envoy.filters.http.dynamic_modules") {
        let module = native_path();
        cmd.env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", module.parent().unwrap_or(Path::new(".")));
    }
    cmd.arg("-c")
        .arg(&cfg)
        .args(["--concurrency", &opts.concurrency.to_string(), "--disable-hot-restart", "--log-level", "info"])
        .arg("--admin-address-path")
        .arg(dir.path().join("admin.txt"))
        .args(&opts.extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
}

impl Envoy {
    /// Starts Envoy and waits until its listener serves. Returns `Err` with the log if it exits.
    pub fn try_start(opts: &EnvoyOptions) -> Result<Envoy, Failed> {
        let dir = TempDir::new("envoy").map_err(|e| Failed { status: None, log: e.to_string() })?;
        let config = match &opts.bootstrap {
            Some(b) => b.clone(),
            None => keyward_bootstrap(opts),
        };
        let child = spawn(&dir, &config, opts).map_err(|e| Failed { status: None, log: e.to_string() })?;
        let mut envoy = Envoy { child, dir, admin_port: 0, port: 0 };
        let ready = poll_until(Duration::from_secs(60), "Envoy to become ready or exit", || {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return Some(Err(status));
            }
            let admin = std::fs::read_to_string(envoy.dir.path().join("admin.txt")).ok()?;
            let admin_port: u16 = admin.trim().rsplit(':').next()?.parse().ok()?;
            let ready = request(admin_port, "GET", "/ready", &[]).ok()?;
            if ready.status != 200 {
                return None;
            }
            let listeners = request(admin_port, "GET", "/listeners?format=json", &[]).ok()?.json();
            let port = listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"].as_u64()?;
            Some(Ok((admin_port, u16::try_from(port).ok()?)))
        });
        match ready {
            Ok((admin_port, port)) => {
                envoy.admin_port = admin_port;
                envoy.port = port;
                Ok(envoy)
            }
            Err(status) => Err(Failed { status: Some(status), log: envoy.log() }),
        }
    }

    /// Starts Envoy, panicking with its log if it does not come up.
    pub fn start(opts: &EnvoyOptions) -> Envoy {
        Envoy::try_start(opts).unwrap_or_else(|f| panic!("Envoy failed to start ({:?}):\n{}", f.status, f.log))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Envoy's resident memory in bytes, from `/proc`.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// `allocated` from the admin `/memory` endpoint (tcmalloc's view of Envoy's heap).
    pub fn heap_allocated(&self) -> u64 {
        request(self.admin_port, "GET", "/memory", &[])
            .ok()
            .and_then(|r| r.json()["allocated"].as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(0)
    }

    /// Connections the listener accepted, per worker thread (from Envoy's stats).
    pub fn worker_connections(&self) -> Vec<u64> {
        let Ok(stats) = request(self.admin_port, "GET", "/stats?filter=worker_.*downstream_cx_total", &[]) else {
            return Vec::new();
        };
        let mut per: Vec<(String, u64)> = String::from_utf8_lossy(&stats.body)
            .lines()
            .filter(|l| l.starts_with("listener.127.0.0.1_"))
            .filter_map(|l| {
                let (name, v) = l.split_once(": ")?;
                Some((name.split(".worker_").nth(1)?.to_string(), v.trim().parse().ok()?))
            })
            .collect();
        per.sort();
        per.into_iter().map(|(_, v)| v).collect()
    }

    /// The Envoy process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User plus system CPU time of the Envoy process, in seconds (from `/proc`).
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("envoy.log")
    }

    /// The value of one stat from `/stats`, e.g. `wasmcustom.keyward.allowed`. The filter's own
    /// stats are named as the wasm shell has them; under the native shell `wasmcustom.` reads
    /// `dynamicmodulescustom.` (the names after the prefix are the same).
    pub fn stat(&self, name: &str) -> Option<u64> {
        let native;
        let name = match (Shell::current(), name.strip_prefix(Shell::Wasm.stats_prefix())) {
            (Shell::Native, Some(rest)) => {
                native = format!("{}{rest}", Shell::Native.stats_prefix());
                native.as_str()
            }
            _ => name,
        };
        let stats = request(self.admin_port, "GET", &format!("/stats?filter=^{name}$"), &[]).ok()?;
        let text = String::from_utf8_lossy(&stats.body).to_string();
        text.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))?.trim().parse().ok())
    }

    /// `GET path` on the listener with the given headers.
    pub fn get(&self, path: &str, headers: &[(&str, &[u8])]) -> crate::Response {
        request(self.port, "GET", path, headers).unwrap_or_else(|e| panic!("GET {path}: {e}\nEnvoy log:\n{}", self.log()))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
