//! The standby's follower against a real etcd: catch-up, live tail, warm restart, damaged
//! batches, etcd restarts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{node, received, start_primary};
use fencelog::batch::{Batch, BatchEncoder, HEADER_LEN};
use fencelog::keys::KeyLayout;
use fencelog::lifecycle::State;
use fencelog::limits::Limits;
use fencelog::local_store::LocalStore;
use fencelog::metrics::Metrics;
use fencelog::pointer::CommitPointer;
use fencelog::record::{Epoch, Record, Seq};
use fencelog::standby::membership::{members, MemberInfo};
use fencelog::standby::{Standby, StandbyConfig};
use fencelog::workload::RecordGenerator;

const WAIT: Duration = Duration::from_secs(20);

async fn start_standby(
    etcd: &common::EtcdProcess,
    store: &Arc<LocalStore>,
) -> (Standby, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new().unwrap());
    let mut config =
        StandbyConfig::new(common::CLUSTER.parse().unwrap(), "standby".parse().unwrap());
    config.recovery_retry = Duration::from_millis(300);
    let standby = Standby::start(
        common::client(etcd).await,
        store.clone(),
        config,
        metrics.clone(),
    )
    .await
    .unwrap();
    (standby, metrics)
}

/// Appends `batches` appends of `per_append` records; returns the last acked seq.
async fn append(
    primary: &fencelog::primary::Primary,
    seed: u64,
    batches: usize,
    per_append: usize,
) -> Seq {
    let mut generator = RecordGenerator::new(seed, 300, 256);
    let mut last = Seq::NONE;
    for _ in 0..batches {
        last = primary
            .append(generator.take_records(per_append))
            .await
            .unwrap()
            .last_seq;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_catches_up_from_empty_then_follows_the_live_tail() {
    let etcd = common::etcd().await;
    let primary_node = node("primary");
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    let before = append(&primary, 1, 30, 20).await;

    let standby_node = node("standby");
    let (standby, _) = start_standby(&etcd, &standby_node.store).await;
    received(&standby, before).await;
    let after = append(&primary, 2, 30, 20).await;
    received(&standby, after).await;
    assert_eq!(standby.state(), State::Watching);

    primary.wait_applied(after).await;
    standby.wait_applied(after).await;
    assert_eq!(
        standby_node.store.state_digest().unwrap(),
        primary_node.store.state_digest().unwrap()
    );
    let (copy, original) = (
        standby_node.store.read(Seq(1), 10_000, usize::MAX).unwrap(),
        primary_node.store.read(Seq(1), 10_000, usize::MAX).unwrap(),
    );
    assert!(
        copy.len() == original.len() && copy == original,
        "the standby's log differs from the primary's"
    );
    standby.shutdown().await.unwrap();
    primary.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_standby_reads_only_the_tail_it_missed() {
    let etcd = common::etcd().await;
    let primary_node = node("primary");
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    let first = append(&primary, 1, 40, 10).await;
    let standby_node = node("standby");
    let (standby, _) = start_standby(&etcd, &standby_node.store).await;
    received(&standby, first).await;
    standby.shutdown().await.unwrap();

    let tail = append(&primary, 2, 5, 10).await;
    let (standby, metrics) = start_standby(&etcd, &standby_node.store).await;
    received(&standby, tail).await;
    assert_eq!(
        metrics.received_batches.get(),
        5,
        "a warm restart fetched more than the tail"
    );
    standby.wait_applied(tail).await;
    primary.wait_applied(tail).await;
    assert_eq!(
        standby_node.store.state_digest().unwrap(),
        primary_node.store.state_digest().unwrap()
    );
    standby.shutdown().await.unwrap();
    primary.shutdown().await.unwrap();
}

/// `batch` as an encoder with `limits` writes it.
fn encode(batch: &Batch, limits: Limits) -> Vec<u8> {
    BatchEncoder::new(limits, 1)
        .unwrap()
        .encode(batch)
        .unwrap()
        .into_bytes()
}

/// Writes `bytes` as `batch`'s key and moves `latest` over it, straight into etcd, as no fenced
/// commit would: how hostile or damaged batches get there in these tests.
async fn write_past_the_fence(
    client: &mut etcd_client::Client,
    layout: &KeyLayout,
    batch: &Batch,
    bytes: Vec<u8>,
) {
    client
        .put(layout.batch(batch.first_seq()), bytes, None)
        .await
        .unwrap();
    let pointer = CommitPointer {
        last_seq: batch.last_seq(),
        epoch: batch.epoch(),
        batch_first_seq: batch.first_seq(),
    };
    client
        .put(layout.latest(), pointer.encode(), None)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_batch_stops_the_standby_at_the_last_good_seq_until_it_is_repaired() {
    let etcd = common::etcd().await;
    let primary_node = node("primary");
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    let good = append(&primary, 1, 10, 10).await;
    primary.shutdown().await.unwrap();

    // The next batch as a writer would commit it, and the same bytes damaged after the fact.
    let layout = KeyLayout::new(&common::CLUSTER.parse().unwrap());
    let records = RecordGenerator::new(5, 300, 256).take_records(10);
    let batch = Batch::new(Epoch(99), good.next().unwrap(), records).unwrap();
    let valid = encode(&batch, Limits::default());
    let mut damaged = valid.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x5A;
    let mut client = common::client(&etcd).await;
    write_past_the_fence(&mut client, &layout, &batch, damaged).await;

    let standby_node = node("standby");
    let (standby, metrics) = start_standby(&etcd, &standby_node.store).await;
    tokio::time::timeout(WAIT, standby.wait_state(State::Recovering))
        .await
        .unwrap();
    let status = standby.status();
    assert!(
        status.detail.contains(&format!("stopped at seq {good}")),
        "{status:?}"
    );
    assert_eq!(status.received_seq, good);
    assert_eq!(standby.wait_applied(good).await, good);
    assert_eq!(
        standby_node.store.positions().unwrap().log_end_seq,
        good,
        "the damaged batch reached the log"
    );
    assert!(metrics
        .render()
        .contains("fencelog_state{state=\"recovering\"} 1"));

    client
        .put(layout.batch(batch.first_seq()), valid, None)
        .await
        .unwrap();
    received(&standby, batch.last_seq()).await;
    tokio::time::timeout(WAIT, standby.wait_state(State::Watching))
        .await
        .unwrap();
    standby.shutdown().await.unwrap();
}

/// Byte offsets of header fields (see `fencelog::batch`).
const VERSION_AT: usize = 4;
const UNCOMPRESSED_LEN_AT: usize = 28;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_batches_written_into_etcd_are_refused_and_never_applied() {
    let etcd = common::etcd().await;
    let primary_node = node("primary");
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    let good = append(&primary, 1, 10, 10).await;
    let epoch = primary.epoch();
    primary.shutdown().await.unwrap();

    let next = good.next().unwrap();
    let records = RecordGenerator::new(5, 300, 256).take_records(10);
    let batch = Batch::new(epoch, next, records.clone()).unwrap();
    let valid = encode(&batch, Limits::default());
    let with_header = |edit: &dyn Fn(&mut Vec<u8>), body: &[u8]| {
        let mut bytes = valid[..HEADER_LEN].to_vec();
        edit(&mut bytes);
        bytes.extend_from_slice(body);
        bytes
    };
    let set_u32 = |at: usize, value: u32| {
        move |bytes: &mut Vec<u8>| bytes[at..at + 4].copy_from_slice(&value.to_le_bytes())
    };
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
    let huge_key = Limits {
        max_key_bytes: 8192,
        ..Limits::default()
    };
    let mut flipped = valid.clone();
    flipped[valid.len() / 2] ^= 0x10;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a flipped bit", flipped, "checksum"),
        ("truncated", valid[..valid.len() / 2].to_vec(), "decompress"),
        ("empty", Vec::new(), "shorter than the 48-byte batch header"),
        (
            "garbage",
            (0..600u32).map(|i| (i * 7919 % 251) as u8).collect(),
            "magic",
        ),
        (
            "an unknown version",
            with_header(&set_u32(VERSION_AT, 9), &valid[HEADER_LEN..]),
            "version 9",
        ),
        (
            "a decompression bomb (64 MiB of zeros announced as 4 KiB)",
            with_header(&set_u32(UNCOMPRESSED_LEN_AT, 4096), &bomb),
            "decompress",
        ),
        (
            "a body announced past the uncompressed limit",
            with_header(&set_u32(UNCOMPRESSED_LEN_AT, u32::MAX), &bomb),
            "uncompressed",
        ),
        (
            "over the encoded size limit",
            with_header(&|_| {}, &vec![7u8; Limits::default().max_batch_bytes]),
            "over the limit",
        ),
        (
            "a key past the key limit",
            encode(
                &Batch::new(epoch, next, vec![Record::put(vec![b'k'; 6000], "v")]).unwrap(),
                huge_key,
            ),
            "key",
        ),
        (
            "an epoch older than the one before it",
            encode(
                &Batch::new(Epoch(epoch.0 - 1), next, records.clone()).unwrap(),
                Limits::default(),
            ),
            "older than epoch",
        ),
        (
            "a first seq that is not its key's",
            encode(
                &Batch::new(epoch, Seq(next.0 + 5), records.clone()).unwrap(),
                Limits::default(),
            ),
            "seq",
        ),
    ];

    let layout = KeyLayout::new(&common::CLUSTER.parse().unwrap());
    let mut client = common::client(&etcd).await;
    for (index, (case, bytes, reason)) in cases.into_iter().enumerate() {
        write_past_the_fence(&mut client, &layout, &batch, bytes).await;
        let standby_node = node(&format!("standby-{index}"));
        let (standby, _) = start_standby(&etcd, &standby_node.store).await;
        tokio::time::timeout(WAIT, standby.wait_state(State::Recovering))
            .await
            .unwrap_or_else(|_| panic!("{case}: not refused; {:?}", standby.status()));
        let status = standby.status();
        assert!(
            status.detail.to_lowercase().contains(reason),
            "{case}: the reason does not say {reason:?}: {}",
            status.detail
        );
        assert_eq!(status.received_seq, good, "{case}");
        assert_eq!(standby.wait_applied(good).await, good, "{case}");
        assert_eq!(
            standby_node.store.positions().unwrap().log_end_seq,
            good,
            "{case}: the batch reached the log"
        );
        println!("{case}: refused: {}", status.detail);
        standby.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_survives_an_etcd_restart_without_a_gap() {
    let mut etcd = common::etcd().await;
    let primary_node = node("primary");
    let metrics = Arc::new(Metrics::new().unwrap());
    let service = fencelog::primary::PrimaryService::spawn(
        common::client(&etcd).await,
        primary_node.store.clone(),
        primary_node.config.clone(),
        metrics,
    );
    service.leading().await.unwrap();
    let standby_node = node("standby");
    let (standby, standby_metrics) = start_standby(&etcd, &standby_node.store).await;
    let mut generator = RecordGenerator::new(3, 300, 256);
    let mut last = Seq::NONE;
    for _ in 0..20 {
        last = service
            .append(generator.take_records(10))
            .await
            .unwrap()
            .last_seq;
    }
    received(&standby, last).await;

    etcd.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.restart().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut appended = 0;
    while appended < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the primary never came back"
        );
        match service.append(generator.take_records(10)).await {
            Ok(ack) => {
                last = ack.last_seq;
                appended += 1;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    received(&standby, last).await;
    assert!(standby_metrics.watch_reconnects.get() >= 1);
    // etcd is the truth: the standby's log must be exactly its committed log, no gap.
    let in_etcd = common::committed_records(&etcd).await;
    let in_standby = standby_node
        .store
        .read(Seq(1), 100_000, usize::MAX)
        .unwrap();
    assert_eq!(
        in_standby.len(),
        in_etcd.len(),
        "the standby's log and etcd's differ in length"
    );
    assert!(
        in_standby == in_etcd,
        "the standby's log differs from etcd's"
    );
    standby.shutdown().await.unwrap();
    service.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_registers_its_positions_and_deregisters_on_shutdown() {
    let etcd = common::etcd().await;
    let primary_node = node("primary");
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    let last = append(&primary, 1, 10, 10).await;
    let standby_node = node("standby");
    let (standby, _) = start_standby(&etcd, &standby_node.store).await;
    received(&standby, last).await;
    standby.wait_applied(last).await;

    let client = common::client(&etcd).await;
    let layout = KeyLayout::new(&common::CLUSTER.parse().unwrap());
    let deadline = tokio::time::Instant::now() + WAIT;
    let registered = loop {
        let members = members(&client, &layout, Duration::from_secs(2))
            .await
            .unwrap();
        if let Some((_, info)) = members
            .iter()
            .find(|(name, info)| name == "standby" && info.applied_seq == last)
        {
            break *info;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "registration never showed {last}: {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        registered,
        MemberInfo {
            received_seq: last,
            applied_seq: last
        }
    );

    standby.shutdown().await.unwrap();
    assert!(
        members(&client, &layout, Duration::from_secs(2))
            .await
            .unwrap()
            .is_empty(),
        "still registered"
    );
    primary.shutdown().await.unwrap();
}
