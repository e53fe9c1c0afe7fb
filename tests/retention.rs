//! Retention against a real etcd: the primary trims old batches in a fenced transaction with
//! the `trimmed` pointer, never below what a live standby needs (within the byte budget), and
//! compacts revisions behind; a standby the log was trimmed past knows it needs a snapshot.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{node, received, start_primary};
use etcd_client::{GetOptions, PutOptions};
use fencelog::etcd::fetch::BatchPages;
use fencelog::etcd::trim::{read_trimmed, trim, Retention, TrimOutcome};
use fencelog::keys::KeyLayout;
use fencelog::lifecycle::State;
use fencelog::metrics::Metrics;
use fencelog::primary::Primary;
use fencelog::record::{Epoch, Seq};
use fencelog::standby::membership::MemberInfo;
use fencelog::standby::{Standby, StandbyConfig};
use fencelog::workload::RecordGenerator;

const WAIT: Duration = Duration::from_secs(20);

fn layout() -> KeyLayout {
    KeyLayout::new(&common::CLUSTER.parse().unwrap())
}

/// Quick trims: every 100 ms, keeping `retain_records` and no time window.
fn retention(retain_records: u64, max_etcd_log_bytes: u64) -> Retention {
    Retention {
        retain_records,
        retain_seconds: 0,
        max_etcd_log_bytes,
        interval: Duration::from_millis(100),
        compact: true,
    }
}

/// `appends` appends of 100 records (one batch each when appended one at a time).
async fn append(primary: &Primary, appends: usize) -> Seq {
    let mut generator = RecordGenerator::new(7, 10_000, 256);
    let mut last = Seq::NONE;
    for _ in 0..appends {
        last = primary
            .append(generator.take_records(100))
            .await
            .unwrap()
            .last_seq;
    }
    last
}

/// Waits until etcd's `trimmed` passes `seq`; returns it.
async fn trimmed_past(etcd: &common::EtcdProcess, seq: Seq) -> Seq {
    let client = common::client(etcd).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let trimmed = read_trimmed(&client, &layout(), WAIT).await.unwrap();
        if trimmed > seq {
            return trimmed;
        }
        assert!(Instant::now() < deadline, "trimmed stayed at {trimmed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Once trimming went past `seq`, the trimmed seq after it has stayed put for a second: the
/// primary trims in steps while it catches up, and a batch listing is only comparable with a
/// trimmed seq no step has moved since.
async fn settled_trim_past(etcd: &common::EtcdProcess, seq: Seq) -> Seq {
    let mut trimmed = trimmed_past(etcd, seq).await;
    let client = common::client(etcd).await;
    let deadline = Instant::now() + WAIT;
    let mut stable_since = Instant::now();
    while stable_since.elapsed() < Duration::from_secs(1) {
        assert!(Instant::now() < deadline, "trimming never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = read_trimmed(&client, &layout(), WAIT).await.unwrap();
        if now != trimmed {
            (trimmed, stable_since) = (now, Instant::now());
        }
    }
    trimmed
}

/// The first seqs of the batches still in etcd.
async fn batch_keys(etcd: &common::EtcdProcess) -> Vec<Seq> {
    let layout = layout();
    let response = common::client(etcd)
        .await
        .get(
            layout.batches_prefix(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .unwrap();
    response
        .kvs()
        .iter()
        .map(|kv| layout.parse_batch_key(kv.key()).unwrap())
        .collect()
}

/// Registers a standby at `received` under a lease of its own, as a live standby would.
async fn register_member(etcd: &common::EtcdProcess, name: &str, received: Seq) -> i64 {
    let mut client = common::client(etcd).await;
    let lease = client.lease_grant(60, None).await.unwrap().id();
    let info = MemberInfo {
        received_seq: received,
        applied_seq: received,
    };
    client
        .put(
            layout().member(&name.parse().unwrap()),
            info.encode(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    lease
}

/// The revision a read of the member registrations sees now.
async fn members_revision(etcd: &common::EtcdProcess) -> i64 {
    let response = common::client(etcd)
        .await
        .get(
            layout().members_prefix(),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    response
        .header()
        .expect("etcd answers with a header")
        .revision()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_primary_trims_old_batches_and_keeps_the_retained_tail() {
    let etcd = common::etcd().await;
    let mut primary_node = node("primary");
    primary_node.config.retention = retention(1_000, u64::MAX);
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    let last = append(&primary, 50).await;

    let trimmed = settled_trim_past(&etcd, Seq(3_000)).await;
    let keys = batch_keys(&etcd).await;
    assert_eq!(
        keys.first(),
        Some(&trimmed),
        "the oldest batch left starts at trimmed"
    );
    assert!(
        trimmed.0 <= last.0 - 1_000 + 1,
        "at least 1,000 records are kept"
    );
    assert_eq!(common::latest(&etcd).await.unwrap().last_seq, last);
    primary.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_standby_holds_trimming_back_until_its_lease_expires() {
    let etcd = common::etcd().await;
    let mut primary_node = node("primary");
    primary_node.config.retention = retention(100, u64::MAX);
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    let lease = register_member(&etcd, "lagging", Seq(1_000)).await;
    append(&primary, 50).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let trimmed = read_trimmed(&common::client(&etcd).await, &layout(), WAIT)
        .await
        .unwrap();
    assert_eq!(
        trimmed,
        Seq(1_001),
        "trimmed exactly to what the standby needs next"
    );

    common::client(&etcd)
        .await
        .lease_revoke(lease)
        .await
        .unwrap();
    trimmed_past(&etcd, Seq(4_000)).await;
    primary.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_byte_budget_the_oldest_batches_go_even_if_a_standby_needs_them() {
    let etcd = common::etcd().await;
    let mut primary_node = node("primary");
    // About ten 100-record batches of compressed 256-byte records.
    primary_node.config.retention = retention(100, 100_000);
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    register_member(&etcd, "lagging", Seq(100)).await;
    append(&primary, 50).await;
    // The standby at seq 100 would hold everything back; the budget moves past it (in one
    // trim or several: the primary's index of batches may trail its commits under load).
    let deadline = Instant::now() + WAIT;
    loop {
        let kept = batch_keys(&etcd).await.len();
        if kept <= 15 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{kept} batches of ~8 KB kept under a 100 KB budget"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    trimmed_past(&etcd, Seq(2_000)).await;
    primary.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deposed_primary_cannot_trim() {
    let etcd = common::etcd().await;
    let primary_node = node("primary");
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    append(&primary, 5).await;
    let stale = Epoch(primary.epoch().0 - 1);
    let client = common::client(&etcd).await;
    let now = members_revision(&etcd).await;
    let refused = trim(&client, &layout(), stale, Seq(301), now, WAIT).await;
    assert!(
        matches!(refused, Err(fencelog::Error::Fenced { .. })),
        "{refused:?}"
    );
    assert_eq!(batch_keys(&etcd).await.len(), 5, "nothing was deleted");
    assert_eq!(
        read_trimmed(&client, &layout(), WAIT).await.unwrap(),
        Seq(1)
    );
    primary.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trim_decided_before_a_member_registered_deletes_nothing() {
    let etcd = common::etcd().await;
    let primary = start_primary(&etcd, &node("primary")).await.unwrap();
    append(&primary, 5).await;
    let client = common::client(&etcd).await;
    let decided_at = members_revision(&etcd).await;
    register_member(&etcd, "late", Seq::NONE).await;

    let outcome = trim(
        &client,
        &layout(),
        primary.epoch(),
        Seq(301),
        decided_at,
        WAIT,
    )
    .await;
    assert_eq!(outcome.unwrap(), TrimOutcome::MembersMoved);
    assert_eq!(batch_keys(&etcd).await.len(), 5, "nothing was deleted");
    assert_eq!(
        read_trimmed(&client, &layout(), WAIT).await.unwrap(),
        Seq(1)
    );

    let now = members_revision(&etcd).await;
    let outcome = trim(&client, &layout(), primary.epoch(), Seq(301), now, WAIT).await;
    assert!(
        matches!(outcome, Ok(TrimOutcome::Trimmed { .. })),
        "{outcome:?}"
    );
    assert_eq!(
        read_trimmed(&client, &layout(), WAIT).await.unwrap(),
        Seq(301)
    );
    primary.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_read_from_trimmed_sees_one_moment_though_a_trim_runs_under_it() {
    let etcd = common::etcd().await;
    let primary = start_primary(&etcd, &node("primary")).await.unwrap();
    append(&primary, 5).await;
    let client = common::client(&etcd).await;
    let limits = fencelog::limits::Limits::default();
    let (trimmed, mut pages) = BatchPages::from_trimmed(&client, &layout(), &limits, WAIT)
        .await
        .unwrap();

    let now = members_revision(&etcd).await;
    let outcome = trim(&client, &layout(), primary.epoch(), Seq(301), now, WAIT).await;
    assert!(
        matches!(outcome, Ok(TrimOutcome::Trimmed { .. })),
        "{outcome:?}"
    );
    let mut firsts = Vec::new();
    while let Some(page) = pages.next_page().await.unwrap() {
        firsts.extend(page.iter().map(|batch| batch.first_seq().0));
    }
    assert_eq!(trimmed, Seq(1));
    assert_eq!(firsts, [1, 101, 201, 301, 401], "the batches as they were");
    primary.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn revisions_behind_the_trims_are_compacted() {
    let etcd = common::etcd().await;
    let mut primary_node = node("primary");
    primary_node.config.retention = retention(100, u64::MAX);
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    let mut client = common::client(&etcd).await;
    for round in 1..=3 {
        append(&primary, 10).await;
        trimmed_past(&etcd, Seq(1_000 * round - 200)).await;
    }
    let old = client
        .get(layout().latest(), Some(GetOptions::new().with_revision(2)))
        .await;
    assert!(
        old.is_err_and(|e| e.to_string().contains("compacted")),
        "revision 2 is still readable"
    );
    primary.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_the_log_was_trimmed_past_needs_a_snapshot() {
    let etcd = common::etcd().await;
    let mut primary_node = node("primary");
    primary_node.config.retention = retention(100, u64::MAX);
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    append(&primary, 20).await;
    trimmed_past(&etcd, Seq(1_000)).await;

    let standby_node = node("standby");
    let mut config =
        StandbyConfig::new(common::CLUSTER.parse().unwrap(), "standby".parse().unwrap());
    config.recovery_retry = Duration::from_secs(60);
    let standby = Standby::start(
        common::client(&etcd).await,
        standby_node.store.clone(),
        config,
        Arc::new(Metrics::new().unwrap()),
    )
    .await
    .unwrap();
    let state = tokio::time::timeout(WAIT, standby.wait_state(State::NeedsSnapshot)).await;
    assert_eq!(
        state.unwrap(),
        State::NeedsSnapshot,
        "{:?}",
        standby.status()
    );
    assert!(standby.status().detail.contains("needs a snapshot"));
    assert_eq!(
        standby.received_seq(),
        Seq::NONE,
        "nothing was received around the gap"
    );
    standby.shutdown().await.unwrap();

    primary.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_following_standby_is_never_trimmed_past() {
    let etcd = common::etcd().await;
    let mut primary_node = node("primary");
    primary_node.config.retention = retention(0, u64::MAX);
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    let standby_node = node("standby");
    let standby = Standby::start(
        common::client(&etcd).await,
        standby_node.store.clone(),
        StandbyConfig::new(common::CLUSTER.parse().unwrap(), "standby".parse().unwrap()),
        Arc::new(Metrics::new().unwrap()),
    )
    .await
    .unwrap();
    for _ in 0..5 {
        let last = append(&primary, 10).await;
        received(&standby, last).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(standby.state(), State::Watching, "{:?}", standby.history());
    assert!(
        read_trimmed(&common::client(&etcd).await, &layout(), WAIT)
            .await
            .unwrap()
            > Seq(1)
    );
    standby.shutdown().await.unwrap();
    primary.shutdown().await.unwrap();
}

/// Records for the long-load test: `FENCELOG_LONG_RECORDS`, default 300,000 (the figures in
/// `docs/OPERATIONS.md` come from a run with 5,000,000 in a release build).
fn long_records() -> u64 {
    std::env::var("FENCELOG_LONG_RECORDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300_000)
}

#[tokio::test(flavor = "multi_thread")]
async fn under_a_long_load_etcd_stays_bounded_and_trimmed_advances() {
    let etcd = common::etcd().await;
    let mut primary_node = node("primary");
    primary_node.config.retention = Retention {
        retain_records: 10_000,
        retain_seconds: 0,
        max_etcd_log_bytes: 4 << 20,
        interval: Duration::from_millis(200),
        compact: true,
    };
    let metrics = Arc::new(Metrics::new().unwrap());
    let primary = Arc::new(
        Primary::start(
            common::client(&etcd).await,
            primary_node.store.clone(),
            primary_node.config.clone(),
            metrics.clone(),
        )
        .await
        .unwrap(),
    );
    let records = long_records();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(600);
    let producers: Vec<_> = (0..16)
        .map(|p| {
            let (primary, next) = (primary.clone(), next.clone());
            tokio::spawn(async move {
                let mut generator = RecordGenerator::new(p, 1_000_000, 256);
                while next.fetch_add(64, std::sync::atomic::Ordering::Relaxed) < records
                    && Instant::now() < deadline
                {
                    primary.append(generator.take_records(64)).await.unwrap();
                }
            })
        })
        .collect();
    let mut status_client = common::client(&etcd).await;
    let mut largest_db = 0;
    while !producers.iter().all(|p| p.is_finished()) {
        let status = status_client.status().await.unwrap();
        largest_db = largest_db.max(status.db_size());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for producer in producers {
        producer.await.unwrap();
    }
    let committed_bytes = metrics.batch_bytes.get_sample_sum() as i64;
    let last = common::latest(&etcd).await.unwrap().last_seq;
    let trimmed = trimmed_past(&etcd, Seq(last.0.saturating_sub(200_000))).await;
    println!(
        "{last} records, {committed_bytes} bytes of batches committed; etcd db at most {largest_db} bytes; trimmed {trimmed}"
    );
    assert!(
        largest_db < committed_bytes / 2 && largest_db < 256 << 20,
        "etcd's db reached {largest_db} bytes for {committed_bytes} committed"
    );
    Arc::into_inner(primary).unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_whose_local_log_starts_after_trimmed_trims_only_what_its_log_proves() {
    let etcd = common::etcd().await;
    let mut first_node = node("first");
    first_node.config.retention = retention(0, u64::MAX);
    first_node.config.retention.interval = Duration::from_secs(3600);
    let first = start_primary(&etcd, &first_node).await.unwrap();
    append(&first, 20).await;
    first.shutdown().await.unwrap();

    // The next leader's log starts at seq 1,501 (as after a snapshot, or local retention),
    // while etcd holds the log from seq 1 and a live standby still needs seq 101.
    let mut next_node = node("next");
    next_node.config.retention = retention(0, u64::MAX);
    let next = start_primary(&etcd, &next_node).await.unwrap();
    next.shutdown().await.unwrap();
    while next_node.store.apply_next().unwrap().is_some() {}
    assert_eq!(
        next_node
            .store
            .apply_retention(500, u64::MAX, Seq(u64::MAX))
            .unwrap(),
        Some(Seq(1_501))
    );
    register_member(&etcd, "lagging", Seq(100)).await;
    let next = start_primary(&etcd, &next_node).await.unwrap();
    append(&next, 5).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let trimmed = read_trimmed(&common::client(&etcd).await, &layout(), WAIT)
        .await
        .unwrap();
    assert!(
        trimmed <= Seq(101),
        "trimmed to {trimmed}: past what the standby needs (cut back to the leader's first local batch?)"
    );
    next.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn local_retention_never_drops_a_batch_etcd_still_holds() {
    let etcd = common::etcd().await;
    let mut primary_node = node("primary");
    primary_node.config.retention = retention(0, u64::MAX);
    primary_node.config.retention.interval = Duration::from_secs(3600);
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    append(&primary, 20).await;
    primary.shutdown().await.unwrap();
    let store = &primary_node.store;
    while store.apply_next().unwrap().is_some() {}
    let etcd_trimmed = read_trimmed(&common::client(&etcd).await, &layout(), WAIT)
        .await
        .unwrap();
    assert_eq!(etcd_trimmed, Seq(1));
    assert_eq!(
        store.apply_retention(500, u64::MAX, etcd_trimmed).unwrap(),
        None,
        "etcd holds every batch still: the node may lead and must have them"
    );
    assert_eq!(
        store.apply_retention(500, u64::MAX, Seq(1_001)).unwrap(),
        Some(Seq(1_001)),
        "batches below etcd's trimmed may go"
    );
}
