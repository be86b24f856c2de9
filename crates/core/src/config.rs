//! Plugin configuration: raw serde structs, compiled into a validated [`Config`].
//!
//! Every error names the field and the bad value (`rules[2].path.regex: …`), so the filter's
//! `on_configure` can log it and refuse the configuration as a whole.

use crate::credential::Sources;
use crate::keyformat::valid_prefix;
use crate::ratelimit::Burst;
use crate::rules::{HostMatch, PathMatch, Requirement, Rule};
use crate::scope::{valid_scope, Implications};
use crate::snapshot::{RawSnapshot, Snapshot};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A configuration error, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid keyward configuration: {0}")]
    Field(#[from] FieldError),
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Field(FieldError { field: field.into(), message: message.into() })
}

fn yes() -> bool {
    true
}
fn default_realm() -> String {
    "keyward".into()
}
fn default_bearer_header() -> Option<String> {
    Some("authorization".into())
}
fn default_api_key_header() -> Option<String> {
    Some("x-api-key".into())
}
fn default_max_key_length() -> usize {
    256
}
fn default_key_prefixes() -> Vec<String> {
    vec!["kw".into()]
}
fn default_retry_after() -> u32 {
    5
}

/// The plugin configuration as written (JSON). See README.md, "Filter configuration".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default = "default_realm")]
    pub realm: String,
    #[serde(default = "default_bearer_header")]
    pub bearer_header: Option<String>,
    #[serde(default = "default_api_key_header")]
    pub api_key_header: Option<String>,
    #[serde(default)]
    pub query_param: Option<String>,
    #[serde(default = "default_max_key_length")]
    pub max_key_length: usize,
    #[serde(default = "default_key_prefixes")]
    pub key_prefixes: Vec<String>,
    #[serde(default = "yes")]
    pub strip_credential: bool,
    #[serde(default)]
    pub require_tls: bool,
    #[serde(default)]
    pub trust_forwarded_proto: bool,
    #[serde(default)]
    pub implications: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
    #[serde(default)]
    pub default: RawAction,
    #[serde(default = "yes")]
    pub route_metadata: bool,
    #[serde(default = "default_retry_after")]
    pub unavailable_retry_after_secs: u32,
    #[serde(default)]
    pub snapshot: Option<RawSnapshot>,
    #[serde(default)]
    pub control_plane: Option<RawControlPlane>,
    /// Let requests through (without identity) while no keys are available. Dangerous.
    #[serde(default)]
    pub fail_open: bool,
    /// The burst of keys whose record has no `rate_burst`: requests an idle client may send at
    /// once, a number (capped at the limit's N) or "limit" (N, the default).
    #[serde(default)]
    pub rate_limit_burst: Option<serde_json::Value>,
    /// Send the IETF `RateLimit-Policy` and `RateLimit` fields.
    #[serde(default = "yes")]
    pub rate_limit_headers: bool,
    /// Compare-and-swap attempts before a contended request is let through.
    #[serde(default = "default_cas_attempts")]
    pub rate_limit_max_attempts: u32,
}

fn default_cas_attempts() -> u32 {
    8
}

/// Where the filter's fetcher finds `keyward serve`'s feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawControlPlane {
    /// The Envoy cluster (STATIC or STRICT_DNS) that reaches `keyward serve`.
    pub cluster: String,
    /// `:authority` of feed requests.
    #[serde(default = "default_authority")]
    pub authority: String,
    /// How long the feed may hold a request open before answering "no change".
    #[serde(default = "default_feed_wait")]
    pub feed_wait_secs: u32,
    /// Fail closed once nothing has been heard from the feed for this long.
    #[serde(default)]
    pub max_snapshot_age_secs: Option<u32>,
    /// How often usage counts are reported.
    #[serde(default = "default_usage_report")]
    pub usage_report_secs: u32,
    /// Largest feed response accepted, in bytes.
    #[serde(default = "default_max_feed_bytes")]
    pub max_feed_bytes: usize,
    /// Sent as `Authorization: Bearer <token>` if the feed requires one (`KEYWARD_FEED_TOKEN`).
    #[serde(default)]
    pub token: Option<String>,
    /// How often rate-limit buckets that moved are reported to the control plane, which
    /// answers with the fleet's share or counts (`POST /v1/feed/rates`).
    #[serde(default = "default_rate_sync")]
    pub rate_sync_ms: u32,
}

fn default_rate_sync() -> u32 {
    250
}

fn default_authority() -> String {
    "keyward".into()
}
fn default_feed_wait() -> u32 {
    15
}
fn default_usage_report() -> u32 {
    5
}
fn default_max_feed_bytes() -> usize {
    16 * 1024 * 1024
}

/// The compiled control-plane settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlane {
    pub cluster: String,
    pub authority: String,
    pub feed_wait_secs: u32,
    pub max_snapshot_age_secs: Option<u32>,
    pub usage_report_secs: u32,
    pub max_feed_bytes: usize,
    pub token: Option<String>,
    pub rate_sync_ms: u32,
}

/// What a rule (or the default) requires: `{"scopes": [...]}` or `{"public": true}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAction {
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    #[serde(default)]
    pub public: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub path: Option<RawPath>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    #[serde(default)]
    pub public: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPath {
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

/// The compiled, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `realm` of `WWW-Authenticate` challenges.
    pub realm: String,
    pub sources: Sources,
    /// Remove the credential header(s) before forwarding.
    pub strip_credential: bool,
    pub require_tls: bool,
    pub trust_forwarded_proto: bool,
    pub implications: Implications,
    pub rules: Vec<Rule>,
    pub default: Requirement,
    /// Read `filter_metadata.keyward.scopes` from the route.
    pub route_metadata: bool,
    pub unavailable_retry_after_secs: u32,
    /// An inline static snapshot (digests only), for running without the control plane.
    pub snapshot: Option<Snapshot>,
    /// The feed to subscribe to, instead of an inline snapshot.
    pub control_plane: Option<ControlPlane>,
    pub fail_open: bool,
    /// The burst of a key whose record carries none (default: the limit's own N).
    pub rate_limit_burst: Burst,
    pub rate_limit_headers: bool,
    pub rate_limit_max_attempts: u32,
}

impl Config {
    /// Parses and compiles the plugin configuration. Empty input means all defaults.
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        let bytes = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { bytes };
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "configuration".to_string() } else { path };
            field_error(field, e.into_inner().to_string())
        })?;
        Config::compile(&raw)
    }

    pub fn compile(raw: &RawConfig) -> Result<Config, ConfigError> {
        if raw.realm.is_empty() || !raw.realm.bytes().all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\') {
            return Err(field_error("realm", format!("{:?} must be printable ASCII without quotes or backslashes", raw.realm)));
        }
        let header = |field: &str, h: &Option<String>| -> Result<Option<String>, ConfigError> {
            match h {
                None => Ok(None),
                Some(h) if is_token(h) => Ok(Some(h.to_ascii_lowercase())),
                Some(h) => Err(field_error(field, format!("{h:?} is not a valid header name"))),
            }
        };
        let bearer_header = header("bearer_header", &raw.bearer_header)?;
        let api_key_header = header("api_key_header", &raw.api_key_header)?;
        if bearer_header.is_some() && bearer_header == api_key_header {
            return Err(field_error("api_key_header", "must differ from bearer_header"));
        }
        for (field, h) in [("bearer_header", &bearer_header), ("api_key_header", &api_key_header)] {
            if h.as_deref().is_some_and(|h| h.starts_with("x-keyward-")) {
                return Err(field_error(field, "x-keyward-* headers are reserved for identity"));
            }
        }
        if let Some(q) = &raw.query_param {
            if q.is_empty() || !q.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.') {
                return Err(field_error("query_param", format!("{q:?} must be a plain parameter name ([A-Za-z0-9_.-])")));
            }
        }
        if bearer_header.is_none() && api_key_header.is_none() && raw.query_param.is_none() {
            return Err(field_error("bearer_header", "no credential source is enabled"));
        }
        if !(16..=4096).contains(&raw.max_key_length) {
            return Err(field_error("max_key_length", format!("{} is outside 16..=4096", raw.max_key_length)));
        }
        for (i, p) in raw.key_prefixes.iter().enumerate() {
            if !valid_prefix(p) {
                return Err(field_error(format!("key_prefixes[{i}]"), format!("{p:?} must be 1-32 of [A-Za-z0-9_], not starting or ending in '_'")));
            }
        }
        let implications = match &raw.implications {
            None => Implications::default(),
            Some(m) => Implications::new(m).map_err(|e| field_error("implications", e))?,
        };
        let rules = raw
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| compile_rule(r).map_err(|(f, m)| field_error(format!("rules[{i}].{f}"), m)))
            .collect::<Result<Vec<_>, _>>()?;
        let default = compile_action(raw.default.scopes.as_ref(), raw.default.public, true)
            .map_err(|(f, m)| field_error(format!("default.{f}"), m))?;
        if !(1..=3600).contains(&raw.unavailable_retry_after_secs) {
            return Err(field_error("unavailable_retry_after_secs", "must be within 1..=3600"));
        }
        let snapshot = raw
            .snapshot
            .as_ref()
            .map(|s| Snapshot::compile(s, &implications, "snapshot"))
            .transpose()?;
        let control_plane = raw.control_plane.as_ref().map(compile_control_plane).transpose()?;
        if snapshot.is_some() && control_plane.is_some() {
            return Err(field_error("snapshot", "give an inline snapshot or a control_plane, not both"));
        }
        let rate_limit_burst = match &raw.rate_limit_burst {
            None => Burst::default(),
            Some(serde_json::Value::String(s)) if s == "limit" => Burst::Limit,
            Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()).filter(|n| *n >= 1) {
                Some(n) => Burst::Requests(n),
                None => return Err(field_error("rate_limit_burst", format!("{v} must be a number of requests (at least 1) or \"limit\""))),
            },
        };
        if !(1..=64).contains(&raw.rate_limit_max_attempts) {
            return Err(field_error("rate_limit_max_attempts", "must be within 1..=64"));
        }
        Ok(Config {
            realm: raw.realm.clone(),
            sources: Sources {
                bearer_header,
                api_key_header,
                query_param: raw.query_param.clone(),
                max_length: raw.max_key_length,
                key_prefixes: raw.key_prefixes.clone(),
            },
            strip_credential: raw.strip_credential,
            require_tls: raw.require_tls,
            trust_forwarded_proto: raw.trust_forwarded_proto,
            implications,
            rules,
            default,
            route_metadata: raw.route_metadata,
            unavailable_retry_after_secs: raw.unavailable_retry_after_secs,
            snapshot,
            control_plane,
            fail_open: raw.fail_open,
            rate_limit_burst,
            rate_limit_headers: raw.rate_limit_headers,
            rate_limit_max_attempts: raw.rate_limit_max_attempts,
        })
    }
}

fn compile_control_plane(c: &RawControlPlane) -> Result<ControlPlane, ConfigError> {
    if c.cluster.is_empty() || c.cluster.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
        return Err(field_error("control_plane.cluster", format!("{:?} must be the name of an Envoy cluster", c.cluster)));
    }
    if c.authority.is_empty() || !c.authority.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(field_error("control_plane.authority", format!("{:?} must be a host name", c.authority)));
    }
    if !(1..=60).contains(&c.feed_wait_secs) {
        return Err(field_error("control_plane.feed_wait_secs", "must be within 1..=60"));
    }
    if let Some(age) = c.max_snapshot_age_secs {
        // The feed answers at least every feed_wait_secs when healthy; leave room for one retry.
        let floor = c.feed_wait_secs.saturating_mul(2).saturating_add(5);
        if age < floor {
            return Err(field_error(
                "control_plane.max_snapshot_age_secs",
                format!("{age} is too short: a healthy feed is heard every {}s; use at least {floor}", c.feed_wait_secs),
            ));
        }
    }
    if !(1..=300).contains(&c.usage_report_secs) {
        return Err(field_error("control_plane.usage_report_secs", "must be within 1..=300"));
    }
    if !(50..=10_000).contains(&c.rate_sync_ms) {
        return Err(field_error("control_plane.rate_sync_ms", "must be within 50..=10000"));
    }
    if !(64 * 1024..=256 * 1024 * 1024).contains(&c.max_feed_bytes) {
        return Err(field_error("control_plane.max_feed_bytes", "must be within 64 KiB..=256 MiB"));
    }
    if let Some(t) = &c.token {
        if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(field_error("control_plane.token", "must be at least 16 printable ASCII characters"));
        }
    }
    Ok(ControlPlane {
        cluster: c.cluster.clone(),
        authority: c.authority.clone(),
        feed_wait_secs: c.feed_wait_secs,
        max_snapshot_age_secs: c.max_snapshot_age_secs,
        usage_report_secs: c.usage_report_secs,
        max_feed_bytes: c.max_feed_bytes,
        token: c.token.clone(),
        rate_sync_ms: c.rate_sync_ms,
    })
}

/// RFC 9110 `token`, which header names must be.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn compile_action(scopes: Option<&Vec<String>>, public: bool, default_ok: bool) -> Result<Requirement, (&'static str, String)> {
    match (scopes, public) {
        (Some(_), true) => Err(("public", "a rule is either public or requires scopes, not both".into())),
        (None, true) => Ok(Requirement::Public),
        (None, false) if default_ok => Ok(Requirement::Scopes(Vec::new())),
        (None, false) => Err(("scopes", "give the scopes the route requires ([] for any valid key), or \"public\": true".into())),
        (Some(s), false) => match s.iter().find(|s| !valid_scope(s)) {
            Some(bad) => Err(("scopes", format!("invalid scope {bad:?}"))),
            None => Ok(Requirement::Scopes(s.clone())),
        },
    }
}

fn compile_rule(r: &RawRule) -> Result<Rule, (&'static str, String)> {
    let methods = match &r.methods {
        None => None,
        Some(ms) if ms.is_empty() => return Err(("methods", "must not be empty; omit it to match every method".into())),
        Some(ms) => Some(
            ms.iter()
                .map(|m| if is_token(m) { Ok(m.to_ascii_uppercase()) } else { Err(("methods", format!("{m:?} is not an HTTP method"))) })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let path = match &r.path {
        None => PathMatch::Any,
        Some(p) => match (&p.prefix, &p.exact, &p.regex) {
            (Some(v), None, None) if v.starts_with('/') => PathMatch::Prefix(v.clone()),
            (None, Some(v), None) if v.starts_with('/') => PathMatch::Exact(v.clone()),
            (Some(v), None, None) => return Err(("path.prefix", format!("{v:?} must start with '/'"))),
            (None, Some(v), None) => return Err(("path.exact", format!("{v:?} must start with '/'"))),
            (None, None, Some(v)) => {
                let re = regex_lite::Regex::new(&format!("^(?:{v})$")).map_err(|e| ("path.regex", format!("{v:?}: {e}")))?;
                PathMatch::Regex(re)
            }
            _ => return Err(("path", "give exactly one of prefix, exact or regex".into())),
        },
    };
    let host = match r.host.as_deref() {
        None | Some("*") => HostMatch::Any,
        Some(h) => {
            let (wild, name) = match h.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, h),
            };
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b)) {
                return Err(("host", format!("{h:?} must be a host name, optionally starting with \"*.\"")));
            }
            let name = name.to_ascii_lowercase();
            if wild {
                HostMatch::Suffix(format!(".{name}"))
            } else {
                HostMatch::Exact(name)
            }
        }
    };
    let requirement = compile_action(r.scopes.as_ref(), r.public, false)?;
    Ok(Rule { methods, path, host, requirement })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        match Config::from_json(json.as_bytes()) {
            Ok(_) => panic!("accepted: {json}"),
            Err(ConfigError::Field(f)) => f.field,
        }
    }

    #[test]
    fn empty_configuration_means_defaults() {
        for input in ["", "  ", "{}"] {
            let c = Config::from_json(input.as_bytes()).unwrap();
            assert_eq!(c.sources, Sources::default());
            assert_eq!(c.realm, "keyward");
            assert!(c.strip_credential && !c.require_tls && c.route_metadata);
            assert_eq!(c.default, Requirement::Scopes(vec![]));
            assert!(c.snapshot.is_none());
            assert_eq!(c.rate_limit_burst, Burst::Limit, "an idle client may spend the whole limit at once");
        }
    }

    #[test]
    fn rate_limit_burst_is_a_number_or_limit() {
        let check = |json: &str, want: Burst| assert_eq!(Config::from_json(json.as_bytes()).unwrap().rate_limit_burst, want, "{json}");
        check(r#"{"rate_limit_burst": "limit"}"#, Burst::Limit);
        check(r#"{"rate_limit_burst": 2}"#, Burst::Requests(2));
        check(r#"{}"#, Burst::Limit);
    }

    #[test]
    fn complete_configuration_compiles() {
        let c = Config::from_json(
            br#"{"realm": "api", "bearer_header": null, "api_key_header": "X-Token", "query_param": "api_key",
                "max_key_length": 128, "key_prefixes": ["kw_live"], "strip_credential": false,
                "require_tls": true, "trust_forwarded_proto": true,
                "implications": {"owner": ["admin"], "admin": ["read:all"]},
                "rules": [{"methods": ["get"], "path": {"regex": "/v1/items/[0-9]+"}, "host": "*.example.com", "scopes": ["read:all"]},
                          {"path": {"exact": "/healthz"}, "public": true}],
                "default": {"scopes": ["read:all"]}, "route_metadata": false,
                "snapshot": {"version": 3, "keys": []}}"#,
        )
        .unwrap();
        assert_eq!(c.sources.api_key_header.as_deref(), Some("x-token"));
        assert_eq!(c.sources.bearer_header, None);
        assert_eq!(c.rules.len(), 2);
        assert!(c.rules[0].matches("GET", "/v1/items/7", "a.example.com"));
        assert_eq!(c.rules[1].requirement, Requirement::Public);
        assert_eq!(c.implications.expand(["owner"]), ["admin", "owner", "read:all"]);
        assert_eq!(c.snapshot.map(|s| s.version), Some(3));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"realm": "a\"b"}"#, "realm"),
            (r#"{"realms": "x"}"#, "realms"),
            (r#"{"bearer_header": "bad header"}"#, "bearer_header"),
            (r#"{"api_key_header": "authorization"}"#, "api_key_header"),
            (r#"{"api_key_header": "x-keyward-agent"}"#, "api_key_header"),
            (r#"{"bearer_header": null, "api_key_header": null}"#, "bearer_header"),
            (r#"{"query_param": "a&b"}"#, "query_param"),
            (r#"{"max_key_length": 5}"#, "max_key_length"),
            (r#"{"max_key_length": "big"}"#, "max_key_length"),
            (r#"{"key_prefixes": ["kw", "_x"]}"#, "key_prefixes[1]"),
            (r#"{"implications": {"admin": ["a b"]}}"#, "implications"),
            (r#"{"rules": [{"scopes": []}, {"path": {"regex": "("}, "scopes": []}]}"#, "rules[1].path.regex"),
            (r#"{"rules": [{"path": {"prefix": "v1"}, "scopes": []}]}"#, "rules[0].path.prefix"),
            (r#"{"rules": [{"path": {"prefix": "/a", "exact": "/b"}, "scopes": []}]}"#, "rules[0].path"),
            (r#"{"rules": [{"path": {"prefix": "/a"}}]}"#, "rules[0].scopes"),
            (r#"{"rules": [{"scopes": ["a"], "public": true}]}"#, "rules[0].public"),
            (r#"{"rules": [{"methods": [], "scopes": []}]}"#, "rules[0].methods"),
            (r#"{"rules": [{"methods": ["G T"], "scopes": []}]}"#, "rules[0].methods"),
            (r#"{"rules": [{"host": "a b", "scopes": []}]}"#, "rules[0].host"),
            (r#"{"rules": [{"scopes": ["bad scope"]}]}"#, "rules[0].scopes"),
            (r#"{"rules": [{"scopes": [], "colour": "red"}]}"#, "rules[0].colour"),
            (r#"{"default": {"scopes": ["x"], "public": true}}"#, "default.public"),
            (r#"{"unavailable_retry_after_secs": 0}"#, "unavailable_retry_after_secs"),
            (r#"{"snapshot": {"keys": [{"digest": "00", "id": "a", "agent": "b"}]}}"#, "snapshot.keys[0].digest"),
            (r#"{"snapshot": {"keys": [{"digest": "00", "id": "a", "agent": "b", "key": "plaintext"}]}}"#, "snapshot.keys[0].key"),
            ("not json", "configuration"),
            (r#"{"control_plane": {"cluster": ""}}"#, "control_plane.cluster"),
            (r#"{"rate_limit_burst": 0}"#, "rate_limit_burst"),
            (r#"{"rate_limit_burst": "lots"}"#, "rate_limit_burst"),
            (r#"{"rate_limit_max_attempts": 0}"#, "rate_limit_max_attempts"),
            (r#"{"control_plane": {"cluster": "kw", "feed_wait_secs": 0}}"#, "control_plane.feed_wait_secs"),
            (r#"{"control_plane": {"cluster": "kw", "max_snapshot_age_secs": 10}}"#, "control_plane.max_snapshot_age_secs"),
            (r#"{"control_plane": {"cluster": "kw", "token": "short"}}"#, "control_plane.token"),
            (r#"{"control_plane": {"cluster": "kw", "colour": 1}}"#, "control_plane.colour"),
            (r#"{"control_plane": {"cluster": "kw"}, "snapshot": {"keys": []}}"#, "snapshot"),
        ];
        for (json, field) in cases {
            assert_eq!(err(json), field, "{json}");
        }
    }

    #[test]
    fn error_messages_say_why() {
        let e = Config::from_json(br#"{"rules": [{"path": {"regex": "("}, "scopes": []}]}"#).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("invalid keyward configuration: rules[0].path.regex: \"(\""), "{text}");
    }
}
