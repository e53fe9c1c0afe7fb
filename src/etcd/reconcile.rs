//! Makes a node's local log a prefix of etcd's committed log before the node builds on it.
//!
//! A batch past the local `received_seq` was written but never confirmed: a primary's
//! write-ahead batch whose commit it never saw, or a received batch whose position a crash cut
//! off. It is dropped (if etcd has it, it is read back with the rest); nothing in it was ever
//! acknowledged. A local `received_seq` past etcd's `latest` means etcd lost committed data:
//! the node refuses to go on rather than skip or rewrite seqs.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;

use crate::error::{Error, Result};
use crate::etcd::commit::Head;
use crate::etcd::timed;
use crate::keys::KeyLayout;
use crate::local_store::{blocking, LocalStore};
use crate::pointer::CommitPointer;
use crate::record::Seq;

/// What etcd's log holds, as `latest` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdLog {
    pub last_seq: Seq,
    /// What `latest` holds: the next commit is chained to it.
    pub head: Head,
}

/// Reads `latest`, refuses a local log that is ahead of it, and drops the unconfirmed tail.
pub async fn reconcile(
    client: &Client,
    layout: &KeyLayout,
    store: &Arc<LocalStore>,
    request_timeout: Duration,
) -> Result<EtcdLog> {
    let etcd = read_latest(client, layout, request_timeout).await?;
    let reader = store.clone();
    let local = blocking(move || reader.positions()).await?;
    if local.received_seq > etcd.last_seq {
        return Err(Error::EtcdBehindLocal {
            local: local.received_seq,
            etcd: etcd.last_seq,
        });
    }
    if local.log_end_seq > local.received_seq {
        tracing::info!(from = %local.received_seq.next()?, through = %local.log_end_seq, "dropping the unconfirmed local log tail");
        let truncating = store.clone();
        blocking(move || truncating.truncate_after(local.received_seq)).await?;
    }
    Ok(etcd)
}

pub async fn read_latest(
    client: &Client,
    layout: &KeyLayout,
    request_timeout: Duration,
) -> Result<EtcdLog> {
    let response = timed(
        request_timeout,
        client.kv_client().get(layout.latest(), None),
    )
    .await?;
    Ok(match response.kvs().first() {
        Some(kv) => EtcdLog {
            last_seq: CommitPointer::decode(kv.value())?.last_seq,
            head: Head::read(Some(kv.value())),
        },
        None => EtcdLog {
            last_seq: Seq::NONE,
            head: Head::Empty,
        },
    })
}
