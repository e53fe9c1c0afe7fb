//! The standby: keeps an exact, durable copy of the committed log and its applied state.
//!
//! The `follower` receives committed batches from etcd into the local log (read, then watch,
//! never skipping a seq); the [`crate::applier`] applies the local log to the state, separately,
//! as on the primary. Both positions live in the local store, so a restarted standby resumes
//! where it was: the follower from `received_seq + 1` out of etcd, the applier from
//! `applied_seq + 1` out of its own log.
//!
//! Its [`lifecycle`] is an explicit state machine with one transition table. It registers at
//! `members/<node>` ([`membership`]) with both positions. A standby becomes the primary through
//! [`Standby::take_leadership`] and [`Standby::hand_over`], which [`crate::node::Node`] drives.

mod follower;
pub mod membership;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::applier::Applier;
use crate::config::PrimaryConfig;
use crate::error::Result;
use crate::etcd::identity::bind_store;
use crate::etcd::leadership::{self, Leadership};
use crate::keys::{ClusterId, KeyLayout, NodeName};
use crate::limits::Limits;
use crate::local_store::{blocking, LocalStore};
use crate::metrics::Metrics;
use crate::primary::Primary;
use crate::record::Seq;
use crate::supervise::run_to_end;

use crate::lifecycle::{self, Event, Lifecycle, State};

/// The lifecycle, shared by the follower (which drives it) and status readers; transitions are
/// published on a watch channel and as the `state` metric.
pub(crate) struct LifecycleCell {
    lifecycle: std::sync::Mutex<Lifecycle>,
    state: watch::Sender<State>,
    metrics: Arc<Metrics>,
}

impl LifecycleCell {
    pub(crate) fn new(metrics: Arc<Metrics>) -> LifecycleCell {
        LifecycleCell {
            lifecycle: std::sync::Mutex::new(Lifecycle::default()),
            state: watch::channel(State::Stopped).0,
            metrics,
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    /// Applies `event`. The follower only raises events the table allows; one it does not is a
    /// bug, logged rather than acted on.
    pub(crate) fn raise(&self, event: Event, detail: impl Into<String>) {
        let mut lifecycle = self.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        match lifecycle.apply(event, detail) {
            Ok(to) => {
                self.metrics
                    .state_transitions
                    .with_label_values(&[to.name()])
                    .inc();
                for state in State::ALL {
                    self.metrics
                        .state
                        .with_label_values(&[state.name()])
                        .set(i64::from(state == to));
                }
                self.state.send_replace(to);
            }
            Err(at) => {
                tracing::error!(?event, state = %at, "the standby lifecycle refused an event")
            }
        }
    }

    fn history(&self) -> Vec<lifecycle::Transition> {
        let lifecycle = self.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        lifecycle.history().cloned().collect()
    }

    fn snapshot(&self) -> (State, String, Duration) {
        let lifecycle = self.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        (
            lifecycle.state(),
            lifecycle.detail().to_owned(),
            lifecycle.time_in_state(),
        )
    }
}

/// What a standby reports about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandbyStatus {
    pub state: State,
    /// Why the current state was entered.
    pub detail: String,
    pub time_in_state: Duration,
    /// The last seq this node has seen committed in etcd.
    pub committed_seq: Seq,
    pub received_seq: Seq,
    pub applied_seq: Seq,
    /// From the seal of the last received batch to its receipt.
    pub receive_lag: Duration,
    /// From the seal of the batch holding `applied_seq` to its apply.
    pub apply_lag: Duration,
}

/// A standby's settings.
#[derive(Clone, Debug)]
pub struct StandbyConfig {
    pub cluster: ClusterId,
    /// Registered at `members/<node>`.
    pub node: NodeName,
    /// TTL of the registration's lease. Default 10 s.
    pub member_ttl: Duration,
    /// The limits the cluster's batches were encoded with.
    pub limits: Limits,
    /// Timeout of one etcd request. Default 2 s.
    pub etcd_request_timeout: Duration,
    /// How long a standby stopped at a missing or damaged batch waits before reading again.
    /// Default 30 s.
    pub recovery_retry: Duration,
}

impl StandbyConfig {
    pub fn new(cluster: ClusterId, node: NodeName) -> StandbyConfig {
        StandbyConfig {
            cluster,
            node,
            member_ttl: Duration::from_secs(10),
            limits: Limits::default(),
            etcd_request_timeout: Duration::from_secs(2),
            recovery_retry: Duration::from_secs(30),
        }
    }
}

pub struct Standby {
    store: Arc<LocalStore>,
    client: Client,
    config: StandbyConfig,
    metrics: Arc<Metrics>,
    /// The follower and the membership refresher, until stopped.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    member_lease: Arc<AtomicI64>,
    received: watch::Receiver<Seq>,
    lifecycle: Arc<LifecycleCell>,
    state: watch::Receiver<State>,
    applier: Applier,
    /// How the follower ended, once it has (it only does by a panic or when stopped).
    follower_ended: watch::Receiver<Option<String>>,
    /// Held by the follower's local log writes while they run (see `Follower::writing`).
    log_writes: Arc<tokio::sync::Mutex<()>>,
}

impl Standby {
    /// Starts following from the store's `received_seq` and applying from its `applied_seq`.
    pub async fn start(
        client: Client,
        store: Arc<LocalStore>,
        config: StandbyConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Standby> {
        let lifecycle = Arc::new(LifecycleCell::new(metrics.clone()));
        Standby::start_with(client, store, config, metrics, lifecycle).await
    }

    /// Starts with a lifecycle that outlives this standby: a node's, across its roles.
    pub(crate) async fn start_with(
        client: Client,
        store: Arc<LocalStore>,
        config: StandbyConfig,
        metrics: Arc<Metrics>,
        lifecycle: Arc<LifecycleCell>,
    ) -> Result<Standby> {
        config.limits.validate()?;
        let timeout = config.etcd_request_timeout;
        bind_store(&client, &config.cluster, &config.node, &store, timeout).await?;
        let reader = store.clone();
        let positions = blocking(move || reader.positions()).await?;
        let (received_tx, received) = watch::channel(positions.received_seq);
        metrics.received_seq.set(positions.received_seq.0 as i64);
        let applier = Applier::spawn(store.clone(), received.clone(), metrics.clone());
        let layout = KeyLayout::new(&config.cluster);
        let member_lease = Arc::new(AtomicI64::new(0));
        let membership = tokio::spawn(
            membership::Membership {
                client: client.clone(),
                lease: member_lease.clone(),
                key: layout.member(&config.node),
                ttl: config.member_ttl,
                request_timeout: config.etcd_request_timeout,
                received: received.clone(),
                applied: applier.subscribe(),
            }
            .run(),
        );
        let log_writes = Arc::new(tokio::sync::Mutex::new(()));
        let follower = follower::Follower {
            client: client.clone(),
            layout,
            limits: config.limits.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            request_timeout: config.etcd_request_timeout,
            recovery_retry: config.recovery_retry,
            received: received_tx,
            lifecycle: lifecycle.clone(),
            writing: log_writes.clone(),
        };
        // It never ends by itself: if it does (a panic), the node restarts it.
        let (follower_end, follower_ended) = watch::channel(None);
        let follower = tokio::spawn(async move {
            follower_end.send_replace(Some(run_to_end(follower.run()).await));
        });
        Ok(Standby {
            store,
            client,
            config,
            metrics,
            tasks: std::sync::Mutex::new(vec![follower, membership]),
            member_lease,
            received,
            state: lifecycle.subscribe(),
            lifecycle,
            applier,
            follower_ended,
            log_writes,
        })
    }

    /// The last seq the local log holds.
    pub fn received_seq(&self) -> Seq {
        *self.received.borrow()
    }

    /// Why the applier stopped, if it failed: the state no longer follows the log.
    pub fn applier_failure(&self) -> Option<String> {
        self.applier.failure()
    }

    pub fn applied_seq(&self) -> Seq {
        self.applier.applied_seq()
    }

    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    pub fn status(&self) -> StandbyStatus {
        let (state, detail, time_in_state) = self.lifecycle.snapshot();
        let seconds = |gauge: &prometheus::Gauge| Duration::from_secs_f64(gauge.get().max(0.0));
        StandbyStatus {
            state,
            detail,
            time_in_state,
            committed_seq: Seq(self.metrics.committed_seq.get().max(0) as u64),
            received_seq: self.received_seq(),
            applied_seq: self.applied_seq(),
            receive_lag: seconds(&self.metrics.receive_lag_seconds),
            apply_lag: seconds(&self.metrics.apply_lag_seconds),
        }
    }

    /// The last transitions of the lifecycle, oldest first.
    pub fn history(&self) -> Vec<lifecycle::Transition> {
        self.lifecycle.history()
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

    /// Resolves, saying how, if the follower ended by itself; never once it is stopped.
    pub async fn follower_failed(&self) -> String {
        let mut ended = self.follower_ended.clone();
        let how = ended
            .wait_for(Option::is_some)
            .await
            .map(|how| how.clone().unwrap_or_default());
        match how {
            Ok(how) => how,
            // Stopped: the follower's task was aborted before it could say.
            Err(_) => std::future::pending().await,
        }
    }

    /// Waits until the standby is in `wanted`.
    pub async fn wait_state(&self, wanted: State) -> State {
        let mut state = self.state.clone();
        let reached = state.wait_for(|s| *s == wanted).await.map(|s| *s);
        reached.unwrap_or_else(|_| self.state())
    }

    /// Takes the leadership for a manual promotion, while still following: only if nobody
    /// leads, or, with `force`, after revoking the current leader's lease (its next commit
    /// then fails the fencing compare, so two primaries never both commit).
    pub async fn take_leadership(&self, config: &PrimaryConfig, force: bool) -> Result<Leadership> {
        let layout = KeyLayout::new(&config.cluster);
        if force {
            leadership::depose(&self.client, &layout, config.etcd_request_timeout).await?;
        }
        Leadership::try_campaign(
            &self.client,
            &layout,
            &config.leader_info(),
            config.lease(),
            &self.store,
        )
        .await
    }

    /// Becomes the primary under `leadership`: stops following and applying, receives the rest
    /// of the committed log up to `latest`, and starts a term at `latest + 1`. The state keeps
    /// catching up under the primary's applier. Afterwards this standby is spent.
    pub async fn hand_over(
        &self,
        leadership: Leadership,
        config: PrimaryConfig,
    ) -> Result<Primary> {
        self.stop_following().await;
        self.lifecycle.raise(
            Event::Promote,
            format!("won the leadership, epoch {}", leadership.epoch()),
        );
        self.applier.stop().await;
        let epoch = leadership.epoch();
        let started = Primary::lead(
            self.client.clone(),
            self.store.clone(),
            config,
            self.metrics.clone(),
            leadership,
        )
        .await;
        match &started {
            Ok(primary) => self.lifecycle.raise(
                Event::TookOver,
                format!(
                    "leading in epoch {epoch} after seq {}",
                    primary.committed_seq()
                ),
            ),
            Err(e) => self.lifecycle.raise(
                Event::PromotionFailed,
                format!("could not start the term: {e}"),
            ),
        }
        started
    }

    /// Stops following, deregisters, lets the applier finish what was received, checkpoints
    /// the state (a restart then replays nothing) and flushes the store.
    pub async fn shutdown(&self) -> Result<()> {
        self.stop_for("shut down").await
    }

    /// [`shutdown`](Self::shutdown), saying `why` in the lifecycle's log line and history (the
    /// node stops its standby to install a snapshot or to restart the follower, too).
    pub(crate) async fn stop_for(&self, why: &str) -> Result<()> {
        self.stop_following().await;
        self.lifecycle.raise(Event::Stop, why);
        let received = *self.received.borrow();
        self.applier.wait_applied(received).await;
        self.applier.stop().await;
        let store = self.store.clone();
        blocking(move || store.checkpoint().and_then(|_| store.flush())).await
    }

    /// Ends the follower and the registration.
    async fn stop_following(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            task.abort();
            // Cancelled is the expected outcome; waiting makes sure the task let go.
            let _ = task.await;
        }
        // A write the aborted follower had under way still runs on its blocking thread: a
        // recovery starting beside it found a log that moved under it (`LogGap`, `PendingTail`).
        drop(self.log_writes.lock().await);
        let lease = self.member_lease.swap(0, Ordering::SeqCst);
        if let Err(e) =
            membership::deregister(&self.client, lease, self.config.etcd_request_timeout).await
        {
            tracing::warn!(error = %e, "could not deregister; the registration expires with its lease");
        }
    }
}

impl Drop for Standby {
    /// Without `shutdown`, stops as a crash would: the registration expires with its lease.
    fn drop(&mut self) {
        for task in self.tasks.get_mut().unwrap_or_else(|p| p.into_inner()) {
            task.abort();
        }
    }
}
