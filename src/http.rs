//! The HTTP context: one per request. It finds the keys the request is judged against and hands
//! the request to `filter::on_request`.

use crate::filter::{self, Flow};
use crate::host::{EnvoyHost, Host, HostError, LogLevel};
use crate::root::VmState;
use crate::shared::{self, SharedKeys};
use keyward_core::response::internal_error;
use keyward_core::fetch::Keys;
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
    let mut keys = vm.state.borrow().keys(now_ms, cp.max_snapshot_age_secs);
    if keys != Keys::Whole {
        // Until the first load ends, look again on every request: each page of it counts at once.
        let fresh = shared::read_state(host)?;
        keys = fresh.keys(host.now_millis()?, cp.max_snapshot_age_secs);
        if !fresh.same_snapshot(&vm.state.borrow()) {
            vm.records.clear();
        }
        *vm.state.borrow_mut() = fresh;
    }
    // One small read per request keeps refusals monotonic across workers (see RecordCache).
    vm.records.sync(host, shared::generation(host)?)?;
    let keys = SharedKeys::new(host, keys, &vm.records);
    Ok(filter::on_request(host, c, &keys, &vm.view(true)))
}

/// One request's headers, judged and acted on; whatever fails, fails closed.
fn request<H: Host>(host: &H, vm: Option<&VmState>) -> Flow {
    let Some(vm) = vm else {
        // Unreachable: Envoy creates no stream on a VM whose on_configure failed.
        host.log(LogLevel::Error, "request before configuration; failing closed");
        let _ = host.send_reply(&internal_error());
        return Flow::Stop;
    };
    judge(host, vm).unwrap_or_else(|e| {
        host.log(LogLevel::Error, &format!("{e}; failing closed"));
        vm.metrics.count_fault();
        let _ = host.send_reply(&internal_error());
        Flow::Stop
    })
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let host = EnvoyHost;
        #[cfg(feature = "fault-injection")]
        fault_injection::maybe_trap(&host);
        let flow = request(&host, self.vm.as_deref());
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
        let trap = host.request_headers().is_ok_and(|h| h.iter().any(|(n, v)| n == b"x-keyward-fault" && v == b"trap"));
        if trap {
            #[cfg(target_arch = "wasm32")]
            core::arch::wasm32::unreachable();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FakeHost;
    use crate::root::Root;
    use keyward_core::{Digest, LocalReply};

    const NOW_MS: u64 = 1_800_000_000_000;

    fn configured(host: &FakeHost, config: serde_json::Value) -> Rc<VmState> {
        *host.config.borrow_mut() = config.to_string().into_bytes();
        host.set_now_ms(NOW_MS);
        let mut root = Root::new(1);
        root.configure(host).unwrap();
        Rc::clone(root.vm().unwrap())
    }

    /// Shared data as the fetcher leaves it after a complete snapshot.
    fn loaded(host: &FakeHost) {
        let state = keyward_core::fetch::State { loaded: true, applied: 1, last_heard_ms: NOW_MS, cursor: None };
        host.shared_set(shared::STATE_KEY, state.encode().as_bytes(), None).unwrap();
    }

    fn status(host: &FakeHost) -> Option<u32> {
        host.reply.borrow().as_ref().map(|r: &LocalReply| r.status)
    }

    fn code(host: &FakeHost) -> String {
        let reply = host.reply.borrow();
        let body: serde_json::Value = serde_json::from_str(&reply.as_ref().unwrap().body).unwrap();
        body["error"]["code"].as_str().unwrap_or("").to_string()
    }

    /// The fault path against an in-memory host: a record that cannot be decoded, or a
    /// shared-data read that fails, is a 500 `INTERNAL_ERROR` and counted, even with
    /// `fail_open`; only "no snapshot yet" is forwarded with `fail_open`.
    #[test]
    fn a_fault_fails_closed_whatever_fail_open_says() {
        for fail_open in [false, true] {
            let host = FakeHost::with_request(&[(":method", "GET"), (":path", "/v1/x"), ("x-api-key", "some-key")]);
            let vm = configured(&host, serde_json::json!({"fail_open": fail_open, "control_plane": {"cluster": "keyward"}}));
            // No snapshot yet: 503, or forwarded with fail_open.
            let flow = request(&host, Some(&vm));
            assert_eq!((flow.clone(), status(&host)), if fail_open { (Flow::Continue(vec![]), None) } else { (Flow::Stop, Some(503)) });
            // A state entry that cannot be decoded, before the first load.
            host.set_request(&[(":method", "GET"), (":path", "/v1/x"), ("x-api-key", "some-key")]);
            host.shared_set(shared::STATE_KEY, b"garbage", None).unwrap();
            assert_eq!((request(&host, Some(&vm)), status(&host)), (Flow::Stop, Some(500)), "fail_open {fail_open}");
            // Loaded, but the key's record is garbage.
            loaded(&host);
            host.shared_set(&shared::record_key(&Digest::of(b"some-key")), b"9\tgarbage", None).unwrap();
            host.set_request(&[(":method", "GET"), (":path", "/v1/x"), ("x-api-key", "some-key")]);
            assert_eq!(request(&host, Some(&vm)), Flow::Stop, "fail_open {fail_open}");
            assert_eq!((status(&host), code(&host)), (Some(500), "INTERNAL_ERROR".into()));
            assert!(!host.logged("failing closed").is_empty());
            // Shared data refusing the read.
            host.set_request(&[(":method", "GET"), (":path", "/v1/x"), ("x-api-key", "other-key")]);
            host.fail("get_shared_data");
            assert_eq!((request(&host, Some(&vm)), status(&host)), (Flow::Stop, Some(500)));
            host.heal();
            vm.metrics.flush(&host).unwrap();
            assert_eq!(host.metric("keyward.internal_errors"), Some(3));
        }
    }

    /// A hostcall that fails while the plan is applied fails the request closed too.
    #[test]
    fn a_hostcall_failing_mid_request_is_a_500() {
        let key = "good-key";
        let snapshot = serde_json::json!({"version": 1, "keys": [{"digest": Digest::of(key.as_bytes()).to_hex(), "id": "key_1", "agent": "a", "scopes": []}]});
        let host = FakeHost::with_request(&[(":method", "GET"), (":path", "/v1/x"), ("x-api-key", key), ("x-keyward-agent", "spoofed")]);
        let vm = configured(&host, serde_json::json!({"snapshot": snapshot}));
        assert_eq!(request(&host, Some(&vm)), Flow::Continue(vec![]));
        assert_eq!((host.request_header("x-api-key"), host.request_header("x-keyward-agent")), (None, Some("a".into())), "credential out, identity in");
        assert_eq!(host.request_header("x-keyward-key-id").as_deref(), Some("key_1"));
        for op in ["get_header_map_pairs", "add_map_value", "set_map_value"] {
            host.set_request(&[(":method", "GET"), (":path", "/v1/x"), ("x-api-key", key)]);
            host.fail(op);
            assert_eq!(request(&host, Some(&vm)), Flow::Stop, "{op}");
            host.heal();
            assert_eq!(status(&host), Some(500), "{op}");
        }
        // Each counted once, as a fault: never as allowed too.
        vm.metrics.flush(&host).unwrap();
        assert_eq!((host.metric("keyward.allowed"), host.metric("keyward.internal_errors")), (Some(1), Some(3)));
    }
}
