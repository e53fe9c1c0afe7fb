//! A standby's costs: receiving the committed log, replaying all of it onto an empty store, and
//! a warm restart on a store that already holds it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;

use crate::config::PrimaryConfig;
use crate::error::{Error, Result};
use crate::lifecycle::State;
use crate::local_store::LocalStore;
use crate::metrics::Metrics;
use crate::primary::Primary;
use crate::record::Seq;
use crate::standby::{Standby, StandbyConfig};
use crate::workload::RecordGenerator;

const CLUSTER: &str = "bench";

/// Commits about `records` 256-byte records through a primary whose store is in `dir`, from 64
/// producers; returns the last committed seq.
pub async fn fill(client: &Client, dir: &Path, records: u64) -> Result<Seq> {
    let store = Arc::new(LocalStore::open(dir, Default::default())?);
    let config = PrimaryConfig::new(CLUSTER.parse()?, "primary".parse()?, "127.0.0.1:1");
    let metrics = Arc::new(Metrics::new()?);
    let primary = Arc::new(Primary::start(client.clone(), store, config, metrics).await?);
    let producers: Vec<_> = (0..64u64)
        .map(|p| {
            let primary = primary.clone();
            tokio::spawn(async move {
                let mut generator = RecordGenerator::new(p + 1, 1_000_000, 256);
                for _ in 0..records.div_ceil(64 * 16) {
                    primary.append(generator.take_records(16)).await?;
                }
                Ok::<(), Error>(())
            })
        })
        .collect();
    for producer in producers {
        producer
            .await
            .map_err(|e| Error::Benchmark(format!("a producer failed: {e}")))??;
    }
    let last = primary.committed_seq();
    Arc::into_inner(primary)
        .ok_or_else(|| Error::Benchmark("the producers still hold the primary".into()))?
        .shutdown()
        .await?;
    Ok(last)
}

/// A standby of the bench cluster on `store`.
async fn standby(client: &Client, store: &Arc<LocalStore>) -> Result<Standby> {
    let config = StandbyConfig::new(CLUSTER.parse()?, "standby".parse()?);
    Standby::start(
        client.clone(),
        store.clone(),
        config,
        Arc::new(Metrics::new()?),
    )
    .await
}

/// How long a standby starting on `store` takes to receive the log through `last`, and with
/// `apply` to apply all of it; the standby is shut down after.
pub async fn receive(
    client: &Client,
    store: &Arc<LocalStore>,
    last: Seq,
    apply: bool,
) -> Result<Duration> {
    let started = Instant::now();
    let standby = standby(client, store).await?;
    standby.wait_received(last).await.ok_or_else(|| {
        Error::Benchmark(format!("the standby stopped before it received seq {last}"))
    })?;
    if apply {
        standby.wait_applied(last).await;
    }
    let elapsed = started.elapsed();
    standby.shutdown().await?;
    Ok(elapsed)
}

/// How long a standby on a store that already holds the log takes to start and reach
/// `Watching`: the restart's own cost.
pub async fn warm_restart(client: &Client, store: &Arc<LocalStore>) -> Result<Duration> {
    let started = Instant::now();
    let standby = standby(client, store).await?;
    standby.wait_state(State::Watching).await;
    let elapsed = started.elapsed();
    standby.shutdown().await?;
    Ok(elapsed)
}
