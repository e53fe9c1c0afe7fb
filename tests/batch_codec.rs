//! The batch codec's contract: what is encoded decodes to exactly the same records, and any
//! damaged, truncated or oversized input is refused with an error, never a panic.

use fencelog::batch::{Batch, BatchDecoder, BatchEncoder, HEADER_LEN};
use fencelog::limits::Limits;
use fencelog::record::{Epoch, Op, Record, Seq};
use fencelog::BatchError;
use proptest::prelude::*;

fn record() -> impl Strategy<Value = Record> {
    let put = (
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(key, value)| Record::put(key, value));
    let delete = prop::collection::vec(any::<u8>(), 0..64).prop_map(Record::delete);
    prop_oneof![4 => put, 1 => delete]
}

fn batch() -> impl Strategy<Value = Batch> {
    (
        1u64..1_000_000,
        1u64..u64::MAX / 2,
        prop::collection::vec(record(), 1..200),
    )
        .prop_map(|(epoch, first, records)| {
            Batch::new(Epoch(epoch), Seq(first), records).expect("valid batch")
        })
}

fn codec() -> (BatchEncoder, BatchDecoder) {
    (
        BatchEncoder::new(Limits::default(), 1).expect("valid limits"),
        BatchDecoder::new(Limits::default()).expect("valid limits"),
    )
}

/// Cases per property: `FENCELOG_FUZZ_CASES`, default 200 (docs/RELIABILITY.md records a long
/// run).
fn fuzz_cases() -> u32 {
    std::env::var("FENCELOG_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(fuzz_cases()))]

    #[test]
    fn decode_returns_exactly_what_was_encoded(batch in batch()) {
        let (mut enc, mut dec) = codec();
        let encoded = enc.encode(&batch).unwrap();
        prop_assert_eq!(encoded.first_seq(), batch.first_seq());
        prop_assert_eq!(encoded.last_seq(), batch.last_seq());
        prop_assert_eq!(dec.decode(encoded.as_bytes()).unwrap(), batch);
    }

    #[test]
    fn any_flipped_byte_is_refused(batch in batch(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let (mut enc, mut dec) = codec();
        let mut bytes = enc.encode(&batch).unwrap().into_bytes();
        let at = at.index(bytes.len());
        bytes[at] ^= 1 << bit;
        prop_assert!(dec.decode(&bytes).is_err(), "flip of bit {} at byte {} accepted", bit, at);
    }

    #[test]
    fn any_truncation_is_refused(batch in batch(), at in any::<prop::sample::Index>()) {
        let (mut enc, mut dec) = codec();
        let bytes = enc.encode(&batch).unwrap().into_bytes();
        let cut = at.index(bytes.len());
        prop_assert!(dec.decode(&bytes[..cut]).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let (_, mut dec) = codec();
        prop_assert!(dec.decode(&bytes).is_err());
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_header_prefix_are_refused(
        batch in batch(),
        tail in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let (mut enc, mut dec) = codec();
        let mut bytes = enc.encode(&batch).unwrap().into_bytes();
        bytes.truncate(HEADER_LEN);
        bytes.extend_from_slice(&tail);
        prop_assert!(dec.decode(&bytes).is_err());
    }
}

#[test]
fn batches_at_each_benchmarked_size_round_trip() {
    let (mut enc, mut dec) = codec();
    for count in [1usize, 128, 1024, 4096] {
        let records: Vec<Record> = (0..count)
            .map(|i| Record::put(format!("key-{i:08}"), vec![(i % 251) as u8; 240]))
            .collect();
        let batch = Batch::new(Epoch(3), Seq(1), records).unwrap();
        let encoded = enc.encode(&batch).unwrap();
        assert_eq!(
            dec.decode(encoded.as_bytes()).unwrap(),
            batch,
            "{count} records"
        );
    }
}

#[test]
fn an_encoded_batch_over_the_cap_is_refused_before_decompressing() {
    let (_, mut dec) = codec();
    let huge = vec![0u8; Limits::default().max_batch_bytes + 1];
    let mut bytes = huge;
    bytes[..4].copy_from_slice(b"FLGB");
    bytes[4..8].copy_from_slice(&fencelog::batch::FORMAT_VERSION.to_le_bytes());
    assert!(matches!(
        dec.decode(&bytes),
        Err(BatchError::EncodedTooLarge { .. })
    ));
}

#[test]
fn a_batch_from_more_generous_limits_is_refused_by_stricter_ones() {
    let generous = Limits {
        max_key_bytes: 8192,
        ..Limits::default()
    };
    let mut enc = BatchEncoder::new(generous, 1).unwrap();
    let batch = Batch::new(Epoch(1), Seq(1), vec![Record::put(vec![7; 6000], "v")]).unwrap();
    let bytes = enc.encode(&batch).unwrap().into_bytes();
    let (_, mut strict) = codec();
    assert!(matches!(
        strict.decode(&bytes),
        Err(BatchError::RecordOverLimit {
            index: 0,
            part: "key",
            len: 6000,
            limit: 4096
        })
    ));
}

#[test]
fn deletes_decode_as_deletes() {
    let (mut enc, mut dec) = codec();
    let batch = Batch::new(
        Epoch(1),
        Seq(5),
        vec![Record::put("a", "1"), Record::delete("a")],
    )
    .unwrap();
    let decoded = dec.decode(enc.encode(&batch).unwrap().as_bytes()).unwrap();
    let ops: Vec<(Seq, Op)> = decoded.iter().map(|(seq, r)| (seq, r.op)).collect();
    assert_eq!(ops, [(Seq(5), Op::Put), (Seq(6), Op::Delete)]);
}

/// The fuzzer's kept corpus (fuzz/corpus/decode_batch, see fuzz/README.md) as a regression
/// suite: every input decodes or is refused without a panic, and the seeds — batches written
/// by the encoder — still decode.
#[test]
fn the_fuzz_corpus_decodes_or_is_refused_without_a_panic() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode_batch");
    let (_, mut dec) = codec();
    let mut inputs = 0;
    for entry in std::fs::read_dir(&corpus).expect("the corpus is in the repository") {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let decoded = dec.decode(&bytes);
        let name = path.file_name().unwrap().to_string_lossy();
        if name.starts_with("seed-") {
            assert!(decoded.is_ok(), "{name}: {decoded:?}");
        }
        inputs += 1;
    }
    assert!(inputs >= 7, "only {inputs} inputs in {}", corpus.display());
}
