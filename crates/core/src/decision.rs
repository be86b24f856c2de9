//! The decision: allow with an identity, pass a public route, or deny with a contract code.

use crate::config::Config;
use crate::credential::{extract, CredentialError};
use crate::digest::Digest;
use crate::rules::{path_only, requirement, Requirement};
use crate::scope::split_list;
use crate::snapshot::{KeyRecord, KeyStatus, Snapshot};
use std::borrow::Cow;

/// Why keys could not be consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupError {
    /// None loaded yet, or too stale: 503 `KEYS_UNAVAILABLE`, or forwarded with `fail_open`.
    Unavailable,
    /// The host refused a read, or a record cannot be decoded: a fault, which fails closed
    /// (500 `INTERNAL_ERROR`) whatever `fail_open` says.
    Fault,
}

/// Where decisions find key records: an inline snapshot, or Envoy shared data in the shell.
pub trait KeyLookup {
    fn lookup(&self, digest: &Digest) -> Result<Option<Cow<'_, KeyRecord>>, LookupError>;
}

impl KeyLookup for Snapshot {
    fn lookup(&self, digest: &Digest) -> Result<Option<Cow<'_, KeyRecord>>, LookupError> {
        Ok(self.get(digest).map(Cow::Borrowed))
    }
}

/// No keys loaded: every lookup is unavailable.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoKeys;

impl KeyLookup for NoKeys {
    fn lookup(&self, _: &Digest) -> Result<Option<Cow<'_, KeyRecord>>, LookupError> {
        Err(LookupError::Unavailable)
    }
}

/// What the filter knows about a request, gathered by the shell.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// `:path` as received, query included.
    pub path: &'a str,
    /// `:authority`.
    pub authority: &'a str,
    /// The request headers, lowercase names, raw values, duplicates kept, in order: every
    /// header, or only those [`reads_header`] accepts (the plan is the same either way).
    pub headers: &'a [(String, Vec<u8>)],
    /// Whether the downstream connection is TLS (`connection.tls_version` is present).
    pub tls_connection: bool,
    /// `filter_metadata.keyward.scopes` of the matched route, if any.
    pub route_scopes: Option<&'a str>,
    /// Unix seconds, from the filter's clock; called only for keys that can expire.
    pub now: &'a dyn Fn() -> i64,
}

/// Whether the core ever reads the request header `name` (lowercase) under `config`: the
/// credential sources, `x-forwarded-proto` when it is trusted for `require_tls`, and every
/// `x-keyward-*` header (removed before forwarding). A shell may hand [`Request::headers`] only
/// these, and copy nothing else out of the host.
pub fn reads_header(config: &Config, name: &str) -> bool {
    reads_header_name(config, name.as_bytes())
}

/// [`reads_header`] on a name's bytes, for a shell holding the host's bytes: a name it accepts
/// still has to be UTF-8 to be read.
pub fn reads_header_name(config: &Config, name: &[u8]) -> bool {
    let s = &config.sources;
    name.starts_with(crate::authorize::IDENTITY_PREFIX.as_bytes())
        || s.bearer_header.as_deref().map(str::as_bytes) == Some(name)
        || s.api_key_header.as_deref().map(str::as_bytes) == Some(name)
        || (config.require_tls && config.trust_forwarded_proto && name == FORWARDED_PROTO.as_bytes())
}

const FORWARDED_PROTO: &str = "x-forwarded-proto";

impl Request<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }
}

/// Why a request is refused. Each maps to one row of the contract table (see `response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    MissingKey,
    MalformedKey { reason: &'static str },
    InvalidKey,
    /// A key id is not a secret: the reply names it (seed 003), so its owner knows which key.
    RevokedKey { key_id: String },
    ExpiredKey { expired_at: i64, key_id: String },
    /// `reason` is the operator's (`agent disable --reason`), the reply's message when set.
    AccessDisabled { reason: Option<String> },
    InsufficientScope { required: Vec<String> },
    /// The key's resource restrictions exclude this path; answered as `INSUFFICIENT_SCOPE`.
    PathRestricted { allowed: Vec<String> },
    TlsRequired,
    RateLimited { retry_after_secs: u64 },
    KeysUnavailable { retry_after_secs: u64 },
}

/// An authenticated request's identity. Borrowed from the snapshot: no copies on the hot path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity<'s> {
    pub digest: Digest,
    pub record: Cow<'s, KeyRecord>,
    /// Header names that carried the credential.
    pub credential_headers: Vec<String>,
    /// Replacement `:path` when the credential came from the query string.
    pub stripped_path: Option<String>,
}

// Returned by value once per request; boxing `Allow` would add an allocation to the hot path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'s> {
    /// A public route: forward without identity.
    Public,
    /// Keys are unavailable and `fail_open` is set: forward without identity.
    FailOpen,
    /// Reading keys failed (a hostcall error, an undecodable record): 500 `INTERNAL_ERROR`,
    /// never forwarded, whatever `fail_open` says.
    Fault,
    Allow(Identity<'s>),
    Deny(Denial),
    /// A key in the snapshot, refused (revoked, expired, disabled, restricted, out of scope):
    /// the shell counts the refusal in the key's usage.
    DenyKey { digest: Digest, record: Cow<'s, KeyRecord>, denial: Denial },
}

impl Decision<'_> {
    /// The refusal, if this is one.
    pub fn denial(&self) -> Option<&Denial> {
        match self {
            Decision::Deny(d) | Decision::DenyKey { denial: d, .. } => Some(d),
            _ => None,
        }
    }
}

/// Judges one request against `keys`: the contract's order of checks, before rate limits (see
/// `authorize`, which plans everything that follows).
pub fn decide<'s, K: KeyLookup + ?Sized>(config: &Config, keys: &'s K, req: &Request<'_>) -> Decision<'s> {
    if config.require_tls && !is_tls(config, req) {
        return Decision::Deny(Denial::TlsRequired);
    }
    let path = path_only(req.path);
    let from_metadata;
    let required = match req.route_scopes.filter(|_| config.route_metadata) {
        Some(list) => {
            from_metadata = Requirement::Scopes(split_list(list).map(str::to_string).collect());
            &from_metadata
        }
        None => requirement(&config.rules, &config.default, req.method, path, req.authority),
    };
    let required = match required {
        Requirement::Public => return Decision::Public,
        Requirement::Scopes(s) => s,
    };
    let credential = match extract(&config.sources, req.headers, req.path) {
        Ok(c) => c,
        Err(CredentialError::Missing) => return Decision::Deny(Denial::MissingKey),
        Err(CredentialError::Malformed(reason)) => return Decision::Deny(Denial::MalformedKey { reason }),
    };
    let digest = Digest::of(credential.key.as_bytes());
    let record = match keys.lookup(&digest) {
        Ok(Some(record)) => record,
        Ok(None) => return Decision::Deny(Denial::InvalidKey),
        Err(LookupError::Fault) => return Decision::Fault,
        Err(LookupError::Unavailable) if config.fail_open => return Decision::FailOpen,
        Err(LookupError::Unavailable) => {
            return Decision::Deny(Denial::KeysUnavailable {
                retry_after_secs: u64::from(config.unavailable_retry_after_secs),
            })
        }
    };
    if let Some(denial) = judge_record(&record, required, path, req.now) {
        return Decision::DenyKey { digest, record, denial };
    }
    Decision::Allow(Identity {
        digest,
        record,
        credential_headers: credential.headers,
        stripped_path: credential.stripped_path,
    })
}

/// Checks a found key against the clock, its agent, its restrictions and the route's scopes.
pub fn judge_record(record: &KeyRecord, required: &[String], path: &str, now: &dyn Fn() -> i64) -> Option<Denial> {
    if record.status == KeyStatus::Revoked {
        return Some(Denial::RevokedKey { key_id: record.id.clone() });
    }
    if let Some(expired_at) = record.expires_at.filter(|&t| now() >= t) {
        return Some(Denial::ExpiredKey { expired_at, key_id: record.id.clone() });
    }
    if !record.agent_enabled {
        return Some(Denial::AccessDisabled { reason: record.disabled_reason.clone() });
    }
    if !record.allows_path(path) {
        return Some(Denial::PathRestricted { allowed: record.path_prefixes.clone() });
    }
    if !required.iter().all(|s| record.has_scope(s)) {
        return Some(Denial::InsufficientScope { required: required.to_vec() });
    }
    None
}

fn is_tls(config: &Config, req: &Request<'_>) -> bool {
    req.tls_connection
        || (config.trust_forwarded_proto
            && req.header(FORWARDED_PROTO).is_some_and(|v| v.eq_ignore_ascii_case(b"https")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyformat;

    const NOW: i64 = 1_800_000_000;

    struct Fixture {
        config: Config,
        good: String,
    }

    fn fixture() -> Fixture {
        let good = keyformat::generate("kw_live", (1u8..=200).cycle()).unwrap();
        let rec = |key: &str, id: &str, extra: serde_json::Value| {
            let mut v = serde_json::json!({"digest": Digest::of(key.as_bytes()).to_hex(), "id": id, "agent": "billing", "scopes": ["read:all"]});
            if let (Some(obj), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
                obj.extend(extra.clone());
            }
            v
        };
        let config = serde_json::json!({
            "require_tls": false,
            "rules": [
                {"path": {"prefix": "/public"}, "public": true},
                {"methods": ["POST"], "path": {"prefix": "/v1"}, "scopes": ["write:all"]},
                {"path": {"prefix": "/admin"}, "scopes": ["admin"]},
            ],
            "snapshot": {"version": 1, "keys": [
                rec(&good, "key_good", serde_json::json!({})),
                rec("admin-key", "key_admin", serde_json::json!({"scopes": ["admin"]})),
                rec("revoked-key", "key_revoked", serde_json::json!({"status": "revoked"})),
                rec("expired-key", "key_expired", serde_json::json!({"expires_at": NOW})),
                rec("fresh-key", "key_fresh", serde_json::json!({"expires_at": NOW + 1})),
                rec("disabled-key", "key_disabled", serde_json::json!({"agent_enabled": false})),
                rec("plan-key", "key_plan", serde_json::json!({"agent_enabled": false, "disabled_reason": "Your plan does not include API access"})),
                rec("project-key", "key_project", serde_json::json!({"path_prefixes": ["/v1/projects/42"]})),
            ]}
        });
        let config = Config::from_json(config.to_string().as_bytes()).unwrap();
        Fixture { config, good }
    }

    fn run(f: &Fixture, method: &str, path: &str, headers: &[(&str, &str)], route_scopes: Option<&str>) -> Result<String, Denial> {
        let headers: Vec<(String, Vec<u8>)> = headers.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect();
        let req = Request { method, path, authority: "api.test", headers: &headers, tls_connection: false, route_scopes, now: &|| NOW };
        let snapshot = f.config.snapshot.clone().unwrap();
        match decide(&f.config, &snapshot, &req) {
            Decision::Public | Decision::FailOpen => Ok("public".into()),
            Decision::Fault => panic!("an inline snapshot never faults"),
            Decision::Allow(id) => Ok(id.record.id.clone()),
            Decision::Deny(d) => Err(d),
            Decision::DenyKey { record, denial, .. } => {
                assert!(!record.id.is_empty(), "a known key's refusal names it");
                Err(denial)
            }
        }
    }

    #[test]
    fn decisions_follow_the_contract_table() {
        let f = fixture();
        let good = f.good.clone();
        let key = |k: &str| vec![("x-api-key", k.to_string())];
        let check = |method: &str, path: &str, hdrs: Vec<(&str, String)>, want: Result<&str, Denial>| {
            let h: Vec<(&str, &str)> = hdrs.iter().map(|(n, v)| (*n, v.as_str())).collect();
            assert_eq!(run(&f, method, path, &h, None), want.map(str::to_string), "{method} {path} {hdrs:?}");
        };
        check("GET", "/v1/x", key(&good), Ok("key_good"));
        check("GET", "/v1/x", vec![("authorization", format!("Bearer {good}"))], Ok("key_good"));
        check("GET", "/public/docs", vec![], Ok("public"));
        check("GET", "/v1/x", vec![], Err(Denial::MissingKey));
        check("GET", "/v1/x", vec![("authorization", "Bearer ".into())], Err(Denial::MalformedKey { reason: "the Bearer token is empty" }));
        check("GET", "/v1/x", key(&format!("{good}x")), Err(Denial::MalformedKey { reason: "the key's checksum does not match; check that it was copied whole" }));
        check("GET", "/v1/x", key("unknown-key"), Err(Denial::InvalidKey));
        check("GET", "/v1/x", key("revoked-key"), Err(Denial::RevokedKey { key_id: "key_revoked".into() }));
        check("GET", "/v1/x", key("expired-key"), Err(Denial::ExpiredKey { expired_at: NOW, key_id: "key_expired".into() }));
        check("GET", "/v1/x", key("fresh-key"), Ok("key_fresh"));
        check("GET", "/v1/x", key("disabled-key"), Err(Denial::AccessDisabled { reason: None }));
        check("GET", "/v1/x", key("plan-key"), Err(Denial::AccessDisabled { reason: Some("Your plan does not include API access".into()) }));
        check("POST", "/v1/x", key(&good), Err(Denial::InsufficientScope { required: vec!["write:all".into()] }));
        check("POST", "/v1/x", key("admin-key"), Ok("key_admin"));
        check("GET", "/admin/x", key(&good), Err(Denial::InsufficientScope { required: vec!["admin".into()] }));
        check("GET", "/v1/projects/42/items?x=1", key("project-key"), Ok("key_project"));
        check("GET", "/v1/projects/43", key("project-key"), Err(Denial::PathRestricted { allowed: vec!["/v1/projects/42".into()] }));
    }

    #[test]
    fn route_metadata_overrides_rules() {
        let f = fixture();
        let good = f.good.clone();
        // `/public` is public by rule, but the route says it needs admin.
        assert_eq!(run(&f, "GET", "/public", &[("x-api-key", &good)], Some("admin")), Err(Denial::InsufficientScope { required: vec!["admin".into()] }));
        // `/admin` needs admin by rule, but the route asks only read:all.
        assert_eq!(run(&f, "GET", "/admin/x", &[("x-api-key", &good)], Some("read:all")), Ok("key_good".into()));
        assert_eq!(run(&f, "GET", "/admin/x", &[("x-api-key", "admin-key")], Some("read:all, write:all")), Ok("key_admin".into()));
    }

    #[test]
    fn missing_snapshot_is_unavailable_with_retry_after() {
        let f = fixture();
        let headers = vec![("x-api-key".to_string(), b"some-key".to_vec())];
        let req = Request { method: "GET", path: "/", authority: "a", headers: &headers, tls_connection: false, route_scopes: None, now: &|| NOW };
        assert_eq!(decide(&f.config, &NoKeys, &req), Decision::Deny(Denial::KeysUnavailable { retry_after_secs: 5 }));
        let mut open = f.config.clone();
        open.fail_open = true;
        assert_eq!(decide(&open, &NoKeys, &req), Decision::FailOpen);
        // Credential errors still win: fail-open is about the keys, not the request.
        let bare = Request { headers: &[], ..req };
        assert_eq!(decide(&open, &NoKeys, &bare), Decision::Deny(Denial::MissingKey));
    }

    /// A lookup whose host read fails, or whose record cannot be decoded.
    struct Faulty;

    impl KeyLookup for Faulty {
        fn lookup(&self, _: &Digest) -> Result<Option<Cow<'_, KeyRecord>>, LookupError> {
            Err(LookupError::Fault)
        }
    }

    #[test]
    fn a_fault_fails_closed_even_with_fail_open() {
        let f = fixture();
        let headers = vec![("x-api-key".to_string(), b"some-key".to_vec())];
        let req = Request { method: "GET", path: "/", authority: "a", headers: &headers, tls_connection: false, route_scopes: None, now: &|| NOW };
        assert_eq!(decide(&f.config, &Faulty, &req), Decision::Fault);
        let mut open = f.config.clone();
        open.fail_open = true;
        assert_eq!(decide(&open, &Faulty, &req), Decision::Fault, "fail_open is for no snapshot yet, not for faults");
        assert_eq!(decide(&open, &Faulty, &req).denial(), None);
    }

    #[test]
    fn tls_is_required_when_configured() {
        let mut f = fixture();
        f.config.require_tls = true;
        let hdrs = |xfp: &str| vec![("x-forwarded-proto".to_string(), xfp.as_bytes().to_vec()), ("x-api-key".to_string(), b"admin-key".to_vec())];
        let judge = |c: &Config, tls: bool, xfp: &str| {
            let h = hdrs(xfp);
            let req = Request { method: "GET", path: "/v1", authority: "a", headers: &h, tls_connection: tls, route_scopes: None, now: &|| NOW };
            let snapshot = c.snapshot.clone().unwrap();
            matches!(decide(c, &snapshot, &req), Decision::Deny(Denial::TlsRequired))
        };
        assert!(judge(&f.config, false, "https"), "x-forwarded-proto is not trusted by default");
        assert!(!judge(&f.config, true, "http"));
        f.config.trust_forwarded_proto = true;
        assert!(!judge(&f.config, false, "HTTPS"));
        assert!(judge(&f.config, false, "http"));
    }
}
