//! The key snapshot: digest → key record, the only key data the filter ever holds.
//!
//! The wire form ([`RawSnapshot`]) is what the plugin configuration's inline `snapshot` and the
//! control plane's feed carry. It is compiled once into [`Snapshot`], so a request does one hash
//! lookup and no parsing.

use crate::config::FieldError;
use crate::digest::Digest;
use crate::scope::{valid_scope, Implications};
use crate::time::parse_rfc3339;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    #[default]
    Active,
    Revoked,
}

/// A timestamp as Unix seconds or RFC 3339 text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawTime {
    Unix(i64),
    Text(String),
}

/// One key as it travels: digests only, never the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeyRecord {
    /// SHA-256 of the key, 64 hex digits.
    pub digest: String,
    pub id: String,
    pub agent: String,
    #[serde(default)]
    pub status: KeyStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<RawTime>,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub agent_enabled: bool,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_prefixes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// When the key was superseded by a rotation (Unix seconds). Responses to it then carry
    /// `Deprecation` (RFC 9745) and, with `expires_at`, `Sunset` (RFC 8594).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecated_at: Option<i64>,
    /// Which budget the rate limit draws on. Keys with the same bucket share it: all keys of an
    /// agent with an agent limit, and every key of one rotation lineage. Default: the key's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_bucket: Option<String>,
    /// How many requests an idle client may send at once, at most the limit's `N`. Default: `N`
    /// (the whole limit). Set by `--burst` on the key or its agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,
    /// Why the agent's API access is off (`agent disable --reason`): the `ACCESS_DISABLED`
    /// message. Only meaningful with `agent_enabled: false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSnapshot {
    #[serde(default)]
    pub version: u64,
    /// The control plane's scope catalogue implications (`scope imply`). When present, records
    /// are compiled with these instead of the filter configuration's `implications`, so the
    /// filter and the control plane never disagree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub implications: Option<std::collections::BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    pub keys: Vec<RawKeyRecord>,
}

/// A rate limit: at most `count` requests per `period_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub period_secs: u32,
}

impl RateLimit {
    /// Parses `N/s`, `N/min`, `N/h` or `N/day` with `N` ≥ 1.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a rate limit; expected N/s, N/min, N/h or N/day");
        let (n, unit) = s.split_once('/').ok_or_else(bad)?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let count: u32 = n.parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!("{s:?}: the count must be at least 1"));
        }
        let period_secs = match unit {
            "s" => 1,
            "min" => 60,
            "h" => 3600,
            "day" => 86_400,
            _ => return Err(bad()),
        };
        Ok(RateLimit { count, period_secs })
    }
}

/// A compiled key record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub agent: String,
    pub status: KeyStatus,
    /// Unix seconds; the key works while `now < expires_at`.
    pub expires_at: Option<i64>,
    pub agent_enabled: bool,
    /// Effective scopes: the record's scopes with implications applied, sorted and unique.
    pub scopes: Vec<String>,
    /// `scopes` joined by spaces, ready for the `x-keyward-scopes` header.
    pub scopes_header: String,
    /// If non-empty, the key only works on paths under one of these (segment-aware).
    pub path_prefixes: Vec<String>,
    pub rate_limit: Option<RateLimit>,
    /// Unix seconds at which a rotation superseded this key.
    pub deprecated_at: Option<i64>,
    /// The budget the rate limit draws on (set whenever `rate_limit` is).
    pub rate_bucket: Option<String>,
    /// Requests an idle client may send at once (`None`: the configured default, normally `N`).
    pub rate_burst: Option<u32>,
    /// The `ACCESS_DISABLED` message (printable, at most [`MAX_REASON_CHARS`] characters).
    pub disabled_reason: Option<String>,
}

/// The longest `disabled_reason` kept; a longer one is cut (at a character boundary).
pub const MAX_REASON_CHARS: usize = 256;

impl KeyRecord {
    /// A compact, tab-separated form for Envoy shared data: cheap to decode on every request.
    /// Compiled records cannot contain tabs or spaces where they would be ambiguous.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(96);
        self.write_encoded(&mut out);
        out
    }

    /// Appends [`KeyRecord::encode`]'s form to `out`.
    pub fn write_encoded(&self, out: &mut String) {
        Fields {
            id: &self.id,
            agent: &self.agent,
            status: self.status,
            expires_at: self.expires_at,
            agent_enabled: self.agent_enabled,
            scopes: Scopes::Header(&self.scopes_header),
            path_prefixes: &self.path_prefixes,
            rate_limit: self.rate_limit,
            deprecated_at: self.deprecated_at,
            rate_bucket: self.rate_bucket.as_deref(),
            rate_burst: self.rate_burst,
            disabled_reason: self.disabled_reason.as_deref(),
        }
        .write(out);
    }

    /// Decodes [`KeyRecord::encode`]'s output; `None` for anything else. Format 1 (without
    /// the burst and the reason) is still read: shared data outlives a module upgrade.
    pub fn decode(s: &str) -> Option<KeyRecord> {
        let [id, agent, status, expires_at, enabled, scopes_header, prefixes, rate, deprecated_at, bucket, burst, reason] = fields(s)?;
        let status = match status {
            "a" => KeyStatus::Active,
            "r" => KeyStatus::Revoked,
            _ => return None,
        };
        let opt = |v: &str| -> Option<Option<i64>> { if v.is_empty() { Some(None) } else { v.parse().ok().map(Some) } };
        let nonempty = |v: &str| (!v.is_empty()).then(|| v.to_string());
        let rate_limit = match rate {
            "" => None,
            r => {
                let (c, p) = r.split_once('/')?;
                Some(RateLimit { count: c.parse().ok()?, period_secs: p.parse().ok()? })
            }
        };
        let rate_burst = match burst {
            "" => None,
            b => Some(b.parse().ok()?),
        };
        Some(KeyRecord {
            id: id.to_string(),
            agent: agent.to_string(),
            status,
            expires_at: opt(expires_at)?,
            agent_enabled: enabled == "1",
            scopes: scopes_header.split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect(),
            scopes_header: scopes_header.to_string(),
            path_prefixes: prefixes.split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect(),
            rate_limit,
            deprecated_at: opt(deprecated_at)?,
            rate_bucket: nonempty(bucket),
            rate_burst,
            disabled_reason: nonempty(reason),
        })
    }

    /// Checks that `s` is a record exactly as [`compile_record`] and then [`KeyRecord::encode`]
    /// write one (format 2, every number in its canonical form), without building it: a feed
    /// page in the line form carries records encoded, and the fetcher stores them as they came.
    /// The error is `(field name, message)`, as [`compile_record`]'s.
    pub fn check_encoded(s: &str) -> Result<(), (&'static str, String)> {
        if !s.starts_with("2\t") {
            return Err(("record", "must be a format 2 record".into()));
        }
        let [id, agent, status, expires_at, enabled, scopes, prefixes, rate, deprecated_at, bucket, burst, reason] =
            fields(s).ok_or(("record", "must have 13 tab-separated fields".to_string()))?;
        let bad = |field: &'static str, v: &str| Err((field, format!("{v:?} is not as the control plane writes it")));
        if !plain(id) {
            return Err(("id", PLAIN.into()));
        }
        if !plain(agent) {
            return Err(("agent", PLAIN.into()));
        }
        if !matches!(status, "a" | "r") {
            return bad("status", status);
        }
        if !(expires_at.is_empty() || canonical_int(expires_at)) {
            return bad("expires_at", expires_at);
        }
        if !matches!(enabled, "0" | "1") {
            return bad("agent_enabled", enabled);
        }
        if !scopes.is_empty() {
            let mut last = "";
            for scope in scopes.split(' ') {
                if !valid_scope(scope) || scope <= last {
                    return Err(("scopes", format!("{scopes:?} must be valid scopes, sorted, each once")));
                }
                last = scope;
            }
        }
        if !prefixes.is_empty() && prefixes.split(' ').any(|p| !path_prefix_ok(p)) {
            return Err(("path_prefixes", format!("{prefixes:?}: each must start with '/' and contain no spaces")));
        }
        match rate.split_once('/') {
            None if rate.is_empty() => {
                if !bucket.is_empty() {
                    return bad("rate_bucket", bucket);
                }
            }
            Some((count, period)) if canonical_int(count) && count != "0" && count.parse::<u32>().is_ok() && matches!(period, "1" | "60" | "3600" | "86400") => {
                if bucket.is_empty() || bucket.chars().any(char::is_control) {
                    return bad("rate_bucket", bucket);
                }
            }
            _ => return bad("rate_limit", rate),
        }
        if !(deprecated_at.is_empty() || canonical_int(deprecated_at)) {
            return bad("deprecated_at", deprecated_at);
        }
        if !(burst.is_empty() || (canonical_int(burst) && burst != "0" && burst.parse::<u32>().is_ok())) {
            return bad("rate_burst", burst);
        }
        if reason.chars().any(char::is_control) || reason.chars().count() > MAX_REASON_CHARS || reason.trim() != reason {
            return bad("disabled_reason", reason);
        }
        Ok(())
    }

    /// The shared-data entry of this record written in feed epoch `epoch` ([`tag_entry`]).
    pub fn encode_entry(&self, epoch: u64) -> String {
        tag_entry(epoch, self.encode())
    }

    /// Decodes [`KeyRecord::encode_entry`]'s output into its epoch and record; an untagged
    /// record is epoch 0. `None` for anything else.
    pub fn decode_entry(s: &str) -> Option<(u64, KeyRecord)> {
        match s.strip_prefix('e') {
            None => Some((0, KeyRecord::decode(s)?)),
            Some(rest) => {
                let (epoch, record) = rest.split_once('\t')?;
                if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                match epoch.parse() {
                    Ok(0) | Err(_) => None,
                    Ok(n) => Some((n, KeyRecord::decode(record)?)),
                }
            }
        }
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.binary_search_by(|s| s.as_str().cmp(scope)).is_ok()
    }

    /// Whether `path` (without query) is allowed by the key's path restrictions.
    pub fn allows_path(&self, path: &str) -> bool {
        self.path_prefixes.is_empty() || self.path_prefixes.iter().any(|p| under_prefix(path, p))
    }
}

/// Segment-aware prefix test: `/v1/a` is under `/v1/a` and `/v1/`, not under `/v1/ab`'s `/v1/a`.
pub fn under_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The shared-data entry of an encoded record written in feed epoch `epoch` (see
/// `feed::Epochs`): epoch 0, the only one before any reset, is the record itself, so a module
/// that predates epochs still reads it; a later one is `e<epoch>\t` before it.
pub fn tag_entry(epoch: u64, encoded: String) -> String {
    if epoch == 0 {
        encoded
    } else {
        format!("e{epoch}\t{encoded}")
    }
}

/// The 12 fields after the format of an encoded record; format 1's last two are empty.
fn fields(s: &str) -> Option<[&str; 12]> {
    // By bytes: a tab is ASCII, so every cut is a character boundary; `str::split` searches
    // with memchr, which costs more than it saves on fields this short.
    let mut cuts = s.bytes().enumerate().filter(|(_, b)| *b == b'\t').map(|(i, _)| i).chain(std::iter::once(s.len()));
    let mut start = 0;
    let mut next = || -> Option<&str> {
        let end = cuts.next()?;
        let field = s.get(start..end)?;
        start = end + 1;
        Some(field)
    };
    let n = match next()? {
        "1" => 10,
        "2" => 12,
        _ => return None,
    };
    let mut out = [""; 12];
    for slot in out.iter_mut().take(n) {
        *slot = next()?;
    }
    next().is_none().then_some(out)
}

/// An integer as `to_string` writes one: digits, no leading zero, `-` only before a non-zero.
fn canonical_int(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    !digits.is_empty()
        && digits.len() <= 19
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && !(s.starts_with('-') && digits == "0")
        && s.parse::<i64>().is_ok()
}

const PLAIN: &str = "must be 1 to 128 characters, without control characters";

/// A key id or agent name: 1 to 128 bytes, no control characters.
fn plain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control)
}

fn path_prefix_ok(p: &str) -> bool {
    p.starts_with('/') && !p.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The compiled snapshot the filter enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub version: u64,
    pub keys: HashMap<Digest, KeyRecord>,
}

impl Snapshot {
    pub fn get(&self, digest: &Digest) -> Option<&KeyRecord> {
        self.keys.get(digest)
    }

    /// Validates and compiles a wire snapshot. Errors name the field, as `keys[3].digest`.
    /// `implications` (the configuration's) apply unless the snapshot carries its own.
    pub fn compile(raw: &RawSnapshot, implications: &Implications, field: &str) -> Result<Self, FieldError> {
        let own = match &raw.implications {
            Some(m) => Some(Implications::new(m).map_err(|message| FieldError { field: format!("{field}.implications"), message })?),
            None => None,
        };
        let implications = own.as_ref().unwrap_or(implications);
        let mut keys = HashMap::with_capacity(raw.keys.len());
        for (i, r) in raw.keys.iter().enumerate() {
            let at = |name: &str| format!("{field}.keys[{i}].{name}");
            let (digest, record) = compile_record(r, implications).map_err(|(name, message)| FieldError {
                field: at(name),
                message,
            })?;
            if keys.insert(digest, record).is_some() {
                return Err(FieldError { field: at("digest"), message: "duplicate digest".into() });
            }
        }
        Ok(Snapshot { version: raw.version, keys })
    }
}

/// A record's fields, borrowed, in [`KeyRecord::encode`]'s order: what a compiled record and
/// the feed's line form both write.
struct Fields<'a> {
    id: &'a str,
    agent: &'a str,
    status: KeyStatus,
    expires_at: Option<i64>,
    agent_enabled: bool,
    scopes: Scopes<'a>,
    path_prefixes: &'a [String],
    rate_limit: Option<RateLimit>,
    deprecated_at: Option<i64>,
    rate_bucket: Option<&'a str>,
    rate_burst: Option<u32>,
    disabled_reason: Option<&'a str>,
}

/// A record's scopes as written: a decoded record's header as it was read (so a record read
/// from shared data re-encodes to itself), or a compiled record's list.
enum Scopes<'a> {
    Header(&'a str),
    List(&'a [String]),
}

impl Fields<'_> {
    fn write(&self, out: &mut String) {
        let int = |out: &mut String, v: Option<i64>| {
            if let Some(v) = v {
                out.push_str(itoa::Buffer::new().format(v));
            }
        };
        let list = |out: &mut String, items: &[String]| {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                out.push_str(item);
            }
        };
        out.push_str("2\t");
        out.push_str(self.id);
        out.push('\t');
        out.push_str(self.agent);
        out.push_str(if self.status == KeyStatus::Revoked { "\tr\t" } else { "\ta\t" });
        int(out, self.expires_at);
        out.push_str(if self.agent_enabled { "\t1\t" } else { "\t0\t" });
        match self.scopes {
            Scopes::Header(header) => out.push_str(header),
            Scopes::List(scopes) => list(out, scopes),
        }
        out.push('\t');
        list(out, self.path_prefixes);
        out.push('\t');
        if let Some(r) = self.rate_limit {
            out.push_str(itoa::Buffer::new().format(r.count));
            out.push('/');
            out.push_str(itoa::Buffer::new().format(r.period_secs));
        }
        out.push('\t');
        int(out, self.deprecated_at);
        out.push('\t');
        out.push_str(self.rate_bucket.unwrap_or(""));
        out.push('\t');
        int(out, self.rate_burst.map(i64::from));
        out.push('\t');
        out.push_str(self.disabled_reason.unwrap_or(""));
    }
}

/// A wire record validated: what it owns once compiled, the rest still borrowed from it.
struct Compiled<'a> {
    raw: &'a RawKeyRecord,
    digest: Digest,
    expires_at: Option<i64>,
    scopes: Vec<String>,
    rate_limit: Option<RateLimit>,
    /// The key's own bucket when it names none (`k:<id>`); `None` also without a limit.
    own_bucket: Option<String>,
    disabled_reason: Option<String>,
}

impl Compiled<'_> {
    fn fields(&self) -> Fields<'_> {
        let r = self.raw;
        Fields {
            id: &r.id,
            agent: &r.agent,
            status: r.status,
            expires_at: self.expires_at,
            agent_enabled: r.agent_enabled,
            scopes: Scopes::List(&self.scopes),
            path_prefixes: &r.path_prefixes,
            rate_limit: self.rate_limit,
            deprecated_at: r.deprecated_at,
            rate_bucket: self.rate_limit.and(self.own_bucket.as_deref().or(r.rate_bucket.as_deref())),
            rate_burst: r.rate_burst,
            disabled_reason: self.disabled_reason.as_deref(),
        }
    }
}

/// Why a wire digest is refused, in the JSON form and the line form alike.
pub(crate) const DIGEST_FORM: &str = "must be 64 hex digits (the SHA-256 of the key)";

/// Validates a wire record; the error is `(field name, message)`.
fn compile<'a>(r: &'a RawKeyRecord, implications: &Implications) -> Result<Compiled<'a>, (&'static str, String)> {
    let digest = Digest::from_hex(&r.digest)
        .ok_or(("digest", DIGEST_FORM.to_string()))?;
    if !plain(&r.id) {
        return Err(("id", PLAIN.into()));
    }
    if !plain(&r.agent) {
        return Err(("agent", PLAIN.into()));
    }
    if let Some(bad) = r.scopes.iter().find(|s| !valid_scope(s)) {
        return Err(("scopes", format!("invalid scope {bad:?}")));
    }
    if let Some(bad) = r.path_prefixes.iter().find(|p| !path_prefix_ok(p)) {
        return Err(("path_prefixes", format!("{bad:?} must start with '/' and contain no spaces")));
    }
    let expires_at = match &r.expires_at {
        None => None,
        Some(RawTime::Unix(t)) => Some(*t),
        Some(RawTime::Text(s)) => Some(
            parse_rfc3339(s).ok_or(("expires_at", format!("{s:?} is not an RFC 3339 timestamp")))?,
        ),
    };
    let rate_limit = r
        .rate_limit
        .as_deref()
        .map(RateLimit::parse)
        .transpose()
        .map_err(|e| ("rate_limit", e))?;
    if let Some(b) = &r.rate_bucket {
        if b.is_empty() || b.len() > 160 || !b.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(("rate_bucket", format!("{b:?} must be 1 to 160 printable ASCII characters")));
        }
    }
    let own_bucket = (rate_limit.is_some() && r.rate_bucket.is_none()).then(|| format!("k:{}", r.id));
    if r.rate_burst == Some(0) {
        return Err(("rate_burst", "must be at least 1".into()));
    }
    // Free text typed by an operator: kept printable (a tab would break the shared-data
    // encoding) and bounded, never refused, so that a long reason cannot stall the feed.
    let disabled_reason = r
        .disabled_reason
        .as_deref()
        .map(|t| t.chars().map(|c| if c.is_control() { ' ' } else { c }).take(MAX_REASON_CHARS).collect::<String>())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    let scopes = implications.expand(r.scopes.iter().map(String::as_str));
    Ok(Compiled { raw: r, digest, expires_at, scopes, rate_limit, own_bucket, disabled_reason })
}

/// Compiles one wire record; the error is `(field name, message)`.
pub fn compile_record(
    r: &RawKeyRecord,
    implications: &Implications,
) -> Result<(Digest, KeyRecord), (&'static str, String)> {
    let c = compile(r, implications)?;
    let rate_bucket = c.fields().rate_bucket.map(str::to_string);
    let record = KeyRecord {
        id: r.id.clone(),
        agent: r.agent.clone(),
        status: r.status,
        expires_at: c.expires_at,
        agent_enabled: r.agent_enabled,
        scopes_header: c.scopes.join(" "),
        scopes: c.scopes,
        path_prefixes: r.path_prefixes.clone(),
        rate_limit: c.rate_limit,
        deprecated_at: r.deprecated_at,
        rate_bucket,
        rate_burst: r.rate_burst,
        disabled_reason: c.disabled_reason,
    };
    Ok((c.digest, record))
}

/// Appends the feed's line for one wire record, `<digest>\t<record>` with the record as
/// [`compile_record`] and then [`KeyRecord::encode`] would write it, without building the
/// record; nothing is appended on an error, which is [`compile_record`]'s.
pub fn write_record_line(r: &RawKeyRecord, implications: &Implications, out: &mut String) -> Result<(), (&'static str, String)> {
    let c = compile(r, implications)?;
    c.digest.write_hex(out);
    out.push('\t');
    c.fields().write(out);
    out.push('\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: serde_json::Value) -> RawSnapshot {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn compiles_records_with_expanded_scopes() {
        let d = Digest::of(b"secret");
        let snap = Snapshot::compile(
            &raw(serde_json::json!({"version": 7, "keys": [{
                "digest": d.to_hex(), "id": "key_1", "agent": "billing",
                "expires_at": "2030-01-01T00:00:00Z", "scopes": ["admin"],
                "path_prefixes": ["/v1/projects/42"], "rate_limit": "100/min"
            }]})),
            &Implications::default(),
            "snapshot",
        )
        .unwrap();
        assert_eq!(snap.version, 7);
        let r = snap.get(&d).unwrap();
        assert_eq!(r.scopes_header, "admin read:all write:all");
        assert!(r.has_scope("write:all") && !r.has_scope("webhook"));
        assert_eq!(r.expires_at, Some(1_893_456_000));
        assert_eq!(r.rate_limit, Some(RateLimit { count: 100, period_secs: 60 }));
        assert!(r.agent_enabled);
        assert_eq!(r.status, KeyStatus::Active);
    }

    #[test]
    fn bad_records_name_their_field() {
        let check = |rec: serde_json::Value, want: &str| {
            let err = Snapshot::compile(&raw(serde_json::json!({"keys": [rec]})), &Implications::default(), "snapshot")
                .unwrap_err();
            assert_eq!(err.field, want, "{}", err.message);
        };
        let d = Digest::of(b"k").to_hex();
        check(serde_json::json!({"digest": "nothex", "id": "a", "agent": "b"}), "snapshot.keys[0].digest");
        check(serde_json::json!({"digest": d, "id": "", "agent": "b"}), "snapshot.keys[0].id");
        check(serde_json::json!({"digest": d, "id": "a", "agent": "b", "scopes": ["a b"]}), "snapshot.keys[0].scopes");
        check(serde_json::json!({"digest": d, "id": "a", "agent": "b", "expires_at": "tomorrow"}), "snapshot.keys[0].expires_at");
        check(serde_json::json!({"digest": d, "id": "a", "agent": "b", "rate_limit": "5/week"}), "snapshot.keys[0].rate_limit");
        check(serde_json::json!({"digest": d, "id": "a", "agent": "b", "path_prefixes": ["v1"]}), "snapshot.keys[0].path_prefixes");
        check(serde_json::json!({"digest": d, "id": "a", "agent": "b", "rate_limit": "5/s", "rate_burst": 0}), "snapshot.keys[0].rate_burst");
    }

    #[test]
    fn disabled_reasons_are_kept_printable_and_bounded() {
        let check = |reason: &str, want: Option<&str>| {
            let d = Digest::of(b"k").to_hex();
            let snap = raw(serde_json::json!({"keys": [{"digest": d, "id": "a", "agent": "b", "agent_enabled": false, "disabled_reason": reason}]}));
            let snap = Snapshot::compile(&snap, &Implications::default(), "snapshot").unwrap();
            let record = snap.keys.values().next().unwrap();
            assert_eq!(record.disabled_reason.as_deref(), want, "{reason:?}");
            assert_eq!(KeyRecord::decode(&record.encode()).as_ref(), Some(record));
        };
        check("Your plan does not include API access", Some("Your plan does not include API access"));
        check("tab\there\nand \"quotes\" <b>", Some("tab here and \"quotes\" <b>"));
        check("  \n ", None);
        check("", None);
        let long = "é".repeat(300);
        check(&long, Some(&"é".repeat(MAX_REASON_CHARS)));
    }

    #[test]
    fn a_snapshot_s_own_implications_replace_the_configuration_s() {
        let d = Digest::of(b"k").to_hex();
        let config = Implications::default();
        let compile = |json: serde_json::Value| Snapshot::compile(&raw(json), &config, "snapshot");
        let scopes = |snap: Snapshot| snap.keys.into_values().next().unwrap().scopes_header;
        let key = serde_json::json!([{"digest": d, "id": "a", "agent": "b", "scopes": ["admin", "billing"]}]);
        assert_eq!(scopes(compile(serde_json::json!({"keys": key})).unwrap()), "admin billing read:all write:all");
        assert_eq!(scopes(compile(serde_json::json!({"implications": {"billing": ["invoices:read"]}, "keys": key})).unwrap()), "admin billing invoices:read");
        assert_eq!(scopes(compile(serde_json::json!({"implications": {}, "keys": key})).unwrap()), "admin billing");
        let err = compile(serde_json::json!({"implications": {"admin": ["bad scope"]}, "keys": key})).unwrap_err();
        assert_eq!(err.field, "snapshot.implications");
    }

    #[test]
    fn duplicate_digests_are_refused() {
        let d = Digest::of(b"k").to_hex();
        let snap = raw(serde_json::json!({"keys": [
            {"digest": d, "id": "a", "agent": "x"}, {"digest": d, "id": "b", "agent": "x"}]}));
        let err = Snapshot::compile(&snap, &Implications::default(), "snapshot").unwrap_err();
        assert_eq!((err.field.as_str(), err.message.as_str()), ("snapshot.keys[1].digest", "duplicate digest"));
    }

    #[test]
    fn records_round_trip_through_the_shared_data_encoding() {
        let d = Digest::of(b"k");
        let snap = Snapshot::compile(
            &raw(serde_json::json!({"keys": [
                {"digest": d.to_hex(), "id": "key_1", "agent": "billing team", "status": "revoked", "expires_at": 1_900_000_000,
                 "agent_enabled": false, "scopes": ["admin"], "path_prefixes": ["/a", "/b/c"], "rate_limit": "10/min", "deprecated_at": 1_800_000_000,
                 "rate_bucket": "a:agt_1", "rate_burst": 5, "disabled_reason": "Your plan does not include API access"},
                {"digest": Digest::of(b"m").to_hex(), "id": "key_3", "agent": "a", "rate_limit": "1/s"},
                {"digest": Digest::of(b"j").to_hex(), "id": "key_2", "agent": "a"}
            ]})),
            &Implications::default(),
            "snapshot",
        )
        .unwrap();
        for record in snap.keys.values() {
            let encoded = record.encode();
            assert_eq!(KeyRecord::decode(&encoded).as_ref(), Some(record), "{encoded}");
        }
        let k3 = snap.get(&Digest::of(b"m")).unwrap();
        assert_eq!(k3.rate_bucket.as_deref(), Some("k:key_3"), "a limited key has its own bucket by default");
        let k1 = snap.get(&d).unwrap();
        assert_eq!((k1.rate_burst, k1.disabled_reason.as_deref()), (Some(5), Some("Your plan does not include API access")));
        // Format 1, written by an older module into the same shared data, still decodes.
        let v1 = "1\tkey_9\tagent\ta\t\t1\tread:all\t\t10/60\t\tk:key_9";
        let old = KeyRecord::decode(v1).unwrap();
        assert_eq!((old.id.as_str(), old.rate_burst, old.disabled_reason), ("key_9", None, None));
        assert_eq!(KeyRecord::decode(&format!("{v1}\t\t")), None, "format 1 has 11 fields");
        for bad in ["", "3\tx", "1\tid", "2\ti\ta\ta\t\t1\t\t\t\t\t\tx\t", "2\ti\ta\ta\t\t1\t\t\t\t\t\t\t\tx", "1\ti\ta\tx\t\t1\t\t\t\t\t", "1\ti\ta\ta\tsoon\t1\t\t\t\t\t", "1\ti\ta\ta\t\t1\t\t\t5\t\t\t", "1\ti\ta\ta\t\t1\t\t\t\t\t\tx"] {
            assert_eq!(KeyRecord::decode(bad), None, "{bad:?}");
        }
    }

    /// Whatever header a record was read with is written back as it was (fuzz regression: a
    /// format 1 record whose scopes had doubled spaces re-encoded to another header).
    #[test]
    fn a_decoded_record_re_encodes_its_scopes_header_as_read() {
        let v1 = "1\tkey_x\tagent\tr\t1900000000\t0\ta\n\n:  1:all\t/v1/a1 /v2\t09/1\t1800000000\tk:key_x";
        let record = KeyRecord::decode(v1).unwrap();
        assert_eq!(KeyRecord::decode(&record.encode()), Some(record.clone()));
        assert_eq!(KeyRecord::decode_entry(&record.encode_entry(3)), Some((3, record)));
    }

    /// Epoch 0 is today's untagged record, so a module from before epochs reads it; a later
    /// epoch is a prefix an older module refuses (a fault, 500: closed, never a stale answer).
    #[test]
    fn a_record_entry_carries_its_feed_epoch() {
        let v2 = "2\tkey_9\tagent\ta\t\t1\tread:all\t\t\t\t\t\t";
        let record = KeyRecord::decode(v2).unwrap();
        assert_eq!(record.encode_entry(0), record.encode(), "epoch 0 is untagged");
        let check = |entry: &str, want: Option<u64>| {
            assert_eq!(KeyRecord::decode_entry(entry).map(|(e, r)| (e, r == record)), want.map(|e| (e, true)), "{entry:?}");
        };
        check(&record.encode_entry(0), Some(0));
        check(&record.encode_entry(7), Some(7));
        check(&format!("e7\t{v2}"), Some(7));
        check(&record.encode_entry(u64::MAX), Some(u64::MAX));
        for bad in [format!("e0\t{v2}"), format!("e\t{v2}"), format!("e-1\t{v2}"), format!("e+1\t{v2}"), format!("e18446744073709551616\t{v2}"), "e3".into(), "e3\tgarbage".into()] {
            check(&bad, None);
        }
        assert_eq!(KeyRecord::decode(&record.encode_entry(1)), None, "an older module refuses a tagged entry");
    }

    #[test]
    fn rate_limits_parse_the_four_units() {
        let check = |s: &str, want: Option<(u32, u32)>| {
            assert_eq!(RateLimit::parse(s).ok().map(|r| (r.count, r.period_secs)), want, "{s}")
        };
        check("10/s", Some((10, 1)));
        check("100/min", Some((100, 60)));
        check("5000/h", Some((5000, 3600)));
        check("1/day", Some((1, 86_400)));
        for bad in ["0/s", "10", "/s", "-1/s", "1.5/s", "10/sec", "10/S", "99999999999/s", " 1/s"] {
            check(bad, None);
        }
    }

    #[test]
    fn path_prefixes_are_segment_aware() {
        let check = |path: &str, prefix: &str, want: bool| assert_eq!(under_prefix(path, prefix), want, "{path} {prefix}");
        check("/v1/projects/42", "/v1/projects/42", true);
        check("/v1/projects/42/items", "/v1/projects/42", true);
        check("/v1/projects/420", "/v1/projects/42", false);
        check("/v1/anything", "/v1/", true);
        check("/v2", "/v1", false);
        check("/", "/", true);
    }
}
