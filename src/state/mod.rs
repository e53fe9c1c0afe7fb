//! The state a node materializes from its log: in memory, applied at memory speed, behind the
//! [`StateMachine`] trait, with a checkpoint in the local store as its durable copy.
//!
//! sled takes one insert per key at ~90–200k random keys/s on an idle core (~20k beside a
//! load), an order of magnitude below the commit rate, so the serving state is not kept in sled.
//! It lives in memory and the log is its redo, as etcd applies into an in-memory index and a
//! database keeps a buffer pool: the applier applies each committed batch to the machine under
//! one write lock; a checkpointer thread, every [`checkpoint::Policy::interval`], takes the
//! pages the machine changed since the last checkpoint (cheap: shared references, under the
//! lock), encodes and compresses them off the lock, and writes them under a new generation,
//! switched to by one write of the checkpoint's meta (seq, digest, page table). A page is a
//! large run of pairs, so a checkpoint writes a few
//! large values instead of one entry per key, and a key written eight times between two
//! checkpoints is written once. On open, the store loads the last checkpoint and replays only
//! the local log after it.
//!
//! - [`kv`]: the key/value map the daemon serves, the built-in machine;
//! - [`checkpoint`]: the checkpoint's layout in sled and when one is due.

pub mod checkpoint;
pub mod kv;

use std::any::Any;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::record::{RecordRef, Seq};

pub use kv::KvState;

/// What a node applies its committed log to. fencelog calls it from one thread at a time, in
/// seq order, for every committed record exactly once per machine instance: after a restart, a
/// machine rebuilt from its last checkpoint gets the records after that checkpoint again.
///
/// Its durable form is a set of *pages*, each named by an id (ordered bytes) and holding
/// whatever the machine encodes into it. fencelog stores them, writes them in checkpoints,
/// streams them as snapshots and hands them back in id order to rebuild the machine; it never
/// looks inside. A page should be tens of kilobytes (sled takes large values at millions of
/// records/s and small ones at its per-key rate): [`KvState`] keeps ~64 KiB runs of pairs.
pub trait StateMachine: Send + Sync + 'static {
    /// Applies committed records, the first at `first_seq`, the others at the seqs after it.
    /// They borrow from the decoded batch: copy out what the state keeps. Must be
    /// deterministic: every node applies the same records and must reach the same state (the
    /// same [`digest`](Self::digest)). An error stops the node's applier: its state stays where
    /// it was and the node reports why.
    fn apply(&mut self, first_seq: Seq, records: &[RecordRef<'_>]) -> Result<(), StateError>;

    /// The digest of the whole state, compared across nodes and against a snapshot's header.
    /// Called often (on every checkpoint): keep it incremental.
    fn digest(&self) -> Digest;

    /// What changed since the last call, or everything when `all`, for a checkpoint. Called
    /// under the state's write lock, between two applies: must be cheap (take shared references
    /// or swap buffers); the heavy work belongs in [`Changes::encode`], which runs on the
    /// checkpointer's thread while applying goes on.
    fn take_changes(&mut self, all: bool) -> Box<dyn Changes>;

    /// Loads one page of a checkpoint into a machine that is being rebuilt: pages come in id
    /// order, into a machine fresh from its constructor.
    fn load_page(&mut self, id: &[u8], bytes: &[u8]) -> Result<(), StateError>;

    /// For reading the machine as its concrete type ([`crate::local_store::LocalStore::read_state`]).
    fn as_any(&self) -> &dyn Any;
}

/// The pages a checkpoint writes, taken from a machine and encoded off its lock.
pub trait Changes: Send {
    /// The page writes, in any order: each page id with its new bytes, or `None` to remove it.
    fn encode(self: Box<Self>) -> Result<Vec<PageWrite>, StateError>;
}

/// One page of a checkpoint written or removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageWrite {
    pub id: Vec<u8>,
    /// The page's new bytes; `None` removes it.
    pub bytes: Option<Vec<u8>>,
}

/// A state's digest: how many items it holds and a hash of all of them. For [`KvState`], the
/// wrapping sum of [`pair_hash`] over its pairs: order-independent, so it is kept as pairs
/// change instead of recomputed over the whole map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    pub keys: u64,
    pub value: u64,
}

/// The hash of one key/value pair in a [`Digest`]: xxh3-64 of the value, seeded with the
/// xxh3-64 of the key, so that moving bytes between key and value changes it.
pub fn pair_hash(key: &[u8], value: &[u8]) -> u64 {
    xxh3_64_with_seed(value, xxh3_64(key))
}

/// A digest fed pair by pair, in any order: the checker's and the snapshot installer's.
#[derive(Clone, Copy, Debug, Default)]
pub struct DigestBuilder {
    digest: Digest,
}

impl DigestBuilder {
    pub fn add(&mut self, key: &[u8], value: &[u8]) {
        self.digest.keys += 1;
        self.digest.value = self.digest.value.wrapping_add(pair_hash(key, value));
    }

    pub fn finish(&self) -> Digest {
        self.digest
    }
}

/// A state machine refused a record or a page.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A page does not decode: the checkpoint or the snapshot it came from is damaged.
    #[error("page {id:02x?} does not decode: {reason}")]
    BadPage { id: Vec<u8>, reason: String },
    /// A checkpoint's changes could not be encoded.
    #[error("cannot encode the state's checkpoint: {0}")]
    Encode(String),
    /// The machine cannot apply a committed record (a machine of the embedder's own).
    #[error("cannot apply seq {seq}: {reason}")]
    Apply { seq: Seq, reason: String },
}

/// Makes a fresh, empty machine: how a store rebuilds its state from a checkpoint.
pub type Factory = std::sync::Arc<dyn Fn() -> Box<dyn StateMachine> + Send + Sync>;

/// The factory of the built-in key/value map.
pub fn kv_factory() -> Factory {
    std::sync::Arc::new(|| Box::new(KvState::new()) as Box<dyn StateMachine>)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_does_not_depend_on_the_order_pairs_come_in() {
        let mut forward = DigestBuilder::default();
        let mut backward = DigestBuilder::default();
        let pairs = [(&b"a"[..], &b"1"[..]), (b"b", b"2"), (b"c", b"3")];
        pairs.iter().for_each(|(k, v)| forward.add(k, v));
        pairs.iter().rev().for_each(|(k, v)| backward.add(k, v));
        assert_eq!(forward.finish(), backward.finish());
        assert_eq!(forward.finish().keys, 3);
    }

    #[test]
    fn moving_a_byte_from_the_value_to_the_key_changes_the_pair_hash() {
        assert_ne!(pair_hash(b"ab", b"c"), pair_hash(b"a", b"bc"));
    }
}
