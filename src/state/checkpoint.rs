//! The state's checkpoint in the local store, and when to write the next one.
//!
//! The sled tree `checkpoint` holds the state as of one seq:
//!
//! | key                        | value                                                        |
//! |----------------------------|--------------------------------------------------------------|
//! | `meta`                     | layout, seq, epoch, digest keys, digest value (5 × u64, big-endian), then the page table: its generation (u64), and per page its id (u32 length, bytes) and the generation it was written in (u64) |
//! | `p` + generation + page id | one version of a page, as the state machine encoded it       |
//!
//! A checkpoint never overwrites a page the current `meta` points at: it writes its pages under
//! a new generation, then `meta` with the new page table (one key: the switch), and only then
//! removes the versions it superseded. A crash (or a failed write: seen under a full disk, where
//! sled kept part of a batch) leaves the previous checkpoint whole and some unreferenced page
//! versions, which `remove_strays` drops. This rests only on single-key writes being atomic and
//! sled recovering a prefix of its writes. The seq always ends a batch of the log (or is the
//! log's base), so that replay starts at a batch, and the local log keeps every batch after it
//! ([`crate::local_store::LocalStore::apply_retention`]).

use std::collections::BTreeMap;
use std::time::Duration;

use sled::Tree;

use super::{Digest, PageWrite};
use crate::record::{Epoch, Seq};

/// The checkpoint layout this build writes.
const LAYOUT: u64 = 1;
const META_KEY: &[u8] = b"meta";
const PAGE_PREFIX: &[u8] = b"p";

/// What a checkpoint is of: the state as of `seq` (which the batch of epoch `epoch` ends), with
/// its digest, checked when the checkpoint is loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointMeta {
    pub seq: Seq,
    pub epoch: Epoch,
    pub digest: Digest,
}

/// Which version of each page a checkpoint is made of.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PageTable {
    /// The generation of the last checkpoint written; the next writes its pages in the next.
    generation: u64,
    /// Each page's id and the generation its bytes were written in.
    pages: BTreeMap<Vec<u8>, u64>,
}

/// The ids of the pages `table` names, in order.
pub(crate) fn ids(table: &PageTable) -> impl Iterator<Item = &[u8]> {
    table.pages.keys().map(Vec::as_slice)
}

impl CheckpointMeta {
    fn encode(&self, table: &PageTable) -> Vec<u8> {
        let fields = [
            LAYOUT,
            self.seq.0,
            self.epoch.0,
            self.digest.keys,
            self.digest.value,
            table.generation,
        ];
        let mut bytes: Vec<u8> = fields.iter().flat_map(|f| f.to_be_bytes()).collect();
        for (id, generation) in &table.pages {
            bytes.extend_from_slice(&(id.len() as u32).to_be_bytes());
            bytes.extend_from_slice(id);
            bytes.extend_from_slice(&generation.to_be_bytes());
        }
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<(CheckpointMeta, PageTable), String> {
        let mut rest = Cursor(bytes);
        let layout = rest.word()?;
        if layout != LAYOUT {
            return Err(format!("its layout is {layout}, this build reads {LAYOUT}"));
        }
        let meta = CheckpointMeta {
            seq: Seq(rest.word()?),
            epoch: Epoch(rest.word()?),
            digest: Digest {
                keys: rest.word()?,
                value: rest.word()?,
            },
        };
        let mut table = PageTable {
            generation: rest.word()?,
            pages: BTreeMap::new(),
        };
        while !rest.0.is_empty() {
            let len = u32::from_be_bytes(rest.take(4)?.try_into().unwrap_or_default());
            let id = rest.take(len as usize)?.to_vec();
            table.pages.insert(id, rest.word()?);
        }
        Ok((meta, table))
    }
}

/// Reads a meta value front to back.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], String> {
        if self.0.len() < len {
            return Err("its meta ends early".into());
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(taken)
    }

    fn word(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
}

/// The checkpoint's meta and page table, if a checkpoint was ever written; `Err(reason)` inside
/// when it does not parse.
pub(crate) fn read_meta(
    tree: &Tree,
) -> sled::Result<Option<Result<(CheckpointMeta, PageTable), String>>> {
    Ok(tree
        .get(META_KEY)?
        .map(|bytes| CheckpointMeta::decode(&bytes)))
}

/// How many bytes of pages [`write`] inserts between two flushes.
const FLUSH_EVERY_BYTES: usize = 4 << 20;

/// Writes a checkpoint: `pages` under the next generation, then `meta` with the page table
/// updated (the switch), then removes the page versions it superseded. `table` becomes the new
/// one once the meta is written. Calls `flush` after every [`FLUSH_EVERY_BYTES`] of pages: a
/// log append flushes too and waits for a flush in progress, so it never waits behind the
/// flush of a whole state (tens of megabytes under a uniform load).
pub(crate) fn write(
    tree: &Tree,
    meta: &CheckpointMeta,
    pages: &[PageWrite],
    table: &mut PageTable,
    mut flush: impl FnMut() -> sled::Result<()>,
) -> sled::Result<()> {
    let generation = table.generation + 1;
    let mut next = table.clone();
    next.generation = generation;
    let mut unflushed = 0;
    for page in pages {
        match &page.bytes {
            Some(bytes) => {
                tree.insert(page_key(generation, &page.id), bytes.as_slice())?;
                next.pages.insert(page.id.clone(), generation);
                unflushed += bytes.len();
                if unflushed >= FLUSH_EVERY_BYTES {
                    flush()?;
                    unflushed = 0;
                }
            }
            None => {
                next.pages.remove(&page.id);
            }
        }
    }
    tree.insert(META_KEY, meta.encode(&next))?;
    for page in pages {
        if let Some(&old) = table.pages.get(&page.id) {
            if old != generation {
                tree.remove(page_key(old, &page.id))?;
            }
        }
    }
    *table = next;
    Ok(())
}

/// Writes a snapshot's pages into a staged store, under the generation its [`write`] (with no
/// pages, once all are in) will switch to.
pub(crate) fn stage_pages(
    tree: &Tree,
    pages: &[(Vec<u8>, Vec<u8>)],
    table: &mut PageTable,
) -> sled::Result<()> {
    let generation = table.generation + 1;
    for (id, bytes) in pages {
        tree.insert(page_key(generation, id), bytes.as_slice())?;
        table.pages.insert(id.clone(), generation);
    }
    Ok(())
}

/// A page's id and bytes.
pub(crate) type Page = (Vec<u8>, sled::IVec);

/// The pages of the checkpoint `table` describes, in id order: `(id, bytes)`; `Err(id)` inside
/// for a page the table names and the tree lacks.
pub(crate) fn pages<'a>(
    tree: &'a Tree,
    table: &'a PageTable,
) -> impl Iterator<Item = sled::Result<Result<Page, Vec<u8>>>> + 'a {
    table.pages.iter().map(move |(id, &generation)| {
        Ok(tree
            .get(page_key(generation, id))?
            .map(|bytes| (id.clone(), bytes))
            .ok_or_else(|| id.clone()))
    })
}

/// Removes the page versions `table` does not name (a checkpoint cut short); returns how many.
pub(crate) fn remove_strays(tree: &Tree, table: &PageTable) -> sled::Result<usize> {
    let named: std::collections::HashSet<Vec<u8>> = table
        .pages
        .iter()
        .map(|(id, &generation)| page_key(generation, id))
        .collect();
    let mut removed = 0;
    for key in tree.scan_prefix(PAGE_PREFIX).keys() {
        let key = key?;
        if !named.contains(&key[..]) {
            tree.remove(key)?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn page_key(generation: u64, id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(PAGE_PREFIX.len() + 8 + id.len());
    key.extend_from_slice(PAGE_PREFIX);
    key.extend_from_slice(&generation.to_be_bytes());
    key.extend_from_slice(id);
    key
}

/// When the checkpointer writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The time from the end of one checkpoint to the start of the next, while the state
    /// changes. Longer leaves more log to replay after a crash; shorter costs more CPU under a
    /// load that dirties every page (each checkpoint then rewrites the whole state).
    pub interval: Duration,
    /// A checkpoint starts before the interval is up once this many records were applied since
    /// the last one: bounds the replay after a crash under a heavy load.
    pub max_records: u64,
    /// Whatever the above say, the next checkpoint waits this many times as long as the last
    /// one took: a state large enough to take a second to write is written at most a fifth of
    /// the time, leaving the CPU to the commit path and the applier.
    pub pacing: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            interval: Duration::from_secs(2),
            max_records: 2_000_000,
            pacing: 4,
        }
    }
}

/// Whether a checkpoint is due: the state moved `records` past the last one, which ended
/// `elapsed` ago and took `took`.
pub fn due(policy: &Policy, records: u64, elapsed: Duration, took: Duration) -> bool {
    let rested = elapsed >= took.saturating_mul(policy.pacing);
    records > 0 && rested && (elapsed >= policy.interval || records >= policy.max_records)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        interval: Duration::from_secs(2),
        max_records: 1000,
        pacing: 4,
    };
    const QUICK: Duration = Duration::from_millis(10);

    #[test]
    fn an_unchanged_state_is_never_checkpointed() {
        assert!(!due(&POLICY, 0, Duration::from_secs(3600), QUICK));
    }

    #[test]
    fn a_changed_state_is_checkpointed_once_the_interval_passed() {
        assert!(!due(&POLICY, 1, Duration::from_millis(1999), QUICK));
        assert!(due(&POLICY, 1, Duration::from_secs(2), QUICK));
    }

    #[test]
    fn many_records_bring_the_checkpoint_forward() {
        assert!(!due(&POLICY, 999, Duration::from_millis(40), QUICK));
        assert!(due(&POLICY, 1000, Duration::from_millis(40), QUICK));
    }

    #[test]
    fn a_checkpoint_that_took_long_pushes_the_next_one_back() {
        let took = Duration::from_secs(1);
        assert!(!due(&POLICY, 1000, Duration::from_millis(3999), took));
        assert!(due(&POLICY, 1000, Duration::from_secs(4), took));
        assert!(!due(&POLICY, 1, Duration::from_millis(3999), took));
    }

    #[test]
    fn meta_and_page_table_round_trip_and_another_layout_is_refused() {
        let meta = CheckpointMeta {
            seq: Seq(7),
            epoch: Epoch(3),
            digest: Digest {
                keys: 2,
                value: u64::MAX,
            },
        };
        let table = PageTable {
            generation: 4,
            pages: [(vec![], 1), (vec![9, 9], 4)].into_iter().collect(),
        };
        let bytes = meta.encode(&table);
        assert_eq!(CheckpointMeta::decode(&bytes), Ok((meta, table)));
        assert!(CheckpointMeta::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut other = bytes.clone();
        other[7] = 9;
        assert!(CheckpointMeta::decode(&other).is_err());
    }

    fn tree() -> (tempfile::TempDir, Tree) {
        let dir = tempfile::tempdir().unwrap();
        let tree = sled::open(dir.path())
            .unwrap()
            .open_tree("checkpoint")
            .unwrap();
        (dir, tree)
    }

    /// [`write`] with no flushes between pages: a temporary tree has nothing to flush to.
    fn write_all(tree: &Tree, meta: &CheckpointMeta, pages: &[PageWrite], table: &mut PageTable) {
        write(tree, meta, pages, table, || Ok(())).unwrap();
    }

    fn page(id: u8, bytes: &[u8]) -> PageWrite {
        PageWrite {
            id: vec![id],
            bytes: Some(bytes.to_vec()),
        }
    }

    fn contents(tree: &Tree, table: &PageTable) -> Vec<(Vec<u8>, Vec<u8>)> {
        pages(tree, table)
            .map(|page| {
                let (id, bytes) = page.unwrap().unwrap();
                (id, bytes.to_vec())
            })
            .collect()
    }

    #[test]
    fn a_checkpoint_cut_before_its_meta_leaves_the_previous_one_whole() {
        let (_dir, tree) = tree();
        let mut table = PageTable::default();
        let meta = CheckpointMeta::default();
        write_all(&tree, &meta, &[page(1, b"a1"), page(2, b"b1")], &mut table);
        // The next checkpoint's page written, its meta never: as a crash or a full disk leaves it.
        let mut next = table.clone();
        next.generation += 1;
        stage_pages(&tree, &[(vec![1], b"a2".to_vec())], &mut next).unwrap();
        let (_, on_disk) = read_meta(&tree).unwrap().unwrap().unwrap();
        assert_eq!(on_disk, table);
        let whole = vec![(vec![1], b"a1".to_vec()), (vec![2], b"b1".to_vec())];
        assert_eq!(contents(&tree, &on_disk), whole);
        assert_eq!(remove_strays(&tree, &on_disk).unwrap(), 1);
        assert_eq!(contents(&tree, &on_disk), whole);
    }

    #[test]
    fn a_checkpoint_replaces_and_removes_pages_and_drops_what_it_superseded() {
        let (_dir, tree) = tree();
        let mut table = PageTable::default();
        let meta = CheckpointMeta::default();
        write_all(&tree, &meta, &[page(1, b"a1"), page(2, b"b1")], &mut table);
        let gone = PageWrite {
            id: vec![2],
            bytes: None,
        };
        write_all(&tree, &meta, &[page(1, b"a2"), gone], &mut table);
        assert_eq!(contents(&tree, &table), vec![(vec![1], b"a2".to_vec())]);
        assert_eq!(
            remove_strays(&tree, &table).unwrap(),
            0,
            "nothing was left behind"
        );
    }
}
