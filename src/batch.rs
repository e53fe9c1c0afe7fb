//! The batch: a run of consecutive records written by one epoch, and its wire format.
//!
//! An encoded batch is a fixed 48-byte header followed by the zstd-compressed body. The body is
//! the records' bincode encodings back to back; the header carries their count, so nothing in
//! the body is a length the decoder must trust.
//!
//! | offset | bytes | field (little-endian)                                     |
//! |--------|-------|-----------------------------------------------------------|
//! | 0      | 4     | magic `FLGB`                                              |
//! | 4      | 4     | format version (2)                                        |
//! | 8      | 8     | epoch                                                     |
//! | 16     | 8     | first seq                                                 |
//! | 24     | 4     | record count                                              |
//! | 28     | 4     | uncompressed body length                                  |
//! | 32     | 8     | sealed at: microseconds since the Unix epoch              |
//! | 40     | 8     | checksum: xxh3-64 of bytes 0..40, the frame, the body     |
//! | 48     | ..    | zstd frame of the body                                    |
//!
//! The seal time is the primary's clock when it closed the batch, a moment before the commit:
//! followers measure their lag in seconds against it (across hosts, as good as their clocks).
//! Version 1 (no seal time) was never released and is refused like any unknown version.
//!
//! The checksum covers the header fields, the compressed frame and every byte of every record
//! as decompressed, so no flipped byte anywhere can move a batch to another seq or epoch, or
//! hide in a part of the frame that zstd would ignore. The decoder checks magic and
//! version first, then every size against [`Limits`] before it allocates or decompresses, and
//! decompresses into a buffer of exactly the announced size, so a decompression bomb fails
//! instead of growing.

use bincode::config::Configuration;
use xxhash_rust::xxh3::Xxh3;
use zstd::bulk::{Compressor, Decompressor};

use crate::error::{BatchError, Error, Result};
use crate::limits::{worst_case_encoded_len, Limits, BATCH_HEADER_LEN};
use crate::record::{Epoch, Op, Record, RecordRef, Seq};

/// Bytes of the fixed header (a size the limits are checked against, so kept with them).
pub const HEADER_LEN: usize = BATCH_HEADER_LEN;
pub const FORMAT_VERSION: u32 = 2;
const MAGIC: [u8; 4] = *b"FLGB";
const CHECKSUM_OFFSET: usize = 40;
/// The smallest encoded record: one byte each for the op, the key length and the value length.
const MIN_ENCODED_RECORD: usize = 3;
const BINCODE: Configuration = bincode::config::standard();

/// A run of consecutive records `first_seq ..= last_seq` written by one epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    epoch: Epoch,
    first_seq: Seq,
    sealed_at_micros: u64,
    records: Vec<Record>,
}

impl Batch {
    /// A batch sealed now. Refuses an empty batch, one starting at seq 0, and one whose seqs
    /// would run out.
    pub fn new(epoch: Epoch, first_seq: Seq, records: Vec<Record>) -> Result<Batch> {
        if records.is_empty() {
            return Err(Error::EmptyBatch);
        }
        if first_seq == Seq::NONE {
            return Err(Error::BatchAtSeqZero);
        }
        if u32::try_from(records.len()).is_err() {
            return Err(Error::BatchTooLarge {
                what: "record count",
                len: records.len(),
                limit: u32::MAX as usize,
            });
        }
        first_seq.checked_add(records.len() as u64 - 1)?;
        Ok(Batch {
            epoch,
            first_seq,
            sealed_at_micros: unix_micros_now(),
            records,
        })
    }

    /// When the primary sealed the batch, in microseconds since the Unix epoch.
    pub fn sealed_at_micros(&self) -> u64 {
        self.sealed_at_micros
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn first_seq(&self) -> Seq {
        self.first_seq
    }

    pub fn last_seq(&self) -> Seq {
        Seq(self.first_seq.0 + self.records.len() as u64 - 1)
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    pub fn into_records(self) -> Vec<Record> {
        self.records
    }

    /// Each record with its sequence number.
    pub fn iter(&self) -> impl Iterator<Item = (Seq, &Record)> {
        (self.first_seq.0..).map(Seq).zip(self.records.iter())
    }

    /// Cuts the batch into consecutive batches of `lens` records each, keeping its epoch and
    /// seal time: the same records under the same seqs. `lens` must add up to its record count,
    /// none of them 0.
    pub(crate) fn cut(self, lens: &[usize]) -> Result<Vec<Batch>> {
        if lens.iter().sum::<usize>() != self.records.len() || lens.contains(&0) {
            return Err(Error::Encode(format!(
                "a batch of {} records cannot be cut into runs of {lens:?}",
                self.records.len()
            )));
        }
        let mut records = self.records.into_iter();
        let mut first_seq = self.first_seq;
        let mut parts = Vec::with_capacity(lens.len());
        for &len in lens {
            parts.push(Batch {
                epoch: self.epoch,
                first_seq,
                sealed_at_micros: self.sealed_at_micros,
                records: records.by_ref().take(len).collect(),
            });
            first_seq = Seq(first_seq.0 + len as u64);
        }
        Ok(parts)
    }
}

/// The fixed header of an encoded batch, parsed and bounds-checked but not yet verified: only a
/// full decode proves the checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub epoch: Epoch,
    pub first_seq: Seq,
    pub record_count: u32,
    pub uncompressed_len: u32,
    pub sealed_at_micros: u64,
    pub checksum: u64,
}

impl BatchHeader {
    pub fn last_seq(&self) -> Seq {
        Seq(self.first_seq.0 + u64::from(self.record_count) - 1)
    }

    /// Parses the header of `bytes` and checks every size it announces against `limits`.
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<BatchHeader, BatchError> {
        let Some(header) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(BatchError::Truncated {
                len: bytes.len(),
                header_len: HEADER_LEN,
            });
        };
        let field = |at: usize, len: usize| &header[at..at + len];
        let u32_at = |at| u32::from_le_bytes(field(at, 4).try_into().expect("4-byte field"));
        let u64_at = |at| u64::from_le_bytes(field(at, 8).try_into().expect("8-byte field"));

        let magic: [u8; 4] = field(0, 4).try_into().expect("4-byte field");
        if magic != MAGIC {
            return Err(BatchError::BadMagic { found: magic });
        }
        let version = u32_at(4);
        if version != FORMAT_VERSION {
            return Err(BatchError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if bytes.len() > limits.max_batch_bytes {
            return Err(BatchError::EncodedTooLarge {
                len: bytes.len(),
                limit: limits.max_batch_bytes,
            });
        }
        let parsed = BatchHeader {
            epoch: Epoch(u64_at(8)),
            first_seq: Seq(u64_at(16)),
            record_count: u32_at(24),
            uncompressed_len: u32_at(28),
            sealed_at_micros: u64_at(32),
            checksum: u64_at(CHECKSUM_OFFSET),
        };
        let body_len = parsed.uncompressed_len as usize;
        let body_limit = limits
            .max_uncompressed_batch_bytes
            .min(crate::limits::HARD_MAX_UNCOMPRESSED);
        if body_len > body_limit {
            return Err(BatchError::UncompressedTooLarge {
                len: body_len,
                limit: body_limit,
            });
        }
        if parsed.record_count == 0 {
            return Err(BatchError::Empty);
        }
        if parsed.record_count as usize > body_len / MIN_ENCODED_RECORD {
            return Err(BatchError::TooManyRecords {
                count: parsed.record_count,
                body_len,
            });
        }
        if parsed.first_seq == Seq::NONE {
            return Err(BatchError::FirstSeqZero);
        }
        if parsed
            .first_seq
            .0
            .checked_add(u64::from(parsed.record_count) - 1)
            .is_none()
        {
            return Err(BatchError::SeqRangeOverflow {
                first_seq: parsed.first_seq.0,
                count: parsed.record_count,
            });
        }
        Ok(parsed)
    }

    fn write_fields(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&MAGIC);
        out[4..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[8..16].copy_from_slice(&self.epoch.0.to_le_bytes());
        out[16..24].copy_from_slice(&self.first_seq.0.to_le_bytes());
        out[24..28].copy_from_slice(&self.record_count.to_le_bytes());
        out[28..32].copy_from_slice(&self.uncompressed_len.to_le_bytes());
        out[32..40].copy_from_slice(&self.sealed_at_micros.to_le_bytes());
    }
}

/// The checksum of a batch: its header fields, its compressed frame, its uncompressed body.
fn checksum(encoded: &[u8], body: &[u8]) -> u64 {
    let mut hasher = Xxh3::new();
    hasher.update(&encoded[..CHECKSUM_OFFSET]);
    hasher.update(&encoded[HEADER_LEN..]);
    hasher.update(body);
    hasher.digest()
}

/// An encoded batch with its parsed header: what the log stores and etcd carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedBatch {
    header: BatchHeader,
    bytes: Vec<u8>,
}

impl EncodedBatch {
    /// Takes bytes read from a log or from etcd, checking the header; the body is verified when
    /// the batch is decoded.
    pub fn parse(bytes: Vec<u8>, limits: &Limits) -> Result<EncodedBatch, BatchError> {
        let header = BatchHeader::parse(&bytes, limits)?;
        Ok(EncodedBatch { header, bytes })
    }

    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    pub fn first_seq(&self) -> Seq {
        self.header.first_seq
    }

    pub fn last_seq(&self) -> Seq {
        self.header.last_seq()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// Encodes batches, reusing one zstd context and one body buffer across calls.
pub struct BatchEncoder {
    limits: Limits,
    compressor: Compressor<'static>,
    body: Vec<u8>,
}

impl BatchEncoder {
    /// An encoder that compresses at `zstd_level` (1 is fastest and, on log records, no larger
    /// than 3) and refuses to produce anything the decoder of the same `limits` would refuse.
    pub fn new(limits: Limits, zstd_level: i32) -> Result<BatchEncoder> {
        limits.validate()?;
        let compressor = Compressor::new(zstd_level)?;
        Ok(BatchEncoder {
            limits,
            compressor,
            body: Vec::new(),
        })
    }

    pub fn encode(&mut self, batch: &Batch) -> Result<EncodedBatch> {
        self.body.clear();
        for record in batch.records() {
            self.limits.check_record(record)?;
            bincode::encode_into_std_write(record.as_ref(), &mut self.body, BINCODE)
                .map_err(|e| Error::Encode(e.to_string()))?;
        }
        if self.body.len() > self.limits.max_uncompressed_batch_bytes {
            return Err(Error::BatchTooLarge {
                what: "uncompressed",
                len: self.body.len(),
                limit: self.limits.max_uncompressed_batch_bytes,
            });
        }
        let header = BatchHeader {
            epoch: batch.epoch(),
            first_seq: batch.first_seq(),
            record_count: batch.records().len() as u32,
            uncompressed_len: self.body.len() as u32,
            sealed_at_micros: batch.sealed_at_micros(),
            checksum: 0,
        };
        let mut bytes = vec![0; worst_case_encoded_len(self.body.len())];
        let compressed_len = self
            .compressor
            .compress_to_buffer(&self.body, &mut bytes[HEADER_LEN..])?;
        bytes.truncate(HEADER_LEN + compressed_len);
        if bytes.len() > self.limits.max_batch_bytes {
            return Err(Error::BatchTooLarge {
                what: "encoded",
                len: bytes.len(),
                limit: self.limits.max_batch_bytes,
            });
        }
        header.write_fields(&mut bytes);
        let header = BatchHeader {
            checksum: checksum(&bytes, &self.body),
            ..header
        };
        bytes[CHECKSUM_OFFSET..HEADER_LEN].copy_from_slice(&header.checksum.to_le_bytes());
        Ok(EncodedBatch { header, bytes })
    }
}

/// Decodes and verifies batches, reusing one zstd context and one body buffer across calls.
pub struct BatchDecoder {
    limits: Limits,
    decompressor: Decompressor<'static>,
    body: Vec<u8>,
}

impl BatchDecoder {
    pub fn new(limits: Limits) -> Result<BatchDecoder> {
        limits.validate()?;
        Ok(BatchDecoder {
            limits,
            decompressor: Decompressor::new()?,
            body: Vec::new(),
        })
    }

    /// Returns exactly the records that were encoded, or says why the bytes are not a batch.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Batch, BatchError> {
        let view = self.decode_view(bytes)?;
        Ok(Batch {
            epoch: view.header.epoch,
            first_seq: view.header.first_seq,
            sealed_at_micros: view.header.sealed_at_micros,
            records: view.records.iter().map(|r| r.to_record()).collect(),
        })
    }

    /// [`decode`](Self::decode), with the records borrowed from the decoder's buffer instead of
    /// copied out: what an apply that copies each key and value once wants.
    pub fn decode_view(&mut self, bytes: &[u8]) -> Result<BatchView<'_>, BatchError> {
        let header = BatchHeader::parse(bytes, &self.limits)?;
        let expected_len = header.uncompressed_len as usize;
        self.body.clear();
        self.body.resize(expected_len, 0);
        let actual_len = self
            .decompressor
            .decompress_to_buffer(&bytes[HEADER_LEN..], self.body.as_mut_slice())
            .map_err(|e| BatchError::Decompress {
                reason: e.to_string(),
            })?;
        if actual_len != expected_len {
            return Err(BatchError::UncompressedLenMismatch {
                expected: expected_len,
                actual: actual_len,
            });
        }
        let computed = checksum(bytes, &self.body);
        // Only a fuzzing build (cargo-fuzz's `--cfg fuzzing`) lets a wrong checksum through, so
        // that mutated input reaches the decoders behind it.
        if computed != header.checksum && !cfg!(fuzzing) {
            return Err(BatchError::ChecksumMismatch {
                stored: header.checksum,
                computed,
            });
        }
        let records = decode_records(&self.body, header.record_count, &self.limits)?;
        Ok(BatchView { header, records })
    }
}

/// A decoded batch whose records borrow from its decoder.
pub struct BatchView<'a> {
    pub header: BatchHeader,
    pub records: Vec<RecordRef<'a>>,
}

/// Microseconds since the Unix epoch; 0 on a clock set before it.
pub fn unix_micros_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn decode_records<'a>(
    body: &'a [u8],
    count: u32,
    limits: &Limits,
) -> Result<Vec<RecordRef<'a>>, BatchError> {
    // Grows with what actually decodes rather than trusting the count for an allocation.
    let mut records = Vec::with_capacity((count as usize).min(4096));
    let mut rest = body;
    for index in 0..count {
        let (record, used): (RecordRef<'_>, usize) =
            bincode::borrow_decode_from_slice(rest, BINCODE).map_err(|e| {
                BatchError::RecordDecode {
                    index,
                    reason: e.to_string(),
                }
            })?;
        rest = &rest[used..];
        let over = |part, len, limit| BatchError::RecordOverLimit {
            index,
            part,
            len,
            limit,
        };
        if record.key.len() > limits.max_key_bytes {
            return Err(over("key", record.key.len(), limits.max_key_bytes));
        }
        if record.value.len() > limits.max_value_bytes {
            return Err(over("value", record.value.len(), limits.max_value_bytes));
        }
        if record.op == Op::Delete && !record.value.is_empty() {
            return Err(BatchError::DeleteWithValue { index });
        }
        records.push(record);
    }
    if !rest.is_empty() {
        return Err(BatchError::TrailingBytes { count: rest.len() });
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Batch {
        let records = (0..n)
            .map(|i| Record::put(format!("k{i}"), vec![i as u8; 100]))
            .collect();
        Batch::new(Epoch(7), Seq(10), records).unwrap()
    }

    fn codec() -> (BatchEncoder, BatchDecoder) {
        (
            BatchEncoder::new(Limits::default(), 1).unwrap(),
            BatchDecoder::new(Limits::default()).unwrap(),
        )
    }

    /// Re-seals a hand-edited header so that only the edit, not the checksum, can fail.
    fn reseal(bytes: &mut [u8], body: &[u8]) {
        let sum = checksum(bytes, body);
        bytes[CHECKSUM_OFFSET..HEADER_LEN].copy_from_slice(&sum.to_le_bytes());
    }

    #[test]
    fn a_cut_batch_keeps_its_records_seqs_epoch_and_seal_time() {
        let batch = sample(5);
        let parts = batch.clone().cut(&[2, 3]).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (parts[0].first_seq(), parts[0].last_seq()),
            (Seq(10), Seq(11))
        );
        assert_eq!(
            (parts[1].first_seq(), parts[1].last_seq()),
            (Seq(12), Seq(14))
        );
        assert!(parts.iter().all(|p| p.epoch() == Epoch(7)));
        assert!(parts
            .iter()
            .all(|p| p.sealed_at_micros() == batch.sealed_at_micros()));
        let records: Vec<Record> = parts.into_iter().flat_map(Batch::into_records).collect();
        assert_eq!(records, batch.into_records());
    }

    #[test]
    fn a_cut_that_does_not_cover_the_batch_is_refused() {
        assert!(sample(5).cut(&[2, 2]).is_err());
        assert!(sample(5).cut(&[5, 0]).is_err());
        assert!(sample(5).cut(&[3, 3]).is_err());
    }

    #[test]
    fn round_trip_keeps_epoch_seqs_and_records() {
        let (mut enc, mut dec) = codec();
        let batch = sample(50);
        let encoded = enc.encode(&batch).unwrap();
        assert_eq!(encoded.first_seq(), Seq(10));
        assert_eq!(encoded.last_seq(), Seq(59));
        assert_eq!(dec.decode(encoded.as_bytes()).unwrap(), batch);
    }

    #[test]
    fn the_seal_time_survives_the_round_trip() {
        let (mut enc, mut dec) = codec();
        let batch = sample(3);
        assert!(batch.sealed_at_micros() > 0);
        let encoded = enc.encode(&batch).unwrap();
        assert_eq!(encoded.header().sealed_at_micros, batch.sealed_at_micros());
        let decoded = dec.decode(encoded.as_bytes()).unwrap();
        assert_eq!(decoded.sealed_at_micros(), batch.sealed_at_micros());
    }

    #[test]
    fn unknown_version_is_refused_before_anything_else() {
        let (mut enc, mut dec) = codec();
        let mut bytes = enc.encode(&sample(3)).unwrap().into_bytes();
        bytes[4] = 3;
        assert_eq!(
            dec.decode(&bytes),
            Err(BatchError::UnsupportedVersion {
                found: 3,
                supported: FORMAT_VERSION
            })
        );
    }

    #[test]
    fn bad_magic_is_refused() {
        let (_, mut dec) = codec();
        let mut garbage = vec![0u8; 64];
        garbage[..4].copy_from_slice(b"HTTP");
        assert!(matches!(
            dec.decode(&garbage),
            Err(BatchError::BadMagic { .. })
        ));
    }

    #[test]
    fn decompression_bomb_fails_without_growing_past_the_header() {
        let (_, mut dec) = codec();
        let bomb_body = vec![0u8; 64 << 20];
        let compressed = zstd::bulk::compress(&bomb_body, 1).unwrap();
        let mut bytes = vec![0u8; HEADER_LEN];
        let header = BatchHeader {
            epoch: Epoch(1),
            first_seq: Seq(1),
            record_count: 1,
            uncompressed_len: 1024,
            sealed_at_micros: 0,
            checksum: 0,
        };
        header.write_fields(&mut bytes);
        bytes.extend_from_slice(&compressed);
        assert!(matches!(
            dec.decode(&bytes),
            Err(BatchError::Decompress { .. })
        ));
        assert!(
            dec.body.capacity() < 4096,
            "decoder grew to {}",
            dec.body.capacity()
        );
    }

    #[test]
    fn announced_body_over_the_limit_is_refused_before_decompressing() {
        let (mut enc, mut dec) = codec();
        let mut bytes = enc.encode(&sample(3)).unwrap().into_bytes();
        bytes[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            dec.decode(&bytes),
            Err(BatchError::UncompressedTooLarge { .. })
        ));
        assert_eq!(dec.body.capacity(), 0);
    }

    #[test]
    fn a_count_that_disagrees_with_the_body_is_refused() {
        let (mut enc, mut dec) = codec();
        let batch = sample(3);
        let mut bytes = enc.encode(&batch).unwrap().into_bytes();
        bytes[24..28].copy_from_slice(&2u32.to_le_bytes());
        reseal(&mut bytes, &enc.body);
        assert!(matches!(
            dec.decode(&bytes),
            Err(BatchError::TrailingBytes { .. })
        ));
        bytes[24..28].copy_from_slice(&4u32.to_le_bytes());
        reseal(&mut bytes, &enc.body);
        assert!(matches!(
            dec.decode(&bytes),
            Err(BatchError::RecordDecode { index: 3, .. })
        ));
    }

    #[test]
    fn seq_range_that_would_wrap_is_refused() {
        let (mut enc, mut dec) = codec();
        let mut bytes = enc.encode(&sample(3)).unwrap().into_bytes();
        bytes[16..24].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        assert!(matches!(
            dec.decode(&bytes),
            Err(BatchError::SeqRangeOverflow { .. })
        ));
        assert!(Batch::new(
            Epoch(1),
            Seq(u64::MAX),
            vec![Record::delete("a"), Record::delete("b")]
        )
        .is_err());
    }

    #[test]
    fn encoder_refuses_a_record_over_the_limits() {
        let (mut enc, _) = codec();
        let batch = Batch::new(Epoch(1), Seq(1), vec![Record::put(vec![1; 5000], "v")]).unwrap();
        assert!(matches!(
            enc.encode(&batch),
            Err(Error::RecordTooLarge { part: "key", .. })
        ));
    }

    #[test]
    fn a_maximal_incompressible_record_fits_one_batch() {
        let (mut enc, mut dec) = codec();
        let mut value = vec![0u8; 1 << 20];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for byte in &mut value {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *byte = x as u8;
        }
        let record = Record::put(vec![b'k'; 4096], value);
        let batch = Batch::new(Epoch(1), Seq(1), vec![record]).unwrap();
        let encoded = enc.encode(&batch).unwrap();
        assert_eq!(dec.decode(encoded.as_bytes()).unwrap(), batch);
    }
}
