//! Retention of the log in etcd. etcd is the commit layer, not an archive: the primary deletes
//! old batches, in a transaction fenced on its leadership, together with the `trimmed` pointer
//! (the lowest seq still in etcd), so readers can always tell "trimmed" from "missing".
//!
//! ```text
//! If(   create_revision(leader) == epoch
//!       mod_revision(members/*) <= the revision the members were read at )
//! Then( DeleteRange(batches/ .. batches/<trimmed>), Put(trimmed, "<trimmed>") )
//! Else( Get(leader) )
//! ```
//!
//! The second compare makes the decision and the trim one step: a standby that registers (or
//! a node that puts a snapshot hold) between the primary's read of the members and its trim
//! makes the trim fail instead of passing it.
//!
//! Where to trim ([`trim_point`]) is pure: below what every live standby still needs and the
//! primary's applied seq (where its snapshots start), but never into the retained tail
//! (`retain_records`, `retain_seconds`); and, past `max_etcd_log_bytes`, the oldest batches go
//! even if a lagging standby needs them (it will bootstrap from a snapshot). It trims only
//! what its index of etcd's batches proves.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, Txn, TxnOp, TxnOpResponse};

use crate::error::{Error, Result};
use crate::etcd::commit::epoch_as_revision;
use crate::etcd::timed;
use crate::keys::KeyLayout;
use crate::local_store::LoggedBatch;
use crate::record::{Epoch, Seq};

/// How much of the log etcd keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Always keep at least this many of the newest records. Default 100,000.
    pub retain_records: u64,
    /// Always keep the batches sealed in this last stretch of time. Default 60 s.
    pub retain_seconds: u64,
    /// Never keep more encoded bytes of batches than this. Default 512 MiB (a quarter of etcd's
    /// default 2 GiB quota: old revisions and compaction need room too).
    pub max_etcd_log_bytes: u64,
    /// How often the primary considers trimming. Default 5 s.
    pub interval: Duration,
    /// Compact etcd's revision history behind each trim (one trim behind, so a reader's view
    /// at an older revision stays readable for an interval). Default on.
    pub compact: bool,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            retain_records: 100_000,
            retain_seconds: 60,
            max_etcd_log_bytes: 512 << 20,
            interval: Duration::from_secs(5),
            compact: true,
        }
    }
}

/// The new `trimmed` (the first seq of the oldest batch to keep), when it is past `trimmed`.
///
/// `batches` are the batches in etcd, oldest first, as far as the trimmer knows them: from
/// `trimmed`, or from a later batch when its local log starts after `trimmed`. `members` are
/// the received seqs of the live standbys; `applied` the primary's own applied seq, where the
/// snapshots it serves start. Only what the index proves is trimmed: the byte budget counts
/// only a complete index, and the point is always the start of an indexed batch at or below
/// what must be kept. The newest batch is always kept.
pub fn trim_point(
    batches: &[LoggedBatch],
    members: &[Seq],
    applied: Seq,
    retention: &Retention,
    now_micros: u64,
    trimmed: Seq,
) -> Option<Seq> {
    let newest = batches.last()?;
    let complete = batches.first().is_some_and(|b| b.first_seq <= trimmed);
    // The tail to keep whatever the standbys need.
    let keep_records = Seq(newest
        .last_seq
        .0
        .saturating_sub(retention.retain_records)
        .saturating_add(1));
    let cutoff = now_micros.saturating_sub(retention.retain_seconds.saturating_mul(1_000_000));
    let keep_recent = batches
        .iter()
        .find(|b| b.sealed_at_micros >= cutoff)
        .map_or(newest.first_seq, |b| b.first_seq);
    let mut keep_from = keep_records.min(keep_recent);
    // What the live standbys still need; one already trimmed past needs a snapshot instead,
    // and must not hold trimming back for the others.
    let needed = members.iter().map(|m| Seq(m.0.saturating_add(1)));
    if let Some(lowest) = needed.filter(|&next| next >= trimmed).min() {
        keep_from = keep_from.min(lowest);
    }
    // The primary's snapshots start at its applied seq: the log must go on from there, even
    // when that is below `trimmed` already (a new primary's state behind the log): trimming
    // waits for it then, rather than leave every snapshot it serves unfollowable.
    keep_from = keep_from.min(Seq(applied.0.saturating_add(1)));
    // The byte budget wins over everything but the newest batch: etcd's quota is the cluster's
    // to lose. It counts only an index that starts at `trimmed`, or it would cut etcd back to
    // the index's first batch whatever fits.
    if complete {
        let mut kept_bytes = 0u64;
        let mut budget_floor = newest.first_seq;
        for batch in batches.iter().rev() {
            kept_bytes = kept_bytes.saturating_add(batch.bytes);
            if kept_bytes > retention.max_etcd_log_bytes && batch.first_seq != newest.first_seq {
                break;
            }
            budget_floor = batch.first_seq;
        }
        keep_from = keep_from.max(budget_floor);
    }
    keep_from = keep_from.min(newest.first_seq);
    // Only whole batches go: keep the one holding `keep_from`; below the index, nothing is
    // known to end where a trim could cut.
    let holder = batches.iter().find(|b| b.last_seq >= keep_from)?;
    let point = holder.first_seq;
    (point > trimmed && point <= keep_from.max(trimmed)).then_some(point)
}

/// The fenced transaction that deletes every batch below `below` and records it as `trimmed`,
/// if no member registration changed after `members_revision`.
pub fn trim_txn(layout: &KeyLayout, epoch: Epoch, below: Seq, members_revision: i64) -> Txn {
    Txn::new()
        .when([
            Compare::create_revision(layout.leader(), CompareOp::Equal, epoch_as_revision(epoch)),
            Compare::mod_revision(
                layout.members_prefix(),
                CompareOp::Less,
                members_revision.saturating_add(1),
            )
            .with_prefix(),
        ])
        .and_then([
            TxnOp::delete(
                layout.batches_prefix(),
                Some(DeleteOptions::new().with_range(layout.batch(below))),
            ),
            TxnOp::put(layout.trimmed(), below.0.to_string(), None),
        ])
        .or_else([TxnOp::get(layout.leader(), None)])
}

/// What became of a trim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrimOutcome {
    /// The batches are gone and `trimmed` moved, at this revision.
    Trimmed { revision: i64 },
    /// A member registration changed after the members were read: nothing was deleted; decide
    /// again on a fresh read.
    MembersMoved,
}

/// Runs [`trim_txn`]; `Fenced` if `epoch` no longer leads.
pub async fn trim(
    client: &Client,
    layout: &KeyLayout,
    epoch: Epoch,
    below: Seq,
    members_revision: i64,
    request_timeout: Duration,
) -> Result<TrimOutcome> {
    let txn = trim_txn(layout, epoch, below, members_revision);
    let response = timed(request_timeout, client.kv_client().txn(txn)).await?;
    if response.succeeded() {
        let revision = response.header().map_or(0, |h| h.revision());
        return Ok(TrimOutcome::Trimmed { revision });
    }
    let leader_epoch = response.op_responses().iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .and_then(|kv| u64::try_from(kv.create_revision()).ok())
            .map(Epoch),
        _ => None,
    });
    if leader_epoch == Some(epoch) {
        return Ok(TrimOutcome::MembersMoved);
    }
    Err(Error::Fenced {
        epoch,
        leader_epoch,
    })
}

/// The lowest seq still in etcd: 1 until the first trim.
pub async fn read_trimmed(
    client: &Client,
    layout: &KeyLayout,
    request_timeout: Duration,
) -> Result<Seq> {
    let response = timed(
        request_timeout,
        client.kv_client().get(layout.trimmed(), None),
    )
    .await?;
    parse_trimmed(response.kvs().first().map(|kv| kv.value()))
}

/// The value of `trimmed` (`None`: the key is absent, nothing was ever trimmed).
pub(crate) fn parse_trimmed(value: Option<&[u8]>) -> Result<Seq> {
    let Some(value) = value else {
        return Ok(Seq(1));
    };
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .map(Seq)
        .ok_or_else(|| {
            Error::CorruptPointer(format!(
                "trimmed is {:?}, not a seq",
                String::from_utf8_lossy(value)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ten batches of 100 records and 1,000 bytes, sealed one second apart, the last at 100 s.
    fn log() -> Vec<LoggedBatch> {
        (0..10u64)
            .map(|i| LoggedBatch {
                first_seq: Seq(1 + 100 * i),
                last_seq: Seq(100 * (i + 1)),
                bytes: 1_000,
                sealed_at_micros: (91 + i) * 1_000_000,
            })
            .collect()
    }

    fn retention(records: u64, seconds: u64, bytes: u64) -> Retention {
        Retention {
            retain_records: records,
            retain_seconds: seconds,
            max_etcd_log_bytes: bytes,
            ..Retention::default()
        }
    }

    const NOW: u64 = 100_000_000;
    /// A primary that has applied everything: its own position holds nothing back.
    const ALL: Seq = Seq(u64::MAX - 1);

    #[test]
    fn keeps_the_retained_records_and_trims_at_a_batch_boundary() {
        let point = trim_point(&log(), &[], ALL, &retention(250, 0, u64::MAX), NOW, Seq(1));
        assert_eq!(
            point,
            Some(Seq(701)),
            "seqs 751..=1000 live in batches from 701"
        );
    }

    #[test]
    fn keeps_the_batches_sealed_within_the_retained_seconds() {
        let point = trim_point(&log(), &[], ALL, &retention(0, 3, u64::MAX), NOW, Seq(1));
        assert_eq!(point, Some(Seq(601)), "sealed at 97 s or later");
    }

    #[test]
    fn a_live_standby_holds_trimming_back_to_what_it_still_needs() {
        let point = trim_point(
            &log(),
            &[Seq(300)],
            ALL,
            &retention(0, 0, u64::MAX),
            NOW,
            Seq(1),
        );
        assert_eq!(point, Some(Seq(301)));
        let behind = trim_point(
            &log(),
            &[Seq(900), Seq(0)],
            ALL,
            &retention(0, 0, u64::MAX),
            NOW,
            Seq(1),
        );
        assert_eq!(behind, None, "a standby with nothing received needs seq 1");
    }

    #[test]
    fn a_standby_already_trimmed_past_does_not_hold_trimming_back() {
        let batches = &log()[3..];
        let point = trim_point(
            batches,
            &[Seq(100)],
            ALL,
            &retention(0, 0, u64::MAX),
            NOW,
            Seq(301),
        );
        assert_eq!(point, Some(Seq(901)));
    }

    #[test]
    fn the_byte_budget_trims_past_a_lagging_standby() {
        let point = trim_point(
            &log(),
            &[Seq(100)],
            ALL,
            &retention(0, 0, 3_500),
            NOW,
            Seq(1),
        );
        assert_eq!(point, Some(Seq(701)), "three batches fit 3,500 bytes");
    }

    #[test]
    fn the_newest_batch_is_always_kept() {
        let point = trim_point(&log(), &[], ALL, &retention(0, 0, 0), NOW, Seq(1));
        assert_eq!(point, Some(Seq(901)));
    }

    #[test]
    fn nothing_to_trim_below_what_is_already_trimmed() {
        let point = trim_point(
            &log()[7..],
            &[],
            ALL,
            &retention(250, 0, u64::MAX),
            NOW,
            Seq(701),
        );
        assert_eq!(point, None);
        assert_eq!(
            trim_point(&[], &[], ALL, &retention(0, 0, 0), NOW, Seq(1)),
            None
        );
    }

    #[test]
    fn an_index_that_starts_after_trimmed_does_not_count_against_the_byte_budget() {
        // The local log starts at seq 501; etcd holds the log from seq 1.
        let point = trim_point(
            &log()[5..],
            &[Seq(100)],
            ALL,
            &retention(0, 0, u64::MAX),
            NOW,
            Seq(1),
        );
        assert_eq!(
            point, None,
            "a standby needs seq 101, below what the index covers"
        );
        let retained = trim_point(
            &log()[5..],
            &[],
            ALL,
            &retention(700, 0, u64::MAX),
            NOW,
            Seq(1),
        );
        assert_eq!(
            retained, None,
            "the retained tail reaches seq 301, below the index"
        );
    }

    #[test]
    fn an_index_that_starts_after_trimmed_still_trims_what_it_covers() {
        let point = trim_point(
            &log()[5..],
            &[],
            ALL,
            &retention(250, 0, u64::MAX),
            NOW,
            Seq(1),
        );
        assert_eq!(point, Some(Seq(701)));
    }

    #[test]
    fn the_primarys_applied_seq_holds_trimming_back() {
        let point = trim_point(
            &log(),
            &[],
            Seq(450),
            &retention(0, 0, u64::MAX),
            NOW,
            Seq(1),
        );
        assert_eq!(
            point,
            Some(Seq(401)),
            "its snapshot at 450 must be followable from 451"
        );
    }

    #[test]
    fn a_primary_applied_below_trimmed_stops_trimming_until_it_catches_up() {
        let point = trim_point(
            &log()[3..],
            &[],
            Seq(100),
            &retention(0, 0, u64::MAX),
            NOW,
            Seq(301),
        );
        assert_eq!(point, None);
    }

    #[test]
    fn the_byte_budget_trims_past_the_primarys_applied_seq() {
        let point = trim_point(&log(), &[], Seq(100), &retention(0, 0, 3_500), NOW, Seq(1));
        assert_eq!(point, Some(Seq(701)));
    }
}
