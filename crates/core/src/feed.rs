//! The snapshot feed's wire format, shared by `keyward serve` (which writes it) and the filter
//! (which validates a whole page before applying any of it).

use crate::digest::Digest;
use crate::scope::Implications;
use crate::snapshot::{compile_record, KeyRecord, RawKeyRecord};
use serde::{Deserialize, Serialize};

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
    /// The store's identity. A restored store gets a new one: an Envoy that applied another
    /// store's records sends that store's id (`store=`), and is answered with a reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// This answer is the whole snapshot from version 0 and replaces what the filter holds: a
    /// key absent from it must be absent once it is applied (the store went back, or is another).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    pub keys: Vec<RawKeyRecord>,
}

/// A validated page, ready to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedPage {
    pub version: u64,
    pub complete: bool,
    pub cursor: Option<FeedCursor>,
    pub records: Vec<(Digest, KeyRecord)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    #[error("feed message of {size} bytes exceeds max_feed_bytes ({max})")]
    TooLarge { size: usize, max: usize },
    #[error("feed message is not valid JSON: {0}")]
    Json(String),
    #[error("feed record keys[{index}].{field}: {message}")]
    Record { index: usize, field: &'static str, message: String },
    #[error("feed message is inconsistent: {0}")]
    Inconsistent(&'static str),
    #[error("feed implications: {0}")]
    Implications(String),
}

/// Parses and validates a whole page. Nothing of a bad page may be applied. The page's own
/// `implications`, when present, replace `implications` (the configuration's).
pub fn parse_page(bytes: &[u8], max_bytes: usize, implications: &Implications) -> Result<FeedPage, FeedError> {
    if bytes.len() > max_bytes {
        return Err(FeedError::TooLarge { size: bytes.len(), max: max_bytes });
    }
    let msg: FeedMessage = serde_json::from_slice(bytes).map_err(|e| FeedError::Json(e.to_string()))?;
    match (&msg.cursor, msg.complete) {
        (Some(_), true) => return Err(FeedError::Inconsistent("a complete page carries a cursor")),
        (None, false) => return Err(FeedError::Inconsistent("an incomplete page has no cursor")),
        (Some(c), false) if c.version > msg.version => return Err(FeedError::Inconsistent("the cursor is ahead of the version")),
        _ => {}
    }
    let own = msg.implications.as_ref().map(Implications::new).transpose().map_err(FeedError::Implications)?;
    let implications = own.as_ref().unwrap_or(implications);
    let records = msg
        .keys
        .iter()
        .enumerate()
        .map(|(index, r)| compile_record(r, implications).map_err(|(field, message)| FeedError::Record { index, field, message }))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(FeedPage { version: msg.version, complete: msg.complete, cursor: msg.cursor, records })
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn page(v: serde_json::Value) -> Result<FeedPage, FeedError> {
        parse_page(v.to_string().as_bytes(), 1 << 20, &Implications::default())
    }

    #[test]
    fn valid_pages_parse() {
        let d = Digest::of(b"k").to_hex();
        let p = page(json!({"version": 9, "complete": true, "keys": [{"digest": d, "id": "k1", "agent": "a", "scopes": ["admin"]}]})).unwrap();
        assert_eq!((p.version, p.complete, p.records.len()), (9, true, 1));
        assert_eq!(p.records[0].1.scopes_header, "admin read:all write:all");
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
            assert_eq!(page(msg).unwrap().records[0].1.scopes_header, want);
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
}
