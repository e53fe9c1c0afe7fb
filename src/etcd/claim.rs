//! A running node's claim on its name: `nodes/<node>` = its API address, under a lease of its
//! own kept alive for the node's life, created only where none exists. A second daemon started
//! with the same `--node` finds the claim and refuses to start, naming where the first runs:
//! the two would otherwise share `members/<node>`, and when one stopped, the other's
//! registration vanished and trimming no longer waited for it. A daemon restarted after a crash
//! recognises its own claim by the lease its store recorded and takes it back at once; a claim
//! it cannot prove its own (its store was replaced by a snapshot since) it waits out for one
//! lease TTL before refusing.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::etcd::{lease_gone, revoke_lease, timed};
use crate::keys::{ClusterId, KeyLayout, NodeName};
use crate::local_store::{blocking, LocalStore};

/// A held claim; [`NodeClaim::release`] gives it up, dropping it lets it expire.
pub struct NodeClaim {
    client: Client,
    lease: i64,
    request_timeout: Duration,
    keepalive: JoinHandle<()>,
}

impl NodeClaim {
    /// Claims `node` of `cluster` for a daemon serving at `addr`.
    pub async fn take(
        client: &Client,
        cluster: &ClusterId,
        node: &NodeName,
        addr: &str,
        ttl: Duration,
        store: &Arc<LocalStore>,
        request_timeout: Duration,
    ) -> Result<NodeClaim> {
        let key = KeyLayout::new(cluster).node_claim(node);
        let reader = store.clone();
        let ours_before = blocking(move || reader.claim_lease()).await?;
        // A claim that is not provably ours may be a crashed predecessor's whose store was
        // replaced since (a snapshot install): it expires within one TTL, a live daemon's
        // does not. Each attempt takes a fresh lease: one granted before the wait could
        // expire during it.
        let patience = tokio::time::Instant::now() + ttl + request_timeout;
        let mut said = false;
        let lease = loop {
            let lease = timed(
                request_timeout,
                client
                    .lease_client()
                    .grant(ttl.as_secs().max(1) as i64, None),
            )
            .await?
            .id();
            let put = PutOptions::new().with_lease(lease);
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), addr, Some(put))])
                .or_else([TxnOp::get(key.clone(), None)]);
            let response = timed(request_timeout, client.kv_client().txn(txn)).await?;
            let Some((holder_lease, running_at)) = holder(&response) else {
                break lease;
            };
            revoke_lease(client, lease, request_timeout).await?;
            if Some(holder_lease) == ours_before {
                tracing::info!(node = %node, "found this node's own claim from before a restart; taking it back");
                revoke_lease(client, holder_lease, request_timeout).await?;
                continue;
            }
            if tokio::time::Instant::now() >= patience {
                return Err(Error::NodeRunning {
                    node: node.as_str().to_owned(),
                    cluster: cluster.as_str().to_owned(),
                    addr: running_at,
                    ttl,
                });
            }
            if !said {
                tracing::info!(node = %node, %running_at, "another process holds this node's name; waiting up to a lease TTL for it to expire");
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let recorder = store.clone();
        blocking(move || recorder.set_claim_lease(Some(lease))).await?;
        let keepalive = tokio::spawn(keep_alive(client.clone(), lease, ttl));
        Ok(NodeClaim {
            client: client.clone(),
            lease,
            request_timeout,
            keepalive,
        })
    }

    /// Gives the claim up at once, so the name is free for the next daemon.
    pub async fn release(&self) -> Result<()> {
        self.keepalive.abort();
        revoke_lease(&self.client, self.lease, self.request_timeout).await
    }
}

impl Drop for NodeClaim {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

/// The lease and address of whoever holds the claim, from a refused claim transaction.
fn holder(response: &etcd_client::TxnResponse) -> Option<(i64, String)> {
    if response.succeeded() {
        return None;
    }
    response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .map(|kv| (kv.lease(), String::from_utf8_lossy(kv.value()).into_owned())),
        _ => None,
    })
}

/// Keeps the claim's lease alive every TTL/3, reconnecting after failures. A lease etcd lost
/// (an outage past its TTL) is not taken again here: the claim then only expired, and the
/// daemon keeps running as it did before claims existed.
async fn keep_alive(client: Client, lease: i64, ttl: Duration) {
    let mut lease_client = client.lease_client();
    let mut channel = None;
    loop {
        tokio::time::sleep(ttl / 3).await;
        let answer = tokio::time::timeout(ttl / 3, async {
            if channel.is_none() {
                channel = Some(lease_client.keep_alive(lease).await?);
            }
            let Some((keeper, stream)) = channel.as_mut() else {
                return Ok(None);
            };
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        let gone = match &answer {
            Ok(Ok(Some(response))) if response.ttl() > 0 => continue,
            Ok(Ok(Some(_))) => true,
            Ok(Err(e)) => lease_gone(e),
            _ => false,
        };
        if gone {
            tracing::warn!(lease, "the node's claim on its name expired in etcd");
            return;
        }
        channel = None;
    }
}
