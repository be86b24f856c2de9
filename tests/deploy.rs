//! The deployment files, kept working by tests: every Envoy config validates and carries a filter
//! config the filter's own compiler accepts; docker-compose.yml passes `docker-compose config`;
//! the Kubernetes manifests pass kubernetes-validate and the Istio / Gateway API resources their
//! CRD schemas; and the compose topology runs for real, with processes in place of containers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyward_core::Config;
use keyward_testkit::{envoy_bin, envoy_yamls, validate_envoy_yaml, workspace_root, ContainerFiles, Echo, Envoy, EnvoyOptions, Keyward};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

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
    match v {
        Value::Object(map) => {
            if map.get("@type").and_then(Value::as_str) == Some(WASM_TYPE) {
                out.push(v.clone());
            }
            map.values().for_each(|x| wasm_filters(x, out));
        }
        Value::Array(items) => items.iter().for_each(|x| wasm_filters(x, out)),
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
    assert!(yamls.len() >= 5, "expected local, static, compose, edge and routes configs: {yamls:?}");
    for file in yamls {
        validate_envoy_yaml(&envoy, &file, &files).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn every_envoy_yaml_carries_a_filter_config_the_filter_compiles() {
    for file in envoy_yamls().unwrap() {
        let name = file.display().to_string();
        let doc = &yaml_docs(&file)[0];
        let mut filters = Vec::new();
        wasm_filters(doc, &mut filters);
        assert_eq!(filters.len(), 1, "{name}: one keyward filter expected");
        let wasm = &filters[0]["config"];
        assert_eq!(wasm["failure_policy"], "FAIL_RELOAD", "{name}: failure_policy");
        assert_eq!(wasm["vm_config"]["runtime"], "envoy.wasm.runtime.v8", "{name}: runtime");
        let config = compile(&name, &wasm["configuration"]["value"]);
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
            .find(|t| t["http_filters"].as_array().is_some_and(|h| h.iter().any(|f| f["typed_config"]["@type"] == WASM_TYPE)))
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
    for kind in ["deployment/keyward", "service/keyward", "persistentvolumeclaim/keyward-data"] {
        assert!(stdout.contains(kind), "{kind} was not validated:\n{stdout}");
    }
    // The validator is strict: a misspelled field fails.
    let dir = keyward_testkit::TempDir::new("k8s").unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(&files[0]).unwrap().replace("strategy:", "stratgy:");
    std::fs::write(&bad, text).unwrap();
    assert!(!kubernetes_validate(&[bad]).status.success(), "a misspelled field passed kubernetes-validate");
}

fn crd_validate(files: &[PathBuf]) -> std::process::Output {
    let dir = workspace_root().join("deploy/validate");
    assert!(
        dir.join("node_modules/@kubernetes-models/istio").is_dir(),
        "{}",
        tool_missing("deploy/validate's npm packages (`npm ci --prefix deploy/validate`)")
    );
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
