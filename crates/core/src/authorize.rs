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

    /// One line for the debug log: what was decided, never the credential.
    pub fn describe(&self, req: &Request<'_>) -> String {
        match (&self.action, &self.tally.counted) {
            (Action::Forward(f), _) if f.identity.is_some() => {
                let (id, digest) = match &self.tally.key {
                    Some((d, id, _)) => (id.as_ref(), d.short()),
                    None => ("", String::new()),
                };
                format!("allowed key {id} digest {digest}")
            }
            (_, Counted::Denied(i)) => format!("denied {} {} {}", crate::response::CODES.get(*i).copied().unwrap_or("?"), req.method, req.path),
            (_, Counted::Fault) => format!("failed closed: {}", self.tally.fault.as_deref().unwrap_or("a fault")),
            (_, Counted::FailOpen) => format!("forwarded without keys (fail_open) {} {}", req.method, req.path),
            _ => format!("public {} {}", req.method, req.path),
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
