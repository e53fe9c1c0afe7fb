//! The start of a term: make the local log exactly etcd's committed log, and find where to go on.
//!
//! The unconfirmed local tail is dropped ([`reconcile`]); committed batches the local log lacks
//! are read from etcd, verified, and appended. The term then takes
//! appends at etcd's last seq + 1, chaining its first commit to what `latest` holds.

use std::sync::Arc;

use etcd_client::Client;

use crate::batch::BatchDecoder;
use crate::config::PrimaryConfig;
use crate::error::Result;
use crate::etcd::commit::Head;
use crate::etcd::fetch::{append_verified, BatchPages};
use crate::etcd::identity::bind_store;
use crate::etcd::reconcile::reconcile;
use crate::keys::KeyLayout;
use crate::local_store::{blocking, LocalStore};
use crate::record::Seq;

/// Where a term starts.
pub(crate) struct Resume {
    pub next_seq: Seq,
    /// What `latest` holds: the term's first commit is chained to it.
    pub head: Head,
}

pub(crate) async fn recover(
    client: &Client,
    layout: &KeyLayout,
    store: &Arc<LocalStore>,
    config: &PrimaryConfig,
) -> Result<Resume> {
    let timeout = config.etcd_request_timeout;
    bind_store(client, &config.cluster, &config.node, store, timeout).await?;
    let etcd = reconcile(client, layout, store, timeout).await?;
    let reader = store.clone();
    let received = blocking(move || reader.positions()).await?.received_seq;
    // Fail point (tests): recovery is slow between reading the log's end and fetching past it
    // (on a blocking thread: a sleep there must not hold up the runtime's keepalives).
    blocking(|| {
        fail::fail_point!("primary::slow_recovery", |_| Err(crate::Error::TaskFailed(
            "fail point primary::slow_recovery".into()
        )));
        Ok(())
    })
    .await?;
    if received < etcd.last_seq {
        tracing::info!(from = %received.next()?, through = %etcd.last_seq, "fetching committed batches from etcd");
        let mut pages = BatchPages::new(
            client,
            layout,
            &config.limits,
            received.next()?,
            Some(etcd.last_seq),
            config.etcd_request_timeout,
        );
        let mut decoder = BatchDecoder::new(config.limits.clone())?;
        while let Some(page) = pages.next_page().await? {
            let appending = store.clone();
            decoder = blocking(move || {
                append_verified(&appending, &mut decoder, &page).map(|()| decoder)
            })
            .await?;
        }
    }
    Ok(Resume {
        next_seq: etcd.last_seq.next()?,
        head: etcd.head,
    })
}
