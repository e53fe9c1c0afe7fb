//! A node: follows the committed log as a standby and, when it may lead, takes over.
//!
//! A node that campaigns ([`Campaign`]: at once for a node meant to lead, after a leader it
//! followed is gone for a failover standby) does so while it follows; a campaign waits for the
//! leader key to go and never overwrites a live one, so of several standbys exactly one wins. The winner stops
//! following, receives the rest of the committed log up to `latest`, and starts a term at
//! `latest + 1` ([`Standby::hand_over`]); the others go on following the new primary. A manual
//! [`Node::promote`] takes the leadership only if nobody holds it, or, forced, after revoking
//! the current leader's lease. A node whose term could not start (say, a damaged batch in etcd)
//! follows again and lets one lease TTL pass before it campaigns again, leaving the leadership
//! to the other standbys. When the term ends (fenced, lease lost), the node follows again
//! as a standby: its unconfirmed local tail is dropped first, so a former primary never keeps a
//! record etcd did not commit.

mod campaign;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use etcd_client::Client;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::api::ApiAccess;
use crate::config::PrimaryConfig;
use crate::error::{Error, Result};
use crate::etcd::claim::NodeClaim;
use crate::etcd::identity::bind_store;
use crate::etcd::leadership::{current_leader, LeaderInfo, Leadership};
use crate::etcd::trim::read_trimmed;
use crate::keys::KeyLayout;
use crate::lifecycle::{Event, State};
use crate::local_store::{blocking, LocalRetention, LocalStore};
use crate::metrics::{lag_seconds, Metrics};
use crate::primary::{AppendAck, Primary, StepDown};
use crate::record::{Epoch, Record, Seq};
use crate::standby::membership::SnapshotHold;
use crate::standby::{LifecycleCell, Standby, StandbyConfig};
pub use campaign::Campaign;
use campaign::{before_campaign, BeforeCampaign};

/// A node's settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub standby: StandbyConfig,
    /// How the node leads once promoted.
    pub primary: PrimaryConfig,
    /// When the node campaigns for the leadership by itself.
    pub campaign: Campaign,
    /// How much of the local log to keep (checked every [`LOCAL_RETENTION_INTERVAL`]).
    pub local_retention: LocalRetention,
    /// How this node calls another node's API (a snapshot from the primary).
    pub peer_access: ApiAccess,
}

/// How often a node with a bounded local log applies its retention.
pub const LOCAL_RETENTION_INTERVAL: Duration = Duration::from_secs(5);

/// How long a node waits before it follows again after its follower failed (a panic, a bug):
/// long enough not to spin on one that fails at once, short enough not to fall far behind.
const FOLLOWER_RESTART_DELAY: Duration = Duration::from_secs(1);

/// How often a failover standby in its grace looks whether a primary took the leader key.
const LEADER_LOOK_INTERVAL: Duration = Duration::from_millis(200);

/// What the node is doing now.
#[derive(Clone)]
pub enum Role {
    Standby(Arc<Standby>),
    Primary(Arc<Primary>),
    Stopped,
}

enum Request {
    Promote {
        force: bool,
        answer: oneshot::Sender<Result<()>>,
    },
    Stop {
        answer: oneshot::Sender<Result<()>>,
    },
}

/// What a node reports about itself (the API's `Status`).
#[derive(Clone, Debug, PartialEq)]
pub struct NodeStatus {
    pub cluster: String,
    pub node: String,
    /// `"primary"` while leading, else `"standby"` (or `"stopped"`).
    pub role: &'static str,
    pub state: State,
    /// The epoch of this node's term while it leads, else 0.
    pub epoch: Epoch,
    pub committed_seq: Seq,
    pub received_seq: Seq,
    pub applied_seq: Seq,
    pub receive_lag_seconds: f64,
    pub apply_lag_seconds: f64,
    /// Why the state stopped advancing, if the applier failed.
    pub error: Option<String>,
}

/// The node's store; replaced as a whole when a snapshot is installed.
type StoreSlot = Arc<RwLock<Arc<LocalStore>>>;

fn current(slot: &StoreSlot) -> Arc<LocalStore> {
    slot.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// How following ended.
enum FollowEnd {
    /// This node won the leadership (answering a manual promotion, if one asked).
    Won(Box<Leadership>, Option<oneshot::Sender<Result<()>>>),
    /// The log was trimmed past this node: install a snapshot, then follow again.
    NeedsSnapshot,
    /// The follower ended by itself (a panic): follow again with a new one.
    FollowerFailed(String),
    Stopped,
}

pub struct Node {
    client: Client,
    config: NodeConfig,
    store: StoreSlot,
    metrics: Arc<Metrics>,
    role: watch::Receiver<Role>,
    lifecycle: Arc<LifecycleCell>,
    requests: mpsc::Sender<Request>,
    task: Mutex<Option<JoinHandle<Result<()>>>>,
    /// This node's claim on its name, for as long as it runs.
    claim: NodeClaim,
}

impl Node {
    /// Starts as a standby.
    pub async fn start(
        client: Client,
        store: Arc<LocalStore>,
        config: NodeConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Node> {
        config.primary.validate()?;
        if config.primary.cluster != config.standby.cluster
            || config.primary.node != config.standby.node
        {
            return Err(Error::InvalidConfig(
                "the standby and primary settings name different clusters or nodes".into(),
            ));
        }
        let primary = &config.primary;
        // Bound first: the claim records its lease in the store, which must be this node's.
        let timeout = primary.etcd_request_timeout;
        bind_store(&client, &primary.cluster, &primary.node, &store, timeout).await?;
        let claim = NodeClaim::take(
            &client,
            &primary.cluster,
            &primary.node,
            &primary.advertise_addr,
            primary.lease_ttl,
            &store,
            primary.etcd_request_timeout,
        )
        .await?;
        let lifecycle = Arc::new(LifecycleCell::new(metrics.clone()));
        let standby = Standby::start_with(
            client.clone(),
            store.clone(),
            config.standby.clone(),
            metrics.clone(),
            lifecycle.clone(),
        )
        .await?;
        let (role_tx, role) = watch::channel(Role::Standby(Arc::new(standby)));
        let (requests, inbox) = mpsc::channel(8);
        let store = Arc::new(RwLock::new(store));
        if !config.local_retention.keeps_everything() {
            tokio::spawn(enforce_local_retention(
                store.clone(),
                config.local_retention,
                role.clone(),
                (client.clone(), KeyLayout::new(&config.primary.cluster)),
                config.primary.etcd_request_timeout,
            ));
        }
        let runner = Runner {
            client: client.clone(),
            store: store.clone(),
            config: config.clone(),
            metrics: metrics.clone(),
            lifecycle: lifecycle.clone(),
            role: role_tx,
            inbox,
            started: Instant::now(),
            seen_leader: Arc::new(AtomicBool::new(false)),
        };
        Ok(Node {
            client,
            config,
            store,
            metrics,
            role,
            lifecycle,
            requests,
            task: Mutex::new(Some(tokio::spawn(runner.run()))),
            claim,
        })
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    pub fn state(&self) -> State {
        *self.lifecycle.subscribe().borrow()
    }

    /// The store the node uses now (a snapshot install replaces it).
    pub fn store(&self) -> Arc<LocalStore> {
        current(&self.store)
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The lowest seq etcd still holds of this node's cluster.
    pub async fn etcd_trimmed(&self) -> Result<Seq> {
        let layout = KeyLayout::new(&self.config.primary.cluster);
        read_trimmed(
            &self.client,
            &layout,
            self.config.primary.etcd_request_timeout,
        )
        .await
    }

    /// Appends through this node's term; `NotLeader` while this node does not lead, naming
    /// the leader's address when another node leads.
    pub async fn append(&self, records: Vec<Record>) -> Result<AppendAck> {
        match self.role() {
            Role::Primary(primary) if primary.is_leading() => primary.append(records).await,
            _ => Err(Error::NotLeader {
                leader: self.other_leader_addr().await,
            }),
        }
    }

    /// The API address of the node that leads now, unless that is this node (its leader key
    /// is there while its term starts): a refusal then names no one to go to, and a client
    /// waits for this node — whatever address it reached it by.
    pub async fn other_leader_addr(&self) -> Option<String> {
        let leader = self.leader().await.ok().flatten()?;
        (leader.node != self.config.primary.node).then_some(leader.addr)
    }

    /// The node that leads now (its name and API address), read from its leader key.
    pub async fn leader(&self) -> Result<Option<LeaderInfo>> {
        let layout = KeyLayout::new(&self.config.primary.cluster);
        let leader = current_leader(
            &self.client,
            &layout,
            self.config.primary.etcd_request_timeout,
        )
        .await?;
        Ok(leader.map(|(info, _)| info))
    }

    /// Waits until the node's state reflects `seq`, across role changes.
    pub async fn wait_applied(&self, seq: Seq) -> Result<Seq> {
        let mut role = self.role.clone();
        loop {
            let current = role.borrow_and_update().clone();
            let reached = async {
                match &current {
                    Role::Primary(primary) => Some(primary.wait_applied(seq).await),
                    Role::Standby(standby) => Some(standby.wait_applied(seq).await),
                    Role::Stopped => None,
                }
            };
            let stopped_short = tokio::select! {
                reached = reached => match reached {
                    Some(applied) if applied >= seq => return Ok(applied),
                    Some(_) => true,
                    None => return Err(Error::ShuttingDown),
                },
                changed = role.changed() => changed.is_err(),
            };
            // An applier stops short of `seq` only when its role ends: wait for the next one.
            if stopped_short && role.changed().await.is_err() {
                return Err(Error::ShuttingDown);
            }
        }
    }

    /// What a consistent read must see: the seq this node knows committed now, and, while it
    /// leads, its term, which must still be held when the read answers (a lease read: no other
    /// primary can commit before this term's lease has run out).
    pub fn consistent_read_point(&self) -> (Seq, Option<Arc<Primary>>) {
        match self.role() {
            Role::Primary(primary) if primary.is_leading() => {
                (primary.committed_seq(), Some(primary))
            }
            _ => (Seq(self.metrics.committed_seq.get().max(0) as u64), None),
        }
    }

    /// Why this node's state stopped advancing, if its applier failed: the node then serves
    /// a state that no longer follows the log, and is not ready.
    pub fn applier_failure(&self) -> Option<String> {
        match self.role() {
            Role::Primary(primary) => primary.applier_failure(),
            Role::Standby(standby) => standby.applier_failure(),
            Role::Stopped => None,
        }
    }

    /// Sets the lag gauges from the positions and the clock now (see
    /// [`crate::metrics::lag_seconds`]): at apply time alone they went stale, showing an idle,
    /// caught-up node's last lag, and a stalled one's last small lag.
    pub fn refresh_lags(&self) {
        let store = self.store();
        let Ok(positions) = store.positions() else {
            return;
        };
        let now = crate::batch::unix_micros_now();
        let (received, applied) = (positions.received_seq, positions.applied_seq);
        let after_applied = applied
            .next()
            .ok()
            .and_then(|next| store.sealed_at(next).ok().flatten());
        let apply = lag_seconds(applied, received, after_applied, now);
        let receive = match self.role() {
            Role::Primary(primary) if primary.is_leading() => 0.0,
            _ => {
                let committed = Seq(self.metrics.committed_seq.get().max(0) as u64);
                let last_received = store.sealed_at(received).ok().flatten();
                lag_seconds(received, committed, last_received, now)
            }
        };
        self.metrics.apply_lag_seconds.set(apply);
        self.metrics.receive_lag_seconds.set(receive);
    }

    pub fn status(&self) -> NodeStatus {
        self.refresh_lags();
        let gauge = |g: &prometheus::IntGauge| Seq(g.get().max(0) as u64);
        let mut status = NodeStatus {
            cluster: self.config.primary.cluster.as_str().to_owned(),
            node: self.config.primary.node.as_str().to_owned(),
            role: "stopped",
            state: self.state(),
            epoch: Epoch(0),
            committed_seq: gauge(&self.metrics.committed_seq),
            received_seq: gauge(&self.metrics.received_seq),
            applied_seq: gauge(&self.metrics.applied_seq),
            receive_lag_seconds: self.metrics.receive_lag_seconds.get(),
            apply_lag_seconds: self.metrics.apply_lag_seconds.get(),
            error: self
                .applier_failure()
                .map(|e| format!("the applier stopped: {e}")),
        };
        match self.role() {
            Role::Primary(primary) if primary.is_leading() => {
                status.role = "primary";
                status.epoch = primary.epoch();
                status.committed_seq = primary.committed_seq();
                status.received_seq = primary.committed_seq();
                status.applied_seq = primary.applied_seq();
                status.receive_lag_seconds = 0.0;
            }
            Role::Primary(_) => status.role = "standby",
            Role::Standby(standby) => {
                let standby = standby.status();
                status.role = "standby";
                status.committed_seq = standby.committed_seq;
                status.received_seq = standby.received_seq;
                status.applied_seq = standby.applied_seq;
            }
            Role::Stopped => {}
        }
        status
    }

    /// Resolves once the node has stopped: shut down, or ended by an error it cannot recover
    /// from (logged).
    pub async fn stopped(&self) {
        let mut role = self.role.clone();
        // An error means the runner is gone, which is stopped as well.
        let _ = role.wait_for(|role| matches!(role, Role::Stopped)).await;
    }

    /// Waits until the node leads; `None` if it stopped first.
    pub async fn leading(&self) -> Option<Arc<Primary>> {
        let mut role = self.role.clone();
        loop {
            match &*role.borrow_and_update() {
                Role::Primary(primary) if primary.is_leading() => return Some(primary.clone()),
                Role::Stopped => return None,
                _ => {}
            }
            role.changed().await.ok()?;
        }
    }

    /// Waits until the node follows as a standby; `None` if it stopped first.
    pub async fn following(&self) -> Option<Arc<Standby>> {
        let mut role = self.role.clone();
        loop {
            match &*role.borrow_and_update() {
                Role::Standby(standby) => return Some(standby.clone()),
                Role::Stopped => return None,
                Role::Primary(_) => {}
            }
            role.changed().await.ok()?;
        }
    }

    /// Promotes this node now. Without `force`, refused with [`Error::LeaderAlive`] while
    /// another node leads; with it, that node's lease is revoked first. A node that already
    /// leads answers at once.
    pub async fn promote(&self, force: bool) -> Result<()> {
        let (answer, answered) = oneshot::channel();
        self.send(Request::Promote { force, answer }).await?;
        answered.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Shuts the current role down (a primary resigns), and stops.
    pub async fn shutdown(&self) -> Result<()> {
        let (answer, answered) = oneshot::channel();
        let sent = self.send(Request::Stop { answer }).await;
        let outcome = match sent {
            Ok(()) => answered.await.map_err(|_| Error::ShuttingDown)?,
            Err(e) => Err(e),
        };
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            if let Ok(Err(e)) = task.await {
                tracing::error!(error = %e, "the node had stopped with an error");
            }
        }
        if let Err(e) = self.claim.release().await {
            tracing::warn!(error = %e, "could not give up the node's claim on its name; it expires by itself");
        }
        outcome
    }

    async fn send(&self, request: Request) -> Result<()> {
        self.requests
            .send(request)
            .await
            .map_err(|_| Error::ShuttingDown)
    }
}

/// The task that owns the node's roles and moves between them.
struct Runner {
    client: Client,
    store: StoreSlot,
    config: NodeConfig,
    metrics: Arc<Metrics>,
    lifecycle: Arc<LifecycleCell>,
    role: watch::Sender<Role>,
    inbox: mpsc::Receiver<Request>,
    /// When the node started: a failover standby's grace runs from here.
    started: Instant,
    /// Whether the node has seen a leader key, or led, since it started.
    seen_leader: Arc<AtomicBool>,
}

impl Runner {
    async fn run(mut self) -> Result<()> {
        let outcome = self.serve().await;
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "the node stopped");
        }
        self.role.send_replace(Role::Stopped);
        outcome
    }

    async fn serve(&mut self) -> Result<()> {
        let mut campaign_delay = Duration::ZERO;
        loop {
            let Role::Standby(standby) = self.role.borrow().clone() else {
                return Err(Error::ShuttingDown);
            };
            let (leadership, answer) = match self.follow(&standby, campaign_delay).await? {
                FollowEnd::Won(leadership, answer) => (*leadership, answer),
                FollowEnd::Stopped => return Ok(()),
                FollowEnd::NeedsSnapshot => {
                    standby.stop_for("stopped to install a snapshot").await?;
                    drop(standby);
                    if let Err(e) = self.install_snapshot().await {
                        tracing::error!(error = %e, "cannot install a snapshot; trying again after the recovery delay");
                        tokio::time::sleep(self.config.standby.recovery_retry).await;
                    }
                    self.rejoin().await?;
                    continue;
                }
                FollowEnd::FollowerFailed(how) => {
                    tracing::error!(follower = %how, "the follower ended; following again with a new one");
                    self.metrics.follower_restarts.inc();
                    standby.stop_for("stopped to restart the follower").await?;
                    drop(standby);
                    tokio::time::sleep(FOLLOWER_RESTART_DELAY).await;
                    self.rejoin().await?;
                    continue;
                }
            };
            let led = standby
                .hand_over(leadership, self.config.primary.clone())
                .await;
            let primary = match led {
                Ok(primary) => Arc::new(primary),
                Err(e) => {
                    tracing::error!(error = %e, "promotion failed; following again");
                    reply(answer, Err(e));
                    // The term could not start here (a damaged batch in etcd, a local write
                    // failing): leave the next campaign to the other standbys for one lease TTL
                    // rather than win and fail again at once.
                    campaign_delay = self.config.primary.lease_ttl;
                    self.rejoin().await?;
                    continue;
                }
            };
            campaign_delay = Duration::ZERO;
            self.seen_leader.store(true, Ordering::Relaxed);
            self.role.send_replace(Role::Primary(primary.clone()));
            reply(answer, Ok(()));
            let Some(cause) = self.lead(&primary).await? else {
                return Ok(());
            };
            primary.keep_learned_caps(&mut self.config.primary);
            if matches!(cause, StepDown::PipelineFailed(_)) {
                // The term failed inside this node (a task died, the local store failed): as
                // after a failed promotion, leave the next campaign to the other standbys.
                campaign_delay = self.config.primary.lease_ttl;
            }
            self.lifecycle
                .raise(Event::Stop, "the term ended; following again");
            self.rejoin().await?;
        }
    }

    /// Follows until this node wins a leadership (by failover or a manual promotion), needs a
    /// snapshot, or is asked to stop.
    async fn follow(&mut self, standby: &Standby, campaign_delay: Duration) -> Result<FollowEnd> {
        let mut campaign = std::pin::pin!(self.campaign(campaign_delay));
        let mut state = self.lifecycle.subscribe();
        let needs_snapshot = async move {
            let reached = state.wait_for(|s| *s == State::NeedsSnapshot).await.is_ok();
            if !reached {
                std::future::pending::<()>().await;
            }
        };
        let mut needs_snapshot = std::pin::pin!(needs_snapshot);
        loop {
            tokio::select! {
                won = &mut campaign => return Ok(FollowEnd::Won(Box::new(won?), None)),
                () = &mut needs_snapshot => return Ok(FollowEnd::NeedsSnapshot),
                how = standby.follower_failed() => return Ok(FollowEnd::FollowerFailed(how)),
                request = self.inbox.recv() => match request {
                    Some(Request::Promote { force, answer }) => {
                        match standby.take_leadership(&self.config.primary, force).await {
                            Ok(leadership) => {
                                return Ok(FollowEnd::Won(Box::new(leadership), Some(answer)));
                            }
                            Err(e) => reply(Some(answer), Err(e)),
                        }
                    }
                    Some(Request::Stop { answer }) => {
                        reply(Some(answer), standby.shutdown().await);
                        return Ok(FollowEnd::Stopped);
                    }
                    None => {
                        standby.shutdown().await?;
                        return Ok(FollowEnd::Stopped);
                    }
                },
            }
        }
    }

    /// Replaces the store with a snapshot of the primary's state, or, when the primary cannot
    /// serve one, of another running node's ([`crate::snapshot::sources`]). The old store
    /// stays as it was until the new one is complete and verified.
    async fn install_snapshot(&mut self) -> Result<()> {
        let standby = &self.config.standby;
        let sources = crate::snapshot::sources(
            &self.client,
            &standby.cluster,
            &standby.node,
            standby.etcd_request_timeout,
        )
        .await?;
        let layout = KeyLayout::new(&standby.cluster);
        let hold = SnapshotHold::register(
            self.client.clone(),
            &layout,
            &standby.node,
            standby.member_ttl,
            standby.etcd_request_timeout,
        )
        .await?;
        let mut refused = Vec::new();
        for addr in sources {
            match self.install_snapshot_from(&addr, &hold).await {
                Ok(()) => return Ok(()),
                Err(e) if another_source_may_serve(&e) => {
                    tracing::warn!(source = %addr, error = %e, "this node cannot serve a snapshot; asking the next");
                    refused.push(format!("{addr}: {e}"));
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::NoSnapshotSource {
            refusals: refused.join("; "),
        })
    }

    async fn install_snapshot_from(&mut self, addr: &str, hold: &SnapshotHold) -> Result<()> {
        let endpoint = crate::api::Endpoint::Server(addr.to_owned());
        let access = self.config.peer_access.clone();
        let mut source = crate::api::WalClient::connect_with(endpoint, access).await?;
        tracing::warn!(
            source = addr,
            "the log was trimmed past this node: installing a snapshot"
        );
        self.lifecycle.raise(
            Event::Bootstrap,
            format!("installing a snapshot from {addr}"),
        );
        let old = current(&self.store);
        let dir = old.dir().to_path_buf();
        let options = old.options();
        drop(old);
        let metrics = self.metrics.clone();
        let header = crate::snapshot::bootstrap(&mut source, &dir, options.clone(), |progress| {
            hold.at_snapshot(progress.seq);
            metrics.snapshot_bytes.set(progress.bytes as i64);
        })
        .await?;
        let store = blocking(move || LocalStore::open(&dir, options)).await?;
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(store);
        self.metrics.snapshots_installed.inc();
        tracing::info!(
            seq = header.seq,
            keys = header.keys,
            source = addr,
            "snapshot installed; following from there"
        );
        Ok(())
    }

    /// Waits `delay`, then as the node's [`Campaign`] says, then until this node wins the
    /// leadership; never ends for a node that does not campaign.
    fn campaign(&self, delay: Duration) -> impl Future<Output = Result<Leadership>> + 'static {
        let policy = self.config.campaign;
        let (started, seen_leader) = (self.started, self.seen_leader.clone());
        let client = self.client.clone();
        let store = current(&self.store);
        let primary = self.config.primary.clone();
        async move {
            tokio::time::sleep(delay).await;
            let layout = KeyLayout::new(&primary.cluster);
            loop {
                let seen = seen_leader.load(Ordering::Relaxed);
                match before_campaign(policy, seen, started.elapsed()) {
                    BeforeCampaign::Never => return std::future::pending().await,
                    BeforeCampaign::Campaign => break,
                    BeforeCampaign::LookForLeader { within } => {
                        let timeout = primary.etcd_request_timeout;
                        match current_leader(&client, &layout, timeout).await {
                            Ok(Some(_)) => seen_leader.store(true, Ordering::Relaxed),
                            Ok(None) => tokio::time::sleep(within.min(LEADER_LOOK_INTERVAL)).await,
                            Err(e) => {
                                tracing::debug!(error = %e, "cannot read the leader key");
                                tokio::time::sleep(within.min(LEADER_LOOK_INTERVAL)).await;
                            }
                        }
                    }
                }
            }
            Leadership::campaign(
                &client,
                &layout,
                &primary.leader_info(),
                primary.lease(),
                &store,
            )
            .await
        }
    }

    /// Leads until the term ends (its cause: follow again) or the node is asked to stop (`None`).
    async fn lead(&mut self, primary: &Primary) -> Result<Option<StepDown>> {
        loop {
            tokio::select! {
                cause = primary.stepped_down() => {
                    tracing::warn!(cause = %cause.to_error(), "no longer leading");
                    if let Err(e) = primary.shutdown().await {
                        tracing::warn!(error = %e, "the ended term did not shut down cleanly");
                    }
                    return Ok(Some(cause));
                }
                request = self.inbox.recv() => match request {
                    Some(Request::Promote { answer, .. }) => reply(Some(answer), Ok(())),
                    Some(Request::Stop { answer }) => {
                        let stopped = primary.shutdown().await;
                        self.lifecycle.raise(Event::Stop, "the primary shut down");
                        reply(Some(answer), stopped);
                        return Ok(None);
                    }
                    None => {
                        primary.shutdown().await?;
                        return Ok(None);
                    }
                },
            }
        }
    }

    /// Follows again, as a standby, from the local store.
    async fn rejoin(&mut self) -> Result<()> {
        let standby = Standby::start_with(
            self.client.clone(),
            current(&self.store),
            self.config.standby.clone(),
            self.metrics.clone(),
            self.lifecycle.clone(),
        )
        .await?;
        self.role.send_replace(Role::Standby(Arc::new(standby)));
        Ok(())
    }
}

fn reply(answer: Option<oneshot::Sender<Result<()>>>, outcome: Result<()>) {
    if let Some(answer) = answer {
        // The asker may have given up waiting; the outcome is logged by whoever acted on it.
        let _ = answer.send(outcome);
    }
}

/// Keeps the local log within `retention` until the node stops, never dropping a batch etcd
/// still holds (read each time: any node may lead next).
async fn enforce_local_retention(
    store: StoreSlot,
    retention: LocalRetention,
    mut role: watch::Receiver<Role>,
    (client, layout): (Client, KeyLayout),
    request_timeout: Duration,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOCAL_RETENTION_INTERVAL) => {}
            _ = role.wait_for(|role| matches!(role, Role::Stopped)) => return,
        }
        let etcd_trimmed = match read_trimmed(&client, &layout, request_timeout).await {
            Ok(trimmed) => trimmed,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read etcd's trimmed; local retention waits");
                continue;
            }
        };
        let store = current(&store);
        let (records, bytes) = (retention.retain_records, retention.retain_bytes);
        let dropped = blocking(move || store.apply_retention(records, bytes, etcd_trimmed)).await;
        match dropped {
            Ok(Some(oldest)) => {
                tracing::debug!(%oldest, "dropped the oldest batches of the local log")
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot apply the local log's retention"),
        }
    }
}

/// A snapshot that failed at its source — unreachable, refused (its state cannot continue into
/// the log etcd holds), cut off or corrupt on the way — may come whole from another node; a
/// failure of this node's own store would fail the same way from any.
fn another_source_may_serve(error: &Error) -> bool {
    matches!(
        error,
        Error::Rpc { .. }
            | Error::Unreachable { .. }
            | Error::NotLeader { .. }
            | Error::SnapshotInvalid(_)
    )
}
