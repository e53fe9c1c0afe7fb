//! The key/value map the daemon serves: the built-in [`StateMachine`].
//!
//! In memory it is a sorted map of shared byte strings. Its durable form is a set of pages,
//! each the sorted run of pairs from its id (a key; the first page's id is empty) up to the next
//! page's id, encoded with bincode and compressed with zstd. The map tracks which pages a
//! record touched since the last checkpoint; taking the changes clones only the shared
//! references of those pages' pairs, so the lock is held for microseconds per page while the
//! encoding happens on the checkpointer's thread. A page that grows past twice
//! [`PAGE_TARGET_BYTES`] is split into pages of about the target when it is next written; one
//! that shrinks under a quarter of it is folded into the page before it.
//!
//! Memory: per key, the key and value bytes, two shared allocations (16 bytes of counts each,
//! rounded up by the allocator) and ~50 bytes of map node: about 330 MB for 1M keys of 20-byte
//! keys and 200-byte values. A checkpoint in progress keeps the values it took alive until it
//! is written, so a value overwritten meanwhile is held twice for that long.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;

use super::{pair_hash, Changes, Digest, PageWrite, StateError, StateMachine};
use crate::record::{Op, Record, Seq};

/// The size a page is cut to: large enough that sled writes it at its large-value rate, small
/// enough that a few keys written dirty only a small part of the state.
pub const PAGE_TARGET_BYTES: usize = 64 * 1024;
/// zstd level for pages: the fastest, as for batches.
const PAGE_ZSTD_LEVEL: i32 = 1;
/// The largest page a load decompresses: far above any page written (a page holds at most
/// twice the target plus one pair, and a pair is bounded by [`crate::limits::Limits`]).
const MAX_PAGE_BYTES: usize = 256 * 1024 * 1024;

type Bytes = Arc<[u8]>;

/// The key/value map, with its page index and digest.
#[derive(Default)]
pub struct KvState {
    map: BTreeMap<Bytes, Bytes>,
    /// Each page's id (its lowest possible key) and the bytes of its pairs, as [`pair_bytes`]
    /// counts them. Always holds the first page, whose id is empty.
    pages: BTreeMap<Bytes, usize>,
    /// Pages a record touched since the last [`take_changes`](StateMachine::take_changes).
    dirty: BTreeSet<Bytes>,
    digest: Digest,
}

impl KvState {
    pub fn new() -> KvState {
        let mut state = KvState::default();
        state.pages.insert(Arc::from(&[][..]), 0);
        state
    }

    /// The value of `key`, if it has one.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.map.get(key).map(|value| &value[..])
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.map.iter().map(|(k, v)| (&k[..], &v[..]))
    }

    /// How many pages the state is cut into.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let page = self.page_of(&key);
        let (key, value): (Bytes, Bytes) = (key.into(), value.into());
        let added = pair_bytes(&key, &value);
        self.digest.value = self.digest.value.wrapping_add(pair_hash(&key, &value));
        match self.map.insert(key.clone(), value) {
            Some(old) => {
                self.digest.value = self.digest.value.wrapping_sub(pair_hash(&key, &old));
                self.resize(&page, added, pair_bytes(&key, &old));
            }
            None => {
                self.digest.keys += 1;
                self.resize(&page, added, 0);
            }
        }
    }

    fn delete(&mut self, key: &[u8]) {
        let Some((key, old)) = self.map.remove_entry(key) else {
            return;
        };
        let page = self.page_of(&key);
        self.digest.keys -= 1;
        self.digest.value = self.digest.value.wrapping_sub(pair_hash(&key, &old));
        self.resize(&page, 0, pair_bytes(&key, &old));
    }

    /// The id of the page that holds (or would hold) `key`.
    fn page_of(&self, key: &[u8]) -> Bytes {
        let mut below = self
            .pages
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)));
        match below.next_back() {
            Some((id, _)) => id.clone(),
            // Unreachable: the first page's empty id sorts before every key.
            None => Arc::from(&[][..]),
        }
    }

    /// Marks `page` dirty and moves its byte count by `added - removed`.
    fn resize(&mut self, page: &Bytes, added: usize, removed: usize) {
        if let Some(bytes) = self.pages.get_mut(page) {
            *bytes = (*bytes + added).saturating_sub(removed);
        }
        if !self.dirty.contains(page) {
            self.dirty.insert(page.clone());
        }
    }

    /// The pairs of the page `id`: from `id` up to the next page's id.
    fn pairs_of(&self, id: &Bytes) -> Vec<(Bytes, Bytes)> {
        let next = self
            .pages
            .range::<[u8], _>((Bound::Excluded(&id[..]), Bound::Unbounded))
            .next()
            .map(|(next, _)| next.clone());
        let upper = next.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        self.map
            .range::<[u8], _>((Bound::Included(&id[..]), upper))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Folds every dirty page under a quarter of the target into the page before it, which
    /// becomes dirty in its place. Returns the ids folded away, to remove from the checkpoint.
    fn fold_small_pages(&mut self) -> Vec<Bytes> {
        let mut folded = Vec::new();
        let small: Vec<Bytes> = self
            .dirty
            .iter()
            .rev()
            .filter(|id| !id.is_empty())
            .filter(|id| {
                self.pages
                    .get(*id)
                    .is_some_and(|&b| b < PAGE_TARGET_BYTES / 4)
            })
            .cloned()
            .collect();
        for id in small {
            let Some(bytes) = self.pages.remove(&id) else {
                continue;
            };
            self.dirty.remove(&id);
            let before = self.page_of(&id);
            if let Some(before_bytes) = self.pages.get_mut(&before) {
                *before_bytes += bytes;
            }
            self.dirty.insert(before);
            folded.push(id);
        }
        folded
    }

    /// Cuts a page's pairs into runs of about the target size when they are over twice it;
    /// registers the new pages' ids (each run's first key) and their sizes.
    fn split(
        &mut self,
        id: Bytes,
        pairs: Vec<(Bytes, Bytes)>,
    ) -> Vec<(Bytes, Vec<(Bytes, Bytes)>)> {
        let total: usize = pairs.iter().map(|(k, v)| pair_bytes(k, v)).sum();
        if total <= 2 * PAGE_TARGET_BYTES {
            self.pages.insert(id.clone(), total);
            return vec![(id, pairs)];
        }
        let mut runs: Vec<(Bytes, Vec<(Bytes, Bytes)>)> = Vec::new();
        let mut run_bytes = 0;
        for (key, value) in pairs {
            let size = pair_bytes(&key, &value);
            match runs.last_mut() {
                Some((_, run)) if run_bytes + size <= PAGE_TARGET_BYTES || run.is_empty() => {
                    run_bytes += size;
                    run.push((key, value));
                }
                _ => {
                    let run_id = if runs.is_empty() {
                        id.clone()
                    } else {
                        key.clone()
                    };
                    runs.push((run_id, vec![(key, value)]));
                    run_bytes = size;
                }
            }
        }
        for (run_id, run) in &runs {
            let bytes = run.iter().map(|(k, v)| pair_bytes(k, v)).sum();
            self.pages.insert(run_id.clone(), bytes);
        }
        runs
    }
}

impl StateMachine for KvState {
    fn apply(&mut self, _first_seq: Seq, records: Vec<Record>) -> Result<(), StateError> {
        for record in records {
            match record.op {
                Op::Put => self.put(record.key, record.value),
                Op::Delete => self.delete(&record.key),
            }
        }
        Ok(())
    }

    fn digest(&self) -> Digest {
        self.digest
    }

    fn take_changes(&mut self, all: bool) -> Box<dyn Changes> {
        if all {
            self.dirty = self.pages.keys().cloned().collect();
        }
        let mut removed = self.fold_small_pages();
        let mut pages = Vec::new();
        for id in std::mem::take(&mut self.dirty) {
            let pairs = self.pairs_of(&id);
            pages.extend(self.split(id, pairs));
        }
        // An emptied page other than the first is removed rather than written empty.
        pages.retain(|(id, pairs)| {
            let keep = id.is_empty() || !pairs.is_empty();
            if !keep {
                self.pages.remove(id);
                removed.push(id.clone());
            }
            keep
        });
        Box::new(KvChanges { pages, removed })
    }

    fn load_page(&mut self, id: &[u8], bytes: &[u8]) -> Result<(), StateError> {
        let id: Bytes = Arc::from(id);
        let mut page_bytes = 0;
        let map = &mut self.map;
        let digest = &mut self.digest;
        decode_page(bytes, |key, value| {
            let not_after_last = map
                .last_key_value()
                .is_some_and(|(last, _)| &last[..] >= key);
            if key < &id[..] || not_after_last {
                return Err("its keys are not in order after the pages before it".into());
            }
            page_bytes += pair_bytes(key, value);
            digest.keys += 1;
            digest.value = digest.value.wrapping_add(pair_hash(key, value));
            map.insert(Arc::from(key), Arc::from(value));
            Ok(())
        })
        .map_err(|reason| StateError::BadPage {
            id: id.to_vec(),
            reason,
        })?;
        self.pages.insert(id, page_bytes);
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The pages one checkpoint writes: shared references to their pairs, encoded later.
struct KvChanges {
    pages: Vec<(Bytes, Vec<(Bytes, Bytes)>)>,
    removed: Vec<Bytes>,
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
            .map(|id| PageWrite {
                id: id.to_vec(),
                bytes: None,
            })
            .collect();
        let mut raw = Vec::new();
        for (id, pairs) in &self.pages {
            let bytes = encode_page(pairs, &mut raw, &mut compressor).map_err(|reason| {
                StateError::BadPage {
                    id: id.to_vec(),
                    reason,
                }
            })?;
            writes.push(PageWrite {
                id: id.to_vec(),
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
    pairs: &[(Bytes, Bytes)],
    raw: &mut Vec<u8>,
    compressor: &mut zstd::bulk::Compressor<'_>,
) -> Result<Vec<u8>, String> {
    raw.clear();
    let borrowed: Vec<(&[u8], &[u8])> = pairs.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    bincode::encode_into_std_write(&borrowed, raw, BINCODE).map_err(|e| e.to_string())?;
    let raw_len = u32::try_from(raw.len()).map_err(|_| "the page is over 4 GiB".to_owned())?;
    let mut page = raw_len.to_be_bytes().to_vec();
    page.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(raw).to_be_bytes());
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
    if xxhash_rust::xxh3::xxh3_64(&raw) != u64::from_be_bytes(*checksum) {
        return Err("its checksum does not match its content".into());
    }
    let (pairs, used): (Vec<(&[u8], &[u8])>, usize) =
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
    use crate::state::DigestBuilder;
    use proptest::prelude::*;

    /// Applies `changes` to `pages` as the checkpoint tree would hold them.
    fn write(pages: &mut BTreeMap<Vec<u8>, Vec<u8>>, changes: Box<dyn Changes>) {
        for write in changes.encode().unwrap() {
            match write.bytes {
                Some(bytes) => pages.insert(write.id, bytes),
                None => pages.remove(&write.id),
            };
        }
    }

    fn load(pages: &BTreeMap<Vec<u8>, Vec<u8>>) -> KvState {
        let mut state = KvState::new();
        for (id, bytes) in pages {
            state.load_page(id, bytes).unwrap();
        }
        state
    }

    fn pairs(state: &KvState) -> Vec<(Vec<u8>, Vec<u8>)> {
        state
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
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
        state.apply(Seq(1), records).unwrap();
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
        state
            .apply(
                Seq(1),
                vec![
                    put(1, 10),
                    put(2, 10),
                    put(1, 20),
                    Record::delete(put(2, 0).key),
                ],
            )
            .unwrap();
        let mut expected = DigestBuilder::default();
        expected.add(&put(1, 20).key, &put(1, 20).value);
        assert_eq!(state.digest(), expected.finish());
        assert_eq!(state.get(&put(1, 0).key), Some(&put(1, 20).value[..]));
    }

    #[test]
    fn a_page_grown_past_twice_the_target_is_split_into_pages_of_about_the_target() {
        let mut state = KvState::new();
        let records = (0..3000).map(|k| put(k, 100)).collect();
        state.apply(Seq(1), records).unwrap();
        let mut pages = BTreeMap::new();
        write(&mut pages, state.take_changes(false));
        assert!(pages.len() >= 4, "{} pages", pages.len());
        for bytes in state.pages.values() {
            assert!(*bytes <= PAGE_TARGET_BYTES + 200, "a page of {bytes} bytes");
        }
    }

    #[test]
    fn a_page_emptied_by_deletes_is_folded_into_the_page_before_it() {
        let mut state = KvState::new();
        state
            .apply(Seq(1), (0..3000).map(|k| put(k, 100)).collect())
            .unwrap();
        let mut pages = BTreeMap::new();
        write(&mut pages, state.take_changes(false));
        let before = pages.len();
        let deletes = (1500..3000)
            .map(|k| Record::delete(put(k, 0).key))
            .collect();
        state.apply(Seq(3001), deletes).unwrap();
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
        state.apply(Seq(1), vec![put(1, 10)]).unwrap();
        let mut pages = BTreeMap::new();
        write(&mut pages, state.take_changes(false));
        assert!(state.take_changes(false).encode().unwrap().is_empty());
    }

    #[test]
    fn a_damaged_page_is_refused_by_name() {
        let mut state = KvState::new();
        state.apply(Seq(1), vec![put(1, 10)]).unwrap();
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
            let mut state = KvState::new();
            let mut pages = BTreeMap::new();
            for (i, batch) in batches.into_iter().enumerate() {
                let records = batch
                    .into_iter()
                    .map(|(key, bytes, delete)| {
                        if delete { Record::delete(put(key, 0).key) } else { put(key, bytes) }
                    })
                    .collect();
                state.apply(Seq(i as u64 * 1000 + 1), records).unwrap();
                write(&mut pages, state.take_changes(false));
                let loaded = load(&pages);
                prop_assert_eq!(pairs(&loaded), pairs(&state));
                prop_assert_eq!(loaded.digest(), state.digest());
            }
        }
    }
}
