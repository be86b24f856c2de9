//! The root context: one per VM. It loads the configuration, owns the VM's state, and on every
//! tick flushes counters, refreshes its view of shared data and gives the fetcher its turn.

use crate::fetcher::{self, FeedMetrics, Fetcher};
use crate::filter::{Metrics, RouteCache, VmView};
use crate::host::{EnvoyHost, Host, LogLevel, MetricKind};
use crate::http::Http;
use crate::shared::{self, RecordCache};
use keyward_core::fetch::State;
use keyward_core::fetch::rates::RateCounts;
use keyward_core::ratelimit::Fleet;
use keyward_core::usage::Usage;
use keyward_core::Config;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// Per-VM state every request of the VM uses.
pub struct VmState {
    pub config: Config,
    pub metrics: Metrics,
    debug: bool,
    /// The shared-data state as of the last tick.
    pub state: RefCell<State>,
    /// Key records read from shared data, dropped whenever the shared state moves.
    pub records: RecordCache,
    /// Requests with a control plane count usage here; the fetcher takes it once a second.
    usage: Usage,
    /// What this VM's requests admitted per rate-limit bucket; the fetcher takes it every tick.
    rates: RateCounts,
    /// Unix seconds as of the last tick: good enough for `last used`, free per request.
    pub now_secs: Cell<i64>,
    routes: RouteCache,
    /// The fleet as of the last tick (`keyward.fleet`).
    fleet: Cell<Fleet>,
    /// `keyward.vm_memory_bytes`: the sum of every VM's linear memory. Each VM adds the change
    /// in its own size on its tick (wasm memory never shrinks, so this shows growth, never reuse).
    vm_memory_gauge: u32,
    vm_memory_reported: Cell<u64>,
}

impl VmState {
    /// What a request uses; `count` with a control plane (usage and admissions are reported).
    pub fn view(&self, count: bool) -> VmView<'_> {
        VmView {
            metrics: &self.metrics,
            routes: &self.routes,
            debug: self.debug,
            usage: count.then_some(&self.usage),
            rates: count.then_some(&self.rates),
            now_secs: self.now_secs.get(),
            fleet: self.fleet.get(),
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

pub struct Root {
    context_id: u32,
    vm: Option<Rc<VmState>>,
    fetcher: Option<Fetcher>,
}

impl Root {
    pub fn new(context_id: u32) -> Root {
        Root { context_id, vm: None, fetcher: None }
    }

    /// Loads the configuration; `Err` says why Envoy must refuse it.
    pub fn configure<H: Host>(&mut self, host: &H) -> Result<(), String> {
        let bytes = host.plugin_configuration().map_err(|e| e.to_string())?;
        let config = Config::from_json(&bytes).map_err(|e| e.to_string())?;
        let metrics = Metrics::define(host).map_err(|e| e.to_string())?;
        let vm_memory_gauge = host.define_metric(MetricKind::Gauge, "keyward.vm_memory_bytes").map_err(|e| e.to_string())?;
        let source = match (&config.snapshot, &config.control_plane) {
            (Some(s), _) => format!("inline snapshot of {} keys", s.keys.len()),
            (None, Some(cp)) => format!("snapshot feed via cluster {}", cp.cluster),
            (None, None) => "no keys (no snapshot, no control_plane): keyed requests get 503".into(),
        };
        host.log(LogLevel::Info, &format!("configuration loaded: {} rules, {source}", config.rules.len()));
        if let Some(cp) = &config.control_plane {
            let feed_metrics = FeedMetrics::define(host).map_err(|e| e.to_string())?;
            // Each VM needs its own lease identity: RandomState draws its keys from WASI random_get.
            let seed = {
                use std::hash::{BuildHasher, Hasher};
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u64(host.now_millis().unwrap_or(0));
                h.write_u32(self.context_id);
                h.finish()
            };
            self.fetcher = Some(Fetcher::new(cp.clone(), config.implications.clone(), feed_metrics, seed));
        }
        // Every VM ticks: counters are flushed to Envoy on the tick, not per request.
        let tick = if config.control_plane.is_some() { fetcher::TICK } else { std::time::Duration::from_secs(1) };
        host.set_tick_period(tick).map_err(|e| e.to_string())?;
        self.vm = Some(Rc::new(VmState {
            debug: host.log_enabled(LogLevel::Debug),
            config,
            metrics,
            state: RefCell::new(State::default()),
            records: RecordCache::default(),
            usage: Usage::default(),
            rates: RateCounts::default(),
            now_secs: Cell::new(i64::try_from(host.now_millis().unwrap_or(0) / 1000).unwrap_or(0)),
            routes: RouteCache::default(),
            fleet: Cell::new(Fleet::default()),
            vm_memory_gauge,
            vm_memory_reported: Cell::new(0),
        }));
        Ok(())
    }

    /// The VM's state once configured (tests).
    #[cfg(test)]
    pub fn vm(&self) -> Option<&Rc<VmState>> {
        self.vm.as_ref()
    }

    fn tick<H: Host>(&mut self, host: &H) {
        let Some(vm) = &self.vm else { return };
        let now = host.now_millis().unwrap_or(0);
        let secs = i64::try_from(now / 1000).unwrap_or(0);
        // Route metadata may change with RDS: remember it until the second changes (a second at
        // most). Cleared every 25 ms tick, it missed on most requests of a quiet worker.
        if secs != vm.now_secs.get() {
            vm.routes.clear();
        }
        vm.now_secs.set(secs);
        if let Err(e) = vm.metrics.flush(host) {
            host.log(LogLevel::Warn, &format!("flushing counters: {e}"));
        }
        let memory = vm_memory_bytes();
        let grown = memory.saturating_sub(vm.vm_memory_reported.get());
        if grown > 0 && host.increment(vm.vm_memory_gauge, grown).is_ok() {
            vm.vm_memory_reported.set(memory);
        }
        let Some(f) = &mut self.fetcher else { return };
        match shared::read_state(host) {
            Ok(state) => {
                // Any applied change (or a page of one) may have touched a cached record.
                if !state.same_snapshot(&vm.state.borrow()) {
                    vm.records.clear();
                }
                *vm.state.borrow_mut() = state;
            }
            Err(e) => host.log(LogLevel::Warn, &format!("reading the shared state: {e}")),
        }
        match shared::read_fleet(host) {
            Ok(fleet) => vm.fleet.set(fleet),
            Err(e) => host.log(LogLevel::Warn, &format!("reading the fleet: {e}")),
        }
        f.on_tick(host, now, &vm.usage, &vm.rates);
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let now = EnvoyHost.now_millis().unwrap_or(0);
        if let Some(f) = &mut self.fetcher {
            f.on_http_call_response(&EnvoyHost, token_id, body_size, now);
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        EnvoyHost.log(LogLevel::Info, &format!("keyward {} starting", crate::VERSION));
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        match self.configure(&EnvoyHost) {
            Ok(()) => true,
            Err(e) => {
                // Envoy refuses the configuration as a whole; the log says which field and why.
                EnvoyHost.log(LogLevel::Error, &format!("rejecting configuration: {e}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        self.tick(&EnvoyHost);
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if let Some(f) = &mut self.fetcher {
            f.on_queue_ready(&EnvoyHost, queue_id);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http { vm: self.vm.clone(), response_headers: Vec::new() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
