//! Domain types of the control plane, as the API and `--json` show them, and their validation.

use crate::error::{invalid, Result};
use keyward_core::scope::{valid_scope, Implications};
use keyward_core::snapshot::RateLimit;
use keyward_core::time::{format_rfc3339, parse_rfc3339};
use serde::{Deserialize, Serialize};

/// Keys expiring within this window are listed as `expiring`.
pub const EXPIRING_WINDOW_SECS: i64 = 7 * 86_400;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    pub id: String,
    pub name: String,
    pub description: String,
    pub scopes: Vec<String>,
    pub enabled: bool,
    pub rate_limit: Option<String>,
    /// Requests an idle client may send at once (`--burst`); none means the whole limit.
    pub burst: Option<u32>,
    /// Why API access is off (`agent disable --reason`), shown to API users.
    pub disabled_reason: Option<String>,
    pub created_at: String,
    pub active_keys: u64,
    /// The most recent use of any of its keys, as the Envoys reported it.
    pub last_used_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    /// Display prefix and last four characters, e.g. `kw_live_…Qa2b`.
    pub masked: String,
    pub agent: String,
    /// Effective scopes: the key's own (or its agent's) with implications, intersected with
    /// its agent's. This is what the filter enforces.
    pub scopes: Vec<String>,
    /// The scopes set on the key itself; `None` inherits the agent's.
    pub own_scopes: Option<Vec<String>>,
    pub path_prefixes: Vec<String>,
    /// The effective limit: the key's own, or its agent's.
    pub rate_limit: Option<String>,
    /// The effective burst, with the effective limit.
    pub burst: Option<u32>,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
    /// `active`, `expiring`, `expired` or `revoked`.
    pub status: String,
    pub imported: bool,
    pub rotated_from: Option<String>,
    pub rotated_to: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedKey {
    pub key: KeyView,
    /// The full key. Shown once; never stored.
    pub secret: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedAgent {
    pub agent: AgentView,
    pub key: KeyView,
    pub secret: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentDetail {
    pub agent: AgentView,
    pub keys: Vec<KeyView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotated {
    pub old: KeyView,
    pub new: CreatedKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub snapshot_version: u64,
    pub agents: u64,
    pub active_keys: u64,
    /// A `keyward serve` publishes this store now; without one no Envoy sees changes.
    pub serving: bool,
    /// The store's engine: `sqlite` or `postgres`.
    #[serde(default)]
    pub engine: String,
    /// The `keyward serve` processes on this store, heard from within the last few seconds.
    #[serde(default)]
    pub replicas: Vec<ReplicaView>,
    pub envoys: Vec<EnvoyView>,
    /// How the fleet's rate limits are enforced now, as the running `keyward serve` replicas
    /// last said (every 2 s); absent when none has said so within 10 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<RateLimitsView>,
}

/// The fleet's rate limits, as `keyward status` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitsView {
    /// `global` (counted in the rate store) or `split` (each Envoy enforces limit/envoys).
    pub mode: String,
    /// Envoys connected now: what a limit is split across.
    pub envoys: u64,
    /// The rate store (`serve --rate-store`), without its password; absent: none configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Whether every replica reaches the rate store; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    /// Since when it has been healthy (or unreachable), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The buckets with the most requests in their current window, fleet-wide (global mode).
    #[serde(default)]
    pub hot: Vec<HotBucket>,
}

/// One bucket's fleet-wide consumption in its current window, against its limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotBucket {
    pub bucket: String,
    /// Requests the fleet admitted in the bucket's current window.
    pub used: u64,
    /// The limit: `count` requests per `period_secs`.
    pub count: u32,
    pub period_secs: u32,
}

/// What one `keyward serve` replica says of its rate limits (the `runtime` row `rates:<replica>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatesRuntime {
    /// The rate store, without its password; absent: split only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// The rate store answered this replica's last call.
    #[serde(default)]
    pub healthy: bool,
    /// Unix seconds since the store has been healthy or unreachable.
    #[serde(default)]
    pub since: i64,
    #[serde(default)]
    pub hot: Vec<HotBucket>,
}

/// A `keyward serve` process on the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaView {
    pub name: String,
    pub started_at: String,
    pub last_seen: String,
}

/// An Envoy seen on the feed by this `keyward serve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvoyView {
    pub id: String,
    pub applied_version: u64,
    /// Versions behind the store.
    pub lag: u64,
    pub last_seen: String,
    /// Heard from within its feed request's wait plus 2 s, by a `keyward serve` running now.
    pub connected: bool,
    /// `connected`, `lagging` (connected, behind the store), or `stale` (not heard from).
    pub state: String,
    /// The `keyward serve` replica whose feed it last asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// The shell keyward runs in there: `wasm` (keyward.wasm) or `native` (libkeyward.so).
    #[serde(default = "wasm_shell")]
    pub shell: String,
}

/// What an older `keyward serve`'s status (without `shell`) means: every Envoy ran keyward.wasm.
fn wasm_shell() -> String {
    "wasm".into()
}

/// How a change reached the Envoys: returned by every changing command and API call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The snapshot version the change committed.
    pub version: u64,
    /// Whether a `keyward serve` is publishing this store (always true through the API).
    pub serving: bool,
    /// Whether the caller waited (false with `--no-wait` / `?wait=false`).
    pub waited: bool,
    /// Envoys connected when the wait ended.
    pub envoys: u64,
    /// How many of them have applied `version`.
    pub applied: u64,
    /// The connected Envoys that have not applied it yet.
    pub pending: Vec<String>,
    pub elapsed_ms: u64,
}

/// Requests made with one key in one hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    pub key_id: String,
    pub key_name: String,
    pub agent: String,
    /// Start of the hour, RFC 3339.
    pub hour: String,
    pub count: u64,
    /// Refused requests with this key in that hour, by contract code.
    #[serde(default)]
    pub denied: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub details: serde_json::Value,
    pub version: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAgent {
    pub name: String,
    pub scopes: Vec<String>,
    #[serde(default)]
    pub rate: Option<String>,
    /// At most the limit's N; default N.
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub description: Option<String>,
}

/// A key to create (`secret` absent) or import (`key` or `digest` present).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub agent: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// RFC 3339.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// `90d`, `24h`, `30m`, `45s`.
    #[serde(default)]
    pub ttl: Option<String>,
    #[serde(default)]
    pub rate: Option<String>,
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub path_prefixes: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportKey {
    #[serde(flatten)]
    pub key: NewKey,
    /// The existing key in plaintext; hashed on arrival, never stored.
    #[serde(default)]
    pub secret: Option<String>,
    /// Or its SHA-256, 64 hex digits.
    #[serde(default)]
    pub digest: Option<String>,
    /// Accept a key shorter than 16 characters.
    #[serde(default)]
    pub allow_weak: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {
    /// How long the old key keeps working, e.g. `24h`; default 24h.
    #[serde(default)]
    pub grace: Option<String>,
    /// The new key's lifetime from now, e.g. `90d`. Default: the old key's original lifetime.
    #[serde(default)]
    pub ttl: Option<String>,
    /// The new key's expiry, RFC 3339.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// The new key never expires.
    #[serde(default)]
    pub no_expiry: bool,
}

/// Absent leaves a field alone; `null` clears it (a JSON merge patch, RFC 7396).
fn patch<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> std::result::Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// A field that can be changed but not cleared: `null` is refused rather than ignored.
fn no_null<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> std::result::Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)?
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom("null is not allowed for this field; leave it out to keep its value"))
}

/// `PATCH /v1/agents/{name}` and `agent update`: only the fields present change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentUpdate {
    #[serde(default, deserialize_with = "no_null", skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Replaces the agent's scopes.
    #[serde(default, deserialize_with = "no_null", skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add_scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_scopes: Vec<String>,
    /// A rate limit, or `null` for none.
    #[serde(default, deserialize_with = "patch", skip_serializing_if = "Option::is_none")]
    pub rate: Option<Option<String>>,
    /// A burst, or `null` for the whole limit.
    #[serde(default, deserialize_with = "patch", skip_serializing_if = "Option::is_none")]
    pub burst: Option<Option<u32>>,
}

/// `PATCH /v1/keys/{id}` and `key update`: only the fields present change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyUpdate {
    #[serde(default, deserialize_with = "no_null", skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The key's scopes (a subset of its agent's), or `null` to inherit the agent's.
    #[serde(default, deserialize_with = "patch", skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Option<Vec<String>>>,
    /// RFC 3339, or `null` for no expiry.
    #[serde(default, deserialize_with = "patch", skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Option<String>>,
    /// A lifetime from now, e.g. `30d` (instead of `expires_at`).
    #[serde(default, deserialize_with = "no_null", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// A rate limit overriding the agent's, or `null` to use the agent's.
    #[serde(default, deserialize_with = "patch", skip_serializing_if = "Option::is_none")]
    pub rate: Option<Option<String>>,
    #[serde(default, deserialize_with = "patch", skip_serializing_if = "Option::is_none")]
    pub burst: Option<Option<u32>>,
    /// Replaces the path restrictions; an empty list removes them.
    #[serde(default, deserialize_with = "no_null", skip_serializing_if = "Option::is_none")]
    pub path_prefixes: Option<Vec<String>>,
}

/// `POST /v1/agents/{name}/disable`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisableAgent {
    /// Shown to API users as the `ACCESS_DISABLED` message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One scope of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeView {
    pub name: String,
    pub description: String,
    /// Scopes this one implies directly.
    pub implies: Vec<String>,
    /// Live agents and keys that carry it.
    pub agents: u64,
    pub keys: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewScope {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// `POST /v1/scopes/{name}/implies`: `name` implies `implies` (or no longer, with `remove`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Imply {
    pub implies: String,
    #[serde(default)]
    pub remove: bool,
}

pub fn name_ok(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 {
        return Err(invalid(field, format!("{name:?} must be 1 to 64 characters")));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b" ._-".contains(&b)) || name.starts_with(' ') || name.ends_with(' ') {
        return Err(invalid(field, format!("{name:?} may contain only letters, digits, spaces, '.', '_' and '-'")));
    }
    Ok(())
}

pub fn scopes_ok(field: &'static str, scopes: &[String]) -> Result<()> {
    match scopes.iter().find(|s| !valid_scope(s)) {
        Some(bad) => Err(invalid(field, format!("{bad:?} is not a valid scope (no spaces, commas, quotes or backslashes)"))),
        None => Ok(()),
    }
}

/// Splits `read:all,write:all` (commas or spaces) into scopes, unique, in order.
pub fn split_scopes(s: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in keyward_core::scope::split_list(s) {
        if !out.iter().any(|x| x == t) {
            out.push(t.to_string());
        }
    }
    out
}

/// A key's scopes must be a subset of its agent's, implications included.
pub fn subset_ok(key: &[String], agent: &[String], agent_name: &str, implications: &Implications) -> Result<()> {
    let allowed = implications.expand(agent.iter().map(String::as_str));
    match key.iter().find(|s| !allowed.contains(s)) {
        Some(bad) => Err(invalid(
            "scopes",
            format!("{bad:?} is not among agent {agent_name}'s scopes ({}); a key can narrow its agent's scopes, never widen them", agent.join(" ")),
        )),
        None => Ok(()),
    }
}

pub fn rate_ok(field: &'static str, rate: &str) -> Result<()> {
    RateLimit::parse(rate).map(|_| ()).map_err(|e| invalid(field, e))
}

/// A burst qualifies a rate limit: between 1 and the limit's N.
pub fn burst_ok(burst: Option<u32>, rate: Option<&str>) -> Result<()> {
    let Some(b) = burst else { return Ok(()) };
    let Some(rate) = rate else {
        return Err(invalid("burst", "a burst needs a rate limit on the same agent or key"));
    };
    let limit = RateLimit::parse(rate).map_err(|e| invalid("rate", e))?;
    if b == 0 || b > limit.count {
        return Err(invalid("burst", format!("{b} must be between 1 and the limit's {} requests", limit.count)));
    }
    Ok(())
}

/// A limit and its burst after an edit: each patch is absent (keep), `None` (clear) or a value.
/// Clearing the limit clears its burst, unless a burst is given (and then refused).
pub fn patched_limit(
    current: (Option<String>, Option<u32>),
    rate: Option<Option<String>>,
    burst: Option<Option<u32>>,
) -> Result<(Option<String>, Option<u32>)> {
    let burst_given = burst.is_some();
    let new_rate = rate.unwrap_or(current.0);
    let new_burst = match (burst, &new_rate) {
        (Some(b), _) => b,
        (None, None) => None,
        (None, Some(_)) => current.1,
    };
    match burst_ok(new_burst, new_rate.as_deref()) {
        // The kept burst no longer fits the new limit: the rate is what changed.
        Err(_) if !burst_given => Err(invalid(
            "rate",
            format!(
                "the existing burst of {} is above the new limit's {}; lower the burst too",
                new_burst.unwrap_or(0),
                new_rate.as_deref().unwrap_or("-")
            ),
        )),
        other => other.map(|()| (new_rate, new_burst)),
    }
}

/// The effective scopes of a key: its own (or its agent's) with implications, intersected with
/// its agent's with implications. Sorted and unique: what the filter enforces.
pub fn effective_scopes(own: Option<&[String]>, agent: &[String], implications: &Implications) -> Vec<String> {
    let allowed = implications.expand(agent.iter().map(String::as_str));
    match own {
        None => allowed,
        Some(own) => implications.expand(own.iter().map(String::as_str)).into_iter().filter(|s| allowed.contains(s)).collect(),
    }
}

/// A name for the scope catalogue: lowercase letters, digits and `:._-`, 1 to 64 characters.
pub fn scope_name_ok(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b":._-".contains(&b)) {
        return Err(invalid(field, format!("{name:?} must be 1 to 64 lowercase letters, digits, ':', '.', '_' or '-'")));
    }
    Ok(())
}

/// Every scope must be in the catalogue; an unknown one is refused with the nearest known name.
pub fn known_scopes_ok(field: &'static str, scopes: &[String], catalogue: &[String]) -> Result<()> {
    for s in scopes {
        if catalogue.iter().any(|c| c == s) {
            continue;
        }
        let lower = s.to_ascii_lowercase();
        let nearest = catalogue
            .iter()
            .map(|c| (strsim::damerau_levenshtein(&lower, c), c))
            .filter(|(d, c)| *d <= 2.max(c.len() / 3))
            .min_by_key(|(d, _)| *d);
        let hint = match nearest {
            Some((_, c)) => format!("did you mean {c:?}?"),
            None => format!("known scopes: {}; add it to the catalogue first", catalogue.join(" ")),
        };
        return Err(invalid(field, format!("{s:?} is not in the scope catalogue; {hint}")));
    }
    Ok(())
}

/// Parses `90d`, `24h`, `30m`, `45s` (or combinations like `1h30m`) into seconds.
pub fn parse_duration(field: &'static str, s: &str) -> Result<i64> {
    let bad = || invalid(field, format!("{s:?} is not a duration; write e.g. 90d, 24h, 30m or 45s"));
    let mut total: i64 = 0;
    let mut num = String::new();
    let mut seen_unit = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: i64 = num.parse().map_err(|_| bad())?;
        let unit = match c {
            'd' => 86_400,
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
        num.clear();
        seen_unit = true;
    }
    if !num.is_empty() || !seen_unit {
        return Err(bad());
    }
    Ok(total)
}

/// Resolves `expires_at` / `ttl` into Unix seconds, which must be in the future.
pub fn expiry(expires_at: Option<&str>, ttl: Option<&str>, now: i64) -> Result<Option<i64>> {
    let at = match (expires_at, ttl) {
        (Some(_), Some(_)) => return Err(invalid("expires_at", "give an expiry time or a TTL, not both")),
        (Some(t), None) => parse_rfc3339(t).ok_or_else(|| invalid("expires_at", format!("{t:?} is not an RFC 3339 time, e.g. 2027-01-31T00:00:00Z")))?,
        (None, Some(ttl)) => {
            let secs = parse_duration("ttl", ttl)?;
            if secs == 0 {
                return Err(invalid("ttl", "must be longer than 0s"));
            }
            now.saturating_add(secs)
        }
        (None, None) => return Ok(None),
    };
    if at <= now {
        return Err(invalid("expires_at", format!("{} is not in the future", format_rfc3339(at))));
    }
    Ok(Some(at))
}

pub fn description_ok(description: &str) -> Result<()> {
    if description.chars().count() > 1024 || description.chars().any(char::is_control) {
        return Err(invalid("description", "must be at most 1024 characters, without control characters"));
    }
    Ok(())
}

pub fn path_prefixes_ok(prefixes: &[String]) -> Result<()> {
    match prefixes.iter().find(|p| !p.starts_with('/') || p.chars().any(|c| c.is_whitespace() || c.is_control())) {
        Some(bad) => Err(invalid("path_prefixes", format!("{bad:?} must be a path starting with '/'"))),
        None => Ok(()),
    }
}

/// A key can be rotated or changed only while it lives: not revoked, not expired, and not
/// already superseded by a rotation. `action` says what the caller wanted ("rotate").
pub fn live_key_ok(id: &str, revoked_at: Option<i64>, expires_at: Option<i64>, rotated_to: Option<&str>, now: i64, action: &str) -> Result<()> {
    let refuse = |message: String| Err(crate::error::Error::Conflict { field: "id", message });
    match key_status(revoked_at, expires_at, rotated_to.is_some(), now) {
        "revoked" => return refuse(format!("key {id} is revoked; create a new key instead")),
        "expired" => return refuse(format!("key {id} has expired; create a new key instead")),
        _ => {}
    }
    if let Some(next) = rotated_to {
        return refuse(format!("key {id} was rotated to {next}; {action} that one"));
    }
    Ok(())
}

/// The `key list` status of a key at `now`.
pub fn key_status(revoked_at: Option<i64>, expires_at: Option<i64>, rotated_to: bool, now: i64) -> &'static str {
    match (revoked_at, expires_at) {
        (Some(_), _) => "revoked",
        (None, Some(t)) if t <= now => "expired",
        (None, Some(t)) if t - now <= EXPIRING_WINDOW_SECS || rotated_to => "expiring",
        _ => "active",
    }
}

pub fn rfc3339(t: Option<i64>) -> Option<String> {
    t.map(format_rfc3339)
}

/// A rotation's expiries: the old key's (now plus the grace period, never later than it was
/// meant to expire) and the new key's. By default the new key lives as long as the old one was
/// meant to, counted from now; a key that never expired gives one that never expires.
pub fn rotation_expiry(created_at: i64, expires_at: Option<i64>, now: i64, grace: i64, chosen: Option<i64>, no_expiry: bool) -> (i64, Option<i64>) {
    let new = match (no_expiry, chosen) {
        (true, _) => None,
        (false, Some(t)) => Some(t),
        (false, None) => expires_at.map(|t| now.saturating_add(t - created_at)),
    };
    let old = now.saturating_add(grace);
    (expires_at.map_or(old, |t| t.min(old)), new)
}

/// A key's effective rate limit: its own, else its agent's; and the bucket that counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub rate: Option<String>,
    pub burst: Option<u32>,
    /// `k:<lineage>` for a key's own limit (shared along its rotations), `a:<agent id>` for an
    /// agent's (shared by all its keys), none without a limit.
    pub bucket: Option<String>,
}

/// The limit a key is held to, from its own `(rate, burst)` and its agent's. A burst counts
/// only with the rate it was set with: an agent's burst never applies to a key's own rate.
pub fn effective_limit(key: (Option<&str>, Option<u32>), agent: (Option<&str>, Option<u32>), lineage: &str, agent_id: &str) -> Limit {
    match (key, agent) {
        ((Some(rate), burst), _) => Limit { rate: Some(rate.into()), burst, bucket: Some(format!("k:{lineage}")) },
        ((None, _), (Some(rate), burst)) => Limit { rate: Some(rate.into()), burst, bucket: Some(format!("a:{agent_id}")) },
        ((None, _), (None, _)) => Limit { rate: None, burst: None, bucket: None },
    }
}

/// The status a filter record carries: revoked or active. Expiry travels as its own field, so
/// the filter flips the key at the second it expires, whatever the store last sent.
pub fn record_status(revoked_at: Option<i64>) -> keyward_core::snapshot::KeyStatus {
    match revoked_at {
        Some(_) => keyward_core::snapshot::KeyStatus::Revoked,
        None => keyward_core::snapshot::KeyStatus::Active,
    }
}

/// How a key is shown after creation: its display prefix and last four, or, for a key imported
/// by digest (or too short to show any of), the digest's first eight hex digits.
pub fn masked(display_prefix: &str, last4: &str, digest: &str) -> String {
    if last4.is_empty() {
        format!("sha256:{}…", digest.get(..8).unwrap_or(""))
    } else {
        format!("{display_prefix}…{last4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keys_own_limit_wins_and_buckets_follow_who_set_it() {
        let l = |key: (Option<&str>, Option<u32>), agent: (Option<&str>, Option<u32>)| effective_limit(key, agent, "key_L", "agt_A");
        let lim = |rate: Option<&str>, burst: Option<u32>, bucket: Option<&str>| Limit {
            rate: rate.map(Into::into),
            burst,
            bucket: bucket.map(Into::into),
        };
        let cases = [
            ((None, None), (None, None), lim(None, None, None)),
            ((Some("10/s"), None), (None, None), lim(Some("10/s"), None, Some("k:key_L"))),
            ((Some("10/s"), Some(20)), (Some("5/s"), Some(7)), lim(Some("10/s"), Some(20), Some("k:key_L"))),
            // The agent's burst goes with the agent's rate, never with the key's own.
            ((Some("10/s"), None), (Some("5/s"), Some(7)), lim(Some("10/s"), None, Some("k:key_L"))),
            ((None, None), (Some("5/s"), Some(7)), lim(Some("5/s"), Some(7), Some("a:agt_A"))),
            // A stale key burst without a key rate means nothing.
            ((None, Some(3)), (Some("5/s"), None), lim(Some("5/s"), None, Some("a:agt_A"))),
            ((None, Some(3)), (None, None), lim(None, None, None)),
        ];
        for (key, agent, want) in cases {
            assert_eq!(l(key, agent), want, "key {key:?} agent {agent:?}");
        }
    }

    #[test]
    fn rotations_keep_the_lifetime_and_cap_the_grace() {
        let h = 3600;
        // (created, expires, now, grace, chosen, no_expiry) -> (old expiry, new expiry)
        let cases = [
            ((0, Some(10 * h), 2 * h, h, None, false), (3 * h, Some(12 * h))),
            ((0, None, 2 * h, h, None, false), (3 * h, None)),
            ((0, Some(10 * h), 2 * h, h, Some(5 * h), false), (3 * h, Some(5 * h))),
            ((0, Some(10 * h), 2 * h, h, None, true), (3 * h, None)),
            // A grace period never outlives the old key's own expiry.
            ((0, Some(2 * h + 60), 2 * h, h, None, false), (2 * h + 60, Some(4 * h + 60))),
        ];
        for ((c, e, n, g, ch, ne), want) in cases {
            assert_eq!(rotation_expiry(c, e, n, g, ch, ne), want, "{c} {e:?} {n} {g} {ch:?} {ne}");
        }
    }

    #[test]
    fn records_carry_revocation_and_views_mask_keys() {
        use keyward_core::snapshot::KeyStatus;
        assert_eq!(record_status(None), KeyStatus::Active);
        assert_eq!(record_status(Some(5)), KeyStatus::Revoked);
        assert_eq!(masked("kw_live_", "abcd", "0123456789"), "kw_live_…abcd");
        assert_eq!(masked("", "", "0123456789"), "sha256:01234567…");
    }

    #[test]
    fn durations_parse_and_name_their_field() {
        let check = |s: &str, want: Option<i64>| assert_eq!(parse_duration("ttl", s).ok(), want, "{s}");
        check("90d", Some(90 * 86_400));
        check("24h", Some(86_400));
        check("1h30m", Some(5400));
        check("45s", Some(45));
        check("0s", Some(0));
        for bad in ["", "d", "10", "10x", "-1h", "1.5h", "99999999999999999999d"] {
            check(bad, None);
        }
        assert_eq!(parse_duration("grace", "x").unwrap_err().field(), Some("grace"));
    }

    #[test]
    fn expiry_must_be_in_the_future_and_unambiguous() {
        let now = 1_800_000_000;
        assert_eq!(expiry(None, None, now).unwrap(), None);
        assert_eq!(expiry(None, Some("1d"), now).unwrap(), Some(now + 86_400));
        assert_eq!(expiry(Some("2027-01-15T08:00:01Z"), None, now).unwrap(), Some(now + 1));
        for (e, t, field) in [
            (Some("2027-01-15T08:00:00Z"), None, "expires_at"),
            (Some("2020-01-01T00:00:00Z"), None, "expires_at"),
            (Some("tomorrow"), None, "expires_at"),
            (Some("2030-01-01T00:00:00Z"), Some("1d"), "expires_at"),
            (None, Some("0s"), "ttl"),
            (None, Some("soon"), "ttl"),
        ] {
            assert_eq!(expiry(e, t, now).unwrap_err().field(), Some(field), "{e:?} {t:?}");
        }
    }

    #[test]
    fn key_scopes_must_narrow_the_agents() {
        let agent = vec!["admin".to_string(), "webhook".to_string()];
        let imp = Implications::default();
        assert!(subset_ok(&["read:all".into(), "webhook".into()], &agent, "a", &imp).is_ok());
        assert!(subset_ok(&[], &agent, "a", &imp).is_ok());
        let err = subset_ok(&["billing".into()], &agent, "a", &imp).unwrap_err();
        assert_eq!(err.field(), Some("scopes"));
        assert!(err.to_string().contains("\"billing\""), "{err}");
        assert!(subset_ok(&["admin".into()], &["read:all".into()], "a", &imp).is_err());
    }

    #[test]
    fn effective_scopes_are_key_and_agent_with_implications() {
        let imp = Implications::default();
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let check = |own: Option<&[&str]>, agent: &[&str], want: &[&str]| {
            let own = own.map(v);
            assert_eq!(effective_scopes(own.as_deref(), &v(agent), &imp), v(want), "{own:?} {agent:?}");
        };
        check(None, &["admin"], &["admin", "read:all", "write:all"]);
        check(Some(&["read:all"]), &["admin"], &["read:all"]);
        // The agent lost write:all: its key that had it is narrowed at once.
        check(Some(&["read:all", "write:all"]), &["read:all"], &["read:all"]);
        check(Some(&["admin"]), &["read:all"], &["read:all"]);
        check(Some(&["webhook"]), &["read:all"], &[]);
    }

    #[test]
    fn edits_to_a_limit_keep_or_clear_its_burst() {
        let cur = |r: Option<&str>, b: Option<u32>| (r.map(str::to_string), b);
        let check = |current: (Option<String>, Option<u32>), rate: Option<Option<&str>>, burst: Option<Option<u32>>, want: Option<(Option<&str>, Option<u32>)>| {
            let got = patched_limit(current.clone(), rate.map(|r| r.map(str::to_string)), burst).ok();
            let want = want.map(|(r, b)| (r.map(str::to_string), b));
            assert_eq!(got, want, "{current:?} {rate:?} {burst:?}");
        };
        check(cur(Some("60/min"), Some(10)), None, None, Some((Some("60/min"), Some(10))));
        check(cur(Some("60/min"), Some(10)), Some(Some("120/min")), None, Some((Some("120/min"), Some(10))));
        check(cur(Some("60/min"), Some(10)), Some(None), None, Some((None, None)));
        check(cur(Some("60/min"), Some(10)), None, Some(None), Some((Some("60/min"), None)));
        check(cur(Some("60/min"), None), None, Some(Some(60)), Some((Some("60/min"), Some(60))));
        check(cur(Some("60/min"), None), None, Some(Some(61)), None);
        check(cur(Some("60/min"), Some(50)), Some(Some("10/min")), None, None);
        let err = patched_limit(cur(Some("60/min"), Some(50)), Some(Some("10/min".into())), None).unwrap_err();
        assert_eq!(err.field(), Some("rate"), "the flag the user passed is blamed");
        check(cur(None, None), None, Some(Some(1)), None);
        check(cur(Some("60/min"), Some(10)), Some(None), Some(Some(5)), None);
    }

    #[test]
    fn unknown_scopes_suggest_the_nearest_known_one() {
        let cat = vec!["read:all".to_string(), "write:all".to_string(), "admin".to_string()];
        let msg = |s: &str| known_scopes_ok("scopes", &[s.to_string()], &cat).unwrap_err().message();
        assert!(msg("Read:All").contains("did you mean \"read:all\""), "{}", msg("Read:All"));
        assert!(msg("read_all").contains("did you mean \"read:all\""));
        assert!(msg("wrte:all").contains("did you mean \"write:all\""));
        assert!(msg("billing").contains("known scopes: read:all write:all admin"));
        assert!(known_scopes_ok("scopes", &cat, &cat).is_ok());
        assert!(burst_ok(Some(10), Some("10/s")).is_ok());
        assert_eq!(burst_ok(Some(11), Some("10/s")).unwrap_err().field(), Some("burst"));
        assert_eq!(burst_ok(Some(0), Some("10/s")).unwrap_err().field(), Some("burst"));
        assert_eq!(burst_ok(Some(1), None).unwrap_err().field(), Some("burst"));
        assert!(scope_name_ok("name", "billing:read").is_ok());
        assert!(scope_name_ok("name", "Billing").is_err());
    }

    #[test]
    fn only_live_keys_can_be_rotated_or_changed() {
        let check = |revoked: Option<i64>, expires: Option<i64>, rotated: Option<&str>, want: Option<&str>| {
            let got = live_key_ok("key_1", revoked, expires, rotated, 1000, "change").err().map(|e| e.message());
            match (got, want) {
                (None, None) => {}
                (Some(m), Some(w)) => assert!(m.contains(w), "{m}"),
                (got, want) => panic!("{got:?} but wanted {want:?}"),
            }
        };
        check(None, None, None, None);
        check(None, Some(1001), None, None);
        check(Some(900), None, None, Some("is revoked"));
        check(None, Some(1000), None, Some("has expired"));
        check(None, None, Some("key_2"), Some("was rotated to key_2; change that one"));
    }

    #[test]
    fn statuses_follow_time() {
        let now = 1000;
        assert_eq!(key_status(Some(1), None, false, now), "revoked");
        assert_eq!(key_status(None, Some(1000), false, now), "expired");
        assert_eq!(key_status(None, Some(1001), false, now), "expiring");
        assert_eq!(key_status(None, Some(now + EXPIRING_WINDOW_SECS + 1), false, now), "active");
        assert_eq!(key_status(None, Some(now + EXPIRING_WINDOW_SECS + 1), true, now), "expiring");
        assert_eq!(key_status(None, None, false, now), "active");
    }

    #[test]
    fn names_scopes_rates_and_paths_are_checked() {
        assert!(name_ok("name", "billing-service v2").is_ok());
        for bad in ["", " x", "x ", "a/b", "ключ", &"x".repeat(65)] {
            assert_eq!(name_ok("name", bad).unwrap_err().field(), Some("name"), "{bad:?}");
        }
        assert!(scopes_ok("scopes", &["read:all".into()]).is_ok());
        assert!(scopes_ok("scopes", &["read all".into()]).is_err());
        assert!(rate_ok("rate", "100/min").is_ok());
        assert_eq!(rate_ok("rate", "100/week").unwrap_err().field(), Some("rate"));
        assert!(path_prefixes_ok(&["/v1/projects/42".into()]).is_ok());
        assert!(path_prefixes_ok(&["v1".into()]).is_err());
        assert_eq!(split_scopes("read:all, write:all read:all"), ["read:all", "write:all"]);
    }
}

/// What an admin may do. A viewer reads everything and changes nothing; an editor also manages
/// agents and keys; an owner also manages admins and the scope catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminRole {
    Viewer,
    Editor,
    Owner,
}

/// The kinds of act a role is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Read anything: agents, keys, usage, the Envoys, the audit log, the admins.
    Read,
    /// Create, edit, rotate, revoke, disable and delete agents and keys.
    ManageKeys,
    /// Change the scope catalogue, the admins, and the store itself.
    Own,
}

impl AdminRole {
    pub const ALL: [AdminRole; 3] = [AdminRole::Owner, AdminRole::Editor, AdminRole::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::Owner => "owner",
            AdminRole::Editor => "editor",
            AdminRole::Viewer => "viewer",
        }
    }

    pub fn parse(field: &'static str, s: &str) -> Result<AdminRole> {
        AdminRole::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| invalid(field, format!("{s:?} is not a role; use owner, editor or viewer")))
    }

    pub fn allows(self, p: Permission) -> bool {
        match p {
            Permission::Read => true,
            Permission::ManageKeys => self >= AdminRole::Editor,
            Permission::Own => self == AdminRole::Owner,
        }
    }

    /// What a refusal says: the role, and the role that would be needed.
    pub fn refusal(self, p: Permission) -> String {
        let (needed, what) = match p {
            Permission::Read => ("viewer", "read"),
            Permission::ManageKeys => ("editor", "manage agents and keys"),
            Permission::Own => ("owner", "manage admins and the scope catalogue"),
        };
        format!("the {} role cannot {what}; it takes the {needed} role", self.as_str())
    }
}

/// Someone acting through the API or the console: a named admin, or the bootstrap token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The name the audit log records.
    pub name: String,
    pub role: AdminRole,
}

impl Actor {
    /// The bootstrap admin token (`keyward serve` prints it; `admin-token rotate` replaces it):
    /// an owner, named `api` in the audit log as before admins existed.
    pub fn bootstrap() -> Actor {
        Actor { name: "api".into(), role: AdminRole::Owner }
    }
}

/// Which audit entries to list; every field narrows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub agent: Option<String>,
    pub action: Option<String>,
}

/// `POST /v1/admins`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAdmin {
    pub name: String,
    pub role: String,
}

/// An admin as listed: never a token or its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminView {
    pub name: String,
    pub role: AdminRole,
    pub status: String,
    pub created_at: String,
    /// When the current personal token was issued.
    pub token_issued_at: String,
    pub disabled_at: Option<String>,
}

/// An admin with a new personal token, shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminWithToken {
    #[serde(flatten)]
    pub admin: AdminView,
    pub token: String,
}

#[cfg(test)]
mod role_tests {
    use super::*;

    #[test]
    fn each_role_allows_exactly_its_permissions() {
        let table = [
            (AdminRole::Viewer, [true, false, false]),
            (AdminRole::Editor, [true, true, false]),
            (AdminRole::Owner, [true, true, true]),
        ];
        for (role, want) in table {
            let got = [Permission::Read, Permission::ManageKeys, Permission::Own].map(|p| role.allows(p));
            assert_eq!(got, want, "{role:?}");
        }
    }

    #[test]
    fn roles_parse_by_name_and_name_the_choices_otherwise() {
        for r in AdminRole::ALL {
            assert_eq!(AdminRole::parse("role", r.as_str()).ok(), Some(r));
        }
        let e = AdminRole::parse("role", "root").err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(e, "role: \"root\" is not a role; use owner, editor or viewer");
        assert!(AdminRole::parse("role", "Owner").is_err());
    }

    #[test]
    fn a_refusal_names_the_role_needed() {
        assert_eq!(
            AdminRole::Viewer.refusal(Permission::ManageKeys),
            "the viewer role cannot manage agents and keys; it takes the editor role"
        );
    }
}
