//! The snapshot in Envoy shared data: one entry per digest, a state entry, and the fetcher lease.
//!
//! Shared data is one host-side map per `vm_id`, seen by every worker's VM: memory is paid once
//! per Envoy, and a request reads exactly one entry, its own digest's, whatever the key count.
//! There is no delete, so nothing here is keyed by time: the key space is the set of digests the
//! control plane ever sent (a revoked key stays as a `revoked` record, which is what it is), plus
//! three fixed entries.

use crate::host::{Host, HostError};
use keyward_core::decision::{KeyLookup, Unavailable};
use keyward_core::feed::FeedCursor;
use keyward_core::{Digest, KeyRecord};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Prefix of every entry: plugins on one Istio proxy share a namespace (no `vm_id` there).
pub const PREFIX: &str = "keyward.";
pub const STATE_KEY: &str = "keyward.state";
pub const LEASE_KEY: &str = "keyward.lease";
pub const ENVOY_ID_KEY: &str = "keyward.envoy";
pub const USAGE_QUEUE: &str = "keyward.usage";

pub fn record_key(digest: &Digest) -> String {
    format!("{PREFIX}k.{}", digest.to_hex())
}

/// What the fetcher has applied, as every worker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    /// A complete snapshot has been applied at least once.
    pub loaded: bool,
    /// The last completely applied version.
    pub applied: u64,
    /// When the feed last answered (ms since the epoch).
    pub last_heard_ms: u64,
    /// Mid-delta position, when a delta spans pages.
    pub cursor: Option<FeedCursor>,
}

impl State {
    pub fn encode(&self) -> String {
        let (cv, cid) = match &self.cursor {
            Some(c) => (c.version.to_string(), c.id.clone()),
            None => ("-".into(), "-".into()),
        };
        format!("{} {} {} {cv} {cid}", if self.loaded { "L" } else { "-" }, self.applied, self.last_heard_ms)
    }

    pub fn decode(s: &str) -> Option<State> {
        let mut f = s.split(' ');
        let loaded = match f.next()? {
            "L" => true,
            "-" => false,
            _ => return None,
        };
        let applied = f.next()?.parse().ok()?;
        let last_heard_ms = f.next()?.parse().ok()?;
        let cursor = match (f.next()?, f.next()?) {
            ("-", "-") => None,
            (v, id) => Some(FeedCursor { version: v.parse().ok()?, id: id.to_string() }),
        };
        Some(State { loaded, applied, last_heard_ms, cursor })
    }

    pub fn read<H: Host>(host: &H) -> Result<State, HostError> {
        let (value, _) = host.shared_get(STATE_KEY)?;
        Ok(value.and_then(|v| std::str::from_utf8(&v).ok().and_then(State::decode)).unwrap_or_default())
    }

    /// The same snapshot content: nothing applied in between (the feed's last answer may differ).
    pub fn same_snapshot(&self, other: &State) -> bool {
        self.loaded == other.loaded && self.applied == other.applied && self.cursor == other.cursor
    }

    /// Whether requests may use the shared keys now.
    pub fn usable(&self, now_ms: u64, max_age_secs: Option<u32>) -> bool {
        self.loaded && max_age_secs.is_none_or(|max| now_ms.saturating_sub(self.last_heard_ms) <= u64::from(max) * 1000)
    }
}

/// Records read from shared data, kept per VM so a hot key costs no hostcall. The root context
/// clears it on every tick that finds the shared state moved (a change applied, or a page of
/// one), so a cached record is at most one tick (25 ms) older than the shared data. Unknown
/// digests are cached too (as `None`), so a flood of wrong keys does not reach shared data
/// twice. Bounded: when full, it starts over.
#[derive(Debug, Default)]
pub struct RecordCache {
    entries: RefCell<HashMap<Digest, Option<Rc<KeyRecord>>>>,
}

/// Most records a VM caches (about 300 bytes each).
pub const RECORD_CACHE_MAX: usize = 10_000;

impl RecordCache {
    pub fn clear(&self) {
        self.entries.borrow_mut().clear();
    }

    fn get(&self, digest: &Digest) -> Option<Option<Rc<KeyRecord>>> {
        self.entries.borrow().get(digest).cloned()
    }

    fn put(&self, digest: Digest, record: Option<Rc<KeyRecord>>) {
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= RECORD_CACHE_MAX {
            entries.clear();
        }
        entries.insert(digest, record);
    }
}

/// Per-request key lookup: the VM's cache, else one `get` of one shared-data entry.
pub struct SharedKeys<'h, H: Host> {
    host: &'h H,
    usable: bool,
    cache: &'h RecordCache,
    /// Holds the record this request looked up, so the decision can borrow it.
    found: std::cell::OnceCell<Rc<KeyRecord>>,
    /// Set when an entry could not be read or decoded.
    pub fault: std::cell::Cell<bool>,
}

impl<'h, H: Host> SharedKeys<'h, H> {
    pub fn new(host: &'h H, usable: bool, cache: &'h RecordCache) -> Self {
        SharedKeys { host, usable, cache, found: std::cell::OnceCell::new(), fault: std::cell::Cell::new(false) }
    }

    fn hand_out(&self, record: Rc<KeyRecord>) -> Cow<'_, KeyRecord> {
        if self.found.get().is_some() {
            // A second lookup in one request (the core makes one): a copy.
            return Cow::Owned((*record).clone());
        }
        Cow::Borrowed(&**self.found.get_or_init(|| record))
    }
}

impl<H: Host> KeyLookup for SharedKeys<'_, H> {
    fn lookup(&self, digest: &Digest) -> Result<Option<Cow<'_, KeyRecord>>, Unavailable> {
        if !self.usable {
            return Err(Unavailable);
        }
        if let Some(hit) = self.cache.get(digest) {
            return Ok(hit.map(|r| self.hand_out(r)));
        }
        let (value, _) = self.host.shared_get(&record_key(digest)).map_err(|_| {
            self.fault.set(true);
            Unavailable
        })?;
        match value {
            None => {
                self.cache.put(*digest, None);
                Ok(None)
            }
            Some(bytes) => match std::str::from_utf8(&bytes).ok().and_then(KeyRecord::decode) {
                Some(record) => {
                    let record = Rc::new(record);
                    self.cache.put(*digest, Some(Rc::clone(&record)));
                    Ok(Some(self.hand_out(record)))
                }
                None => {
                    // Fail closed on an entry we cannot read; the fetcher only writes valid ones.
                    self.fault.set(true);
                    Err(Unavailable)
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        for s in [
            State::default(),
            State { loaded: true, applied: 42, last_heard_ms: 1_800_000_000_000, cursor: None },
            State { loaded: false, applied: 0, last_heard_ms: 5, cursor: Some(FeedCursor { version: 7, id: "key_x".into() }) },
        ] {
            assert_eq!(State::decode(&s.encode()), Some(s.clone()));
        }
        assert_eq!(State::decode("garbage"), None);
    }

    #[test]
    fn usable_needs_a_load_and_respects_max_age() {
        let s = State { loaded: true, applied: 1, last_heard_ms: 10_000, cursor: None };
        assert!(s.usable(10_000, None));
        assert!(s.usable(40_000, Some(30)));
        assert!(!s.usable(40_001, Some(30)));
        assert!(!State::default().usable(0, None));
    }
}
