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
    /// The request's header map, read whole in one hostcall: names lowercase, raw values,
    /// duplicates kept, in order. Nothing is copied out of it until asked for.
    fn request_headers(&self) -> Result<HeaderMap, HostError>;
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

/// A header map as proxy-wasm serializes it: the pair count (u32, little-endian), each pair's
/// name and value lengths (u32 each), then each name and each value followed by a NUL.
///
/// Pairs are read in place: a request copies out only the headers the core reads (see
/// `keyward_core::decision::reads_header`), not one allocation per header as the SDK's
/// `get_map_bytes` makes. The layout is checked whole when the map is made, so reading it
/// cannot fail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMap {
    raw: Vec<u8>,
}

impl HeaderMap {
    /// The map Envoy wrote, if its layout holds (an empty buffer is an empty map).
    pub fn parse(raw: Vec<u8>) -> Option<HeaderMap> {
        let map = HeaderMap { raw };
        let count = map.count()?;
        let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
        for i in 0..count {
            let (name, value) = map.lengths(i)?;
            data = data.checked_add(name)?.checked_add(value)?.checked_add(2)?;
        }
        (data <= map.raw.len() || map.raw.is_empty()).then_some(map)
    }

    fn count(&self) -> Option<usize> {
        if self.raw.is_empty() {
            return Some(0);
        }
        Some(u32::from_le_bytes(self.raw.get(..4)?.try_into().ok()?) as usize)
    }

    fn lengths(&self, i: usize) -> Option<(usize, usize)> {
        let at = 4 + i * 8;
        let word = |at: usize| -> Option<usize> { Some(u32::from_le_bytes(self.raw.get(at..at + 4)?.try_into().ok()?) as usize) };
        Some((word(at)?, word(at + 4)?))
    }

    /// Every pair, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let count = self.count().unwrap_or(0);
        let mut data = 4 + count * 8;
        (0..count).map_while(move |i| {
            let (n, v) = self.lengths(i)?;
            let name = self.raw.get(data..data + n)?;
            let value = self.raw.get(data + n + 1..data + n + 1 + v)?;
            data += n + v + 2;
            Some((name, value))
        })
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter().find(|(n, _)| *n == name.as_bytes()).map(|(_, v)| v)
    }

    /// Serializes pairs as Envoy does (for the fake host and tests).
    pub fn from_pairs<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> HeaderMap {
        let mut raw = Vec::new();
        if pairs.is_empty() {
            return HeaderMap { raw };
        }
        let len = |b: &[u8]| u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes();
        raw.extend_from_slice(&u32::try_from(pairs.len()).unwrap_or(u32::MAX).to_le_bytes());
        for (n, v) in pairs {
            raw.extend_from_slice(&len(n.as_ref()));
            raw.extend_from_slice(&len(v.as_ref()));
        }
        for (n, v) in pairs {
            for part in [n.as_ref(), v.as_ref()] {
                raw.extend_from_slice(part);
                raw.push(0);
            }
        }
        HeaderMap { raw }
    }
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
    use super::HeaderMap;

    /// A header map reads back what was written, duplicates and empty values included; a
    /// buffer whose lengths overrun it, or that is too short for its count, is refused.
    #[test]
    fn header_maps_read_in_place_and_refuse_a_broken_layout() {
        let pairs: Vec<(&str, &[u8])> = vec![(":path", b"/v1"), ("x-api-key", b"one"), ("x-empty", b""), ("x-api-key", b"two")];
        let map = HeaderMap::from_pairs(&pairs);
        let parsed = HeaderMap::parse(map.raw.clone()).unwrap();
        assert_eq!(parsed.iter().collect::<Vec<_>>(), pairs.iter().map(|(n, v)| (n.as_bytes(), *v)).collect::<Vec<_>>());
        assert_eq!((parsed.get("x-api-key"), parsed.get("x-empty"), parsed.get("x-none")), (Some(&b"one"[..]), Some(&b""[..]), None));
        assert_eq!(HeaderMap::parse(Vec::new()).unwrap().iter().count(), 0);
        for cut in 1..map.raw.len() {
            assert_eq!(HeaderMap::parse(map.raw[..cut].to_vec()), None, "cut at {cut}");
        }
        let mut huge = map.raw.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderMap::parse(huge), None);
        let mut many = map.raw.clone();
        many[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderMap::parse(many), None);
    }

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
