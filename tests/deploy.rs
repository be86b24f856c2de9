//! The deployment files, kept working by tests: every Envoy config validates and carries a filter
//! config the filter's own compiler accepts; docker-compose.yml passes `docker-compose config`,
//! with and without its `postgres` profile; the Kubernetes manifests and the Helm chart (rendered
//! in both modes by a real `helm`) pass kubernetes-validate, and the Istio, Gateway API,
//! CloudNativePG and prometheus-operator resources their CRD schemas; the Grafana dashboard names
//! only metrics keyward serves; and the compose topology runs for real, with processes in place
//! of containers. Every check is also shown to fail on a broken input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyward_core::Config;
use keyward_testkit::{envoy_bin, envoy_yamls, validate_envoy_yaml, workspace_root, ContainerFiles, Echo, Envoy, EnvoyOptions, Keyward};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const NATIVE_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter";

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn files_in(dir: &str, ext: &str) -> Vec<PathBuf> {
    let dir = workspace_root().join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.{ext} in {}", dir.display());
    files
}

/// Every object under `v` whose `@type` is the wasm HTTP filter.
fn wasm_filters(v: &Value, out: &mut Vec<Value>) {
    typed(v, WASM_TYPE, out);
}

/// Every object under `v` whose `@type` is `kind`.
fn typed(v: &Value, kind: &str, out: &mut Vec<Value>) {
    match v {
        Value::Object(map) => {
            if map.get("@type").and_then(Value::as_str) == Some(kind) {
                out.push(v.clone());
            }
            map.values().for_each(|x| typed(x, kind, out));
        }
        Value::Array(items) => items.iter().for_each(|x| typed(x, kind, out)),
        _ => {}
    }
}

fn compile(what: &str, config: &Value) -> Config {
    let bytes = match config {
        Value::String(s) => s.as_bytes().to_vec(),
        other => serde_json::to_vec(other).unwrap(),
    };
    Config::from_json(&bytes).unwrap_or_else(|e| panic!("{what}: the filter's config compiler refuses it: {e}"))
}

#[test]
fn every_envoy_yaml_in_the_repo_passes_envoy_validate() {
    let envoy = envoy_bin();
    let files = ContainerFiles::new().unwrap();
    let yamls = envoy_yamls().unwrap();
    assert!(yamls.len() >= 8, "expected local, native, static, compose, compose-native, compose-postgres, edge and routes configs: {yamls:?}");
    for file in yamls {
        validate_envoy_yaml(&envoy, &file, &files).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn every_envoy_yaml_carries_a_filter_config_the_filter_compiles() {
    for file in envoy_yamls().unwrap() {
        let name = file.display().to_string();
        let doc = &yaml_docs(&file)[0];
        let (mut filters, mut natives) = (Vec::new(), Vec::new());
        wasm_filters(doc, &mut filters);
        typed(doc, NATIVE_TYPE, &mut natives);
        assert_eq!(filters.len() + natives.len(), 1, "{name}: one keyward filter expected");
        let config = match (filters.first(), natives.first()) {
            (Some(wasm), _) => {
                let wasm = &wasm["config"];
                assert_eq!(wasm["failure_policy"], "FAIL_RELOAD", "{name}: failure_policy");
                assert_eq!(wasm["vm_config"]["runtime"], "envoy.wasm.runtime.v8", "{name}: runtime");
                compile(&name, &wasm["configuration"]["value"])
            }
            (None, Some(native)) => {
                assert_eq!(native["dynamic_module_config"]["name"], "keyward", "{name}: the module is libkeyward.so");
                assert_eq!(native["filter_name"], "keyward", "{name}: filter_name");
                compile(&name, &native["filter_config"]["value"])
            }
            (None, None) => unreachable!(),
        };
        let clusters = doc["static_resources"]["clusters"].as_array().unwrap();
        if let Some(cp) = &config.control_plane {
            let cluster = clusters
                .iter()
                .find(|c| c["name"] == cp.cluster.as_str())
                .unwrap_or_else(|| panic!("{name}: control_plane.cluster {:?} is not a cluster of this file", cp.cluster));
            let kind = cluster["type"].as_str().unwrap_or("EDS");
            assert!(["STATIC", "STRICT_DNS", "LOGICAL_DNS"].contains(&kind), "{name}: the feed cluster is {kind}; callouts need STATIC or DNS");
        } else {
            assert!(config.snapshot.is_some(), "{name}: neither a control plane nor an inline snapshot");
        }
        // Path normalisation is what scope rules rely on (README, "Paths").
        let hcm = doc["static_resources"]["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|l| l["filter_chains"].as_array().cloned().unwrap_or_default())
            .flat_map(|c| c["filters"].as_array().cloned().unwrap_or_default())
            .map(|f| f["typed_config"].clone())
            .find(|t| t["http_filters"].as_array().is_some_and(|h| h.iter().any(|f| [WASM_TYPE, NATIVE_TYPE].contains(&f["typed_config"]["@type"].as_str().unwrap_or("")))))
            .unwrap();
        assert_eq!(hcm["normalize_path"], true, "{name}: normalize_path");
        assert_eq!(hcm["merge_slashes"], true, "{name}: merge_slashes");
    }
}

#[test]
fn the_edge_config_terminates_tls_and_requires_it() {
    let doc = &yaml_docs(&workspace_root().join("envoy/edge.yaml"))[0];
    let mut filters = Vec::new();
    wasm_filters(doc, &mut filters);
    let config = compile("envoy/edge.yaml", &filters[0]["config"]["configuration"]["value"]);
    assert!(config.require_tls, "envoy/edge.yaml: require_tls");
    let https = doc["static_resources"]["listeners"].as_array().unwrap().iter().find(|l| l["name"] == "https").unwrap();
    assert_eq!(https["filter_chains"][0]["transport_socket"]["name"], "envoy.transport_sockets.tls");
}

#[test]
fn the_routes_config_sets_per_route_scopes_and_a_public_route() {
    let doc = &yaml_docs(&workspace_root().join("envoy/routes.yaml"))[0];
    let routes = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]
        ["routes"]
        .as_array()
        .unwrap()
        .clone();
    assert!(routes.iter().all(|r| r["name"].is_string()), "every route is named (the filter caches metadata by name)");
    let disabled = routes.iter().filter(|r| r["typed_per_filter_config"]["envoy.filters.http.wasm"]["disabled"] == true).count();
    let scoped = routes.iter().filter(|r| r["metadata"]["filter_metadata"]["keyward"]["scopes"].is_string()).count();
    assert!(disabled >= 1 && scoped >= 2, "routes.yaml shows {disabled} public and {scoped} scoped routes");
}

#[test]
fn wasmplugin_plugin_configs_compile_and_name_the_serviceentry_cluster() {
    let mut clusters = Vec::new();
    let mut plugins = Vec::new();
    for file in files_in("deploy/istio", "yaml") {
        for doc in yaml_docs(&file) {
            match doc["kind"].as_str() {
                Some("ServiceEntry") => {
                    for port in doc["spec"]["ports"].as_array().unwrap() {
                        for host in doc["spec"]["hosts"].as_array().unwrap() {
                            clusters.push(format!("outbound|{}||{}", port["number"], host.as_str().unwrap()));
                        }
                    }
                }
                Some("WasmPlugin") => plugins.push((file.display().to_string(), doc)),
                _ => {}
            }
        }
    }
    assert!(plugins.len() >= 2, "a sidecar and a gateway WasmPlugin expected");
    for (file, plugin) in plugins {
        let spec = &plugin["spec"];
        assert_eq!(spec["phase"], "AUTHN", "{file}: phase");
        assert_eq!(spec["failStrategy"], "FAIL_RELOAD", "{file}: failStrategy");
        assert!(spec["url"].as_str().unwrap().starts_with("oci://"), "{file}: url");
        let config = compile(&file, &spec["pluginConfig"]);
        let cp = config.control_plane.unwrap_or_else(|| panic!("{file}: no control_plane"));
        assert!(clusters.contains(&cp.cluster), "{file}: cluster {:?} is none of the ServiceEntry clusters {clusters:?}", cp.cluster);
        // Every Kubernetes deployment of keyward requires the feed token (issue 18).
        assert!(cp.token.is_some(), "{file}: control_plane.token is not set, but keyward serve runs with KEYWARD_FEED_TOKEN");
    }
    // A drifted config is caught: an unknown field is an error, not ignored.
    let mut drifted = yaml_docs(&workspace_root().join("deploy/istio/wasmplugin.yaml"))[0]["spec"]["pluginConfig"].clone();
    drifted["control_plane"]["feed_wait"] = json!(15);
    let err = Config::from_json(&serde_json::to_vec(&drifted).unwrap()).unwrap_err().to_string();
    assert!(err.contains("feed_wait"), "{err}");
}

fn tool_missing(what: &str) -> String {
    format!("{what} is not installed. `cargo xtask test` installs it (README, \"Quick start\").")
}

#[test]
fn docker_compose_yml_passes_docker_compose_config() {
    let out = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config", "-q"])
        .current_dir(workspace_root())
        .env("KEYWARD_ADMIN_TOKEN", "")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", tool_missing("docker-compose (Debian package docker-compose)")));
    assert!(out.status.success(), "docker-compose config -q:\n{}", String::from_utf8_lossy(&out.stderr));

    // The compose file and the Envoy config it mounts agree on files, ports and names.
    let compose = &yaml_docs(&workspace_root().join("docker-compose.yml"))[0];
    let envoy = &compose["services"]["envoy"];
    assert_eq!(envoy["image"], format!("envoyproxy/envoy:v{}", keyward_testkit::ENVOY_VERSION));
    let mounts: Vec<&str> = envoy["volumes"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(mounts.contains(&"./envoy/compose.yaml:/etc/envoy/envoy.yaml:ro"), "{mounts:?}");
    assert!(mounts.contains(&"wasm:/etc/envoy/wasm:ro"), "{mounts:?}");
    let text = std::fs::read_to_string(workspace_root().join("envoy/compose.yaml")).unwrap();
    assert!(text.contains("filename: /etc/envoy/wasm/keyward.wasm"));
    for (service, port) in [("keyward", 7070), ("echo", 8080)] {
        assert!(compose["services"][service].is_object(), "no service {service}");
        assert!(text.contains(&format!("address: {service}, port_value: {port}")), "envoy/compose.yaml does not reach {service}:{port}");
    }
    assert_eq!(compose["services"]["echo"]["environment"]["HTTP_PORT"], "8080");
    assert!(envoy["ports"].as_array().unwrap().iter().any(|p| p == "10000:10000"));
    // The keyward image keeps its store where the compose volume and the Kubernetes PVC mount.
    let dockerfile = std::fs::read_to_string(workspace_root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("KEYWARD_DB=/data/keyward.db") && dockerfile.contains("\nUSER 10001"), "Dockerfile: store path or non-root user");
    assert!(compose["services"]["keyward"]["volumes"][0].as_str().unwrap().ends_with(":/data"));
    let wasm_image = std::fs::read_to_string(workspace_root().join("Dockerfile.wasm")).unwrap();
    assert!(wasm_image.contains("FROM scratch") && wasm_image.contains("/plugin.wasm"), "Dockerfile.wasm: Istio's OCI layout");
    // The image's module is the one `cargo xtask wasm` makes and the size budget holds.
    let xtask = std::fs::read_to_string(workspace_root().join("xtask/src/main.rs")).unwrap();
    let version = xtask.split("const BINARYEN_VERSION: &str = \"").nth(1).and_then(|v| v.split('"').next()).unwrap();
    assert!(wasm_image.contains(&format!("binaryen@{version}")), "Dockerfile.wasm: binaryen {version}, as xtask");
    let args = xtask.split("const WASM_OPT_ARGS").nth(1).and_then(|v| v.split("];").next()).unwrap();
    for flag in args.split('"').skip(1).step_by(2) {
        assert!(wasm_image.contains(flag), "Dockerfile.wasm: wasm-opt {flag}, as xtask");
    }
}

fn python_tools() -> PathBuf {
    workspace_root().join(".tools/python")
}

fn kubernetes_validate(files: &[PathBuf]) -> std::process::Output {
    assert!(
        python_tools().join("kubernetes_validate").is_dir(),
        "{}",
        tool_missing(&format!("kubernetes-validate (PyPI) in {}", python_tools().display()))
    );
    Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(files)
        .env("PYTHONPATH", python_tools())
        .output()
        .unwrap()
}

#[test]
fn kubernetes_manifests_pass_kubernetes_validate_strictly() {
    let files = files_in("deploy/kubernetes", "yaml");
    let out = kubernetes_validate(&files);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kubernetes-validate:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("WARN"), "a resource went unchecked (no schema):\n{stdout}");
    for (file, kinds) in [
        ("keyward.yaml", &["deployment/keyward", "service/keyward", "service/keyward-feed", "persistentvolumeclaim/keyward-data"][..]),
        ("keyward-ha.yaml", &["deployment/keyward", "service/keyward", "service/keyward-feed", "poddisruptionbudget/keyward", "networkpolicy/keyward"][..]),
        ("envoy-native.yaml", &["configmap/envoy-native", "deployment/envoy-native", "service/envoy-native"][..]),
    ] {
        for kind in kinds {
            assert!(stdout.contains(&format!("{file} passed for resource {kind} ")), "{file}: {kind} was not validated:\n{stdout}");
        }
    }
    // The validator is strict: a misspelled field fails.
    let dir = keyward_testkit::TempDir::new("k8s").unwrap();
    for file in &files {
        let bad = dir.path().join(file.file_name().unwrap());
        let text = std::fs::read_to_string(file).unwrap();
        assert!(text.contains("strategy:"), "{}", file.display());
        std::fs::write(&bad, text.replace("strategy:", "stratgy:")).unwrap();
        assert!(!kubernetes_validate(&[bad]).status.success(), "{}: a misspelled field passed kubernetes-validate", file.display());
    }
}

fn crd_validate(files: &[PathBuf]) -> std::process::Output {
    let dir = workspace_root().join("deploy/validate");
    for package in ["istio", "gateway-api", "cloudnative-pg", "prometheus-operator"] {
        assert!(
            dir.join("node_modules/@kubernetes-models").join(package).is_dir(),
            "{}",
            tool_missing(&format!("deploy/validate's npm package @kubernetes-models/{package} (`npm ci --prefix deploy/validate`)"))
        );
    }
    Command::new("node").arg(dir.join("validate.mjs")).args(files).output().unwrap_or_else(|e| panic!("node: {e}"))
}

#[test]
fn istio_and_gateway_resources_pass_their_crd_schemas() {
    let files = files_in("deploy/istio", "yaml");
    let out = crd_validate(&files);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "CRD schema check:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for kind in ["WasmPlugin/keyward:", "ServiceEntry/keyward-feed:", "EnvoyFilter/keyward-cluster:", "Gateway/api-gateway:", "HTTPRoute/api:"] {
        assert!(stdout.contains(&format!("{kind} valid")), "{kind} not checked:\n{stdout}");
    }
    // The schemas bite: a wrong enum value fails.
    let dir = keyward_testkit::TempDir::new("crd").unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(workspace_root().join("deploy/istio/wasmplugin.yaml")).unwrap().replace("phase: AUTHN", "phase: AUTHENTICATION");
    std::fs::write(&bad, text).unwrap();
    let out = crd_validate(&[bad]);
    assert!(!out.status.success(), "a bad phase passed: {}", String::from_utf8_lossy(&out.stdout));
}

/// The compose topology without Docker: envoy/compose.yaml as is (ports, cluster names, filter
/// config), the `keyward` and `echo` host names mapped to 127.0.0.1 and `/etc/envoy/` to a
/// directory holding the built module; `keyward serve` on 7070 and an echo on 8080 as processes.
/// Then the README's three steps: up, create a key, curl.
#[test]
fn compose_topology_serves_with_processes_in_place_of_containers() {
    let files = ContainerFiles::new().unwrap();
    let text = std::fs::read_to_string(workspace_root().join("envoy/compose.yaml")).unwrap();
    let mapped = files.map(&text);
    let mut mapped_hosts = mapped.clone();
    for host in ["echo", "keyward"] {
        let from = format!("address: {host}, ");
        assert_eq!(mapped_hosts.matches(&from).count(), 1, "envoy/compose.yaml names {host} once");
        mapped_hosts = mapped_hosts.replace(&from, "address: 127.0.0.1, ");
    }
    let bootstrap: Value = serde_norway::from_str(&mapped_hosts).unwrap();

    let _echo = Echo::start(8080).expect("port 8080 (the compose echo) is free");
    let mut keyward = Keyward::stopped(7070);
    keyward.restart();
    let mut opts = EnvoyOptions::new(json!({}), 8080);
    opts.concurrency = 2;
    opts.bootstrap = Some(bootstrap);
    let envoy = Envoy::start(&opts);
    assert_eq!(envoy.port, 10000);

    // `docker compose exec keyward keyward agent create demo --scopes read:all`
    let out: Value = serde_json::from_str(&keyward.cli(&["agent", "create", "demo", "--scopes", "read:all", "--json"])).unwrap();
    let key = out["secret"].as_str().unwrap().to_string();

    // `curl -i -H "x-api-key: <that key>" http://127.0.0.1:10000/v1/hello`
    let start = Instant::now();
    let response = loop {
        let r = envoy.get("/v1/hello", &[("x-api-key", key.as_bytes())]);
        if r.status == 200 || start.elapsed() > Duration::from_secs(10) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(response.status, 200, "{:?}\n{}", response.code(), envoy.log());
    assert_eq!(response.upstream_header("x-keyward-agent").as_deref(), Some("demo"));

    assert_eq!(envoy.get("/v1/hello", &[]).status, 401);
    let r = envoy.get("/admin/x", &[("x-api-key", key.as_bytes())]);
    assert_eq!((r.status, r.code().as_deref()), (403, Some("INSUFFICIENT_SCOPE")));
    assert_eq!(envoy.get("/healthz", &[]).status, 200, "the compose /healthz route is public");

    // `keyward status` names this Envoy by the compose config's node id.
    let status: Value = serde_json::from_str(&keyward.cli(&["status", "--json"])).unwrap();
    assert!(status.to_string().contains("keyward-compose"), "{status}");
}

// ---- Issue 18: the HA deployment, the Helm chart, the CRDs, the compose profile, the dashboard.

/// API groups whose kinds are CRDs: deploy/validate checks them (validate.mjs maps each group to
/// its schema package); every other kind is core Kubernetes, for kubernetes-validate.
const CRD_GROUPS: &[&str] = &[
    "extensions.istio.io",
    "networking.istio.io",
    "security.istio.io",
    "telemetry.istio.io",
    "gateway.networking.k8s.io",
    "postgresql.cnpg.io",
    "monitoring.coreos.com",
];

fn is_crd(doc: &Value) -> bool {
    let api = doc["apiVersion"].as_str().unwrap_or_default();
    api.split_once('/').is_some_and(|(group, _)| CRD_GROUPS.contains(&group))
}

fn docs_in_yaml(what: &str, text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn write_docs(path: &Path, docs: &[&Value]) {
    let text: Vec<String> = docs.iter().map(|d| serde_norway::to_string(d).unwrap()).collect();
    std::fs::write(path, text.join("---\n")).unwrap();
}

/// Checks a set of manifests with both validators: core kinds with kubernetes-validate
/// (strict, and every one must have found its schema), CRD kinds with deploy/validate. Returns
/// the two validators' verdict (`Err` with their output when either refused) and, on success,
/// asserts each resource was named as checked.
fn validate_manifests(what: &str, docs: &[Value]) -> Result<(), String> {
    let dir = keyward_testkit::TempDir::new("manifests").unwrap();
    let (crds, core): (Vec<&Value>, Vec<&Value>) = docs.iter().partition(|d| is_crd(d));
    let mut report = String::new();
    if !core.is_empty() {
        let file = dir.path().join("core.yaml");
        write_docs(&file, &core);
        let out = kubernetes_validate(&[file]);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() || stdout.contains("WARN") || stdout.contains("ERROR") {
            return Err(format!("{what}: kubernetes-validate:\n{stdout}{}", String::from_utf8_lossy(&out.stderr)));
        }
        for doc in &core {
            let kind = format!("{}/{}", doc["kind"].as_str().unwrap().to_lowercase(), doc["metadata"]["name"].as_str().unwrap());
            assert!(stdout.contains(&format!("passed for resource {kind} ")), "{what}: {kind} was not validated:\n{stdout}");
        }
        report.push_str(&stdout);
    }
    if !crds.is_empty() {
        let file = dir.path().join("crds.yaml");
        write_docs(&file, &crds);
        let out = crd_validate(&[file]);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            return Err(format!("{what}: CRD schema check:\n{stdout}{}", String::from_utf8_lossy(&out.stderr)));
        }
        for doc in &crds {
            let kind = format!("{}/{}: valid", doc["kind"].as_str().unwrap(), doc["metadata"]["name"].as_str().unwrap());
            assert!(stdout.contains(&kind), "{what}: {kind} not reported:\n{stdout}");
        }
    }
    Ok(())
}

fn doc_of<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} among {:?}", docs.iter().map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"])).collect::<Vec<_>>()))
}

fn container(deployment: &Value) -> &Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    containers.iter().find(|c| c["name"] == "keyward").expect("a container named keyward")
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"].as_array().unwrap().iter().find(|e| e["name"] == name)
}

/// The Secret (name, key) an environment variable is read from.
fn env_secret(container: &Value, name: &str) -> Option<(String, String)> {
    let r = &env(container, name)?["valueFrom"]["secretKeyRef"];
    Some((r["name"].as_str()?.to_string(), r["key"].as_str()?.to_string()))
}

fn port_of(listen: &str) -> u64 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

/// What every deployment of `keyward serve` must have, in either mode: the admin API and the feed
/// on their own listeners, container ports and Services; both tokens from Secrets; probes on
/// /healthz and /readyz.
fn check_serve_deployment(what: &str, docs: &[Value], fullname: &str) {
    let deployment = doc_of(docs, "Deployment", fullname);
    let c = container(deployment);
    for var in ["KEYWARD_ADMIN_TOKEN", "KEYWARD_FEED_TOKEN"] {
        assert!(env_secret(c, var).is_some(), "{what}: {var} does not come from a Secret");
    }
    let value = |var: &str| env(c, var).and_then(|e| e["value"].as_str()).unwrap_or_else(|| panic!("{what}: {var} is not set"));
    let container_port = |name: &str| {
        c["ports"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("{what}: no container port {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(port_of(value("KEYWARD_LISTEN")), container_port("http"), "{what}: the admin listener is the `http` port");
    assert_eq!(port_of(value("KEYWARD_FEED_LISTEN")), container_port("feed"), "{what}: the feed listener is the `feed` port");
    for (service, target, port) in [(fullname.to_string(), "http", 7070), (format!("{fullname}-feed"), "feed", 7071)] {
        let svc = doc_of(docs, "Service", &service);
        let ports = svc["spec"]["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 1, "{what}: Service {service} exposes one port");
        assert_eq!((ports[0]["targetPort"].as_str(), ports[0]["port"].as_u64()), (Some(target), Some(port)), "{what}: Service {service}");
        let selector = svc["spec"]["selector"].as_object().unwrap();
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        assert!(selector.iter().all(|(k, v)| &labels[k] == v), "{what}: Service {service} does not select the pods");
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{what}: liveness probe");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{what}: readiness probe");
}

/// SQLite: one replica, Recreate, the store on a PVC. Postgres: several replicas rolling one at a
/// time, the store URL from a Secret, a PDB that leaves one serving, replicas kept apart.
fn check_store_mode(what: &str, docs: &[Value], fullname: &str, postgres: bool) {
    let deployment = doc_of(docs, "Deployment", fullname);
    let spec = &deployment["spec"];
    let c = container(deployment);
    let pod = &spec["template"]["spec"];
    if postgres {
        let replicas = spec["replicas"].as_u64().unwrap();
        assert!(replicas >= 2, "{what}: {replicas} replica(s)");
        assert_eq!(spec["strategy"]["type"], "RollingUpdate", "{what}: strategy");
        assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0, "{what}: maxUnavailable");
        assert!(env_secret(c, "KEYWARD_STORE").is_some(), "{what}: KEYWARD_STORE does not come from a Secret");
        assert!(env(c, "KEYWARD_DB").is_none(), "{what}: KEYWARD_DB set in Postgres mode");
        assert!(env(c, "KEYWARD_REPLICA").is_some_and(|e| e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"), "{what}: KEYWARD_REPLICA is not the pod's name");
        let anti = &pod["affinity"]["podAntiAffinity"];
        assert!(anti.is_object(), "{what}: no pod anti-affinity");
        let pdb = docs.iter().find(|d| d["kind"] == "PodDisruptionBudget").unwrap_or_else(|| panic!("{what}: no PodDisruptionBudget"));
        let min = pdb["spec"]["minAvailable"].as_u64().unwrap();
        assert!((1..replicas).contains(&min), "{what}: PDB minAvailable {min} of {replicas} replicas blocks every drain or protects nothing");
        assert_eq!(pdb["spec"]["selector"]["matchLabels"], spec["selector"]["matchLabels"], "{what}: the PDB selects other pods");
        assert!(!docs.iter().any(|d| d["kind"] == "PersistentVolumeClaim"), "{what}: a PVC in Postgres mode");
    } else {
        assert_eq!(spec["replicas"], 1, "{what}: SQLite has one writer");
        assert_eq!(spec["strategy"]["type"], "Recreate", "{what}: a rolling update would run two writers");
        assert!(env(c, "KEYWARD_STORE").is_none(), "{what}: KEYWARD_STORE set in SQLite mode");
        let db = env(c, "KEYWARD_DB").and_then(|e| e["value"].as_str()).unwrap_or_else(|| panic!("{what}: KEYWARD_DB"));
        let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "data").unwrap_or_else(|| panic!("{what}: no data mount"));
        assert!(db.starts_with(&format!("{}/", mount["mountPath"].as_str().unwrap())), "{what}: {db} is not on the data volume");
        let claim = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "data").unwrap()["persistentVolumeClaim"]["claimName"].as_str().unwrap();
        doc_of(docs, "PersistentVolumeClaim", claim);
        assert!(!docs.iter().any(|d| d["kind"] == "PodDisruptionBudget"), "{what}: a PDB on a single replica blocks every drain");
    }
}

/// The NetworkPolicy admits to the feed port only pods chosen by label (no peer that admits
/// everything), and lets the admin port be reached. Returns the feed peers' pod labels.
fn check_network_policy(what: &str, docs: &[Value], fullname: &str) -> Vec<Value> {
    let deployment = doc_of(docs, "Deployment", fullname);
    let policy = docs.iter().find(|d| d["kind"] == "NetworkPolicy").unwrap_or_else(|| panic!("{what}: no NetworkPolicy"));
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let selected = policy["spec"]["podSelector"]["matchLabels"].as_object().unwrap();
    assert!(!selected.is_empty() && selected.iter().all(|(k, v)| &labels[k] == v), "{what}: the NetworkPolicy does not select keyward's pods");
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]), "{what}: policyTypes");
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    let rule_for = |port: &str| rules.iter().find(|r| r["ports"].as_array().is_some_and(|p| p.iter().any(|p| p["port"] == port))).unwrap_or_else(|| panic!("{what}: no rule for port {port}"));
    let feed = rule_for("feed");
    assert_eq!(feed["ports"].as_array().unwrap().len(), 1, "{what}: the feed rule opens other ports too");
    let peers = feed["from"].as_array().unwrap_or_else(|| panic!("{what}: the feed rule admits every source"));
    assert!(!peers.is_empty());
    for peer in peers {
        let by_label = peer["podSelector"]["matchLabels"].as_object().is_some_and(|m| !m.is_empty());
        assert!(by_label && peer["ipBlock"].is_null(), "{what}: feed peer {peer} admits more than labelled pods");
    }
    rule_for("http");
    peers.iter().map(|p| p["podSelector"]["matchLabels"].clone()).collect()
}

#[test]
fn kubernetes_ha_manifest_runs_spread_replicas_on_postgres_with_the_feed_fenced() {
    let sqlite = yaml_docs(&workspace_root().join("deploy/kubernetes/keyward.yaml"));
    check_serve_deployment("keyward.yaml", &sqlite, "keyward");
    check_store_mode("keyward.yaml", &sqlite, "keyward", false);

    let ha = yaml_docs(&workspace_root().join("deploy/kubernetes/keyward-ha.yaml"));
    check_serve_deployment("keyward-ha.yaml", &ha, "keyward");
    check_store_mode("keyward-ha.yaml", &ha, "keyward", true);
    let deployment = doc_of(&ha, "Deployment", "keyward");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let required = &deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(required["topologyKey"], "kubernetes.io/hostname", "two replicas may share a node");
    assert_eq!(required["labelSelector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);

    // The feed's peers are exactly the pods that run keyward.wasm in deploy/istio: the sidecars
    // the WasmPlugin selects, and the Gateway's pods by the label it puts on them.
    let peers = check_network_policy("keyward-ha.yaml", &ha, "keyward");
    let sidecar = &yaml_docs(&workspace_root().join("deploy/istio/wasmplugin.yaml"))[0]["spec"]["selector"]["matchLabels"];
    let gateway = doc_of(&yaml_docs(&workspace_root().join("deploy/istio/gateway.yaml")), "Gateway", "api-gateway")["spec"]["infrastructure"]["labels"].clone();
    assert!(gateway.is_object(), "gateway.yaml labels no gateway pods");
    assert_eq!(peers, vec![sidecar.clone(), gateway], "the NetworkPolicy's feed peers and deploy/istio's filter pods differ");

    // The Istio cluster the filter calls ends at the feed Service, on its port.
    let feed = doc_of(&ha, "Service", "keyward-feed");
    let host = format!("{}.{}.svc.cluster.local", feed["metadata"]["name"].as_str().unwrap(), feed["metadata"]["namespace"].as_str().unwrap());
    let port = feed["spec"]["ports"][0]["port"].as_u64().unwrap();
    let entry = &yaml_docs(&workspace_root().join("deploy/istio/serviceentry.yaml"))[0]["spec"];
    assert_eq!(entry["endpoints"][0]["address"], host.as_str(), "the ServiceEntry's endpoint is not the feed Service");
    assert_eq!(entry["ports"][0]["number"], port);
    let patch = &yaml_docs(&workspace_root().join("deploy/istio/envoyfilter-cluster.yaml"))[0]["spec"]["configPatches"][0]["patch"]["value"];
    let address = &patch["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    assert_eq!((address["address"].as_str(), address["port_value"].as_u64()), (Some(host.as_str()), Some(port)), "the EnvoyFilter cluster is not the feed Service");
}

#[test]
fn cnpg_cluster_passes_its_crd_schema_and_makes_the_secret_keyward_reads() {
    let files = files_in("deploy/kubernetes/cnpg", "yaml");
    let out = crd_validate(&files);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "CRD schema check:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Cluster/keyward-pg: valid"), "{stdout}");

    // CloudNativePG makes `<cluster>-app` with the application database's URL in `uri`: that is
    // what the HA manifest and the chart's default read, in the same namespace.
    let cluster = doc_of(&yaml_docs(&files[0]), "Cluster", "keyward-pg").clone();
    assert!(cluster["spec"]["instances"].as_u64().unwrap() >= 3, "a primary and two standbys");
    assert_eq!(cluster["spec"]["bootstrap"]["initdb"]["database"], "keyward");
    let ha = yaml_docs(&workspace_root().join("deploy/kubernetes/keyward-ha.yaml"));
    let deployment = doc_of(&ha, "Deployment", "keyward");
    assert_eq!(cluster["metadata"]["namespace"], deployment["metadata"]["namespace"]);
    let secret = (format!("{}-app", cluster["metadata"]["name"].as_str().unwrap()), "uri".to_string());
    assert_eq!(env_secret(container(deployment), "KEYWARD_STORE"), Some(secret.clone()), "keyward-ha.yaml does not read the Secret CloudNativePG makes");
    let values = &yaml_docs(&workspace_root().join("deploy/helm/keyward/values.yaml"))[0]["store"]["postgres"];
    assert_eq!((values["existingSecret"].as_str(), values["key"].as_str()), (Some(secret.0.as_str()), Some("uri")), "the chart's default store Secret");

    // The schema bites: a wrong enum value fails.
    let dir = keyward_testkit::TempDir::new("cnpg").unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(text.contains("method: any"));
    std::fs::write(&bad, text.replace("method: any", "method: sometimes")).unwrap();
    let out = crd_validate(&[bad]);
    assert!(!out.status.success(), "a bad synchronous method passed: {}", String::from_utf8_lossy(&out.stdout));
}

// ---- The Helm chart, rendered and linted by a real helm.

fn helm_bin() -> PathBuf {
    let bin = std::env::var_os("HELM_BIN").map(PathBuf::from).unwrap_or_else(|| workspace_root().join(".tools/helm/helm"));
    assert!(bin.is_file(), "{}", tool_missing(&format!("helm ({}; or set HELM_BIN)", bin.display())));
    bin
}

/// `helm` with its cache, config and data in a throwaway directory, never the user's.
fn helm(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(helm_bin())
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .current_dir(workspace_root())
        .output()
        .unwrap()
}

const CHART: &str = "deploy/helm/keyward";

/// `helm template keyward <chart> -n keyward-system <args>`, parsed.
fn render(home: &Path, chart: &str, args: &[&str]) -> Result<Vec<Value>, String> {
    let mut all = vec!["template", "keyward", chart, "--namespace", "keyward-system"];
    all.extend_from_slice(args);
    let out = helm(home, &all);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    Ok(docs_in_yaml("helm template", &String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn helm_chart_lints_and_renders_valid_manifests_in_both_modes() {
    let home = keyward_testkit::TempDir::new("helm").unwrap();
    let values = files_in(&format!("{CHART}/ci"), "yaml");
    let names: Vec<String> = values.iter().map(|f| f.file_name().unwrap().to_string_lossy().to_string()).collect();
    assert_eq!(names, ["postgres-values.yaml", "sqlite-values.yaml"], "one value file per mode");

    // The chart's defaults, then each mode with every optional resource on.
    let mut cases: Vec<(String, Vec<String>)> = vec![("defaults".into(), vec![])];
    cases.extend(values.iter().map(|f| (f.display().to_string(), vec!["-f".to_string(), f.display().to_string()])));
    for (what, args) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut lint = vec!["lint", "--strict", CHART];
        lint.extend_from_slice(&args);
        let out = helm(home.path(), &lint);
        assert!(out.status.success(), "helm lint {what}:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

        let docs = render(home.path(), CHART, &args).unwrap_or_else(|e| panic!("helm template {what}: {e}"));
        validate_manifests(what, &docs).unwrap_or_else(|e| panic!("{e}"));
        check_serve_deployment(what, &docs, "keyward");
        let postgres = what.contains("postgres");
        check_store_mode(what, &docs, "keyward", postgres);
        if what != "defaults" {
            check_network_policy(what, &docs, "keyward");
            let monitor = docs.iter().find(|d| d["kind"] == "ServiceMonitor").unwrap_or_else(|| panic!("{what}: no ServiceMonitor"));
            assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
            let admin = doc_of(&docs, "Service", "keyward");
            let selector = monitor["spec"]["selector"]["matchLabels"].as_object().unwrap();
            assert!(selector.iter().all(|(k, v)| admin["metadata"]["labels"][k] == *v), "{what}: the ServiceMonitor does not select the admin Service");
            assert!(!selector.iter().all(|(k, v)| doc_of(&docs, "Service", "keyward-feed")["metadata"]["labels"][k] == *v), "{what}: the ServiceMonitor also scrapes the feed Service (each pod twice)");
        } else {
            assert!(!docs.iter().any(|d| d["kind"] == "ServiceMonitor" || d["kind"] == "NetworkPolicy"), "defaults: optional resources are off by default");
        }
        // Tokens the chart was given as values become Secrets that the pods read.
        for doc in docs.iter().filter(|d| d["kind"] == "Secret") {
            let name = doc["metadata"]["name"].as_str().unwrap();
            let c = container(doc_of(&docs, "Deployment", "keyward"));
            assert!(["KEYWARD_ADMIN_TOKEN", "KEYWARD_FEED_TOKEN"].iter().any(|v| env_secret(c, v).is_some_and(|(s, k)| s == name && k == "token")), "{what}: Secret {name} is read by nothing");
        }
    }
}

#[test]
fn helm_chart_refuses_bad_values_and_a_broken_template_fails_validation() {
    let home = keyward_testkit::TempDir::new("helm").unwrap();
    // values.schema.json: a misspelled key, an unknown engine, a short token.
    for (set, expect) in [("store.engin=postgres", "engin"), ("store.engine=mysql", "engine"), ("tokens.feed.value=short", "feed")] {
        let err = render(home.path(), CHART, &["--set", set]).expect_err(set);
        assert!(err.contains(expect), "--set {set}: {err}");
    }
    // The templates' own requirements.
    let err = render(home.path(), CHART, &["--set", "tokens.admin.existingSecret="]).unwrap_err();
    assert!(err.contains("tokens.admin"), "{err}");
    let err = render(home.path(), CHART, &["--set", "tls.enabled=true"]).unwrap_err();
    assert!(err.contains("tls.existingSecret"), "{err}");

    // A template that renders fine but produces a wrong field is caught by the validators.
    let copy = keyward_testkit::TempDir::new("chart").unwrap();
    let chart = copy.path().join("keyward");
    copy_dir(&workspace_root().join(CHART), &chart);
    let deployment = chart.join("templates/deployment.yaml");
    let text = std::fs::read_to_string(&deployment).unwrap();
    std::fs::write(&deployment, text.replacen("strategy:", "stratgy:", 1)).unwrap();
    let docs = render(home.path(), chart.to_str().unwrap(), &["--set", "store.engine=postgres"]).unwrap();
    let err = validate_manifests("broken chart", &docs).expect_err("a misspelled field in a template passed");
    assert!(err.contains("stratgy"), "{err}");
    // So is a ServiceMonitor the prometheus-operator schema refuses.
    let monitor = chart.join("templates/servicemonitor.yaml");
    let text = std::fs::read_to_string(&monitor).unwrap();
    std::fs::write(&monitor, text.replace("path: /metrics", "path: /metrics\n    scheme: gopher")).unwrap();
    let docs = render(home.path(), chart.to_str().unwrap(), &["--set", "serviceMonitor.enabled=true"]).unwrap();
    let monitors: Vec<Value> = docs.into_iter().filter(|d| d["kind"] == "ServiceMonitor").collect();
    assert_eq!(monitors.len(), 1);
    let err = validate_manifests("broken ServiceMonitor", &monitors).expect_err("a bad ServiceMonitor scheme passed");
    assert!(err.contains("ServiceMonitor/keyward: INVALID"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

// ---- docker-compose.yml's `postgres` profile.

fn docker_compose(args: &[&str]) -> std::process::Output {
    Command::new("docker-compose")
        .args(args)
        .current_dir(workspace_root())
        .env("KEYWARD_ADMIN_TOKEN", "")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", tool_missing("docker-compose (Debian package docker-compose)")))
}

#[test]
fn docker_compose_postgres_profile_runs_two_replicas_behind_envoy() {
    let out = docker_compose(&["--profile", "postgres", "-f", "docker-compose.yml", "config"]);
    assert!(out.status.success(), "docker-compose --profile postgres config:\n{}", String::from_utf8_lossy(&out.stderr));
    // What compose itself makes of the file (anchors merged, variables at their defaults).
    let resolved = &docs_in_yaml("docker-compose config", &String::from_utf8_lossy(&out.stdout))[0];
    let services = resolved["services"].as_object().unwrap();

    // Without the profile, exactly the stack `docker compose up` always ran; everything new is in
    // the profile. (serde_json's maps are sorted by key.)
    let default: Vec<&str> = services.iter().filter(|(_, s)| s["profiles"].is_null()).map(|(n, _)| n.as_str()).collect();
    assert_eq!(default, ["echo", "envoy", "keyward", "wasm"], "the default stack changed");
    let profiled: Vec<&str> = services.iter().filter(|(_, s)| s["profiles"] == json!(["postgres"])).map(|(n, _)| n.as_str()).collect();
    // The `native` profile's services (its own test), if compose lists them at all.
    let native = services.iter().filter(|(_, s)| s["profiles"] == json!(["native"])).count();
    assert_eq!(profiled.len() + default.len() + native, services.len(), "a service in another profile");
    for name in ["postgres", "keyward-a", "keyward-b", "envoy-pg"] {
        assert!(profiled.contains(&name), "no {name} in the postgres profile: {profiled:?}");
    }
    let compose = &yaml_docs(&workspace_root().join("docker-compose.yml"))[0];

    // Both replicas on the postgres service, with their feed on the port Envoy's cluster names.
    assert_eq!(services["envoy-pg"]["image"], format!("envoyproxy/envoy:v{}", keyward_testkit::ENVOY_VERSION));
    let mounts: Vec<&str> = compose["services"]["envoy-pg"]["volumes"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(mounts.contains(&"./envoy/compose-postgres.yaml:/etc/envoy/envoy.yaml:ro") && mounts.contains(&"wasm:/etc/envoy/wasm:ro"), "{mounts:?}");
    let config = &yaml_docs(&workspace_root().join("envoy/compose-postgres.yaml"))[0];
    let clusters = config["static_resources"]["clusters"].as_array().unwrap();
    let endpoints = |name: &str| -> Vec<(String, u64)> {
        let cluster = clusters.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no cluster {name}"));
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["endpoint"]["address"]["socket_address"])
            .map(|a| (a["address"].as_str().unwrap().to_string(), a["port_value"].as_u64().unwrap()))
            .collect()
    };
    let mut replicas = Vec::new();
    for name in ["keyward-a", "keyward-b"] {
        let env = &services[name]["environment"];
        assert_eq!(env["KEYWARD_REPLICA"], name, "{name}: KEYWARD_REPLICA");
        let store = env["KEYWARD_STORE"].as_str().unwrap_or_else(|| panic!("{name}: KEYWARD_STORE"));
        assert!(store.starts_with("postgres://") && store.contains("@postgres:5432/"), "{name}: {store}");
        assert!(services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", "{name} starts before PostgreSQL answers");
        replicas.push((name.to_string(), port_of(env["KEYWARD_FEED_LISTEN"].as_str().unwrap())));
    }
    assert_eq!(endpoints("keyward"), replicas, "envoy/compose-postgres.yaml's feed cluster is not both replicas' feed listeners");
    let feed = clusters.iter().find(|c| c["name"] == "keyward").unwrap();
    assert_eq!(feed["health_checks"][0]["http_health_check"]["path"], "/readyz", "the feed cluster does not drop a replica that lost its store");
    assert_eq!(endpoints("echo"), [("echo".to_string(), 8080)]);
    // Host ports do not collide with the default stack's, so both can run.
    let published = |s: &str| -> Vec<String> { compose["services"][s]["ports"].as_array().map(|p| p.iter().map(|x| x.as_str().unwrap().to_string()).collect()).unwrap_or_default() };
    // "[ip:]host:container": the host port, whatever address it binds.
    let host_port = |p: &String| p.split(':').rev().nth(1).unwrap().to_string();
    let mut seen: Vec<String> = services.keys().flat_map(|s| published(s)).map(|p| host_port(&p)).collect();
    let total = seen.len();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), total, "two services publish the same host port: {seen:?}");

    // The check bites: a profile service with a misspelled key fails `docker-compose config`.
    let dir = keyward_testkit::TempDir::new("compose").unwrap();
    let bad = dir.path().join("docker-compose.yml");
    let text = std::fs::read_to_string(workspace_root().join("docker-compose.yml")).unwrap();
    std::fs::write(&bad, text.replace("      - keyward-pg:/var/lib/postgresql/data", "      - keyward-pg:/var/lib/postgresql/data\n    healthchek: {}")).unwrap();
    let out = docker_compose(&["--profile", "postgres", "-f", bad.to_str().unwrap(), "config", "-q"]);
    assert!(!out.status.success(), "a misspelled compose key passed");
}

// ---- The native shell's deployments: docker-compose.yml's `native` profile, Kubernetes.

#[test]
fn docker_compose_native_profile_loads_libkeyward_from_a_volume() {
    let out = docker_compose(&["--profile", "native", "-f", "docker-compose.yml", "config"]);
    assert!(out.status.success(), "docker-compose --profile native config:\n{}", String::from_utf8_lossy(&out.stderr));
    let resolved = &docs_in_yaml("docker-compose config", &String::from_utf8_lossy(&out.stdout))[0];
    let services = resolved["services"].as_object().unwrap();
    let profiled: Vec<&str> = services.iter().filter(|(_, s)| s["profiles"] == json!(["native"])).map(|(n, _)| n.as_str()).collect();
    assert_eq!(profiled, ["envoy-native", "native"], "the native profile's services");
    let compose = &yaml_docs(&workspace_root().join("docker-compose.yml"))[0];
    let envoy = &compose["services"]["envoy-native"];
    assert_eq!(envoy["image"], format!("envoyproxy/envoy:v{}", keyward_testkit::ENVOY_VERSION), "the stock Envoy image");
    let mounts: Vec<&str> = envoy["volumes"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(mounts.contains(&"./envoy/compose-native.yaml:/etc/envoy/envoy.yaml:ro"), "{mounts:?}");
    // Envoy looks for the module where the `native` service put it.
    let search = envoy["environment"]["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"].as_str().unwrap();
    assert!(mounts.contains(&format!("modules:{search}:ro").as_str()), "the search path {search} is not the modules volume: {mounts:?}");
    assert_eq!(compose["services"]["native"]["volumes"][0], "modules:/modules");
    assert_eq!(envoy["depends_on"]["native"]["condition"], "service_completed_successfully", "Envoy starts before the module is copied");
    let dockerfile = std::fs::read_to_string(workspace_root().join("Dockerfile.native")).unwrap();
    assert!(dockerfile.contains("--profile native -p keyward-native"), "Dockerfile.native: the native profile, as `cargo xtask native`");
    assert!(dockerfile.contains(r#"CMD ["cp", "/libkeyward.so", "/modules/libkeyward.so"]"#), "Dockerfile.native: the copy into /modules");
    // The compose Envoy reaches the default stack's services by name.
    let text = std::fs::read_to_string(workspace_root().join("envoy/compose-native.yaml")).unwrap();
    for (service, port) in [("keyward", 7070), ("echo", 8080)] {
        assert!(text.contains(&format!("address: {service}, port_value: {port}")), "envoy/compose-native.yaml does not reach {service}:{port}");
    }
    assert!(envoy["ports"].as_array().unwrap().iter().any(|p| p == "10002:10000"));
}

#[test]
fn the_kubernetes_native_envoy_copies_the_module_where_envoy_loads_it_and_its_config_validates() {
    let file = workspace_root().join("deploy/kubernetes/envoy-native.yaml");
    let docs = yaml_docs(&file);
    let find = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"));
    // The Envoy config in the ConfigMap passes `envoy --mode validate` (loading the built module)
    // and carries a filter config the core compiles.
    let config_text = find("ConfigMap")["data"]["envoy.yaml"].as_str().unwrap().to_string();
    let files = ContainerFiles::new().unwrap();
    let dir = keyward_testkit::TempDir::new("k8s-native").unwrap();
    let envoy_yaml = dir.path().join("envoy-native.yaml");
    std::fs::write(&envoy_yaml, &config_text).unwrap();
    validate_envoy_yaml(&envoy_bin(), &envoy_yaml, &files).unwrap_or_else(|e| panic!("{e}"));
    let config = &docs_in_yaml("the ConfigMap's envoy.yaml", &config_text)[0];
    let mut natives = Vec::new();
    typed(config, NATIVE_TYPE, &mut natives);
    assert_eq!(natives.len(), 1);
    assert_eq!(natives[0]["dynamic_module_config"]["name"], "keyward");
    let compiled = compile("envoy-native.yaml", &natives[0]["filter_config"]["value"]);
    assert!(compiled.control_plane.is_some_and(|cp| cp.cluster == "keyward"), "fed by the keyward cluster");
    // The init container copies libkeyward.so into the volume Envoy's search path names.
    let pod = &find("Deployment")["spec"]["template"]["spec"];
    let init = &pod["initContainers"][0];
    let command: Vec<&str> = init["command"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(command[..2], ["cp", "/libkeyward.so"]);
    let mount_of = |container: &Value, volume: &str| -> String {
        container["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == volume).unwrap()["mountPath"].as_str().unwrap().to_string()
    };
    assert_eq!(command[2], format!("{}/libkeyward.so", mount_of(init, "modules")));
    let envoy = pod["containers"].as_array().unwrap().iter().find(|c| c["name"] == "envoy").unwrap();
    assert_eq!(envoy["image"], format!("envoyproxy/envoy:v{}", keyward_testkit::ENVOY_VERSION));
    let search = envoy["env"].as_array().unwrap().iter().find(|e| e["name"] == "ENVOY_DYNAMIC_MODULES_SEARCH_PATH").unwrap()["value"].as_str().unwrap();
    assert_eq!(search, mount_of(envoy, "modules"), "Envoy looks for the module where the init container put it");
    assert_eq!(mount_of(envoy, "config"), "/etc/envoy", "the ConfigMap is /etc/envoy/envoy.yaml");
}

// ---- The Grafana dashboard against keyward's metrics.

/// The metrics `keyward serve` exposes on /metrics: name, type, labels.
/// `metrics_list_matches_what_a_real_keyward_serve_exposes` scrapes a real one against it.
const METRICS: &[(&str, &str, &[&str])] = &[
    ("keyward_replica_info", "gauge", &["replica", "engine", "role"]),
    ("keyward_snapshot_version", "gauge", &[]),
    ("keyward_feed_clients", "gauge", &[]),
    ("keyward_envoy_applied_version", "gauge", &["envoy", "replica"]),
    ("keyward_envoy_lag_versions", "gauge", &["envoy", "replica"]),
    ("keyward_changes_total", "counter", &[]),
    ("keyward_store_operation_seconds", "histogram", &["op"]),
    ("keyward_admin_guard_lockouts_total", "counter", &[]),
    ("keyward_rate_reports_total", "counter", &["mode"]),
    ("keyward_rate_buckets_total", "counter", &[]),
];

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["job", "instance"];

/// The series a metric name stands for: itself, or a histogram's `_bucket` (with `le`), `_sum`
/// and `_count`. Returns the metric and the labels the series carries.
fn series(name: &str) -> Option<(&'static str, Vec<&'static str>)> {
    METRICS.iter().find_map(|(metric, kind, labels)| {
        let mut labels = labels.to_vec();
        if name == *metric && *kind != "histogram" {
            return Some((*metric, labels));
        }
        let suffix = name.strip_prefix(metric)?;
        if *kind != "histogram" || !["_bucket", "_sum", "_count"].contains(&suffix) {
            return None;
        }
        if suffix == "_bucket" {
            labels.push("le");
        }
        Some((*metric, labels))
    })
}

/// Every PromQL expression in a dashboard: panel targets (rows' nested panels included) and
/// template variable queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, x) in map {
                    match (k.as_str(), x) {
                        ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                        ("query", Value::String(s)) if s.contains('(') => out.push(s.clone()),
                        _ => walk(x, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    walk(&dashboard["templating"], &mut out);
    out
}

/// The metric names a query reads, and the labels it groups by (`by (...)`, `{{label}}`).
fn query_terms(query: &str) -> (Vec<String>, Vec<String>) {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut metrics = Vec::new();
    let mut rest = query;
    while let Some(i) = rest.find("keyward_") {
        let before_ok = i == 0 || !rest[..i].ends_with(word);
        let tail = &rest[i..];
        let end = tail.find(|c: char| !word(c)).unwrap_or(tail.len());
        if before_ok {
            metrics.push(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    let mut labels = Vec::new();
    for part in query.split("by (").skip(1) {
        let list = part.split(')').next().unwrap_or_default();
        labels.extend(list.split(',').map(|l| l.trim().to_string()).filter(|l| !l.is_empty()));
    }
    (metrics, labels)
}

/// What is wrong with a dashboard: unparsable JSON, a panel without a query, a metric keyward
/// does not serve, a label its metrics do not carry, or a contract metric never shown.
fn dashboard_problems(text: &str) -> Vec<String> {
    let dashboard: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return vec![format!("not JSON: {e}")],
    };
    let mut problems = Vec::new();
    for field in ["uid", "title"] {
        if !dashboard[field].is_string() {
            problems.push(format!("no {field}"));
        }
    }
    let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    if panels.is_empty() {
        problems.push("no panels".into());
    }
    for panel in &panels {
        if panel["type"] != "row" && panel["targets"].as_array().is_none_or(|t| t.is_empty() || t.iter().any(|t| !t["expr"].is_string())) {
            problems.push(format!("panel {:?} has no PromQL target", panel["title"]));
        }
    }
    let mut shown = Vec::new();
    for query in dashboard_queries(&dashboard) {
        let (metrics, by) = query_terms(&query);
        let mut labels: Vec<&str> = TARGET_LABELS.to_vec();
        for name in &metrics {
            match series(name) {
                Some((metric, l)) => {
                    shown.push(metric);
                    labels.extend(l);
                }
                None => problems.push(format!("{name} is not a keyward metric (in {query})")),
            }
        }
        problems.extend(by.iter().filter(|l| !labels.contains(&l.as_str())).map(|l| format!("label {l} is on none of {metrics:?} (in {query})")));
    }
    // Legends name labels too: `{{envoy}}` must be on the panel's series.
    for panel in &panels {
        for target in panel["targets"].as_array().cloned().unwrap_or_default() {
            let (metrics, _) = query_terms(target["expr"].as_str().unwrap_or_default());
            let labels: Vec<&str> = metrics.iter().filter_map(|m| series(m)).flat_map(|(_, l)| l).chain(TARGET_LABELS.iter().copied()).collect();
            let legend = target["legendFormat"].as_str().unwrap_or_default();
            for label in legend.split("{{").skip(1).filter_map(|p| p.split("}}").next()) {
                if !labels.contains(&label.trim()) {
                    problems.push(format!("legend {legend:?} names {label}, which {metrics:?} do not carry"));
                }
            }
        }
    }
    for (metric, _, _) in METRICS {
        if !shown.contains(metric) {
            problems.push(format!("{metric} is shown nowhere"));
        }
    }
    problems
}

#[test]
fn grafana_dashboard_names_only_metrics_keyward_serves() {
    for file in files_in("deploy/grafana", "json") {
        let text = std::fs::read_to_string(&file).unwrap();
        let problems = dashboard_problems(&text);
        assert!(problems.is_empty(), "{}:\n{}", file.display(), problems.join("\n"));
    }
    // The check bites: a misspelled metric, a label the metric lacks, a legend naming one, broken JSON.
    let text = std::fs::read_to_string(workspace_root().join("deploy/grafana/keyward.json")).unwrap();
    for (from, to, expect) in [
        ("keyward_feed_clients", "keyward_feed_client", "keyward_feed_client is not a keyward metric"),
        ("sum by (op) (rate(keyward_store_operation_seconds_count", "sum by (envoy) (rate(keyward_store_operation_seconds_count", "label envoy"),
        ("\"{{role}} on {{engine}}\"", "\"{{role}} on {{op}}\"", "names op"),
        ("keyward_changes_total", "keyward_changes_total_sum", "keyward_changes_total_sum is not a keyward metric"),
        ("\"panels\": [", "\"panels\": [,", "not JSON"),
    ] {
        assert!(text.contains(from), "the dashboard no longer has {from:?}");
        let problems = dashboard_problems(&text.replacen(from, to, 1)).join("\n");
        assert!(problems.contains(expect), "{from} -> {to}: expected {expect:?}, got:\n{problems}");
    }
}

#[test]
fn metrics_list_matches_what_a_real_keyward_serve_exposes() {
    let serve = keyward_testkit::Keyward::start();
    serve.cli(&["agent", "create", "demo", "--scopes", "read:all", "--no-wait"]);
    // An Envoy on the feed, so the per-Envoy series exist.
    let feed = keyward_testkit::request(serve.port, "GET", "/v1/feed?since=0&envoy=dash", &[]).unwrap();
    assert_eq!(feed.status, 200);
    // And a rate report, so the per-mode series exist.
    let report = r#"{"envoy":"dash","buckets":[{"bucket":"k:key_x","count":5,"period_secs":1,"admitted":1}]}"#;
    let raw = format!("POST /v1/feed/rates HTTP/1.1\r\nhost: keyward\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{report}", report.len());
    assert_eq!(keyward_testkit::send_raw(serve.port, raw.as_bytes()).unwrap().status, 200);
    let text = String::from_utf8(keyward_testkit::request(serve.port, "GET", "/metrics", &[]).unwrap().body).unwrap();
    let mut served: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' ').map(|(n, t)| (n.to_string(), t.to_string())))
        .collect();
    served.sort();
    let mut listed: Vec<(String, String)> =
        METRICS.iter().map(|(n, t, _)| (n.strip_suffix("_total").unwrap_or(n).to_string(), t.to_string())).collect();
    listed.sort();
    assert_eq!(served, listed, "the dashboard's metric list and /metrics differ:\n{text}");
    for (name, _, labels) in METRICS {
        let sample = text
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .unwrap_or_else(|| panic!("no sample of {name}:\n{text}"));
        for label in *labels {
            assert!(sample.contains(&format!("{label}=\"")), "{name} has no label {label}: {sample}");
        }
    }
}

// ---- Nothing under deploy/ goes unchecked.

#[test]
fn every_file_under_deploy_is_checked_by_a_test() {
    // Each pattern is a directory a test above reads whole (files_in or the chart), or a file
    // that is part of a checker.
    let checked = |rel: &str| {
        let (dir, name) = rel.rsplit_once('/').unwrap();
        let ext = name.rsplit('.').next().unwrap();
        matches!((dir, ext), ("deploy/kubernetes" | "deploy/kubernetes/cnpg" | "deploy/istio", "yaml") | ("deploy/grafana", "json"))
            || rel.starts_with(&format!("{CHART}/"))
            || ["deploy/validate/validate.mjs", "deploy/validate/package.json", "deploy/validate/package-lock.json"].contains(&rel)
            || (dir == "deploy/validate/vendor" && ext == "tgz")
    };
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|n| n == "node_modules") {
                continue;
            }
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&workspace_root().join("deploy"), &mut files);
    let root = workspace_root();
    let unchecked: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(&root).unwrap().to_string_lossy().to_string())
        .filter(|rel| !checked(rel))
        .collect();
    assert!(unchecked.is_empty(), "files under deploy/ that no test checks (add a check, ARCHITECTURE.md's invariant): {unchecked:?}");
}
