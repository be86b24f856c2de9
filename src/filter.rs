//! The HTTP filter: gathers the request, asks the core for a decision, and carries it out.

use crate::host::{self, Host, HostError};
use keyward_core::response::CODES;
use keyward_core::ratelimit::{self, Verdict};
use keyward_core::response::deprecation_headers;
use keyward_core::Denial;
use keyward_core::{decide, Config, Decision, KeyLookup, LocalReply, Request};
use proxy_wasm::types::LogLevel;

/// Identity headers the filter sets; every client-sent `x-keyward-*` header is removed first.
pub const IDENTITY_PREFIX: &str = "x-keyward-";
pub const KEY_ID_HEADER: &str = "x-keyward-key-id";
pub const AGENT_HEADER: &str = "x-keyward-agent";
pub const SCOPES_HEADER: &str = "x-keyward-scopes";

const ROUTE_SCOPES: [&str; 5] = ["xds", "route_metadata", "filter_metadata", "keyward", "scopes"];
const ROUTE_NAME: [&str; 2] = ["xds", "route_name"];
/// Most routes a VM remembers the metadata scopes of between ticks.
const ROUTE_CACHE_MAX: usize = 1024;

/// Route metadata scopes by route name, per VM, cleared on every tick. Reading the route's
/// metadata walks a protobuf on Envoy's side and was the dearest hostcall of a request; a route's
/// name is cheap. Unnamed routes are never cached: their name does not tell them apart.
#[derive(Debug, Default)]
pub struct RouteCache {
    entries: std::cell::RefCell<std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>>,
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
const TLS_VERSION: [&str; 2] = ["connection", "tls_version"];

/// Counter ids, defined once per VM. They appear as `wasmcustom.keyward.*` in Envoy's `/stats`.
///
/// Requests add to `pending` in the VM; the root context's tick flushes it to Envoy, so a
/// request makes no stats hostcall (counters lag by at most one tick).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub pending: std::cell::RefCell<Vec<(u32, u64)>>,
    pub allowed: u32,
    pub public: u32,
    pub fail_open: u32,
    pub internal_errors: u32,
    /// Indexed like [`CODES`].
    pub denied: [u32; CODES.len()],
    /// Requests by the number of CAS attempts their bucket update took: 1, 2, 3, 4 or more.
    pub rl_attempts: [u32; 4],
    /// Requests let through because the CAS retry bound was hit (fail open on contention).
    pub rl_contention_allowed: u32,
    /// Buckets written for the first time: flat once every key has been used.
    pub rl_buckets_created: u32,
}

impl Metrics {
    /// Counts one event, to be flushed on the next tick.
    pub fn count(&self, metric: u32) {
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

    pub fn define() -> Result<Metrics, HostError> {
        let mut denied = [0; CODES.len()];
        for (slot, code) in denied.iter_mut().zip(CODES) {
            *slot = host::define_counter(&format!("keyward.denied.{}", code.to_ascii_lowercase()))?;
        }
        Ok(Metrics {
            pending: Default::default(),
            allowed: host::define_counter("keyward.allowed")?,
            public: host::define_counter("keyward.public")?,
            fail_open: host::define_counter("keyward.fail_open")?,
            internal_errors: host::define_counter("keyward.internal_errors")?,
            denied,
            rl_attempts: [
                host::define_counter("keyward.rate_limit.cas_attempts_1")?,
                host::define_counter("keyward.rate_limit.cas_attempts_2")?,
                host::define_counter("keyward.rate_limit.cas_attempts_3")?,
                host::define_counter("keyward.rate_limit.cas_attempts_4_or_more")?,
            ],
            rl_contention_allowed: host::define_counter("keyward.rate_limit.contention_allowed")?,
            rl_buckets_created: host::define_counter("keyward.rate_limit.buckets_created")?,
        })
    }
}

/// What the filter did with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Forward it upstream; for an authenticated key, its id and the response headers to add.
    Continue(Option<Allowed>),
    /// A local reply was sent; stop the request.
    Replied,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub response_headers: Vec<(&'static str, String)>,
}

/// Per-VM usage counts by digest, for the fetcher's reports: allowed requests, the last use, and
/// refused ones by contract code. A request adds one without allocating; the key id is copied
/// once per key per flush. Bounded by the keys a VM sees in a second (flushed once a second).
#[derive(Debug, Default)]
pub struct Usage {
    counts: std::cell::RefCell<std::collections::HashMap<keyward_core::Digest, (crate::fetcher::KeyCounts, String)>>,
}

impl Usage {
    /// One allowed request.
    pub fn count(&self, digest: &keyward_core::Digest, key_id: &str, now_secs: i64) {
        self.with(digest, key_id, |c| {
            c.count += 1;
            c.last = c.last.max(now_secs);
        });
    }

    /// One refused request that presented this known key, by its index in [`CODES`].
    pub fn count_denied(&self, digest: &keyward_core::Digest, key_id: &str, code_index: usize) {
        self.with(digest, key_id, |c| {
            if let Some(n) = c.denied.get_mut(code_index) {
                *n += 1;
            }
        });
    }

    fn with(&self, digest: &keyward_core::Digest, key_id: &str, f: impl FnOnce(&mut crate::fetcher::KeyCounts)) {
        let mut counts = self.counts.borrow_mut();
        match counts.get_mut(digest) {
            Some((c, _)) => f(c),
            None => {
                let mut c = crate::fetcher::KeyCounts::default();
                f(&mut c);
                counts.insert(*digest, (c, key_id.to_string()));
            }
        }
    }

    /// Everything counted since the last call, by key id.
    pub fn take(&self) -> crate::fetcher::UsageCounts {
        let drained = std::mem::take(&mut *self.counts.borrow_mut());
        let mut out = crate::fetcher::UsageCounts::with_capacity(drained.len());
        for (_, (counts, id)) in drained {
            out.entry(id).or_default().add(&counts);
        }
        out
    }
}

/// The VM's state a request uses: counters, caches, usage counts, the tick's clock.
#[derive(Clone, Copy)]
pub struct PerVm<'a> {
    pub metrics: &'a Metrics,
    pub routes: &'a RouteCache,
    pub debug: bool,
    /// Where requests count usage (with a control plane): allowed ones, and refused ones of known keys.
    pub usage: Option<&'a Usage>,
    /// Unix seconds as of the last tick.
    pub now_secs: i64,
    /// The fleet this Envoy shares its rate limits with, as of the last tick.
    pub fleet: ratelimit::Fleet,
    /// Where requests count what their buckets admitted (with a control plane).
    pub rates: Option<&'a crate::fleet::RateCounts>,
}

/// Judges one request against `keys` and carries the decision out through `host`.
pub fn on_request<H: Host, K: KeyLookup + ?Sized>(
    host: &H,
    config: &Config,
    keys: &K,
    vm: &PerVm<'_>,
) -> Result<Outcome, HostError> {
    let PerVm { metrics, routes, debug, usage, now_secs, fleet, rates } = *vm;
    let headers = host.request_headers()?;
    let pseudo = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .unwrap_or("")
    };
    let tls_connection = config.require_tls && host.property(&TLS_VERSION)?.is_some();
    let route_scopes = if config.route_metadata { routes.scopes(host)? } else { None };
    let route_scopes = route_scopes.as_deref().and_then(|v| std::str::from_utf8(v).ok());
    // The clock is read only for keys that can expire; a failed read fails them closed.
    let clock = || host.now_unix().unwrap_or(i64::MAX);
    let req = Request {
        method: pseudo(":method"),
        path: pseudo(":path"),
        authority: pseudo(":authority"),
        headers: &headers,
        tls_connection,
        route_scopes,
        now: &clock,
    };
    let mut decision = decide(config, keys, &req);
    if matches!(decision, Decision::Fault) {
        // Fail closed: never forwarded, whatever `fail_open` says (the caller logs and counts).
        host.send_reply(&internal_error_reply())?;
        return Ok(Outcome::Replied);
    }
    let mut rate_headers = Vec::new();
    if let Decision::Allow(id) = &decision {
        if let (Some(limit), Some(bucket)) = (id.record.rate_limit, id.record.rate_bucket.as_deref()) {
            let store = host::SharedStore(host);
            let now_us = host.now_micros()?;
            let burst = ratelimit::burst_for(id.record.rate_burst, config.rate_limit_burst);
            let o = ratelimit::check(&store, bucket, now_us, limit, burst, fleet, config.rate_limit_max_attempts)?;
            metrics.count(metrics.rl_attempts[(o.attempts.max(1) as usize - 1).min(3)]);
            if o.contended {
                metrics.count(metrics.rl_contention_allowed);
            }
            if o.created {
                metrics.count(metrics.rl_buckets_created);
            }
            match o.verdict {
                Verdict::Allow { remaining, reset_us } => {
                    // Admissions are counted only for fleet-wide counts: a split needs none, and a
                    // request in split mode costs what it did before fleets.
                    if let Some(rates) = rates.filter(|_| fleet.global) {
                        rates.admitted(bucket, limit, crate::fleet::crossed_half(remaining, u64::from(limit.count)));
                    }
                    if config.rate_limit_headers {
                        rate_headers.extend(ratelimit::headers(limit, remaining, reset_us));
                    }
                }
                Verdict::Limit { retry_after_us, reset_us } => {
                    if let Some(rates) = rates.filter(|_| fleet.global) {
                        rates.refused(bucket, limit);
                    }
                    if config.rate_limit_headers {
                        rate_headers.extend(ratelimit::headers(limit, 0, reset_us));
                    }
                    let denial = Denial::RateLimited { retry_after_secs: ratelimit::whole_seconds_up(retry_after_us) };
                    if let Decision::Allow(id) = decision {
                        decision = Decision::DenyKey { digest: id.digest, record: id.record, denial };
                    }
                }
            }
        }
    }
    if let Some(denial) = decision.denial() {
        if debug {
            host::log(LogLevel::Debug, &format!("denied {} {} {}", denial.code(), req.method, req.path));
        }
        metrics.count(metrics.denied[denial.code_index()]);
        if let (Some(usage), Decision::DenyKey { digest, record, .. }) = (usage, &decision) {
            usage.count_denied(digest, &record.id, denial.code_index());
        }
        let mut reply = denial.reply(config);
        reply.headers.append(&mut rate_headers);
        host.send_reply(&reply)?;
        return Ok(Outcome::Replied);
    }
    let mut allowed = None;
    match decision {
        Decision::Allow(id) => {
            // Targeted changes, not a whole-map replacement: rebuilding the map cost Envoy about
            // twice as much as a removal and three additions (callgrind, instructions per request).
            // Spoofed x-keyward-* and the credential out (rare spoofs, usually one credential
            // header), the path without a query credential, the identity in.
            let mut gone: Vec<&str> = Vec::new();
            for (name, _) in &headers {
                let spoofed = name.starts_with(IDENTITY_PREFIX);
                let credential = config.strip_credential && id.credential_headers.iter().any(|h| h == name);
                // A removal takes every copy of a name: once per name.
                if (spoofed || credential) && !gone.contains(&name.as_str()) {
                    host.set_request_header(name, None)?;
                    gone.push(name);
                }
            }
            if let Some(path) = &id.stripped_path {
                host.set_request_header(":path", Some(path))?;
            }
            host.add_request_header(KEY_ID_HEADER, id.record.id.as_bytes())?;
            host.add_request_header(AGENT_HEADER, id.record.agent.as_bytes())?;
            host.add_request_header(SCOPES_HEADER, id.record.scopes_header.as_bytes())?;
            if debug {
                host::log(LogLevel::Debug, &format!("allowed key {} digest {}", id.record.id, id.digest.short()));
            }
            metrics.count(metrics.allowed);
            if let Some(usage) = usage {
                usage.count(&id.digest, &id.record.id, now_secs);
            }
            let mut response_headers = deprecation_headers(&id.record);
            response_headers.append(&mut rate_headers);
            allowed = Some(Allowed { response_headers });
        }
        Decision::FailOpen | Decision::Public | Decision::Deny(_) | Decision::DenyKey { .. } | Decision::Fault => {
            // Anything the client sent under our prefix is spoofed identity (rare: removed one by one).
            for (name, _) in headers.iter().filter(|(n, _)| n.starts_with(IDENTITY_PREFIX)) {
                host.set_request_header(name, None)?;
            }
            metrics.count(if matches!(decision, Decision::FailOpen) { metrics.fail_open } else { metrics.public });
        }
    }
    Ok(Outcome::Continue(allowed))
}

/// The reply sent when Envoy refuses a hostcall mid-request: fail closed, say nothing secret.
pub fn internal_error_reply() -> LocalReply {
    LocalReply {
        status: 500,
        headers: vec![("content-type", "application/json".to_string()), ("cache-control", "no-store".to_string())],
        body: r#"{"success":false,"error":{"code":"INTERNAL_ERROR","message":"The authentication filter failed; see Envoy's log.","details":{}}}"#.to_string(),
    }
}
