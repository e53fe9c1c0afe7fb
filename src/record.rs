//! Records, sequence numbers and epochs: the values every other module passes around.

use std::fmt;

use bincode::{BorrowDecode, Decode, Encode};

/// A record's position in the log. Dense, starting at 1; [`Seq::NONE`] means "nothing yet".
/// Sequence numbers never wrap: running out is an error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(pub u64);

/// There is no seq past this one: a log that reached `u64::MAX` cannot go on. Its own type, so
/// that the values every module passes around depend on nothing else of the crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("sequence numbers are exhausted: {0} is the last one")]
pub struct SeqExhausted(pub Seq);

impl Seq {
    pub const NONE: Seq = Seq(0);
    pub const FIRST: Seq = Seq(1);

    /// The seq `n` places after this one.
    pub fn checked_add(self, n: u64) -> Result<Seq, SeqExhausted> {
        self.0.checked_add(n).map(Seq).ok_or(SeqExhausted(self))
    }

    pub fn next(self) -> Result<Seq, SeqExhausted> {
        self.checked_add(1)
    }

    /// Big-endian bytes, so that byte order is numeric order (sled keys).
    pub fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A leadership term: the etcd `create_revision` of the leader key the primary created.
/// It is the fencing token every commit compares against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a record does to the state when applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
pub enum Op {
    Put,
    Delete,
}

/// One logged change. A `Delete` carries no value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Record {
    pub op: Op,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

impl Record {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Record {
        Record {
            op: Op::Put,
            key: key.into(),
            value: value.into(),
        }
    }

    pub fn delete(key: impl Into<Vec<u8>>) -> Record {
        Record {
            op: Op::Delete,
            key: key.into(),
            value: Vec::new(),
        }
    }

    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef {
            op: self.op,
            key: &self.key,
            value: &self.value,
        }
    }
}

/// A record borrowed from a decoded buffer. Decoding into borrowed slices allocates nothing, so a
/// forged length can only fail the decode, never reserve memory; a state machine copies out
/// only what it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, BorrowDecode)]
pub struct RecordRef<'a> {
    pub op: Op,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

impl RecordRef<'_> {
    pub fn to_record(self) -> Record {
        Record {
            op: self.op,
            key: self.key.to_vec(),
            value: self.value.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_never_wraps() {
        assert_eq!(Seq(u64::MAX).next(), Err(SeqExhausted(Seq(u64::MAX))));
        assert_eq!(Seq(u64::MAX - 1).next().ok(), Some(Seq(u64::MAX)));
    }

    #[test]
    fn seq_bytes_sort_numerically() {
        assert!(Seq(255).to_be_bytes() < Seq(256).to_be_bytes());
    }
}
