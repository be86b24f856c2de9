//! The part of Envoy's dynamic-module ABI this shell uses, declared by hand.
//!
//! Envoy 1.40 expects ABI `v0.2.0`. No public header of that revision could be read; these
//! declarations follow `source/extensions/dynamic_modules/abi/abi.h` at envoyproxy/envoy
//! 0199da4a13cb999df12ad32db7d03942cfbf9abb (which says `v0.1.0`), and every one was checked on
//! the 1.40.0 binary. Envoy checks neither signatures nor enum values at load: a wrong type here
//! is silent undefined behaviour, so only the real-Envoy suite proves them. Every symbol the
//! module imports must be exported by the Envoy it runs in (`tests/native_abi.rs`).
//!
//! Enums are plain C enums (4 bytes), declared as `u32` constants: Envoy may hand back a value
//! this revision does not know, and a Rust enum must never hold one.

#![allow(non_camel_case_types)]

use std::ffi::c_void;

/// `ENVOY_DYNAMIC_MODULES_ABI_VERSION` of Envoy 1.40, NUL-terminated.
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

pub type ConfigEnvoyPtr = *mut c_void;
pub type ConfigModulePtr = *const c_void;
pub type FilterEnvoyPtr = *mut c_void;
pub type FilterModulePtr = *const c_void;
pub type SchedulerPtr = *mut c_void;

/// Bytes Envoy owns, valid during the hook that lent them (and only until a setter is called).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

impl EnvoyBuffer {
    pub const EMPTY: EnvoyBuffer = EnvoyBuffer { ptr: std::ptr::null(), length: 0 };

    /// The bytes, borrowed for the hook call.
    ///
    /// # Safety
    /// `ptr` must point to `length` readable bytes for as long as the slice is used.
    pub unsafe fn bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.length == 0 {
            &[]
        } else {
            // SAFETY: the caller vouches for the buffer; null and empty are handled above.
            unsafe { std::slice::from_raw_parts(self.ptr, self.length) }
        }
    }
}

/// Bytes the module owns, read by Envoy during the call only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

impl ModuleBuffer {
    pub fn of(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer { ptr: bytes.as_ptr(), length: bytes.len() }
    }

    /// A null value: `http_set_header` removes the header.
    pub const NULL: ModuleBuffer = ModuleBuffer { ptr: std::ptr::null(), length: 0 };
}

/// A header the module hands Envoy.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleHeader {
    pub key: ModuleBuffer,
    pub value: ModuleBuffer,
}

/// A header Envoy lends the module.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyHeader {
    pub key: EnvoyBuffer,
    pub value: EnvoyBuffer,
}

impl EnvoyHeader {
    pub const EMPTY: EnvoyHeader = EnvoyHeader { key: EnvoyBuffer::EMPTY, value: EnvoyBuffer::EMPTY };
}

// envoy_dynamic_module_type_http_header_type
pub const REQUEST_HEADER: u32 = 0;
pub const RESPONSE_HEADER: u32 = 2;

// envoy_dynamic_module_type_log_level
pub const LOG_DEBUG: u32 = 1;
pub const LOG_INFO: u32 = 2;
pub const LOG_WARN: u32 = 3;
pub const LOG_ERROR: u32 = 4;

// envoy_dynamic_module_type_metadata_source
pub const METADATA_ROUTE: u32 = 1;

// envoy_dynamic_module_type_attribute_id (positional)
pub const ATTRIBUTE_TLS_VERSION: u32 = 31;

// envoy_dynamic_module_type_metrics_result
pub const METRICS_SUCCESS: u32 = 0;

// envoy_dynamic_module_type_http_callout_init_result
pub const CALLOUT_SUCCESS: u32 = 0;
pub const CALLOUT_CLUSTER_NOT_FOUND: u32 = 2;
// envoy_dynamic_module_type_http_callout_result
pub const CALLOUT_DONE: u32 = 0;

// envoy_dynamic_module_type_on_http_filter_{request,response}_headers_status
pub const HEADERS_CONTINUE: u32 = 0;
pub const HEADERS_STOP_ITERATION: u32 = 1;
// ..._body_status, ..._trailers_status
pub const CONTINUE: u32 = 0;

extern "C" {
    pub fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    pub fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;

    pub fn envoy_dynamic_module_callback_http_get_headers_size(filter: FilterEnvoyPtr, header_type: u32) -> usize;
    /// Fills `result`, which must hold `http_get_headers_size` entries.
    pub fn envoy_dynamic_module_callback_http_get_headers(filter: FilterEnvoyPtr, header_type: u32, result: *mut EnvoyHeader) -> bool;
    /// A [`ModuleBuffer::NULL`] value removes every copy of the header.
    pub fn envoy_dynamic_module_callback_http_set_header(filter: FilterEnvoyPtr, header_type: u32, key: ModuleBuffer, value: ModuleBuffer) -> bool;
    pub fn envoy_dynamic_module_callback_http_add_header(filter: FilterEnvoyPtr, header_type: u32, key: ModuleBuffer, value: ModuleBuffer) -> bool;
    pub fn envoy_dynamic_module_callback_http_send_response(
        filter: FilterEnvoyPtr,
        status_code: u32,
        headers: *const ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    pub fn envoy_dynamic_module_callback_http_get_metadata_string(
        filter: FilterEnvoyPtr,
        source: u32,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(filter: FilterEnvoyPtr, attribute_id: u32, result: *mut EnvoyBuffer) -> bool;

    /// Only inside `on_http_filter_config_new`: afterwards Envoy answers `Frozen`.
    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> u32;
    /// Gauges, like counters, are defined only inside `on_http_filter_config_new`.
    pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        gauge_id: *mut usize,
    ) -> u32;
    /// Counters and gauges from the configuration's context (the fetcher, on the main thread).
    pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: ConfigEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        config: ConfigEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;

    /// A scheduler whose `commit`, from any thread, runs `on_http_filter_config_scheduled` on
    /// the main thread. The module deletes it.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(config: ConfigEnvoyPtr) -> SchedulerPtr;
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(scheduler: SchedulerPtr, event_id: u64);
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: SchedulerPtr);

    /// An HTTP request through `cluster`, from the main thread; the answer comes to
    /// `on_http_filter_config_http_callout_done` with the id Envoy writes to `callout_id`.
    /// `headers` must hold `:method`, `:path` and `host`. `timeout_ms` 0 is no timeout.
    pub fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config: ConfigEnvoyPtr,
        callout_id: *mut u64,
        cluster: ModuleBuffer,
        headers: *const ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
}
