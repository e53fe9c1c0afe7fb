//! The commit path against a real etcd (started by the bench), 256-byte records, in one run:
//! - `ceiling`: pre-encoded 1024-record batches committed by the fenced transaction, one in
//!   flight: the commit layer's physical limit here;
//! - `plain_loop`: build 1024 records, encode (compress) them as a batch, then commit it, one
//!   after another;
//! - `ceiling/<delay>/1024`, `plain_loop/<delay>/1024`: the same through the delaying proxy at
//!   each delay of `in_flight`;
//! - `fencelog/{double,single}/<cap>`: `Primary::append` from concurrent producers that build
//!   each record (real work per record), batch caps 1, 128, 1024, 4096, with the primary's own
//!   state apply running; `..._prebuilt/1024`: the same with producers that append records
//!   built beforehand;
//! - `in_flight/<delay>/<cap>/k<k>`: the double pipeline with etcd behind the test kit's
//!   delaying proxy (`etcd::proxy::FaultProxy`, each way `FENCELOG_BENCH_DELAYS_MS`, default
//!   0 and 1 ms), `max_commits_in_flight` 1, 2, 4, 8, caps 128 and 1024, prebuilt records:
//!   what commits in flight buy when etcd is a round trip away;
//! - `in_flight_cluster/<delay>/<cap>/k<k>`: the same against a 3-member etcd whose members are
//!   the delay apart each way (`EtcdCluster::start_apart`), the client the delay from each:
//!   raft's replication pays the round trip too;
//! - `one_client/<delay>/k<k>`: one client appending one record at a time, each append
//!   awaited (the time of one append, criterion's unit; p50 and p99 of 500 printed), etcd as
//!   far away as in `in_flight`, k 1 and 2: what a lightly loaded primary answers in;
//! - `seed_style`: the design fencelog replaces: one etcd key per record holding JSON with base64
//!   payloads, 127 keys per transaction, then `latest` in a separate put.
//!
//! Each group gets a fresh etcd, so earlier groups' data does not weigh on later ones.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use etcd_client::Client;
use fencelog::batch::{Batch, BatchEncoder};
use fencelog::bench::ceiling::FencedWriter;
use fencelog::bench::producers::{produce, saturating, Producers};
use fencelog::bench::seed_style::{SeedWriter, KEYS_PER_TXN};
use fencelog::config::{Pipeline, PrimaryConfig};
use fencelog::etcd::process::{EtcdCluster, EtcdProcess};
use fencelog::etcd::proxy::FaultProxy;
use fencelog::limits::Limits;
use fencelog::local_store::LocalStore;
use fencelog::metrics::Metrics;
use fencelog::primary::Primary;
use fencelog::record::Record;
use fencelog::workload::RecordGenerator;
use tokio::runtime::Runtime;

const BATCH: usize = 1024;

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

fn ceiling_and_plain_loop(c: &mut Criterion) {
    let rt = runtime();
    let (etcd, client) = rt.block_on(start_etcd());
    let mut group = c.benchmark_group("commit");
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut generator = RecordGenerator::new(7, 1_000_000, 256);
    let samples: Vec<Vec<Record>> = (0..64).map(|_| generator.take_records(BATCH)).collect();
    let mut encoder = BatchEncoder::new(Limits::default(), 1).expect("valid limits");
    let proxy = rt
        .block_on(FaultProxy::start(etcd.endpoint()))
        .expect("the proxy starts");
    let proxied = rt
        .block_on(fencelog::etcd::connect(
            &[proxy.endpoint().to_owned()],
            Duration::from_secs(5),
        ))
        .expect("etcd answers through the proxy");
    // Directly, then through the proxy at each delay of `in_flight` (the same etcd).
    let mut rows = vec![(String::new(), None, client)];
    for delay_ms in delays() {
        rows.push((format!("{delay_ms}ms/"), Some(delay_ms), proxied.clone()));
    }
    for (row, (at, delay_ms, client)) in rows.into_iter().enumerate() {
        if let Some(delay_ms) = delay_ms {
            proxy.delay(Duration::from_secs_f64(delay_ms / 1000.0));
        }
        let mut writer = rt
            .block_on(FencedWriter::lead(&client, &format!("ceiling-{row}")))
            .expect("leads");
        group.bench_function(format!("ceiling/{at}1024"), |b| {
            b.iter_custom(|iters| {
                // Encoded before the clock starts: only the transactions are timed.
                let batches = writer
                    .encode_batches(&samples, iters as usize)
                    .expect("encodes");
                rt.block_on(async {
                    let started = Instant::now();
                    for batch in &batches {
                        writer.commit(batch).await.expect("commits");
                    }
                    started.elapsed()
                })
            })
        });

        let mut writer = rt
            .block_on(FencedWriter::lead(&client, &format!("plain-loop-{row}")))
            .expect("leads");
        // Records built in line, as fencelog's producers build theirs: the same work per
        // record.
        group.bench_function(format!("plain_loop/{at}1024"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let batch = Batch::new(
                            writer.epoch(),
                            writer.next_seq(),
                            generator.take_records(BATCH),
                        )
                        .expect("batch");
                        let encoded = encoder.encode(&batch).expect("encodes");
                        writer.commit(&encoded).await.expect("commits");
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
}

/// Batch caps to run; `FENCELOG_BENCH_CAPS=1024` narrows a run while iterating.
fn caps() -> Vec<usize> {
    std::env::var("FENCELOG_BENCH_CAPS")
        .ok()
        .and_then(|caps| caps.split(',').map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 128, 1024, 4096])
}

/// A primary of the cluster `bench` on a new store (in the returned directory), its settings
/// the defaults changed by `set`.
async fn start_primary(
    client: Client,
    set: impl FnOnce(&mut PrimaryConfig),
) -> (tempfile::TempDir, Arc<Primary>, Arc<Metrics>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(LocalStore::open(dir.path(), Default::default()).expect("store"));
    let mut config = PrimaryConfig::new(
        "bench".parse().unwrap(),
        "bench".parse().unwrap(),
        "127.0.0.1:1",
    );
    set(&mut config);
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let primary = Primary::start(client, store, config, metrics.clone())
        .await
        .expect("primary starts");
    (dir, Arc::new(primary), metrics)
}

/// Delays each way (ms) of the `in_flight` group; `FENCELOG_BENCH_DELAYS_MS=0,0.5,1,2`.
fn delays() -> Vec<f64> {
    std::env::var("FENCELOG_BENCH_DELAYS_MS")
        .ok()
        .and_then(|ms| ms.split(',').map(|d| d.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![0.0, 1.0])
}

fn in_flight(c: &mut Criterion) {
    let rt = runtime();
    in_flight_rows(c, &rt, "in_flight", |delay| async move {
        let (etcd, _) = start_etcd().await;
        let proxy = FaultProxy::start(etcd.endpoint())
            .await
            .expect("the proxy starts");
        proxy.delay(delay);
        let client =
            fencelog::etcd::connect(&[proxy.endpoint().to_owned()], Duration::from_secs(5))
                .await
                .expect("etcd answers through the proxy");
        (Box::new((proxy, etcd)) as Box<dyn Send>, client)
    });
}

/// As `in_flight`, against 3 etcd members `delay` apart each way (their peer URLs through
/// delaying proxies) with the client `delay` from each: every commit pays the client's round
/// trip and raft's replication round trip, as across zones.
fn in_flight_cluster(c: &mut Criterion) {
    let rt = runtime();
    in_flight_rows(c, &rt, "in_flight_cluster", |delay| async move {
        let cluster = EtcdCluster::start_apart(3, delay)
            .await
            .expect("a 3-member etcd cluster starts");
        let mut proxies = Vec::new();
        for endpoint in cluster.endpoints().split(',') {
            let proxy = FaultProxy::start(endpoint).await.expect("the proxy starts");
            proxy.delay(delay);
            proxies.push(proxy);
        }
        let urls: Vec<String> = proxies.iter().map(|p| p.endpoint().to_owned()).collect();
        let client = fencelog::etcd::connect(&urls, Duration::from_secs(5))
            .await
            .expect("etcd answers through the proxies");
        (Box::new((proxies, cluster)) as Box<dyn Send>, client)
    });
}

/// Records/s of the double pipeline for k = 1, 2, 4, 8 commits in flight at each delay of
/// `delays()` and batch caps 128 and 1024, prebuilt records, each row on an etcd of its own
/// from `start` (what it returns besides the client is kept until the row is done).
fn in_flight_rows<F, S>(c: &mut Criterion, rt: &Runtime, group_name: &str, start: S)
where
    S: Fn(Duration) -> F,
    F: std::future::Future<Output = (Box<dyn Send>, Client)>,
{
    let mut group = c.benchmark_group("commit");
    for delay_ms in delays() {
        for cap in [128, BATCH] {
            for k in [1, 2, 4, 8] {
                let (etcd, client) = rt.block_on(start(Duration::from_secs_f64(delay_ms / 1000.0)));
                let (_dir, primary, metrics) = rt.block_on(start_primary(client, |config| {
                    config.max_batch_records = cap;
                    config.max_commits_in_flight = k;
                }));
                let per_append = cap.min(16);
                // Enough appends to fill every batch in flight, and the one filling.
                let producers = saturating(cap, per_append) * (k + 1) / 2;
                group.throughput(Throughput::Elements(BATCH as u64));
                let name = format!("{group_name}/{delay_ms}ms/{cap}");
                let mut round = 0;
                group.bench_with_input(
                    BenchmarkId::new(name.clone(), format!("k{k}")),
                    &k,
                    |b, _| {
                        b.iter_custom(|iters| {
                            round += 1;
                            rt.block_on(produce(
                                &primary,
                                iters * BATCH as u64,
                                per_append,
                                producers,
                                Producers::Prebuilt,
                                round,
                            ))
                            .expect("appends commit")
                        })
                    },
                );
                println!(
                    "{name}/k{k}: {:.0} records per committed batch, {:.2} batches per \
                     transaction, {} refused as behind, commit txn mean {:.2} ms",
                    metrics.committed_records.get() as f64 / metrics.commits.get().max(1) as f64,
                    metrics.commits.get() as f64 / metrics.commit_transactions.get().max(1) as f64,
                    metrics.commit_refusals.with_label_values(&["behind"]).get(),
                    mean_ms(&metrics.commit_seconds)
                );
                let primary = Arc::into_inner(primary).expect("producers are done");
                rt.block_on(primary.shutdown()).expect("shuts down");
                drop(etcd);
            }
        }
    }
    group.finish();
}

fn one_client(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("commit");
    group.throughput(Throughput::Elements(1));
    for delay_ms in delays() {
        for k in [1, 2] {
            let (etcd, direct) = rt.block_on(start_etcd());
            let direct_put = rt.block_on(one_put_p50(&direct));
            let proxy = rt
                .block_on(FaultProxy::start(etcd.endpoint()))
                .expect("the proxy starts");
            proxy.delay(Duration::from_secs_f64(delay_ms / 1000.0));
            let client = rt
                .block_on(fencelog::etcd::connect(
                    &[proxy.endpoint().to_owned()],
                    Duration::from_secs(5),
                ))
                .expect("etcd answers through the proxy");
            let round_trip = rt.block_on(one_put_p50(&client));
            let (_dir, primary, metrics) = rt.block_on(start_primary(client, |config| {
                config.max_commits_in_flight = k;
            }));
            let mut generator = RecordGenerator::new(5, 1_000_000, 256);
            let mut latencies: Vec<Duration> = rt.block_on(async {
                let mut latencies = Vec::with_capacity(500);
                for _ in 0..500 {
                    let started = Instant::now();
                    primary
                        .append(generator.take_records(1))
                        .await
                        .expect("commits");
                    latencies.push(started.elapsed());
                }
                latencies
            });
            latencies.sort();
            let name = format!("one_client/{delay_ms}ms");
            println!(
                "{name}/k{k}: ack p50 {:.2} ms, p99 {:.2} ms (500 appends of one record); \
                 one bare put p50 {:.2} ms ({:.2} ms without the proxy); \
                 the primary's commit txn mean {:.2} ms, seal mean {:.2} ms",
                latencies[250].as_secs_f64() * 1e3,
                latencies[495].as_secs_f64() * 1e3,
                round_trip.as_secs_f64() * 1e3,
                direct_put.as_secs_f64() * 1e3,
                mean_ms(&metrics.commit_seconds),
                mean_ms(&metrics.seal_seconds),
            );
            group.bench_with_input(BenchmarkId::new(name, format!("k{k}")), &k, |b, _| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let started = Instant::now();
                        for _ in 0..iters {
                            primary
                                .append(generator.take_records(1))
                                .await
                                .expect("commits");
                        }
                        started.elapsed()
                    })
                })
            });
            let primary = Arc::into_inner(primary).expect("the client is done");
            rt.block_on(primary.shutdown()).expect("shuts down");
            drop(proxy);
            drop(etcd);
        }
    }
    group.finish();
}

/// The mean of a histogram of seconds, in milliseconds.
fn mean_ms(histogram: &prometheus::Histogram) -> f64 {
    histogram.get_sample_sum() * 1e3 / histogram.get_sample_count().max(1) as f64
}

/// The p50 of 200 single-key puts, one at a time: etcd's own round trip through the proxy, the
/// floor under an acknowledgement.
async fn one_put_p50(client: &Client) -> Duration {
    let mut kv = client.kv_client();
    let mut times = Vec::with_capacity(200);
    for i in 0..200u32 {
        let started = Instant::now();
        kv.put("bench/round-trip", i.to_be_bytes().to_vec(), None)
            .await
            .expect("etcd takes a put");
        times.push(started.elapsed());
    }
    times.sort();
    times[100]
}

fn fencelog_primary(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("commit");
    for pipeline in [Pipeline::Double, Pipeline::Single] {
        for cap in caps() {
            let (etcd, client) = rt.block_on(start_etcd());
            let (_dir, primary, metrics) = rt.block_on(start_primary(client, |config| {
                config.pipeline = pipeline;
                config.max_batch_records = cap;
            }));
            let per_append = cap.min(16);
            let producers = saturating(cap, per_append);
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
            // Each measurement builds new records (see `produce`).
            let mut round = 0;
            for (variant, kind) in variants {
                group.bench_with_input(BenchmarkId::new(variant, cap), &cap, |b, _| {
                    b.iter_custom(|iters| {
                        round += 1;
                        rt.block_on(produce(
                            &primary,
                            iters * unit,
                            per_append,
                            producers,
                            kind,
                            round,
                        ))
                        .expect("appends commit")
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

fn seed_style(c: &mut Criterion) {
    let rt = runtime();
    let (_etcd, client) = rt.block_on(start_etcd());
    let mut group = c.benchmark_group("commit");
    group.throughput(Throughput::Elements(KEYS_PER_TXN as u64));
    let mut generator = RecordGenerator::new(9, 1_000_000, 256);
    let mut writer = SeedWriter::new(&client);
    group.bench_function("seed_style/127", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let records: Vec<Record> = generator.take_records(KEYS_PER_TXN);
                    writer.write(&records).await.expect("writes");
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().without_plots()
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    targets = ceiling_and_plain_loop, fencelog_primary, in_flight, in_flight_cluster, one_client, seed_style
}
criterion_main!(benches);
