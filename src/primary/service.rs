//! Keeps a node leading whenever it can: campaigns, serves one term until it ends, and
//! campaigns again, until shut down. This is what a `primary` daemon runs: a primary that
//! stepped down because etcd was unreachable leads again once etcd returns, unless another node
//! leads by then (then it waits for that node's key to go, and never overwrites it).

use std::sync::Arc;

use etcd_client::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::PrimaryConfig;
use crate::error::{Error, Result};
use crate::etcd::Backoff;
use crate::local_store::LocalStore;
use crate::metrics::Metrics;
use crate::primary::{AppendAck, Primary};
use crate::record::Record;

pub struct PrimaryService {
    current: watch::Receiver<Option<Arc<Primary>>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
}

impl PrimaryService {
    /// Starts campaigning in the background.
    pub fn spawn(
        client: Client,
        store: Arc<LocalStore>,
        config: PrimaryConfig,
        metrics: Arc<Metrics>,
    ) -> PrimaryService {
        let (current_tx, current) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(client, store, config, metrics, current_tx, stop_rx));
        PrimaryService {
            current,
            stop,
            task,
        }
    }

    /// The current term, while this node leads.
    pub fn current(&self) -> Option<Arc<Primary>> {
        self.current
            .borrow()
            .clone()
            .filter(|primary| primary.is_leading())
    }

    /// Waits until this node leads. Fails if the service has ended (a fatal error, or shutdown).
    pub async fn leading(&self) -> Result<Arc<Primary>> {
        let mut current = self.current.clone();
        loop {
            if let Some(primary) = self.current() {
                return Ok(primary);
            }
            if current.changed().await.is_err() {
                return Err(Error::ShuttingDown);
            }
        }
    }

    /// Appends through the current term; `NotLeader` while this node does not lead.
    pub async fn append(&self, records: Vec<Record>) -> Result<AppendAck> {
        match self.current() {
            Some(primary) => primary.append(records).await,
            None => Err(Error::NotLeader { leader: None }),
        }
    }

    /// Ends the current term gracefully (resigning) and stops campaigning. Returns the error
    /// that ended the service, if one did.
    pub async fn shutdown(self) -> Result<()> {
        self.stop.send_replace(true);
        self.task
            .await
            .map_err(|e| Error::TaskFailed(e.to_string()))?
    }
}

async fn run(
    client: Client,
    store: Arc<LocalStore>,
    mut config: PrimaryConfig,
    metrics: Arc<Metrics>,
    current: watch::Sender<Option<Arc<Primary>>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut backoff = Backoff::new(config.lease_ttl);
    loop {
        let started = tokio::select! {
            started = Primary::start(client.clone(), store.clone(), config.clone(), metrics.clone()) => started,
            _ = stop.wait_for(|stop| *stop) => return Ok(()),
        };
        let primary = match started {
            Ok(primary) => Arc::new(primary),
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = %e, "cannot take up leadership yet; retrying");
                tokio::select! {
                    _ = backoff.wait() => continue,
                    _ = stop.wait_for(|stop| *stop) => return Ok(()),
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot lead");
                return Err(e);
            }
        };
        backoff.reset();
        current.send_replace(Some(primary.clone()));
        let ended = tokio::select! {
            cause = primary.stepped_down() => Some(cause),
            _ = stop.wait_for(|stop| *stop) => None,
        };
        current.send_replace(None);
        let closed = primary.shutdown().await;
        match ended {
            None => return closed,
            Some(cause) => {
                tracing::info!(?cause, "the term ended; campaigning again");
                primary.keep_learned_caps(&mut config);
                if let Err(e) = closed {
                    tracing::debug!(error = %e, "cleaning up the ended term");
                }
            }
        }
    }
}

/// Errors that etcd's return can cure; anything else (a damaged store, etcd behind the local
/// log, a bad configuration) needs an operator.
fn is_transient(error: &Error) -> bool {
    matches!(error, Error::Etcd(_) | Error::EtcdTimeout(_))
}
