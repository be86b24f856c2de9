//! The browser the console's tests drive: Debian's `chromium` and `chromium-driver`, and npm's
//! `axe-core` in `.tools/axe-core` for the accessibility checks. `cargo xtask test` passes their
//! paths to `cargo test` as `CHROMIUM_BIN`, `CHROMEDRIVER_BIN` and `AXE_CORE_JS`;
//! `cargo xtask browser` installs them and prints those paths.

use crate::{ensure_debian_tools, Result};
use keyward_testkit::{axe_core_install_dir, AXE_CORE_VERSION};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the browser tests need, by the environment variable each is passed as.
#[derive(Debug)]
pub struct BrowserTools {
    pub chromium: PathBuf,
    pub chromedriver: PathBuf,
    pub axe_core_js: PathBuf,
}

impl BrowserTools {
    /// `(variable, path)` for `cargo test`'s environment.
    pub fn env(&self) -> [(&'static str, &Path); 3] {
        [("CHROMIUM_BIN", &self.chromium), ("CHROMEDRIVER_BIN", &self.chromedriver), ("AXE_CORE_JS", &self.axe_core_js)]
    }
}

/// Installs what is missing and returns the paths. A path the user set in `CHROMIUM_BIN`,
/// `CHROMEDRIVER_BIN` or `AXE_CORE_JS` is used as it is (it must exist), and nothing is
/// installed for it. Nothing is fetched when everything is in place, so re-runs work offline.
pub fn ensure() -> Result<BrowserTools> {
    let chromium = user_path("CHROMIUM_BIN")?;
    let chromedriver = user_path("CHROMEDRIVER_BIN")?;
    let mut debian = Vec::new();
    if chromium.is_none() {
        debian.push(("chromium", "chromium"));
    }
    if chromedriver.is_none() {
        debian.push(("chromedriver", "chromium-driver"));
    }
    ensure_debian_tools(&debian)?;
    let chromium = match chromium {
        Some(path) => path,
        None => on_path("chromium")?,
    };
    let chromedriver = match chromedriver {
        Some(path) => path,
        None => on_path("chromedriver")?,
    };
    let axe_core_js = match user_path("AXE_CORE_JS")? {
        Some(path) => path,
        None => ensure_axe_core()?,
    };
    Ok(BrowserTools { chromium, chromedriver, axe_core_js })
}

/// `cargo xtask browser`: installs, then prints each path as `VAR=path`, ready for
/// `env $(cargo xtask browser) cargo test ...`.
pub fn print() -> Result {
    let tools = ensure()?;
    for (var, path) in tools.env() {
        println!("{var}={}", path.display());
    }
    Ok(())
}

/// `$var` if set and not empty: it must name an existing file.
fn user_path(var: &str) -> Result<Option<PathBuf>> {
    let Some(value) = std::env::var_os(var).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let path = PathBuf::from(value);
    if !path.is_file() {
        return Err(format!("{var}={} names no file; unset it to let xtask install the browser tools", path.display()).into());
    }
    eprintln!("xtask: the browser tests use {var}={}", path.display());
    Ok(Some(path))
}

/// The absolute path of `cmd` as the shell finds it.
pub(crate) fn on_path(cmd: &str) -> Result<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map_err(|e| format!("cannot run sh to find {cmd}: {e}"))?;
    let found = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || found.is_empty() {
        return Err(format!("{cmd} is not on PATH after installing it").into());
    }
    Ok(PathBuf::from(found))
}

/// axe-core [`AXE_CORE_VERSION`] from npm into `.tools/axe-core`, unless that version is there.
fn ensure_axe_core() -> Result<PathBuf> {
    // The path `axe_core_default_path` names, where the tests look.
    crate::npm_package(&axe_core_install_dir(), "axe-core", AXE_CORE_VERSION, "node_modules/axe-core/axe.min.js", "AXE_CORE_JS to its axe.min.js")
}
