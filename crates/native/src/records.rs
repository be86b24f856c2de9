//! The published key records, in flat tables: no allocation per key.
//!
//! - **Shards.** Most records sit in 64 [`Table`]s, by a digest's leading six bits. A table
//!   keeps its records' bytes in one arena, with each digest and where its record ends: about
//!   36 bytes a key over the record itself.
//! - **The delta.** A page's writes are merged into one smaller table, sorted like the shards,
//!   which a lookup asks first. A page costs what the delta holds, not what the shards do.
//! - **Folding.** Once the delta holds a quarter of the records (or, when a version is
//!   complete, a sixty-fourth), it is folded into the shards one shard at a time. Every view
//!   published in between holds the same records, so the fetcher publishes each step, and the
//!   old shard is freed as soon as its replacement is in: the memory a fold needs beyond the
//!   records is one shard's, not a second copy of them all.

use keyward_core::Digest;
use std::sync::Arc;

/// The delta is folded at no fewer writes than this, however few records there are.
const MIN_DELTA: usize = 4_096;
const SHARD_BITS: u32 = 6;
pub const SHARDS: usize = 1 << SHARD_BITS;

/// The records of one published view: cheap to clone (a reference count per table).
#[derive(Debug, Clone)]
pub struct Records {
    shards: Vec<Arc<Table>>,
    delta: Arc<Table>,
}

impl Default for Records {
    fn default() -> Records {
        Records { shards: (0..SHARDS).map(|_| Arc::default()).collect(), delta: Arc::default() }
    }
}

fn shard_of(digest: &[u8; 32]) -> usize {
    usize::from(digest[0] >> (8 - SHARD_BITS))
}

impl Records {
    /// `digest`'s entry (`KeyRecord::encode_entry`), if written.
    pub fn get(&self, digest: &Digest) -> Option<&str> {
        if let Some(entry) = self.delta.get(&digest.0) {
            return Some(entry);
        }
        self.shards.get(shard_of(&digest.0))?.get(&digest.0)
    }

    /// One page's writes, in order (a later write of a digest wins). Errs, changing nothing,
    /// if the records would outgrow a table's 4 GiB arena.
    pub fn write_page(&mut self, mut writes: Vec<([u8; 32], &str)>) -> Result<(), String> {
        if writes.is_empty() {
            return Ok(());
        }
        // Stable: a digest's writes stay in page order, and the last of each run is kept.
        writes.sort_by_key(|(d, _)| *d);
        let mut page = writes.iter().peekable();
        let mut last = Vec::with_capacity(writes.len());
        while let Some(w) = page.next() {
            if page.peek().is_none_or(|next| next.0 != w.0) {
                last.push((&w.0, w.1));
            }
        }
        let size = (self.delta.len() + last.len(), self.delta.arena.len() + last.iter().map(|(_, e)| e.len()).sum::<usize>());
        self.delta = Arc::new(Table::merged(self.delta.iter(), last.into_iter(), 0, size)?);
        Ok(())
    }

    /// Whether the delta is due to be folded into the shards: past a quarter of the records,
    /// or (once a version is complete, `settled`) past a sixty-fourth.
    pub fn fold_due(&self, settled: bool) -> bool {
        let records: usize = self.shards.iter().map(|s| s.len()).sum();
        self.delta.len() >= MIN_DELTA.max(records / if settled { 64 } else { 8 })
    }

    /// Folds the delta's writes to `shard` into it. The records are the same before and after;
    /// the delta stays until [`Records::clear_delta`].
    pub fn fold_shard(&mut self, shard: usize) -> Result<(), String> {
        let Some(old) = self.shards.get(shard) else { return Ok(()) };
        let from = self.delta.digests.partition_point(|d| shard_of(d) < shard);
        let to = self.delta.digests.partition_point(|d| shard_of(d) <= shard);
        if from == to {
            return Ok(());
        }
        let news = (from..to).filter_map(|i| Some((self.delta.digests.get(i)?, self.delta.entry(i)?)));
        let size = (old.len() + (to - from), old.arena.len() + news.clone().map(|(_, e)| e.len()).sum::<usize>());
        let folded = Table::merged(old.iter(), news, SHARD_BITS, size)?;
        if let Some(slot) = self.shards.get_mut(shard) {
            *slot = Arc::new(folded);
        }
        Ok(())
    }

    /// After every shard has been folded.
    pub fn clear_delta(&mut self) {
        self.delta = Arc::default();
    }

    /// (records in the shards, writes in the delta).
    #[cfg(test)]
    pub fn sizes(&self) -> (usize, usize) {
        (self.shards.iter().map(|s| s.len()).sum(), self.delta.len())
    }
}

/// Records sorted by digest: the digests, where each record ends in the arena, and an index
/// from a digest's leading bits to the range of digests that start with them.
#[derive(Debug, Default)]
struct Table {
    digests: Vec<[u8; 32]>,
    ends: Vec<u32>,
    arena: String,
    /// `index[p]..index[p + 1]`: the digests whose `bits` bits after the first `skip` are `p`.
    index: Vec<u32>,
    bits: u32,
    /// Leading bits every digest here shares (a shard's six), skipped by the index.
    skip: u32,
}

impl Table {
    fn len(&self) -> usize {
        self.digests.len()
    }

    fn get(&self, digest: &[u8; 32]) -> Option<&str> {
        let p = self.slot(digest);
        let (from, to) = (*self.index.get(p)? as usize, *self.index.get(p + 1)? as usize);
        let i = from + self.digests.get(from..to)?.binary_search(digest).ok()?;
        self.entry(i)
    }

    fn entry(&self, i: usize) -> Option<&str> {
        let start = if i == 0 { 0 } else { *self.ends.get(i - 1)? as usize };
        self.arena.get(start..*self.ends.get(i)? as usize)
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8; 32], &str)> {
        (0..self.len()).filter_map(|i| Some((self.digests.get(i)?, self.entry(i)?)))
    }

    /// The index slot of `digest`: its `bits` bits after the first `skip`.
    fn slot(&self, digest: &[u8; 32]) -> usize {
        let lead = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) << self.skip;
        if self.bits == 0 {
            0
        } else {
            (lead >> (32 - self.bits)) as usize
        }
    }

    /// `old`'s records with `new`'s over them; both sorted by digest, each digest once, and
    /// sharing their first `skip` bits. `size` is at least (records, bytes) of the two: the
    /// table is allocated once, so a merge leaves no outgrown buffers behind.
    fn merged<'a>(
        old: impl Iterator<Item = (&'a [u8; 32], &'a str)>,
        new: impl Iterator<Item = (&'a [u8; 32], &'a str)>,
        skip: u32,
        size: (usize, usize),
    ) -> Result<Table, String> {
        let mut out = Table { digests: Vec::with_capacity(size.0), ends: Vec::with_capacity(size.0), arena: String::with_capacity(size.1), skip, ..Table::default() };
        let mut old = old.peekable();
        for (digest, entry) in new {
            while let Some((d, e)) = old.next_if(|(d, _)| *d < digest) {
                out.push(d, e)?;
            }
            old.next_if(|(d, _)| *d == digest);
            out.push(digest, entry)?;
        }
        for (d, e) in old {
            out.push(d, e)?;
        }
        out.build_index();
        Ok(out)
    }

    fn push(&mut self, digest: &[u8; 32], entry: &str) -> Result<(), String> {
        self.arena.push_str(entry);
        let end = u32::try_from(self.arena.len()).map_err(|_| format!("{} key records outgrow a 4 GiB table of the native shell", self.digests.len()))?;
        self.digests.push(*digest);
        self.ends.push(end);
        Ok(())
    }

    /// About eight digests per index slot, up to 2^16 slots.
    fn build_index(&mut self) {
        self.bits = (usize::BITS - (self.len() / 8).leading_zeros()).min(16);
        let slots = 1usize << self.bits;
        let mut index = vec![0u32; slots + 1];
        for d in &self.digests {
            if let Some(n) = index.get_mut(self.slot(d) + 1) {
                *n += 1;
            }
        }
        for p in 0..slots {
            index[p + 1] += index[p];
        }
        self.index = index;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(i: u32) -> [u8; 32] {
        Digest::of(&i.to_le_bytes()).0
    }

    fn get(r: &Records, i: u32) -> Option<&str> {
        r.get(&Digest(digest(i)))
    }

    /// What the fetcher does after a page: fold when due, one shard at a time.
    fn fold(r: &mut Records, settled: bool, views: &mut Vec<Records>) {
        if r.fold_due(settled) {
            for s in 0..SHARDS {
                r.fold_shard(s).unwrap();
                views.push(r.clone());
            }
            r.clear_delta();
        }
    }

    #[test]
    fn a_lookup_sees_the_latest_write_across_folds() {
        let mut r = Records::default();
        assert_eq!(get(&r, 1), None);
        let records: Vec<String> = (0..20_000u32).map(|i| format!("record {i}")).collect();
        let mut views = Vec::new();
        for page in (0..20_000u32).collect::<Vec<_>>().chunks(1_000) {
            r.write_page(page.iter().map(|&i| (digest(i), records[i as usize].as_str())).collect()).unwrap();
            fold(&mut r, false, &mut views);
        }
        let (shards, delta) = r.sizes();
        assert!(shards >= 16_000 && delta < MIN_DELTA, "folded as it grew: {shards} + {delta}");
        // Overwrites, and a digest written twice in one page: the later write wins.
        let changed: Vec<String> = (0..20_000u32).map(|i| format!("changed {i}")).collect();
        let mut page: Vec<([u8; 32], &str)> = vec![(digest(3), "first of two")];
        page.extend((0..20_000u32).step_by(3).map(|i| (digest(i), changed[i as usize].as_str())));
        r.write_page(page).unwrap();
        views.clear();
        fold(&mut r, true, &mut views);
        assert_eq!(views.len(), SHARDS, "every step of the fold is a view");
        assert_eq!(r.sizes(), (20_000, 0), "an overwrite replaces, never duplicates");
        for view in views.iter().step_by(9).chain([&r]) {
            for i in 0..20_000u32 {
                let want = if i % 3 == 0 { &changed[i as usize] } else { &records[i as usize] };
                assert_eq!(get(view, i), Some(want.as_str()), "key {i}");
            }
            assert_eq!(get(view, 20_000), None);
        }
    }

    #[test]
    fn an_older_view_keeps_its_records_after_a_fold() {
        let mut r = Records::default();
        r.write_page(vec![(digest(1), "one")]).unwrap();
        let old = r.clone();
        let later: Vec<([u8; 32], &str)> = (2..(MIN_DELTA as u32 + 2)).map(|i| (digest(i), "later")).chain([(digest(1), "uno")]).collect();
        r.write_page(later).unwrap();
        fold(&mut r, false, &mut Vec::new());
        assert_eq!(r.sizes().1, 0, "folded");
        assert_eq!((get(&old, 1), get(&old, 2)), (Some("one"), None));
        assert_eq!((get(&r, 1), get(&r, 2)), (Some("uno"), Some("later")));
    }

    #[test]
    fn the_index_covers_every_size() {
        for n in [0u32, 1, 2, 7, 8, 9, 100, 5_000, 70_000] {
            let mut page: Vec<([u8; 32], String)> = (0..n).map(|i| (digest(i), i.to_string())).collect();
            page.sort();
            let t = Table::merged(std::iter::empty(), page.iter().map(|(d, e)| (d, e.as_str())), 0, (0, 0)).unwrap();
            for i in 0..n {
                assert_eq!(t.get(&digest(i)), Some(i.to_string().as_str()), "{n} records, key {i}");
            }
            assert_eq!(t.get(&digest(n)), None);
        }
    }
}
