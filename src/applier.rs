//! Applies received batches to the state, off the commit path: the one apply step every node
//! uses, primary and standby alike.
//!
//! It follows a `watch` of the received seq, applies the local log up to it a few batches at a
//! time on a blocking thread, and publishes the applied seq. The state catches up from the local
//! log, never from etcd. An apply error (a damaged local log) stops the applier and is kept for
//! status: the state stays at its last good seq, never skips.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::local_store::{blocking, LocalStore};
use crate::metrics::Metrics;
use crate::record::Seq;

/// Batches applied per trip to the blocking pool, so the applied seq is published often.
const BATCHES_PER_STEP: usize = 16;

pub struct Applier {
    task: JoinHandle<()>,
    applied: watch::Receiver<Seq>,
    failure: Arc<Mutex<Option<String>>>,
}

impl Applier {
    /// Starts applying whatever `received` announces. When `received`'s sender is dropped, the
    /// applier catches up with the last announced seq and stops.
    pub fn spawn(
        store: Arc<LocalStore>,
        received: watch::Receiver<Seq>,
        metrics: Arc<Metrics>,
    ) -> Applier {
        let start = store.positions().map(|p| p.applied_seq).unwrap_or_default();
        let (applied_tx, applied) = watch::channel(start);
        let failure = Arc::new(Mutex::new(None));
        let task = tokio::spawn(run(store, received, applied_tx, metrics, failure.clone()));
        Applier {
            task,
            applied,
            failure,
        }
    }

    pub fn applied_seq(&self) -> Seq {
        *self.applied.borrow()
    }

    /// Why the applier stopped, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until the state reflects `seq`, or the applier stops short of it.
    pub async fn wait_applied(&self, seq: Seq) -> Seq {
        let mut applied = self.applied.clone();
        let reached = applied
            .wait_for(|applied| *applied >= seq)
            .await
            .map(|applied| *applied);
        reached.unwrap_or_else(|_| *self.applied.borrow())
    }

    /// Waits for the applier to finish (after its received sender is dropped).
    pub async fn join(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "applier task panicked");
        }
    }
}

async fn run(
    store: Arc<LocalStore>,
    mut received: watch::Receiver<Seq>,
    applied: watch::Sender<Seq>,
    metrics: Arc<Metrics>,
    failure: Arc<Mutex<Option<String>>>,
) {
    loop {
        let target = *received.borrow_and_update();
        while *applied.borrow() < target {
            let step_store = store.clone();
            let step = blocking(move || {
                let mut last = None;
                for _ in 0..BATCHES_PER_STEP {
                    match step_store.apply_next()? {
                        Some(batch) => last = Some(batch.last_seq),
                        None => break,
                    }
                }
                Ok(last)
            })
            .await;
            match step {
                Ok(Some(seq)) => {
                    metrics.applied_seq.set(seq.0 as i64);
                    applied.send_replace(seq);
                }
                // Nothing more in the log yet: the received seq runs ahead of the store's.
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, applied = %applied.borrow().0, "apply failed; the state stays at its last good seq");
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    return;
                }
            }
        }
        if received.changed().await.is_err() {
            if *received.borrow() > *applied.borrow() {
                continue;
            }
            return;
        }
    }
}
