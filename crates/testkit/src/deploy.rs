//! The checked-in deployment files: finding every Envoy config, and standing in for the
//! container mounts that the docker compose and edge configs name (`/etc/envoy/...`).

use crate::{native_path, wasm_path, workspace_root, TempDir};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the container configs expect their files: `wasm/keyward.wasm`, `tls/tls.crt`, `tls/tls.key`.
pub const CONTAINER_ROOT: &str = "/etc/envoy/";

/// Every Envoy config in the repository: `envoy/*.yaml`, sorted.
pub fn envoy_yamls() -> Result<Vec<PathBuf>, String> {
    let dir = workspace_root().join("envoy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// A directory laid out like the containers' `/etc/envoy/`: the built module and a fresh
/// self-signed certificate for `localhost`. Removed on drop.
pub struct ContainerFiles {
    dir: TempDir,
}

impl ContainerFiles {
    pub fn new() -> Result<ContainerFiles, String> {
        let dir = TempDir::new("etc-envoy").map_err(|e| e.to_string())?;
        let wasm_dir = dir.path().join("wasm");
        let tls_dir = dir.path().join("tls");
        for d in [&wasm_dir, &tls_dir] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        std::fs::copy(wasm_path(), wasm_dir.join("keyward.wasm")).map_err(|e| format!("copying keyward.wasm: {e}"))?;
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout"])
            .arg(tls_dir.join("tls.key"))
            .arg("-out")
            .arg(tls_dir.join("tls.crt"))
            .output()
            .map_err(|e| format!("openssl (Debian package openssl; `cargo xtask test` installs it): {e}"))?;
        if !out.status.success() {
            return Err(format!("openssl failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(ContainerFiles { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The config with every `/etc/envoy/` path pointing here instead; nothing else changes.
    pub fn map(&self, yaml: &str) -> String {
        yaml.replace(CONTAINER_ROOT, &format!("{}/", self.dir.path().display()))
    }
}

/// `envoy --mode validate` on one config, run from the repository root (the local configs name
/// `target/...` relative to it), with container paths mapped to `files`.
pub fn validate_envoy_yaml(envoy: &Path, file: &Path, files: &ContainerFiles) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mapped = files.path().join(file.file_name().unwrap_or_default());
    std::fs::write(&mapped, files.map(&text)).map_err(|e| format!("{}: {e}", mapped.display()))?;
    let mut cmd = Command::new(envoy);
    if text.contains("envoy.filters.http.dynamic_modules") {
        // Validation loads the module: the native shell's configs find the one built here.
        let module = native_path();
        cmd.env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", module.parent().unwrap_or(Path::new(".")));
    }
    let out = cmd
        .args(["--mode", "validate", "--log-level", "warn", "-c"])
        .arg(&mapped)
        .current_dir(workspace_root())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", envoy.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{} failed `envoy --mode validate`:\n{}", file.display(), String::from_utf8_lossy(&out.stderr)))
    }
}
