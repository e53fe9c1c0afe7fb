//! Promotion against a real etcd: a failover standby takes over when the primary dies, a manual
//! promotion is refused while the primary lives and fences it when forced, and a former primary
//! rejoins as a standby without the tail etcd never committed. After each, every acknowledged
//! record is present once, with the same content.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{node, start_primary, Node as Pieces};
use fencelog::lifecycle::State;
use fencelog::metrics::Metrics;
use fencelog::node::{Campaign, Node, NodeConfig, Role};
use fencelog::primary::Primary;
use fencelog::record::{Epoch, Record, Seq};
use fencelog::standby::StandbyConfig;
use fencelog::workload::RecordGenerator;
use fencelog::Error;

const WAIT: Duration = Duration::from_secs(30);

fn node_config(pieces: &Pieces, failover: bool) -> NodeConfig {
    let mut primary = pieces.config.clone();
    primary.lease_ttl = Duration::from_secs(2);
    primary.lease_safety_margin = Duration::from_millis(500);
    let mut standby = StandbyConfig::new(primary.cluster.clone(), primary.node.clone());
    standby.recovery_retry = Duration::from_millis(300);
    NodeConfig {
        standby,
        primary,
        campaign: if failover {
            Campaign::AtOnce
        } else {
            Campaign::Never
        },
        local_retention: Default::default(),
        peer_access: Default::default(),
    }
}

async fn start_node(etcd: &common::EtcdProcess, pieces: &Pieces, failover: bool) -> Node {
    Node::start(
        common::client(etcd).await,
        pieces.store.clone(),
        node_config(pieces, failover),
        Arc::new(Metrics::new().unwrap()),
    )
    .await
    .unwrap()
}

/// A primary whose lease lasts 2 s, so that a crash is noticed quickly.
async fn start_short_lease_primary(etcd: &common::EtcdProcess, pieces: &mut Pieces) -> Primary {
    pieces.config.lease_ttl = Duration::from_secs(2);
    pieces.config.lease_safety_margin = Duration::from_millis(500);
    start_primary(etcd, pieces).await.unwrap()
}

/// Appends `appends` appends of 10 records; returns every acknowledged record by seq.
async fn append_acked(primary: &Primary, seed: u64, appends: usize) -> Vec<(Seq, Record)> {
    let mut generator = RecordGenerator::new(seed, 500, 256);
    let mut acked = Vec::new();
    for _ in 0..appends {
        let records = generator.take_records(10);
        let ack = primary.append(records.clone()).await.unwrap();
        acked.extend((ack.first_seq.0..=ack.last_seq.0).map(Seq).zip(records));
    }
    acked
}

async fn leading(node: &Node) -> Arc<Primary> {
    tokio::time::timeout(WAIT, node.leading())
        .await
        .expect("the node takes over in time")
        .expect("the node is running")
}

/// Every acknowledged record is in etcd's committed log, once, at its seq, with its content;
/// and the log is dense from 1.
async fn assert_all_acked_committed(etcd: &common::EtcdProcess, acked: &[(Seq, Record)]) {
    let committed = common::committed_records(etcd).await;
    for (index, (seq, _)) in committed.iter().enumerate() {
        assert_eq!(*seq, Seq(index as u64 + 1), "the committed log is dense");
    }
    for (seq, record) in acked {
        let found = committed.get(seq.0 as usize - 1).map(|(_, r)| r);
        assert_eq!(
            found,
            Some(record),
            "acknowledged seq {seq} lost or changed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_standby_takes_over_when_the_primary_dies_and_keeps_every_ack() {
    let etcd = common::etcd().await;
    let mut old = node("old-primary");
    let primary = start_short_lease_primary(&etcd, &mut old).await;
    let mut acked = append_acked(&primary, 1, 20).await;
    let old_epoch = primary.epoch();

    let standby_pieces = node("standby");
    let standby = start_node(&etcd, &standby_pieces, true).await;
    drop(primary); // a crash: no resignation, the lease runs out
    let new_primary = leading(&standby).await;

    assert!(new_primary.epoch() > old_epoch);
    assert_eq!(standby.state(), State::Promoted);
    let last_acked = acked.last().unwrap().0;
    assert_eq!(new_primary.committed_seq(), last_acked);
    let more = append_acked(&new_primary, 2, 5).await;
    assert_eq!(more.first().unwrap().0, last_acked.next().unwrap());
    acked.extend(more);
    assert_all_acked_committed(&etcd, &acked).await;
    let local = common::whole_log(&standby_pieces.store);
    assert_eq!(local, acked, "the new primary's log holds every ack");

    standby.shutdown().await.unwrap();
    common::released(&old.store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_failover_standbys_one_takes_over_and_the_other_follows_it() {
    let etcd = common::etcd().await;
    let mut old = node("old-primary");
    let primary = start_short_lease_primary(&etcd, &mut old).await;
    let mut acked = append_acked(&primary, 1, 10).await;
    let (a_pieces, b_pieces) = (node("standby-a"), node("standby-b"));
    let a = start_node(&etcd, &a_pieces, true).await;
    let b = start_node(&etcd, &b_pieces, true).await;
    drop(primary);

    let winner = tokio::time::timeout(WAIT, async {
        tokio::select! {
            p = a.leading() => (p.unwrap(), &b, &b_pieces),
            p = b.leading() => (p.unwrap(), &a, &a_pieces),
        }
    })
    .await
    .expect("one standby takes over");
    let (new_primary, loser, loser_pieces) = winner;
    acked.extend(append_acked(&new_primary, 2, 10).await);
    let last = acked.last().unwrap().0;

    let Role::Standby(follower) = loser.role() else {
        panic!("the loser must still be a standby");
    };
    let reached = tokio::time::timeout(WAIT, follower.wait_received(last)).await;
    assert_eq!(reached.expect("the loser keeps following"), Some(last));
    assert_eq!(
        common::whole_log(&loser_pieces.store),
        acked,
        "the loser's log is the committed log"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    common::released(&old.store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_promotion_is_refused_while_the_primary_lives() {
    let etcd = common::etcd().await;
    let mut old = node("old-primary");
    let primary = start_short_lease_primary(&etcd, &mut old).await;
    append_acked(&primary, 1, 3).await;
    let standby = start_node(&etcd, &node("standby"), false).await;

    let refused = standby.promote(false).await.unwrap_err();
    assert!(matches!(refused, Error::LeaderAlive { .. }), "{refused}");
    assert!(
        refused.to_string().contains("old-primary"),
        "the error names the leader: {refused}"
    );
    assert!(matches!(standby.role(), Role::Standby(_)));
    assert!(primary.is_leading());
    standby.shutdown().await.unwrap();
    primary.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_promotion_fences_the_old_primary_and_keeps_every_ack() {
    let etcd = common::etcd().await;
    let mut old = node("old-primary");
    let primary = start_short_lease_primary(&etcd, &mut old).await;
    let mut acked = append_acked(&primary, 1, 10).await;
    let standby_pieces = node("standby");
    let standby = start_node(&etcd, &standby_pieces, false).await;

    standby.promote(true).await.unwrap();
    let new_primary = leading(&standby).await;
    acked.extend(append_acked(&new_primary, 2, 5).await);

    let refused = primary
        .append(vec![Record::put("late", "never acked")])
        .await
        .expect_err("a deposed primary acknowledges nothing");
    assert!(
        matches!(
            refused,
            Error::Fenced { .. }
                | Error::LeadershipLost { .. }
                | Error::CommitOutcomeUnknown { .. }
        ),
        "{refused}"
    );
    assert_all_acked_committed(&etcd, &acked).await;
    assert_eq!(
        common::committed_records(&etcd).await.len(),
        acked.len(),
        "nothing but the acks was committed"
    );
    standby.shutdown().await.unwrap();
    primary.shutdown().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_primary_rejoins_as_a_standby_without_its_unconfirmed_tail() {
    let etcd = common::etcd().await;
    let mut old = node("old-primary");
    let primary = start_short_lease_primary(&etcd, &mut old).await;
    let acked = append_acked(&primary, 1, 5).await;
    let last_acked = acked.last().unwrap().0;
    primary.shutdown().await.unwrap();
    // What a crash between the local write-ahead and the commit leaves: a tail etcd never had.
    let orphan = common::encoded_batches(Epoch(1), 11, 5).pop().unwrap();
    assert_eq!(orphan.first_seq(), last_acked.next().unwrap());
    old.store.append_pending(&orphan).unwrap();

    let mut new = node("new-primary");
    new.config.lease_ttl = Duration::from_secs(2);
    new.config.lease_safety_margin = Duration::from_millis(500);
    let new_primary = start_primary(&etcd, &new).await.unwrap();
    let mut committed = acked.clone();
    committed.extend(append_acked(&new_primary, 2, 3).await);
    let last = committed.last().unwrap().0;

    let rejoined = start_node(&etcd, &old, true).await;
    let Role::Standby(follower) = rejoined.role() else {
        panic!("a node starts as a standby");
    };
    let reached = tokio::time::timeout(WAIT, follower.wait_received(last)).await;
    assert_eq!(reached.expect("the former primary follows"), Some(last));
    assert_eq!(
        common::whole_log(&old.store),
        committed,
        "the orphan tail is gone and the new primary's records took its seqs"
    );
    assert_eq!(old.store.positions().unwrap().log_end_seq, last);
    rejoined.shutdown().await.unwrap();
    new_primary.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_node_whose_term_ends_follows_again() {
    let etcd = common::etcd().await;
    let first_pieces = node("first");
    let first = start_node(&etcd, &first_pieces, false).await;
    first.promote(false).await.unwrap();
    let first_primary = leading(&first).await;
    let mut acked = append_acked(&first_primary, 1, 5).await;
    drop(first_primary);

    let second = start_node(&etcd, &node("second"), false).await;
    second.promote(true).await.unwrap();
    let second_primary = leading(&second).await;
    acked.extend(append_acked(&second_primary, 2, 5).await);
    let last = acked.last().unwrap().0;

    let follower = tokio::time::timeout(WAIT, first.following())
        .await
        .expect("the deposed node follows again")
        .expect("the node is running");
    let reached = tokio::time::timeout(WAIT, follower.wait_received(last)).await;
    assert_eq!(reached.expect("it receives the new term"), Some(last));
    assert_eq!(common::whole_log(&first_pieces.store), acked);
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}
