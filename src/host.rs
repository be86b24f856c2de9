//! The one host boundary: every hostcall the filter makes goes through [`Host`].
//!
//! [`EnvoyHost`] is the only code that calls `proxy_wasm::hostcalls`; it maps each `Status` to a
//! [`HostError`] and unwraps nothing. (The SDK's wrappers themselves still panic on statuses the
//! ABI does not allow for a call; no host is known to return those.) [`FakeHost`] is the
//! in-memory host every unit test uses.

mod envoy;
#[cfg(test)]
mod fake;

pub use envoy::EnvoyHost;
#[cfg(test)]
pub use fake::FakeHost;

use keyward_core::ratelimit::{BucketStore, Versioned};
use keyward_core::LocalReply;
pub use proxy_wasm::types::{LogLevel, Status};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hostcall {op} failed: {status:?}")]
pub struct HostError {
    pub op: &'static str,
    pub status: Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// What an HTTP callout answered: its `:status` (absent when the call failed) and body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallResponse {
    pub status: Option<String>,
    pub body: Vec<u8>,
}

pub trait Host {
    // The request and its response.
    /// Every request header, names lowercase, raw values, duplicates kept.
    fn request_headers(&self) -> Result<Vec<(String, Vec<u8>)>, HostError>;
    /// Sets (`Some`) or removes (`None`, all copies) a request header.
    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError>;
    /// Adds a request header value (after any the request already has).
    fn add_request_header(&self, name: &str, value: &[u8]) -> Result<(), HostError>;
    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostError>;
    fn send_reply(&self, reply: &LocalReply) -> Result<(), HostError>;
    /// A property of the stream, the connection or the node (`["xds", "route_name"]`).
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError>;

    // The clock.
    /// Microseconds since the Unix epoch, from Envoy's clock.
    fn now_micros(&self) -> Result<u64, HostError>;
    fn now_millis(&self) -> Result<u64, HostError> {
        Ok(self.now_micros()? / 1_000)
    }

    // Shared data, one map per `vm_id` across every worker.
    /// Reads a shared-data entry: its value (`None` if absent or empty) and CAS token.
    fn shared_get(&self, key: &str) -> Result<Versioned, HostError>;
    /// Writes a shared-data entry. With `cas`, returns `Ok(false)` if someone wrote in between.
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError>;

    // Shared queues between the VMs of one `vm_id`.
    fn register_queue(&self, name: &str) -> Result<u32, HostError>;
    fn resolve_queue(&self, vm_id: &str, name: &str) -> Result<Option<u32>, HostError>;
    fn enqueue(&self, queue: u32, value: &[u8]) -> Result<(), HostError>;
    fn dequeue(&self, queue: u32) -> Result<Option<Vec<u8>>, HostError>;

    // HTTP callouts to an Envoy cluster.
    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], body: Option<&[u8]>, timeout: Duration) -> Result<u32, HostError>;
    /// The response being delivered to `on_http_call_response`, its body up to `body_size` bytes.
    fn call_response(&self, body_size: usize) -> Result<CallResponse, HostError>;

    // Timers, metrics, the log, the configuration.
    fn set_tick_period(&self, period: Duration) -> Result<(), HostError>;
    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError>;
    /// Adds `n` to a counter or gauge.
    fn increment(&self, metric: u32, n: u64) -> Result<(), HostError>;
    /// Sets a gauge.
    fn record(&self, metric: u32, value: u64) -> Result<(), HostError>;
    /// Logs through Envoy's `wasm` logger; a failure to log is ignored (nowhere to report it).
    fn log(&self, level: LogLevel, message: &str);
    /// Whether Envoy would print a message at `level`.
    fn log_enabled(&self, level: LogLevel) -> bool;
    /// The plugin configuration's bytes.
    fn plugin_configuration(&self) -> Result<Vec<u8>, HostError>;
}

/// Rate-limit buckets in Envoy shared data, through the host boundary.
pub struct SharedBuckets<'h, H: Host + ?Sized>(pub &'h H);

impl<H: Host + ?Sized> BucketStore for SharedBuckets<'_, H> {
    type Error = HostError;

    fn get(&self, key: &str) -> Result<Versioned, HostError> {
        self.0.shared_get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError> {
        self.0.shared_set(key, value, cas)
    }
}

#[cfg(test)]
mod tests {
    /// The boundary holds: no file of the shell but `host/envoy.rs` calls proxy-wasm's hostcalls.
    /// (The same check by hand: `grep -rn hostcalls:: src | grep -v src/host/envoy.rs`.)
    #[test]
    fn no_hostcall_outside_the_envoy_host() {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&src, &mut files);
        assert!(files.len() > 5, "found the shell's sources");
        let offenders: Vec<String> = files
            .iter()
            .filter(|p| !p.ends_with("host/envoy.rs"))
            .filter(|p| {
                let code = std::fs::read_to_string(p).unwrap();
                // Comments may name it; code may not.
                code.lines().any(|l| !l.trim_start().starts_with("//") && l.contains(concat!("hostcalls", "::")))
            })
            .map(|p| p.display().to_string())
            .collect();
        assert!(offenders.is_empty(), "hostcalls outside host/envoy.rs: {offenders:?}");
    }
}
