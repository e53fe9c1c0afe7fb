//! A standby against a real etcd (started by the bench), 256-byte records in batches of 1024:
//! - `catch_up`: an empty store receives the whole committed log from etcd (read by key range,
//!   verified, appended) — the receive rate, which must exceed the primary's commit rate;
//! - `full_replay`: an empty store receives the whole log and applies all of it — what a
//!   restart would cost without the persisted positions;
//! - `warm_restart`: a standby whose store already holds the log restarts and reaches
//!   `Watching` — it reads only the (empty) tail, so this is the restart cost alone.
//!
//! The log holds `FENCELOG_BENCH_RECORDS` records (default 200,000; 1,000,000 for the figure in
//! docs/BENCHMARKS.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fencelog::config::PrimaryConfig;
use fencelog::etcd::process::EtcdProcess;
use fencelog::local_store::LocalStore;
use fencelog::metrics::Metrics;
use fencelog::primary::Primary;
use fencelog::record::Seq;
use fencelog::standby::lifecycle::State;
use fencelog::standby::{Standby, StandbyConfig};
use fencelog::workload::RecordGenerator;

fn records() -> u64 {
    std::env::var("FENCELOG_BENCH_RECORDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(200_000)
}

/// Commits `records` records through a primary; returns the last seq.
async fn fill(etcd: &EtcdProcess, records: u64) -> Seq {
    let client = fencelog::etcd::connect(&[etcd.endpoint().to_owned()], Duration::from_secs(5))
        .await
        .expect("etcd answers");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(LocalStore::open(dir.path(), Default::default()).expect("store"));
    let config = PrimaryConfig::new(
        "bench".parse().unwrap(),
        "primary".parse().unwrap(),
        "127.0.0.1:1",
    );
    let primary = Arc::new(
        Primary::start(
            client,
            store,
            config,
            Arc::new(Metrics::new().expect("metrics")),
        )
        .await
        .expect("leads"),
    );
    let producers: Vec<_> = (0..64u64)
        .map(|p| {
            let primary = primary.clone();
            tokio::spawn(async move {
                let mut generator = RecordGenerator::new(p + 1, 1_000_000, 256);
                for _ in 0..records.div_ceil(64 * 16) {
                    primary
                        .append(generator.take_records(16))
                        .await
                        .expect("append commits");
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.expect("producer");
    }
    let last = primary.committed_seq();
    Arc::into_inner(primary)
        .expect("producers are done")
        .shutdown()
        .await
        .expect("shuts down");
    last
}

async fn standby(etcd: &EtcdProcess, store: &Arc<LocalStore>) -> Standby {
    let client = fencelog::etcd::connect(&[etcd.endpoint().to_owned()], Duration::from_secs(5))
        .await
        .expect("etcd answers");
    let config = StandbyConfig::new("bench".parse().unwrap(), "standby".parse().unwrap());
    Standby::start(
        client,
        store.clone(),
        config,
        Arc::new(Metrics::new().expect("metrics")),
    )
    .await
    .expect("starts")
}

/// Time for a standby on an empty store to receive the log through `last` (and, with
/// `apply`, to apply all of it).
fn from_empty(
    rt: &tokio::runtime::Runtime,
    etcd: &EtcdProcess,
    last: Seq,
    apply: bool,
) -> Duration {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(LocalStore::open(dir.path(), Default::default()).expect("store"));
    rt.block_on(async {
        let started = Instant::now();
        let standby = standby(etcd, &store).await;
        standby
            .wait_received(last)
            .await
            .expect("receives the whole log");
        if apply {
            standby.wait_applied(last).await;
        }
        let elapsed = started.elapsed();
        standby.shutdown().await.expect("shuts down");
        elapsed
    })
}

fn standby_benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let etcd = rt
        .block_on(EtcdProcess::start())
        .expect("etcd starts (tools/test.sh installs it)");
    let records = records();
    let last = rt.block_on(fill(&etcd, records));
    let mut group = c.benchmark_group("standby");
    group.throughput(Throughput::Elements(last.0));

    let warm_dir = tempfile::tempdir().expect("temp dir");
    let warm_store =
        Arc::new(LocalStore::open(warm_dir.path(), Default::default()).expect("store"));
    group.bench_function("catch_up", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| from_empty(&rt, &etcd, last, false))
                .sum()
        })
    });
    group.bench_function("full_replay", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| from_empty(&rt, &etcd, last, true)).sum())
    });

    rt.block_on(async {
        let standby = standby(&etcd, &warm_store).await;
        standby
            .wait_received(last)
            .await
            .expect("receives the whole log");
        standby.wait_applied(last).await;
        standby.shutdown().await.expect("shuts down");
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("warm_restart", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(async {
                    let started = Instant::now();
                    let standby = standby(&etcd, &warm_store).await;
                    standby.wait_state(State::Watching).await;
                    let elapsed = started.elapsed();
                    standby.shutdown().await.expect("shuts down");
                    elapsed
                });
            }
            total
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(10)).warm_up_time(Duration::from_secs(1));
    targets = standby_benches
}
criterion_main!(benches);
