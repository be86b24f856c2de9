//! Rate-limit buckets in the process's memory, for the native shell: every worker's requests
//! meet in one map, so a key's limit is exact across workers, as shared data makes it in the
//! wasm shell.
//!
//! The map is split in shards, each behind its own mutex. The limiter's read and write of a
//! bucket happen under its shard's lock ([`BucketStore::update`]): exact, and no request ever
//! retries. Workers limiting different keys rarely meet, and none holds a lock for more than
//! one bucket's arithmetic. The compare-and-swap pair (`get`, `set`, a per-bucket write counter
//! as the token) is kept for the trait, and tested, but the limiter does not need it here.

use crate::ratelimit::{BucketStore, Update, Versioned};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};

const SHARDS: usize = 64;

/// A bucket's state and the number of writes it has had (its CAS token).
type Bucket = (Vec<u8>, u32);

pub struct Buckets {
    shards: [Mutex<HashMap<String, Bucket>>; SHARDS],
}

/// A shard's mutex was poisoned by a panic while held: the store refuses, and the request
/// fails closed (500), as a shared-data failure does in the wasm shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poisoned;

impl std::fmt::Display for Poisoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the rate-limit buckets are unusable (a panic while one was held)")
    }
}

impl Default for Buckets {
    fn default() -> Buckets {
        Buckets { shards: std::array::from_fn(|_| Mutex::new(HashMap::new())) }
    }
}

impl Buckets {
    fn shard(&self, key: &str) -> Result<MutexGuard<'_, HashMap<String, Bucket>>, Poisoned> {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        let i = usize::try_from(h.finish() % SHARDS as u64).unwrap_or(0);
        self.shards.get(i).ok_or(Poisoned)?.lock().map_err(|_| Poisoned)
    }
}

impl BucketStore for Buckets {
    type Error = Poisoned;

    fn get(&self, key: &str) -> Result<Versioned, Poisoned> {
        Ok(match self.shard(key)?.get(key) {
            Some((value, cas)) => (Some(value.clone()), Some(*cas)),
            None => (None, None),
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, Poisoned> {
        let mut shard = self.shard(key)?;
        match (shard.get_mut(key), cas) {
            (Some((stored, token)), Some(expected)) if *token == expected => {
                stored.clear();
                stored.extend_from_slice(value);
                *token = token.wrapping_add(1);
                Ok(true)
            }
            // Written by another request since it was read (or created meanwhile): retry.
            (Some(_), Some(_)) => Ok(false),
            (None, Some(_)) => Ok(false),
            (Some((stored, token)), None) => {
                stored.clear();
                stored.extend_from_slice(value);
                *token = token.wrapping_add(1);
                Ok(true)
            }
            (None, None) => {
                shard.insert(key.to_string(), (value.to_vec(), 1));
                Ok(true)
            }
        }
    }

    fn update(&self, key: &str, f: &mut Update<'_>) -> Option<Result<(), Poisoned>> {
        let mut shard = match self.shard(key) {
            Ok(shard) => shard,
            Err(e) => return Some(Err(e)),
        };
        match shard.get_mut(key) {
            Some((stored, token)) => {
                if let Some(value) = f(Some(stored)) {
                    *stored = value;
                    *token = token.wrapping_add(1);
                }
            }
            None => {
                if let Some(value) = f(None) {
                    shard.insert(key.to_string(), (value, 1));
                }
            }
        }
        Some(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_with_a_stale_token_is_refused_and_a_fresh_one_lands() {
        let buckets = Buckets::default();
        let store = &buckets;
        assert_eq!(store.get("k"), Ok((None, None)));
        assert_eq!(store.set("k", b"1", None), Ok(true));
        let (value, cas) = store.get("k").unwrap_or_default();
        assert_eq!(value.as_deref(), Some(&b"1"[..]));
        assert_eq!(store.set("k", b"2", cas), Ok(true));
        assert_eq!(store.set("k", b"3", cas), Ok(false), "the token moved with the last write");
        assert_eq!(store.get("k").map(|(v, _)| v), Ok(Some(b"2".to_vec())));
        assert_eq!(store.set("absent", b"x", Some(1)), Ok(false), "a token for a bucket that is not there");
    }

    /// Two threads spending one bucket through the core's limiter admit exactly its limit, each
    /// request in one attempt.
    #[test]
    fn workers_on_one_bucket_admit_exactly_the_limit() {
        use crate::ratelimit::{check, Burst, Fleet, Verdict};
        use crate::RateLimit;
        use std::sync::atomic::{AtomicU32, Ordering};
        let buckets = Buckets::default();
        let limit = RateLimit { count: 1_000, period_secs: 3_600 };
        let (admitted, retried) = (AtomicU32::new(0), AtomicU32::new(0));
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..800 {
                        let Ok(checked) = check(&buckets, "b", 1_000_000, limit, Burst::Limit, Fleet::default(), 64) else { continue };
                        if matches!(checked.verdict, Verdict::Allow { .. }) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                        if checked.contended || checked.attempts > 1 {
                            retried.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!((admitted.into_inner(), retried.into_inner()), (1_000, 0));
    }
}
