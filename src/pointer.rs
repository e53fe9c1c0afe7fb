//! The commit pointer stored at `/fencelog/<cluster>/latest`: the last committed seq, the epoch
//! that committed it, and the first seq of its batch (which names the batch key).
//!
//! Encoded as 40 fixed little-endian bytes: magic `FLPT`, format version (1), last seq, epoch,
//! batch first seq, and an xxh3-64 of the 32 bytes before it.

use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Error, Result};
use crate::record::{Epoch, Seq};

const MAGIC: [u8; 4] = *b"FLPT";
const FORMAT_VERSION: u32 = 1;
const ENCODED_LEN: usize = 40;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitPointer {
    pub last_seq: Seq,
    pub epoch: Epoch,
    pub batch_first_seq: Seq,
}

impl CommitPointer {
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(ENCODED_LEN);
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&self.last_seq.0.to_le_bytes());
        bytes.extend_from_slice(&self.epoch.0.to_le_bytes());
        bytes.extend_from_slice(&self.batch_first_seq.0.to_le_bytes());
        let sum = xxh3_64(&bytes);
        bytes.extend_from_slice(&sum.to_le_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<CommitPointer> {
        let corrupt = |reason: String| Err(Error::CorruptPointer(reason));
        let Some(bytes) = bytes
            .first_chunk::<ENCODED_LEN>()
            .filter(|_| bytes.len() == ENCODED_LEN)
        else {
            return corrupt(format!("{} bytes, expected {ENCODED_LEN}", bytes.len()));
        };
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        if bytes[0..4] != MAGIC {
            return corrupt(format!("bad magic {:02x?}", &bytes[0..4]));
        }
        let version = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return corrupt(format!(
                "format version {version} is not supported (this build reads {FORMAT_VERSION})"
            ));
        }
        if xxh3_64(&bytes[..32]) != u64_at(32) {
            return corrupt("checksum mismatch".into());
        }
        let pointer = CommitPointer {
            last_seq: Seq(u64_at(8)),
            epoch: Epoch(u64_at(16)),
            batch_first_seq: Seq(u64_at(24)),
        };
        if pointer.batch_first_seq == Seq::NONE || pointer.batch_first_seq > pointer.last_seq {
            return corrupt(format!(
                "batch first seq {} does not precede last seq {}",
                pointer.batch_first_seq, pointer.last_seq
            ));
        }
        Ok(pointer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pointer() -> CommitPointer {
        CommitPointer {
            last_seq: Seq(2048),
            epoch: Epoch(5),
            batch_first_seq: Seq(1025),
        }
    }

    #[test]
    fn round_trips() {
        assert_eq!(
            CommitPointer::decode(&pointer().encode()).unwrap(),
            pointer()
        );
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let bytes = pointer().encode();
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x40;
            assert!(
                CommitPointer::decode(&flipped).is_err(),
                "flip at {i} accepted"
            );
            assert!(
                CommitPointer::decode(&bytes[..i]).is_err(),
                "truncation at {i} accepted"
            );
        }
    }
}
