//! The follower's recovery paths, forced with fail points against a real etcd: a watch whose
//! start revision was compacted reads again, and a batch lost from the watch is read back to
//! fill the gap.

use std::sync::Arc;

use crate::common;
use common::{node, received, start_primary};
use fencelog::lifecycle::{Event, State};
use fencelog::metrics::Metrics;
use fencelog::primary::Primary;
use fencelog::record::Seq;
use fencelog::standby::{Standby, StandbyConfig};
use fencelog::workload::RecordGenerator;

async fn start_standby(
    etcd: &common::EtcdProcess,
    pieces: &common::Node,
) -> (Standby, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new().unwrap());
    let config = StandbyConfig::new(common::CLUSTER.parse().unwrap(), "standby".parse().unwrap());
    let standby = Standby::start(
        common::client(etcd).await,
        pieces.store.clone(),
        config,
        metrics.clone(),
    )
    .await
    .unwrap();
    (standby, metrics)
}

/// `appends` appends of 10 records, one at a time (so one batch each); the last seq.
async fn append(primary: &Primary, seed: u64, appends: usize) -> Seq {
    let mut generator = RecordGenerator::new(seed, 300, 256);
    let mut last = Seq::NONE;
    for _ in 0..appends {
        last = primary
            .append(generator.take_records(10))
            .await
            .unwrap()
            .last_seq;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_watch_revision_sends_the_follower_back_to_read() {
    let scenario = fail::FailScenario::setup();
    let etcd = common::etcd().await;
    let primary_node = node("primary");
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    let before = append(&primary, 1, 5).await;

    let _delayed = common::FailPoint::set("follower::delay_watch", "1*return(2000)");
    let standby_node = node("standby");
    let (standby, _) = start_standby(&etcd, &standby_node).await;
    received(&standby, before).await;
    // While the follower waits to watch from its read's revision, that revision goes.
    let after = append(&primary, 2, 5).await;
    let mut client = common::client(&etcd).await;
    let revision = client
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client.compact(revision, None).await.unwrap();

    received(&standby, after).await;
    let events: Vec<Event> = standby.history().iter().map(|t| t.event).collect();
    assert!(events.contains(&Event::Compacted), "{events:?}");
    assert_eq!(standby.wait_state(State::Watching).await, State::Watching);
    assert_eq!(
        common::whole_log(&standby_node.store),
        common::committed_records(&etcd).await
    );
    standby.shutdown().await.unwrap();
    primary.shutdown().await.unwrap();
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_lost_from_the_watch_is_read_back_from_etcd() {
    let scenario = fail::FailScenario::setup();
    let etcd = common::etcd().await;
    let primary_node = node("primary");
    let primary = start_primary(&etcd, &primary_node).await.unwrap();
    let before = append(&primary, 1, 3).await;
    let standby_node = node("standby");
    let (standby, metrics) = start_standby(&etcd, &standby_node).await;
    received(&standby, before).await;
    standby.wait_state(State::Watching).await;

    let _dropping = common::FailPoint::set("follower::drop_watched_batch", "1*return");
    let after = append(&primary, 2, 4).await;
    received(&standby, after).await;
    assert_eq!(metrics.gap_fills.get(), 1, "the gap was filled from etcd");
    assert_eq!(standby.state(), State::Watching);
    assert_eq!(
        common::whole_log(&standby_node.store),
        common::committed_records(&etcd).await
    );
    standby.shutdown().await.unwrap();
    primary.shutdown().await.unwrap();
    scenario.teardown();
}
