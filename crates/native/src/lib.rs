//! keyward as an Envoy dynamic module: `libkeyward.so`, the native shell over the same core as
//! `keyward.wasm`.
//!
//! Envoy loads the library from `$ENVOY_DYNAMIC_MODULES_SEARCH_PATH` by the name in
//! `dynamic_module_config.name`, calls [`envoy_dynamic_module_on_program_init`] once, then a
//! configuration hook per filter configuration and the stream hooks per request. Envoy refuses
//! a module that lacks any hook it requires, so every one is exported, most as pass-throughs.
//!
//! `abi` declares the callbacks used; `filter` is the request path (gather, `authorize`,
//! count, apply), with the process-wide rate-limit state (`keyward_core::buckets`). Every exported hook runs inside
//! [`guard`]: a panic is caught there and fails closed, since one unwinding into Envoy would
//! abort it.

// The hooks take Envoy's pointers and are called by Envoy alone, under the ABI's contract
// (each pointer is the one Envoy made or was given for that object, live for the call). They
// are not `unsafe fn`s because nothing in Rust calls them.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod abi;
mod envoy;
mod feed;
mod filter;
mod records;

use abi::{ConfigEnvoyPtr, ConfigModulePtr, EnvoyBuffer, EnvoyHeader, FilterEnvoyPtr, FilterModulePtr, ModuleBuffer};
use feed::Fetcher;
use filter::{FilterConfig, Flow, Stream};
use std::cell::RefCell;
use keyward_core::authorize::counter;
use keyward_core::response::internal_error;
use keyward_core::Config;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs a hook's body; a panic is logged and answered with `fallback`.
fn guard<R>(hook: &str, fallback: impl FnOnce() -> R, body: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(payload) => {
            let why = payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_default();
            // The log line may not hold the key: nothing the core panics with carries one.
            let _ = catch_unwind(|| envoy::log(abi::LOG_ERROR, &format!("panic in {hook}: {why}; failing closed")));
            fallback()
        }
    }
}

/// The ABI version this module was written against; Envoy 1.40 logs that it matched.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const u8 {
    // The default hook prints to stderr; `guard` logs the panic through Envoy instead.
    std::panic::set_hook(Box::new(|_| {}));
    abi::ABI_VERSION.as_ptr()
}

/// What config_new hands Envoy: the configuration streams share, and the fetcher (main thread
/// only).
struct ConfigBox {
    shared: Arc<FilterConfig>,
    fetcher: RefCell<Option<Fetcher>>,
}

/// Compiles the filter configuration (the `StringValue` JSON, as keyward.wasm takes it). A null
/// return makes Envoy refuse the configuration; the log says why.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(config_envoy: ConfigEnvoyPtr, _name: EnvoyBuffer, config: EnvoyBuffer) -> ConfigModulePtr {
    guard("config_new", std::ptr::null, || {
        // SAFETY: Envoy lends the configuration bytes for this call; they are compiled now.
        let bytes = unsafe { config.bytes() };
        match configure(config_envoy, bytes) {
            Ok((fc, fetcher)) => Box::into_raw(Box::new(ConfigBox { shared: Arc::new(fc), fetcher: RefCell::new(fetcher) })) as ConfigModulePtr,
            Err(e) => {
                envoy::log(abi::LOG_ERROR, &format!("rejecting configuration: {e}"));
                std::ptr::null()
            }
        }
    })
}

/// Defines a counter (or gauge) under `dynamicmodulescustom.`; only inside config_new.
pub(crate) fn define_metric(config_envoy: ConfigEnvoyPtr, name: &str, gauge: bool) -> Result<usize, String> {
    let mut id = 0usize;
    let name_buf = ModuleBuffer::of(name.as_bytes());
    // SAFETY: inside config_new, on Envoy's config; Envoy copies the name.
    let result = unsafe {
        if gauge {
            abi::envoy_dynamic_module_callback_http_filter_config_define_gauge(config_envoy, name_buf, std::ptr::null(), 0, &mut id)
        } else {
            abi::envoy_dynamic_module_callback_http_filter_config_define_counter(config_envoy, name_buf, std::ptr::null(), 0, &mut id)
        }
    };
    if result == abi::METRICS_SUCCESS {
        Ok(id)
    } else {
        Err(format!("defining the stat {name}: Envoy answered {result}"))
    }
}

fn configure(config_envoy: ConfigEnvoyPtr, bytes: &[u8]) -> Result<(FilterConfig, Option<Fetcher>), String> {
    let config = Config::from_json(bytes).map_err(|e| e.to_string())?;
    let counters = counter::names().iter().map(|name| define_metric(config_envoy, name, false)).collect::<Result<Vec<_>, _>>()?;
    let source = match (&config.snapshot, &config.control_plane) {
        (Some(s), _) => format!("inline snapshot of {} keys", s.keys.len()),
        (None, Some(cp)) => format!("snapshot feed via cluster {}", cp.cluster),
        (None, None) => "no keys (no snapshot, no control_plane): keyed requests get 503".into(),
    };
    let (feed, fetcher) = match (&config.snapshot, &config.control_plane) {
        (None, Some(cp)) => {
            let shared = feed::feed_for(cp);
            let fetcher = Fetcher::start(config_envoy, cp, Arc::clone(&shared), config.implications.clone())?;
            (Some(shared), Some(fetcher))
        }
        _ => (None, None),
    };
    envoy::log(abi::LOG_INFO, &format!("native shell {VERSION}: configuration loaded: {} rules, {source}", config.rules.len()));
    Ok((FilterConfig { config, counters, feed, debug: envoy::log_enabled(abi::LOG_DEBUG) }, fetcher))
}

/// The configuration's box, on the main thread.
///
/// # Safety
/// `config` must be null or made by config_new and not yet destroyed.
unsafe fn config_box<'a>(config: ConfigModulePtr) -> Option<&'a ConfigBox> {
    // SAFETY: per the contract above.
    unsafe { (config as *const ConfigBox).as_ref() }
}

/// The fetcher's tick, on the main thread (committed by its tick thread).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(_config_envoy: ConfigEnvoyPtr, config: ConfigModulePtr, _event_id: u64) {
    guard("config_scheduled", || (), || {
        // SAFETY: Envoy passes the configuration config_new made.
        let Some(b) = (unsafe { config_box(config) }) else { return };
        if let Ok(mut fetcher) = b.fetcher.try_borrow_mut() {
            if let Some(f) = fetcher.as_mut() {
                f.on_tick();
            }
        }
    })
}

/// An answer to one of the fetcher's calls, on the main thread.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _config_envoy: ConfigEnvoyPtr,
    config: ConfigModulePtr,
    callout_id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_size: usize,
    body_chunks: *const EnvoyBuffer,
    body_chunks_size: usize,
) {
    guard("config_http_callout_done", || (), || {
        // SAFETY: Envoy passes the configuration config_new made.
        let Some(b) = (unsafe { config_box(config) }) else { return };
        if let Ok(mut fetcher) = b.fetcher.try_borrow_mut() {
            if let Some(f) = fetcher.as_mut() {
                // SAFETY: Envoy's arrays, valid for this call.
                unsafe { f.on_callout_done(callout_id, result, headers, headers_size, body_chunks, body_chunks_size) };
            }
        }
    })
}

/// Envoy destroys a configuration after its last stream.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ConfigModulePtr) {
    guard("config_destroy", || (), || {
        if !config.is_null() {
            // SAFETY: made by Box::into_raw in config_new and destroyed once, here.
            let b = unsafe { Box::from_raw(config as *mut ConfigBox) };
            // Its thread joined and its scheduler deleted before the box goes.
            if let Some(mut f) = b.fetcher.into_inner() {
                f.stop();
            }
        }
    })
}

/// One stream's state: its configuration (shared) and what the plan adds to the response.
struct StreamState {
    config: Arc<FilterConfig>,
    stream: Stream,
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(config: ConfigModulePtr, _filter_envoy: FilterEnvoyPtr) -> FilterModulePtr {
    guard("filter_new", std::ptr::null, || {
        if config.is_null() {
            return std::ptr::null();
        }
        // SAFETY: a configuration made by config_new, which Envoy keeps alive while it makes streams.
        let Some(b) = (unsafe { config_box(config) }) else { return std::ptr::null() };
        Box::into_raw(Box::new(StreamState { config: Arc::clone(&b.shared), stream: Stream::default() })) as FilterModulePtr
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: FilterModulePtr) {
    guard("filter_destroy", || (), || {
        if !filter.is_null() {
            // SAFETY: made by Box::into_raw in filter_new and destroyed once, here.
            drop(unsafe { Box::from_raw(filter as *mut StreamState) });
        }
    })
}

/// The stream's state, mutably: Envoy calls a stream's hooks one at a time, on its worker.
///
/// # Safety
/// `filter` must be null or made by filter_new and not yet destroyed.
unsafe fn stream_state<'a>(filter: FilterModulePtr) -> Option<&'a mut StreamState> {
    // SAFETY: per the contract above.
    unsafe { (filter as *mut StreamState).as_mut() }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(filter_envoy: FilterEnvoyPtr, filter: FilterModulePtr, _end_of_stream: bool) -> u32 {
    let fail_closed = || {
        filter::send_reply(filter_envoy, &internal_error());
        abi::HEADERS_STOP_ITERATION
    };
    guard("request_headers", fail_closed, || {
        // SAFETY: Envoy passes the stream filter_new made.
        let Some(state) = (unsafe { stream_state(filter) }) else {
            envoy::log(abi::LOG_ERROR, "a request without its stream state; failing closed");
            return fail_closed();
        };
        let StreamState { config, stream } = state;
        match filter::on_request_headers(filter_envoy, config, stream) {
            Flow::Continue => abi::HEADERS_CONTINUE,
            Flow::Stop => abi::HEADERS_STOP_ITERATION,
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(filter_envoy: FilterEnvoyPtr, filter: FilterModulePtr, _end_of_stream: bool) -> u32 {
    guard("response_headers", || abi::HEADERS_CONTINUE, || {
        // SAFETY: Envoy passes the stream filter_new made.
        if let Some(state) = unsafe { stream_state(filter) } {
            filter::on_response_headers(filter_envoy, &mut state.stream);
        }
        abi::HEADERS_CONTINUE
    })
}

// The hooks Envoy requires and keyward does not use: pass-throughs.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(_f: FilterEnvoyPtr, _m: FilterModulePtr, _end_of_stream: bool) -> u32 {
    abi::CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(_f: FilterEnvoyPtr, _m: FilterModulePtr) -> u32 {
    abi::CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(_f: FilterEnvoyPtr, _m: FilterModulePtr, _end_of_stream: bool) -> u32 {
    abi::CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(_f: FilterEnvoyPtr, _m: FilterModulePtr) -> u32 {
    abi::CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(_f: FilterEnvoyPtr, _m: FilterModulePtr) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(_f: FilterEnvoyPtr, _m: FilterModulePtr, _event_id: u64) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _f: FilterEnvoyPtr,
    _m: FilterModulePtr,
    _callout_id: u64,
    _result: u32,
    _headers: *const EnvoyHeader,
    _headers_size: usize,
    _body_chunks: *const EnvoyBuffer,
    _body_chunks_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _f: FilterEnvoyPtr,
    _m: FilterModulePtr,
    _stream_id: u64,
    _headers: *const EnvoyHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _f: FilterEnvoyPtr,
    _m: FilterModulePtr,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _f: FilterEnvoyPtr,
    _m: FilterModulePtr,
    _stream_id: u64,
    _trailers: *const EnvoyHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(_f: FilterEnvoyPtr, _m: FilterModulePtr, _stream_id: u64) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(_f: FilterEnvoyPtr, _m: FilterModulePtr, _stream_id: u64, _reason: u32) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(_f: FilterEnvoyPtr, _m: FilterModulePtr) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(_f: FilterEnvoyPtr, _m: FilterModulePtr) {}
