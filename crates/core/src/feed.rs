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
    pub records: Vec<(Digest, KeyRecord)>,
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
    if msg.store.as_deref().is_some_and(|id| !valid_store_id(id)) {
        return Err(FeedError::Inconsistent("the store id is not 1 to 64 letters, digits or underscores"));
    }
    let own = msg.implications.as_ref().map(Implications::new).transpose().map_err(FeedError::Implications)?;
    let implications = own.as_ref().unwrap_or(implications);
    let records = msg
        .keys
        .iter()
        .enumerate()
        .map(|(index, r)| compile_record(r, implications).map_err(|(field, message)| FeedError::Record { index, field, message }))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(FeedPage { version: msg.version, complete: msg.complete, cursor: msg.cursor, store: msg.store, reset: msg.reset, records })
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
}
