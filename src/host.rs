//! The one host boundary: every hostcall the filter makes, behind a small trait.
//!
//! The real implementation maps each `Status` to a [`HostError`]; nothing here unwraps. (The
//! SDK's hostcall wrappers themselves still panic on statuses the ABI does not allow for a
//! call; no host is known to return those.)

use keyward_core::LocalReply;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};
use std::time::UNIX_EPOCH;

#[derive(Debug, thiserror::Error)]
#[error("hostcall {op} failed: {status:?}")]
pub struct HostError {
    pub op: &'static str,
    pub status: Status,
}

fn host_err(op: &'static str) -> impl Fn(Status) -> HostError {
    move |status| HostError { op, status }
}

pub trait Host {
    /// Every request header, names lowercase, raw values, duplicates kept.
    fn request_headers(&self) -> Result<Vec<(String, Vec<u8>)>, HostError>;
    /// Sets (`Some`) or removes (`None`, all copies) a request header.
    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError>;
    /// Adds a request header value (after any the request already has).
    fn add_request_header(&self, name: &str, value: &[u8]) -> Result<(), HostError>;
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError>;
    fn send_reply(&self, reply: &LocalReply) -> Result<(), HostError>;
    /// Microseconds since the Unix epoch, from Envoy's clock.
    fn now_micros(&self) -> Result<u64, HostError>;
    /// Unix seconds from Envoy's clock.
    fn now_unix(&self) -> Result<i64, HostError> {
        Ok(i64::try_from(self.now_micros()? / 1_000_000).unwrap_or(i64::MAX))
    }
    /// Adds `n` to a counter.
    fn increment(&self, metric: u32, n: u64) -> Result<(), HostError>;
    /// Reads a shared-data entry: its value (`None` if absent) and CAS token.
    fn shared_get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), HostError>;
    /// Writes a shared-data entry. With `cas`, returns `Ok(false)` if someone wrote in between.
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError>;
}

/// The real host: Envoy, through `proxy_wasm::hostcalls`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Envoy;

impl Host for Envoy {
    fn request_headers(&self) -> Result<Vec<(String, Vec<u8>)>, HostError> {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders).map_err(host_err("get_map_bytes"))
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value).map_err(host_err("set_map_value"))
    }

    fn add_request_header(&self, name: &str, value: &[u8]) -> Result<(), HostError> {
        hostcalls::add_map_value_bytes(MapType::HttpRequestHeaders, name, value).map_err(host_err("add_map_value"))
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        hostcalls::get_property(path.to_vec()).map_err(host_err("get_property"))
    }

    fn send_reply(&self, reply: &LocalReply) -> Result<(), HostError> {
        let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        hostcalls::send_http_response(reply.status, headers, Some(reply.body.as_bytes()))
            .map_err(host_err("send_http_response"))
    }

    fn now_micros(&self) -> Result<u64, HostError> {
        let now = hostcalls::get_current_time().map_err(host_err("get_current_time"))?;
        // A clock before 1970 reads as 0: expiry checks then err on "not expired" only for keys
        // that expire before 1970, which cannot be created.
        Ok(now.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)))
    }

    fn increment(&self, metric: u32, n: u64) -> Result<(), HostError> {
        hostcalls::increment_metric(metric, i64::try_from(n).unwrap_or(i64::MAX)).map_err(host_err("increment_metric"))
    }

    fn shared_get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), HostError> {
        hostcalls::get_shared_data(key).map_err(host_err("get_shared_data"))
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(status) => Err(HostError { op: "set_shared_data", status }),
        }
    }
}

/// Milliseconds since the Unix epoch, from Envoy's clock.
pub fn now_millis() -> Result<u64, HostError> {
    let now = hostcalls::get_current_time().map_err(host_err("get_current_time"))?;
    Ok(now.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
}

pub fn set_tick_period(period: std::time::Duration) -> Result<(), HostError> {
    hostcalls::set_tick_period(period).map_err(host_err("set_tick_period"))
}

pub fn dispatch_http_call(
    cluster: &str,
    headers: Vec<(&str, &str)>,
    body: Option<&[u8]>,
    timeout: std::time::Duration,
) -> Result<u32, HostError> {
    hostcalls::dispatch_http_call(cluster, headers, body, vec![], timeout).map_err(host_err("dispatch_http_call"))
}

/// The `:status` and body of the HTTP call response being delivered.
pub fn http_call_response(body_size: usize) -> Result<(Option<String>, Vec<u8>), HostError> {
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status").map_err(host_err("get_map_value"))?;
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .map_err(host_err("get_buffer"))?
        .unwrap_or_default();
    Ok((status, body))
}

pub fn add_response_header(name: &str, value: &str) -> Result<(), HostError> {
    hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value).map_err(host_err("add_map_value"))
}

pub fn register_queue(name: &str) -> Result<u32, HostError> {
    hostcalls::register_shared_queue(name).map_err(host_err("register_shared_queue"))
}

pub fn resolve_queue(vm_id: &str, name: &str) -> Result<Option<u32>, HostError> {
    hostcalls::resolve_shared_queue(vm_id, name).map_err(host_err("resolve_shared_queue"))
}

pub fn enqueue(queue: u32, value: &[u8]) -> Result<(), HostError> {
    hostcalls::enqueue_shared_queue(queue, Some(value)).map_err(host_err("enqueue_shared_queue"))
}

pub fn dequeue(queue: u32) -> Result<Option<Vec<u8>>, HostError> {
    hostcalls::dequeue_shared_queue(queue).map_err(host_err("dequeue_shared_queue"))
}

pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
    hostcalls::get_property(path.to_vec()).map_err(host_err("get_property"))
}

pub fn define_gauge(name: &str) -> Result<u32, HostError> {
    hostcalls::define_metric(MetricType::Gauge, name).map_err(host_err("define_metric"))
}

pub fn record_gauge(metric: u32, value: u64) -> Result<(), HostError> {
    hostcalls::record_metric(metric, value).map_err(host_err("record_metric"))
}

pub fn increment_counter(metric: u32) {
    let _ = hostcalls::increment_metric(metric, 1);
}

/// Logs through Envoy's `wasm` logger; a failure to log is ignored (there is nowhere to report it).
pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// Whether Envoy would print a message at `level`.
pub fn log_enabled(level: LogLevel) -> bool {
    hostcalls::get_log_level().is_ok_and(|current| current as u32 <= level as u32)
}

/// Reads the plugin configuration bytes.
pub fn plugin_configuration() -> Result<Vec<u8>, HostError> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
        .map(Option::unwrap_or_default)
        .map_err(host_err("get_buffer"))
}

pub fn define_counter(name: &str) -> Result<u32, HostError> {
    hostcalls::define_metric(MetricType::Counter, name).map_err(host_err("define_metric"))
}

/// The rate limiter's store: Envoy shared data, through the host boundary.
pub struct SharedStore<'h, H: Host>(pub &'h H);

impl<H: Host> keyward_core::ratelimit::Store for SharedStore<'_, H> {
    type Error = HostError;

    fn get(&self, key: &str) -> Result<keyward_core::ratelimit::Versioned, HostError> {
        self.0.shared_get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError> {
        self.0.shared_set(key, value, cas)
    }
}
