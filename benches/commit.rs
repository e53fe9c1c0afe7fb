//! The commit path against a real etcd (started by the bench), 256-byte records, in one run:
//! - `ceiling`: pre-encoded 1024-record batches committed by the fenced transaction, one in
//!   flight: the commit layer's physical limit here;
//! - `plain_loop`: encode (compress) a 1024-record batch, then commit it, one after another;
//! - `fencelog/{double,single}/<cap>`: `Primary::append` from concurrent producers that build
//!   each record (real work per record), batch caps 1, 128, 1024, 4096, with the primary's own
//!   state apply running; `..._prebuilt/1024`: the same with producers that append records
//!   built beforehand;
//! - `seed_style`: the design fencelog replaces: one etcd key per record holding JSON with base64
//!   payloads, 127 keys per transaction, then `latest` in a separate put.
//!
//! Each group gets a fresh etcd, so earlier groups' data does not weigh on later ones.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use fencelog::batch::{Batch, BatchEncoder, EncodedBatch};
use fencelog::config::{Pipeline, PrimaryConfig};
use fencelog::etcd::commit::{commit_batch, CommitOutcome};
use fencelog::etcd::process::EtcdProcess;
use fencelog::keys::KeyLayout;
use fencelog::limits::Limits;
use fencelog::local_store::LocalStore;
use fencelog::metrics::Metrics;
use fencelog::primary::Primary;
use fencelog::record::{Epoch, Record, Seq};
use fencelog::workload::RecordGenerator;
use tokio::runtime::Runtime;

const BATCH: usize = 1024;
/// Distinct records the `Prebuilt` producers draw from.
const PREBUILT_RECORDS: usize = 1 << 16;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn start_etcd() -> (EtcdProcess, Client) {
    let etcd = EtcdProcess::start()
        .await
        .expect("etcd starts (tools/test.sh installs it)");
    let client = fencelog::etcd::connect(&[etcd.endpoint().to_owned()], Duration::from_secs(5))
        .await
        .expect("etcd answers");
    (etcd, client)
}

/// Takes the leader key of `layout` under a long lease, as a primary would; returns the epoch.
async fn lead(client: &mut Client, layout: &KeyLayout) -> Epoch {
    let lease = client.lease_grant(600, None).await.expect("lease").id();
    let txn = Txn::new()
        .when([Compare::create_revision(
            layout.leader(),
            CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::put(
            layout.leader(),
            "bench 127.0.0.1:1",
            Some(PutOptions::new().with_lease(lease)),
        )]);
    let response = client.txn(txn).await.expect("txn");
    assert!(
        response.succeeded(),
        "the bench's cluster already has a leader"
    );
    Epoch(response.header().expect("header").revision() as u64)
}

/// Commits encoded batches in order with the fenced transaction, one in flight.
struct FencedWriter {
    client: Client,
    layout: KeyLayout,
    epoch: Epoch,
    latest_revision: i64,
    next_seq: Seq,
}

impl FencedWriter {
    async fn new(client: &Client, cluster: &str) -> FencedWriter {
        let mut client = client.clone();
        let layout = KeyLayout::new(&cluster.parse().expect("valid cluster"));
        let epoch = lead(&mut client, &layout).await;
        FencedWriter {
            client,
            layout,
            epoch,
            latest_revision: 0,
            next_seq: Seq(1),
        }
    }

    async fn commit(&mut self, batch: &EncodedBatch) {
        match commit_batch(
            &mut self.client.kv_client(),
            &self.layout,
            self.epoch,
            self.latest_revision,
            batch,
        )
        .await
        {
            Ok(CommitOutcome::Committed { revision }) => self.latest_revision = revision,
            other => panic!("bench commit failed: {other:?}"),
        }
        self.next_seq = batch.last_seq().next().expect("seqs left");
    }
}

fn ceiling_and_plain_loop(c: &mut Criterion) {
    let rt = runtime();
    let (_etcd, client) = rt.block_on(start_etcd());
    let mut group = c.benchmark_group("commit");
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut generator = RecordGenerator::new(7, 1_000_000, 256);
    let samples: Vec<Vec<Record>> = (0..64).map(|_| generator.take_records(BATCH)).collect();

    let mut writer = rt.block_on(FencedWriter::new(&client, "ceiling"));
    let mut encoder = BatchEncoder::new(Limits::default(), 1).expect("valid limits");
    group.bench_function("ceiling/1024", |b| {
        b.iter_custom(|iters| {
            // Encoded before the clock starts: only the transactions are timed.
            let batches: Vec<EncodedBatch> = (0..iters as usize)
                .map(|i| {
                    let first = Seq(writer.next_seq.0 + (i * BATCH) as u64);
                    let batch = Batch::new(writer.epoch, first, samples[i % samples.len()].clone())
                        .expect("batch");
                    encoder.encode(&batch).expect("encodes")
                })
                .collect();
            rt.block_on(async {
                let started = Instant::now();
                for batch in &batches {
                    writer.commit(batch).await;
                }
                started.elapsed()
            })
        })
    });

    let mut writer = rt.block_on(FencedWriter::new(&client, "plain-loop"));
    group.bench_function("plain_loop/1024", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for i in 0..iters as usize {
                    let batch = Batch::new(
                        writer.epoch,
                        writer.next_seq,
                        samples[i % samples.len()].clone(),
                    )
                    .expect("batch");
                    let encoded = encoder.encode(&batch).expect("encodes");
                    writer.commit(&encoded).await;
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

/// Pushes `records` records through `primary` from producers that each build their records.
/// How producers come by the records they append.
#[derive(Clone, Copy)]
enum Producers {
    /// Build each record (`RecordGenerator`, ~1 µs): real work per record.
    Building,
    /// Append clones of distinct records built beforehand (as compressible as built ones): the
    /// pipeline's own cost only.
    Prebuilt,
}

async fn produce(
    primary: &Arc<Primary>,
    records: u64,
    per_append: usize,
    producers: usize,
    kind: Producers,
) -> Duration {
    let prebuilt =
        Arc::new(RecordGenerator::new(99, 1_000_000, 256).take_records(PREBUILT_RECORDS));
    let started = Instant::now();
    let per_producer = records.div_ceil(producers as u64);
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let primary = primary.clone();
            let prebuilt = prebuilt.clone();
            tokio::spawn(async move {
                let mut generator = RecordGenerator::new(p as u64 + 1, 1_000_000, 256);
                let mut left = per_producer;
                while left > 0 {
                    let n = left.min(per_append as u64) as usize;
                    let records = match kind {
                        Producers::Building => generator.take_records(n),
                        Producers::Prebuilt => {
                            let at = (left as usize * 7919 + p * 104_729) % (PREBUILT_RECORDS - n);
                            prebuilt[at..at + n].to_vec()
                        }
                    };
                    primary.append(records).await.expect("append commits");
                    left -= n as u64;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("producer");
    }
    started.elapsed()
}

/// Batch caps to run; `FENCELOG_BENCH_CAPS=1024` narrows a run while iterating.
fn caps() -> Vec<usize> {
    std::env::var("FENCELOG_BENCH_CAPS")
        .ok()
        .and_then(|caps| caps.split(',').map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 128, 1024, 4096])
}

fn fencelog_primary(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("commit");
    for pipeline in [Pipeline::Double, Pipeline::Single] {
        for cap in caps() {
            let (etcd, client) = rt.block_on(start_etcd());
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Arc::new(LocalStore::open(dir.path(), Default::default()).expect("store"));
            let mut config = PrimaryConfig::new(
                "bench".parse().unwrap(),
                "bench".parse().unwrap(),
                "127.0.0.1:1",
            );
            config.pipeline = pipeline;
            config.max_batch_records = cap;
            let metrics = Arc::new(Metrics::new().expect("metrics"));
            let primary = Arc::new(
                rt.block_on(Primary::start(client, store, config, metrics.clone()))
                    .expect("primary starts"),
            );
            let per_append = cap.min(16);
            let producers = (2 * cap / per_append).clamp(4, 512);
            let unit = if cap == 1 { 64 } else { BATCH as u64 };
            group.throughput(Throughput::Elements(unit));
            let name = match pipeline {
                Pipeline::Double => "fencelog/double",
                Pipeline::Single => "fencelog/single",
            };
            let mut variants = vec![(name.to_owned(), Producers::Building)];
            if cap == BATCH {
                variants.push((format!("{name}_prebuilt"), Producers::Prebuilt));
            }
            for (variant, kind) in variants {
                group.bench_with_input(BenchmarkId::new(variant, cap), &cap, |b, _| {
                    b.iter_custom(|iters| {
                        rt.block_on(produce(&primary, iters * unit, per_append, producers, kind))
                    })
                });
            }
            println!(
                "{name}/{cap}: {:.0} records per committed batch on average",
                metrics.committed_records.get() as f64 / metrics.commits.get().max(1) as f64
            );
            let primary = Arc::into_inner(primary).expect("producers are done");
            rt.block_on(primary.shutdown()).expect("shuts down");
            drop(etcd);
        }
    }
    group.finish();
}

/// One record as the seed design stored it: a JSON document with base64 key and value.
fn seed_entry(seq: u64, record: &Record) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let checksum = xxhash_rust::xxh3::xxh3_64(&record.value);
    format!(
        r#"{{"sequence_id":{seq},"op_type":"{:?}","object_key":"{}","payload":"{}","checksum":{checksum},"timestamp_ms":{}}}"#,
        record.op,
        b64.encode(&record.key),
        b64.encode(&record.value),
        seq * 3
    )
}

fn seed_style(c: &mut Criterion) {
    const KEYS_PER_TXN: usize = 127;
    let rt = runtime();
    let (_etcd, client) = rt.block_on(start_etcd());
    let mut group = c.benchmark_group("commit");
    group.throughput(Throughput::Elements(KEYS_PER_TXN as u64));
    let mut generator = RecordGenerator::new(9, 1_000_000, 256);
    let mut kv = client.kv_client();
    let mut seq = 0u64;
    group.bench_function("seed_style/127", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let puts: Vec<TxnOp> = generator
                        .take_records(KEYS_PER_TXN)
                        .iter()
                        .map(|record| {
                            seq += 1;
                            TxnOp::put(
                                format!("/seed/oplog/{seq:020}"),
                                seed_entry(seq, record),
                                None,
                            )
                        })
                        .collect();
                    kv.txn(Txn::new().and_then(puts)).await.expect("txn");
                    kv.put("/seed/latest_sequence_id", seq.to_string(), None)
                        .await
                        .expect("put");
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    targets = ceiling_and_plain_loop, fencelog_primary, seed_style
}
criterion_main!(benches);
