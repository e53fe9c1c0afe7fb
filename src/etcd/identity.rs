//! Which log a store belongs to: the cluster's log in etcd has an id, a random value written
//! once (put only where none exists) by the first node that starts; every store records it
//! with its cluster and node on first use ([`LocalStore::bind_identity`]) and is refused
//! against any other. Without it, a store of cluster `c1` started as `c2` adopted c2's log
//! after c1's seqs, and a store outliving a wiped etcd prefix was misdiagnosed as etcd having
//! lost committed data.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp, TxnOpResponse};

use crate::error::{Error, Result};
use crate::etcd::timed;
use crate::keys::{ClusterId, KeyLayout, NodeName};
use crate::local_store::{blocking, LocalStore, StoreIdentity};

/// The id of the cluster's log, created now if it has none.
pub async fn log_id(
    client: &Client,
    layout: &KeyLayout,
    request_timeout: Duration,
) -> Result<String> {
    let id = new_id();
    let txn = Txn::new()
        .when([Compare::create_revision(
            layout.log_id(),
            CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::put(layout.log_id(), id.clone(), None)])
        .or_else([TxnOp::get(layout.log_id(), None)]);
    // Whoever loses a race reads the winner's id in the same round trip.
    let response = timed(request_timeout, client.kv_client().txn(txn)).await?;
    if response.succeeded() {
        return Ok(id);
    }
    let existing = response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
        _ => None,
    });
    id_of(existing.as_deref())
}

/// Binds `store` to node `node` of `cluster` and the cluster's log in etcd; refuses a store
/// that belongs to another. Binding a store already bound to the same is a check only.
pub async fn bind_store(
    client: &Client,
    cluster: &ClusterId,
    node: &NodeName,
    store: &Arc<LocalStore>,
    request_timeout: Duration,
) -> Result<()> {
    let layout = KeyLayout::new(cluster);
    let identity = StoreIdentity {
        cluster: cluster.as_str().to_owned(),
        node: node.as_str().to_owned(),
        log_id: log_id(client, &layout, request_timeout).await?,
    };
    let store = store.clone();
    blocking(move || store.bind_identity(&identity)).await
}

fn id_of(value: Option<&[u8]>) -> Result<String> {
    let text = value.and_then(|v| std::str::from_utf8(v).ok());
    match text {
        Some(id) if !id.is_empty() && !id.contains(' ') => Ok(id.to_owned()),
        _ => Err(Error::CorruptPointer(format!(
            "the log id is {:?}, not an id",
            value.map(String::from_utf8_lossy)
        ))),
    }
}

/// 128 random bits as hex: std's per-process random hash keys, mixed with the time and pid.
fn new_id() -> String {
    let word = |salt: u64| {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(salt);
        hasher.write_u64(crate::batch::unix_micros_now());
        hasher.write_u32(std::process::id());
        hasher.finish()
    };
    format!("{:016x}{:016x}", word(1), word(2))
}
