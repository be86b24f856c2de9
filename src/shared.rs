//! The snapshot in Envoy shared data: one entry per digest, a state entry, the fetcher lease,
//! and the apply generation.
//!
//! Shared data is one host-side map per `vm_id`, seen by every worker's VM: memory is paid once
//! per Envoy, and a request reads the (empty) generation entry and at most one record, its own
//! digest's, whatever the key count. There is no delete, so nothing here is keyed by time: the
//! key space is the set of digests the control plane ever sent (a revoked key stays as a
//! `revoked` record, which is what it is), plus the fixed entries below.
//!
//! Nor can an entry be taken away when the control plane's store goes back (a restore, another
//! store): each record is tagged with the feed epoch it was written in, and a record whose epoch
//! is not live (`keyward.epochs`, see `keyward_core::feed::Epochs`) reads as absent. A reset
//! writes the new store's records under a new epoch and commits it last, inside one apply
//! generation, so from the next generation on no worker finds the older store's records.

use crate::host::{Host, HostError};
use keyward_core::decision::{KeyLookup, LookupError};
use keyward_core::feed::Epochs;
use keyward_core::fetch::rates::FLEET_KEY;
use keyward_core::fetch::{Keys, State, Write};
use keyward_core::ratelimit::Fleet;
use keyward_core::{Digest, KeyRecord};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

pub use keyward_core::fetch::{record_key, ENVOY_ID_KEY, EPOCHS_KEY, GENERATION_KEY, LEASE_KEY, PREFIX, STATE_KEY, USAGE_QUEUE};

/// Runs one of the fetcher's writes.
pub fn write<H: Host>(host: &H, w: &Write) -> Result<(), HostError> {
    host.shared_set(&w.key, w.value.as_bytes(), None).map(|_| ())
}

/// The current apply generation: the entry's CAS token times two, plus one while an apply is in
/// progress (so odd means "records are being written"); 0 before the first apply.
pub fn generation<H: Host>(host: &H) -> Result<u64, HostError> {
    let (value, cas) = host.shared_get(GENERATION_KEY)?;
    let applying = value.is_some_and(|v| !v.is_empty());
    Ok((u64::from(cas.unwrap_or(0)) << 1) | u64::from(applying))
}

/// The live epochs. An entry that cannot be decoded is an error: every request fails closed.
pub fn read_epochs<H: Host>(host: &H) -> Result<Epochs, HostError> {
    let (value, _) = host.shared_get(EPOCHS_KEY)?;
    let text = value.unwrap_or_default();
    std::str::from_utf8(&text).ok().and_then(Epochs::decode).ok_or(HostError { op: "decoding keyward.epochs", status: crate::host::Status::ParseFailure })
}

/// What the fetcher has applied, as every worker sees it (absent: nothing yet). An entry that
/// cannot be decoded is an error: a request fails closed, never open, on it.
pub fn read_state<H: Host>(host: &H) -> Result<State, HostError> {
    let (value, _) = host.shared_get(STATE_KEY)?;
    match value {
        None => Ok(State::default()),
        Some(v) => std::str::from_utf8(&v).ok().and_then(State::decode).ok_or(HostError { op: "decoding keyward.state", status: crate::host::Status::ParseFailure }),
    }
}

/// The fleet this VM judges rate limits by (`keyward.fleet`, written by the lease holder from the
/// control plane's answers; see `keyward_core::fetch::rates`), read on every tick.
pub fn read_fleet<H: Host>(host: &H) -> Result<Fleet, HostError> {
    let (value, _) = host.shared_get(FLEET_KEY)?;
    Ok(value.and_then(|v| std::str::from_utf8(&v).ok().and_then(Fleet::decode)).unwrap_or_default())
}

/// Records read from shared data, kept per VM so a hot key costs no hostcall. The root context
/// clears it on every tick that finds the shared state moved (a change applied, or a page of
/// one), so a cached record is at most one tick (25 ms) older than the shared data. Unknown
/// digests are not cached: a key is usable on every worker as soon as it is in shared data
/// (a worker that had looked for it must not refuse it for another tick), and a miss costs
/// only the one read. Bounded: when full, it starts over.
///
/// Every request first calls [`RecordCache::sync`] with the generation it read: a changed
/// generation drops the cache, and an odd one (records being written) bypasses it. So a record
/// is cached only from an even generation, and used only while the generation is still that
/// one: no worker serves a record older than one another worker has already read. This makes
/// refusals monotonic across workers (a key refused once is refused everywhere after).
///
/// `sync` also re-reads the live epochs when the generation moved, and on every request while
/// it is odd (the fetcher changes them only then). A record of an epoch this VM does not know
/// as live makes the lookup read them once more (a reset's first records may be newer than
/// this VM's copy); if it is still not live, the record is absent. Only live records are
/// cached, and the cache is dropped with the generation, so no cached record outlives a reset.
#[derive(Debug)]
pub struct RecordCache {
    entries: RefCell<HashMap<Digest, Rc<KeyRecord>>>,
    /// The generation last synced; `NEVER` before the first request.
    generation: std::cell::Cell<u64>,
    /// The live epochs' numbers as of the last read: committed, and a reset's under way.
    live: std::cell::Cell<(u64, Option<u64>)>,
}

/// A generation `generation` cannot return (it is a CAS token, a `u32`, times two plus one).
const NEVER: u64 = u64::MAX;

impl Default for RecordCache {
    fn default() -> Self {
        RecordCache { entries: RefCell::default(), generation: std::cell::Cell::new(NEVER), live: std::cell::Cell::new((0, None)) }
    }
}

/// Most records a VM caches (about 300 bytes each).
pub const RECORD_CACHE_MAX: usize = 10_000;

impl RecordCache {
    pub fn clear(&self) {
        self.entries.borrow_mut().clear();
    }

    /// Follows the shared generation read by this request; see the type's comment.
    pub fn sync<H: Host>(&self, host: &H, generation: u64) -> Result<(), HostError> {
        if generation != self.generation.get() {
            self.entries.borrow_mut().clear();
            self.generation.set(generation);
            self.read_live(host)
        } else if self.applying() {
            self.read_live(host)
        } else {
            Ok(())
        }
    }

    fn read_live<H: Host>(&self, host: &H) -> Result<(), HostError> {
        let epochs = read_epochs(host)?;
        self.live.set((epochs.committed.n, epochs.pending.map(|p| p.epoch.n)));
        Ok(())
    }

    fn is_live(&self, epoch: u64) -> bool {
        let (committed, pending) = self.live.get();
        epoch == committed || pending == Some(epoch)
    }

    /// Whether a record of `epoch` counts, reading the epochs again if it may be newer than
    /// this VM's copy. Epochs only grow (a reset takes one above every epoch so far), so one
    /// below the committed epoch is dead for good: a stale key costs no second read.
    fn live<H: Host>(&self, host: &H, epoch: u64) -> Result<bool, HostError> {
        if self.is_live(epoch) {
            return Ok(true);
        }
        if epoch < self.live.get().0 {
            return Ok(false);
        }
        self.read_live(host)?;
        Ok(self.is_live(epoch))
    }

    fn applying(&self) -> bool {
        self.generation.get() % 2 == 1
    }

    fn get(&self, digest: &Digest) -> Option<Rc<KeyRecord>> {
        if self.applying() {
            return None;
        }
        self.entries.borrow().get(digest).cloned()
    }

    fn put(&self, digest: Digest, record: Rc<KeyRecord>) {
        if self.applying() {
            return;
        }
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
    keys: Keys,
    cache: &'h RecordCache,
    /// Holds the record this request looked up, so the decision can borrow it.
    found: std::cell::OnceCell<Rc<KeyRecord>>,
}

impl<'h, H: Host> SharedKeys<'h, H> {
    pub fn new(host: &'h H, keys: Keys, cache: &'h RecordCache) -> Self {
        SharedKeys { host, keys, cache, found: std::cell::OnceCell::new() }
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
    fn lookup(&self, digest: &Digest) -> Result<Option<Cow<'_, KeyRecord>>, LookupError> {
        // Not found while the first snapshot loads: it may be on a page still to come.
        let absent = match self.keys {
            Keys::None => return Err(LookupError::Unavailable),
            Keys::Partial => Err(LookupError::Unavailable),
            Keys::Whole => Ok(None),
        };
        if let Some(hit) = self.cache.get(digest) {
            return Ok(Some(self.hand_out(hit)));
        }
        // A read that fails, or an entry that cannot be decoded, is a fault: the request fails
        // closed whatever `fail_open` says.
        let fault = |_| LookupError::Fault;
        let (value, _) = self.host.shared_get(&record_key(digest)).map_err(fault)?;
        match value {
            None => absent,
            Some(bytes) => match std::str::from_utf8(&bytes).ok().and_then(KeyRecord::decode_entry) {
                // An older store's record, which a reset has replaced: absent, never cached.
                Some((epoch, _)) if !self.cache.live(self.host, epoch).map_err(fault)? => absent,
                Some((_, record)) => {
                    let record = Rc::new(record);
                    self.cache.put(*digest, Rc::clone(&record));
                    Ok(Some(self.hand_out(record)))
                }
                // The fetcher writes only valid entries.
                None => Err(LookupError::Fault),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FakeHost;
    use keyward_core::KeyStatus;

    // The fetcher's writes, as its `Command::Apply` carries them, one at a time.
    fn begin_apply(host: &FakeHost) -> Result<(), HostError> {
        write(host, &Write::begin_apply())
    }

    fn end_apply(host: &FakeHost) -> Result<(), HostError> {
        write(host, &Write::end_apply())
    }

    fn write_epochs(host: &FakeHost, epochs: &Epochs) -> Result<(), HostError> {
        write(host, &Write::epochs(epochs))
    }

    fn record(id: &str, status: KeyStatus) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            agent: "a".into(),
            status,
            expires_at: None,
            agent_enabled: true,
            scopes: vec![],
            scopes_header: String::new(),
            path_prefixes: vec![],
            rate_limit: None,
            deprecated_at: None,
            rate_bucket: None,
            rate_burst: None,
            disabled_reason: None,
        }
    }

    /// A record that cannot be decoded is a fault (500 whatever `fail_open` says), never
    /// "unavailable" (which `fail_open` forwards).
    #[test]
    fn an_undecodable_record_is_a_fault_not_unavailable() {
        let host = FakeHost::new();
        let cache = RecordCache::default();
        let digest = Digest::of(b"key");
        host.shared_set(&record_key(&digest), b"9\tgarbage", None).unwrap();
        cache.sync(&host, generation(&host).unwrap()).unwrap();
        let keys = SharedKeys::new(&host, Keys::Whole, &cache);
        assert_eq!(keys.lookup(&digest).err(), Some(LookupError::Fault));
        // Not loaded yet is the other kind.
        let keys = SharedKeys::new(&host, Keys::None, &cache);
        assert_eq!(keys.lookup(&digest).err(), Some(LookupError::Unavailable));
    }

    /// While the first snapshot loads, a key written is judged, and one not written yet (or
    /// an older store's) is unavailable, never unknown: it may be on a page still to come.
    #[test]
    fn a_partial_snapshot_answers_found_keys_and_never_calls_a_missing_one_unknown() {
        let host = FakeHost::new();
        let cache = RecordCache::default();
        let (written, missing) = (Digest::of(b"written"), Digest::of(b"missing"));
        let record = KeyRecord::decode("2\tkey_1\tagent\ta\t\t1\t\t\t\t\t\t\t").unwrap();
        host.shared_set(&record_key(&written), record.encode().as_bytes(), None).unwrap();
        cache.sync(&host, generation(&host).unwrap()).unwrap();
        let partial = SharedKeys::new(&host, Keys::Partial, &cache);
        assert_eq!(partial.lookup(&written).unwrap().map(|r| r.id.clone()), Some("key_1".into()));
        assert_eq!(partial.lookup(&missing).err(), Some(LookupError::Unavailable));
        let whole = SharedKeys::new(&host, Keys::Whole, &cache);
        assert_eq!(whole.lookup(&missing).unwrap(), None, "unknown once the whole snapshot is loaded");
        // A record of a dead epoch reads as absent: unavailable too.
        host.shared_set(&record_key(&missing), record.encode_entry(7).as_bytes(), None).unwrap();
        let partial = SharedKeys::new(&host, Keys::Partial, &cache);
        assert_eq!(partial.lookup(&missing).err(), Some(LookupError::Unavailable));
    }

    /// Two workers' caches and the fetcher, interleaved as threads may be: once one worker has
    /// read the revoked record, the other never serves its cached active one (issue 12).
    #[test]
    fn a_refusal_on_one_worker_is_never_undone_by_another_s_cache_issue_12() {
        let host = FakeHost::new();
        let (a, b) = (RecordCache::default(), RecordCache::default());
        let digest = Digest::of(b"key");
        let status = |cache: &RecordCache| {
            cache.sync(&host, generation(&host).unwrap()).unwrap();
            SharedKeys::new(&host, Keys::Whole, cache).lookup(&digest).unwrap().map(|r| r.status)
        };
        begin_apply(&host).unwrap();
        host.shared_set(&record_key(&digest), record("key_1", KeyStatus::Active).encode().as_bytes(), None).unwrap();
        end_apply(&host).unwrap();
        assert_eq!(status(&b), Some(KeyStatus::Active), "B caches the active record");
        let reads = host.shared_reads.get();
        assert_eq!(status(&b), Some(KeyStatus::Active));
        assert_eq!(host.shared_reads.get(), reads + 1, "a cached record costs only the generation's read");
        // The fetcher starts a page that revokes the key; B looks at it before it is written,
        // and must not cache what it read.
        begin_apply(&host).unwrap();
        assert_eq!(status(&b), Some(KeyStatus::Active), "not written yet: still active");
        host.shared_set(&record_key(&digest), record("key_1", KeyStatus::Revoked).encode().as_bytes(), None).unwrap();
        assert_eq!(status(&a), Some(KeyStatus::Revoked), "A refuses");
        assert_eq!(status(&b), Some(KeyStatus::Revoked), "so does B from then on, mid-apply");
        end_apply(&host).unwrap();
        assert_eq!(status(&b), Some(KeyStatus::Revoked));
        assert_eq!(status(&a), Some(KeyStatus::Revoked));
        // An apply that died half-way leaves the generation odd; the next one still moves it.
        let g = generation(&host).unwrap();
        begin_apply(&host).unwrap();
        let odd = generation(&host).unwrap();
        begin_apply(&host).unwrap();
        assert!(odd % 2 == 1 && generation(&host).unwrap() % 2 == 1 && generation(&host).unwrap() != odd);
        end_apply(&host).unwrap();
        assert!(generation(&host).unwrap().is_multiple_of(2) && generation(&host).unwrap() != g);
    }

    /// A reset as the fetcher writes it (two pages: K2 on each, K1 on neither), with two workers
    /// looking at every step: K2 is never refused, K1 keeps its old answer until the reset
    /// commits and is absent on both from then on, including from B's cache.
    #[test]
    fn after_a_reset_a_key_the_new_store_lacks_is_absent_on_every_worker() {
        use keyward_core::feed::{Epoch, FeedCursor, Reset};
        let host = FakeHost::new();
        let (a, b) = (RecordCache::default(), RecordCache::default());
        let (k1, k2, k3) = (Digest::of(b"k1"), Digest::of(b"k2"), Digest::of(b"k3"));
        let status = |cache: &RecordCache, d: &Digest| {
            cache.sync(&host, generation(&host).unwrap()).unwrap();
            SharedKeys::new(&host, Keys::Whole, cache).lookup(d).unwrap().map(|r| r.id.clone())
        };
        let both = |d: &Digest| (status(&a, d), status(&b, d));
        let some = |id: &str| (Some(id.to_string()), Some(id.to_string()));
        let write = |d: &Digest, id: &str, epoch: u64| host.shared_set(&record_key(d), record(id, KeyStatus::Active).encode_entry(epoch).as_bytes(), None).unwrap();
        // Store A, epoch 0, written by a module from before epochs (untagged).
        begin_apply(&host).unwrap();
        write(&k1, "k1", 0);
        write(&k2, "k2", 0);
        end_apply(&host).unwrap();
        assert_eq!((both(&k1), both(&k2)), (some("k1"), some("k2")), "B now caches both");
        // Store B's reset, page 1 of 2 (K3): epoch 1 becomes live before its records.
        let a_store = Epoch { n: 0, store: Some("A".into()) };
        let pending = |cursor| Epochs { committed: a_store.clone(), pending: Some(Reset { epoch: Epoch { n: 1, store: Some("B".into()) }, cursor }) };
        begin_apply(&host).unwrap();
        write_epochs(&host, &pending(None)).unwrap();
        write(&k3, "k3", 1);
        write_epochs(&host, &pending(Some(FeedCursor { version: 1, id: "k3".into() }))).unwrap();
        end_apply(&host).unwrap();
        assert_eq!((both(&k1), both(&k2), both(&k3)), (some("k1"), some("k2"), some("k3")), "mid-reset: nothing refused");
        // Page 2 (K2), then the commit: A's records are gone on both workers.
        begin_apply(&host).unwrap();
        assert_eq!(both(&k2), some("k2"), "while applying");
        write(&k2, "k2", 1);
        assert_eq!(both(&k2), some("k2"));
        write_epochs(&host, &Epochs { committed: Epoch { n: 1, store: Some("B".into()) }, pending: None }).unwrap();
        assert_eq!(both(&k1), (None, None), "refused from the commit on, even before the generation moves");
        end_apply(&host).unwrap();
        assert_eq!((both(&k1), both(&k2), both(&k3)), ((None, None), some("k2"), some("k3")));
        let reads = host.shared_reads.get();
        assert_eq!(status(&a, &k1), None);
        assert_eq!(host.shared_reads.get(), reads + 2, "a stale key costs the generation's read and its record's, no more");
        // A worker whose copy of the epochs is older than a record it reads looks again.
        let c = RecordCache::default();
        c.sync(&host, generation(&host).unwrap()).unwrap();
        begin_apply(&host).unwrap();
        write_epochs(&host, &Epochs { committed: Epoch { n: 1, store: Some("B".into()) }, pending: Some(Reset { epoch: Epoch { n: 2, store: Some("C".into()) }, cursor: None }) }).unwrap();
        write(&k2, "k2", 2);
        assert_eq!(SharedKeys::new(&host, Keys::Whole, &c).lookup(&k2).unwrap().map(|r| r.id.clone()), Some("k2".into()), "read as of an older generation");
        // A garbled epochs entry fails every request closed.
        host.shared_set(EPOCHS_KEY, b"garbage", None).unwrap();
        assert!(RecordCache::default().sync(&host, generation(&host).unwrap()).is_err());
    }

    #[test]
    fn a_key_written_after_a_miss_is_found_at_once_and_a_hit_costs_no_read() {
        let host = FakeHost::new();
        let cache = RecordCache::default();
        let digest = Digest::of(b"a-new-key");
        cache.sync(&host, generation(&host).unwrap()).unwrap();
        let status = |keys: &SharedKeys<'_, FakeHost>| keys.lookup(&digest).unwrap().map(|r| r.status);
        assert_eq!(status(&SharedKeys::new(&host, Keys::Whole, &cache)), None, "unknown before the feed wrote it");
        host.shared_set(&record_key(&digest), record("key_1", KeyStatus::Active).encode().as_bytes(), None).unwrap();
        assert_eq!(status(&SharedKeys::new(&host, Keys::Whole, &cache)), Some(KeyStatus::Active), "absence was not cached");
        let reads = host.shared_reads.get();
        assert_eq!(status(&SharedKeys::new(&host, Keys::Whole, &cache)), Some(KeyStatus::Active));
        assert_eq!(host.shared_reads.get(), reads, "a cached record costs no shared-data read");
        // A change is seen once the tick drops the cache.
        host.shared_set(&record_key(&digest), record("key_1", KeyStatus::Revoked).encode().as_bytes(), None).unwrap();
        cache.clear();
        assert_eq!(status(&SharedKeys::new(&host, Keys::Whole, &cache)), Some(KeyStatus::Revoked));
        assert!(SharedKeys::new(&host, Keys::None, &cache).lookup(&digest).is_err(), "no snapshot: unavailable");
    }
}
