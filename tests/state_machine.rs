//! A state machine of an embedder's own (the `counters` example's) gets what the built-in map
//! gets, against a real etcd: its state follows a failover and comes whole through a snapshot.

mod common;

#[path = "../examples/counters/machine.rs"]
mod machine;

use std::sync::Arc;
use std::time::Duration;

use common::{node_with, ServedNode};
use fencelog::etcd::trim::Retention;
use fencelog::lifecycle::State;
use fencelog::local_store::{LocalStore, StoreOptions};
use fencelog::node::Role;
use fencelog::record::Seq;
use fencelog::state::StateMachine;
use machine::Counters;

const WAIT: Duration = Duration::from_secs(30);

fn counters() -> StoreOptions {
    StoreOptions {
        state: Arc::new(|| Box::new(Counters::default()) as Box<dyn StateMachine>),
        ..StoreOptions::default()
    }
}

fn count(store: &LocalStore, name: &str) -> u64 {
    store.read_state(|state, _| {
        let counters = state.as_any().downcast_ref::<Counters>();
        counters.expect("a Counters state").get(name.as_bytes())
    })
}

/// Adds 1 to `hits` and `i` to `sum`, for i in `from..to`, one append each.
async fn count_up(served: &ServedNode, from: u64, to: u64) -> Seq {
    let mut last = Seq::NONE;
    for i in from..to {
        let records = vec![Counters::add("hits", 1), Counters::add("sum", i)];
        last = served.node.append(records).await.unwrap().last_seq;
    }
    last
}

async fn applied(served: &ServedNode, seq: Seq) {
    tokio::time::timeout(WAIT, served.node.wait_applied(seq))
        .await
        .expect("applied in time")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_counters_state_follows_a_failover_and_counts_on_on_the_new_primary() {
    let etcd = common::etcd().await;
    let (a, b) = (node_with("a", counters()), node_with("b", counters()));
    let primary = ServedNode::start_leading(&etcd, &a, Retention::default()).await;
    let standby = ServedNode::start(&etcd, &b, Retention::default(), true).await;
    let before = count_up(&primary, 0, 50).await;
    applied(&standby, before).await;
    primary.stop().await;

    tokio::time::timeout(WAIT, standby.node.leading())
        .await
        .unwrap();
    let after = count_up(&standby, 50, 100).await;
    applied(&standby, after).await;
    let store = standby.node.store();
    assert_eq!(count(&store, "hits"), 100);
    assert_eq!(count(&store, "sum"), (0..100).sum::<u64>());
    standby.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_counters_state_comes_whole_through_a_snapshot_bootstrap() {
    let etcd = common::etcd().await;
    let quick = common::quick_retention(20);
    let (a, b) = (node_with("a", counters()), node_with("b", counters()));
    let primary = ServedNode::start_leading(&etcd, &a, quick).await;
    let standby = ServedNode::start(&etcd, &b, Retention::default(), false).await;
    let first = count_up(&primary, 0, 10).await;
    applied(&standby, first).await;
    standby.stop().await;

    let last = count_up(&primary, 10, 200).await;
    common::trimmed_past(&etcd, first).await;
    let standby = ServedNode::start(&etcd, &b, Retention::default(), false).await;
    applied(&standby, last).await;
    let store = standby.node.store();
    let Role::Standby(following) = standby.node.role() else {
        panic!("the standby leads");
    };
    let states: Vec<State> = following.history().iter().map(|t| t.to).collect();
    assert!(states.contains(&State::Bootstrapping), "{states:?}");
    assert_eq!(count(&store, "hits"), 200);
    assert_eq!(count(&store, "sum"), (0..200).sum::<u64>());
    assert_eq!(
        store.state_digest().unwrap().digest,
        primary.node.store().state_digest().unwrap().digest
    );
    standby.stop().await;
    primary.stop().await;
}
