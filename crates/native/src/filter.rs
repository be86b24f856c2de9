//! The request path: gather what the core needs from Envoy, call [`keyward_core::authorize`],
//! count its tally, apply its plan. Nothing here decides anything the contract says; the wasm
//! shell's `src/filter.rs` does the same through proxy-wasm.

use crate::abi::{self, EnvoyBuffer, EnvoyHeader, FilterEnvoyPtr, ModuleBuffer, ModuleHeader};
use crate::envoy;
use keyward_core::authorize::{self, Action, Context, Counted};
use keyward_core::buckets::Buckets;
use keyward_core::decision::reads_header_name;
use keyward_core::ratelimit::Fleet;
use keyward_core::response::{internal_error, LocalReply};
use keyward_core::{Config, KeyLookup, NoKeys, Request};
use crate::feed::{FeedKeys, FeedShared};
use keyward_core::authorize::{FleetCount, Tally};
use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

/// Rate-limit buckets, one map for the whole process (every worker, every configuration), as
/// shared data is one namespace per Envoy in the wasm shell.
pub(crate) static BUCKETS: LazyLock<Buckets> = LazyLock::new(Buckets::default);

/// A configuration Envoy accepted: the core's, and the ids of its counters.
pub struct FilterConfig {
    pub config: Config,
    /// Envoy's counter id for each of the core's [`authorize::counter::names`].
    pub counters: Vec<usize>,
    /// With a control plane: the keys the fetcher publishes, and the usage requests count.
    pub feed: Option<Arc<FeedShared>>,
    pub debug: bool,
}

/// One request's stream: the response headers the plan adds when the upstream answers.
#[derive(Default)]
pub struct Stream {
    pub response_headers: Vec<(&'static str, String)>,
}

/// What the hook returns to Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// A local reply was sent.
    Stop,
}

/// A host call that failed: the request fails closed.
#[derive(Debug)]
pub struct HostError(pub &'static str);

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed", self.0)
    }
}

/// Judges one request's headers, and acts on it. Whatever fails, fails closed.
pub fn on_request_headers(filter: FilterEnvoyPtr, fc: &FilterConfig, stream: &mut Stream) -> Flow {
    let feed_keys;
    let keys: &dyn KeyLookup = match (&fc.config.snapshot, &fc.feed) {
        (Some(snapshot), _) => snapshot,
        (None, Some(shared)) => {
            feed_keys = FeedKeys::load(shared, fc.config.control_plane.as_ref().and_then(|cp| cp.max_snapshot_age_secs));
            &feed_keys
        }
        (None, None) => &NoKeys,
    };
    match judge(filter, fc, keys, stream) {
        Ok(flow) => flow,
        Err(e) => {
            envoy::log(abi::LOG_ERROR, &format!("{e}; failing closed"));
            count(filter, fc, authorize::counter::INTERNAL_ERRORS);
            send_reply(filter, &internal_error());
            Flow::Stop
        }
    }
}

/// Request headers read into a stack buffer of this many entries; more spill to the heap.
const INLINE_HEADERS: usize = 32;

/// The request's headers, in order, borrowed from Envoy for this hook, written into `inline`
/// (or `spill`, when there are more than it holds). Any setter call may invalidate them, so
/// they are read before the plan is applied and not kept.
fn request_headers<'b>(filter: FilterEnvoyPtr, inline: &'b mut [EnvoyHeader; INLINE_HEADERS], spill: &'b mut Vec<EnvoyHeader>) -> Result<&'b [EnvoyHeader], HostError> {
    // SAFETY: `filter` is the live stream of this hook; Envoy fills exactly `size` entries.
    unsafe {
        let size = abi::envoy_dynamic_module_callback_http_get_headers_size(filter, abi::REQUEST_HEADER);
        let slots: &mut [EnvoyHeader] = if size <= INLINE_HEADERS {
            &mut inline[..size]
        } else {
            *spill = vec![EnvoyHeader::EMPTY; size];
            &mut spill[..]
        };
        if size > 0 && !abi::envoy_dynamic_module_callback_http_get_headers(filter, abi::REQUEST_HEADER, slots.as_mut_ptr()) {
            return Err(HostError("reading the request headers"));
        }
        Ok(slots)
    }
}

/// An attribute or metadata string, copied out.
fn read_string(read: impl FnOnce(*mut EnvoyBuffer) -> bool) -> Option<Vec<u8>> {
    let mut buf = EnvoyBuffer::EMPTY;
    // SAFETY: on success Envoy points `buf` at bytes valid during this hook; they are copied now.
    read(&mut buf as *mut EnvoyBuffer).then(|| unsafe { buf.bytes() }.to_vec())
}

fn judge(filter: FilterEnvoyPtr, fc: &FilterConfig, keys: &dyn KeyLookup, stream: &mut Stream) -> Result<Flow, HostError> {
    let config = &fc.config;
    // Every header is looked at: the contract removes each client-sent `x-keyward-*` header and
    // tells one credential sent twice from two different ones. Only those the core reads are
    // copied out, with the pseudo-headers.
    // The pseudo-headers are borrowed from Envoy (copied only if not UTF-8): the plan is made
    // before any setter is called, and they are not used after.
    let (mut method, mut path, mut authority) = (Cow::Borrowed(""), Cow::Borrowed(""), Cow::Borrowed(""));
    let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
    let (mut inline, mut spill) = ([EnvoyHeader::EMPTY; INLINE_HEADERS], Vec::new());
    for h in request_headers(filter, &mut inline, &mut spill)? {
        // SAFETY: lent by Envoy for this hook; no setter has been called yet.
        let (name, value) = unsafe { (h.key.bytes(), h.value.bytes()) };
        let text = || String::from_utf8_lossy(value);
        match name {
            b":method" => method = text(),
            b":path" => path = text(),
            b":authority" => authority = text(),
            // Envoy's codecs admit only token characters in names; a name the core reads that
            // is not UTF-8 fails the request closed rather than being skipped unseen.
            _ if reads_header_name(config, name) => {
                let name = std::str::from_utf8(name).map_err(|_| HostError("a request header name"))?;
                headers.push((name.to_string(), value.to_vec()));
            }
            _ => {}
        }
    }
    let tls_connection = config.require_tls
        // SAFETY: the live stream of this hook, and a buffer Envoy writes.
        && read_string(|buf| unsafe { abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(filter, abi::ATTRIBUTE_TLS_VERSION, buf) })
            .is_some_and(|v| !v.is_empty());
    // Borrowed: the route's metadata outlives the hook.
    let route_scopes = if config.route_metadata {
        let mut buf = EnvoyBuffer::EMPTY;
        let (ns, key) = (ModuleBuffer::of(b"keyward"), ModuleBuffer::of(b"scopes"));
        // SAFETY: as above; the namespace and key are read during the call only, and on success
        // Envoy points `buf` at bytes valid during this hook.
        unsafe { abi::envoy_dynamic_module_callback_http_get_metadata_string(filter, abi::METADATA_ROUTE, ns, key, &mut buf) }
            .then(|| unsafe { buf.bytes() })
            .and_then(|v| std::str::from_utf8(v).ok())
    } else {
        None
    };
    let now_us = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok().and_then(|d| u64::try_from(d.as_micros()).ok());
    // The clock is read only for keys that can expire or are rate-limited.
    let clock = || now_us().map_or(i64::MAX, |us| i64::try_from(us / 1_000_000).unwrap_or(i64::MAX));
    let req = Request {
        method: &method,
        path: &path,
        authority: &authority,
        headers: &headers,
        tls_connection,
        route_scopes,
        now: &clock,
    };
    let fleet = fc.feed.as_ref().map_or_else(Fleet::default, |f| **f.fleet.load());
    let mut plan = authorize::authorize(config, keys, &*BUCKETS, &req, &Context { now_us: &now_us, fleet });
    let t = &plan.tally;
    for counter in t.bucket_counters() {
        count(filter, fc, counter);
    }
    if let Some(feed) = &fc.feed {
        tally_feed(feed, t, &clock);
    }
    if let Some(why) = &t.fault {
        envoy::log(abi::LOG_ERROR, &format!("{why}; failing closed"));
    } else if fc.debug {
        envoy::log(abi::LOG_DEBUG, &plan.describe(&req));
    }
    let outcome = t.outcome_counter();
    let fault = t.counted == Counted::Fault;
    match &mut plan.action {
        Action::Reply(reply) => {
            count(filter, fc, outcome);
            send_reply(filter, reply);
            Ok(Flow::Stop)
        }
        Action::Forward(forward) => {
            let set = |name: &str, value: ModuleBuffer| {
                // SAFETY: the live stream of this hook; Envoy copies the name and value.
                unsafe { abi::envoy_dynamic_module_callback_http_set_header(filter, abi::REQUEST_HEADER, ModuleBuffer::of(name.as_bytes()), value) }
            };
            let applied = (|| {
                for name in &forward.remove {
                    // Envoy answers false when there was nothing to remove.
                    set(name, ModuleBuffer::NULL);
                }
                if let Some(path) = &forward.path {
                    if !set(":path", ModuleBuffer::of(path.as_bytes())) {
                        return Err(HostError("rewriting :path"));
                    }
                }
                for (name, value) in forward.identity_headers().into_iter().flatten() {
                    // SAFETY: as above.
                    let added = unsafe {
                        abi::envoy_dynamic_module_callback_http_add_header(filter, abi::REQUEST_HEADER, ModuleBuffer::of(name.as_bytes()), ModuleBuffer::of(value.as_bytes()))
                    };
                    if !added {
                        return Err(HostError("adding an identity header"));
                    }
                }
                Ok(())
            })();
            match applied {
                // A forwarded request is counted once its changes are applied, so one that fails
                // half-way is counted only as a fault.
                Ok(()) => {
                    count(filter, fc, outcome);
                    stream.response_headers = std::mem::take(&mut forward.response_headers);
                    Ok(Flow::Continue)
                }
                Err(e) if fault => {
                    envoy::log(abi::LOG_ERROR, &format!("{e}; failing closed"));
                    send_reply(filter, &internal_error());
                    Ok(Flow::Stop)
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// With a control plane: the key's usage and the bucket's admissions, for the fetcher's
/// reports.
fn tally_feed(feed: &FeedShared, t: &Tally<'_>, clock: &dyn Fn() -> i64) {
    if t.key.is_some() {
        if let Ok(usage) = feed.usage.lock() {
            t.count_usage(&usage, clock());
        }
    }
    let Some(b) = &t.bucket else { return };
    let Ok(rates) = feed.rates.lock() else { return };
    match b.fleet {
        Some(FleetCount::Admitted { urgent }) => rates.admitted(&b.bucket, b.limit, urgent),
        Some(FleetCount::Refused) => rates.refused(&b.bucket, b.limit),
        None => {}
    }
}

/// Adds the plan's response headers (RateLimit fields, Deprecation, Sunset).
pub fn on_response_headers(filter: FilterEnvoyPtr, stream: &mut Stream) {
    for (name, value) in stream.response_headers.drain(..) {
        // SAFETY: the live stream of this hook; Envoy copies the name and value.
        let added = unsafe {
            abi::envoy_dynamic_module_callback_http_add_header(filter, abi::RESPONSE_HEADER, ModuleBuffer::of(name.as_bytes()), ModuleBuffer::of(value.as_bytes()))
        };
        if !added {
            envoy::log(abi::LOG_WARN, &format!("adding {name} to the response failed"));
        }
    }
}

/// Adds one to the core's counter `index`.
pub fn count(filter: FilterEnvoyPtr, fc: &FilterConfig, index: usize) {
    let Some(&id) = fc.counters.get(index) else { return };
    // SAFETY: the live stream of this hook; no labels.
    unsafe {
        abi::envoy_dynamic_module_callback_http_filter_increment_counter(filter, id, std::ptr::null(), 0, 1);
    }
}

/// Sends a local reply: the contract's status, headers and JSON body.
pub fn send_reply(filter: FilterEnvoyPtr, reply: &LocalReply) {
    let headers: Vec<ModuleHeader> =
        reply.headers.iter().map(|(name, value)| ModuleHeader { key: ModuleBuffer::of(name.as_bytes()), value: ModuleBuffer::of(value.as_bytes()) }).collect();
    // SAFETY: the live stream of this hook; Envoy copies the headers and body before returning.
    unsafe {
        abi::envoy_dynamic_module_callback_http_send_response(
            filter,
            reply.status,
            headers.as_ptr(),
            headers.len(),
            ModuleBuffer::of(reply.body.as_bytes()),
            ModuleBuffer::of(b"keyward"),
        );
    }
}
