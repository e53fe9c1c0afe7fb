//! The state's checkpoint in the local store, and when to write the next one.
//!
//! The sled tree `checkpoint` holds the state as of one seq:
//!
//! | key           | value                                                               |
//! |---------------|---------------------------------------------------------------------|
//! | `meta`        | layout version, seq, epoch, digest keys, digest value: 5 × u64, big-endian |
//! | `p` + page id | the page, as the state machine encoded it                           |
//!
//! A checkpoint's page writes and its `meta` go in one sled batch, so a crash leaves the
//! previous checkpoint or the new one, never a mix (sled recovers a prefix of its writes, and a
//! batch is one write). The seq always ends a batch of the log (or is the log's base), so that
//! replay starts at a batch, and the local log keeps every batch after it
//! ([`crate::local_store::LocalStore::trim_log`]).

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

impl CheckpointMeta {
    fn encode(&self) -> [u8; 40] {
        let mut bytes = [0u8; 40];
        let fields = [
            LAYOUT,
            self.seq.0,
            self.epoch.0,
            self.digest.keys,
            self.digest.value,
        ];
        for (slot, field) in bytes.chunks_exact_mut(8).zip(fields) {
            slot.copy_from_slice(&field.to_be_bytes());
        }
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<CheckpointMeta, String> {
        if bytes.len() != 40 {
            return Err(format!("its meta is {} bytes, expected 40", bytes.len()));
        }
        let field = |i: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_be_bytes(word)
        };
        if field(0) != LAYOUT {
            return Err(format!(
                "its layout is {}, this build reads {LAYOUT}",
                field(0)
            ));
        }
        Ok(CheckpointMeta {
            seq: Seq(field(1)),
            epoch: Epoch(field(2)),
            digest: Digest {
                keys: field(3),
                value: field(4),
            },
        })
    }
}

/// The checkpoint's meta, if a checkpoint was ever written; `Err(reason)` inside when it does
/// not parse.
pub(crate) fn read_meta(tree: &Tree) -> sled::Result<Option<Result<CheckpointMeta, String>>> {
    Ok(tree
        .get(META_KEY)?
        .map(|bytes| CheckpointMeta::decode(&bytes)))
}

/// Writes `pages` and `meta` as one atomic step.
pub(crate) fn write(tree: &Tree, meta: &CheckpointMeta, pages: &[PageWrite]) -> sled::Result<()> {
    let mut batch = sled::Batch::default();
    for page in pages {
        let key = page_key(&page.id);
        match &page.bytes {
            Some(bytes) => batch.insert(key, bytes.as_slice()),
            None => batch.remove(key),
        }
    }
    batch.insert(META_KEY, &meta.encode()[..]);
    tree.apply_batch(batch)
}

/// Writes pages outside any checkpoint: a snapshot being installed into a staged store, whose
/// meta comes last ([`write`] with no pages).
pub(crate) fn insert_pages(tree: &Tree, pages: &[(Vec<u8>, Vec<u8>)]) -> sled::Result<()> {
    for (id, bytes) in pages {
        tree.insert(page_key(id), bytes.as_slice())?;
    }
    Ok(())
}

/// The pages, in id order: `(id, bytes)`.
pub(crate) fn pages(tree: &Tree) -> impl Iterator<Item = sled::Result<(Vec<u8>, sled::IVec)>> {
    tree.scan_prefix(PAGE_PREFIX)
        .map(|entry| entry.map(|(key, bytes)| (key[PAGE_PREFIX.len()..].to_vec(), bytes)))
}

fn page_key(id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(PAGE_PREFIX.len() + id.len());
    key.extend_from_slice(PAGE_PREFIX);
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
    fn meta_round_trips_and_another_layout_is_refused() {
        let meta = CheckpointMeta {
            seq: Seq(7),
            epoch: Epoch(3),
            digest: Digest {
                keys: 2,
                value: u64::MAX,
            },
        };
        assert_eq!(CheckpointMeta::decode(&meta.encode()), Ok(meta));
        let mut other = meta.encode();
        other[7] = 9;
        assert!(CheckpointMeta::decode(&other).is_err());
        assert!(CheckpointMeta::decode(&other[..39]).is_err());
    }
}
