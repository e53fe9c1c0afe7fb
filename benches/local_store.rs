//! Local store throughput, 256-byte records, 1024 per batch:
//! - `log_append`: the store's one sled insert per batch, against one insert per record;
//! - `state_apply`: applying a batch of random keys (1M-key space) to the state, against sled's
//!   raw random-key insert rate, the ceiling for any apply.
//!
//! Flushing is left to sled's background thread except in `log_append/per_batch_flushed`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fencelog::batch::{Batch, BatchDecoder, BatchEncoder, EncodedBatch};
use fencelog::limits::Limits;
use fencelog::local_store::{FlushPolicy, LocalStore, StoreOptions};
use fencelog::record::{Epoch, Op, Record, Seq};
use fencelog::workload::RecordGenerator;
use tempfile::TempDir;

const PER_BATCH: usize = 1024;
const POOL_BATCHES: usize = 256;
const KEYSPACE: u64 = 1_000_000;

/// A pool of consecutive encoded batches from seq 1, so that encoding stays out of the timing.
fn batch_pool() -> Vec<EncodedBatch> {
    let mut encoder = BatchEncoder::new(Limits::default(), 1).expect("default limits are valid");
    let mut records = RecordGenerator::new(42, KEYSPACE, 256);
    (0..POOL_BATCHES)
        .map(|i| {
            let first = Seq(1 + (i * PER_BATCH) as u64);
            let batch =
                Batch::new(Epoch(1), first, records.take_records(PER_BATCH)).expect("batch");
            encoder.encode(&batch).expect("encodes")
        })
        .collect()
}

/// A fresh store, and the directory that must outlive it.
fn fresh_store(flush: FlushPolicy) -> (LocalStore, TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = StoreOptions {
        flush,
        ..StoreOptions::default()
    };
    (
        LocalStore::open(dir.path(), options).expect("store opens"),
        dir,
    )
}

/// Times `timed` once per iteration over the pool's batches, starting a fresh store whenever the
/// pool runs out; `untimed` runs before each timed call.
fn over_pool(
    pool: &[EncodedBatch],
    flush: FlushPolicy,
    iters: u64,
    untimed: impl Fn(&LocalStore, &EncodedBatch),
    timed: impl Fn(&LocalStore, &EncodedBatch),
) -> Duration {
    let mut total = Duration::ZERO;
    let mut store = fresh_store(flush);
    for i in 0..iters as usize {
        if i > 0 && i % pool.len() == 0 {
            store = fresh_store(flush);
        }
        let batch = &pool[i % pool.len()];
        untimed(&store.0, batch);
        let start = Instant::now();
        timed(&store.0, batch);
        total += start.elapsed();
    }
    total
}

fn log_append(c: &mut Criterion, pool: &[EncodedBatch]) {
    let mut group = c.benchmark_group("log_append");
    group.throughput(Throughput::Elements(PER_BATCH as u64));
    let append =
        |store: &LocalStore, batch: &EncodedBatch| store.append_committed(batch).expect("appends");
    let background = FlushPolicy::Background { interval_ms: 500 };
    group.bench_function("per_batch", |b| {
        b.iter_custom(|iters| over_pool(pool, background, iters, |_, _| {}, append))
    });
    group.bench_function("per_batch_flushed", |b| {
        b.iter_custom(|iters| over_pool(pool, FlushPolicy::EveryWrite, iters, |_, _| {}, append))
    });
    let records: Vec<Record> = RecordGenerator::new(42, KEYSPACE, 256).take_records(PER_BATCH);
    group.bench_function("per_record", |b| {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .expect("sled opens");
        let tree = db.open_tree("log").expect("tree");
        let mut seq = 0u64;
        b.iter(|| {
            for record in &records {
                seq += 1;
                let mut value = Vec::with_capacity(record.key.len() + record.value.len() + 1);
                value.push(record.op as u8);
                value.extend_from_slice(&record.key);
                value.extend_from_slice(&record.value);
                tree.insert(seq.to_be_bytes(), value).expect("inserts");
            }
        })
    });
    group.finish();
}

fn state_apply(c: &mut Criterion, pool: &[EncodedBatch]) {
    let mut group = c.benchmark_group("state_apply");
    group.throughput(Throughput::Elements(PER_BATCH as u64));
    let background = FlushPolicy::Background { interval_ms: 500 };
    group.bench_function("apply_batch", |b| {
        b.iter_custom(|iters| {
            over_pool(
                pool,
                background,
                iters,
                |store, batch| store.append_committed(batch).expect("appends"),
                |store, _| {
                    store
                        .apply_next()
                        .expect("applies")
                        .expect("a batch was waiting");
                },
            )
        })
    });
    // The same records in the same order into a tree that grows the same way: the ceiling.
    let mut decoder = BatchDecoder::new(Limits::default()).expect("default limits are valid");
    let decoded: Vec<Vec<Record>> = pool
        .iter()
        .map(|batch| {
            decoder
                .decode(batch.as_bytes())
                .expect("decodes")
                .into_records()
        })
        .collect();
    group.bench_function("sled_raw_random_insert", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut db = sled::Config::new()
                .temporary(true)
                .open()
                .expect("sled opens");
            for i in 0..iters as usize {
                if i > 0 && i % decoded.len() == 0 {
                    db = sled::Config::new()
                        .temporary(true)
                        .open()
                        .expect("sled opens");
                }
                let start = Instant::now();
                for record in &decoded[i % decoded.len()] {
                    match record.op {
                        Op::Put => db.insert(record.key.as_slice(), record.value.as_slice()),
                        Op::Delete => db.remove(record.key.as_slice()),
                    }
                    .expect("writes");
                }
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

fn local_store(c: &mut Criterion) {
    let pool = batch_pool();
    log_append(c, &pool);
    state_apply(c, &pool);
}

criterion_group! {
    name = benches;
    config = Criterion::default().without_plots()
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    targets = local_store
}
criterion_main!(benches);
