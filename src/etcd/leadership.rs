//! Leadership: a lease, the leader key created under it, and the clock that says until when
//! the leadership is surely still ours.
//!
//! A campaign grants a lease and creates `leader` under it only if the key does not exist
//! (`create_revision == 0`); the key's create revision is the **epoch**, the fencing token every
//! commit compares against. A live leader is never overwritten: the campaigner watches the key
//! and tries again once it is gone. The lease is kept alive every TTL/3 and counts as held until
//! the send time of the last keepalive etcd answered, plus the TTL etcd granted, minus a safety
//! margin; past that, or when a keepalive reports TTL 0, the leadership is lost. Resigning
//! revokes the lease, which deletes the key at once, so a standby need not wait out the TTL.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::etcd::{access_denied, lease_gone, revoke_lease, timed, Backoff};
use crate::keys::{KeyLayout, NodeName};
use crate::local_store::{blocking, LocalStore};
use crate::record::Epoch;

/// Who leads, as written in the leader key: `<node> <address>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderInfo {
    pub node: NodeName,
    pub addr: String,
}

impl LeaderInfo {
    pub fn encode(&self) -> String {
        format!("{} {}", self.node, self.addr)
    }

    pub fn decode(value: &[u8]) -> Result<LeaderInfo> {
        let text = std::str::from_utf8(value)
            .map_err(|_| Error::InvalidLeaderValue("not UTF-8".into()))?;
        let (node, addr) = text.split_once(' ').unwrap_or((text, ""));
        Ok(LeaderInfo {
            node: node.parse()?,
            addr: addr.to_owned(),
        })
    }
}

/// Lease timing.
#[derive(Clone, Copy, Debug)]
pub struct LeaseSettings {
    pub ttl: Duration,
    pub safety_margin: Duration,
    pub request_timeout: Duration,
}

/// Until when the leadership is surely held, and why it was lost once it is.
struct LeaseClock {
    valid_until: Mutex<Instant>,
    lost: watch::Sender<Option<String>>,
}

impl LeaseClock {
    fn is_held(&self) -> bool {
        self.lost.borrow().is_none() && Instant::now() < *lock(&self.valid_until)
    }

    fn extend(&self, until: Instant) {
        let mut valid_until = lock(&self.valid_until);
        *valid_until = (*valid_until).max(until);
    }

    fn lose(&self, reason: String) {
        self.lost.send_if_modified(|lost| {
            if lost.is_some() {
                return false;
            }
            tracing::debug!(%reason, "leadership ends");
            *lost = Some(reason);
            true
        });
    }
}

/// A held leadership. Dropping it stops the keepalive; the lease then expires by itself.
pub struct Leadership {
    epoch: Epoch,
    lease_id: i64,
    client: Client,
    settings: LeaseSettings,
    clock: Arc<LeaseClock>,
    keepalive: JoinHandle<()>,
}

impl Leadership {
    /// Campaigns until this node leads. While another node leads, waits for its key to go;
    /// while etcd is unreachable, retries with backoff. Cancel by dropping the future.
    pub async fn campaign(
        client: &Client,
        layout: &KeyLayout,
        me: &LeaderInfo,
        settings: LeaseSettings,
        store: &Arc<LocalStore>,
    ) -> Result<Leadership> {
        let mut backoff = Backoff::new(settings.ttl);
        // Said once per leader: the wait goes round every lease TTL while that leader lives.
        let mut reported: Option<String> = None;
        loop {
            match try_acquire(client, layout, me, settings, store).await {
                Ok(Attempt::Won(leadership)) => return Ok(*leadership),
                Ok(Attempt::Busy { leader, revision }) => {
                    if reported.as_ref() != Some(&leader) {
                        tracing::info!(leader = %leader, "another node leads; waiting for its key to go");
                        reported = Some(leader);
                    } else {
                        tracing::debug!(leader = %leader, "another node still leads");
                    }
                    backoff.reset();
                    if let Err(e) = wait_for_vacancy(client, layout, revision, settings).await {
                        tracing::debug!(error = %e, "watch on the leader key failed");
                        backoff.wait().await;
                    }
                }
                Err(e) => {
                    if let Some(reason) = access_denied(&e) {
                        return Err(Error::AccessDenied {
                            prefix: layout.root().to_owned(),
                            reason,
                        });
                    }
                    tracing::warn!(error = %e, "campaign failed; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Takes the leadership if nobody holds it now; refuses with [`Error::LeaderAlive`]
    /// otherwise. For a manual promotion, which must not wait behind a live leader.
    pub async fn try_campaign(
        client: &Client,
        layout: &KeyLayout,
        me: &LeaderInfo,
        settings: LeaseSettings,
        store: &Arc<LocalStore>,
    ) -> Result<Leadership> {
        match try_acquire(client, layout, me, settings, store).await? {
            Attempt::Won(leadership) => Ok(*leadership),
            Attempt::Busy { leader, .. } => Err(Error::LeaderAlive { leader }),
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn lease_id(&self) -> i64 {
        self.lease_id
    }

    /// True while the lease is surely alive: commits stop the moment this turns false.
    pub fn is_held(&self) -> bool {
        self.clock.is_held()
    }

    /// Resolves with the reason once the leadership is lost.
    pub fn lost(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut lost = self.clock.lost.subscribe();
        async move {
            let reason = lost
                .wait_for(Option::is_some)
                .await
                .map(|reason| reason.clone());
            reason
                .ok()
                .flatten()
                .unwrap_or_else(|| "the leadership was dropped".into())
        }
    }

    /// Marks the leadership lost, from outside (a refused commit, a failed local write).
    pub fn lose(&self, reason: String) {
        self.clock.lose(reason);
    }

    /// Gives the leadership up at once: revokes the lease, which deletes the leader key (or
    /// nothing, if another node leads by now).
    pub async fn resign(&self, store: &Arc<LocalStore>) -> Result<()> {
        self.keepalive.abort();
        self.clock.lose("resigned".into());
        revoke_lease(&self.client, self.lease_id, self.settings.request_timeout).await?;
        let store = store.clone();
        blocking(move || store.set_lease_id(None)).await
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

enum Attempt {
    Won(Box<Leadership>),
    Busy { leader: String, revision: i64 },
}

async fn try_acquire(
    client: &Client,
    layout: &KeyLayout,
    me: &LeaderInfo,
    settings: LeaseSettings,
    store: &Arc<LocalStore>,
) -> Result<Attempt> {
    let limit = settings.request_timeout;
    reclaim_own_key(client, layout, me, limit, store).await?;

    let started = Instant::now();
    let mut lease_client = client.lease_client();
    let ttl_secs = settings.ttl.as_secs().max(1) as i64;
    let lease_id = timed(limit, lease_client.grant(ttl_secs, None)).await?.id();
    let recorded = store.clone();
    blocking(move || recorded.set_lease_id(Some(lease_id))).await?;

    let put = PutOptions::new().with_lease(lease_id);
    let txn = Txn::new()
        .when([Compare::create_revision(
            layout.leader(),
            CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::put(layout.leader(), me.encode(), Some(put))])
        .or_else([TxnOp::get(layout.leader(), None)]);
    let response = timed(limit, client.kv_client().txn(txn)).await?;
    let revision = response.header().map_or(0, |h| h.revision());
    if response.succeeded() {
        let epoch = Epoch(u64::try_from(revision).unwrap_or_default());
        tracing::info!(%epoch, lease_id, "leadership taken");
        let (lost, _) = watch::channel(None);
        let clock = Arc::new(LeaseClock {
            valid_until: Mutex::new(started + settings.ttl.saturating_sub(settings.safety_margin)),
            lost,
        });
        let keepalive = tokio::spawn(keep_alive(
            client.clone(),
            lease_id,
            settings,
            clock.clone(),
        ));
        return Ok(Attempt::Won(Box::new(Leadership {
            epoch,
            lease_id,
            client: client.clone(),
            settings,
            clock,
            keepalive,
        })));
    }
    // Someone leads: give our lease back rather than let it linger until its TTL.
    if let Err(e) = timed(limit, lease_client.revoke(lease_id)).await {
        tracing::debug!(error = %e, lease_id, "could not revoke an unused lease; it will expire");
    }
    let leader = response
        .op_responses()
        .into_iter()
        .find_map(|op| match op {
            TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        })
        .unwrap_or_else(|| "(gone already)".into());
    Ok(Attempt::Busy { leader, revision })
}

/// Who leads now, and the lease its key lives under; `None` when nobody does.
pub async fn current_leader(
    client: &Client,
    layout: &KeyLayout,
    request_timeout: Duration,
) -> Result<Option<(LeaderInfo, i64)>> {
    let response = timed(
        request_timeout,
        client.kv_client().get(layout.leader(), None),
    )
    .await?;
    match response.kvs().first() {
        Some(kv) => Ok(Some((LeaderInfo::decode(kv.value())?, kv.lease()))),
        None => Ok(None),
    }
}

/// Ends the current leader's term by revoking its lease: its key goes at once and its next
/// commit fails the fencing compare. Returns who was deposed, if anyone led. A forced manual
/// promotion does this first, so that two primaries can never both commit.
pub async fn depose(
    client: &Client,
    layout: &KeyLayout,
    request_timeout: Duration,
) -> Result<Option<LeaderInfo>> {
    let Some((leader, lease)) = current_leader(client, layout, request_timeout).await? else {
        return Ok(None);
    };
    tracing::warn!(leader = %leader.encode(), lease, "deposing the current leader: revoking its lease");
    revoke_lease(client, lease, request_timeout).await?;
    Ok(Some(leader))
}

/// A primary restarted while its previous lease still lives finds its own leader key: it
/// revokes that lease instead of waiting out the TTL. Another node's key is never touched.
async fn reclaim_own_key(
    client: &Client,
    layout: &KeyLayout,
    me: &LeaderInfo,
    limit: Duration,
    store: &Arc<LocalStore>,
) -> Result<()> {
    let reader = store.clone();
    let Some(old_lease) = blocking(move || reader.lease_id()).await? else {
        return Ok(());
    };
    let response = timed(limit, client.kv_client().get(layout.leader(), None)).await?;
    let Some(kv) = response.kvs().first() else {
        return Ok(());
    };
    let ours =
        kv.lease() == old_lease && LeaderInfo::decode(kv.value()).is_ok_and(|l| l.node == me.node);
    if ours {
        tracing::info!(
            lease_id = old_lease,
            "found our own leader key from before a restart; revoking it"
        );
        revoke_lease(client, old_lease, limit).await?;
    }
    Ok(())
}

/// Waits until the leader key is deleted after `revision`, or one TTL, whichever is first.
async fn wait_for_vacancy(
    client: &Client,
    layout: &KeyLayout,
    revision: i64,
    settings: LeaseSettings,
) -> Result<()> {
    let options = WatchOptions::new().with_start_revision(revision + 1);
    let mut watch_client = client.watch_client();
    let mut stream = timed(
        settings.request_timeout,
        watch_client.watch(layout.leader(), Some(options)),
    )
    .await?;
    let vacated = async {
        while let Some(response) = stream.message().await? {
            if response.canceled()
                || response
                    .events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete)
            {
                return Ok(());
            }
        }
        Ok::<_, etcd_client::Error>(())
    };
    match tokio::time::timeout(settings.ttl, vacated).await {
        Ok(result) => Ok(result?),
        Err(_) => Ok(()),
    }
}

async fn keep_alive(
    client: Client,
    lease_id: i64,
    settings: LeaseSettings,
    clock: Arc<LeaseClock>,
) {
    let interval = settings.ttl / 3;
    let mut lease_client = client.lease_client();
    let mut channel = None;
    loop {
        let deadline = *lock(&clock.valid_until);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
        if !clock.is_held() {
            tracing::warn!(lease_id, "leadership lost: no keepalive answered in time");
            clock.lose(format!(
                "no keepalive answered within the lease TTL of {:?} (minus the safety margin)",
                settings.ttl
            ));
            return;
        }
        let sent = Instant::now();
        let answer = tokio::time::timeout(interval, async {
            if channel.is_none() {
                channel = Some(lease_client.keep_alive(lease_id).await?);
            }
            let (keeper, stream) = channel.as_mut().expect("just set");
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        match answer {
            Ok(Ok(Some(response))) if response.ttl() > 0 => {
                let granted = Duration::from_secs(response.ttl() as u64);
                clock.extend(sent + granted.saturating_sub(settings.safety_margin));
            }
            Ok(Ok(Some(_))) => {
                tracing::warn!(
                    lease_id,
                    "leadership lost: the lease expired or was revoked"
                );
                clock.lose("the lease expired or was revoked (keepalive answered TTL 0)".into());
                return;
            }
            Ok(Err(e)) if lease_gone(&e) => {
                tracing::warn!(lease_id, error = %e, "leadership lost: etcd no longer has the lease");
                clock.lose(format!("the lease was revoked or expired: etcd says {e}"));
                return;
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                tracing::warn!(lease_id, "keepalive got no answer; retrying");
                channel = None;
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
