//! Usage counts, in one place: what a request adds, how a worker's counts merge into the
//! fetcher's, the queue line that carries them between VMs, and the batches a report sends.

use crate::digest::Digest;
use crate::feed::KeyUsage;
use crate::response::CODES;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use rustc_hash::FxBuildHasher;

/// One key's usage since the last report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyCounts {
    /// Allowed requests.
    pub count: u64,
    /// The last allowed request (Unix seconds); 0 if none.
    pub last: i64,
    /// Refused requests that presented this key, indexed like [`CODES`].
    pub denied: [u64; CODES.len()],
}

impl KeyCounts {
    pub fn add(&mut self, other: &KeyCounts) {
        self.count += other.count;
        self.last = self.last.max(other.last);
        for (a, b) in self.denied.iter_mut().zip(other.denied) {
            *a += b;
        }
    }

    /// The queue's line form: `id \t count \t last \t d0,d1,…\n` (one per key).
    pub fn line(id: &str, c: &KeyCounts) -> String {
        let denied: Vec<String> = c.denied.iter().map(u64::to_string).collect();
        format!("{id}\t{}\t{}\t{}\n", c.count, c.last, denied.join(","))
    }

    /// Parses [`KeyCounts::line`] (without the newline); the denied field may be absent (a
    /// producer from before refusals were counted).
    pub fn parse_line(line: &str) -> Option<(&str, KeyCounts)> {
        let mut f = line.split('\t');
        let id = f.next().filter(|id| !id.is_empty())?;
        let mut c = KeyCounts { count: f.next()?.parse().ok()?, last: f.next()?.parse().ok()?, ..KeyCounts::default() };
        if let Some(denied) = f.next() {
            for (slot, n) in c.denied.iter_mut().zip(denied.split(',')) {
                *slot = n.parse().ok()?;
            }
        }
        Some((id, c))
    }

    /// The report's form of one key.
    pub fn to_report(&self, key_id: &str) -> KeyUsage {
        let denied: BTreeMap<String, u64> = CODES.iter().zip(self.denied).filter(|(_, n)| *n > 0).map(|(code, n)| (code.to_string(), n)).collect();
        KeyUsage { key_id: key_id.to_string(), count: self.count, last_used: self.last, denied }
    }
}

/// Usage per key id. Hashed with Fx (`rustc_hash`), not SipHash (about 200 instructions an
/// id, for each key used, on every tick): the ids are the control plane's, never a client's, as
/// a request counts only a key the snapshot holds.
pub type UsageCounts = HashMap<String, KeyCounts, FxBuildHasher>;

pub fn merge(into: &mut UsageCounts, from: UsageCounts) {
    for (id, counts) in from {
        into.entry(id).or_default().add(&counts);
    }
}

/// Every key's line, for one queue message.
pub fn lines(counts: &UsageCounts) -> String {
    counts.iter().map(|(id, c)| KeyCounts::line(id, c)).collect()
}

/// Parses a queue message of [`lines`]; a line that cannot be read is skipped.
pub fn parse_lines(text: &str) -> UsageCounts {
    let mut out = UsageCounts::default();
    for (id, c) in text.lines().filter_map(KeyCounts::parse_line) {
        out.entry(id.to_string()).or_default().add(&c);
    }
    out
}

/// Takes at most `max` keys out of `pending` for one report; the rest wait for the next.
pub fn take_batch(pending: &mut UsageCounts, max: usize) -> UsageCounts {
    if pending.len() <= max {
        return std::mem::take(pending);
    }
    let ids: Vec<String> = pending.keys().take(max).cloned().collect();
    ids.into_iter().filter_map(|id| pending.remove_entry(&id)).collect()
}

/// One worker's counts by digest. A request adds one without allocating; the key id is copied
/// once per key until the next [`Usage::take`].
#[derive(Debug, Default)]
pub struct Usage {
    counts: RefCell<HashMap<Digest, (KeyCounts, String), FxBuildHasher>>,
}

impl Usage {
    /// One allowed request at `now_secs`.
    pub fn allowed(&self, digest: &Digest, key_id: &str, now_secs: i64) {
        self.with(digest, key_id, |c| {
            c.count += 1;
            c.last = c.last.max(now_secs);
        });
    }

    /// One refused request that presented this known key, by its index in [`CODES`].
    pub fn denied(&self, digest: &Digest, key_id: &str, code_index: usize) {
        self.with(digest, key_id, |c| {
            if let Some(n) = c.denied.get_mut(code_index) {
                *n += 1;
            }
        });
    }

    fn with(&self, digest: &Digest, key_id: &str, f: impl FnOnce(&mut KeyCounts)) {
        let mut counts = self.counts.borrow_mut();
        match counts.get_mut(digest) {
            Some((c, _)) => f(c),
            None => {
                let mut c = KeyCounts::default();
                f(&mut c);
                counts.insert(*digest, (c, key_id.to_string()));
            }
        }
    }

    /// Everything counted since the last call, by key id.
    pub fn take(&self) -> UsageCounts {
        let drained = std::mem::take(&mut *self.counts.borrow_mut());
        let mut out = UsageCounts::with_capacity_and_hasher(drained.len(), FxBuildHasher);
        for (_, (counts, id)) in drained {
            out.entry(id).or_default().add(&counts);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_with_denials_by_code() {
        let mut c = KeyCounts { count: 7, last: 1_800_000_000, ..KeyCounts::default() };
        c.denied[3] = 2;
        c.denied[8] = 40;
        let line = KeyCounts::line("key_1", &c);
        assert_eq!(line, "key_1\t7\t1800000000\t0,0,0,2,0,0,0,0,40,0\n");
        assert_eq!(KeyCounts::parse_line(line.trim_end()), Some(("key_1", c)));
        let table: &[(&str, Option<KeyCounts>)] = &[
            ("key_2\t1\t5", Some(KeyCounts { count: 1, last: 5, ..KeyCounts::default() })),
            ("key_2\tx\t5", None),
            ("\t1\t5", None),
            ("key_2\t1", None),
            ("key_2\t1\t5\t0,x", None),
        ];
        for (line, want) in table {
            assert_eq!(KeyCounts::parse_line(line).map(|(_, c)| c), *want, "{line:?}");
        }
        let report = c.to_report("key_1");
        assert_eq!(report.denied.into_iter().collect::<Vec<_>>(), [("RATE_LIMITED".to_string(), 40), ("REVOKED_API_KEY".to_string(), 2)]);
    }

    #[test]
    fn merge_adds_counts_and_keeps_the_latest_use() {
        let a = KeyCounts { count: 3, last: 10, denied: [1; CODES.len()] };
        let b = KeyCounts { count: 4, last: 7, denied: [2; CODES.len()] };
        let mut total: UsageCounts = [("k".to_string(), a)].into_iter().collect();
        merge(&mut total, [("k".to_string(), b), ("j".to_string(), b)].into_iter().collect());
        assert_eq!(total["k"], KeyCounts { count: 7, last: 10, denied: [3; CODES.len()] });
        assert_eq!(total["j"], b);
        assert_eq!(parse_lines(&lines(&total)), total, "a queue message carries every key");
    }

    #[test]
    fn a_batch_takes_at_most_its_size_and_leaves_the_rest() {
        let mut pending: UsageCounts = (0..5_000).map(|i| (format!("key_{i}"), KeyCounts { count: 1, ..KeyCounts::default() })).collect();
        let mut sent = 0;
        let mut batches = 0;
        while !pending.is_empty() {
            let batch = take_batch(&mut pending, 1_000);
            assert!(batch.len() <= 1_000);
            sent += batch.len();
            batches += 1;
        }
        assert_eq!((sent, batches), (5_000, 5));
    }

    #[test]
    fn a_worker_counts_by_digest_and_hands_over_by_key_id() {
        let u = Usage::default();
        let (d1, d2) = (Digest::of(b"one"), Digest::of(b"two"));
        u.allowed(&d1, "key_1", 100);
        u.allowed(&d1, "key_1", 90);
        u.denied(&d1, "key_1", 8);
        u.denied(&d2, "key_2", 3);
        u.denied(&d2, "key_2", 99);
        let taken = u.take();
        assert_eq!((taken["key_1"].count, taken["key_1"].last, taken["key_1"].denied[8]), (2, 100, 1));
        assert_eq!((taken["key_2"].count, taken["key_2"].denied[3]), (0, 1));
        assert!(u.take().is_empty());
    }
}
