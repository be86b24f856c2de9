//! `authorize`: one request's complete plan. The shell gathers the request, calls this, and
//! applies what it returns; every rule of the contract is decided here.
//!
//! A plan is either a local reply (status, body, headers) or the changes to forward the request
//! with: headers to remove (spoofed identity, the credential), a `:path` without a query
//! credential, the identity headers to add, and the response headers to add later (RateLimit
//! fields, Deprecation/Sunset). Beside it, a [`Tally`]: what the shell counts (its counters, the
//! key's usage, the bucket's admissions).

use crate::config::Config;
use crate::decision::{decide, Decision, Denial, KeyLookup, Request};
use crate::digest::Digest;
use crate::ratelimit::{self, BucketStore, Fleet, Verdict};
use crate::response::{deprecation_headers, internal_error, LocalReply};
use crate::snapshot::{KeyRecord, RateLimit};
use crate::usage::Usage;
use std::borrow::Cow;

/// Identity headers the filter sets; every client-sent `x-keyward-*` header is removed first.
pub const IDENTITY_PREFIX: &str = "x-keyward-";
pub const KEY_ID_HEADER: &str = "x-keyward-key-id";
pub const AGENT_HEADER: &str = "x-keyward-agent";
pub const SCOPES_HEADER: &str = "x-keyward-scopes";

/// What the shell knows besides the request: its clock for rate limits, the fleet, and whether
/// it counts usage and admissions (with a control plane).
#[derive(Clone, Copy)]
pub struct Context<'a> {
    /// Microseconds since the Unix epoch; read only for a rate-limited key. `None`: the clock
    /// could not be read (a fault).
    pub now_us: &'a dyn Fn() -> Option<u64>,
    pub fleet: Fleet,
}

/// The plan for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<'s> {
    pub action: Action<'s>,
    pub tally: Tally<'s>,
}

// Returned by value once per request; boxing `Forward` would add an allocation to the hot path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<'s> {
    /// Send this and stop the request.
    Reply(LocalReply),
    Forward(Forward<'s>),
}

/// How to forward a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Forward<'s> {
    /// Request headers to remove, every copy, each name once.
    pub remove: Vec<String>,
    /// The replacement `:path`, when the credential came in the query string.
    pub path: Option<String>,
    /// The authenticated key, whose identity headers are added ([`Forward::identity_headers`]).
    pub identity: Option<Cow<'s, KeyRecord>>,
    /// Response headers to add when the upstream answers.
    pub response_headers: Vec<(&'static str, String)>,
}

impl Forward<'_> {
    /// The identity headers to add, in order.
    pub fn identity_headers(&self) -> Option<[(&'static str, &str); 3]> {
        let r = self.identity.as_deref()?;
        Some([(KEY_ID_HEADER, r.id.as_str()), (AGENT_HEADER, r.agent.as_str()), (SCOPES_HEADER, r.scopes_header.as_str())])
    }
}

/// The filter's counters, by index, and their names after the shell's stats prefix
/// (`wasmcustom.` in the wasm shell): `keyward.allowed`, `keyward.denied.<code>`, ...
pub mod counter {
    use crate::response::CODES;

    pub const ALLOWED: usize = 0;
    pub const PUBLIC: usize = 1;
    pub const FAIL_OPEN: usize = 2;
    /// Requests that failed closed (500 `INTERNAL_ERROR`).
    pub const INTERNAL_ERRORS: usize = 3;
    /// Refusals, indexed like [`CODES`] from here.
    pub const DENIED: usize = 4;
    /// Rate-limited requests by the CAS attempts their bucket took: 1, 2, 3, 4 or more.
    pub const CAS_ATTEMPTS: usize = DENIED + CODES.len();
    /// Admitted because the CAS retry bound was hit (fail open on contention).
    pub const CONTENTION_ALLOWED: usize = CAS_ATTEMPTS + 4;
    /// Buckets written for the first time: flat once every key has been used.
    pub const BUCKETS_CREATED: usize = CONTENTION_ALLOWED + 1;
    pub const COUNT: usize = BUCKETS_CREATED + 1;

    /// Every counter's name, by index.
    pub fn names() -> Vec<String> {
        let mut names: Vec<String> = ["allowed", "public", "fail_open", "internal_errors"].iter().map(|n| format!("keyward.{n}")).collect();
        names.extend(CODES.iter().map(|c| format!("keyward.denied.{}", c.to_ascii_lowercase())));
        names.extend(["1", "2", "3", "4_or_more"].iter().map(|n| format!("keyward.rate_limit.cas_attempts_{n}")));
        names.push("keyward.rate_limit.contention_allowed".into());
        names.push("keyward.rate_limit.buckets_created".into());
        names
    }
}

/// Which of the filter's counters a request adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Allowed,
    Public,
    FailOpen,
    /// Refused, by index in [`crate::response::CODES`].
    Denied(usize),
    /// Failed closed (500 `INTERNAL_ERROR`).
    Fault,
}

/// A known key's usage: allowed, or refused by code index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUse {
    Allowed,
    Denied(usize),
}

/// What the rate limiter did, for the shell's counters and the fleet's counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketTally {
    pub bucket: String,
    pub limit: RateLimit,
    pub attempts: u32,
    pub contended: bool,
    pub created: bool,
    /// Counted for the fleet (global mode only: a split needs no counts): admitted (with
    /// whether the admission took the bucket past half, the early push), or refused.
    pub fleet: Option<FleetCount>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetCount {
    Admitted { urgent: bool },
    Refused,
}

/// What the shell counts for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally<'s> {
    pub counted: Counted,
    /// The key's usage, for a request that presented a known key.
    pub key: Option<(Digest, Cow<'s, str>, KeyUse)>,
    pub bucket: Option<BucketTally>,
    /// Why the request failed closed, for the log.
    pub fault: Option<String>,
}

impl<'s> Tally<'s> {
    fn counted(counted: Counted) -> Tally<'s> {
        Tally { counted, key: None, bucket: None, fault: None }
    }

    /// The counter of what was decided (an index into [`counter::names`]).
    pub fn outcome_counter(&self) -> usize {
        match self.counted {
            Counted::Allowed => counter::ALLOWED,
            Counted::Public => counter::PUBLIC,
            Counted::FailOpen => counter::FAIL_OPEN,
            Counted::Fault => counter::INTERNAL_ERRORS,
            Counted::Denied(i) => counter::DENIED + i,
        }
    }

    /// The rate limiter's counters this request adds one to.
    pub fn bucket_counters(&self) -> impl Iterator<Item = usize> {
        let b = self.bucket.as_ref();
        let attempts = b.map(|b| counter::CAS_ATTEMPTS + (b.attempts.max(1) as usize - 1).min(3));
        let contended = b.filter(|b| b.contended).map(|_| counter::CONTENTION_ALLOWED);
        let created = b.filter(|b| b.created).map(|_| counter::BUCKETS_CREATED);
        [attempts, contended, created].into_iter().flatten()
    }

    /// Adds the key's use to `usage` (allowed at `now_secs`).
    pub fn count_usage(&self, usage: &Usage, now_secs: i64) {
        match &self.key {
            Some((digest, id, KeyUse::Allowed)) => usage.allowed(digest, id, now_secs),
            Some((digest, id, KeyUse::Denied(code))) => usage.denied(digest, id, *code),
            None => {}
        }
    }
}

impl<'s> Plan<'s> {
    /// Fail closed: 500 `INTERNAL_ERROR`, never forwarded, whatever `fail_open` says.
    pub fn fault(why: impl Into<String>) -> Plan<'s> {
        Plan { action: Action::Reply(internal_error()), tally: Tally { fault: Some(why.into()), ..Tally::counted(Counted::Fault) } }
    }

    /// One line for the debug log: what was decided, never the credential (the path is logged
    /// without its query, which may carry one).
    pub fn describe(&self, req: &Request<'_>) -> String {
        let path = crate::rules::path_only(req.path);
        match (&self.action, &self.tally.counted) {
            (Action::Forward(f), _) if f.identity.is_some() => {
                let (id, digest) = match &self.tally.key {
                    Some((d, id, _)) => (id.as_ref(), d.short()),
                    None => ("", String::new()),
                };
                format!("allowed key {id} digest {digest}")
            }
            (_, Counted::Denied(i)) => format!("denied {} {} {path}", crate::response::CODES.get(*i).copied().unwrap_or("?"), req.method),
            (_, Counted::Fault) => format!("failed closed: {}", self.tally.fault.as_deref().unwrap_or("a fault")),
            (_, Counted::FailOpen) => format!("forwarded without keys (fail_open) {} {path}", req.method),
            _ => format!("public {} {path}", req.method),
        }
    }
}

/// Judges one request and plans everything that follows from it.
pub fn authorize<'s, K: KeyLookup + ?Sized, B: BucketStore>(config: &Config, keys: &'s K, buckets: &B, req: &Request<'_>, cx: &Context<'_>) -> Plan<'s>
where
    B::Error: std::fmt::Display,
{
    let mut decision = decide(config, keys, req);
    let mut rate_headers = Vec::new();
    let mut bucket_tally = None;
    if let Decision::Allow(id) = &decision {
        if let (Some(limit), Some(bucket)) = (id.record.rate_limit, id.record.rate_bucket.as_deref()) {
            let Some(now_us) = (cx.now_us)() else {
                return Plan::fault("the clock could not be read for a rate limit");
            };
            let burst = ratelimit::burst_for(id.record.rate_burst, config.rate_limit_burst);
            let checked = match ratelimit::check(buckets, bucket, now_us, limit, burst, cx.fleet, config.rate_limit_max_attempts) {
                Ok(c) => c,
                Err(e) => return Plan::fault(format!("rate-limit bucket: {e}")),
            };
            let mut tally = BucketTally {
                bucket: bucket.to_string(),
                limit,
                attempts: checked.attempts,
                contended: checked.contended,
                created: checked.created,
                fleet: None,
            };
            match checked.verdict {
                Verdict::Allow { remaining, reset_us } => {
                    if cx.fleet.global {
                        tally.fleet = Some(FleetCount::Admitted { urgent: crossed_half(remaining, u64::from(limit.count)) });
                    }
                    if config.rate_limit_headers {
                        rate_headers.extend(ratelimit::headers(limit, remaining, reset_us));
                    }
                }
                Verdict::Limit { retry_after_us, reset_us } => {
                    if cx.fleet.global {
                        tally.fleet = Some(FleetCount::Refused);
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
            bucket_tally = Some(tally);
        }
    }
    let spoofed = |extra: &dyn Fn(&str) -> bool| {
        let mut remove: Vec<String> = Vec::new();
        for (name, _) in req.headers {
            if (name.starts_with(IDENTITY_PREFIX) || extra(name)) && !remove.contains(name) {
                remove.push(name.clone());
            }
        }
        remove
    };
    match decision {
        Decision::Fault => Plan::fault("a key record could not be read"),
        Decision::Deny(denial) => {
            let mut reply = denial.reply(config);
            reply.headers.append(&mut rate_headers);
            Plan { action: Action::Reply(reply), tally: Tally { bucket: bucket_tally, ..Tally::counted(Counted::Denied(denial.code_index())) } }
        }
        Decision::DenyKey { digest, record, denial } => {
            let mut reply = denial.reply(config);
            reply.headers.append(&mut rate_headers);
            let code = denial.code_index();
            let key_id = match record {
                Cow::Borrowed(r) => Cow::Borrowed(r.id.as_str()),
                Cow::Owned(r) => Cow::Owned(r.id),
            };
            Plan {
                action: Action::Reply(reply),
                tally: Tally { counted: Counted::Denied(code), key: Some((digest, key_id, KeyUse::Denied(code))), bucket: bucket_tally, fault: None },
            }
        }
        Decision::Public | Decision::FailOpen => {
            let counted = if matches!(decision, Decision::FailOpen) { Counted::FailOpen } else { Counted::Public };
            Plan { action: Action::Forward(Forward { remove: spoofed(&|_| false), ..Forward::default() }), tally: Tally::counted(counted) }
        }
        Decision::Allow(id) => {
            let remove = spoofed(&|name| config.strip_credential && id.credential_headers.iter().any(|h| h == name));
            let mut response_headers = deprecation_headers(&id.record);
            response_headers.append(&mut rate_headers);
            let key_id = match &id.record {
                Cow::Borrowed(r) => Cow::Borrowed(r.id.as_str()),
                Cow::Owned(r) => Cow::Owned(r.id.clone()),
            };
            Plan {
                action: Action::Forward(Forward { remove, path: id.stripped_path, identity: Some(id.record), response_headers }),
                tally: Tally { counted: Counted::Allowed, key: Some((id.digest, key_id, KeyUse::Allowed)), bucket: bucket_tally, fault: None },
            }
        }
    }
}

/// Whether the admission that left `remaining` took a bucket past half of `n`: the early push
/// happens once per crossing, not on every request after it.
pub fn crossed_half(remaining: u64, n: u64) -> bool {
    remaining.saturating_mul(2) < n && (remaining + 1).saturating_mul(2) >= n
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;
    use crate::decision::{LookupError, NoKeys};
    use crate::ratelimit::Versioned;
    use std::cell::RefCell;
    use std::collections::HashMap;

    const NOW: i64 = 1_800_000_000;

    /// Buckets in memory, as Envoy's shared data keeps them (a CAS token per write).
    #[derive(Default)]
    struct Buckets(RefCell<HashMap<String, (Vec<u8>, u32)>>, std::cell::Cell<bool>);

    impl BucketStore for Buckets {
        type Error = &'static str;
        fn get(&self, key: &str) -> Result<Versioned, &'static str> {
            if self.1.get() {
                return Err("shared data refused");
            }
            Ok(self.0.borrow().get(key).map_or((None, None), |(v, c)| (Some(v.clone()), Some(*c))))
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, &'static str> {
            let mut m = self.0.borrow_mut();
            let current = m.get(key).map(|e| e.1);
            if cas.is_some() && cas != current {
                return Ok(false);
            }
            m.insert(key.to_string(), (value.to_vec(), current.unwrap_or(0) + 1));
            Ok(true)
        }
    }

    /// A lookup that faults: a failed shared-data read, or a record that cannot be decoded.
    struct Faulty;

    impl KeyLookup for Faulty {
        fn lookup(&self, _: &Digest) -> Result<Option<Cow<'_, KeyRecord>>, LookupError> {
            Err(LookupError::Fault)
        }
    }

    fn config(extra: serde_json::Value) -> Config {
        let rec = |key: &str, id: &str, fields: serde_json::Value| {
            let mut v = serde_json::json!({"digest": Digest::of(key.as_bytes()).to_hex(), "id": id, "agent": "billing", "scopes": ["read:all"]});
            if let (Some(obj), Some(f)) = (v.as_object_mut(), fields.as_object()) {
                obj.extend(f.clone());
            }
            v
        };
        let mut c = serde_json::json!({
            "require_tls": false,
            "strip_credential": true,
            "query_param": "api_key",
            "rules": [
                {"path": {"prefix": "/public"}, "public": true},
                {"path": {"prefix": "/admin"}, "scopes": ["admin"]},
            ],
            "snapshot": {"version": 1, "keys": [
                rec("good-key", "key_good", serde_json::json!({})),
                rec("revoked-key", "key_revoked", serde_json::json!({"status": "revoked"})),
                rec("expired-key", "key_expired", serde_json::json!({"expires_at": NOW})),
                rec("disabled-key", "key_disabled", serde_json::json!({"agent_enabled": false, "disabled_reason": "Upgrade your plan"})),
                rec("project-key", "key_project", serde_json::json!({"path_prefixes": ["/v1/projects/42"]})),
                rec("limited-key", "key_limited", serde_json::json!({"rate_limit": "2/min"})),
                rec("retiring-key", "key_retiring", serde_json::json!({"deprecated_at": NOW - 60, "expires_at": NOW + 3600})),
            ]}
        });
        if let (Some(obj), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            obj.extend(extra.clone());
        }
        Config::from_json(c.to_string().as_bytes()).unwrap()
    }

    /// What a plan amounts to, as the tables read it.
    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        Reply { status: u32, code: String, headers: Vec<String> },
        Forward { remove: Vec<String>, path: Option<String>, identity: Option<String>, response: Vec<String> },
    }

    fn seen(plan: &Plan<'_>) -> Seen {
        match &plan.action {
            Action::Reply(r) => {
                let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                let mut headers: Vec<String> = r.headers.iter().map(|(n, _)| n.to_string()).filter(|n| n != "content-type" && n != "cache-control").collect();
                headers.sort();
                Seen::Reply { status: r.status, code: body["error"]["code"].as_str().unwrap().to_string(), headers }
            }
            Action::Forward(f) => Seen::Forward {
                remove: f.remove.clone(),
                path: f.path.clone(),
                identity: f.identity_headers().map(|h| h.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join(" ")),
                response: f.response_headers.iter().map(|(n, _)| n.to_string()).collect(),
            },
        }
    }

    fn reply(status: u32, code: &str, headers: &[&str]) -> Seen {
        Seen::Reply { status, code: code.into(), headers: headers.iter().map(|h| h.to_string()).collect() }
    }

    fn forward(remove: &[&str], path: Option<&str>, id: Option<&str>, response: &[&str]) -> Seen {
        Seen::Forward {
            remove: remove.iter().map(|h| h.to_string()).collect(),
            path: path.map(str::to_string),
            identity: id.map(|id| format!("x-keyward-key-id={id} x-keyward-agent=billing x-keyward-scopes=read:all")),
            response: response.iter().map(|h| h.to_string()).collect(),
        }
    }

    fn plan_for<'s, K: KeyLookup + ?Sized>(config: &Config, keys: &'s K, buckets: &Buckets, path: &str, headers: &[(&str, &str)], tls: bool) -> Plan<'s> {
        let headers: Vec<(String, Vec<u8>)> = headers.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect();
        let req = Request { method: "GET", path, authority: "api.test", headers: &headers, tls_connection: tls, route_scopes: None, now: &|| NOW };
        let now_us = || Some(u64::try_from(NOW).unwrap() * 1_000_000);
        authorize(config, keys, buckets, &req, &Context { now_us: &now_us, fleet: Fleet::default() })
    }

    /// A shell may copy out of the host only the headers `reads_header` names (issue 17): for
    /// every request of the table, under configurations that read more or other headers, the
    /// plan made from those alone is the plan made from every header, field for field.
    #[test]
    fn the_headers_the_core_reads_give_the_same_plan_as_every_header_issue_17() {
        use crate::decision::reads_header;
        let noise = [("user-agent", "curl/8"), ("accept", "*/*"), ("x-request-id", "r-1"), ("x-forwarded-proto", "https"), ("x-keywardish", "1")];
        let requests: Vec<(&str, Vec<(&str, &str)>)> = vec![
            ("/v1/x", vec![("x-api-key", "good-key")]),
            ("/v1/x", vec![("x-api-key", "good-key"), ("x-api-key", "good-key")]),
            ("/v1/x", vec![("x-api-key", "good-key"), ("x-api-key", "revoked-key")]),
            ("/v1/x", vec![("x-api-key", "good-key,good-key")]),
            ("/v1/x", vec![("authorization", "Bearer good-key"), ("x-api-key", "good-key")]),
            ("/v1/x", vec![("authorization", "Basic Zm9vOmJhcg=="), ("x-api-key", "good-key")]),
            ("/v1/x", vec![("x-token", "good-key")]),
            ("/v1/x", vec![("x-keyward-agent", "root"), ("x-api-key", "good-key"), ("x-keyward-anything", "1")]),
            ("/v1/x?api_key=good-key", vec![("x-keyward-scopes", "admin")]),
            ("/v1/x", vec![("x-forwarded-proto", "http"), ("x-api-key", "good-key")]),
            ("/v1/x", vec![("x-api-key", "limited-key")]),
            ("/v1/x", vec![("x-api-key", "retiring-key")]),
            ("/v1/x", vec![("x-api-key", "expired-key")]),
            ("/admin/x", vec![("x-api-key", "good-key")]),
            ("/public/docs", vec![("x-keyward-key-id", "spoof"), ("x-api-key", "nonsense")]),
            ("/v1/x", vec![]),
        ];
        let configs = [
            serde_json::json!({}),
            serde_json::json!({"require_tls": true}),
            serde_json::json!({"require_tls": true, "trust_forwarded_proto": true}),
            serde_json::json!({"api_key_header": "x-token", "bearer_header": null}),
            serde_json::json!({"strip_credential": false}),
        ];
        for extra in configs {
            let c = config(extra.clone());
            let snapshot = c.snapshot.clone().unwrap();
            for (path, headers) in &requests {
                for tls in [false, true] {
                    // The noise around, before and after the request's own headers.
                    let all: Vec<(&str, &str)> = noise[..2].iter().chain(headers).chain(&noise[2..]).copied().collect();
                    let read: Vec<(&str, &str)> = all.iter().filter(|(n, _)| reads_header(&c, n)).copied().collect();
                    let (every, narrowed) = (Buckets::default(), Buckets::default());
                    let whole = plan_for(&c, &snapshot, &every, path, &all, tls);
                    let narrow = plan_for(&c, &snapshot, &narrowed, path, &read, tls);
                    assert_eq!(narrow, whole, "{extra} {path} {headers:?} tls {tls}");
                    assert_eq!(*narrowed.0.borrow(), *every.0.borrow(), "{extra} {path} {headers:?}: the same buckets");
                }
            }
            assert!(!reads_header(&c, "user-agent") && !reads_header(&c, ":path") && reads_header(&c, "x-keyward-agent"));
        }
        let trusting = config(serde_json::json!({"require_tls": true, "trust_forwarded_proto": true}));
        assert!(reads_header(&trusting, "x-forwarded-proto") && !reads_header(&config(serde_json::json!({})), "x-forwarded-proto"));
    }

    /// Every row of the contract, as a plan: the status, code and headers of each refusal, and
    /// what an allowed or public request forwards.
    #[test]
    fn every_contract_row_is_planned() {
        let c = config(serde_json::json!({}));
        let snapshot = c.snapshot.clone().unwrap();
        let key = |k: &'static str| vec![("x-api-key", k)];
        let www = &["www-authenticate"][..];
        let table: Vec<(&str, &str, Vec<(&str, &str)>, Seen)> = vec![
            ("allowed", "/v1/x", key("good-key"), forward(&["x-api-key"], None, Some("key_good"), &[])),
            ("bearer", "/v1/x", vec![("authorization", "Bearer good-key")], forward(&["authorization"], None, Some("key_good"), &[])),
            ("query credential", "/v1/x?a=1&api_key=good-key", vec![], forward(&[], Some("/v1/x?a=1"), Some("key_good"), &[])),
            ("spoofed identity", "/v1/x", vec![("x-keyward-agent", "root"), ("x-api-key", "good-key"), ("x-keyward-agent", "again")], forward(&["x-keyward-agent", "x-api-key"], None, Some("key_good"), &[])),
            ("public", "/public/docs", vec![("x-keyward-key-id", "spoof")], forward(&["x-keyward-key-id"], None, None, &[])),
            ("public with a bad key", "/public/docs", key("nonsense"), forward(&[], None, None, &[])),
            ("MISSING_API_KEY", "/v1/x", vec![], reply(401, "MISSING_API_KEY", www)),
            ("MALFORMED_API_KEY", "/v1/x", vec![("authorization", "Bearer ")], reply(401, "MALFORMED_API_KEY", www)),
            ("two credentials", "/v1/x", vec![("x-api-key", "good-key"), ("authorization", "Bearer revoked-key")], reply(401, "MALFORMED_API_KEY", www)),
            ("INVALID_API_KEY", "/v1/x", key("unknown-key"), reply(401, "INVALID_API_KEY", www)),
            ("REVOKED_API_KEY", "/v1/x", key("revoked-key"), reply(401, "REVOKED_API_KEY", www)),
            ("EXPIRED_API_KEY", "/v1/x", key("expired-key"), reply(401, "EXPIRED_API_KEY", www)),
            ("ACCESS_DISABLED", "/v1/x", key("disabled-key"), reply(403, "ACCESS_DISABLED", &[])),
            ("INSUFFICIENT_SCOPE", "/admin/x", key("good-key"), reply(403, "INSUFFICIENT_SCOPE", www)),
            ("path restriction", "/v1/projects/43", key("project-key"), reply(403, "INSUFFICIENT_SCOPE", www)),
            ("path allowed", "/v1/projects/42/items", key("project-key"), Seen::Forward { remove: vec!["x-api-key".into()], path: None, identity: Some("x-keyward-key-id=key_project x-keyward-agent=billing x-keyward-scopes=read:all".into()), response: vec![] }),
            ("deprecated key", "/v1/x", key("retiring-key"), Seen::Forward { remove: vec!["x-api-key".into()], path: None, identity: Some("x-keyward-key-id=key_retiring x-keyward-agent=billing x-keyward-scopes=read:all".into()), response: vec!["deprecation".into(), "sunset".into()] }),
        ];
        for (name, path, headers, want) in table {
            let plan = plan_for(&c, &snapshot, &Buckets::default(), path, &headers, false);
            assert_eq!(seen(&plan), want, "{name}");
        }
    }

    #[test]
    fn the_credential_stays_when_strip_credential_is_off() {
        let c = config(serde_json::json!({"strip_credential": false}));
        let snapshot = c.snapshot.clone().unwrap();
        let plan = plan_for(&c, &snapshot, &Buckets::default(), "/v1/x", &[("x-api-key", "good-key"), ("x-keyward-scopes", "admin")], false);
        assert_eq!(seen(&plan), forward(&["x-keyward-scopes"], None, Some("key_good"), &[]));
    }

    #[test]
    fn tls_required_and_keys_unavailable_and_fail_open() {
        let c = config(serde_json::json!({"require_tls": true}));
        let snapshot = c.snapshot.clone().unwrap();
        let b = Buckets::default();
        assert_eq!(seen(&plan_for(&c, &snapshot, &b, "/v1/x", &[("x-api-key", "good-key")], false)), reply(403, "TLS_REQUIRED", &[]));
        assert_eq!(seen(&plan_for(&c, &snapshot, &b, "/v1/x", &[("x-api-key", "good-key")], true)), forward(&["x-api-key"], None, Some("key_good"), &[]));
        let c = config(serde_json::json!({}));
        let plan = plan_for(&c, &NoKeys, &b, "/v1/x", &[("x-api-key", "good-key")], false);
        assert_eq!(seen(&plan), reply(503, "KEYS_UNAVAILABLE", &["retry-after"]));
        let open = config(serde_json::json!({"fail_open": true}));
        let plan = plan_for(&open, &NoKeys, &b, "/v1/x", &[("x-api-key", "good-key"), ("x-keyward-agent", "x")], false);
        assert_eq!((seen(&plan), plan.tally.counted), (forward(&["x-keyward-agent"], None, None, &[]), Counted::FailOpen));
    }

    /// A fault fails closed with 500 `INTERNAL_ERROR`, whatever `fail_open` says: `fail_open` is
    /// for "no snapshot yet", never for a read that failed or a record that cannot be decoded.
    #[test]
    fn a_fault_fails_closed_even_with_fail_open() {
        for fail_open in [false, true] {
            let c = config(serde_json::json!({ "fail_open": fail_open }));
            let plan = plan_for(&c, &Faulty, &Buckets::default(), "/v1/x", &[("x-api-key", "good-key")], false);
            assert_eq!((seen(&plan), plan.tally.counted), (reply(500, "INTERNAL_ERROR", &[]), Counted::Fault), "fail_open {fail_open}");
            assert!(plan.tally.fault.is_some());
        }
        // A bucket store that refuses, or a clock that cannot be read, is a fault too.
        let c = config(serde_json::json!({ "fail_open": true }));
        let snapshot = c.snapshot.clone().unwrap();
        let refusing = Buckets::default();
        refusing.1.set(true);
        let plan = plan_for(&c, &snapshot, &refusing, "/v1/x", &[("x-api-key", "limited-key")], false);
        assert_eq!(seen(&plan), reply(500, "INTERNAL_ERROR", &[]));
        let headers = vec![("x-api-key".to_string(), b"limited-key".to_vec())];
        let req = Request { method: "GET", path: "/v1/x", authority: "a", headers: &headers, tls_connection: false, route_scopes: None, now: &|| NOW };
        let plan = authorize(&c, &snapshot, &Buckets::default(), &req, &Context { now_us: &|| None, fleet: Fleet::default() });
        assert_eq!(seen(&plan), reply(500, "INTERNAL_ERROR", &[]));
    }

    #[test]
    fn rate_limits_add_their_headers_and_refuse_with_retry_after() {
        let c = config(serde_json::json!({"rate_limit_headers": true}));
        let snapshot = c.snapshot.clone().unwrap();
        let b = Buckets::default();
        let limited = [("x-api-key", "limited-key")];
        for _ in 0..2 {
            let plan = plan_for(&c, &snapshot, &b, "/v1/x", &limited, false);
            assert_eq!(seen(&plan), Seen::Forward { remove: vec!["x-api-key".into()], path: None, identity: Some("x-keyward-key-id=key_limited x-keyward-agent=billing x-keyward-scopes=read:all".into()), response: vec!["ratelimit-policy".into(), "ratelimit".into()] });
        }
        let plan = plan_for(&c, &snapshot, &b, "/v1/x", &limited, false);
        assert_eq!(seen(&plan), reply(429, "RATE_LIMITED", &["ratelimit", "ratelimit-policy", "retry-after"]));
        let bucket = plan.tally.bucket.as_ref().unwrap();
        assert_eq!((bucket.bucket.as_str(), bucket.attempts, bucket.fleet), ("k:key_limited", 1, None), "split mode counts nothing for the fleet");
        assert!(matches!(plan.tally.key, Some((_, ref id, KeyUse::Denied(8))) if id == "key_limited"));
    }

    #[test]
    fn the_tally_counts_what_the_contract_decided() {
        let c = config(serde_json::json!({}));
        let snapshot = c.snapshot.clone().unwrap();
        let b = Buckets::default();
        let usage = Usage::default();
        let table: &[(&str, &[(&str, &str)], Counted, Option<KeyUse>)] = &[
            ("/v1/x", &[("x-api-key", "good-key")], Counted::Allowed, Some(KeyUse::Allowed)),
            ("/v1/x", &[("x-api-key", "revoked-key")], Counted::Denied(3), Some(KeyUse::Denied(3))),
            ("/v1/x", &[("x-api-key", "unknown-key")], Counted::Denied(2), None),
            ("/v1/x", &[], Counted::Denied(0), None),
            ("/public", &[], Counted::Public, None),
        ];
        for (path, headers, counted, key) in table {
            let plan = plan_for(&c, &snapshot, &b, path, headers, false);
            assert_eq!((plan.tally.counted, plan.tally.key.as_ref().map(|k| k.2)), (*counted, *key), "{path} {headers:?}");
            plan.tally.count_usage(&usage, NOW);
        }
        let counted = usage.take();
        assert_eq!((counted["key_good"].count, counted["key_good"].last, counted["key_revoked"].denied[3]), (1, NOW, 1));
        // In global mode admissions are counted for the fleet, and the one that takes the
        // bucket past half is urgent.
        let limited = [("x-api-key", "limited-key")];
        let headers: Vec<(String, Vec<u8>)> = limited.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect();
        let req = Request { method: "GET", path: "/v1/x", authority: "a", headers: &headers, tls_connection: false, route_scopes: None, now: &|| NOW };
        let global = Fleet { envoys: 1, global: true };
        let now_us = || Some(u64::try_from(NOW).unwrap() * 1_000_000);
        let fleet: Vec<Option<FleetCount>> = (0..3)
            .map(|_| authorize(&c, &snapshot, &b, &req, &Context { now_us: &now_us, fleet: global }).tally.bucket.and_then(|t| t.fleet))
            .collect();
        assert_eq!(fleet, [Some(FleetCount::Admitted { urgent: false }), Some(FleetCount::Admitted { urgent: true }), Some(FleetCount::Refused)]);
    }

    #[test]
    fn counters_are_named_once_and_a_tally_adds_to_its_own() {
        let names = counter::names();
        assert_eq!(names.len(), counter::COUNT);
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        assert_eq!((names[counter::DENIED + 8].as_str(), names[counter::CAS_ATTEMPTS + 3].as_str()), ("keyward.denied.rate_limited", "keyward.rate_limit.cas_attempts_4_or_more"));
        let c = config(serde_json::json!({}));
        let snapshot = c.snapshot.clone().unwrap();
        let b = Buckets::default();
        let named = |plan: Plan<'_>| std::iter::once(plan.tally.outcome_counter()).chain(plan.tally.bucket_counters()).map(|i| names[i].clone()).collect::<Vec<_>>();
        assert_eq!(named(plan_for(&c, &snapshot, &b, "/v1/x", &[("x-api-key", "limited-key")], false)), ["keyward.allowed", "keyward.rate_limit.cas_attempts_1", "keyward.rate_limit.buckets_created"]);
        assert_eq!(named(plan_for(&c, &snapshot, &b, "/v1/x", &[("x-api-key", "revoked-key")], false)), ["keyward.denied.revoked_api_key"]);
        assert_eq!(named(plan_for(&c, &Faulty, &b, "/v1/x", &[("x-api-key", "good-key")], false)), ["keyward.internal_errors"]);
    }

    #[test]
    fn the_debug_line_never_holds_the_credential() {
        let c = config(serde_json::json!({}));
        let snapshot = c.snapshot.clone().unwrap();
        let headers = vec![("x-api-key".to_string(), b"good-key".to_vec())];
        let req = Request { method: "GET", path: "/v1/x", authority: "a", headers: &headers, tls_connection: false, route_scopes: None, now: &|| NOW };
        let plan = authorize(&c, &snapshot, &Buckets::default(), &req, &Context { now_us: &|| None, fleet: Fleet::default() });
        let line = plan.describe(&req);
        assert!(line.starts_with("allowed key key_good digest ") && !line.contains("good-key"), "{line}");
        // A query credential, refused, forwarded by fail_open, or on a public path.
        for (config, keys, path) in [
            (config(serde_json::json!({})), false, "/v1/x?api_key=revoked-key"),
            (config(serde_json::json!({"fail_open": true})), false, "/v1/x?api_key=good-key"),
            (config(serde_json::json!({})), true, "/public/x?api_key=good-key"),
        ] {
            let req = Request { method: "GET", path, authority: "a", headers: &[], tls_connection: false, route_scopes: None, now: &|| NOW };
            let snapshot = config.snapshot.clone().unwrap();
            let plan = if keys { authorize(&config, &snapshot, &Buckets::default(), &req, &Context { now_us: &|| None, fleet: Fleet::default() }) } else { authorize(&config, &NoKeys, &Buckets::default(), &req, &Context { now_us: &|| None, fleet: Fleet::default() }) };
            let line = plan.describe(&req);
            assert!(!line.contains("-key") && !line.contains('?'), "{line}");
        }
    }
}
