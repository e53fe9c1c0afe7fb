//! The key/value map the daemon serves: the built-in [`StateMachine`].
//!
//! The map is cut into pages by the xxh3 hash of the key: page *i* holds the keys whose hash
//! lies from its bound up to the next page's. A record costs one hash, a binary search over the
//! bounds (a few kilobytes, in cache) and one probe of the page's hash table, where a single
//! sorted map over all keys costs ~20 key comparisons, each a cache miss into the key's bytes
//! (measured: three quarters of the apply thread's time went to `memcmp` and B-tree inserts).
//! Its durable form is the same pages, each encoded with bincode and compressed with zstd, named
//! by its bound (8 bytes, big-endian). Pages are shared (`Arc`) and copied on write: taking a
//! checkpoint's changes clones the references of the dirty pages, microseconds under the lock,
//! and a page the applier writes while the checkpointer still encodes it is copied once (its
//! table of shared keys and values, not their bytes). A page that grows past twice
//! [`PAGE_TARGET_BYTES`] is split by hash range into pages of about the target by the put that
//! took it there; a dirty page under a quarter of it is folded into the page before it when
//! the next checkpoint is taken.
//!
//! Memory: per key, the key and value bytes in shared allocations of their own (16 bytes of
//! counts each), and ~40 bytes of hash table slot: about 330 MB for 1M keys of 14-byte keys and
//! 200-byte values. A checkpoint in
//! progress keeps the pages it took alive until it has encoded them, so a page written
//! meanwhile is held twice for that long: at most twice the state, while a checkpoint of a
//! state whose every page changed is being encoded.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, Xxh3DefaultBuilder};

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

/// Keys and values are shared, so that copying a page on write (while a checkpoint still holds
/// it) copies its table of references, not its bytes: measured under a load over a 1M-key
/// keyspace, boxed pairs made the copies a quarter of the applier's time.
type Table = HashMap<Arc<[u8]>, Arc<[u8]>, Xxh3DefaultBuilder>;

/// The pairs whose key hashes fall in one range.
#[derive(Clone, Default)]
struct Page {
    pairs: Table,
    /// The bytes of its pairs, as [`pair_bytes`] counts them.
    bytes: usize,
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
        let page = &self.pages[self.page_of(xxh3_64(key))];
        page.pairs.get(key).map(|value| &value[..])
    }

    pub fn len(&self) -> usize {
        self.digest.keys as usize
    }

    pub fn is_empty(&self) -> bool {
        self.digest.keys == 0
    }

    /// The pairs, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.pages
            .iter()
            .flat_map(|page| page.pairs.iter().map(|(k, v)| (&k[..], &v[..])))
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

    fn put(&mut self, key: &[u8], value: &[u8]) {
        let hash = xxh3_64(key);
        let index = self.page_of(hash);
        self.dirty[index] = true;
        let page = Arc::make_mut(&mut self.pages[index]);
        self.digest.value = self
            .digest
            .value
            .wrapping_add(xxh3_64_with_seed(value, hash));
        page.bytes += pair_bytes(key, value);
        // An overwrite allocates only the value: the key stays.
        let old = match page.pairs.get_mut(key) {
            Some(slot) => Some(std::mem::replace(slot, Arc::from(value))),
            None => page.pairs.insert(Arc::from(key), Arc::from(value)),
        };
        match old {
            Some(old) => {
                let old_hash = xxh3_64_with_seed(&old, hash);
                self.digest.value = self.digest.value.wrapping_sub(old_hash);
                page.bytes -= pair_bytes(key, &old);
            }
            None => self.digest.keys += 1,
        }
        if page.bytes > 2 * self.page_target {
            self.split_page(index);
        }
    }

    fn delete(&mut self, key: &[u8]) {
        let hash = xxh3_64(key);
        let index = self.page_of(hash);
        if !self.pages[index].pairs.contains_key(key) {
            return;
        }
        self.dirty[index] = true;
        let page = Arc::make_mut(&mut self.pages[index]);
        if let Some(old) = page.pairs.remove(key) {
            self.digest.keys -= 1;
            let old_hash = xxh3_64_with_seed(&old, hash);
            self.digest.value = self.digest.value.wrapping_sub(old_hash);
            page.bytes -= pair_bytes(key, &old);
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
            into.bytes += folded.bytes;
            let pairs =
                Arc::try_unwrap(folded).map_or_else(|shared| shared.pairs.clone(), |p| p.pairs);
            into.pairs.extend(pairs);
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
        // Room for each part to grow to twice its share before it splits again: a table that
        // grows by doubling moves every entry each time (measured under unique keys: a tenth of
        // the applier's time).
        let room = 2 * page.pairs.len().div_ceil(parts as usize);
        let mut split: Vec<Page> = (0..parts)
            .map(|_| Page {
                pairs: Table::with_capacity_and_hasher(room, Xxh3DefaultBuilder),
                bytes: 0,
            })
            .collect();
        for (key, value) in &page.pairs {
            let part = ((u128::from(xxh3_64(key)) - lower) / step).min(parts - 1) as usize;
            split[part].bytes += pair_bytes(key, value);
            split[part].pairs.insert(key.clone(), value.clone());
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
    fn apply(&mut self, _first_seq: Seq, records: &[RecordRef<'_>]) -> Result<(), StateError> {
        for record in records {
            match record.op {
                Op::Put => self.put(record.key, record.value),
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
        decode_page(bytes, |key, value| {
            let hash = xxh3_64(key);
            if hash < bound {
                return Err("it holds a key below its range".into());
            }
            highest = highest.max(hash);
            page.bytes += pair_bytes(key, value);
            self.digest.keys += 1;
            self.digest.value = self
                .digest
                .value
                .wrapping_add(xxh3_64_with_seed(value, hash));
            match page.pairs.insert(key.into(), value.into()) {
                Some(_) => Err("it holds a key twice".into()),
                None => Ok(()),
            }
        })
        .map_err(bad)?;
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
        let mut compressor =
            zstd::bulk::Compressor::new(PAGE_ZSTD_LEVEL).map_err(|e| StateError::BadPage {
                id: Vec::new(),
                reason: format!("cannot start zstd: {e}"),
            })?;
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
            let bytes = encode_page(&page.pairs, &mut raw, &mut compressor).map_err(|reason| {
                StateError::BadPage {
                    id: id.clone(),
                    reason,
                }
            })?;
            writes.push(PageWrite {
                id,
                bytes: Some(bytes),
            });
        }
        Ok(writes)
    }
}

/// A pair's share of its page: its bytes plus room for the two length prefixes.
fn pair_bytes(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + 8
}

const BINCODE: bincode::config::Configuration = bincode::config::standard();

/// A page: the uncompressed length (u32, big-endian), the xxh3-64 of the uncompressed bytes
/// (u64, big-endian), then zstd of the bincode of its pairs.
fn encode_page(
    pairs: &Table,
    raw: &mut Vec<u8>,
    compressor: &mut zstd::bulk::Compressor<'_>,
) -> Result<Vec<u8>, String> {
    raw.clear();
    let borrowed: Vec<(&[u8], &[u8])> = pairs.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    bincode::encode_into_std_write(&borrowed, raw, BINCODE).map_err(|e| e.to_string())?;
    let raw_len = u32::try_from(raw.len()).map_err(|_| "the page is over 4 GiB".to_owned())?;
    let mut page = raw_len.to_be_bytes().to_vec();
    page.extend_from_slice(&xxh3_64(raw).to_be_bytes());
    page.extend(compressor.compress(raw).map_err(|e| e.to_string())?);
    Ok(page)
}

/// Hands each pair of a page [`encode_page`] wrote to `each`, in order.
fn decode_page(
    bytes: &[u8],
    mut each: impl FnMut(&[u8], &[u8]) -> Result<(), String>,
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
    pairs
        .into_iter()
        .try_for_each(|(key, value)| each(key, value))
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
            for (i, batch) in batches.into_iter().enumerate() {
                let records = batch
                    .into_iter()
                    .map(|(key, bytes, delete)| {
                        if delete { Record::delete(put(key, 0).key) } else { put(key, bytes) }
                    })
                    .collect();
                apply(&mut state, Seq(i as u64 * 1000 + 1), records);
                write(&mut pages, state.take_changes(false));
                let loaded = load(&pages);
                prop_assert_eq!(pairs(&loaded), pairs(&state));
                prop_assert_eq!(loaded.digest(), state.digest());
                prop_assert_eq!(loaded.page_count(), state.page_count());
            }
        }
    }
}
