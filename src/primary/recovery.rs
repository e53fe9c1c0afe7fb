//! The start of a term: make the local log exactly etcd's committed log, and find where to go on.
//!
//! Every batch past the local `received_seq` was written ahead and never confirmed: it is
//! dropped (if it was in fact committed, it comes back from etcd with the rest). Committed
//! batches the local log lacks are read from etcd, verified, and appended. The term then takes
//! appends at etcd's last seq + 1, comparing against `latest`'s current revision.

use std::sync::Arc;

use etcd_client::Client;

use crate::batch::BatchDecoder;
use crate::config::PrimaryConfig;
use crate::error::{Error, Result};
use crate::etcd::fetch::{append_verified, BatchPages};
use crate::etcd::timed;
use crate::keys::KeyLayout;
use crate::local_store::{blocking, LocalStore};
use crate::pointer::CommitPointer;
use crate::record::Seq;

/// Where a term starts.
pub(crate) struct Resume {
    pub next_seq: Seq,
    /// `latest`'s mod revision, or 0 when the cluster has no commit yet.
    pub latest_revision: i64,
}

pub(crate) async fn recover(
    client: &Client,
    layout: &KeyLayout,
    store: &Arc<LocalStore>,
    config: &PrimaryConfig,
) -> Result<Resume> {
    let response = timed(
        config.etcd_request_timeout,
        client.kv_client().get(layout.latest(), None),
    )
    .await?;
    let (etcd_last, latest_revision) = match response.kvs().first() {
        Some(kv) => (
            CommitPointer::decode(kv.value())?.last_seq,
            kv.mod_revision(),
        ),
        None => (Seq::NONE, 0),
    };
    let reader = store.clone();
    let local = blocking(move || reader.positions()).await?;
    if local.received_seq > etcd_last {
        return Err(Error::EtcdBehindLocal {
            local: local.received_seq,
            etcd: etcd_last,
        });
    }
    if local.log_end_seq > local.received_seq {
        tracing::info!(from = %local.received_seq.next()?, through = %local.log_end_seq, "dropping unconfirmed write-ahead batches");
        let truncating = store.clone();
        blocking(move || truncating.truncate_after(local.received_seq)).await?;
    }
    if local.received_seq < etcd_last {
        tracing::info!(from = %local.received_seq.next()?, through = %etcd_last, "fetching committed batches from etcd");
        let mut pages = BatchPages::new(
            client,
            layout,
            &config.limits,
            local.received_seq.next()?,
            Some(etcd_last),
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
        next_seq: etcd_last.next()?,
        latest_revision,
    })
}
