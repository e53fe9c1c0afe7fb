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
//!
//! A commit whose answer was lost is in doubt. [`read_commit_view`] reads, at one revision,
//! what settles it, and [`settle`] (pure) decides: the batch key holds our bytes (landed); or
//! it cannot hold them, now or later (absent); or it may still (open), or may have and been
//! trimmed since (unknown). Every compare of the transaction, once false, stays false (a
//! revision only grows, an epoch is never reused), so an attempt that did not land by the time
//! the view shows a compare failing never will.

use etcd_client::{Compare, CompareOp, KvClient, Txn, TxnOp, TxnOpResponse};

use crate::batch::EncodedBatch;
use crate::error::Result;
use crate::etcd::trim::parse_trimmed;
use crate::keys::KeyLayout;
use crate::pointer::CommitPointer;
use crate::record::{Epoch, Seq};

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

/// What etcd holds, at one revision, that decides whether a batch sent earlier landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitView {
    /// The current leadership's epoch, if anyone leads.
    pub leader_epoch: Option<Epoch>,
    /// The `mod_revision` of `latest` (0 if absent).
    pub latest_revision: i64,
    /// The value under the batch's key, if any.
    pub batch: Option<Vec<u8>>,
    /// The lowest seq still in etcd.
    pub trimmed: Seq,
}

/// What became of a batch whose commit was sent but not answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// It is in etcd.
    Landed,
    /// It is not in etcd, and no attempt of it can land any more.
    Absent,
    /// It is not in etcd yet, but an attempt still under way could land: retrying is safe
    /// (the retry has the same compares), giving up is not.
    Open,
    /// It may have landed and been trimmed since: nothing left in etcd can tell.
    Unknown,
}

/// Decides from `view` whether `batch`, sent in `epoch` comparing `latest` against
/// `latest_revision`, landed.
pub fn settle(
    view: &CommitView,
    epoch: Epoch,
    latest_revision: i64,
    batch: &EncodedBatch,
) -> Settlement {
    match &view.batch {
        // A batch key is never overwritten; another batch under it means ours never can be
        // written (and once that one is trimmed, `latest` has moved past our compare).
        Some(value) if value.as_slice() == batch.as_bytes() => Settlement::Landed,
        Some(_) => Settlement::Absent,
        // Landing moves `latest`: while it has not moved, ours has not landed.
        None if view.latest_revision == latest_revision => {
            if view.leader_epoch == Some(epoch) {
                Settlement::Open
            } else {
                Settlement::Absent
            }
        }
        // `latest` moved without our batch: it landed only if a trim took it since.
        None if batch.first_seq() >= view.trimmed => Settlement::Absent,
        None => Settlement::Unknown,
    }
}

/// Reads what [`settle`] needs about `batch`, in one transaction (one revision).
pub async fn read_commit_view(
    kv: &mut KvClient,
    layout: &KeyLayout,
    batch: &EncodedBatch,
) -> Result<CommitView> {
    let batch_key = layout.batch(batch.first_seq());
    let response = kv
        .txn(Txn::new().and_then([
            TxnOp::get(layout.leader(), None),
            TxnOp::get(layout.latest(), None),
            TxnOp::get(batch_key.clone(), None),
            TxnOp::get(layout.trimmed(), None),
        ]))
        .await?;
    let mut view = CommitView {
        leader_epoch: None,
        latest_revision: 0,
        batch: None,
        trimmed: Seq(1),
    };
    let mut trimmed = None;
    for op in response.op_responses() {
        let TxnOpResponse::Get(get) = op else {
            continue;
        };
        let Some(kv) = get.kvs().first() else {
            continue;
        };
        let key = kv.key();
        if key == layout.leader().as_bytes() {
            view.leader_epoch = u64::try_from(kv.create_revision()).ok().map(Epoch);
        } else if key == layout.latest().as_bytes() {
            view.latest_revision = kv.mod_revision();
        } else if key == batch_key.as_bytes() {
            view.batch = Some(kv.value().to_vec());
        } else if key == layout.trimmed().as_bytes() {
            trimmed = Some(kv.value().to_vec());
        }
    }
    view.trimmed = parse_trimmed(trimmed.as_deref())?;
    Ok(view)
}

/// etcd revisions are `i64`; epochs come from them, so they always fit.
pub(crate) fn epoch_as_revision(epoch: Epoch) -> i64 {
    i64::try_from(epoch.0).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{Batch, BatchEncoder};
    use crate::limits::Limits;
    use crate::record::Record;

    const EPOCH: Epoch = Epoch(7);
    const SENT_AGAINST: i64 = 40;

    /// Ours: seqs 11..=12 in epoch 7, encoded once (the encoding carries its seal time).
    fn ours() -> &'static EncodedBatch {
        static OURS: std::sync::OnceLock<EncodedBatch> = std::sync::OnceLock::new();
        OURS.get_or_init(|| {
            let records = vec![Record::put("a", "1"), Record::put("b", "2")];
            let batch = Batch::new(EPOCH, Seq(11), records).expect("a valid batch");
            BatchEncoder::new(Limits::default(), 1)
                .expect("default limits")
                .encode(&batch)
                .expect("encodes")
        })
    }

    fn view(leader: Option<u64>, latest: i64, batch: Option<Vec<u8>>, trimmed: u64) -> CommitView {
        CommitView {
            leader_epoch: leader.map(Epoch),
            latest_revision: latest,
            batch,
            trimmed: Seq(trimmed),
        }
    }

    fn settled(view: &CommitView) -> Settlement {
        settle(view, EPOCH, SENT_AGAINST, ours())
    }

    #[test]
    fn our_bytes_under_the_batch_key_landed_whoever_leads_now() {
        let bytes = Some(ours().as_bytes().to_vec());
        for leader in [Some(7), Some(9), None] {
            assert_eq!(
                settled(&view(leader, 45, bytes.clone(), 1)),
                Settlement::Landed
            );
        }
        assert_eq!(settled(&view(Some(7), 41, bytes, 1)), Settlement::Landed);
    }

    #[test]
    fn another_batch_under_the_key_means_ours_never_lands() {
        let theirs = Some(b"another epoch's batch".to_vec());
        assert_eq!(settled(&view(Some(9), 45, theirs, 1)), Settlement::Absent);
    }

    #[test]
    fn latest_unmoved_while_we_lead_is_still_open() {
        assert_eq!(
            settled(&view(Some(7), SENT_AGAINST, None, 1)),
            Settlement::Open
        );
    }

    #[test]
    fn latest_unmoved_and_fenced_can_never_land() {
        for leader in [Some(9), None] {
            assert_eq!(
                settled(&view(leader, SENT_AGAINST, None, 1)),
                Settlement::Absent
            );
        }
    }

    #[test]
    fn latest_moved_without_our_batch_and_nothing_trimmed_past_it_is_absent() {
        for trimmed in [1, 11] {
            assert_eq!(
                settled(&view(Some(9), 45, None, trimmed)),
                Settlement::Absent
            );
        }
        assert_eq!(settled(&view(Some(7), 45, None, 1)), Settlement::Absent);
    }

    #[test]
    fn latest_moved_and_trimmed_past_our_batch_cannot_be_told() {
        assert_eq!(settled(&view(Some(9), 45, None, 12)), Settlement::Unknown);
        assert_eq!(settled(&view(Some(9), 45, None, 500)), Settlement::Unknown);
    }

    #[test]
    fn an_empty_cluster_sent_against_no_latest_is_open_until_latest_appears() {
        let first = settle(&view(Some(7), 0, None, 1), EPOCH, 0, ours());
        assert_eq!(first, Settlement::Open);
        let moved = settle(&view(Some(9), 45, None, 1), EPOCH, 0, ours());
        assert_eq!(moved, Settlement::Absent);
    }
}
