//! The primary's retention task: every `retention.interval`, trims the batches in etcd that no
//! live standby needs and the retained tail does not hold ([`crate::etcd::trim`]), then
//! compacts etcd's revision history behind the previous trim.
//!
//! It indexes the batches etcd holds from the local log, which has the same batches (the log
//! is a prefix of etcd's, and local retention never drops what etcd still holds): one full scan
//! when the term starts, then only the new batches.

use std::sync::Arc;

use etcd_client::{CompactionOptions, GetOptions};

use super::{StepDown, Term};
use crate::batch::unix_micros_now;
use crate::error::{Error, Result};
use crate::etcd::timed;
use crate::etcd::trim::{read_trimmed, trim, trim_point, TrimOutcome};
use crate::local_store::{blocking, LoggedBatch};
use crate::record::Seq;
use crate::standby::membership::MemberInfo;

pub(super) async fn run(term: Arc<Term>) {
    let mut trimmer = Trimmer {
        term,
        index: Vec::new(),
        trimmed: None,
        last_trim_revision: None,
    };
    loop {
        tokio::time::sleep(trimmer.term.config.retention.interval).await;
        if trimmer.term.ended().is_some() {
            return;
        }
        match trimmer.trim_once().await {
            Ok(()) => {}
            Err(Error::Fenced {
                epoch,
                leader_epoch,
            }) => {
                trimmer.term.step_down(StepDown::Fenced {
                    epoch,
                    leader_epoch,
                });
                return;
            }
            Err(e) => {
                trimmer
                    .term
                    .metrics
                    .etcd_errors
                    .with_label_values(&["trim"])
                    .inc();
                tracing::warn!(error = %e, "trimming failed; trying again next interval");
            }
        }
    }
}

struct Trimmer {
    term: Arc<Term>,
    /// The batches in etcd, oldest first, as far as the local log has received them.
    index: Vec<LoggedBatch>,
    /// The lowest seq in etcd, once read.
    trimmed: Option<Seq>,
    /// The revision of the last trim: compaction runs one trim behind.
    last_trim_revision: Option<i64>,
}

impl Trimmer {
    async fn trim_once(&mut self) -> Result<()> {
        let term = &self.term;
        let timeout = term.config.etcd_request_timeout;
        let trimmed = match self.trimmed {
            Some(trimmed) => trimmed,
            None => read_trimmed(&term.client, &term.layout, timeout).await?,
        };
        self.trimmed = Some(trimmed);
        let from = self.index.last().map_or(trimmed, |b| Seq(b.last_seq.0 + 1));
        let store = term.store.clone();
        let new = blocking(move || store.logged_batches(from)).await?;
        self.index.extend(new);
        self.index.retain(|b| b.first_seq >= trimmed);
        term.metrics
            .etcd_log_bytes
            .set(self.index.iter().map(|b| b.bytes).sum::<u64>() as i64);

        // The primary's own applied state is where the snapshots it serves start: trimming past
        // it would send a bootstrapping standby a snapshot the log no longer follows on from.
        let store = term.store.clone();
        let applied = blocking(move || store.positions()).await?.applied_seq;
        let (members, members_revision) = self.member_positions().await?;
        let retention = &term.config.retention;
        let now = unix_micros_now();
        let Some(point) = trim_point(&self.index, &members, applied, retention, now, trimmed)
        else {
            return Ok(());
        };
        let outcome = trim(
            &term.client,
            &term.layout,
            term.epoch(),
            point,
            members_revision,
            timeout,
        )
        .await?;
        let TrimOutcome::Trimmed { revision } = outcome else {
            tracing::debug!(below = %point, "a member registration changed while deciding; deciding again next interval");
            return Ok(());
        };
        tracing::info!(from = %trimmed, below = %point, revision, "trimmed the log in etcd");
        self.trimmed = Some(point);
        self.index.retain(|b| b.first_seq >= point);
        term.metrics.trimmed_seq.set(point.0 as i64);
        term.metrics.trims.inc();
        term.metrics
            .etcd_log_bytes
            .set(self.index.iter().map(|b| b.bytes).sum::<u64>() as i64);
        // Fail point (tests): the trimmer is slow between its trim and the compaction, time
        // enough for its term to be deposed (on a blocking thread, so that the sleep holds up
        // nothing else).
        blocking(|| {
            fail::fail_point!("trimmer::pause_before_compact");
            Ok(())
        })
        .await?;
        // Compaction is etcd-wide: only a term that still surely leads, right after its own
        // fenced trim, runs it.
        if retention.compact && term.leadership.is_held() && term.ended().is_none() {
            if let Some(behind) = self.last_trim_revision.replace(revision) {
                let mut kv = term.client.kv_client();
                timed(timeout, kv.compact(behind, None::<CompactionOptions>)).await?;
                term.metrics.compactions.inc();
            }
        }
        Ok(())
    }

    /// The received seqs of the live standbys (a standby whose lease expired is gone), and the
    /// revision they were read at.
    async fn member_positions(&self) -> Result<(Vec<Seq>, i64)> {
        let term = &self.term;
        let response = timed(
            term.config.etcd_request_timeout,
            term.client.kv_client().get(
                term.layout.members_prefix(),
                Some(GetOptions::new().with_prefix()),
            ),
        )
        .await?;
        let mut positions = Vec::new();
        for kv in response.kvs() {
            match MemberInfo::decode(kv.value()) {
                Ok(member) => positions.push(member.received_seq),
                Err(e) => tracing::warn!(error = %e, "ignoring an unreadable member registration"),
            }
        }
        // Without a header, 0: any registration then fails the trim's compare, the safe way.
        let revision = response.header().map_or(0, |h| h.revision());
        Ok((positions, revision))
    }
}
