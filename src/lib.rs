//! keyward.wasm: the proxy-wasm shell around `keyward-core`.
//!
//! It translates between Envoy and the core and does nothing else: read the configuration,
//! gather each request's headers and properties, and carry out the core's decision.

pub mod filter;
pub mod host;

use filter::{Metrics, Outcome};
use keyward_core::Config;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        host::log(LogLevel::Critical, &format!("panic: {info}"));
    }));
    proxy_wasm::set_root_context(|_| Box::new(KeywardRoot::default()));
}}

/// Per-VM state shared with every request: the compiled configuration and counter ids.
struct Shared {
    config: Config,
    metrics: Metrics,
    debug: bool,
}

#[derive(Default)]
struct KeywardRoot {
    shared: Option<Rc<Shared>>,
}

impl Context for KeywardRoot {}

impl RootContext for KeywardRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        host::log(LogLevel::Info, &format!("keyward {VERSION} starting"));
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let loaded = host::plugin_configuration()
            .map_err(|e| e.to_string())
            .and_then(|bytes| Config::from_json(&bytes).map_err(|e| e.to_string()))
            .and_then(|config| Ok((config, Metrics::define().map_err(|e| e.to_string())?)));
        match loaded {
            Ok((config, metrics)) => {
                let keys = config.snapshot.as_ref().map(|s| s.keys.len());
                host::log(
                    LogLevel::Info,
                    &format!(
                        "configuration loaded: {} rules, inline snapshot: {}",
                        config.rules.len(),
                        keys.map_or("none".to_string(), |n| format!("{n} keys")),
                    ),
                );
                let debug = host::log_enabled(LogLevel::Debug);
                self.shared = Some(Rc::new(Shared { config, metrics, debug }));
                true
            }
            Err(e) => {
                // Envoy refuses the configuration as a whole; the log says which field and why.
                host::log(LogLevel::Error, &format!("rejecting configuration: {e}"));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(KeywardHttp { shared: self.shared.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct KeywardHttp {
    shared: Option<Rc<Shared>>,
}

impl Context for KeywardHttp {}

impl HttpContext for KeywardHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let env = host::Envoy;
        let Some(shared) = &self.shared else {
            // Unreachable: Envoy creates no stream on a VM whose on_configure failed. Fail closed.
            host::log(LogLevel::Error, "request before configuration");
            let _ = host::Host::send_reply(&env, &filter::internal_error_reply());
            return Action::Pause;
        };
        match filter::on_request(&env, &shared.config, &shared.metrics, shared.debug) {
            Ok(Outcome::Continue) => Action::Continue,
            Ok(Outcome::Replied) => Action::Pause,
            Err(e) => {
                host::log(LogLevel::Error, &format!("{e}; failing closed"));
                let _ = host::Host::increment(&env, shared.metrics.internal_errors);
                let _ = host::Host::send_reply(&env, &filter::internal_error_reply());
                Action::Pause
            }
        }
    }
}
