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
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use etcd_client::Client;
use fencelog::bench::standby::{fill, receive, warm_restart};
use fencelog::etcd::process::EtcdProcess;
use fencelog::local_store::LocalStore;
use fencelog::record::Seq;

fn records() -> u64 {
    std::env::var("FENCELOG_BENCH_RECORDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(200_000)
}

/// Time for a standby on an empty store to receive the log through `last` (and, with
/// `apply`, to apply all of it).
fn from_empty(rt: &tokio::runtime::Runtime, client: &Client, last: Seq, apply: bool) -> Duration {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(LocalStore::open(dir.path(), Default::default()).expect("store"));
    rt.block_on(receive(client, &store, last, apply))
        .expect("receives the log")
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
    let client = rt
        .block_on(fencelog::etcd::connect(
            &[etcd.endpoint().to_owned()],
            Duration::from_secs(5),
        ))
        .expect("etcd answers");
    let primary_dir = tempfile::tempdir().expect("temp dir");
    let last = rt
        .block_on(fill(&client, primary_dir.path(), records()))
        .expect("fills the log");
    let mut group = c.benchmark_group("standby");
    group.throughput(Throughput::Elements(last.0));

    group.bench_function("catch_up", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| from_empty(&rt, &client, last, false))
                .sum()
        })
    });
    group.bench_function("full_replay", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| from_empty(&rt, &client, last, true))
                .sum()
        })
    });

    let warm_dir = tempfile::tempdir().expect("temp dir");
    let warm_store =
        Arc::new(LocalStore::open(warm_dir.path(), Default::default()).expect("store"));
    rt.block_on(receive(&client, &warm_store, last, true))
        .expect("receives the log");
    group.throughput(Throughput::Elements(1));
    group.bench_function("warm_restart", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    rt.block_on(warm_restart(&client, &warm_store))
                        .expect("restarts")
                })
                .sum()
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().without_plots().sample_size(10).measurement_time(Duration::from_secs(10)).warm_up_time(Duration::from_secs(1));
    targets = standby_benches
}
criterion_main!(benches);
