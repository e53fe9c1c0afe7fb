//! The key/value map the daemon serves: the built-in [`StateMachine`].
//!
//! The map is cut into pages by the xxh3 hash of the key: page *i* holds the keys whose hash
//! lies from its bound up to the next page's. A record costs one hash, a binary search over the
//! bounds (a few kilobytes, in cache) and one probe of the page's table, where a single sorted
//! map over all keys costs ~20 key comparisons, each a cache miss into the key's bytes
//! (measured: three quarters of the apply thread's time went to `memcmp` and B-tree inserts).
//!
//! A page keeps its pairs' bytes in one buffer of its own, its *arena* (each key followed by its
//! value), and a hash table of small fixed-size slots (the key's hash, where the pair starts,
//! the two lengths): the key is hashed once per record, and the table grows and the page splits
//! by the stored hash, never hashing a key again. An overwrite by a value no longer than the
//! old one writes in place; otherwise the pair is appended and the old bytes become garbage,
//! compacted away once they outweigh the live ones. So copying a page costs two `memcpy`s.
//!
//! That is what checkpoints rely on. Pages are shared (`Arc`) and copied on write: taking a
//! checkpoint's changes clones the references of the dirty pages, microseconds under the lock,
//! and a page the applier writes while the checkpointer still encodes it is copied once. With
//! a pair per allocation, that copy cost two reference-count increments per pair (a cache miss
//! each) and made the applier 2.6 times slower while a checkpoint was in progress
//! (`cargo bench --bench state`, `apply/keyspace_1m_checkpointing`, docs/BENCHMARKS.md).
//!
//! Its durable form is the same pages, each encoded with bincode and compressed with zstd, named
//! by its bound (8 bytes, big-endian). A page that grows past twice [`PAGE_TARGET_BYTES`] is
//! split by hash range into pages of about the target by the put that took it there; a dirty
//! page under a quarter of it is folded into the page before it when the next checkpoint is
//! taken.
//!
//! Memory: per key, its key and value bytes in the arena (plus the garbage of overwrites, at
//! most as much again before a compaction), and a 24-byte slot in a table at most 7/8 full. A
//! checkpoint in progress keeps the pages it took alive until it has encoded them, so a page
//! written meanwhile is held twice for that long: at most twice the state, while a checkpoint
//! of a state whose every page changed is being encoded.

use std::any::Any;
use std::sync::Arc;

use hashbrown::HashTable;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::{Changes, Digest, PageWrite, StateError, StateMachine};
use crate::record::{Op, RecordRef, Seq};

/// The size a page is cut to: large enough that sled writes it at its large-value rate, small
/// enough that a few keys written dirty only a small part of the state.
pub const PAGE_TARGET_BYTES: usize = 64 * 1024;
/// zstd level for pages: the fastest, as for batches.
const PAGE_ZSTD_LEVEL: i32 = 1;
/// The largest page a load decompresses: far above any page written (a page holds at most
/// twice the target plus one pair, and a pair is bounded by [`crate::limits::Limits`]).
const MAX_PAGE_BYTES: usize = 256 * 1024 * 1024;
/// Garbage an arena may hold beyond as many bytes as its live pairs before it is compacted:
/// small pages are not compacted for every few overwrites.
const ARENA_SLACK_BYTES: usize = 4 * 1024;
/// A pair's share of its page beyond its bytes: room for the two length prefixes it is encoded
/// with.
const PAIR_OVERHEAD_BYTES: usize = 8;

/// Where one pair lives in its page's arena: the key's bytes at `at`, the value's right after.
#[derive(Clone, Copy)]
struct Slot {
    /// The xxh3-64 of the key: the table's hash and what places the key in a page.
    hash: u64,
    at: usize,
    key_len: u32,
    value_len: u32,
}

impl Slot {
    fn key<'a>(&self, arena: &'a [u8]) -> &'a [u8] {
        &arena[self.at..self.at + self.key_len as usize]
    }

    fn value<'a>(&self, arena: &'a [u8]) -> &'a [u8] {
        let start = self.at + self.key_len as usize;
        &arena[start..start + self.value_len as usize]
    }

    /// The bytes of its key and value.
    fn len(&self) -> usize {
        self.key_len as usize + self.value_len as usize
    }
}

/// The pairs whose key hashes fall in one range.
#[derive(Clone, Default)]
struct Page {
    slots: HashTable<Slot>,
    /// The pairs' bytes, and the garbage of overwritten and deleted ones.
    arena: Vec<u8>,
    /// The bytes of its pairs plus [`PAIR_OVERHEAD_BYTES`] each: what splits and folds go by.
    bytes: usize,
    /// The bytes of `arena` its pairs use.
    live: usize,
}

impl Page {
    fn with_capacity(pairs: usize, arena_bytes: usize) -> Page {
        Page {
            slots: HashTable::with_capacity(pairs),
            arena: Vec::with_capacity(arena_bytes),
            ..Page::default()
        }
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<&Slot> {
        let arena = &self.arena;
        self.slots
            .find(hash, |slot| slot.hash == hash && slot.key(arena) == key)
    }

    /// Appends a pair's bytes, returning the slot that points at them.
    fn push(&mut self, hash: u64, key: &[u8], value: &[u8], lens: (u32, u32)) -> Slot {
        reserve(&mut self.arena, key.len() + value.len());
        let at = self.arena.len();
        self.arena.extend_from_slice(key);
        self.arena.extend_from_slice(value);
        Slot {
            hash,
            at,
            key_len: lens.0,
            value_len: lens.1,
        }
    }

    /// Adds a pair whose key the page does not hold.
    fn insert_new(&mut self, hash: u64, key: &[u8], value: &[u8], lens: (u32, u32)) {
        let slot = self.push(hash, key, value, lens);
        self.live += slot.len();
        self.bytes += slot.len() + PAIR_OVERHEAD_BYTES;
        self.slots.insert_unique(hash, slot, |slot| slot.hash);
    }

    /// Copies in a pair of another page, whose key this page does not hold.
    fn copy_in(&mut self, slot: &Slot, arena: &[u8]) {
        let lens = (slot.key_len, slot.value_len);
        self.insert_new(slot.hash, slot.key(arena), slot.value(arena), lens);
    }

    /// Sets `key` to `value`; the pair hash of the value it replaced, if it had one.
    fn put(&mut self, hash: u64, key: &[u8], value: &[u8], lens: (u32, u32)) -> Option<u64> {
        let arena = &self.arena;
        let Some(slot) = self
            .slots
            .find_mut(hash, |slot| slot.hash == hash && slot.key(arena) == key)
        else {
            self.insert_new(hash, key, value, lens);
            return None;
        };
        let old = xxh3_64_with_seed(slot.value(&self.arena), hash);
        let old_len = slot.value_len as usize;
        if value.len() <= old_len {
            let start = slot.at + slot.key_len as usize;
            self.arena[start..start + value.len()].copy_from_slice(value);
            slot.value_len = lens.1;
        } else {
            reserve(&mut self.arena, key.len() + value.len());
            let at = self.arena.len();
            self.arena.extend_from_slice(key);
            self.arena.extend_from_slice(value);
            *slot = Slot {
                hash,
                at,
                key_len: lens.0,
                value_len: lens.1,
            };
        }
        self.live = self.live + value.len() - old_len;
        self.bytes = self.bytes + value.len() - old_len;
        self.compact_if_wasteful();
        Some(old)
    }

    /// Removes `key`; the pair hash of its value, if it had one.
    fn delete(&mut self, hash: u64, key: &[u8]) -> Option<u64> {
        let arena = &self.arena;
        let entry = self
            .slots
            .find_entry(hash, |slot| slot.hash == hash && slot.key(arena) == key)
            .ok()?;
        let (slot, _) = entry.remove();
        self.live -= slot.len();
        self.bytes -= slot.len() + PAIR_OVERHEAD_BYTES;
        let old = xxh3_64_with_seed(slot.value(&self.arena), hash);
        self.compact_if_wasteful();
        Some(old)
    }

    /// Moves the live pairs into a new arena once the garbage outweighs them: each compaction
    /// copies the live bytes once, after at least as many bytes of garbage were written.
    fn compact_if_wasteful(&mut self) {
        if self.arena.len() <= 2 * self.live + ARENA_SLACK_BYTES {
            return;
        }
        let mut arena = Vec::with_capacity(self.live + self.live / 4);
        for slot in self.slots.iter_mut() {
            let at = arena.len();
            arena.extend_from_slice(&self.arena[slot.at..slot.at + slot.len()]);
            slot.at = at;
        }
        self.arena = arena;
    }

    fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.slots
            .iter()
            .map(|slot| (slot.key(&self.arena), slot.value(&self.arena)))
    }
}

/// Makes room for `bytes` more in an arena, growing it by a quarter rather than doubling it:
/// the arenas are most of the state's memory, and copying one again is cheap.
fn reserve(arena: &mut Vec<u8>, bytes: usize) {
    if arena.capacity() - arena.len() < bytes {
        arena.reserve_exact(bytes.max(arena.len() / 4));
    }
}

/// The lengths of a pair as a slot holds them. A committed record always fits (a batch is at
/// most [`crate::limits::HARD_MAX_UNCOMPRESSED`]); an embedder's own caller might not.
fn slot_lens(key: &[u8], value: &[u8]) -> Result<(u32, u32), String> {
    match (u32::try_from(key.len()), u32::try_from(value.len())) {
        (Ok(key_len), Ok(value_len)) => Ok((key_len, value_len)),
        _ => Err(format!(
            "a pair of {} key and {} value bytes is over 4 GiB",
            key.len(),
            value.len()
        )),
    }
}

/// The key/value map, with its pages and digest.
pub struct KvState {
    /// The lowest key hash of each page, ascending; the first is 0.
    bounds: Vec<u64>,
    pages: Vec<Arc<Page>>,
    /// Pages a record touched since the last [`take_changes`](StateMachine::take_changes).
    dirty: Vec<bool>,
    /// Bounds of pages folded away since then, to remove from the checkpoint.
    removed: Vec<u64>,
    digest: Digest,
    page_target: usize,
    /// While loading: the highest key hash loaded so far, which the next page must start above.
    loaded_up_to: Option<u64>,
}

impl Default for KvState {
    fn default() -> Self {
        KvState::new()
    }
}

impl KvState {
    pub fn new() -> KvState {
        KvState::with_page_target(PAGE_TARGET_BYTES)
    }

    /// A map whose pages are cut to `bytes` instead of [`PAGE_TARGET_BYTES`] (tests exercise
    /// splits and folds with small pages).
    pub fn with_page_target(bytes: usize) -> KvState {
        KvState {
            bounds: vec![0],
            pages: vec![Arc::default()],
            dirty: vec![false],
            removed: Vec::new(),
            digest: Digest::default(),
            page_target: bytes.max(1),
            loaded_up_to: None,
        }
    }

    /// The value of `key`, if it has one.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let hash = xxh3_64(key);
        let page = &self.pages[self.page_of(hash)];
        page.find(hash, key).map(|slot| slot.value(&page.arena))
    }

    pub fn len(&self) -> usize {
        self.digest.keys as usize
    }

    pub fn is_empty(&self) -> bool {
        self.digest.keys == 0
    }

    /// The pairs, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.pages.iter().flat_map(|page| page.pairs())
    }

    /// How many pages the state is cut into.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// The index of the page that holds (or would hold) a key of hash `hash`.
    fn page_of(&self, hash: u64) -> usize {
        // The first bound is 0, so at least one bound is <= any hash.
        self.bounds.partition_point(|&bound| bound <= hash) - 1
    }

    fn put(&mut self, key: &[u8], value: &[u8], lens: (u32, u32)) {
        let hash = xxh3_64(key);
        let index = self.page_of(hash);
        self.dirty[index] = true;
        let page = Arc::make_mut(&mut self.pages[index]);
        let added = xxh3_64_with_seed(value, hash);
        match page.put(hash, key, value, lens) {
            Some(old) => self.digest.value = self.digest.value.wrapping_sub(old),
            None => self.digest.keys += 1,
        }
        self.digest.value = self.digest.value.wrapping_add(added);
        if page.bytes > 2 * self.page_target {
            self.split_page(index);
        }
    }

    fn delete(&mut self, key: &[u8]) {
        let hash = xxh3_64(key);
        let index = self.page_of(hash);
        if self.pages[index].find(hash, key).is_none() {
            return;
        }
        self.dirty[index] = true;
        if let Some(old) = Arc::make_mut(&mut self.pages[index]).delete(hash, key) {
            self.digest.keys -= 1;
            self.digest.value = self.digest.value.wrapping_sub(old);
        }
    }

    /// The hash just past page `index`'s range (2^64 for the last page).
    fn upper(&self, index: usize) -> u128 {
        self.bounds
            .get(index + 1)
            .map_or(1u128 << 64, |&next| u128::from(next))
    }

    /// Folds every dirty page under a quarter of the target into the page before it, which
    /// becomes dirty in its place.
    fn fold_small_pages(&mut self) {
        for index in (1..self.pages.len()).rev() {
            if !self.dirty[index] || self.pages[index].bytes >= self.page_target / 4 {
                continue;
            }
            let folded = self.pages.remove(index);
            self.dirty.remove(index);
            self.removed.push(self.bounds.remove(index));
            let into = Arc::make_mut(&mut self.pages[index - 1]);
            into.slots.reserve(folded.slots.len(), |slot| slot.hash);
            reserve(&mut into.arena, folded.live);
            for slot in folded.slots.iter() {
                into.copy_in(slot, &folded.arena);
            }
            self.dirty[index - 1] = true;
        }
    }

    /// Cuts every dirty page over twice the target (a fold can make one) into pages of about
    /// the target.
    fn split_large_pages(&mut self) {
        for index in (0..self.pages.len()).rev() {
            if self.dirty[index] && self.pages[index].bytes > 2 * self.page_target {
                self.split_page(index);
            }
        }
    }

    /// Cuts page `index` into pages of equal hash ranges, about the target each. Done as soon as
    /// a put takes a page past twice the target: one page at a time, never a wave of them under
    /// a checkpoint's lock. A range too narrow to cut (a hash shared by many keys) stays whole.
    fn split_page(&mut self, index: usize) {
        let page = &self.pages[index];
        let lower = u128::from(self.bounds[index]);
        let width = self.upper(index) - lower;
        let parts = (page.bytes.div_ceil(self.page_target) as u128).min(width);
        if parts < 2 {
            return;
        }
        let step = width / parts;
        // Room for each part's share and some growth: a part grows to twice its share before it
        // splits in turn.
        let share = page.slots.len().div_ceil(parts as usize);
        let arena_share = page.live.div_ceil(parts as usize);
        let mut split: Vec<Page> = (0..parts)
            .map(|_| Page::with_capacity(share + share / 2, arena_share + arena_share / 4))
            .collect();
        for slot in page.slots.iter() {
            let part = ((u128::from(slot.hash) - lower) / step).min(parts - 1) as usize;
            split[part].copy_in(slot, &page.arena);
        }
        let bounds = (0..parts).map(|part| (lower + part * step) as u64);
        self.bounds.splice(index..=index, bounds);
        self.pages
            .splice(index..=index, split.into_iter().map(Arc::new));
        self.dirty
            .splice(index..=index, std::iter::repeat(true).take(parts as usize));
    }
}

impl StateMachine for KvState {
    fn apply(&mut self, first_seq: Seq, records: &[RecordRef<'_>]) -> Result<(), StateError> {
        for (offset, record) in records.iter().enumerate() {
            match record.op {
                Op::Put => {
                    let lens = slot_lens(record.key, record.value).map_err(|reason| {
                        StateError::Apply {
                            seq: Seq(first_seq.0 + offset as u64),
                            reason,
                        }
                    })?;
                    self.put(record.key, record.value, lens);
                }
                Op::Delete => self.delete(record.key),
            }
        }
        Ok(())
    }

    fn digest(&self) -> Digest {
        self.digest
    }

    fn take_changes(&mut self, all: bool) -> Box<dyn Changes> {
        if all {
            self.dirty.iter_mut().for_each(|dirty| *dirty = true);
        }
        self.fold_small_pages();
        self.split_large_pages();
        let pages = self
            .dirty
            .iter_mut()
            .enumerate()
            .filter(|(_, dirty)| **dirty)
            .map(|(index, dirty)| {
                *dirty = false;
                (self.bounds[index], self.pages[index].clone())
            })
            .collect();
        let removed = std::mem::take(&mut self.removed);
        Box::new(KvChanges { pages, removed })
    }

    fn load_page(&mut self, id: &[u8], bytes: &[u8]) -> Result<(), StateError> {
        let bad = |reason: String| StateError::BadPage {
            id: id.to_vec(),
            reason,
        };
        let bound = <[u8; 8]>::try_from(id)
            .map(u64::from_be_bytes)
            .map_err(|_| bad(format!("its id is {} bytes, not 8", id.len())))?;
        let first = self.loaded_up_to.is_none();
        match self.loaded_up_to {
            None if bound != 0 => {
                return Err(bad("the first page does not start at hash 0".into()))
            }
            Some(up_to) if bound <= up_to => {
                return Err(bad("it overlaps the pages before it".into()))
            }
            _ => {}
        }
        let mut page = Page::default();
        let mut highest = bound;
        let mut digest = self.digest;
        decode_page(bytes, |pairs| {
            let arena_bytes = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
            page = Page::with_capacity(pairs.len(), arena_bytes);
            for (key, value) in pairs {
                let hash = xxh3_64(key);
                if hash < bound {
                    return Err("it holds a key below its range".into());
                }
                if page.find(hash, key).is_some() {
                    return Err("it holds a key twice".into());
                }
                highest = highest.max(hash);
                page.insert_new(hash, key, value, slot_lens(key, value)?);
                digest.keys += 1;
                digest.value = digest.value.wrapping_add(xxh3_64_with_seed(value, hash));
            }
            Ok(())
        })
        .map_err(bad)?;
        self.digest = digest;
        if first {
            self.pages[0] = Arc::new(page);
        } else {
            self.bounds.push(bound);
            self.pages.push(Arc::new(page));
            self.dirty.push(false);
        }
        self.loaded_up_to = Some(highest);
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The pages one checkpoint writes, shared with the map until encoded.
struct KvChanges {
    pages: Vec<(u64, Arc<Page>)>,
    removed: Vec<u64>,
}

impl Changes for KvChanges {
    fn encode(self: Box<Self>) -> Result<Vec<PageWrite>, StateError> {
        let mut compressor = zstd::bulk::Compressor::new(PAGE_ZSTD_LEVEL)
            .map_err(|e| StateError::Encode(format!("cannot start zstd: {e}")))?;
        let mut writes: Vec<PageWrite> = self
            .removed
            .iter()
            .map(|bound| PageWrite {
                id: bound.to_be_bytes().to_vec(),
                bytes: None,
            })
            .collect();
        let mut raw = Vec::new();
        // By value: each page the map has copied meanwhile is freed as soon as it is encoded.
        for (bound, page) in self.pages {
            let id = bound.to_be_bytes().to_vec();
            let bytes = encode_page(&page, &mut raw, &mut compressor)
                .map_err(|reason| StateError::Encode(format!("page {bound:016x}: {reason}")))?;
            writes.push(PageWrite {
                id,
                bytes: Some(bytes),
            });
        }
        Ok(writes)
    }
}

const BINCODE: bincode::config::Configuration = bincode::config::standard();

/// A page: the uncompressed length (u32, big-endian), the xxh3-64 of the uncompressed bytes
/// (u64, big-endian), then zstd of the bincode of its pairs.
fn encode_page(
    page: &Page,
    raw: &mut Vec<u8>,
    compressor: &mut zstd::bulk::Compressor<'_>,
) -> Result<Vec<u8>, String> {
    raw.clear();
    let borrowed: Vec<(&[u8], &[u8])> = page.pairs().collect();
    bincode::encode_into_std_write(&borrowed, raw, BINCODE).map_err(|e| e.to_string())?;
    let raw_len = u32::try_from(raw.len()).map_err(|_| "the page is over 4 GiB".to_owned())?;
    let mut page = raw_len.to_be_bytes().to_vec();
    page.extend_from_slice(&xxh3_64(raw).to_be_bytes());
    page.extend(compressor.compress(raw).map_err(|e| e.to_string())?);
    Ok(page)
}

/// Hands the pairs of a page [`encode_page`] wrote to `load`, in order.
fn decode_page(
    bytes: &[u8],
    load: impl FnOnce(&[(&[u8], &[u8])]) -> Result<(), String>,
) -> Result<(), String> {
    let (len, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or_else(|| "it is shorter than its length prefix".to_owned())?;
    let (checksum, compressed) = rest
        .split_first_chunk::<8>()
        .ok_or_else(|| "it is shorter than its checksum".to_owned())?;
    let raw_len = u32::from_be_bytes(*len) as usize;
    if raw_len > MAX_PAGE_BYTES {
        return Err(format!(
            "it says it holds {raw_len} bytes, over {MAX_PAGE_BYTES}"
        ));
    }
    let raw = zstd::bulk::decompress(compressed, raw_len).map_err(|e| e.to_string())?;
    if raw.len() != raw_len {
        return Err(format!(
            "it holds {} bytes, not the {raw_len} it says",
            raw.len()
        ));
    }
    if xxh3_64(&raw) != u64::from_be_bytes(*checksum) {
        return Err("its checksum does not match its content".into());
    }
    type Pairs<'a> = Vec<(&'a [u8], &'a [u8])>;
    let (pairs, used): (Pairs<'_>, usize) =
        bincode::borrow_decode_from_slice(&raw, BINCODE).map_err(|e| e.to_string())?;
    if used != raw.len() {
        return Err(format!("{} bytes follow its pairs", raw.len() - used));
    }
    load(&pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;
    use crate::state::DigestBuilder;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// Applies `changes` to `pages` as the checkpoint tree would hold them.
    fn write(pages: &mut BTreeMap<Vec<u8>, Vec<u8>>, changes: Box<dyn Changes>) {
        for write in changes.encode().unwrap() {
            match write.bytes {
                Some(bytes) => pages.insert(write.id, bytes),
                None => pages.remove(&write.id),
            };
        }
    }

    fn apply(state: &mut KvState, first: Seq, records: Vec<Record>) {
        let borrowed: Vec<RecordRef<'_>> = records.iter().map(Record::as_ref).collect();
        state.apply(first, &borrowed).unwrap();
    }

    fn load(pages: &BTreeMap<Vec<u8>, Vec<u8>>) -> KvState {
        let mut state = KvState::new();
        for (id, bytes) in pages {
            state.load_page(id, bytes).unwrap();
        }
        state
    }

    fn pairs(state: &KvState) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut pairs: Vec<_> = state
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        pairs.sort();
        pairs
    }

    fn put(key: u32, value_bytes: usize) -> Record {
        Record::put(
            format!("key{key:08}").into_bytes(),
            vec![key as u8; value_bytes],
        )
    }

    #[test]
    fn a_state_loaded_from_its_pages_is_the_same_state() {
        let mut state = KvState::new();
        let records = (0..5000).map(|k| put(k * 7 % 5000, 100)).collect();
        apply(&mut state, Seq(1), records);
        let mut pages = BTreeMap::new();
        write(&mut pages, state.take_changes(true));
        let loaded = load(&pages);
        assert_eq!(pairs(&loaded), pairs(&state));
        assert_eq!(loaded.digest(), state.digest());
        assert_eq!(loaded.page_count(), state.page_count());
    }

    #[test]
    fn the_digest_is_the_sum_over_the_pairs_it_holds() {
        let mut state = KvState::new();
        apply(
            &mut state,
            Seq(1),
            vec![
                put(1, 10),
                put(2, 10),
                put(1, 20),
                Record::delete(put(2, 0).key),
            ],
        );
        let mut expected = DigestBuilder::default();
        expected.add(&put(1, 20).key, &put(1, 20).value);
        assert_eq!(state.digest(), expected.finish());
        assert_eq!(state.get(&put(1, 0).key), Some(&put(1, 20).value[..]));
    }

    #[test]
    fn a_page_grown_past_twice_the_target_is_split_into_pages_of_about_the_target() {
        let mut state = KvState::new();
        let records = (0..3000).map(|k| put(k, 100)).collect();
        apply(&mut state, Seq(1), records);
        let mut pages = BTreeMap::new();
        write(&mut pages, state.take_changes(false));
        // 3000 pairs of 119 bytes: 357 KB, in pages of at most twice 64 KiB.
        assert!(pages.len() >= 3, "{} pages", pages.len());
        for page in &state.pages {
            assert!(
                page.bytes <= 2 * PAGE_TARGET_BYTES,
                "a page of {} bytes",
                page.bytes
            );
        }
        assert_eq!(pairs(&load(&pages)), pairs(&state));
    }

    #[test]
    fn pages_shrunk_by_deletes_are_folded_into_the_pages_before_them() {
        let mut state = KvState::new();
        apply(&mut state, Seq(1), (0..3000).map(|k| put(k, 100)).collect());
        let mut pages = BTreeMap::new();
        write(&mut pages, state.take_changes(false));
        let before = pages.len();
        // Nine keys in ten go: every page falls under a quarter of the target.
        let deletes = (0..3000)
            .filter(|k| k % 10 != 0)
            .map(|k| Record::delete(put(k, 0).key))
            .collect();
        apply(&mut state, Seq(3001), deletes);
        write(&mut pages, state.take_changes(false));
        assert!(
            pages.len() < before,
            "{} pages, {before} before",
            pages.len()
        );
        assert_eq!(pairs(&load(&pages)), pairs(&state));
    }

    #[test]
    fn overwrites_keep_a_page_arena_within_twice_its_live_bytes() {
        let mut state = KvState::new();
        let mut expected = BTreeMap::new();
        // Values growing and shrinking: some overwrites in place, some appended.
        for round in 0..40u32 {
            let records: Vec<Record> = (0..500)
                .map(|k| put(k, 50 + ((round * 37 + k) % 7) as usize * 40))
                .collect();
            for record in &records {
                expected.insert(record.key.clone(), record.value.clone());
            }
            apply(&mut state, Seq(1 + u64::from(round) * 500), records);
        }
        assert_eq!(pairs(&state), expected.into_iter().collect::<Vec<_>>());
        for page in &state.pages {
            assert!(
                page.arena.len() <= 2 * page.live + ARENA_SLACK_BYTES,
                "an arena of {} bytes for {} live",
                page.arena.len(),
                page.live
            );
        }
    }

    #[test]
    fn a_page_copied_for_a_checkpoint_keeps_the_pairs_it_had() {
        let mut state = KvState::new();
        apply(&mut state, Seq(1), (0..100).map(|k| put(k, 10)).collect());
        let taken = state.take_changes(false);
        apply(&mut state, Seq(101), (0..100).map(|k| put(k, 30)).collect());
        let mut pages = BTreeMap::new();
        write(&mut pages, taken);
        let at_first = load(&pages);
        assert_eq!(at_first.get(&put(5, 0).key), Some(&put(5, 10).value[..]));
        assert_eq!(state.get(&put(5, 0).key), Some(&put(5, 30).value[..]));
    }

    #[test]
    fn an_unchanged_state_has_no_changes_to_write() {
        let mut state = KvState::new();
        apply(&mut state, Seq(1), vec![put(1, 10)]);
        let mut pages = BTreeMap::new();
        write(&mut pages, state.take_changes(false));
        assert!(state.take_changes(false).encode().unwrap().is_empty());
    }

    #[test]
    fn a_damaged_page_is_refused_by_name() {
        let mut state = KvState::new();
        apply(&mut state, Seq(1), vec![put(1, 10)]);
        let mut pages = BTreeMap::new();
        write(&mut pages, state.take_changes(false));
        let (id, mut bytes) = pages.into_iter().next().unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        let refused = KvState::new().load_page(&id, &bytes);
        assert!(
            matches!(refused, Err(StateError::BadPage { .. })),
            "{refused:?}"
        );
    }

    proptest! {
        /// Checkpoints taken between random batches, each writing only what changed, always add
        /// up to the state they were taken of.
        #[test]
        fn incremental_checkpoints_always_add_up_to_the_state(
            batches in proptest::collection::vec(
                proptest::collection::vec((0u32..400, 0usize..600, any::<bool>()), 1..200),
                1..12,
            ),
        ) {
            // Small pages, so that the batches split and fold them.
            let mut state = KvState::with_page_target(2048);
            let mut pages = BTreeMap::new();
            let mut model = BTreeMap::new();
            for (i, batch) in batches.into_iter().enumerate() {
                let records: Vec<Record> = batch
                    .into_iter()
                    .map(|(key, bytes, delete)| {
                        if delete { Record::delete(put(key, 0).key) } else { put(key, bytes) }
                    })
                    .collect();
                for record in &records {
                    match record.op {
                        Op::Put => model.insert(record.key.clone(), record.value.clone()),
                        Op::Delete => model.remove(&record.key),
                    };
                }
                apply(&mut state, Seq(i as u64 * 1000 + 1), records);
                prop_assert_eq!(pairs(&state), model.clone().into_iter().collect::<Vec<_>>());
                write(&mut pages, state.take_changes(false));
                let loaded = load(&pages);
                prop_assert_eq!(pairs(&loaded), pairs(&state));
                prop_assert_eq!(loaded.digest(), state.digest());
                prop_assert_eq!(loaded.page_count(), state.page_count());
            }
        }
    }
}
