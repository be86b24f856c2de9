//! keyward.wasm: the proxy-wasm shell around `keyward-core`.
//!
//! It translates between Envoy and the core and does nothing else: read the configuration,
//! gather each request's headers and properties, carry out the core's decision, and, with a
//! control plane, keep the snapshot in shared data current (`fetcher`, `shared`).

pub mod fetcher;
pub mod filter;
pub mod fleet;
pub mod host;
pub mod shared;

use fetcher::{FeedMetrics, Fetcher};
use filter::{Metrics, Outcome};
use host::Host as _;
use keyward_core::{Config, NoKeys};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use shared::{SharedKeys, State};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        host::log(LogLevel::Critical, &format!("panic: {info}"));
    }));
    proxy_wasm::set_root_context(|context_id| Box::new(KeywardRoot { context_id, ..KeywardRoot::default() }));
}}

/// Per-VM state shared with every request: the compiled configuration, counter ids, this
/// worker's view of the shared snapshot state, and its usage counts.
struct Shared {
    config: Config,
    metrics: Metrics,
    debug: bool,
    /// The shared-data state as of the last tick.
    state: RefCell<State>,
    /// Requests with a control plane count usage here; the tick hands it to the fetcher.
    usage: filter::Usage,
    /// Those counts by key id, until the fetcher takes them (once a second).
    usage_by_id: RefCell<fetcher::UsageCounts>,
    count_usage: bool,
    /// Key records read from shared data, per VM, dropped whenever the shared state moves.
    records: shared::RecordCache,
    /// Unix seconds as of the last tick: good enough for `last used`, free per request.
    now_secs: Cell<i64>,
    routes: filter::RouteCache,
    /// What this VM's requests admitted per rate-limit bucket; the tick hands it to the fetcher.
    rates: fleet::RateCounts,
    /// The fleet as of the last tick (`keyward.fleet`).
    fleet: Cell<keyward_core::ratelimit::Fleet>,
    /// `keyward.vm_memory_bytes`: the sum of every VM's linear memory. Each VM adds the change
    /// in its own size on its tick (wasm memory never shrinks, so this shows growth, never reuse).
    vm_memory_gauge: u32,
    vm_memory_reported: Cell<u64>,
}

impl Shared {
    fn per_vm(&self, count_usage: bool) -> filter::PerVm<'_> {
        filter::PerVm {
            metrics: &self.metrics,
            routes: &self.routes,
            debug: self.debug,
            usage: count_usage.then_some(&self.usage),
            now_secs: self.now_secs.get(),
            fleet: self.fleet.get(),
            rates: count_usage.then_some(&self.rates),
        }
    }
}

/// This VM's linear memory in bytes (0 off wasm, for the native unit tests).
fn vm_memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        (core::arch::wasm32::memory_size(0) as u64).saturating_mul(65_536)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}

#[derive(Default)]
struct KeywardRoot {
    context_id: u32,
    shared: Option<Rc<Shared>>,
    fetcher: Option<Fetcher>,
}

impl Context for KeywardRoot {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let now = host::now_millis().unwrap_or(0);
        if let Some(f) = &mut self.fetcher {
            f.on_http_call_response(token_id, body_size, now);
        }
    }
}

impl RootContext for KeywardRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        host::log(LogLevel::Info, &format!("keyward {VERSION} starting"));
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let loaded = host::plugin_configuration()
            .map_err(|e| e.to_string())
            .and_then(|bytes| Config::from_json(&bytes).map_err(|e| e.to_string()))
            .and_then(|config| Ok((config, Metrics::define().map_err(|e| e.to_string())?)))
            .and_then(|(config, metrics)| Ok((config, metrics, host::define_gauge("keyward.vm_memory_bytes").map_err(|e| e.to_string())?)));
        let (config, metrics, vm_memory_gauge) = match loaded {
            Ok(v) => v,
            Err(e) => {
                // Envoy refuses the configuration as a whole; the log says which field and why.
                host::log(LogLevel::Error, &format!("rejecting configuration: {e}"));
                return false;
            }
        };
        let source = match (&config.snapshot, &config.control_plane) {
            (Some(s), _) => format!("inline snapshot of {} keys", s.keys.len()),
            (None, Some(cp)) => format!("snapshot feed via cluster {}", cp.cluster),
            (None, None) => "no keys (no snapshot, no control_plane): keyed requests get 503".into(),
        };
        host::log(LogLevel::Info, &format!("configuration loaded: {} rules, {source}", config.rules.len()));
        if let Some(cp) = &config.control_plane {
            let feed_metrics = match FeedMetrics::define() {
                Ok(m) => m,
                Err(e) => {
                    host::log(LogLevel::Error, &format!("rejecting configuration: {e}"));
                    return false;
                }
            };
            // Each VM needs its own lease identity: RandomState draws its keys from WASI random_get.
            let seed = {
                use std::hash::{BuildHasher, Hasher};
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u64(host::now_millis().unwrap_or(0));
                h.write_u32(self.context_id);
                h.finish()
            };
            self.fetcher = Some(Fetcher::new(cp.clone(), config.implications.clone(), feed_metrics, seed));
        }
        // Every VM ticks: counters are flushed to Envoy on the tick, not per request.
        let tick = if config.control_plane.is_some() { fetcher::TICK } else { std::time::Duration::from_secs(1) };
        if let Err(e) = host::set_tick_period(tick) {
            host::log(LogLevel::Error, &format!("rejecting configuration: {e}"));
            return false;
        }
        let debug = host::log_enabled(LogLevel::Debug);
        let count_usage = config.control_plane.is_some();
        self.shared = Some(Rc::new(Shared {
            config,
            metrics,
            debug,
            state: RefCell::new(State::default()),
            usage: filter::Usage::default(),
            usage_by_id: RefCell::new(fetcher::UsageCounts::new()),
            records: shared::RecordCache::default(),
            count_usage,
            now_secs: Cell::new(i64::try_from(host::now_millis().unwrap_or(0) / 1000).unwrap_or(0)),
            routes: filter::RouteCache::default(),
            rates: fleet::RateCounts::default(),
            fleet: Cell::new(keyward_core::ratelimit::Fleet::default()),
            vm_memory_gauge,
            vm_memory_reported: Cell::new(0),
        }));
        true
    }

    fn on_tick(&mut self) {
        let now = host::now_millis().unwrap_or(0);
        if let Some(shared) = &self.shared {
            shared.now_secs.set(i64::try_from(now / 1000).unwrap_or(0));
            // Route metadata may change with RDS: remember it for one tick at most.
            shared.routes.clear();
            if let Err(e) = shared.metrics.flush(&host::Envoy) {
                host::log(LogLevel::Warn, &format!("flushing counters: {e}"));
            }
            let memory = vm_memory_bytes();
            let grown = memory.saturating_sub(shared.vm_memory_reported.get());
            if grown > 0 && host::Envoy.increment(shared.vm_memory_gauge, grown).is_ok() {
                shared.vm_memory_reported.set(memory);
            }
            if let Some(f) = &mut self.fetcher {
                match State::read(&host::Envoy) {
                    Ok(state) => {
                        // Any applied change (or a page of one) may have touched a cached record.
                        if !state.same_snapshot(&shared.state.borrow()) {
                            shared.records.clear();
                        }
                        *shared.state.borrow_mut() = state;
                    }
                    Err(e) => host::log(LogLevel::Warn, &format!("reading the shared state: {e}")),
                }
                match fleet::read_fleet(&host::Envoy) {
                    Ok(fleet) => shared.fleet.set(fleet),
                    Err(e) => host::log(LogLevel::Warn, &format!("reading the fleet: {e}")),
                }
                fetcher::merge(&mut shared.usage_by_id.borrow_mut(), shared.usage.take());
                f.on_tick(now, &shared.usage_by_id, &shared.rates);
            }
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if let Some(f) = &mut self.fetcher {
            f.on_queue_ready(queue_id);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(KeywardHttp { shared: self.shared.clone(), response_headers: Vec::new() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct KeywardHttp {
    shared: Option<Rc<Shared>>,
    response_headers: Vec<(&'static str, String)>,
}

impl Context for KeywardHttp {}

impl KeywardHttp {
    fn judge(&self, shared: &Shared) -> Result<Outcome, host::HostError> {
        let env = host::Envoy;
        let c = &shared.config;
        if let Some(snapshot) = &c.snapshot {
            return filter::on_request(&env, c, snapshot, &shared.per_vm(false));
        }
        let Some(cp) = &c.control_plane else {
            return filter::on_request(&env, c, &NoKeys, &shared.per_vm(false));
        };
        // The snapshot's age is judged against the tick's clock: no clock read per request.
        let now_ms = u64::try_from(shared.now_secs.get()).unwrap_or(0).saturating_mul(1000) + 999;
        let mut usable = shared.state.borrow().usable(now_ms, cp.max_snapshot_age_secs);
        if !usable {
            // Before the first load, look again on every request: the first snapshot counts at once.
            let fresh = State::read(&env)?;
            usable = fresh.usable(host::now_millis()?, cp.max_snapshot_age_secs);
            if !fresh.same_snapshot(&shared.state.borrow()) {
                shared.records.clear();
            }
            *shared.state.borrow_mut() = fresh;
        }
        // One small read per request keeps refusals monotonic across workers (see RecordCache).
        shared.records.sync(&env, shared::generation(&env)?)?;
        let keys = SharedKeys::new(&env, usable, &shared.records);
        let outcome = filter::on_request(&env, c, &keys, &shared.per_vm(shared.count_usage))?;
        if keys.fault.get() {
            host::log(LogLevel::Error, "a shared-data key record could not be read; failing closed");
            shared.metrics.count(shared.metrics.internal_errors);
        }
        Ok(outcome)
    }
}

impl HttpContext for KeywardHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let env = host::Envoy;
        let Some(shared) = self.shared.clone() else {
            // Unreachable: Envoy creates no stream on a VM whose on_configure failed. Fail closed.
            host::log(LogLevel::Error, "request before configuration");
            let _ = env.send_reply(&filter::internal_error_reply());
            return Action::Pause;
        };
        #[cfg(feature = "fault-injection")]
        fault_injection::maybe_trap();
        match self.judge(&shared) {
            Ok(Outcome::Continue(allowed)) => {
                if let Some(a) = allowed {
                    self.response_headers = a.response_headers;
                }
                Action::Continue
            }
            Ok(Outcome::Replied) => Action::Pause,
            Err(e) => {
                host::log(LogLevel::Error, &format!("{e}; failing closed"));
                shared.metrics.count(shared.metrics.internal_errors);
                let _ = env.send_reply(&filter::internal_error_reply());
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for (name, value) in self.response_headers.drain(..) {
            if let Err(e) = host::add_response_header(name, &value) {
                host::log(LogLevel::Warn, &format!("adding {name}: {e}"));
            }
        }
        Action::Continue
    }
}

/// Test builds only (`--features fault-injection`, never the release module): a request with
/// `x-keyward-fault: trap` traps the VM, so the tests can watch `failure_policy: FAIL_RELOAD`.
#[cfg(feature = "fault-injection")]
mod fault_injection {
    pub fn maybe_trap() {
        if let Ok(Some(v)) = proxy_wasm::hostcalls::get_map_value(proxy_wasm::types::MapType::HttpRequestHeaders, "x-keyward-fault") {
            if v == "trap" {
                #[cfg(target_arch = "wasm32")]
                core::arch::wasm32::unreachable();
            }
        }
    }
}
