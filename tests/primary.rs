//! The primary against a real etcd: dense seqs, acks only after commit, one revision per batch,
//! fencing, restart, etcd failures and backpressure.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{committed_records, latest, node, start_primary};
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use fencelog::batch::{Batch, BatchEncoder};
use fencelog::config::Pipeline;
use fencelog::etcd::proxy::FaultProxy;
use fencelog::keys::KeyLayout;
use fencelog::limits::Limits;
use fencelog::primary::{AppendAck, Primary, PrimaryService, StepDown};
use fencelog::record::{Epoch, Record, Seq};
use fencelog::workload::RecordGenerator;
use fencelog::Error;

fn layout() -> KeyLayout {
    KeyLayout::new(&common::CLUSTER.parse().unwrap())
}

/// `tasks` concurrent appenders, each making `appends` calls of 1–4 records; returns what each
/// call appended with its ack.
async fn append_concurrently(
    primary: &Arc<Primary>,
    tasks: u64,
    appends: usize,
) -> Vec<(AppendAck, Vec<Record>)> {
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let primary = primary.clone();
            tokio::spawn(async move {
                let mut generator = RecordGenerator::new(task + 1, 1000, 256);
                let mut acked = Vec::new();
                for i in 0..appends {
                    let records = generator.take_records(1 + i % 4);
                    let ack = primary
                        .append(records.clone())
                        .await
                        .expect("append commits");
                    acked.push((ack, records));
                }
                acked
            })
        })
        .collect();
    let mut all = Vec::new();
    for handle in handles {
        all.extend(handle.await.unwrap());
    }
    all
}

/// Asserts that the acks cover seqs 1..=n exactly once and that etcd holds each acked record
/// at its seq.
async fn assert_acks_match_etcd(etcd: &common::EtcdProcess, acked: &[(AppendAck, Vec<Record>)]) {
    let committed: BTreeMap<Seq, Record> = committed_records(etcd).await.into_iter().collect();
    let mut seqs: Vec<u64> = Vec::new();
    for (ack, records) in acked {
        assert_eq!(ack.last_seq.0 - ack.first_seq.0 + 1, records.len() as u64);
        for (i, record) in records.iter().enumerate() {
            let seq = Seq(ack.first_seq.0 + i as u64);
            assert_eq!(
                committed.get(&seq),
                Some(record),
                "acked seq {seq} differs in etcd"
            );
            seqs.push(seq.0);
        }
    }
    seqs.sort_unstable();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "acked seqs are not dense and unique from 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_dense_unique_seqs_double_buffered() {
    let etcd = common::etcd().await;
    let node = node("p1");
    let primary = Arc::new(start_primary(&etcd, &node).await.unwrap());
    let acked = append_concurrently(&primary, 8, 40).await;
    assert_acks_match_etcd(&etcd, &acked).await;
    Arc::into_inner(primary).unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_dense_unique_seqs_single_buffered() {
    let etcd = common::etcd().await;
    let mut node = node("p1");
    node.config.pipeline = Pipeline::Single;
    let primary = Arc::new(start_primary(&etcd, &node).await.unwrap());
    let acked = append_concurrently(&primary, 8, 40).await;
    assert_acks_match_etcd(&etcd, &acked).await;
    Arc::into_inner(primary).unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_is_acknowledged_only_once_etcd_has_its_batch() {
    let etcd = common::etcd().await;
    let node = node("p1");
    let primary = Arc::new(start_primary(&etcd, &node).await.unwrap());
    let checkers: Vec<_> = (0..4)
        .map(|task| {
            let primary = primary.clone();
            let endpoint = etcd.endpoint().to_owned();
            tokio::spawn(async move {
                let mut client = fencelog::etcd::connect(&[endpoint], Duration::from_secs(2))
                    .await
                    .unwrap();
                let mut generator = RecordGenerator::new(task, 100, 128);
                for _ in 0..25 {
                    let ack = primary.append(generator.take_records(2)).await.unwrap();
                    let response = client.get(layout().latest(), None).await.unwrap();
                    let pointer =
                        fencelog::pointer::CommitPointer::decode(response.kvs()[0].value())
                            .unwrap();
                    assert!(
                        pointer.last_seq >= ack.last_seq,
                        "acked {ack:?} before etcd's latest {pointer:?}"
                    );
                }
            })
        })
        .collect();
    for checker in checkers {
        checker.await.unwrap();
    }
    Arc::into_inner(primary).unwrap().shutdown().await.unwrap();
}

#[tokio::test]
async fn sequential_appends_commit_one_batch_per_etcd_revision() {
    let etcd = common::etcd().await;
    let node = node("p1");
    let primary = start_primary(&etcd, &node).await.unwrap();
    let mut client = common::client(&etcd).await;
    let revision = |r: etcd_client::GetResponse| r.header().unwrap().revision();
    let before = revision(client.get(layout().latest(), None).await.unwrap());
    let mut generator = RecordGenerator::new(1, 100, 256);
    for _ in 0..20 {
        primary.append(generator.take_records(3)).await.unwrap();
    }
    let after = revision(client.get(layout().latest(), None).await.unwrap());
    let batches = client
        .get(
            layout().batches_prefix(),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap()
        .count();
    assert_eq!(batches, 20, "sequential appends commit one batch each");
    assert_eq!(
        after - before,
        batches,
        "every batch took exactly one revision"
    );
    primary.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_deposed_primary_is_fenced_and_never_acknowledges_again() {
    let etcd = common::etcd().await;
    let mut node = node("old");
    // A long TTL keeps the keepalive from noticing first: the commit itself must be refused.
    node.config.lease_ttl = Duration::from_secs(60);
    let primary = start_primary(&etcd, &node).await.unwrap();
    primary.append(vec![Record::put("k", "v1")]).await.unwrap();

    let mut client = common::client(&etcd).await;
    let leader = client.get(layout().leader(), None).await.unwrap().kvs()[0].clone();
    client.lease_revoke(leader.lease()).await.unwrap();
    let lease = client.lease_grant(60, None).await.unwrap().id();
    let takeover = Txn::new()
        .when([Compare::create_revision(
            layout().leader(),
            CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::put(
            layout().leader(),
            "new 127.0.0.1:1",
            Some(PutOptions::new().with_lease(lease)),
        )]);
    let taken = client.txn(takeover).await.unwrap();
    assert!(taken.succeeded());
    let new_epoch = Epoch(taken.header().unwrap().revision() as u64);

    let refused = primary
        .append(vec![Record::put("k", "v2")])
        .await
        .unwrap_err();
    assert!(
        matches!(refused, Error::Fenced { epoch, leader_epoch: Some(e) } if epoch == primary.epoch() && e == new_epoch),
        "{refused}"
    );
    assert!(matches!(
        primary.stepped_down().await,
        StepDown::Fenced { .. }
    ));
    for _ in 0..5 {
        assert!(primary.append(vec![Record::put("k", "v3")]).await.is_err());
    }
    assert_eq!(
        latest(&etcd).await.unwrap().last_seq,
        Seq(1),
        "nothing after the takeover was committed"
    );
    primary.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restarted_primary_drops_its_unconfirmed_tail_and_resumes_after_the_last_commit() {
    let etcd = common::etcd().await;
    let node = node("p1");
    let first = start_primary(&etcd, &node).await.unwrap();
    for _ in 0..10 {
        first
            .append(RecordGenerator::new(1, 50, 256).take_records(10))
            .await
            .unwrap();
    }
    let old_epoch = first.epoch();
    drop(first); // a crash: no resign; the lease is still alive
    common::released(&node.store).await;

    // A batch written ahead locally whose commit never happened. (The local log may trail
    // etcd by the last acknowledged batches: the crash came before they were written.)
    let log_end = node.store.positions().unwrap().log_end_seq;
    assert!(log_end <= Seq(100));
    let mut encoder = BatchEncoder::new(Limits::default(), 1).unwrap();
    let orphan = Batch::new(
        old_epoch,
        log_end.next().unwrap(),
        vec![Record::put("orphan", "never committed")],
    )
    .unwrap();
    node.store
        .append_pending(&encoder.encode(&orphan).unwrap())
        .unwrap();

    let started = Instant::now();
    let second = start_primary(&etcd, &node).await.unwrap();
    assert!(
        started.elapsed() < node.config.lease_ttl,
        "it waited out its own old lease"
    );
    assert!(second.epoch() > old_epoch);
    let ack = second
        .append(vec![Record::put("after", "restart")])
        .await
        .unwrap();
    assert_eq!(ack.first_seq, Seq(101));
    let committed = committed_records(&etcd).await;
    assert_eq!(committed.len(), 101);
    assert_eq!(committed[100], (Seq(101), Record::put("after", "restart")));
    second.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_primary_with_an_empty_store_fetches_the_committed_log_from_etcd() {
    let etcd = common::etcd().await;
    let first_node = node("p1");
    let first = start_primary(&etcd, &first_node).await.unwrap();
    for i in 0..30 {
        first
            .append(RecordGenerator::new(i, 40, 256).take_records(7))
            .await
            .unwrap();
    }
    first.shutdown().await.unwrap();

    let second_node = node("p2");
    let second = start_primary(&etcd, &second_node).await.unwrap();
    assert_eq!(second.committed_seq(), Seq(210));
    second.wait_applied(Seq(210)).await;
    assert_eq!(
        second_node.store.state_digest().unwrap(),
        first_node.store.state_digest().unwrap()
    );
    let ack = second.append(vec![Record::delete("gone")]).await.unwrap();
    assert_eq!(ack.first_seq, Seq(211));
    second.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_waiting_primary_takes_over_as_soon_as_the_leader_resigns() {
    let etcd = common::etcd().await;
    let leader_node = node("leader");
    let leader = start_primary(&etcd, &leader_node).await.unwrap();
    leader.append(vec![Record::put("a", "1")]).await.unwrap();

    let waiting_node = node("waiting");
    let endpoint_etcd = &etcd;
    let waiting = start_primary(endpoint_etcd, &waiting_node);
    tokio::pin!(waiting);
    let early = tokio::time::timeout(Duration::from_millis(500), &mut waiting).await;
    assert!(
        early.is_err(),
        "a second primary must not lead while the first does"
    );

    leader.shutdown().await.unwrap();
    let resigned_at = Instant::now();
    let successor = tokio::time::timeout(Duration::from_secs(4), waiting)
        .await
        .expect("took over")
        .unwrap();
    assert!(resigned_at.elapsed() < Duration::from_secs(4));
    let ack = successor.append(vec![Record::put("b", "2")]).await.unwrap();
    assert_eq!(ack.first_seq, Seq(2));
    successor.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_append_larger_than_a_batch_is_refused_but_one_large_record_is_not() {
    let etcd = common::etcd().await;
    let mut node = node("p1");
    node.config.max_batch_records = 100;
    let primary = start_primary(&etcd, &node).await.unwrap();
    let too_many = primary
        .append(RecordGenerator::new(1, 10, 64).take_records(101))
        .await
        .unwrap_err();
    assert!(
        matches!(too_many, Error::AppendTooLarge { records: 101, .. }),
        "{too_many}"
    );
    let too_big = primary
        .append(vec![
            Record::put("a", vec![1; 200_000]),
            Record::put("b", vec![2; 200_000]),
        ])
        .await;
    assert!(matches!(too_big, Err(Error::AppendTooLarge { .. })));
    let oversized_value = primary
        .append(vec![Record::put("a", vec![0; (1 << 20) + 1])])
        .await;
    assert!(matches!(
        oversized_value,
        Err(Error::RecordTooLarge { part: "value", .. })
    ));

    let large = Record::put("large", vec![7; 1 << 20]);
    let ack = primary.append(vec![large.clone()]).await.unwrap();
    assert_eq!(committed_records(&etcd).await, vec![(ack.first_seq, large)]);
    primary.shutdown().await.unwrap();
}

/// Freezes etcd with one append's batch in its commit, makes a second append, and returns the
/// two appends' payload bytes and the bytes pending meanwhile; both commit once etcd runs again,
/// the second in a batch of its own.
async fn bytes_pending_behind_a_frozen_commit(pipeline: Pipeline) -> (usize, usize, usize) {
    let etcd = common::etcd().await;
    let mut node = node("p1");
    node.config.pipeline = pipeline;
    let primary = Arc::new(start_primary(&etcd, &node).await.unwrap());
    primary
        .append(vec![Record::put("warm", "up")])
        .await
        .unwrap();
    let append = |key: &'static str, len: usize| {
        let primary = primary.clone();
        tokio::spawn(async move { primary.append(vec![Record::put(key, vec![7; len])]).await })
    };

    etcd.pause().unwrap();
    let committing = append("a", 1_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = append("b", 2_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pending = primary.pending_bytes();
    etcd.resume().unwrap();

    let first = committing.await.unwrap().expect("the first append commits");
    let second = next.await.unwrap().expect("the second append commits");
    assert_eq!((first.last_seq, second.first_seq), (Seq(2), Seq(3)));
    assert_eq!(latest(&etcd).await.unwrap().batch_first_seq, Seq(3));
    Arc::into_inner(primary).unwrap().shutdown().await.unwrap();
    (1 + 1_000, 1 + 2_000, pending)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_buffered_appends_wait_outside_while_a_batch_commits() {
    let (committing, _, pending) = bytes_pending_behind_a_frozen_commit(Pipeline::Single).await;
    assert_eq!(pending, committing, "the second append was taken in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_buffered_appends_accumulate_while_a_batch_commits() {
    let (committing, next, pending) = bytes_pending_behind_a_frozen_commit(Pipeline::Double).await;
    assert_eq!(pending, committing + next, "the second append was kept out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_appends_never_exceed_the_byte_bound() {
    let etcd = common::etcd().await;
    let mut node = node("p1");
    node.config.max_pending_bytes = 1 << 20;
    let primary = Arc::new(start_primary(&etcd, &node).await.unwrap());
    primary
        .append(vec![Record::put("warm", "up")])
        .await
        .unwrap();

    etcd.pause().unwrap();
    let appenders: Vec<_> = (0..40u8)
        .map(|i| {
            let primary = primary.clone();
            tokio::spawn(async move {
                primary
                    .append(vec![Record::put(vec![i], vec![i; 100_000])])
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let pending = primary.pending_bytes();
    let early: Vec<usize> = (0..appenders.len())
        .filter(|&i| appenders[i].is_finished())
        .collect();
    etcd.resume().unwrap();

    assert!(
        pending <= 1 << 20,
        "{pending} bytes pending over a bound of 1 MiB"
    );
    assert!(
        pending >= 900_000,
        "the bound was not reached: {pending} bytes"
    );
    let mut answers = Vec::new();
    for appender in appenders {
        answers.push(appender.await.map_err(|e| e.to_string()));
    }
    let answered_early: Vec<_> = early.iter().map(|&i| &answers[i]).collect();
    assert!(
        early.is_empty(),
        "appends {early:?} completed while etcd was frozen: {answered_early:?}"
    );
    for answer in answers {
        answer
            .unwrap()
            .expect("appends complete once etcd runs again");
    }
    assert_eq!(latest(&etcd).await.unwrap().last_seq, Seq(41));
    Arc::into_inner(primary).unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_and_restarted_during_appends_loses_no_acknowledged_record() {
    etcd_killed_and_restarted_during_appends(4, |_| {}).await;
}

/// The same with eight commits in flight: 32 appenders of 3 records and batches of at most 6
/// keep the window full when etcd dies under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_and_restarted_under_a_full_window_loses_no_acknowledged_record() {
    etcd_killed_and_restarted_during_appends(32, |config| {
        config.max_commits_in_flight = 8;
        config.max_batch_records = 6;
    })
    .await;
}

/// `appenders` tasks append 3 records at a time for 4 s while etcd is killed and, 1.5 s later,
/// restarted: every acknowledged record is in etcd at its seq, etcd's log is dense from seq 1
/// with no seq twice, and `latest` points at its end.
async fn etcd_killed_and_restarted_during_appends(
    appenders: u64,
    set: impl FnOnce(&mut fencelog::config::PrimaryConfig),
) {
    let mut etcd = common::etcd().await;
    let mut node = node("p1");
    set(&mut node.config);
    let primary = Arc::new(start_primary(&etcd, &node).await.unwrap());
    let stop_at = Instant::now() + Duration::from_secs(4);
    let appenders: Vec<_> = (0..appenders)
        .map(|task| {
            let primary = primary.clone();
            tokio::spawn(async move {
                let mut generator = RecordGenerator::new(task, 500, 256);
                let (mut acked, mut failed) = (Vec::new(), 0);
                while Instant::now() < stop_at {
                    let records = generator.take_records(3);
                    match primary.append(records.clone()).await {
                        Ok(ack) => acked.push((ack, records)),
                        Err(_) => {
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                (acked, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    etcd.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    etcd.restart().await.unwrap();

    let mut acked = Vec::new();
    for appender in appenders {
        acked.extend(appender.await.unwrap().0);
    }
    assert!(!acked.is_empty());
    let in_etcd = committed_records(&etcd).await;
    let committed: BTreeMap<Seq, Record> = in_etcd.iter().cloned().collect();
    assert_eq!(committed.len(), in_etcd.len(), "a seq is in etcd twice");
    for (ack, records) in &acked {
        for (i, record) in records.iter().enumerate() {
            assert_eq!(
                committed.get(&Seq(ack.first_seq.0 + i as u64)),
                Some(record),
                "acked {ack:?} lost"
            );
        }
    }
    let last = committed.keys().next_back().copied().unwrap_or_default();
    assert_eq!(
        committed.len() as u64,
        last.0,
        "etcd's log is not dense from 1"
    );
    assert_eq!(
        latest(&etcd).await.unwrap().last_seq,
        last,
        "latest does not point at the last batch"
    );
    Arc::into_inner(primary).unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_lost_etcd_leads_again_once_etcd_returns() {
    let mut etcd = common::etcd().await;
    let mut node = node("p1");
    node.config.lease_ttl = Duration::from_secs(3);
    let metrics = Arc::new(fencelog::metrics::Metrics::new().unwrap());
    let service = PrimaryService::spawn(
        common::client(&etcd).await,
        node.store.clone(),
        node.config.clone(),
        metrics,
    );
    let first_epoch = service.leading().await.unwrap().epoch();
    let before = service
        .append(RecordGenerator::new(1, 10, 64).take_records(5))
        .await
        .unwrap();

    etcd.kill();
    // Past the lease TTL with no keepalive answered, the term must end.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        service.current().is_none(),
        "still leading with etcd gone past the lease"
    );
    assert!(matches!(
        service.append(vec![Record::put("k", "v")]).await,
        Err(Error::NotLeader { .. })
    ));

    etcd.restart().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(20), service.leading())
        .await
        .expect("leads again")
        .unwrap();
    assert!(second.epoch() > first_epoch);
    drop(second);
    let after = service
        .append(vec![Record::put("back", "again")])
        .await
        .unwrap();
    assert_eq!(after.first_seq, before.last_seq.next().unwrap());
    service.shutdown().await.unwrap();
    common::released(&node.store).await;
}

#[tokio::test]
async fn a_service_that_finds_another_leader_waits_and_refuses_appends() {
    let etcd = common::etcd().await;
    let leader_node = node("leader");
    let leader = start_primary(&etcd, &leader_node).await.unwrap();
    let other = node("other");
    let metrics = Arc::new(fencelog::metrics::Metrics::new().unwrap());
    let service = PrimaryService::spawn(
        common::client(&etcd).await,
        other.store.clone(),
        other.config.clone(),
        metrics,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(service.current().is_none());
    assert!(matches!(
        service.append(vec![Record::put("k", "v")]).await,
        Err(Error::NotLeader { .. })
    ));
    leader.append(vec![Record::put("k", "v")]).await.unwrap();
    service.shutdown().await.unwrap();
    leader.shutdown().await.unwrap();
    common::released(&other.store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_is_settled_from_etcd_and_never_written_twice() {
    let etcd = common::etcd().await;
    let mut node = node("p1");
    node.config.lease_ttl = Duration::from_secs(10);
    node.config.etcd_request_timeout = Duration::from_millis(500);
    let metrics = Arc::new(fencelog::metrics::Metrics::new().unwrap());
    let primary = Arc::new(
        Primary::start(
            common::client(&etcd).await,
            node.store.clone(),
            node.config.clone(),
            metrics.clone(),
        )
        .await
        .unwrap(),
    );
    primary
        .append(vec![Record::put("first", "1")])
        .await
        .unwrap();

    // A frozen etcd still takes requests into its socket buffer: each attempt times out
    // unanswered, and all of them run once etcd thaws. The first commits; the retry that is
    // still awaited is refused and must settle the batch as committed, not write it again.
    etcd.pause().unwrap();
    let appending = {
        let primary = primary.clone();
        tokio::spawn(async move { primary.append(vec![Record::put("second", "2")]).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    etcd.resume().unwrap();

    let ack = appending
        .await
        .unwrap()
        .expect("the append settles as committed");
    assert_eq!(ack.first_seq, Seq(2));
    assert!(
        metrics.commit_retries.get() >= 1,
        "the commit never timed out: the test proved nothing"
    );
    let committed = committed_records(&etcd).await;
    assert_eq!(
        committed,
        vec![
            (Seq(1), Record::put("first", "1")),
            (Seq(2), Record::put("second", "2"))
        ]
    );
    let next = primary
        .append(vec![Record::put("third", "3")])
        .await
        .unwrap();
    assert_eq!(next.first_seq, Seq(3));
    Arc::into_inner(primary).unwrap().shutdown().await.unwrap();
}

/// A primary `name` whose every etcd request goes through a proxy the test controls.
async fn primary_behind_proxy(
    etcd: &common::EtcdProcess,
    name: &str,
    lease_ttl: Duration,
    commit_deadline: Duration,
) -> (common::Node, FaultProxy, Arc<Primary>) {
    let proxy = FaultProxy::start(etcd.endpoint()).await.unwrap();
    let mut node = node(name);
    node.config.lease_ttl = lease_ttl;
    node.config.etcd_request_timeout = Duration::from_millis(500);
    node.config.commit_deadline = commit_deadline;
    let client =
        fencelog::etcd::connect(&[proxy.endpoint().to_owned()], Duration::from_millis(500))
            .await
            .unwrap();
    let metrics = Arc::new(fencelog::metrics::Metrics::new().unwrap());
    let primary = Primary::start(client, node.store.clone(), node.config.clone(), metrics)
        .await
        .unwrap();
    (node, proxy, Arc::new(primary))
}

/// Waits (up to 10 s) until etcd's `latest` is at `seq`.
async fn latest_reaches(etcd: &common::EtcdProcess, seq: Seq) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while latest(etcd).await.map(|p| p.last_seq) != Some(seq) {
        assert!(Instant::now() < deadline, "etcd never committed seq {seq}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_landed_before_a_new_leader_moved_on_is_acknowledged_not_fenced() {
    let etcd = common::etcd().await;
    let (_old, proxy, old) = primary_behind_proxy(
        &etcd,
        "old",
        Duration::from_secs(10),
        Duration::from_secs(10),
    )
    .await;
    old.append(vec![Record::put("first", "1")]).await.unwrap();

    // The old primary's commit of seq 2 reaches etcd, its answer does not.
    proxy.lose_answers(true);
    let appending = {
        let old = old.clone();
        tokio::spawn(async move { old.append(vec![Record::put("second", "2")]).await })
    };
    latest_reaches(&etcd, Seq(2)).await;

    // A forced take-over: the new primary recovers seq 2 from etcd and commits seq 3 past it.
    let direct = common::client(&etcd).await;
    fencelog::etcd::leadership::depose(&direct, &layout(), Duration::from_secs(2))
        .await
        .unwrap()
        .expect("the old primary led");
    let new_node = node("new");
    let new = start_primary(&etcd, &new_node).await.unwrap();
    let third = new.append(vec![Record::put("third", "3")]).await.unwrap();
    assert_eq!(third.first_seq, Seq(3));

    // The old primary hears from etcd again: its retry is refused, and it must find its batch.
    proxy.lose_answers(false);
    proxy.cut();
    let answer = tokio::time::timeout(Duration::from_secs(30), appending)
        .await
        .expect("the append is answered")
        .unwrap();
    let ack = answer.expect("seq 2 is in etcd: its append is acknowledged, not refused");
    assert_eq!((ack.first_seq, ack.last_seq), (Seq(2), Seq(2)));
    assert!(!old.is_leading(), "the deposed term ended");
    assert_eq!(
        committed_records(&etcd).await,
        vec![
            (Seq(1), Record::put("first", "1")),
            (Seq(2), Record::put("second", "2")),
            (Seq(3), Record::put("third", "3")),
        ]
    );
    new.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_etcd_no_longer_has_ends_the_term_when_the_keepalive_reconnects() {
    let etcd = common::etcd().await;
    let (_node, proxy, primary) =
        primary_behind_proxy(&etcd, "p1", Duration::from_secs(6), Duration::from_secs(10)).await;
    primary.append(vec![Record::put("k", "v")]).await.unwrap();

    // The keepalive stream breaks, and the lease is revoked while it is down.
    proxy.cut();
    let direct = common::client(&etcd).await;
    fencelog::etcd::leadership::depose(&direct, &layout(), Duration::from_secs(2))
        .await
        .unwrap()
        .expect("the primary led");

    let cause = tokio::time::timeout(Duration::from_secs(20), primary.stepped_down())
        .await
        .expect("the term ends");
    let StepDown::LeadershipLost(reason) = cause else {
        panic!("expected the lease to be lost, got {cause:?}");
    };
    assert!(
        reason.contains("revoked or expired: etcd says"),
        "the term must end on etcd's word that the lease is gone, not wait out the TTL: {reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_a_commit_in_doubt_unknown_never_shutting_down() {
    let etcd = common::etcd().await;
    // A long lease and commit deadline: the committer's retry backoff grows to seconds, and
    // the shutdown's wait for the commit ends while it sleeps between two attempts (where the
    // old shutdown aborted it and answered "shutting down").
    let (_node, proxy, primary) =
        primary_behind_proxy(&etcd, "p1", Duration::from_secs(20), Duration::from_secs(8)).await;
    primary
        .append(vec![Record::put("first", "1")])
        .await
        .unwrap();

    // The commit of seq 2 lands, but no answer from etcd reaches the primary any more; it
    // shuts down while the commit is in doubt.
    proxy.lose_answers(true);
    let appending = {
        let primary = primary.clone();
        tokio::spawn(async move { primary.append(vec![Record::put("second", "2")]).await })
    };
    latest_reaches(&etcd, Seq(2)).await;
    let shutdown = primary.shutdown().await;
    assert!(
        shutdown.is_err(),
        "no answer from etcd confirms the resignation"
    );
    let answer = appending.await.unwrap();
    assert!(
        matches!(
            answer,
            Err(Error::CommitOutcomeUnknown {
                first_seq: Seq(2),
                last_seq: Seq(2),
                ..
            })
        ),
        "seq 2 is in etcd: 'shutting down' (not committed) would be a wrong answer; got {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_refused_by_a_shutdown_under_load_are_never_in_etcd() {
    let etcd = common::etcd().await;
    let (_node, proxy, primary) =
        primary_behind_proxy(&etcd, "p1", Duration::from_secs(20), Duration::from_secs(3)).await;
    // etcd 200 ms away, and an append every millisecond: whenever the shutdown comes, a
    // commit is on its way and more appends wait behind it.
    proxy.delay(Duration::from_millis(100));
    let mut appends = Vec::new();
    let started = Instant::now();
    let (mut shutting_down, mut in_doubt_from) = (false, false);
    for i in 0..5_000 {
        let appender = primary.clone();
        let key = format!("k{i}");
        appends.push(tokio::spawn(async move {
            let answer = appender.append(vec![Record::put(key.clone(), "v")]).await;
            (key, answer)
        }));
        tokio::time::sleep(Duration::from_millis(1)).await;
        let elapsed = started.elapsed();
        if !shutting_down && elapsed > Duration::from_millis(700) {
            shutting_down = true;
            let primary = primary.clone();
            tokio::spawn(async move { primary.shutdown().await });
        }
        // 400 ms into the shutdown, whatever is still committing goes into doubt.
        if !in_doubt_from && elapsed > Duration::from_millis(1_100) {
            in_doubt_from = true;
            proxy.lose_answers(true);
        }
        if elapsed > Duration::from_secs(5) {
            break;
        }
    }
    let mut acked = BTreeMap::new();
    let mut refused = Vec::new();
    let mut in_doubt = 0;
    for append in appends {
        match append.await.unwrap() {
            (key, Ok(_)) => drop(acked.insert(key, ())),
            (key, Err(Error::ShuttingDown)) => refused.push(key),
            (_, Err(Error::CommitOutcomeUnknown { .. })) => in_doubt += 1,
            (key, Err(e)) => panic!("the append of {key} during a shutdown got {e}"),
        }
    }
    let committed: BTreeMap<_, _> = committed_records(&etcd)
        .await
        .into_iter()
        .map(|(_, r)| (String::from_utf8(r.key.to_vec()).unwrap(), ()))
        .collect();
    for key in &refused {
        assert!(
            !committed.contains_key(key),
            "{key} was answered 'shutting down' (not committed) but is in etcd"
        );
    }
    let unacknowledged = committed.keys().filter(|k| !acked.contains_key(*k)).count();
    assert!(
        unacknowledged <= in_doubt,
        "{unacknowledged} records in etcd were never acknowledged, {in_doubt} answered in doubt"
    );
    assert!(
        acked.keys().all(|k| committed.contains_key(k)),
        "every acknowledged record is in etcd"
    );
    assert!(!acked.is_empty() && !refused.is_empty());
}

#[tokio::test]
async fn a_store_of_another_cluster_or_node_is_refused_naming_both() {
    let etcd = common::etcd().await;
    let node = node("p1");
    let primary = start_primary(&etcd, &node).await.unwrap();
    primary.append(vec![Record::put("k", "v")]).await.unwrap();
    primary.shutdown().await.unwrap();

    let mut elsewhere = node.config.clone();
    elsewhere.cluster = "other-cluster".parse().unwrap();
    let metrics = Arc::new(fencelog::metrics::Metrics::new().unwrap());
    let refused = Primary::start(
        common::client(&etcd).await,
        node.store.clone(),
        elsewhere,
        metrics.clone(),
    )
    .await;
    let Err(Error::StoreIdentity { detail, .. }) = refused else {
        panic!("a store of test-cluster was used for other-cluster");
    };
    assert!(
        detail.contains("node p1 of cluster test-cluster, not node p1 of cluster other-cluster"),
        "{detail}"
    );

    let mut renamed = node.config.clone();
    renamed.node = "p2".parse().unwrap();
    let refused = Primary::start(
        common::client(&etcd).await,
        node.store.clone(),
        renamed,
        metrics,
    )
    .await;
    assert!(
        matches!(refused, Err(Error::StoreIdentity { .. })),
        "{:?}",
        refused.err()
    );
}

#[tokio::test]
async fn a_store_that_outlived_a_wiped_etcd_prefix_is_refused_not_mistaken_for_lost_data() {
    let etcd = common::etcd().await;
    let node = node("p1");
    let primary = start_primary(&etcd, &node).await.unwrap();
    primary.append(vec![Record::put("k", "v")]).await.unwrap();
    primary.shutdown().await.unwrap();

    common::client(&etcd)
        .await
        .delete(
            layout().root(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let refused = start_primary(&etcd, &node).await;
    let Err(Error::StoreIdentity { detail, .. }) = refused else {
        panic!("expected the store to be refused, got {:?}", refused.err());
    };
    assert!(detail.contains("was wiped and created anew"), "{detail}");
}

/// `len` bytes that zstd cannot shrink, so a batch is as large on the wire as its payload.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The first and last seq of every batch etcd holds, in order, with its encoded size.
async fn etcd_batches(etcd: &common::EtcdProcess) -> Vec<(Seq, Seq, usize)> {
    let layout = layout();
    let response = common::client(etcd)
        .await
        .get(
            layout.batches_prefix(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let mut batches: Vec<(Seq, Seq, usize)> = response
        .kvs()
        .iter()
        .map(|kv| {
            let header =
                fencelog::batch::BatchHeader::parse(kv.value(), &Limits::default()).unwrap();
            (header.first_seq, header.last_seq(), kv.value().len())
        })
        .collect();
    batches.sort();
    batches
}

const ETCD_REQUEST_LIMIT: &str = "262144";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_etcds_request_limit_is_cut_between_appends_and_committed_in_the_same_term() {
    let etcd = common::EtcdProcess::start_with_flags(&["--max-request-bytes", ETCD_REQUEST_LIMIT])
        .await
        .unwrap();
    let mut node = node("p1");
    // One batch gathers all twelve appends: 360 KB, over etcd's 256 KiB.
    node.config.max_batch_bytes = 512 * 1024;
    node.config.linger = Duration::from_millis(300);
    let (primary, metrics) = start_measured(common::client(&etcd).await, &node).await;
    let epoch = primary.epoch();

    let answers = append_noise_at_once(&primary, 12, 30_000).await;
    committed_past_a_too_large_refusal(&etcd, &primary, epoch, &metrics, answers).await;

    let in_etcd = etcd_batches(&etcd).await;
    assert!(in_etcd.len() >= 2, "{in_etcd:?}");
    let limit: usize = ETCD_REQUEST_LIMIT.parse().unwrap();
    assert!(
        in_etcd.iter().all(|&(_, _, bytes)| bytes < limit),
        "{in_etcd:?}"
    );
    // The local log has etcd's batch boundaries, which the trimmer indexes.
    let store = node.store.clone();
    let local: Vec<(Seq, Seq)> = tokio::task::spawn_blocking(move || store.logged_batches(Seq(1)))
        .await
        .unwrap()
        .unwrap()
        .iter()
        .map(|b| (b.first_seq, b.last_seq))
        .collect();
    let boundaries: Vec<(Seq, Seq)> = in_etcd.iter().map(|&(f, l, _)| (f, l)).collect();
    assert_eq!(local, boundaries);
    primary.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_no_etcd_request_can_carry_is_refused_as_such_and_the_primary_leads_on() {
    let etcd = common::EtcdProcess::start_with_flags(&["--max-request-bytes", ETCD_REQUEST_LIMIT])
        .await
        .unwrap();
    let node = node("p1");
    let metrics = Arc::new(fencelog::metrics::Metrics::new().unwrap());
    let service = PrimaryService::spawn(
        common::client(&etcd).await,
        node.store.clone(),
        node.config.clone(),
        metrics,
    );
    let first = service.leading().await.unwrap();
    let small = vec![Record::put("small", "1")];
    assert_eq!(first.append(small.clone()).await.unwrap().first_seq, Seq(1));

    let refused = first
        .append(vec![Record::put("noise", noise(1, 600_000))])
        .await;
    assert!(
        matches!(refused, Err(Error::RecordOverEtcdLimit { .. })),
        "etcd's refusal is a known 'not committed', not UNKNOWN: {refused:?}"
    );
    // Its seqs were owed to what was sealed behind it: a new term re-seals densely, and knows
    // the limit.
    let next = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let primary = service.leading().await.unwrap();
            if primary.epoch() != first.epoch() {
                return primary;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the primary leads again");
    assert_eq!(next.append(small.clone()).await.unwrap().first_seq, Seq(2));
    let again = next
        .append(vec![Record::put("noise", noise(2, 600_000))])
        .await;
    assert!(
        matches!(again, Err(Error::RecordOverEtcdLimit { .. })),
        "{again:?}"
    );
    assert!(
        next.is_leading(),
        "refused before it had seqs: the term goes on"
    );
    assert_eq!(next.append(small).await.unwrap().first_seq, Seq(3));
    service.shutdown().await.unwrap();
}

/// A primary `name` with `in_flight` commit transactions allowed, batches of at most `cap`
/// records, and etcd `delay` away each way (through a proxy the test controls).
async fn primary_far_from_etcd(
    etcd: &common::EtcdProcess,
    name: &str,
    in_flight: usize,
    cap: usize,
    delay: Duration,
) -> (
    common::Node,
    FaultProxy,
    Arc<Primary>,
    Arc<fencelog::metrics::Metrics>,
) {
    let proxy = FaultProxy::start(etcd.endpoint()).await.unwrap();
    proxy.delay(delay);
    let mut node = node(name);
    node.config.max_commits_in_flight = in_flight;
    node.config.max_batch_records = cap;
    let client = fencelog::etcd::connect(&[proxy.endpoint().to_owned()], Duration::from_secs(2))
        .await
        .unwrap();
    let (primary, metrics) = start_measured(client, &node).await;
    (node, proxy, primary, metrics)
}

/// `node`'s primary on `client`, with metrics of its own to read.
async fn start_measured(
    client: etcd_client::Client,
    node: &common::Node,
) -> (Arc<Primary>, Arc<fencelog::metrics::Metrics>) {
    let metrics = Arc::new(fencelog::metrics::Metrics::new().unwrap());
    let primary = Primary::start(
        client,
        node.store.clone(),
        node.config.clone(),
        metrics.clone(),
    )
    .await
    .unwrap();
    (Arc::new(primary), metrics)
}

/// Every append of `answers` was acknowledged in `epoch`'s term, which still leads, and etcd
/// has each at its seq, although etcd refused a request of it as too large.
async fn committed_past_a_too_large_refusal(
    etcd: &common::EtcdProcess,
    primary: &Primary,
    epoch: fencelog::record::Epoch,
    metrics: &fencelog::metrics::Metrics,
    answers: Vec<(fencelog::Result<AppendAck>, Vec<Record>)>,
) {
    let acked: Vec<_> = answers
        .into_iter()
        .map(|(ack, records)| (ack.expect("every append commits, cut to fit"), records))
        .collect();
    let refusals = metrics
        .commit_refusals
        .with_label_values(&["too_large"])
        .get();
    assert!(refusals >= 1, "etcd refused a request as too large");
    assert!(primary.is_leading(), "the term went on");
    assert_eq!(primary.epoch(), epoch);
    assert_acks_match_etcd(etcd, &acked).await;
}

/// `count` appends at once of one record each, `k<i>` = `value_bytes` of noise, each with its
/// answer.
async fn append_noise_at_once(
    primary: &Arc<Primary>,
    count: u64,
    value_bytes: usize,
) -> Vec<(fencelog::Result<AppendAck>, Vec<Record>)> {
    let appends = (0..count).map(|i| {
        let primary = primary.clone();
        async move {
            let records = vec![Record::put(format!("k{i}"), noise(i, value_bytes))];
            (primary.append(records.clone()).await, records)
        }
    });
    futures_util::future::join_all(appends).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_in_flight_to_a_distant_etcd_land_in_seq_order_and_every_ack_is_in_etcd() {
    let etcd = common::etcd().await;
    let (_node, _proxy, primary, metrics) =
        primary_far_from_etcd(&etcd, "far", 8, 16, Duration::from_millis(2)).await;
    let acked = append_concurrently(&primary, 32, 20).await;
    assert_acks_match_etcd(&etcd, &acked).await;
    assert!(
        metrics.commits.get() >= 40,
        "{} batches: too few to have had several in flight",
        metrics.commits.get()
    );
    Arc::into_inner(primary).unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_sealed_while_every_commit_is_in_flight_go_to_etcd_in_one_transaction() {
    let etcd = common::etcd().await;
    // One commit in flight, 20 ms away: while it is on its way, full batches of four records
    // pile up behind it.
    let (_node, _proxy, primary, metrics) =
        primary_far_from_etcd(&etcd, "runs", 1, 4, Duration::from_millis(20)).await;
    let acked = append_concurrently(&primary, 32, 5).await;
    assert_acks_match_etcd(&etcd, &acked).await;
    let (batches, transactions) = (metrics.commits.get(), metrics.commit_transactions.get());
    assert!(
        transactions * 2 <= batches,
        "{batches} batches in {transactions} transactions"
    );
    let revisions: std::collections::BTreeSet<i64> =
        batch_revisions(&etcd).await.into_values().collect();
    assert_eq!(
        revisions.len() as u64,
        transactions,
        "one etcd revision per transaction"
    );
    Arc::into_inner(primary).unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_batches_over_etcds_request_limit_is_sent_again_in_smaller_runs() {
    let etcd = common::EtcdProcess::start_with_flags(&["--max-request-bytes", ETCD_REQUEST_LIMIT])
        .await
        .unwrap();
    let proxy = FaultProxy::start(etcd.endpoint()).await.unwrap();
    proxy.delay(Duration::from_millis(20));
    let mut node = node("p1");
    // Batches of one 60 KB record each; up to 512 KiB of them go in one run, over etcd's
    // 256 KiB, while the one commit in flight is on its way.
    node.config.max_batch_records = 1;
    node.config.max_batch_bytes = 512 * 1024;
    node.config.max_commits_in_flight = 1;
    let client = fencelog::etcd::connect(&[proxy.endpoint().to_owned()], Duration::from_secs(2))
        .await
        .unwrap();
    let (primary, metrics) = start_measured(client, &node).await;
    let epoch = primary.epoch();

    let answers = append_noise_at_once(&primary, 24, 60_000).await;
    committed_past_a_too_large_refusal(&etcd, &primary, epoch, &metrics, answers).await;
    assert!(
        metrics.commit_transactions.get() < metrics.commits.get(),
        "no transaction carried more than one batch"
    );
    assert!(
        etcd_batches(&etcd)
            .await
            .iter()
            .all(|&(first, last, _)| first == last),
        "the batches stayed whole, one record each"
    );
    Arc::into_inner(primary).unwrap().shutdown().await.unwrap();
}

/// The `mod_revision` of every batch key etcd holds, by the batch's first seq.
async fn batch_revisions(etcd: &common::EtcdProcess) -> BTreeMap<Seq, i64> {
    let layout = layout();
    let response = common::client(etcd)
        .await
        .get(
            layout.batches_prefix(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    response
        .kvs()
        .iter()
        .map(|kv| (layout.parse_batch_key(kv.key()).unwrap(), kv.mod_revision()))
        .collect()
}

/// `count` concurrent appends of one record each (`k<i>` = `v<i>`), each with its answer.
fn append_one_record_each(
    primary: &Arc<Primary>,
    count: u32,
) -> Vec<tokio::task::JoinHandle<(Record, fencelog::Result<AppendAck>)>> {
    (0..count)
        .map(|i| {
            let primary = primary.clone();
            tokio::spawn(async move {
                let record = Record::put(format!("k{i}"), format!("v{i}"));
                (record.clone(), primary.append(vec![record]).await)
            })
        })
        .collect()
}

/// What an append of [`append_one_record_each`] was answered, within 30 s.
async fn answered<T>(task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("every append is answered")
        .expect("the append's task ends without a panic")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_deposed_with_its_window_full_acknowledges_only_what_etcd_has() {
    let etcd = common::etcd().await;
    // 50 ms each way: every commit of the window is on its way when the lease is revoked.
    let (_node, _proxy, primary, _) =
        primary_far_from_etcd(&etcd, "deposed", 4, 2, Duration::from_millis(50)).await;
    primary
        .append(vec![Record::put("first", "1")])
        .await
        .unwrap();
    let appending = append_one_record_each(&primary, 32);
    tokio::time::sleep(Duration::from_millis(120)).await;
    let direct = common::client(&etcd).await;
    fencelog::etcd::leadership::depose(&direct, &layout(), Duration::from_secs(2))
        .await
        .unwrap()
        .expect("the primary led");

    let committed: BTreeMap<Seq, Record> = committed_records(&etcd).await.into_iter().collect();
    let (mut acknowledged, mut refused) = (0, 0);
    for task in appending {
        let (record, answer) = answered(task).await;
        match answer {
            Ok(ack) => {
                assert_eq!(
                    committed.get(&ack.first_seq),
                    Some(&record),
                    "acked, not in etcd"
                );
                acknowledged += 1;
            }
            Err(Error::Fenced { .. } | Error::LeadershipLost { .. }) => {
                let key = record.key.clone();
                assert!(
                    committed.values().all(|r| r.key != key),
                    "{record:?} was refused as not committed, yet etcd has it"
                );
                refused += 1;
            }
            Err(e @ Error::CommitOutcomeUnknown { .. }) => println!("in doubt: {e}"),
            Err(e) => panic!("an append answered {e:?}"),
        }
    }
    let seqs: Vec<u64> = committed.keys().map(|s| s.0).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "etcd's log is dense"
    );
    println!("{acknowledged} acknowledged, {refused} refused as not committed");
    assert!(refused > 0, "the window held commits when the lease went");
    assert!(!primary.is_leading(), "the deposed term ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_to_a_full_window_are_settled_from_etcd_and_each_append_acknowledged_once() {
    let etcd = common::etcd().await;
    let (_node, proxy, primary, metrics) =
        primary_far_from_etcd(&etcd, "lossy", 4, 2, Duration::from_millis(20)).await;
    primary
        .append(vec![Record::put("first", "1")])
        .await
        .unwrap();
    let appending = append_one_record_each(&primary, 24);
    // The window's transactions reach etcd; their answers do not. Then the connection breaks,
    // as a lost answer's connection would, and the committer retries on a new one.
    tokio::time::sleep(Duration::from_millis(30)).await;
    proxy.lose_answers(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.lose_answers(false);
    proxy.cut();

    let mut acked = vec![(
        AppendAck {
            first_seq: Seq(1),
            last_seq: Seq(1),
        },
        vec![Record::put("first", "1")],
    )];
    for task in appending {
        let (record, answer) = answered(task).await;
        let ack = answer.expect("etcd has every batch of the window: acknowledged, not failed");
        acked.push((ack, vec![record]));
    }
    // Each record once in etcd, at the seq its ack gave, and the log dense.
    assert_acks_match_etcd(&etcd, &acked).await;
    assert!(primary.is_leading(), "the term rode it out");
    assert!(metrics.commit_retries.get() > 0, "no answer was lost");
    Arc::into_inner(primary).unwrap().shutdown().await.unwrap();
}
