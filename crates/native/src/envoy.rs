//! Small safe wrappers over the callbacks every part of the shell uses.

use crate::abi::{self, ModuleBuffer};

/// Logs `message` to Envoy's log (component `dynamic_modules`), prefixed `keyward: `.
pub fn log(level: u32, message: &str) {
    let line = format!("keyward: {message}");
    // SAFETY: Envoy copies the message during the call; the log callback works on any thread.
    unsafe { abi::envoy_dynamic_module_callback_log(level, ModuleBuffer::of(line.as_bytes())) }
}

/// Whether Envoy would print a line at `level`.
pub fn log_enabled(level: u32) -> bool {
    // SAFETY: reads Envoy's log level; no pointers.
    unsafe { abi::envoy_dynamic_module_callback_log_enabled(level) }
}
