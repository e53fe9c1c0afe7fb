//! Snapshot bootstrap against a real etcd: a standby that was stopped while the log was trimmed
//! past it comes back, installs the primary's state over the API, follows from there, and ends
//! with the primary's state digest.

mod common;

use std::time::{Duration, Instant};

use common::{node, ServedNode};
use fencelog::etcd::trim::Retention;
use fencelog::keys::KeyLayout;
use fencelog::lifecycle::State;
use fencelog::local_store::LocalStore;
use fencelog::node::Role;
use fencelog::record::Seq;
use fencelog::workload::RecordGenerator;

const WAIT: Duration = Duration::from_secs(30);

fn quick_retention() -> Retention {
    common::quick_retention(100)
}

async fn append(served: &ServedNode, seed: u64, appends: usize) -> Seq {
    let mut generator = RecordGenerator::new(seed, 3_000, 256);
    let mut last = Seq::NONE;
    for _ in 0..appends {
        last = served
            .node
            .append(generator.take_records(100))
            .await
            .unwrap()
            .last_seq;
    }
    last
}

async fn applied(served: &ServedNode, seq: Seq) {
    tokio::time::timeout(WAIT, served.node.wait_applied(seq))
        .await
        .expect("applied in time")
        .unwrap();
}

fn digest(store: &LocalStore) -> (u64, u64) {
    let digest = store.state_digest().unwrap();
    (digest.keys, digest.digest)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_trimmed_past_while_stopped_bootstraps_from_a_snapshot_and_matches() {
    let etcd = common::etcd().await;
    let primary_pieces = node("primary");
    let primary = ServedNode::start_leading(&etcd, &primary_pieces, quick_retention()).await;

    let standby_pieces = node("standby");
    let standby = ServedNode::start(&etcd, &standby_pieces, Retention::default(), false).await;
    let first = append(&primary, 1, 20).await;
    applied(&standby, first).await;
    standby.stop().await;

    let last = append(&primary, 2, 50).await;
    common::trimmed_past(&etcd, first).await;

    let standby = ServedNode::start(&etcd, &standby_pieces, Retention::default(), false).await;
    applied(&standby, last).await;
    applied(&primary, last).await;
    let deadline = Instant::now() + WAIT;
    loop {
        match standby.node.role() {
            Role::Standby(following) if following.state() == State::Watching => break,
            _ => assert!(
                Instant::now() < deadline,
                "the standby does not follow again"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(digest(&standby.node.store()), digest(&primary.node.store()));
    let more = append(&primary, 3, 5).await;
    applied(&standby, more).await;
    applied(&primary, more).await;
    if let Role::Standby(following) = standby.node.role() {
        let states: Vec<State> = following.history().iter().map(|t| t.to).collect();
        assert!(
            states.contains(&State::NeedsSnapshot) && states.contains(&State::Bootstrapping),
            "{states:?}"
        );
    }
    let oldest = standby.node.store().log_stats().unwrap().oldest_seq;
    assert!(
        oldest > first,
        "the log starts after the snapshot, at {oldest}"
    );
    assert_eq!(digest(&standby.node.store()), digest(&primary.node.store()));
    standby.stop().await;
    primary.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_state_is_behind_trimmed_refuses_to_serve_a_snapshot_it_cannot_continue() {
    let etcd = common::etcd().await;
    let primary_pieces = node("primary");
    let primary = ServedNode::start_leading(&etcd, &primary_pieces, Retention::default()).await;
    let last = append(&primary, 1, 3).await;
    applied(&primary, last).await;
    // etcd says the log starts far past this node's state (as for a new primary whose state
    // lags the log that was trimmed).
    let layout = KeyLayout::new(&common::CLUSTER.parse().unwrap());
    common::client(&etcd)
        .await
        .put(layout.trimmed(), "100000", None)
        .await
        .unwrap();
    let mut client =
        fencelog::api::WalClient::connect(fencelog::api::Endpoint::Server(primary.addr.clone()))
            .await
            .unwrap();
    let Err(refusal) = client.snapshot().await else {
        panic!("the snapshot is refused");
    };
    let message = refusal.to_string();
    assert!(
        message.contains("etcd holds the log only from seq 100000"),
        "{message}"
    );
    primary.stop().await;
}
