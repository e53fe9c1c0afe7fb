//! Synthetic records for benches, tests and the load tool: deterministic, about as
//! compressible as real metadata (zstd level 1 shrinks a batch of them about 3x), over a
//! bounded keyspace so that puts overwrite and deletes hit existing keys.

use crate::record::Record;

const WORDS: [&str; 16] = [
    "alpha", "bravo", "cache", "delta", "shard", "fleet", "gamma", "hotel", "index", "juliet",
    "kilo", "lease", "metric", "node", "object", "pool",
];

/// An endless, reproducible stream of records.
#[derive(Clone, Debug)]
pub struct RecordGenerator {
    state: u64,
    keyspace: u64,
    record_bytes: usize,
    delete_every: u64,
    produced: u64,
}

impl RecordGenerator {
    /// Records of about `record_bytes` (key plus value) over `keyspace` keys; every tenth record
    /// is a delete.
    pub fn new(seed: u64, keyspace: u64, record_bytes: usize) -> RecordGenerator {
        RecordGenerator {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            keyspace: keyspace.max(1),
            record_bytes,
            delete_every: 10,
            produced: 0,
        }
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64: fast, and good enough to spread keys and vary values.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    pub fn next_record(&mut self) -> Record {
        self.produced += 1;
        let key = format!("obj/{:010}", self.next_u64() % self.keyspace);
        if self.produced % self.delete_every == 0 {
            return Record::delete(key);
        }
        let value = self.next_value(self.record_bytes.saturating_sub(key.len()));
        Record::put(key, value)
    }

    /// A value of exactly `len` bytes, shaped like a small JSON document (compressible).
    pub fn next_value(&mut self, len: usize) -> Vec<u8> {
        let r = self.next_u64();
        let token = (self.next_u64(), self.next_u64());
        let mut value = format!(
            "{{\"id\":{},\"tenant\":\"{}\",\"size\":{},\"token\":\"{:016x}{:016x}\",\"tags\":\"",
            self.produced,
            WORDS[(r % 16) as usize],
            (r >> 8) % 1_000_000,
            token.0,
            token.1,
        );
        let target = len.saturating_sub(2);
        let mut picks = 0u64;
        for i in 0.. {
            if value.len() >= target {
                break;
            }
            if i % 16 == 0 {
                picks = self.next_u64();
            }
            value.push_str(WORDS[(picks >> ((i % 16) * 4)) as usize % 16]);
            value.push(',');
        }
        value.truncate(target);
        value.push_str("\"}");
        let mut value = value.into_bytes();
        value.truncate(len);
        value
    }

    /// `len` bytes that do not compress.
    pub fn next_random_value(&mut self, len: usize) -> Vec<u8> {
        let mut value = Vec::with_capacity(len + 8);
        while value.len() < len {
            value.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        value.truncate(len);
        value
    }

    /// The next `count` records.
    pub fn take_records(&mut self, count: usize) -> Vec<Record> {
        (0..count).map(|_| self.next_record()).collect()
    }
}

impl Iterator for RecordGenerator {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        Some(self.next_record())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_have_the_requested_size_and_repeat_for_a_seed() {
        let records = RecordGenerator::new(7, 1000, 256).take_records(100);
        assert_eq!(
            records,
            RecordGenerator::new(7, 1000, 256).take_records(100)
        );
        let put = records.iter().find(|r| !r.value.is_empty()).unwrap();
        assert_eq!(put.key.len() + put.value.len(), 256);
        assert_eq!(records.iter().filter(|r| r.value.is_empty()).count(), 10);
    }

    #[test]
    fn values_have_exactly_the_requested_length() {
        let mut generator = RecordGenerator::new(3, 1, 0);
        for len in [0, 1, 2, 5, 64, 256, 4096] {
            assert_eq!(generator.next_value(len).len(), len);
            assert_eq!(generator.next_random_value(len).len(), len);
        }
    }
}
