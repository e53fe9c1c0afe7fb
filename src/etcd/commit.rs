//! The one etcd transaction that commits a batch.
//!
//! ```text
//! If(   create_revision(leader)          == epoch                 -- fencing: still our term
//!   AND mod_revision(latest)             == the revision last seen -- nobody else moved the log
//!       (create_revision(latest) == 0 for the first batch of an empty cluster)
//!   AND create_revision(batches/<first>) == 0 )                   -- never overwrite a batch
//! Then( Put(batches/<first>, batch), Put(latest, pointer) )
//! Else( Get(leader), Get(latest) )
//! ```
//!
//! A deposed primary's epoch no longer matches the leader key's `create_revision`, so it can
//! never commit, however late its request arrives. The batch and the pointer move in one raft
//! proposal; the `Else` branch tells a refused committer why in the same round trip.

use etcd_client::{Compare, CompareOp, KvClient, Txn, TxnOp, TxnOpResponse};

use crate::batch::EncodedBatch;
use crate::error::Result;
use crate::keys::KeyLayout;
use crate::pointer::CommitPointer;
use crate::record::Epoch;

/// The transaction that commits `batch` in `epoch`, if `latest` still has `latest_revision`
/// (0: `latest` does not exist yet).
pub fn commit_txn(
    layout: &KeyLayout,
    epoch: Epoch,
    latest_revision: i64,
    batch: &EncodedBatch,
) -> Txn {
    let batch_key = layout.batch(batch.first_seq());
    let pointer = CommitPointer {
        last_seq: batch.last_seq(),
        epoch,
        batch_first_seq: batch.first_seq(),
    };
    let latest_unchanged = match latest_revision {
        0 => Compare::create_revision(layout.latest(), CompareOp::Equal, 0),
        revision => Compare::mod_revision(layout.latest(), CompareOp::Equal, revision),
    };
    Txn::new()
        .when([
            Compare::create_revision(layout.leader(), CompareOp::Equal, epoch_as_revision(epoch)),
            latest_unchanged,
            Compare::create_revision(batch_key.clone(), CompareOp::Equal, 0),
        ])
        .and_then([
            TxnOp::put(batch_key, batch.as_bytes(), None),
            TxnOp::put(layout.latest(), pointer.encode(), None),
        ])
        .or_else([
            TxnOp::get(layout.leader(), None),
            TxnOp::get(layout.latest(), None),
        ])
}

/// What happened to a commit transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The batch and the pointer are in etcd at `revision`, which `latest` now carries.
    Committed { revision: i64 },
    /// A compare failed; nothing was written.
    Refused(Refusal),
}

/// What etcd held when it refused a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The current leadership's epoch, if anyone leads.
    pub leader_epoch: Option<Epoch>,
    /// The `mod_revision` of `latest` (0 if absent).
    pub latest_revision: i64,
    pub latest: Option<CommitPointer>,
}

impl Refusal {
    /// True when the refusal is because `epoch` no longer leads.
    pub fn is_fenced(&self, epoch: Epoch) -> bool {
        self.leader_epoch != Some(epoch)
    }
}

/// Runs [`commit_txn`] and reports its outcome. A `latest` that does not decode is an error:
/// the log's head is unknown, so no commit may follow it.
pub async fn commit_batch(
    kv: &mut KvClient,
    layout: &KeyLayout,
    epoch: Epoch,
    latest_revision: i64,
    batch: &EncodedBatch,
) -> Result<CommitOutcome> {
    let response = kv
        .txn(commit_txn(layout, epoch, latest_revision, batch))
        .await?;
    if response.succeeded() {
        let revision = response.header().map_or(0, |h| h.revision());
        return Ok(CommitOutcome::Committed { revision });
    }
    let mut refusal = Refusal {
        leader_epoch: None,
        latest_revision: 0,
        latest: None,
    };
    for op in response.op_responses() {
        let TxnOpResponse::Get(get) = op else {
            continue;
        };
        let Some(kv) = get.kvs().first() else {
            continue;
        };
        if kv.key() == layout.leader().as_bytes() {
            refusal.leader_epoch = u64::try_from(kv.create_revision()).ok().map(Epoch);
        } else if kv.key() == layout.latest().as_bytes() {
            refusal.latest_revision = kv.mod_revision();
            refusal.latest = Some(CommitPointer::decode(kv.value())?);
        }
    }
    Ok(CommitOutcome::Refused(refusal))
}

/// etcd revisions are `i64`; epochs come from them, so they always fit.
pub(crate) fn epoch_as_revision(epoch: Epoch) -> i64 {
    i64::try_from(epoch.0).unwrap_or(i64::MAX)
}
