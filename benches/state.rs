//! The in-memory state alone (`state::KvState`, no store, no log), 214-byte records of the
//! workload generator, 1024 per apply:
//! - `apply/keyspace_1m`: overwrites (and a delete in ten) over a 1M-key keyspace already
//!   filled;
//! - `apply/keyspace_1m_checkpointing`: the same while a checkpoint holds the pages it took
//!   (changes taken every 64 batches and kept until the next): what writing a page shared with
//!   a checkpoint costs the applier;
//! - `apply/unique`: new keys into a state that grows (restarted at 2M keys);
//! - `checkpoint/encode_1m` and `checkpoint/load_1m`: a whole 1M-key state encoded into pages,
//!   and rebuilt from them.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fencelog::record::{Record, RecordRef, Seq};
use fencelog::state::{Changes, KvState, PageWrite, StateMachine};
use fencelog::workload::RecordGenerator;

const PER_BATCH: usize = 1024;
const KEYSPACE: u64 = 1_000_000;
const RECORD_BYTES: usize = 214;
/// How many batches a checkpoint's changes are held across in `keyspace_1m_checkpointing`.
const CHECKPOINT_EVERY: usize = 64;
/// Where `apply/unique` starts over with an empty state, to bound its memory.
const UNIQUE_RESTART_KEYS: usize = 2_000_000;

fn batches(generator: &mut RecordGenerator, count: usize) -> Vec<Vec<Record>> {
    (0..count)
        .map(|_| generator.take_records(PER_BATCH))
        .collect()
}

fn apply(state: &mut KvState, records: &[Record]) {
    let borrowed: Vec<RecordRef<'_>> = records.iter().map(Record::as_ref).collect();
    state.apply(Seq(1), &borrowed).expect("applies");
}

/// A state holding every key of the 1M keyspace.
fn full_state() -> KvState {
    let mut state = KvState::new();
    let mut generator = RecordGenerator::new(7, KEYSPACE, RECORD_BYTES);
    for key in 0..KEYSPACE {
        let record = generator.next_record();
        // The generator's key format: its records overwrite (and delete) these keys.
        let record = Record::put(format!("obj/{key:010}").into_bytes(), record.value);
        apply(&mut state, std::slice::from_ref(&record));
    }
    state
}

fn encode_all(state: &mut KvState) -> Vec<PageWrite> {
    state.take_changes(true).encode().expect("encodes")
}

fn apply_group(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Elements(PER_BATCH as u64));
    let pool = batches(&mut RecordGenerator::new(42, KEYSPACE, RECORD_BYTES), 256);
    let mut state = full_state();
    group.bench_function("keyspace_1m", |b| {
        let mut i = 0;
        b.iter(|| {
            apply(&mut state, &pool[i % pool.len()]);
            i += 1;
        })
    });
    group.bench_function("keyspace_1m_checkpointing", |b| {
        let mut held: Option<Box<dyn Changes>> = None;
        let mut i = 0;
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if i % CHECKPOINT_EVERY == 0 {
                    held = Some(state.take_changes(false));
                }
                let start = Instant::now();
                apply(&mut state, &pool[i % pool.len()]);
                total += start.elapsed();
                i += 1;
            }
            total
        });
        drop(held);
    });
    drop(state);
    group.bench_function("unique", |b| {
        let mut generator = RecordGenerator::new(43, u64::MAX, RECORD_BYTES);
        let mut state = KvState::new();
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if state.len() >= UNIQUE_RESTART_KEYS {
                    state = KvState::new();
                }
                let batch = generator.take_records(PER_BATCH);
                let start = Instant::now();
                apply(&mut state, &batch);
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

fn checkpoint_group(c: &mut Criterion) {
    let mut group = c.benchmark_group("checkpoint");
    group.sample_size(10);
    group.throughput(Throughput::Elements(KEYSPACE));
    let mut state = full_state();
    group.bench_function("encode_1m", |b| b.iter(|| encode_all(&mut state)));
    let pages = encode_all(&mut state);
    group.bench_function("load_1m", |b| {
        b.iter(|| {
            let mut loaded = KvState::new();
            for page in &pages {
                let bytes = page
                    .bytes
                    .as_deref()
                    .expect("a full checkpoint writes every page");
                loaded.load_page(&page.id, bytes).expect("loads");
            }
            loaded
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().without_plots()
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    targets = apply_group, checkpoint_group
}
criterion_main!(benches);
