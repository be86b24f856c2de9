//! An in-memory host for unit tests: shared data with Envoy's CAS tokens, queues, callouts,
//! metrics, a log, a settable clock, and a request. Any hostcall can be made to fail.

use super::{CallResponse, HeaderMap, Host, HostError, MetricKind, Status};
use keyward_core::ratelimit::Versioned;
use keyward_core::LocalReply;
use proxy_wasm::types::LogLevel;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

/// A shared queue: its name and its messages.
pub type Queue = (String, VecDeque<Vec<u8>>);

/// One HTTP callout the code under test dispatched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    pub token: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

impl Dispatched {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// The fake host: one per simulated Envoy. Several "VMs" in a test (two fetchers, two record
/// caches) share one by reference, as Envoy's VMs share its shared data and queues.
#[derive(Debug, Default)]
pub struct FakeHost {
    pub headers: RefCell<Vec<(String, Vec<u8>)>>,
    pub response_headers: RefCell<Vec<(String, String)>>,
    pub reply: RefCell<Option<LocalReply>>,
    pub properties: RefCell<HashMap<Vec<String>, Vec<u8>>>,
    pub now_us: Cell<u64>,
    /// Shared data: value and CAS token. Like Envoy, every write takes a new token and an empty
    /// value reads as absent.
    pub shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: Cell<u32>,
    /// Shared-data reads so far.
    pub shared_reads: Cell<u64>,
    pub queues: RefCell<BTreeMap<u32, Queue>>,
    pub dispatched: RefCell<Vec<Dispatched>>,
    next_token: Cell<u32>,
    /// What `call_response` returns.
    pub response: RefCell<CallResponse>,
    pub tick: Cell<Option<Duration>>,
    pub metrics: RefCell<Vec<(MetricKind, String, u64)>>,
    pub logs: RefCell<Vec<(LogLevel, String)>>,
    pub config: RefCell<Vec<u8>>,
    /// Hostcalls (by the `op` name a `HostError` carries) that fail with `InternalFailure`.
    pub failing: RefCell<HashSet<&'static str>>,
}

impl FakeHost {
    pub fn new() -> FakeHost {
        FakeHost::default()
    }

    pub fn with_request(headers: &[(&str, &str)]) -> FakeHost {
        let host = FakeHost::default();
        host.set_request(headers);
        host
    }

    pub fn set_request(&self, headers: &[(&str, &str)]) {
        *self.headers.borrow_mut() = headers.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect();
        self.response_headers.borrow_mut().clear();
        *self.reply.borrow_mut() = None;
    }

    pub fn set_property(&self, path: &[&str], value: &[u8]) {
        self.properties.borrow_mut().insert(path.iter().map(|s| s.to_string()).collect(), value.to_vec());
    }

    pub fn set_now_ms(&self, ms: u64) {
        self.now_us.set(ms * 1000);
    }

    pub fn fail(&self, op: &'static str) {
        self.failing.borrow_mut().insert(op);
    }

    pub fn heal(&self) {
        self.failing.borrow_mut().clear();
    }

    fn check(&self, op: &'static str) -> Result<(), HostError> {
        if self.failing.borrow().contains(op) {
            return Err(HostError { op, status: Status::InternalFailure });
        }
        Ok(())
    }

    /// The value of a request header, if set once or more (the first).
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.headers.borrow().iter().find(|(n, _)| n == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// A metric's value by name.
    pub fn metric(&self, name: &str) -> Option<u64> {
        self.metrics.borrow().iter().find(|(_, n, _)| n == name).map(|m| m.2)
    }

    /// Every log line containing `needle`.
    pub fn logged(&self, needle: &str) -> Vec<String> {
        self.logs.borrow().iter().filter(|(_, m)| m.contains(needle)).map(|(_, m)| m.clone()).collect()
    }

    /// A shared-data entry's value as text.
    pub fn shared_text(&self, key: &str) -> Option<String> {
        self.shared.borrow().get(key).map(|(v, _)| String::from_utf8_lossy(v).into_owned())
    }

    /// Takes the callouts dispatched so far.
    pub fn take_dispatched(&self) -> Vec<Dispatched> {
        std::mem::take(&mut *self.dispatched.borrow_mut())
    }
}

impl Host for FakeHost {
    fn request_headers(&self) -> Result<HeaderMap, HostError> {
        self.check("get_header_map_pairs")?;
        Ok(HeaderMap::from_pairs(&self.headers.borrow()))
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
        self.check("set_map_value")?;
        let mut headers = self.headers.borrow_mut();
        headers.retain(|(n, _)| n != name);
        if let Some(v) = value {
            headers.push((name.to_string(), v.as_bytes().to_vec()));
        }
        Ok(())
    }

    fn add_request_header(&self, name: &str, value: &[u8]) -> Result<(), HostError> {
        self.check("add_map_value")?;
        self.headers.borrow_mut().push((name.to_string(), value.to_vec()));
        Ok(())
    }

    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        self.check("add_response_header")?;
        self.response_headers.borrow_mut().push((name.to_string(), value.to_string()));
        Ok(())
    }

    fn send_reply(&self, reply: &LocalReply) -> Result<(), HostError> {
        self.check("send_http_response")?;
        *self.reply.borrow_mut() = Some(reply.clone());
        Ok(())
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        self.check("get_property")?;
        let key: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        Ok(self.properties.borrow().get(&key).cloned())
    }

    fn now_micros(&self) -> Result<u64, HostError> {
        self.check("get_current_time")?;
        Ok(self.now_us.get())
    }

    fn shared_get(&self, key: &str) -> Result<Versioned, HostError> {
        self.check("get_shared_data")?;
        self.shared_reads.set(self.shared_reads.get() + 1);
        Ok(self.shared.borrow().get(key).map_or((None, None), |(v, cas)| ((!v.is_empty()).then(|| v.clone()), Some(*cas))))
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError> {
        self.check("set_shared_data")?;
        let mut map = self.shared.borrow_mut();
        if let Some(cas) = cas {
            if map.get(key).is_some_and(|(_, current)| *current != cas) {
                return Ok(false);
            }
        }
        let token = self.next_cas.get() + 1;
        self.next_cas.set(token);
        map.insert(key.to_string(), (value.to_vec(), token));
        Ok(true)
    }

    fn register_queue(&self, name: &str) -> Result<u32, HostError> {
        self.check("register_shared_queue")?;
        let mut queues = self.queues.borrow_mut();
        if let Some((id, _)) = queues.iter().find(|(_, (n, _))| n == name) {
            return Ok(*id);
        }
        let id = u32::try_from(queues.len()).unwrap_or(u32::MAX) + 1;
        queues.insert(id, (name.to_string(), VecDeque::new()));
        Ok(id)
    }

    fn resolve_queue(&self, _vm_id: &str, name: &str) -> Result<Option<u32>, HostError> {
        self.check("resolve_shared_queue")?;
        Ok(self.queues.borrow().iter().find(|(_, (n, _))| n == name).map(|(id, _)| *id))
    }

    fn enqueue(&self, queue: u32, value: &[u8]) -> Result<(), HostError> {
        self.check("enqueue_shared_queue")?;
        match self.queues.borrow_mut().get_mut(&queue) {
            Some((_, q)) => {
                q.push_back(value.to_vec());
                Ok(())
            }
            None => Err(HostError { op: "enqueue_shared_queue", status: Status::NotFound }),
        }
    }

    fn dequeue(&self, queue: u32) -> Result<Option<Vec<u8>>, HostError> {
        self.check("dequeue_shared_queue")?;
        Ok(self.queues.borrow_mut().get_mut(&queue).and_then(|(_, q)| q.pop_front()))
    }

    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], body: Option<&[u8]>, timeout: Duration) -> Result<u32, HostError> {
        self.check("dispatch_http_call")?;
        let token = self.next_token.get() + 1;
        self.next_token.set(token);
        self.dispatched.borrow_mut().push(Dispatched {
            token,
            cluster: cluster.to_string(),
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            body: body.map(<[u8]>::to_vec).unwrap_or_default(),
            timeout,
        });
        Ok(token)
    }

    fn call_response(&self, body_size: usize) -> Result<CallResponse, HostError> {
        self.check("get_buffer")?;
        let mut r = self.response.borrow().clone();
        r.body.truncate(body_size);
        Ok(r)
    }

    fn set_tick_period(&self, period: Duration) -> Result<(), HostError> {
        self.check("set_tick_period")?;
        self.tick.set(Some(period));
        Ok(())
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        self.check("define_metric")?;
        let mut metrics = self.metrics.borrow_mut();
        if let Some(i) = metrics.iter().position(|(_, n, _)| n == name) {
            return Ok(u32::try_from(i).unwrap_or(u32::MAX));
        }
        metrics.push((kind, name.to_string(), 0));
        Ok(u32::try_from(metrics.len() - 1).unwrap_or(u32::MAX))
    }

    fn increment(&self, metric: u32, n: u64) -> Result<(), HostError> {
        self.check("increment_metric")?;
        match self.metrics.borrow_mut().get_mut(metric as usize) {
            Some(m) => {
                m.2 += n;
                Ok(())
            }
            None => Err(HostError { op: "increment_metric", status: Status::NotFound }),
        }
    }

    fn record(&self, metric: u32, value: u64) -> Result<(), HostError> {
        self.check("record_metric")?;
        match self.metrics.borrow_mut().get_mut(metric as usize) {
            Some(m) => {
                m.2 = value;
                Ok(())
            }
            None => Err(HostError { op: "record_metric", status: Status::NotFound }),
        }
    }

    fn log(&self, level: LogLevel, message: &str) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }

    fn log_enabled(&self, _level: LogLevel) -> bool {
        true
    }

    fn plugin_configuration(&self) -> Result<Vec<u8>, HostError> {
        self.check("get_buffer")?;
        Ok(self.config.borrow().clone())
    }
}
