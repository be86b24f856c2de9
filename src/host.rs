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
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError>;
    fn send_reply(&self, reply: &LocalReply) -> Result<(), HostError>;
    /// Unix seconds from Envoy's clock.
    fn now_unix(&self) -> Result<i64, HostError>;
    fn increment(&self, metric: u32) -> Result<(), HostError>;
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

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        hostcalls::get_property(path.to_vec()).map_err(host_err("get_property"))
    }

    fn send_reply(&self, reply: &LocalReply) -> Result<(), HostError> {
        let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        hostcalls::send_http_response(reply.status, headers, Some(reply.body.as_bytes()))
            .map_err(host_err("send_http_response"))
    }

    fn now_unix(&self) -> Result<i64, HostError> {
        let now = hostcalls::get_current_time().map_err(host_err("get_current_time"))?;
        // A clock before 1970 is reported as 0: every expiry check then errs on "not expired"
        // only for keys that expire before 1970, which cannot be created.
        Ok(now.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)))
    }

    fn increment(&self, metric: u32) -> Result<(), HostError> {
        hostcalls::increment_metric(metric, 1).map_err(host_err("increment_metric"))
    }
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
