//! `Counters`: a state machine of an embedder's own. Each record names a counter in its key;
//! a put adds the value (a decimal number) to it, a delete resets it. Not a key/value map: its
//! state is not the last value written, so applying a record twice would be wrong — which is
//! why fencelog applies each committed record exactly once per machine, from a checkpoint at
//! one seq.
//!
//! Its pages: the counters cut into 16 buckets by the first hex digit of the xxh3 of their
//! name, each bucket one page: the bincode of its `(name, value)` pairs.

use std::any::Any;
use std::collections::BTreeMap;

use fencelog::record::{Op, RecordRef, Seq};
use fencelog::state::{pair_hash, Changes, Digest, PageWrite, StateError, StateMachine};

const BUCKETS: usize = 16;

#[derive(Default)]
pub struct Counters {
    buckets: [BTreeMap<Vec<u8>, u64>; BUCKETS],
    dirty: [bool; BUCKETS],
}

impl Counters {
    /// The value of counter `name` (0 if it was never counted or was reset).
    pub fn get(&self, name: &[u8]) -> u64 {
        self.buckets[bucket(name)].get(name).copied().unwrap_or(0)
    }

    /// The record that adds `by` to counter `name`.
    pub fn add(name: &str, by: u64) -> fencelog::record::Record {
        fencelog::record::Record::put(name, by.to_string())
    }
}

fn bucket(name: &[u8]) -> usize {
    (xxhash_rust::xxh3::xxh3_64(name) >> 60) as usize
}

impl StateMachine for Counters {
    fn apply(&mut self, first_seq: Seq, records: &[RecordRef<'_>]) -> Result<(), StateError> {
        for (offset, record) in records.iter().enumerate() {
            let b = bucket(record.key);
            self.dirty[b] = true;
            match record.op {
                Op::Delete => {
                    self.buckets[b].remove(record.key);
                }
                Op::Put => {
                    let by: u64 = std::str::from_utf8(record.value)
                        .ok()
                        .and_then(|text| text.parse().ok())
                        .ok_or_else(|| StateError::Apply {
                            seq: Seq(first_seq.0 + offset as u64),
                            reason: "the value is not a decimal number".into(),
                        })?;
                    let counter = self.buckets[b].entry(record.key.to_vec()).or_default();
                    *counter = counter.wrapping_add(by);
                }
            }
        }
        Ok(())
    }

    /// Recomputed on each call: the state is small. A large machine keeps it as it applies.
    fn digest(&self) -> Digest {
        let mut digest = Digest::default();
        for (name, value) in self.buckets.iter().flatten() {
            digest.keys += 1;
            digest.value = digest
                .value
                .wrapping_add(pair_hash(name, &value.to_be_bytes()));
        }
        digest
    }

    /// Copies the dirty buckets: cheap for a small state (a large one shares its pages).
    fn take_changes(&mut self, all: bool) -> Box<dyn Changes> {
        let pages = (0..BUCKETS)
            .filter(|&b| all || self.dirty[b])
            .map(|b| (b, self.buckets[b].clone()))
            .collect();
        self.dirty = [false; BUCKETS];
        Box::new(Buckets(pages))
    }

    fn load_page(&mut self, id: &[u8], bytes: &[u8]) -> Result<(), StateError> {
        let bad = |reason: &str| StateError::BadPage {
            id: id.to_vec(),
            reason: reason.into(),
        };
        let b = match id {
            [b] if usize::from(*b) < BUCKETS => usize::from(*b),
            _ => return Err(bad("not a bucket number")),
        };
        let (pairs, _): (Vec<(Vec<u8>, u64)>, usize) =
            bincode::decode_from_slice(bytes, bincode::config::standard())
                .map_err(|e| bad(&e.to_string()))?;
        self.buckets[b].extend(pairs);
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Copies of the buckets a checkpoint writes.
struct Buckets(Vec<(usize, BTreeMap<Vec<u8>, u64>)>);

impl Changes for Buckets {
    fn encode(self: Box<Self>) -> Result<Vec<PageWrite>, StateError> {
        self.0
            .into_iter()
            .map(|(b, counters)| {
                let pairs: Vec<(Vec<u8>, u64)> = counters.into_iter().collect();
                let bytes =
                    bincode::encode_to_vec(&pairs, bincode::config::standard()).map_err(|e| {
                        StateError::BadPage {
                            id: vec![b as u8],
                            reason: e.to_string(),
                        }
                    })?;
                Ok(PageWrite {
                    id: vec![b as u8],
                    bytes: Some(bytes),
                })
            })
            .collect()
    }
}
