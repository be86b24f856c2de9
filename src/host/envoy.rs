//! The real host: Envoy, through `proxy_wasm::hostcalls` and one ABI import of its own (the
//! header-map read). The only module that calls either.

use super::{CallResponse, HeaderMap, Host, HostError, MetricKind};
use keyward_core::ratelimit::Versioned;
use keyward_core::LocalReply;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};
use std::time::{Duration, UNIX_EPOCH};

#[derive(Debug, Default, Clone, Copy)]
pub struct EnvoyHost;

fn err(op: &'static str) -> impl Fn(Status) -> HostError {
    move |status| HostError { op, status }
}

// The ABI call under the SDK's `get_map_bytes`, declared as the SDK declares it: the SDK
// copies every name and value into its own allocation (and unwraps a name that is not UTF-8);
// `HeaderMap` reads the one buffer Envoy wrote in place.
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(map_type: MapType, return_map_data: *mut *mut u8, return_map_size: *mut usize) -> Status;
}

impl Host for EnvoyHost {
    fn request_headers(&self) -> Result<HeaderMap, HostError> {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: Envoy writes the pointer and size of a buffer it allocated through the SDK's
        // `proxy_on_memory_allocate` (a boxed slice of exactly `size` bytes); taking it back as a
        // `Vec` of that length and capacity frees it as the SDK's own `get_map_bytes` does.
        let raw = unsafe {
            match proxy_get_header_map_pairs(MapType::HttpRequestHeaders, &mut data, &mut size) {
                Status::Ok if data.is_null() => Vec::new(),
                Status::Ok => Vec::from_raw_parts(data, size, size),
                status => return Err(HostError { op: "get_header_map_pairs", status }),
            }
        };
        HeaderMap::parse(raw).ok_or(HostError { op: "get_header_map_pairs", status: Status::ParseFailure })
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value).map_err(err("set_map_value"))
    }

    fn add_request_header(&self, name: &str, value: &[u8]) -> Result<(), HostError> {
        hostcalls::add_map_value_bytes(MapType::HttpRequestHeaders, name, value).map_err(err("add_map_value"))
    }

    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value).map_err(err("add_map_value"))
    }

    fn send_reply(&self, reply: &LocalReply) -> Result<(), HostError> {
        let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        hostcalls::send_http_response(reply.status, headers, Some(reply.body.as_bytes())).map_err(err("send_http_response"))
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        hostcalls::get_property(path.to_vec()).map_err(err("get_property"))
    }

    fn now_micros(&self) -> Result<u64, HostError> {
        let now = hostcalls::get_current_time().map_err(err("get_current_time"))?;
        // A clock before 1970 reads as 0: expiry checks then err on "not expired" only for keys
        // that expire before 1970, which cannot be created.
        Ok(now.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)))
    }

    fn shared_get(&self, key: &str) -> Result<Versioned, HostError> {
        hostcalls::get_shared_data(key).map_err(err("get_shared_data"))
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(status) => Err(HostError { op: "set_shared_data", status }),
        }
    }

    fn register_queue(&self, name: &str) -> Result<u32, HostError> {
        hostcalls::register_shared_queue(name).map_err(err("register_shared_queue"))
    }

    fn resolve_queue(&self, vm_id: &str, name: &str) -> Result<Option<u32>, HostError> {
        hostcalls::resolve_shared_queue(vm_id, name).map_err(err("resolve_shared_queue"))
    }

    fn enqueue(&self, queue: u32, value: &[u8]) -> Result<(), HostError> {
        hostcalls::enqueue_shared_queue(queue, Some(value)).map_err(err("enqueue_shared_queue"))
    }

    fn dequeue(&self, queue: u32) -> Result<Option<Vec<u8>>, HostError> {
        hostcalls::dequeue_shared_queue(queue).map_err(err("dequeue_shared_queue"))
    }

    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], body: Option<&[u8]>, timeout: Duration) -> Result<u32, HostError> {
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), body, vec![], timeout).map_err(err("dispatch_http_call"))
    }

    fn call_response(&self, body_size: usize) -> Result<CallResponse, HostError> {
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status").map_err(err("get_map_value"))?;
        let body = if body_size == 0 {
            Vec::new()
        } else {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).map_err(err("get_buffer"))?.unwrap_or_default()
        };
        Ok(CallResponse { status, body })
    }

    fn set_tick_period(&self, period: Duration) -> Result<(), HostError> {
        hostcalls::set_tick_period(period).map_err(err("set_tick_period"))
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
        };
        hostcalls::define_metric(kind, name).map_err(err("define_metric"))
    }

    fn increment(&self, metric: u32, n: u64) -> Result<(), HostError> {
        hostcalls::increment_metric(metric, i64::try_from(n).unwrap_or(i64::MAX)).map_err(err("increment_metric"))
    }

    fn record(&self, metric: u32, value: u64) -> Result<(), HostError> {
        hostcalls::record_metric(metric, value).map_err(err("record_metric"))
    }

    fn log(&self, level: LogLevel, message: &str) {
        let _ = hostcalls::log(level, message);
    }

    fn log_enabled(&self, level: LogLevel) -> bool {
        hostcalls::get_log_level().is_ok_and(|current| current as u32 <= level as u32)
    }

    fn plugin_configuration(&self) -> Result<Vec<u8>, HostError> {
        hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).map(Option::unwrap_or_default).map_err(err("get_buffer"))
    }
}
