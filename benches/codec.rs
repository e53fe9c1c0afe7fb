//! Batch codec throughput: encode (bincode + xxh3 + zstd level 1) and decode (the same,
//! verified) for batches of 1, 128, 1024 and 4096 records of 256 bytes.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fencelog::batch::{Batch, BatchDecoder, BatchEncoder};
use fencelog::limits::Limits;
use fencelog::record::{Epoch, Seq};
use fencelog::workload::RecordGenerator;

const BATCH_SIZES: [usize; 4] = [1, 128, 1024, 4096];

fn codec(c: &mut Criterion) {
    let mut encoder = BatchEncoder::new(Limits::default(), 1).expect("default limits are valid");
    let mut decoder = BatchDecoder::new(Limits::default()).expect("default limits are valid");
    let mut encode = c.benchmark_group("encode");
    let mut inputs = Vec::new();
    for count in BATCH_SIZES {
        let records = RecordGenerator::new(1, 1_000_000, 256).take_records(count);
        let bytes: usize = records.iter().map(|r| r.key.len() + r.value.len()).sum();
        let batch = Batch::new(Epoch(1), Seq(1), records).expect("valid batch");
        let encoded = encoder.encode(&batch).expect("encodes");
        println!(
            "batch of {count} records: {bytes} payload bytes -> {} encoded (ratio {:.2})",
            encoded.as_bytes().len(),
            bytes as f64 / encoded.as_bytes().len() as f64
        );
        let throughput = Throughput::ElementsAndBytes {
            elements: count as u64,
            bytes: bytes as u64,
        };
        encode.throughput(throughput.clone());
        encode.bench_with_input(BenchmarkId::from_parameter(count), &batch, |b, batch| {
            b.iter(|| encoder.encode(black_box(batch)).expect("encodes"))
        });
        inputs.push((count, throughput, encoded));
    }
    encode.finish();

    let mut decode = c.benchmark_group("decode");
    for (count, throughput, encoded) in inputs {
        decode.throughput(throughput);
        decode.bench_with_input(
            BenchmarkId::from_parameter(count),
            &encoded,
            |b, encoded| {
                b.iter(|| {
                    decoder
                        .decode(black_box(encoded.as_bytes()))
                        .expect("decodes")
                })
            },
        );
    }
    decode.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().without_plots().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = codec
}
criterion_main!(benches);
