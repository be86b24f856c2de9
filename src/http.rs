//! The HTTP context: one per request. It finds the keys the request is judged against and hands
//! the request to `filter::on_request`.

use crate::filter::{self, Flow};
use crate::host::{EnvoyHost, Host, HostError, LogLevel};
use crate::root::VmState;
use crate::shared::{self, SharedKeys, State};
use keyward_core::response::internal_error;
use keyward_core::NoKeys;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::rc::Rc;

pub struct Http {
    pub vm: Option<Rc<VmState>>,
    pub response_headers: Vec<(&'static str, String)>,
}

impl Context for Http {}

/// Judges the request against the inline snapshot, no keys, or shared data.
fn judge<H: Host>(host: &H, vm: &VmState) -> Result<Flow, HostError> {
    let c = &vm.config;
    if let Some(snapshot) = &c.snapshot {
        return Ok(filter::on_request(host, c, snapshot, &vm.view(false)));
    }
    let Some(cp) = &c.control_plane else {
        return Ok(filter::on_request(host, c, &NoKeys, &vm.view(false)));
    };
    // The snapshot's age is judged against the tick's clock: no clock read per request.
    let now_ms = u64::try_from(vm.now_secs.get()).unwrap_or(0).saturating_mul(1000) + 999;
    let mut usable = vm.state.borrow().usable(now_ms, cp.max_snapshot_age_secs);
    if !usable {
        // Before the first load, look again on every request: the first snapshot counts at once.
        let fresh = State::read(host)?;
        usable = fresh.usable(host.now_millis()?, cp.max_snapshot_age_secs);
        if !fresh.same_snapshot(&vm.state.borrow()) {
            vm.records.clear();
        }
        *vm.state.borrow_mut() = fresh;
    }
    // One small read per request keeps refusals monotonic across workers (see RecordCache).
    vm.records.sync(host, shared::generation(host)?)?;
    let keys = SharedKeys::new(host, usable, &vm.records);
    Ok(filter::on_request(host, c, &keys, &vm.view(true)))
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let host = EnvoyHost;
        #[cfg(feature = "fault-injection")]
        fault_injection::maybe_trap(&host);
        let flow = match &self.vm {
            Some(vm) => judge(&host, vm).unwrap_or_else(|e| {
                host.log(LogLevel::Error, &format!("{e}; failing closed"));
                vm.metrics.count_fault();
                let _ = host.send_reply(&internal_error());
                Flow::Stop
            }),
            None => {
                // Unreachable: Envoy creates no stream on a VM whose on_configure failed.
                host.log(LogLevel::Error, "request before configuration; failing closed");
                let _ = host.send_reply(&internal_error());
                Flow::Stop
            }
        };
        match flow {
            Flow::Continue(headers) => {
                self.response_headers = headers;
                Action::Continue
            }
            Flow::Stop => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let host = EnvoyHost;
        for (name, value) in self.response_headers.drain(..) {
            if let Err(e) = host.add_response_header(name, &value) {
                host.log(LogLevel::Warn, &format!("adding {name}: {e}"));
            }
        }
        Action::Continue
    }
}

/// Test builds only (`--features fault-injection`, never the release module): a request with
/// `x-keyward-fault: trap` traps the VM, so the tests can watch `failure_policy: FAIL_RELOAD`.
#[cfg(feature = "fault-injection")]
mod fault_injection {
    use crate::host::Host;

    pub fn maybe_trap<H: Host>(host: &H) {
        let trap = host.request_headers().is_ok_and(|h| h.iter().any(|(n, v)| n == "x-keyward-fault" && v == b"trap"));
        if trap {
            #[cfg(target_arch = "wasm32")]
            core::arch::wasm32::unreachable();
        }
    }
}
