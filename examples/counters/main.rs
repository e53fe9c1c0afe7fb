//! Embeds fencelog with a state machine of its own: a primary node whose state is per-name
//! counters ([`machine::Counters`]), on an etcd it starts on loopback. It appends increments,
//! reads the counters from the applied state, stops, and reopens its store warm: the counters
//! come back from the checkpoint and the log after it.
//!
//! Run it with `cargo run --example counters` (etcd from Debian's `etcd-server` on the PATH).

mod machine;

use std::sync::Arc;
use std::time::Duration;

use fencelog::etcd::process::EtcdProcess;
use fencelog::local_store::{LocalStore, StoreOptions};
use fencelog::metrics::Metrics;
use fencelog::node::{Campaign, Node, NodeConfig};
use fencelog::state::StateMachine;
use machine::Counters;

/// The store's options: its state is a `Counters`, made empty and filled from the checkpoint.
fn options() -> StoreOptions {
    StoreOptions {
        state: Arc::new(|| Box::new(Counters::default()) as Box<dyn StateMachine>),
        ..StoreOptions::default()
    }
}

/// The value of counter `name` on `store`, and the seq the state is applied to.
fn counter(store: &LocalStore, name: &str) -> (u64, fencelog::record::Seq) {
    store.read_state(|state, seq| {
        let counters = state.as_any().downcast_ref::<Counters>();
        (counters.map_or(0, |c| c.get(name.as_bytes())), seq)
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let etcd = EtcdProcess::start().await?;
    let dir = tempfile::tempdir()?;
    let client =
        fencelog::etcd::connect(&[etcd.endpoint().to_owned()], Duration::from_secs(5)).await?;
    let config = {
        let primary =
            fencelog::config::PrimaryConfig::new("counters".parse()?, "a".parse()?, "127.0.0.1:1");
        let standby =
            fencelog::standby::StandbyConfig::new(primary.cluster.clone(), primary.node.clone());
        NodeConfig {
            standby,
            primary,
            campaign: Campaign::AtOnce,
            local_retention: Default::default(),
            peer_access: Default::default(),
        }
    };

    let store = Arc::new(LocalStore::open(dir.path(), options())?);
    let node = Node::start(
        client.clone(),
        store,
        config.clone(),
        Arc::new(Metrics::new()?),
    )
    .await?;
    node.leading()
        .await
        .ok_or("the node stopped before it led")?;
    let mut last = fencelog::record::Seq::NONE;
    for round in 1..=10 {
        let records = vec![Counters::add("visits", round), Counters::add("rounds", 1)];
        last = node.append(records).await?.last_seq;
    }
    node.wait_applied(last).await?;
    let (visits, seq) = counter(&node.store(), "visits");
    println!(
        "visits = {visits}, rounds = {} at seq {seq}",
        counter(&node.store(), "rounds").0
    );
    node.shutdown().await?;
    drop(node);

    // Warm: the checkpoint written at shutdown, nothing replayed, nothing read from etcd.
    let store = LocalStore::open(dir.path(), options())?;
    let (again, at) = counter(&store, "visits");
    println!("after a restart: visits = {again} at seq {at}");
    assert_eq!((again, at), (visits, seq));
    assert_eq!(visits, 55);
    Ok(())
}
