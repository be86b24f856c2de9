//! The request path: gather what the core needs, call [`keyward_core::authorize`], count its
//! tally, apply its plan. Nothing here decides anything the contract says.

use keyward_core::fetch::rates::RateCounts;
use crate::host::{HeaderMap, Host, HostError, LogLevel, MetricKind, SharedBuckets, Status};
use keyward_core::authorize::{self, counter, Action, Context, Counted, FleetCount, Plan, Tally};
use keyward_core::decision::reads_header;
use keyward_core::ratelimit::Fleet;
use keyward_core::response::internal_error;
use keyward_core::usage::Usage;
use keyward_core::{Config, KeyLookup, Request};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

const ROUTE_SCOPES: [&str; 5] = ["xds", "route_metadata", "filter_metadata", "keyward", "scopes"];
const ROUTE_NAME: [&str; 2] = ["xds", "route_name"];
const TLS_VERSION: [&str; 2] = ["connection", "tls_version"];
/// Most routes a VM remembers the metadata scopes of between ticks.
const ROUTE_CACHE_MAX: usize = 1024;

/// Route metadata scopes by route name, per VM, cleared when the tick's second changes. Reading the route's
/// metadata walks a protobuf on Envoy's side and was the dearest hostcall of a request; a route's
/// name is cheap. Unnamed routes are never cached: their name does not tell them apart.
///
/// Scopes are kept as the text the core reads (`None` when absent or not UTF-8, as the core
/// would ignore them), so a hit copies nothing.
#[derive(Debug, Default)]
pub struct RouteCache {
    entries: RefCell<HashMap<Vec<u8>, Option<Rc<str>>>>,
}

impl RouteCache {
    pub fn clear(&self) {
        self.entries.borrow_mut().clear();
    }

    fn scopes<H: Host>(&self, host: &H) -> Result<Option<Rc<str>>, HostError> {
        let read = || -> Result<Option<Rc<str>>, HostError> { Ok(host.property(&ROUTE_SCOPES)?.and_then(|v| String::from_utf8(v).ok()).map(Rc::from)) };
        let name = host.property(&ROUTE_NAME)?.filter(|n| !n.is_empty());
        let Some(name) = name else {
            return read();
        };
        if let Some(hit) = self.entries.borrow().get(&name) {
            return Ok(hit.clone());
        }
        let scopes = read()?;
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= ROUTE_CACHE_MAX {
            entries.clear();
        }
        entries.insert(name, scopes.clone());
        Ok(scopes)
    }
}

/// Counter ids, defined once per VM from the core's [`counter::names`]. They appear as
/// `wasmcustom.keyward.*` in Envoy's `/stats`.
///
/// Requests add to `pending` in the VM; the root context's tick flushes it to Envoy, so a
/// request makes no stats hostcall (counters lag by at most one tick).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    ids: Vec<u32>,
    pending: RefCell<Vec<(u32, u64)>>,
}

impl Metrics {
    pub fn define<H: Host>(host: &H) -> Result<Metrics, HostError> {
        let ids = counter::names().iter().map(|n| host.define_metric(MetricKind::Counter, n)).collect::<Result<_, _>>()?;
        Ok(Metrics { ids, pending: RefCell::default() })
    }

    /// One request that failed closed.
    pub fn count_fault(&self) {
        self.count(counter::INTERNAL_ERRORS);
    }

    /// Counts one event, to be flushed on the next tick.
    fn count(&self, counter: usize) {
        let Some(&metric) = self.ids.get(counter) else { return };
        let mut pending = self.pending.borrow_mut();
        match pending.iter_mut().find(|(id, _)| *id == metric) {
            Some((_, n)) => *n += 1,
            None => pending.push((metric, 1)),
        }
    }

    /// Sends the pending counts to Envoy.
    pub fn flush<H: Host>(&self, host: &H) -> Result<(), HostError> {
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        for (id, n) in pending {
            host.increment(id, n)?;
        }
        Ok(())
    }
}

/// The VM's state a request uses: counters, caches, usage counts, the tick's clock.
#[derive(Clone, Copy)]
pub struct VmView<'a> {
    pub metrics: &'a Metrics,
    pub routes: &'a RouteCache,
    pub debug: bool,
    /// Where requests count usage and admissions (with a control plane).
    pub usage: Option<&'a Usage>,
    pub rates: Option<&'a RateCounts>,
    /// Unix seconds as of the last tick.
    pub now_secs: i64,
    /// The fleet this Envoy shares its rate limits with, as of the last tick.
    pub fleet: Fleet,
}

/// What the HTTP context does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// Forward upstream, and add these headers to the response.
    Continue(Vec<(&'static str, String)>),
    /// A local reply was sent.
    Stop,
}

/// Gathers, authorizes, counts, applies. A hostcall that fails fails the request closed.
///
/// A reply is counted before it is sent; a forwarded request once its changes are applied, so
/// a request that fails closed half-way is counted only as a fault.
pub fn on_request<H: Host, K: KeyLookup + ?Sized>(host: &H, config: &Config, keys: &K, vm: &VmView<'_>) -> Flow {
    let flow = gather(host, config, vm.routes).map_err(|e| (e, false)).and_then(|Gathered { map, headers, tls_connection, route_scopes }| {
        let pseudo = |name: &str| map.get(name).and_then(|v| std::str::from_utf8(v).ok()).unwrap_or("");
        // The clock is read only for keys that can expire or are rate-limited; a failed read
        // fails them closed.
        let clock = || host.now_micros().map_or(i64::MAX, |us| i64::try_from(us / 1_000_000).unwrap_or(i64::MAX));
        let req = Request {
            method: pseudo(":method"),
            path: pseudo(":path"),
            authority: pseudo(":authority"),
            headers: &headers,
            tls_connection,
            route_scopes: route_scopes.as_deref(),
            now: &clock,
        };
        let now_us = || host.now_micros().ok();
        let mut plan = authorize::authorize(config, keys, &SharedBuckets(host), &req, &Context { now_us: &now_us, fleet: vm.fleet });
        count_bucket(vm, &plan.tally);
        let replying = matches!(plan.action, Action::Reply(_));
        if replying {
            count(host, &plan, &req, vm);
        }
        let flow = apply(host, &mut plan.action).map_err(|e| (e, plan.tally.counted == Counted::Fault))?;
        if !replying {
            count(host, &plan, &req, vm);
        }
        Ok(flow)
    });
    flow.unwrap_or_else(|(e, counted)| {
        host.log(LogLevel::Error, &format!("{e}; failing closed"));
        if !counted {
            vm.metrics.count_fault();
        }
        let _ = host.send_reply(&internal_error());
        Flow::Stop
    })
}

/// What a request is judged on, read from the host.
struct Gathered {
    /// The whole header map: the pseudo-headers are read from it in place.
    map: HeaderMap,
    /// The headers the core reads (`reads_header`), copied out, in order, duplicates kept.
    headers: Vec<(String, Vec<u8>)>,
    tls_connection: bool,
    route_scopes: Option<Rc<str>>,
}

/// The request's headers, and the properties the configuration asks for.
///
/// The header map is read whole, once: the contract removes every client-sent `x-keyward-*`
/// header, whatever its name, and tells one credential header sent twice from two different
/// ones, and neither shows through single-header reads (Envoy's `proxy_get_header_map_value`
/// returns only the first value). Only the headers the core reads are copied out of it.
fn gather<H: Host>(host: &H, config: &Config, routes: &RouteCache) -> Result<Gathered, HostError> {
    let map = host.request_headers()?;
    let mut headers = Vec::new();
    for (name, value) in map.iter() {
        // Envoy's codecs admit only token characters in names; a name that is not UTF-8 fails
        // the request closed rather than being skipped unseen.
        let name = std::str::from_utf8(name).map_err(|_| HostError { op: "a request header name", status: Status::ParseFailure })?;
        if reads_header(config, name) {
            headers.push((name.to_string(), value.to_vec()));
        }
    }
    let tls_connection = config.require_tls && host.property(&TLS_VERSION)?.is_some();
    let route_scopes = if config.route_metadata { routes.scopes(host)? } else { None };
    Ok(Gathered { map, headers, tls_connection, route_scopes })
}

/// What the rate limiter did: its counters, and the fleet's admissions.
fn count_bucket(vm: &VmView<'_>, t: &Tally<'_>) {
    let Some(b) = &t.bucket else { return };
    for counter in t.bucket_counters() {
        vm.metrics.count(counter);
    }
    match (vm.rates, b.fleet) {
        (Some(rates), Some(FleetCount::Admitted { urgent })) => rates.admitted(&b.bucket, b.limit, urgent),
        (Some(rates), Some(FleetCount::Refused)) => rates.refused(&b.bucket, b.limit),
        _ => {}
    }
}

/// What was decided: its counter, the key's usage, the log line.
fn count<H: Host>(host: &H, plan: &Plan<'_>, req: &Request<'_>, vm: &VmView<'_>) {
    let t = &plan.tally;
    vm.metrics.count(t.outcome_counter());
    if let Some(why) = &t.fault {
        host.log(LogLevel::Error, &format!("{why}; failing closed"));
    } else if vm.debug {
        host.log(LogLevel::Debug, &plan.describe(req));
    }
    if let Some(usage) = vm.usage {
        t.count_usage(usage, vm.now_secs);
    }
}

fn apply<H: Host>(host: &H, action: &mut Action<'_>) -> Result<Flow, HostError> {
    match action {
        Action::Reply(reply) => {
            host.send_reply(reply)?;
            Ok(Flow::Stop)
        }
        Action::Forward(forward) => {
            // Targeted changes, not a whole-map replacement: rebuilding the map cost Envoy about
            // twice as much as a removal and three additions (callgrind, instructions per request).
            for name in &forward.remove {
                host.set_request_header(name, None)?;
            }
            if let Some(path) = &forward.path {
                host.set_request_header(":path", Some(path))?;
            }
            for (name, value) in forward.identity_headers().into_iter().flatten() {
                host.add_request_header(name, value.as_bytes())?;
            }
            Ok(Flow::Continue(std::mem::take(&mut forward.response_headers)))
        }
    }
}
