//! The one etcd transaction that commits a run of consecutive batches (most often one).
//!
//! ```text
//! If(   create_revision(leader)          == epoch            -- fencing: still our term
//!   AND value(latest)                    == the batch before's pointer -- chained to it
//!       (create_revision(latest) == 0 for the first batch of an empty cluster)
//!   AND create_revision(batches/<first>) == 0                -- never overwrite a batch
//!       ... for the first seq of each batch of the run )
//! Then( Put(batches/<first>, batch) ... for each batch, Put(latest, the last one's pointer) )
//! Else( Get(leader), Get(latest) )
//! ```
//!
//! A deposed primary's epoch no longer matches the leader key's `create_revision`, so it can
//! never commit, however late its request arrives. The batches and the pointer move in one raft
//! proposal, so a run lands whole or not at all, at one revision; the `Else` branch tells a
//! refused committer why in the same round trip. Batches sealed while every commit was in
//! flight go as one run: one transaction instead of several that etcd, serving each request of
//! a connection on a goroutine of its own, may take out of order.
//!
//! The chain: a commit lands only right after the one before it, because it compares `latest`
//! with the pointer that one writes ([`Head::after`]) — (last seq, epoch, first seq) of one
//! batch, which `latest` holds once and never again. So a committer may send the next batch
//! before the one before is answered and still never commit out of order; nor after a batch
//! that did not land, nor after the parts a refused batch was cut into (the last part's
//! pointer names another first seq).
//!
//! A commit whose answer was lost is in doubt. [`read_commit_view`] reads, at one revision,
//! what settles it, and [`settle`] (pure) decides: the batch key holds our bytes (landed); or
//! it cannot hold them, now or later (absent); or it may still (open), or may have and been
//! trimmed since (unknown). Every compare of the transaction, once false, stays false (an
//! epoch is never reused, `latest` never goes back), so an attempt that did not land by the time
//! the view shows a compare failing for good never will.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, KvClient, Txn, TxnOp, TxnOpResponse};

use crate::batch::EncodedBatch;
use crate::error::Result;
use crate::etcd::trim::parse_trimmed;
use crate::keys::KeyLayout;
use crate::pointer::CommitPointer;
use crate::record::{Epoch, Seq};

/// `latest` as a commit expects to find it: what the batch before it left there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Head {
    /// No batch was ever committed: `latest` does not exist.
    Empty,
    /// `latest` holds these bytes (a [`CommitPointer`], as etcd has them).
    Pointer(Vec<u8>),
}

impl Head {
    /// The head `latest` holds once `batch` committed in `epoch` has landed.
    pub fn after(batch: &EncodedBatch, epoch: Epoch) -> Head {
        Head::Pointer(pointer_of(batch, epoch).encode())
    }

    /// The head of `latest` as read from etcd.
    pub fn read(value: Option<&[u8]>) -> Head {
        value.map_or(Head::Empty, |bytes| Head::Pointer(bytes.to_vec()))
    }
}

fn pointer_of(batch: &EncodedBatch, epoch: Epoch) -> CommitPointer {
    CommitPointer {
        last_seq: batch.last_seq(),
        epoch,
        batch_first_seq: batch.first_seq(),
    }
}

/// Consecutive batches committed in one transaction, oldest first; never empty.
#[derive(Clone, Copy)]
pub struct Run<'a> {
    first: &'a EncodedBatch,
    rest: &'a [Arc<EncodedBatch>],
}

impl<'a> Run<'a> {
    /// A run of one batch.
    pub fn one(batch: &'a EncodedBatch) -> Run<'a> {
        Run {
            first: batch,
            rest: &[],
        }
    }

    /// `first` and the batches right after it, in order. The caller keeps them consecutive.
    pub fn new(first: &'a EncodedBatch, rest: &'a [Arc<EncodedBatch>]) -> Run<'a> {
        Run { first, rest }
    }

    /// The oldest batch: what settles the run (it lands with the others or not at all).
    pub fn first(&self) -> &'a EncodedBatch {
        self.first
    }

    /// The newest batch: what `latest` points at once the run landed.
    pub fn last(&self) -> &'a EncodedBatch {
        self.rest.last().map_or(self.first, |last| last)
    }

    pub fn batches(&self) -> impl Iterator<Item = &'a EncodedBatch> {
        std::iter::once(self.first).chain(self.rest.iter().map(|batch| &**batch))
    }

    /// The encoded bytes of its batches: most of the request's size.
    pub fn bytes(&self) -> usize {
        self.batches().map(|batch| batch.as_bytes().len()).sum()
    }
}

/// The transaction that commits `run` in `epoch`, if `latest` is still `head`.
pub fn commit_txn(layout: &KeyLayout, epoch: Epoch, head: &Head, run: &Run<'_>) -> Txn {
    let pointer = pointer_of(run.last(), epoch);
    let chained = match head {
        Head::Empty => Compare::create_revision(layout.latest(), CompareOp::Equal, 0),
        Head::Pointer(bytes) => Compare::value(layout.latest(), CompareOp::Equal, bytes.clone()),
    };
    let fenced =
        Compare::create_revision(layout.leader(), CompareOp::Equal, epoch_as_revision(epoch));
    let fresh_keys = run.batches().map(|batch| {
        Compare::create_revision(layout.batch(batch.first_seq()), CompareOp::Equal, 0)
    });
    let puts = run
        .batches()
        .map(|batch| TxnOp::put(layout.batch(batch.first_seq()), batch.as_bytes(), None));
    Txn::new()
        .when(
            [fenced, chained]
                .into_iter()
                .chain(fresh_keys)
                .collect::<Vec<_>>(),
        )
        .and_then(
            puts.chain([TxnOp::put(layout.latest(), pointer.encode(), None)])
                .collect::<Vec<_>>(),
        )
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
    /// `latest`'s bytes, as etcd holds them.
    pub latest_value: Option<Vec<u8>>,
}

/// Where `latest` stands against a batch that expected `head`, if it is not `head`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moved {
    /// Still before the batch: the batches before it (ours) have not all landed yet.
    Behind,
    /// At or past the batch's seqs, or after a batch it was not chained to: its compare can
    /// never hold again.
    Past,
}

/// How `latest` (its bytes; `None`: absent) stands against `batch`, sent expecting `head`;
/// `None` if it is `head`.
pub fn moved(latest: Option<&[u8]>, head: &Head, batch: &EncodedBatch) -> Option<Moved> {
    let expected = match head {
        Head::Empty => None,
        Head::Pointer(bytes) => Some(bytes.as_slice()),
    };
    if latest == expected {
        return None;
    }
    match latest.map(CommitPointer::decode) {
        None => Some(Moved::Behind),
        // A seq before the one this batch follows: the chain has not reached it yet.
        Some(Ok(now)) if now.last_seq.next().is_ok_and(|n| n < batch.first_seq()) => {
            Some(Moved::Behind)
        }
        // Where a pointer that does not decode stands is unknown: never taken as behind.
        Some(_) => Some(Moved::Past),
    }
}

impl Refusal {
    /// True when the refusal is because `epoch` no longer leads.
    pub fn is_fenced(&self, epoch: Epoch) -> bool {
        self.leader_epoch != Some(epoch)
    }
}

/// Commits one batch: [`commit_run`] of a run of one.
pub async fn commit_batch(
    kv: &mut KvClient,
    layout: &KeyLayout,
    epoch: Epoch,
    head: &Head,
    batch: &EncodedBatch,
) -> Result<CommitOutcome> {
    commit_run(kv, layout, epoch, head, &Run::one(batch)).await
}

/// Runs [`commit_txn`] and reports its outcome. A `latest` that does not decode is an error:
/// the log's head is unknown, so no commit may follow it.
pub async fn commit_run(
    kv: &mut KvClient,
    layout: &KeyLayout,
    epoch: Epoch,
    head: &Head,
    run: &Run<'_>,
) -> Result<CommitOutcome> {
    let response = kv.txn(commit_txn(layout, epoch, head, run)).await?;
    if response.succeeded() {
        let revision = response.header().map_or(0, |h| h.revision());
        return Ok(CommitOutcome::Committed { revision });
    }
    let mut refusal = Refusal {
        leader_epoch: None,
        latest_revision: 0,
        latest: None,
        latest_value: None,
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
            refusal.latest_value = Some(kv.value().to_vec());
        }
    }
    Ok(CommitOutcome::Refused(refusal))
}

/// What etcd holds, at one revision, that decides whether a batch sent earlier landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitView {
    /// The current leadership's epoch, if anyone leads.
    pub leader_epoch: Option<Epoch>,
    /// What `latest` holds (`None`: absent).
    pub latest: Option<Vec<u8>>,
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

/// Decides from `view` whether `batch`, sent in `epoch` expecting `latest` to be `head`,
/// landed.
pub fn settle(view: &CommitView, epoch: Epoch, head: &Head, batch: &EncodedBatch) -> Settlement {
    match &view.batch {
        // A batch key is never overwritten; another batch under it means ours never can be
        // written (and once that one is trimmed, `latest` has moved past our compare).
        Some(value) if value.as_slice() == batch.as_bytes() => Settlement::Landed,
        Some(_) => Settlement::Absent,
        // Landing moves `latest` past `head`: while it has not, ours has not landed, and can
        // while our term leads.
        None => match moved(view.latest.as_deref(), head, batch) {
            None | Some(Moved::Behind) if view.leader_epoch == Some(epoch) => Settlement::Open,
            None | Some(Moved::Behind) => Settlement::Absent,
            // Past ours without our batch: it landed only if a trim took it since.
            Some(Moved::Past) if batch.first_seq() >= view.trimmed => Settlement::Absent,
            Some(Moved::Past) => Settlement::Unknown,
        },
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
        latest: None,
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
            CommitPointer::decode(kv.value())?;
            view.latest = Some(kv.value().to_vec());
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

    fn encoded(first: u64) -> EncodedBatch {
        let records = vec![Record::put("a", "1"), Record::put("b", "2")];
        let batch = Batch::new(EPOCH, Seq(first), records).expect("a valid batch");
        BatchEncoder::new(Limits::default(), 1)
            .expect("default limits")
            .encode(&batch)
            .expect("encodes")
    }

    /// Ours: seqs 11..=12 in epoch 7, encoded once (the encoding carries its seal time).
    fn ours() -> &'static EncodedBatch {
        static OURS: std::sync::OnceLock<EncodedBatch> = std::sync::OnceLock::new();
        OURS.get_or_init(|| encoded(11))
    }

    /// `latest` as a batch `first..=last` committed in `epoch` leaves it.
    fn at(last: u64, epoch: u64, first: u64) -> Vec<u8> {
        let pointer = CommitPointer {
            last_seq: Seq(last),
            epoch: Epoch(epoch),
            batch_first_seq: Seq(first),
        };
        pointer.encode()
    }

    /// What ours was sent expecting: the batch 5..=10 of our epoch before it.
    fn head() -> Head {
        Head::Pointer(at(10, 7, 5))
    }

    fn view(leader: Option<u64>, latest: Option<Vec<u8>>, batch: Option<Vec<u8>>) -> CommitView {
        view_trimmed(leader, latest, batch, 1)
    }

    fn view_trimmed(
        leader: Option<u64>,
        latest: Option<Vec<u8>>,
        batch: Option<Vec<u8>>,
        trimmed: u64,
    ) -> CommitView {
        CommitView {
            leader_epoch: leader.map(Epoch),
            latest,
            batch,
            trimmed: Seq(trimmed),
        }
    }

    fn settled(view: &CommitView) -> Settlement {
        settle(view, EPOCH, &head(), ours())
    }

    #[test]
    fn a_batch_leaves_latest_pointing_at_its_seqs_in_its_epoch() {
        assert_eq!(Head::after(ours(), EPOCH), Head::Pointer(at(12, 7, 11)));
    }

    #[test]
    fn latest_at_the_expected_head_has_not_moved() {
        assert_eq!(moved(Some(&at(10, 7, 5)), &head(), ours()), None);
        assert_eq!(moved(None, &Head::Empty, &encoded(1)), None);
    }

    #[test]
    fn latest_before_the_batch_it_follows_is_behind() {
        assert_eq!(
            moved(Some(&at(4, 7, 1)), &head(), ours()),
            Some(Moved::Behind)
        );
        assert_eq!(moved(None, &head(), ours()), Some(Moved::Behind));
    }

    #[test]
    fn latest_at_our_seqs_or_after_another_batch_is_past() {
        for latest in [at(12, 7, 11), at(30, 9, 13), at(10, 7, 8), b"junk".to_vec()] {
            assert_eq!(
                moved(Some(&latest), &head(), ours()),
                Some(Moved::Past),
                "{latest:?}"
            );
        }
    }

    #[test]
    fn our_bytes_under_the_batch_key_landed_whoever_leads_now() {
        let bytes = Some(ours().as_bytes().to_vec());
        for leader in [Some(7), Some(9), None] {
            let latest = Some(at(30, 9, 13));
            assert_eq!(
                settled(&view(leader, latest, bytes.clone())),
                Settlement::Landed
            );
        }
        let latest = Some(at(12, 7, 11));
        assert_eq!(settled(&view(Some(7), latest, bytes)), Settlement::Landed);
    }

    #[test]
    fn another_batch_under_the_key_means_ours_never_lands() {
        let theirs = Some(b"another epoch's batch".to_vec());
        let latest = Some(at(30, 9, 11));
        assert_eq!(settled(&view(Some(9), latest, theirs)), Settlement::Absent);
    }

    #[test]
    fn latest_at_our_head_or_behind_it_while_we_lead_is_still_open() {
        for latest in [Some(at(10, 7, 5)), Some(at(4, 7, 1)), None] {
            assert_eq!(settled(&view(Some(7), latest, None)), Settlement::Open);
        }
    }

    #[test]
    fn latest_at_our_head_or_behind_it_and_fenced_can_never_land() {
        for leader in [Some(9), None] {
            for latest in [Some(at(10, 7, 5)), Some(at(4, 7, 1))] {
                assert_eq!(settled(&view(leader, latest, None)), Settlement::Absent);
            }
        }
    }

    #[test]
    fn latest_past_ours_without_our_batch_and_nothing_trimmed_past_it_is_absent() {
        for trimmed in [1, 11] {
            let latest = Some(at(30, 9, 13));
            assert_eq!(
                settled(&view_trimmed(Some(9), latest, None, trimmed)),
                Settlement::Absent
            );
        }
        // The batch before ours was cut into parts: the last part's pointer is not our head.
        let after_parts = Some(at(10, 7, 8));
        assert_eq!(
            settled(&view(Some(7), after_parts, None)),
            Settlement::Absent
        );
    }

    #[test]
    fn latest_past_ours_and_trimmed_past_our_batch_cannot_be_told() {
        for trimmed in [12, 500] {
            let latest = Some(at(600, 9, 590));
            assert_eq!(
                settled(&view_trimmed(Some(9), latest, None, trimmed)),
                Settlement::Unknown
            );
        }
    }

    #[test]
    fn an_empty_cluster_sent_against_no_latest_is_open_until_latest_appears() {
        let first = encoded(1);
        let open = settle(&view(Some(7), None, None), EPOCH, &Head::Empty, &first);
        assert_eq!(open, Settlement::Open);
        let theirs = view(Some(9), Some(at(3, 9, 1)), None);
        let moved = settle(&theirs, EPOCH, &Head::Empty, &first);
        assert_eq!(moved, Settlement::Absent);
    }
}
