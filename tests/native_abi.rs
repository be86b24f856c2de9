//! The native shell's ABI against the Envoy the tests run: Envoy checks neither signatures nor
//! enum values when it loads a dynamic module, only that the symbols resolve. So every symbol
//! `libkeyward.so` takes from Envoy must be one this Envoy exports, and every hook this Envoy
//! looks up must be one the module exports (a missing one refuses the configuration).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyward_testkit::{envoy_bin, native_path};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// `nm -D` on `file` with `flag`: the dynamic symbols, names only.
fn dynamic_symbols(file: &Path, flag: &str) -> BTreeSet<String> {
    let out = Command::new("nm")
        .args(["-D", flag])
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run nm (Debian package binutils, which the Rust linker needs too): {e}"));
    assert!(out.status.success(), "nm -D {flag} {}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().last()).map(str::to_string).collect()
}

#[test]
fn every_callback_the_module_imports_is_exported_by_this_envoy() {
    let module = native_path();
    let envoy = envoy_bin();
    let imported: BTreeSet<String> = dynamic_symbols(&module, "--undefined-only").into_iter().filter(|s| s.starts_with("envoy_dynamic_module_callback_")).collect();
    assert!(imported.len() >= 10, "libkeyward.so imports only {imported:?}");
    let exported = dynamic_symbols(&envoy, "--defined-only");
    let missing: Vec<&String> = imported.iter().filter(|s| !exported.contains(*s)).collect();
    assert!(missing.is_empty(), "{} does not export {missing:?}, which {} calls", envoy.display(), module.display());
    // Nothing else comes from Envoy: the rest is the C library.
    let other: Vec<String> = dynamic_symbols(&module, "--undefined-only").into_iter().filter(|s| s.starts_with("envoy_") && !imported.contains(s)).collect();
    assert!(other.is_empty(), "unexpected Envoy imports {other:?}");
}

#[test]
fn every_http_filter_hook_this_envoy_looks_up_is_exported_by_the_module() {
    let module = native_path();
    let exported = dynamic_symbols(&module, "--defined-only");
    // The hook names are strings in the Envoy binary (it resolves them with dlsym).
    let envoy = std::fs::read(envoy_bin()).unwrap();
    let wanted: BTreeSet<String> = envoy
        .split(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
        .filter_map(|w| std::str::from_utf8(w).ok())
        .filter(|w| w.starts_with("envoy_dynamic_module_on_http_filter_") || *w == "envoy_dynamic_module_on_program_init")
        .map(str::to_string)
        .collect();
    assert!(wanted.len() >= 20, "found only {wanted:?} in Envoy");
    // Optional to Envoy, and unused by keyward: the per-route configuration, the local-reply
    // hook, and the configuration-level streams.
    let optional = |h: &str| h.contains("per_route_config") || h.ends_with("_local_reply") || h.contains("_config_http_stream_") || h.ends_with("_config_scheduled") || h.ends_with("_config_http_callout_done");
    let missing: Vec<&String> = wanted.iter().filter(|h| !optional(h) && !exported.contains(*h)).collect();
    assert!(missing.is_empty(), "libkeyward.so lacks the hooks {missing:?}, which Envoy requires");
}
