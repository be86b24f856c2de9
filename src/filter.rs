//! The request path: gather what the core needs, call [`keyward_core::authorize`], count its
//! tally, apply its plan. Nothing here decides anything the contract says.

use crate::fleet::RateCounts;
use crate::host::{Host, HostError, LogLevel, MetricKind, SharedBuckets};
use keyward_core::authorize::{self, Action, Context, Counted, FleetCount, Forward, Plan};
use keyward_core::ratelimit::Fleet;
use keyward_core::response::{internal_error, CODES};
use keyward_core::usage::Usage;
use keyward_core::{Config, KeyLookup, Request};
use std::cell::RefCell;
use std::collections::HashMap;

const ROUTE_SCOPES: [&str; 5] = ["xds", "route_metadata", "filter_metadata", "keyward", "scopes"];
const ROUTE_NAME: [&str; 2] = ["xds", "route_name"];
const TLS_VERSION: [&str; 2] = ["connection", "tls_version"];
/// Most routes a VM remembers the metadata scopes of between ticks.
const ROUTE_CACHE_MAX: usize = 1024;

/// Route metadata scopes by route name, per VM, cleared on every tick. Reading the route's
/// metadata walks a protobuf on Envoy's side and was the dearest hostcall of a request; a route's
/// name is cheap. Unnamed routes are never cached: their name does not tell them apart.
#[derive(Debug, Default)]
pub struct RouteCache {
    entries: RefCell<HashMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl RouteCache {
    pub fn clear(&self) {
        self.entries.borrow_mut().clear();
    }

    fn scopes<H: Host>(&self, host: &H) -> Result<Option<Vec<u8>>, HostError> {
        let name = host.property(&ROUTE_NAME)?.filter(|n| !n.is_empty());
        let Some(name) = name else {
            return host.property(&ROUTE_SCOPES);
        };
        if let Some(hit) = self.entries.borrow().get(&name) {
            return Ok(hit.clone());
        }
        let scopes = host.property(&ROUTE_SCOPES)?;
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= ROUTE_CACHE_MAX {
            entries.clear();
        }
        entries.insert(name, scopes.clone());
        Ok(scopes)
    }
}

/// Counter ids, defined once per VM. They appear as `wasmcustom.keyward.*` in Envoy's `/stats`.
///
/// Requests add to `pending` in the VM; the root context's tick flushes it to Envoy, so a
/// request makes no stats hostcall (counters lag by at most one tick).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pending: RefCell<Vec<(u32, u64)>>,
    allowed: u32,
    public: u32,
    fail_open: u32,
    internal_errors: u32,
    /// Indexed like [`CODES`].
    denied: [u32; CODES.len()],
    /// Requests by the number of CAS attempts their bucket update took: 1, 2, 3, 4 or more.
    rl_attempts: [u32; 4],
    /// Requests let through because the CAS retry bound was hit (fail open on contention).
    rl_contention_allowed: u32,
    /// Buckets written for the first time: flat once every key has been used.
    rl_buckets_created: u32,
}

impl Metrics {
    pub fn define<H: Host>(host: &H) -> Result<Metrics, HostError> {
        let counter = |name: &str| host.define_metric(MetricKind::Counter, name);
        let mut denied = [0; CODES.len()];
        for (slot, code) in denied.iter_mut().zip(CODES) {
            *slot = counter(&format!("keyward.denied.{}", code.to_ascii_lowercase()))?;
        }
        Ok(Metrics {
            pending: RefCell::default(),
            allowed: counter("keyward.allowed")?,
            public: counter("keyward.public")?,
            fail_open: counter("keyward.fail_open")?,
            internal_errors: counter("keyward.internal_errors")?,
            denied,
            rl_attempts: [
                counter("keyward.rate_limit.cas_attempts_1")?,
                counter("keyward.rate_limit.cas_attempts_2")?,
                counter("keyward.rate_limit.cas_attempts_3")?,
                counter("keyward.rate_limit.cas_attempts_4_or_more")?,
            ],
            rl_contention_allowed: counter("keyward.rate_limit.contention_allowed")?,
            rl_buckets_created: counter("keyward.rate_limit.buckets_created")?,
        })
    }

    /// One request that failed closed.
    pub fn count_fault(&self) {
        self.count(self.internal_errors);
    }

    /// Counts one event, to be flushed on the next tick.
    fn count(&self, metric: u32) {
        let mut pending = self.pending.borrow_mut();
        match pending.iter_mut().find(|(id, _)| *id == metric) {
            Some((_, n)) => *n += 1,
            None => pending.push((metric, 1)),
        }
    }

    fn counted(&self, counted: Counted) -> u32 {
        match counted {
            Counted::Allowed => self.allowed,
            Counted::Public => self.public,
            Counted::FailOpen => self.fail_open,
            Counted::Fault => self.internal_errors,
            Counted::Denied(i) => self.denied.get(i).copied().unwrap_or(self.internal_errors),
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
pub fn on_request<H: Host, K: KeyLookup + ?Sized>(host: &H, config: &Config, keys: &K, vm: &VmView<'_>) -> Flow {
    let flow = gather(host, config, vm.routes).and_then(|(headers, tls_connection, route_scopes)| {
        let pseudo = |name: &str| headers.iter().find(|(n, _)| n == name).and_then(|(_, v)| std::str::from_utf8(v).ok()).unwrap_or("");
        // The clock is read only for keys that can expire or are rate-limited; a failed read
        // fails them closed.
        let clock = || host.now_micros().map_or(i64::MAX, |us| i64::try_from(us / 1_000_000).unwrap_or(i64::MAX));
        let req = Request {
            method: pseudo(":method"),
            path: pseudo(":path"),
            authority: pseudo(":authority"),
            headers: &headers,
            tls_connection,
            route_scopes: route_scopes.as_deref().and_then(|v| std::str::from_utf8(v).ok()),
            now: &clock,
        };
        let now_us = || host.now_micros().ok();
        let plan = authorize::authorize(config, keys, &SharedBuckets(host), &req, &Context { now_us: &now_us, fleet: vm.fleet });
        tally(host, &plan, &req, vm);
        apply(host, plan.action)
    });
    flow.unwrap_or_else(|e| {
        host.log(LogLevel::Error, &format!("{e}; failing closed"));
        vm.metrics.count(vm.metrics.internal_errors);
        let _ = host.send_reply(&internal_error());
        Flow::Stop
    })
}

type Gathered = (Vec<(String, Vec<u8>)>, bool, Option<Vec<u8>>);

/// The request's headers, and the properties the configuration asks for.
fn gather<H: Host>(host: &H, config: &Config, routes: &RouteCache) -> Result<Gathered, HostError> {
    let headers = host.request_headers()?;
    let tls_connection = config.require_tls && host.property(&TLS_VERSION)?.is_some();
    let route_scopes = if config.route_metadata { routes.scopes(host)? } else { None };
    Ok((headers, tls_connection, route_scopes))
}

fn tally<H: Host>(host: &H, plan: &Plan<'_>, req: &Request<'_>, vm: &VmView<'_>) {
    let t = &plan.tally;
    let m = vm.metrics;
    m.count(m.counted(t.counted));
    if let Some(why) = &t.fault {
        host.log(LogLevel::Error, &format!("{why}; failing closed"));
    } else if vm.debug {
        host.log(LogLevel::Debug, &plan.describe(req));
    }
    if let Some(usage) = vm.usage {
        t.count_usage(usage, vm.now_secs);
    }
    if let Some(b) = &t.bucket {
        m.count(m.rl_attempts[(b.attempts.max(1) as usize - 1).min(3)]);
        if b.contended {
            m.count(m.rl_contention_allowed);
        }
        if b.created {
            m.count(m.rl_buckets_created);
        }
        match (vm.rates, b.fleet) {
            (Some(rates), Some(FleetCount::Admitted { urgent })) => rates.admitted(&b.bucket, b.limit, urgent),
            (Some(rates), Some(FleetCount::Refused)) => rates.refused(&b.bucket, b.limit),
            _ => {}
        }
    }
}

fn apply<H: Host>(host: &H, action: Action<'_>) -> Result<Flow, HostError> {
    match action {
        Action::Reply(reply) => {
            host.send_reply(&reply)?;
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
            let Forward { response_headers, .. } = forward;
            Ok(Flow::Continue(response_headers))
        }
    }
}
