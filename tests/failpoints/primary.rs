//! The primary's retention paths, forced with fail points against a real etcd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common;
use common::node;
use fail::FailScenario;
use fencelog::etcd::trim::Retention;
use fencelog::keys::KeyLayout;
use fencelog::metrics::Metrics;
use fencelog::primary::Primary;
use fencelog::workload::RecordGenerator;

const WAIT: Duration = Duration::from_secs(20);

/// Waits, bounded, until `done` holds.
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A term that ended between its fenced trim and the compaction behind it does not compact:
/// compaction is etcd-wide and cannot be fenced, so only a term that surely leads runs it. The
/// trimmer is paused before its first compaction (after its second trim) while the term is
/// deposed, and let go only once the term knows it ended — nothing then stops it but the check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_term_that_ended_between_its_trim_and_the_compaction_does_not_compact() {
    let scenario = FailScenario::setup();
    let etcd = common::etcd().await;
    let mut pieces = node("p1");
    pieces.config.retention = Retention {
        retain_records: 100,
        retain_seconds: 0,
        interval: Duration::from_millis(100),
        compact: true,
        ..Retention::default()
    };
    let paused = common::FailPoint::set("trimmer::pause_before_compact", "1*off->pause");
    let metrics = Arc::new(Metrics::new().unwrap());
    let client = common::client(&etcd).await;
    let primary = Arc::new(
        Primary::start(
            client.clone(),
            pieces.store.clone(),
            pieces.config.clone(),
            metrics.clone(),
        )
        .await
        .unwrap(),
    );
    let appending = Arc::new(AtomicBool::new(true));
    let load = tokio::spawn({
        let (primary, appending) = (primary.clone(), appending.clone());
        async move {
            let mut generator = RecordGenerator::new(1, 100, 64);
            for _ in 0..5_000 {
                if !appending.load(Ordering::Relaxed)
                    || primary.append(generator.take_records(10)).await.is_err()
                {
                    return;
                }
            }
        }
    });
    wait_until("the trimmer trimmed twice", || metrics.trims.get() >= 2).await;
    appending.store(false, Ordering::Relaxed);
    load.await.unwrap();

    let layout = KeyLayout::new(&common::CLUSTER.parse().unwrap());
    let deposed = fencelog::etcd::leadership::depose(&client, &layout, WAIT).await;
    assert!(deposed.unwrap().is_some(), "the primary led until deposed");
    wait_until("the term knew it ended", || !primary.is_leading()).await;
    drop(paused);
    // The trimmer runs on to its compaction, or not, within a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(
        metrics.compactions.get(),
        0,
        "a term that ended compacted etcd"
    );
    let early = client
        .kv_client()
        .get(
            layout.latest(),
            Some(etcd_client::GetOptions::new().with_revision(3)),
        )
        .await;
    assert!(
        early.is_ok(),
        "etcd's history was compacted: {:?}",
        early.err()
    );
    primary.shutdown().await.ok();
    scenario.teardown();
}
