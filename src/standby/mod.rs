//! The standby: keeps an exact, durable copy of the committed log and its applied state.
//!
//! The [`follower`] receives committed batches from etcd into the local log (read, then watch,
//! never skipping a seq); the [`crate::applier`] applies the local log to the state, separately,
//! as on the primary. Both positions live in the local store, so a restarted standby resumes
//! where it was: the follower from `received_seq + 1` out of etcd, the applier from
//! `applied_seq + 1` out of its own log.
//!
//! Still to come (issue 4): the full lifecycle state machine, membership registration and lag
//! in time, promotion, and a former primary's rejoin.

mod follower;

use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::applier::Applier;
use crate::error::Result;
use crate::keys::{ClusterId, KeyLayout};
use crate::limits::Limits;
use crate::local_store::{blocking, LocalStore};
use crate::metrics::Metrics;
use crate::record::Seq;

pub use follower::FollowState;

/// A standby's settings.
#[derive(Clone, Debug)]
pub struct StandbyConfig {
    pub cluster: ClusterId,
    /// The limits the cluster's batches were encoded with.
    pub limits: Limits,
    /// Timeout of one etcd request. Default 2 s.
    pub etcd_request_timeout: Duration,
}

impl StandbyConfig {
    pub fn new(cluster: ClusterId) -> StandbyConfig {
        StandbyConfig {
            cluster,
            limits: Limits::default(),
            etcd_request_timeout: Duration::from_secs(2),
        }
    }
}

pub struct Standby {
    store: Arc<LocalStore>,
    follower: JoinHandle<crate::error::Error>,
    received: watch::Receiver<Seq>,
    state: watch::Receiver<FollowState>,
    applier: Applier,
}

impl Standby {
    /// Starts following from the store's `received_seq` and applying from its `applied_seq`.
    pub async fn start(
        client: Client,
        store: Arc<LocalStore>,
        config: StandbyConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Standby> {
        config.limits.validate()?;
        let reader = store.clone();
        let positions = blocking(move || reader.positions()).await?;
        let (received_tx, received) = watch::channel(positions.received_seq);
        let (state_tx, state) = watch::channel(FollowState::Syncing);
        let applier = Applier::spawn(store.clone(), received.clone(), metrics.clone());
        let follower = follower::Follower {
            client,
            layout: KeyLayout::new(&config.cluster),
            limits: config.limits,
            store: store.clone(),
            metrics,
            request_timeout: config.etcd_request_timeout,
            received: received_tx,
            state: state_tx,
        };
        let follower = tokio::spawn(follower.run());
        Ok(Standby {
            store,
            follower,
            received,
            state,
            applier,
        })
    }

    /// The last seq the local log holds.
    pub fn received_seq(&self) -> Seq {
        *self.received.borrow()
    }

    pub fn applied_seq(&self) -> Seq {
        self.applier.applied_seq()
    }

    pub fn state(&self) -> FollowState {
        self.state.borrow().clone()
    }

    /// Waits until the local log holds `seq`; `None` if the follower stopped short of it.
    pub async fn wait_received(&self, seq: Seq) -> Option<Seq> {
        let mut received = self.received.clone();
        let reached = received
            .wait_for(|received| *received >= seq)
            .await
            .map(|r| *r);
        reached.ok()
    }

    /// Waits until the state reflects `seq`, or the applier stops short of it.
    pub async fn wait_applied(&self, seq: Seq) -> Seq {
        self.applier.wait_applied(seq).await
    }

    /// Waits until the follower is in a state that `matches`.
    pub async fn wait_state(&self, matches: impl Fn(&FollowState) -> bool) -> FollowState {
        let mut state = self.state.clone();
        let reached = state.wait_for(|s| matches(s)).await.map(|s| s.clone());
        reached.unwrap_or_else(|_| self.state())
    }

    /// Stops following, lets the applier finish what was received, and flushes the store.
    pub async fn shutdown(self) -> Result<()> {
        let Standby {
            store,
            follower,
            received,
            applier,
            ..
        } = self;
        follower.abort();
        // Cancelled is the expected outcome; waiting makes sure the follower let go.
        let _ = follower.await;
        let received = *received.borrow();
        applier.wait_applied(received).await;
        blocking(move || store.flush()).await
    }
}
