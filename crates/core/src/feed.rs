//! The snapshot feed's wire format, shared by `keyward serve` (which writes it) and the filter
//! (which validates a whole page before applying any of it).

use crate::digest::Digest;
use crate::scope::Implications;
use crate::snapshot::{compile_record, write_record_line, KeyRecord, RawKeyRecord, DIGEST_FORM};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Where the next page of a delta starts: records after `(version, id)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedCursor {
    pub version: u64,
    pub id: String,
}

/// One answer of `GET /v1/feed`: the records changed since the requested version, in
/// `(version, id)` order, at most a page of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedMessage {
    /// The store's snapshot version this answer is consistent with.
    pub version: u64,
    /// This page ends the delta: once applied, the filter has applied `version`.
    pub complete: bool,
    /// When not complete: where to continue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<FeedCursor>,
    /// The control plane's scope implications; when present, this page's records are compiled
    /// with them instead of the filter configuration's. The control plane sends them on every
    /// page, and re-sends every record an implication change affects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub implications: Option<std::collections::BTreeMap<String, Vec<String>>>,
    /// The store's identity (1 to 64 ASCII letters, digits or `_`). A restored store gets a new
    /// one: an Envoy that applied another store's records sends that store's id (`store=`), and
    /// is answered with a reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// This answer is the whole snapshot from version 0 and replaces what the filter holds: a
    /// key absent from it must be absent once it is applied (the store went back, or is another).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    pub keys: Vec<RawKeyRecord>,
    /// The version of each record, for the control plane to end a page early at one
    /// ([`FeedMessage::to_lines`]); not sent.
    #[serde(skip)]
    pub versions: Vec<u64>,
}

/// A validated page, ready to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedPage {
    pub version: u64,
    pub complete: bool,
    pub cursor: Option<FeedCursor>,
    /// The store's identity, when the control plane sends it.
    pub store: Option<String>,
    /// This page starts the whole snapshot from version 0, which replaces what the filter holds.
    pub reset: bool,
    /// Each record's digest and its shared-data form ([`crate::KeyRecord::encode`]).
    pub records: Vec<(Digest, String)>,
}

/// The longest store id the filter accepts.
pub const MAX_STORE_ID: usize = 64;

/// A store id: 1 to [`MAX_STORE_ID`] ASCII letters, digits or `_` (it goes into a URL and into
/// the space-separated epochs entry).
pub fn valid_store_id(id: &str) -> bool {
    (1..=MAX_STORE_ID).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    #[error("feed message of {size} bytes exceeds max_feed_bytes ({max})")]
    TooLarge { size: usize, max: usize },
    #[error("feed message is not valid JSON: {0}")]
    Json(String),
    #[error("feed line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("feed record keys[{index}].{field}: {message}")]
    Record { index: usize, field: &'static str, message: String },
    #[error("feed message is inconsistent: {0}")]
    Inconsistent(&'static str),
    #[error("feed implications: {0}")]
    Implications(String),
}

/// The `format=` a filter asks for to be answered in the line form. Without it the control
/// plane answers JSON (format 1), as it always has: a filter from before the line form gets
/// what it understands.
pub const LINES_FORMAT: &str = "2";
/// The line form's media type.
pub const LINES_CONTENT_TYPE: &str = "text/x-keyward-feed; version=2";
/// The line form's first line, which tells it from JSON.
const LINES_HEAD: &str = "keyward-feed 2";

/// Parses and validates a whole page, in either form: the line form (it starts with
/// `keyward-feed 2`) or JSON (an older control plane's). Nothing of a bad page may be applied.
/// A JSON page's own `implications`, when present, replace `implications` (the
/// configuration's); a line page's records carry their effective scopes.
pub fn parse_page(bytes: &[u8], max_bytes: usize, implications: &Implications) -> Result<FeedPage, FeedError> {
    if bytes.len() > max_bytes {
        return Err(FeedError::TooLarge { size: bytes.len(), max: max_bytes });
    }
    if bytes.starts_with(LINES_HEAD.as_bytes()) {
        let text = std::str::from_utf8(bytes).map_err(|e| FeedError::Line { line: 1, message: format!("not UTF-8: {e}") })?;
        return parse_lines(text);
    }
    let msg: FeedMessage = serde_json::from_slice(bytes).map_err(|e| FeedError::Json(e.to_string()))?;
    let own = msg.implications.as_ref().map(Implications::new).transpose().map_err(FeedError::Implications)?;
    let implications = own.as_ref().unwrap_or(implications);
    let records = msg
        .keys
        .iter()
        .enumerate()
        .map(|(index, r)| match compile_record(r, implications) {
            Ok((digest, record)) => Ok((digest, record.encode())),
            Err((field, message)) => Err(FeedError::Record { index, field, message }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    checked(FeedPage { version: msg.version, complete: msg.complete, cursor: msg.cursor, store: msg.store, reset: msg.reset, records })
}

/// What every page must be, whatever its form.
fn checked(page: FeedPage) -> Result<FeedPage, FeedError> {
    match (&page.cursor, page.complete) {
        (Some(_), true) => return Err(FeedError::Inconsistent("a complete page carries a cursor")),
        (None, false) => return Err(FeedError::Inconsistent("an incomplete page has no cursor")),
        (Some(c), false) if c.version > page.version => return Err(FeedError::Inconsistent("the cursor is ahead of the version")),
        _ => {}
    }
    if page.store.as_deref().is_some_and(|id| !valid_store_id(id)) {
        return Err(FeedError::Inconsistent("the store id is not 1 to 64 letters, digits or underscores"));
    }
    Ok(page)
}

/// The line form (format 2): a head, the records, and `end`, each line ending in `\n`:
///
/// ```text
/// keyward-feed 2
/// version <version>
/// complete                      (or: cursor <version> <key id>)
/// store <store id>              (when the filter sent store=)
/// reset                         (when this page starts a reset)
/// keys <count>
/// <digest, 64 hex digits>\t<the record's shared-data form>    (count lines)
/// end
/// ```
///
/// A record line is what the fetcher stores, so the filter checks it ([`KeyRecord::check_encoded`])
/// instead of parsing and re-encoding it. `end` proves the page was not cut short.
fn parse_lines(text: &str) -> Result<FeedPage, FeedError> {
    let mut lines = text.split('\n').enumerate().map(|(i, l)| (i + 1, l));
    let mut next = |want: &str| -> Result<(usize, &str), FeedError> {
        lines.next().ok_or_else(|| FeedError::Line { line: 0, message: format!("the page ends before {want}") })
    };
    let bad = |line: usize, message: String| FeedError::Line { line, message };
    let number = |line: usize, v: &str| -> Result<u64, FeedError> {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(line, format!("{v:?} is not a number")));
        }
        v.parse().map_err(|_| bad(line, format!("{v:?} is not a number")))
    };
    let (_, head) = next("its head")?;
    if head != LINES_HEAD {
        return Err(bad(1, format!("expected {LINES_HEAD:?}")));
    }
    let (n, line) = next("the version")?;
    let version = number(n, line.strip_prefix("version ").ok_or_else(|| bad(n, "expected \"version <n>\"".into()))?)?;
    let (n, line) = next("complete or the cursor")?;
    let (complete, cursor) = match line.strip_prefix("cursor ") {
        _ if line == "complete" => (true, None),
        Some(rest) => {
            let (v, id) = rest.split_once(' ').ok_or_else(|| bad(n, "expected \"cursor <version> <key id>\"".into()))?;
            if id.is_empty() {
                return Err(bad(n, "the cursor has no key id".into()));
            }
            (false, Some(FeedCursor { version: number(n, v)?, id: id.to_string() }))
        }
        None => return Err(bad(n, "expected \"complete\" or \"cursor <version> <key id>\"".into())),
    };
    let (mut n, mut line) = next("the keys")?;
    let mut store = None;
    if let Some(id) = line.strip_prefix("store ") {
        store = Some(id.to_string());
        (n, line) = next("the keys")?;
    }
    let reset = line == "reset";
    if reset {
        (n, line) = next("the keys")?;
    }
    let count = number(n, line.strip_prefix("keys ").ok_or_else(|| bad(n, "expected \"keys <count>\"".into()))?)?;
    // Never trust a count to size an allocation: a record line is over 64 bytes.
    let mut records = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(text.len() / 64));
    for index in 0..usize::try_from(count).unwrap_or(usize::MAX) {
        let (n, line) = next("its last record")?;
        let record = |field: &'static str, message: String| FeedError::Record { index, field, message };
        let (hex, encoded) = line.split_once('\t').ok_or_else(|| bad(n, "expected \"<digest>\\t<record>\" or fewer keys".into()))?;
        let digest = Digest::from_hex(hex).ok_or_else(|| record("digest", DIGEST_FORM.into()))?;
        KeyRecord::check_encoded(encoded).map_err(|(field, message)| record(field, message))?;
        records.push((digest, encoded.to_string()));
    }
    let (n, line) = next("\"end\"")?;
    if line != "end" {
        return Err(bad(n, "expected \"end\" after the records".into()));
    }
    if !matches!(next("its last newline")?, (_, "")) || lines.next().is_some() {
        return Err(bad(n + 1, "nothing may follow \"end\\n\"".into()));
    }
    checked(FeedPage { version, complete, cursor, store, reset, records })
}

impl FeedMessage {
    /// This message in the line form (see [`parse_page`]), at most `max_bytes` long if its
    /// records allow: a page ends early, with a cursor at its last record, rather than outgrow
    /// the filter's `max_feed_bytes` (one record is always sent, so the feed moves on). Cutting
    /// needs each record's version, `versions`; without them the page is never cut.
    ///
    /// Its records are compiled with its own implications (the control plane always sends its
    /// catalogue's), so a filter reading either form stores the same records. A record that
    /// does not compile is an error here, where a JSON page would be refused whole by every
    /// filter.
    pub fn to_lines(&self, max_bytes: usize) -> Result<String, FeedError> {
        let own = self.implications.as_ref().map(Implications::new).transpose().map_err(FeedError::Implications)?;
        let none = Implications::new(&Default::default()).map_err(FeedError::Implications)?;
        let implications = own.as_ref().unwrap_or(&none);
        // The records first: the head says how many, and where the next page starts.
        let mut records = String::with_capacity(self.keys.len() * 160);
        let mut cursor = self.cursor.clone();
        let mut count = 0;
        let budget = max_bytes.saturating_sub(256);
        for (index, r) in self.keys.iter().enumerate() {
            let before = records.len();
            write_record_line(r, implications, &mut records).map_err(|(field, message)| FeedError::Record { index, field, message })?;
            if records.len() > budget && index > 0 {
                if let Some(&version) = self.versions.get(index - 1) {
                    records.truncate(before);
                    cursor = Some(FeedCursor { version, id: self.keys[index - 1].id.clone() });
                    break;
                }
            }
            count += 1;
        }
        let mut out = String::with_capacity(128 + records.len());
        let _ = writeln!(out, "{LINES_HEAD}\nversion {}", self.version);
        match &cursor {
            Some(c) => {
                let _ = writeln!(out, "cursor {} {}", c.version, c.id);
            }
            None => out.push_str("complete\n"),
        }
        if let Some(store) = &self.store {
            let _ = writeln!(out, "store {store}");
        }
        if self.reset {
            out.push_str("reset\n");
        }
        let _ = writeln!(out, "keys {count}");
        out.push_str(&records);
        out.push_str("end\n");
        Ok(out)
    }
}

/// One store's records in the filter's shared data. Every record entry is tagged with the epoch
/// it was written in (`KeyRecord::encode_entry`); a record whose epoch is not live reads as
/// absent. Epoch 0 is the first store an Envoy applies (and every record of a module from before
/// epochs); each reset takes the next number, so the records of an older store, which shared
/// data cannot delete, become absent at once when the reset commits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Epoch {
    pub n: u64,
    /// The store these records came from, when the control plane named it.
    pub store: Option<String>,
}

/// A reset being written: its epoch, and where its next page starts (`None` until its first
/// page is written whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reset {
    pub epoch: Epoch,
    pub cursor: Option<FeedCursor>,
}

/// Which record epochs are live: the committed one, and while a reset is being written, the
/// reset's (its records are the newer store's, so they count as soon as they are written;
/// the committed epoch's records that the reset has not rewritten keep their old answer until
/// it commits, as during any full apply).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Epochs {
    pub committed: Epoch,
    pub pending: Option<Reset>,
}

/// What the fetcher asks the feed for next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedAsk {
    pub since: u64,
    pub after: Option<String>,
    /// The store the Envoy's records come from, when it knows it; sent as `store=`, empty
    /// when it does not (an older filter sends no `store=` and is answered without `store`).
    pub store: Option<String>,
    /// The whole snapshot again, because a reset's first page was never written whole: the
    /// answer starts the reset over, whatever its `reset` flag says.
    pub restart: bool,
}

/// What applying one page does to the epochs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochStep {
    /// The epoch to tag this page's records with.
    pub tag: u64,
    /// To write before any record of this page (a reset begins: its epoch becomes live first).
    pub before: Option<Epochs>,
    /// To write after the page's records (and the state).
    pub after: Epochs,
    /// This page begins a reset.
    pub begins_reset: bool,
}

fn encode_opt(s: Option<&str>) -> &str {
    s.unwrap_or("-")
}

fn decode_store(s: &str) -> Option<Option<String>> {
    match s {
        "-" => Some(None),
        id if valid_store_id(id) => Some(Some(id.to_string())),
        _ => None,
    }
}

impl Epochs {
    /// Whether a record written in `epoch` counts.
    pub fn live(&self, epoch: u64) -> bool {
        epoch == self.committed.n || self.pending.as_ref().is_some_and(|p| p.epoch.n == epoch)
    }

    /// `<n> <store|->`, then for a reset under way ` <n> <store|-> <cursor version|-> <cursor id|->`.
    pub fn encode(&self) -> String {
        let mut out = format!("{} {}", self.committed.n, encode_opt(self.committed.store.as_deref()));
        if let Some(p) = &self.pending {
            let (cv, cid) = match &p.cursor {
                Some(c) => (c.version.to_string(), c.id.as_str()),
                None => ("-".to_string(), "-"),
            };
            out.push_str(&format!(" {} {} {cv} {cid}", p.epoch.n, encode_opt(p.epoch.store.as_deref())));
        }
        out
    }

    /// Decodes [`Epochs::encode`]; an empty entry (none written yet) is epoch 0 of no named store.
    pub fn decode(s: &str) -> Option<Epochs> {
        if s.is_empty() {
            return Some(Epochs::default());
        }
        let mut f = s.splitn(6, ' ');
        let committed = Epoch { n: f.next()?.parse().ok()?, store: decode_store(f.next()?)? };
        let pending = match f.next() {
            None => None,
            Some(n) => {
                let epoch = Epoch { n: n.parse().ok()?, store: decode_store(f.next()?)? };
                let cursor = match (f.next()?, f.next()?) {
                    ("-", "-") => None,
                    (v, id) => Some(FeedCursor { version: v.parse().ok()?, id: id.to_string() }),
                };
                if epoch.n <= committed.n {
                    return None;
                }
                Some(Reset { epoch, cursor })
            }
        };
        Some(Epochs { committed, pending })
    }

    /// The next feed request, from what the filter has applied (`loaded`, `applied` and the
    /// mid-delta `cursor` of its state) and these epochs.
    pub fn ask(&self, loaded: bool, applied: u64, cursor: Option<&FeedCursor>) -> FeedAsk {
        match &self.pending {
            // A reset under way continues from its own cursor, naming the store it comes from.
            Some(Reset { epoch, cursor: Some(c) }) => FeedAsk { since: c.version, after: Some(c.id.clone()), store: epoch.store.clone(), restart: false },
            Some(Reset { epoch, cursor: None }) => FeedAsk { since: 0, after: None, store: epoch.store.clone(), restart: true },
            None => FeedAsk {
                since: cursor.map_or(if loaded { applied } else { 0 }, |c| c.version),
                after: cursor.map(|c| c.id.clone()),
                store: self.committed.store.clone(),
                restart: false,
            },
        }
    }

    /// How a validated page that answered `asked` changes these epochs. An error refuses the
    /// page (nothing of it is written).
    pub fn step(&self, asked: &FeedAsk, page: &FeedPage) -> Result<EpochStep, FeedError> {
        let finish = |epoch: Epoch, committed: &Epoch| -> Epochs {
            if page.complete {
                Epochs { committed: epoch, pending: None }
            } else {
                Epochs { committed: committed.clone(), pending: Some(Reset { epoch, cursor: page.cursor.clone() }) }
            }
        };
        if page.reset || asked.restart {
            let newest = self.pending.as_ref().map_or(self.committed.n, |p| p.epoch.n);
            let n = newest.checked_add(1).ok_or(FeedError::Inconsistent("no feed epoch left"))?;
            let store = page.store.clone().or_else(|| asked.store.clone().filter(|_| asked.restart));
            let epoch = Epoch { n, store };
            let before = Epochs { committed: self.committed.clone(), pending: Some(Reset { epoch: epoch.clone(), cursor: None }) };
            return Ok(EpochStep { tag: n, before: Some(before), after: finish(epoch, &self.committed), begins_reset: true });
        }
        let same_store = |known: &Option<String>| match (known, &page.store) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        match &self.pending {
            Some(p) if asked.after.is_some() && p.cursor.is_some() => {
                if !same_store(&p.epoch.store) {
                    return Err(FeedError::Inconsistent("the store changed without a reset"));
                }
                Ok(EpochStep { tag: p.epoch.n, before: None, after: finish(p.epoch.clone(), &self.committed), begins_reset: false })
            }
            // Another fetcher began a reset after this request was sent: ask again.
            Some(_) => Err(FeedError::Inconsistent("a reset began while this page was asked for")),
            None => {
                if !same_store(&self.committed.store) {
                    return Err(FeedError::Inconsistent("the store changed without a reset"));
                }
                // The first store an Envoy hears named (or an older filter's) is adopted as is.
                let store = self.committed.store.clone().or_else(|| page.store.clone());
                let after = Epochs { committed: Epoch { n: self.committed.n, store }, pending: None };
                Ok(EpochStep { tag: self.committed.n, before: None, after, begins_reset: false })
            }
        }
    }
}

/// Usage one Envoy reports: per key, requests since the last report and the last use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageReport {
    pub envoy: String,
    pub usage: Vec<KeyUsage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyUsage {
    pub key_id: String,
    pub count: u64,
    /// Unix seconds.
    pub last_used: i64,
    /// Refused requests that presented this key since the last report, by contract code
    /// (`REVOKED_API_KEY`, `EXPIRED_API_KEY`, `ACCESS_DISABLED`, `INSUFFICIENT_SCOPE`,
    /// `RATE_LIMITED`, ...).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub denied: std::collections::BTreeMap<String, u64>,
}

/// `POST /v1/feed/rates`: what one Envoy's rate-limit buckets admitted since its last report
/// (only buckets that moved, or are still live in their window), every `rate_sync_ms`; and at
/// least once a second with no buckets, to learn its share.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateReport {
    pub envoy: String,
    #[serde(default)]
    pub buckets: Vec<BucketReport>,
}

/// Most buckets in one [`RateReport`]: about 100 bytes each, so a report stays well under the
/// feed's 1 MiB body limit.
pub const RATE_REPORT_MAX_BUCKETS: usize = 2_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketReport {
    /// The bucket's name as the snapshot gives it (`k:<lineage>`, `a:<agent>`).
    pub bucket: String,
    /// The limit: `count` requests per `period_secs`.
    pub count: u32,
    pub period_secs: u32,
    /// Requests this Envoy admitted in the bucket since its last report (0: still watching).
    pub admitted: u64,
}

/// The answer to a [`RateReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateAnswer {
    /// `global`: the counts below are the fleet's, from the rate store; `split`: no rate store
    /// (or it is unreachable), each Envoy enforces its share of every limit.
    pub mode: RateMode,
    /// Envoys connected to the control plane now, this one included (at least 1): the share
    /// of a limit in split mode is `count / envoys`, at least 1.
    pub envoys: u32,
    /// In global mode, per reported bucket: the requests the *other* Envoys admitted in the
    /// bucket's current window.
    #[serde(default)]
    pub buckets: Vec<BucketAnswer>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateMode {
    #[default]
    Split,
    Global,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketAnswer {
    pub bucket: String,
    pub others: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::MAX_REASON_CHARS;
    use serde_json::json;

    fn page(v: serde_json::Value) -> Result<FeedPage, FeedError> {
        parse_page(v.to_string().as_bytes(), 1 << 20, &Implications::default())
    }

    fn scopes(entry: &str) -> String {
        KeyRecord::decode(entry).unwrap().scopes_header
    }

    #[test]
    fn valid_pages_parse() {
        let d = Digest::of(b"k").to_hex();
        let p = page(json!({"version": 9, "complete": true, "keys": [{"digest": d, "id": "k1", "agent": "a", "scopes": ["admin"]}]})).unwrap();
        assert_eq!((p.version, p.complete, p.records.len()), (9, true, 1));
        assert_eq!(scopes(&p.records[0].1), "admin read:all write:all");
        let p = page(json!({"version": 9, "complete": false, "cursor": {"version": 4, "id": "k1"}, "keys": []})).unwrap();
        assert_eq!(p.cursor, Some(FeedCursor { version: 4, id: "k1".into() }));
    }

    #[test]
    fn a_page_s_implications_replace_the_configuration_s() {
        let d = Digest::of(b"k").to_hex();
        let key = json!([{"digest": d, "id": "k1", "agent": "a", "scopes": ["admin", "ops"]}]);
        let check = |implications: Option<serde_json::Value>, want: &str| {
            let mut msg = json!({"version": 3, "complete": true, "keys": key});
            if let Some(i) = implications {
                msg["implications"] = i;
            }
            assert_eq!(scopes(&page(msg).unwrap().records[0].1), want);
        };
        check(None, "admin ops read:all write:all");
        check(Some(json!({"ops": ["deploy", "read:all"]})), "admin deploy ops read:all");
        check(Some(json!({})), "admin ops");
        let err = page(json!({"version": 3, "complete": true, "implications": {"ops": ["a b"]}, "keys": key})).unwrap_err();
        assert!(matches!(err, FeedError::Implications(_)), "{err}");
    }

    #[test]
    fn usage_reports_carry_denials_by_code() {
        let report = UsageReport {
            envoy: "e1".into(),
            usage: vec![
                KeyUsage { key_id: "k1".into(), count: 3, last_used: 9, denied: [("RATE_LIMITED".to_string(), 2)].into() },
                KeyUsage { key_id: "k2".into(), count: 0, last_used: 0, denied: Default::default() },
            ],
        };
        let text = serde_json::to_string(&report).unwrap();
        assert_eq!(text, r#"{"envoy":"e1","usage":[{"key_id":"k1","count":3,"last_used":9,"denied":{"RATE_LIMITED":2}},{"key_id":"k2","count":0,"last_used":0}]}"#);
        assert_eq!(serde_json::from_str::<UsageReport>(&text).unwrap(), report);
    }

    fn store_page(version: u64, complete: bool, store: Option<&str>, reset: bool) -> FeedPage {
        let cursor = (!complete).then(|| FeedCursor { version: 1, id: "key_c".into() });
        FeedPage { version, complete, cursor, store: store.map(str::to_string), reset, records: vec![] }
    }

    fn epoch(n: u64, store: Option<&str>) -> Epoch {
        Epoch { n, store: store.map(str::to_string) }
    }

    fn reset(n: u64, store: &str, cursor: bool) -> Option<Reset> {
        Some(Reset { epoch: epoch(n, Some(store)), cursor: cursor.then(|| FeedCursor { version: 1, id: "key_c".into() }) })
    }

    #[test]
    fn pages_carry_the_store_and_the_reset_flag() {
        let p = page(json!({"version": 2, "complete": true, "store": "Ab_9", "reset": true, "keys": []})).unwrap();
        assert_eq!((p.store.as_deref(), p.reset), (Some("Ab_9"), true));
        let p = page(json!({"version": 2, "complete": true, "keys": []})).unwrap();
        assert_eq!((p.store, p.reset), (None, false), "an older control plane sends neither");
        for bad in ["", "a b", "a-b", "-", "é", &"x".repeat(65)] {
            let err = page(json!({"version": 2, "complete": true, "store": bad, "keys": []})).unwrap_err();
            assert!(err.to_string().contains("store id"), "{bad:?}: {err}");
        }
        assert!(valid_store_id(&"x".repeat(64)));
    }

    #[test]
    fn epochs_round_trip_and_refuse_garbage() {
        let c = Some(FeedCursor { version: 12, id: "key_x".into() });
        for e in [
            Epochs::default(),
            Epochs { committed: epoch(0, Some("A")), pending: None },
            Epochs { committed: epoch(3, None), pending: Some(Reset { epoch: epoch(4, Some("B")), cursor: None }) },
            Epochs { committed: epoch(3, Some("A")), pending: Some(Reset { epoch: epoch(9, None), cursor: c }) },
        ] {
            assert_eq!(Epochs::decode(&e.encode()), Some(e.clone()), "{}", e.encode());
        }
        assert_eq!(Epochs::decode(""), Some(Epochs::default()), "nothing written yet: epoch 0");
        for bad in ["x", "1", "1 a-b", "1 A 2", "1 A 2 B", "1 A 2 B 3", "1 A 1 B - -", "1 A 0 B - -", "1 A 2 B x key"] {
            assert_eq!(Epochs::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_the_committed_and_the_pending_epoch_are_live() {
        let e = Epochs { committed: epoch(2, Some("A")), pending: reset(5, "B", true) };
        assert_eq!((0..7).filter(|&n| e.live(n)).collect::<Vec<_>>(), [2, 5]);
        assert_eq!((0..3).filter(|&n| Epochs::default().live(n)).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn the_next_ask_follows_the_state_and_a_reset_under_way() {
        let c = FeedCursor { version: 7, id: "key_m".into() };
        let named = Epochs { committed: epoch(1, Some("A")), pending: None };
        let check = |e: &Epochs, loaded: bool, cursor: Option<&FeedCursor>, want: (u64, Option<&str>, Option<&str>, bool)| {
            let a = e.ask(loaded, 40, cursor);
            assert_eq!((a.since, a.after.as_deref(), a.store.as_deref(), a.restart), want, "{e:?} {loaded} {cursor:?}");
        };
        check(&Epochs::default(), false, None, (0, None, None, false));
        check(&Epochs::default(), true, None, (40, None, None, false));
        check(&named, true, None, (40, None, Some("A"), false));
        check(&named, true, Some(&c), (7, Some("key_m"), Some("A"), false));
        // A reset's own cursor wins over the state's; a reset cut short before its first page
        // was written starts over from 0.
        check(&Epochs { pending: reset(2, "B", true), ..named.clone() }, true, Some(&c), (1, Some("key_c"), Some("B"), false));
        check(&Epochs { pending: reset(2, "B", false), ..named.clone() }, true, Some(&c), (0, None, Some("B"), true));
    }

    /// The reset rule, page by page: what each answer makes live, and what it refuses.
    #[test]
    fn a_reset_takes_a_new_epoch_that_commits_with_its_last_page() {
        let a = Epochs { committed: epoch(0, Some("A")), pending: None };
        let ask = |e: &Epochs| e.ask(true, 40, None);
        // The same store: records stay in epoch 0, nothing to write.
        let s = a.step(&ask(&a), &store_page(41, true, Some("A"), false)).unwrap();
        assert_eq!((s.tag, s.before, s.after, s.begins_reset), (0, None, a.clone(), false));
        // An older filter's state, or a first load: the store is adopted without a reset.
        let s = Epochs::default().step(&ask(&Epochs::default()), &store_page(41, true, Some("A"), false)).unwrap();
        assert_eq!((s.tag, &s.after), (0, &a));
        let s = a.step(&ask(&a), &store_page(41, true, None, false)).unwrap();
        assert_eq!(s.after, a, "an older control plane names no store: keep ours");
        // A one-page reset: epoch 1 is live before its records are written, and alone after.
        let s = a.step(&ask(&a), &store_page(3, true, Some("B"), true)).unwrap();
        assert_eq!((s.tag, s.begins_reset), (1, true));
        assert_eq!(s.before, Some(Epochs { committed: epoch(0, Some("A")), pending: Some(Reset { epoch: epoch(1, Some("B")), cursor: None }) }));
        assert_eq!(s.after, Epochs { committed: epoch(1, Some("B")), pending: None });
        assert!(!s.after.live(0), "A's records are absent once the reset is applied");
        // A reset over two pages: both epochs live in between; the second page continues it.
        let s1 = a.step(&ask(&a), &store_page(3, false, Some("B"), true)).unwrap();
        let mid = s1.after.clone();
        assert_eq!(mid, Epochs { committed: epoch(0, Some("A")), pending: reset(1, "B", true) });
        assert!(mid.live(0) && mid.live(1));
        let s2 = mid.step(&ask(&mid), &store_page(3, true, Some("B"), false)).unwrap();
        assert_eq!((s2.tag, s2.before, &s2.after), (1, None, &Epochs { committed: epoch(1, Some("B")), pending: None }));
        // Restored again mid-reset: a newer epoch, and B's half-written records drop out too.
        let s = mid.step(&ask(&mid), &store_page(2, true, Some("C"), true)).unwrap();
        assert_eq!((s.tag, &s.after), (2, &Epochs { committed: epoch(2, Some("C")), pending: None }));
        // A reset cut short before its first page was whole starts over, even unflagged.
        let cut = Epochs { pending: reset(1, "B", false), ..a.clone() };
        let s = cut.step(&ask(&cut), &store_page(3, true, Some("B"), false)).unwrap();
        assert_eq!((s.tag, s.begins_reset, &s.after), (2, true, &Epochs { committed: epoch(2, Some("B")), pending: None }));
        // Refused: another store without a reset, and an answer to a request from before a reset began.
        let err = a.step(&ask(&a), &store_page(41, true, Some("B"), false)).unwrap_err();
        assert!(err.to_string().contains("without a reset"), "{err}");
        let err = mid.step(&ask(&mid), &store_page(3, true, Some("C"), false)).unwrap_err();
        assert!(err.to_string().contains("without a reset"), "{err}");
        let err = mid.step(&ask(&a), &store_page(41, true, Some("B"), false)).unwrap_err();
        assert!(err.to_string().contains("reset began"), "{err}");
        let last = Epochs { committed: epoch(u64::MAX, None), pending: None };
        assert!(last.step(&ask(&last), &store_page(1, true, None, true)).is_err(), "no epoch wraps around");
    }

    #[test]
    fn bad_pages_are_refused_whole() {
        let d = Digest::of(b"k").to_hex();
        let good = json!({"digest": d, "id": "k1", "agent": "a"});
        let check = |v: serde_json::Value, want: &str| {
            let err = page(v).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        };
        check(json!({"version": 1, "complete": true, "keys": [good, {"digest": "zz", "id": "k2", "agent": "a"}]}), "keys[1].digest");
        check(json!({"version": 1, "complete": true, "keys": [{"digest": d, "id": "k", "agent": "a", "key": "plain"}]}), "unknown field");
        check(json!({"version": 1, "complete": true, "cursor": {"version": 1, "id": "x"}, "keys": []}), "carries a cursor");
        check(json!({"version": 1, "complete": false, "keys": []}), "no cursor");
        check(json!({"version": 1, "complete": false, "cursor": {"version": 2, "id": "x"}, "keys": []}), "ahead");
        check(json!({"version": "one", "complete": true, "keys": []}), "not valid JSON");
        let err = parse_page(&[b' '; 100], 10, &Implications::default()).unwrap_err();
        assert_eq!(err, FeedError::TooLarge { size: 100, max: 10 });
    }

    /// Messages as the control plane writes them, with every field of a record in use.
    fn messages() -> Vec<FeedMessage> {
        let record = |key: &[u8], v: serde_json::Value| {
            let mut v = v;
            v["digest"] = json!(Digest::of(key).to_hex());
            serde_json::from_value::<RawKeyRecord>(v).unwrap()
        };
        let keys = vec![
            record(b"a", json!({"id": "key_1", "agent": "billing team", "scopes": ["read:all", "admin"]})),
            record(b"b", json!({"id": "key 2", "agent": "a", "status": "revoked", "expires_at": 1_900_000_000, "agent_enabled": false,
                "path_prefixes": ["/v1/a", "/b"], "rate_limit": "10/min", "deprecated_at": -5, "rate_bucket": "a:agt_1", "rate_burst": 3,
                "disabled_reason": "  Plan\tended <b>\u{e9}  "})),
            record(b"c", json!({"id": "k\u{e9}y", "agent": "a", "rate_limit": "1/day", "expires_at": "2030-01-02T03:04:05Z"})),
            record(b"d", json!({"id": "key_4", "agent": "a", "agent_enabled": false, "disabled_reason": "\n"})),
        ];
        let imp = [("billing".to_string(), vec!["invoices:read".to_string()])].into_iter().collect();
        let base = FeedMessage { version: 12, complete: true, cursor: None, implications: Some(imp), store: None, reset: false, keys, versions: vec![] };
        vec![
            base.clone(),
            FeedMessage { complete: false, cursor: Some(FeedCursor { version: 11, id: "key 2".into() }), store: Some("s_1".into()), reset: true, ..base.clone() },
            FeedMessage { keys: vec![], implications: Some(Default::default()), ..base.clone() },
            FeedMessage { implications: None, ..base },
        ]
    }

    #[test]
    fn the_line_form_is_read_as_the_json_is() {
        for msg in messages() {
            let lines = msg.to_lines(usize::MAX).unwrap();
            let from_lines = parse_page(lines.as_bytes(), 1 << 20, &Implications::default()).unwrap();
            // JSON without implications gets the configuration's; the line form has the records'
            // effective scopes, so compare with what the control plane sends: its own, or none.
            let mut json = msg.clone();
            json.implications.get_or_insert_with(Default::default);
            let from_json = parse_page(&serde_json::to_vec(&json).unwrap(), 1 << 20, &Implications::default()).unwrap();
            assert_eq!(from_lines, from_json, "{lines}");
            for (_, entry) in &from_lines.records {
                assert_eq!(KeyRecord::decode(entry).unwrap().encode(), *entry, "a stored record is canonical");
            }
        }
        let lines = messages()[0].to_lines(usize::MAX).unwrap();
        assert!(lines.starts_with("keyward-feed 2\nversion 12\ncomplete\nkeys 4\n"), "{lines}");
        let lines = messages()[1].to_lines(usize::MAX).unwrap();
        assert!(lines.starts_with("keyward-feed 2\nversion 12\ncursor 11 key 2\nstore s_1\nreset\nkeys 4\n"), "{lines}");
        assert!(lines.ends_with("\nend\n"));
    }

    #[test]
    fn a_line_page_cut_short_or_altered_is_refused_whole() {
        let lines = messages()[1].to_lines(usize::MAX).unwrap();
        let parse = |s: &str| parse_page(s.as_bytes(), 1 << 20, &Implications::default());
        // Every page cut short, anywhere, is refused: `end` and its newline close it.
        for cut in 0..lines.len() {
            if lines.is_char_boundary(cut) && cut >= 14 {
                assert!(parse(&lines[..cut]).is_err(), "cut at {cut}: {:?}", &lines[..cut]);
            }
        }
        let d = Digest::of(b"z").to_hex();
        let valid = |record: &str| format!("keyward-feed 2\nversion 3\ncomplete\nkeys 1\n{d}\t{record}\nend\n");
        let good = "2\tkey_1\tagent\ta\t\t1\tadmin read:all\t/v1\t10/60\t\tk:key_1\t\t";
        assert_eq!(parse(&valid(good)).unwrap().records, vec![(Digest::of(b"z"), good.to_string())]);
        let check = |page: String, want: &str| {
            let err = parse(&page).unwrap_err().to_string();
            assert!(err.contains(want), "{page:?}: {err}");
        };
        check(lines.replace("keys 4", "keys 5"), "or fewer keys");
        check(lines.replace("keys 4", "keys 3"), "expected \"end\"");
        check(format!("{lines}x"), "nothing may follow");
        check(format!("{lines}\n"), "nothing may follow");
        check(lines.replace("version 12", "version -1"), "not a number");
        check(lines.replace("cursor 11", "cursor 13"), "ahead of the version");
        check(lines.replace("store s_1", "store s-1"), "store id");
        check(lines.replace("keyward-feed 2\n", "keyward-feed 2 \n"), "line 1");
        check(valid(good).replace(&d, &d[1..]), "keys[0].digest");
        for (bad, field) in [
            ("1\tkey_1\tagent\ta\t\t1\t\t\t\t\t", "record"),
            ("2\tkey_1\tagent\ta\t\t1\t\t\t\t\t\t", "record"),
            ("2\t\tagent\ta\t\t1\t\t\t\t\t\t\t", "id"),
            ("2\tkey_1\tagent\tx\t\t1\t\t\t\t\t\t\t", "status"),
            ("2\tkey_1\tagent\ta\t07\t1\t\t\t\t\t\t\t", "expires_at"),
            ("2\tkey_1\tagent\ta\t-0\t1\t\t\t\t\t\t\t", "expires_at"),
            ("2\tkey_1\tagent\ta\t+7\t1\t\t\t\t\t\t\t", "expires_at"),
            ("2\tkey_1\tagent\ta\t\tyes\t\t\t\t\t\t\t", "agent_enabled"),
            ("2\tkey_1\tagent\ta\t\t1\tread:all admin\t\t\t\t\t\t", "scopes"),
            ("2\tkey_1\tagent\ta\t\t1\tadmin admin\t\t\t\t\t\t", "scopes"),
            ("2\tkey_1\tagent\ta\t\t1\tadmin \t\t\t\t\t\t", "scopes"),
            ("2\tkey_1\tagent\ta\t\t1\t\t/a  /b\t\t\t\t\t", "path_prefixes"),
            ("2\tkey_1\tagent\ta\t\t1\t\tv1\t\t\t\t\t", "path_prefixes"),
            ("2\tkey_1\tagent\ta\t\t1\t\t\t10/61\t\tk:key_1\t\t", "rate_limit"),
            ("2\tkey_1\tagent\ta\t\t1\t\t\t0/60\t\tk:key_1\t\t", "rate_limit"),
            ("2\tkey_1\tagent\ta\t\t1\t\t\t10/60\t\t\t\t", "rate_bucket"),
            ("2\tkey_1\tagent\ta\t\t1\t\t\t\t\tk:key_1\t\t", "rate_bucket"),
            ("2\tkey_1\tagent\ta\t\t1\t\t\t\t\t\t0\t", "rate_burst"),
            ("2\tkey_1\tagent\ta\t\t0\t\t\t\t\t\t\t reason", "disabled_reason"),
            ("2\tkey_1\tagent\ta\t\t0\t\t\t\t\t\t\tcut\u{7}", "disabled_reason"),
        ] {
            check(valid(bad), &format!("keys[0].{field}"));
        }
        let long = format!("2\tkey_1\tagent\ta\t\t0\t\t\t\t\t\t\t{}", "é".repeat(MAX_REASON_CHARS + 1));
        check(valid(&long), "keys[0].disabled_reason");
        assert!(parse(&valid(&long.replace(&"é".repeat(MAX_REASON_CHARS + 1), &"é".repeat(MAX_REASON_CHARS)))).is_ok());
    }

    /// A page ends early rather than outgrow the filter's limit, at a record boundary, with a
    /// cursor at its last record; one record always goes, so the feed moves on.
    #[test]
    fn a_line_page_ends_early_at_the_byte_limit_with_a_cursor_at_its_last_record() {
        let mut msg = messages()[0].clone();
        msg.versions = vec![7, 8, 9, 11];
        let whole = msg.to_lines(usize::MAX).unwrap();
        let parse = |s: &str| parse_page(s.as_bytes(), 1 << 20, &Implications::default()).unwrap();
        let all = parse(&whole).records;
        for max in [whole.len(), whole.len() - 1, 700, 600, 500, 1] {
            let cut = msg.to_lines(max).unwrap();
            let page = parse(&cut);
            let n = page.records.len();
            assert_eq!(page.records, all[..n], "max {max}: the first records, as they are");
            assert!(n >= 1, "max {max}: one record always goes");
            assert!(cut.len() <= max || n == 1, "max {max}: {} bytes, {n} records", cut.len());
            if n < all.len() {
                assert_eq!((page.complete, page.cursor.clone()), (false, Some(FeedCursor { version: msg.versions[n - 1], id: msg.keys[n - 1].id.clone() })), "max {max}");
            } else {
                assert_eq!((page.complete, page.cursor), (true, None), "max {max}");
            }
        }
        assert_eq!(parse(&msg.to_lines(1).unwrap()).records.len(), 1);
        // Without the versions, a page is never cut.
        msg.versions.clear();
        assert_eq!(msg.to_lines(1).unwrap(), whole);
    }
}
