//! The commit pipeline of one term: the sealer and the committer, two tasks joined by a queue
//! of sealed batches.
//!
//! The sealer waits for appends and a free pipeline slot, seals the accumulated appends into a
//! batch (assigning seqs), encodes it and writes it ahead to the local log on a blocking thread, and queues it.
//! The committer commits queued batches one at a time, in seq order, then acknowledges. With two
//! slots (`Double`), the next batch is sealed, encoded and written locally while the previous
//! one is in its etcd round trip; with one (`Single`), appends wait while a batch commits.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinHandle;

use crate::batch::{Batch, BatchEncoder, EncodedBatch};
use crate::error::{Error, Result};
use crate::etcd::commit::{commit_batch, CommitOutcome};
use crate::etcd::{timed, Backoff};
use crate::local_store::blocking;
use crate::primary::accumulator::PendingAppend;
use crate::primary::recovery::Resume;
use crate::primary::{AppendAck, StepDown, Term};
use crate::record::Seq;

/// A batch on its way to etcd, with the appends it answers.
struct SealedBatch {
    encoded: EncodedBatch,
    appends: Vec<(PendingAppend, AppendAck)>,
    /// Its pipeline slot, freed when the batch is answered.
    _slot: OwnedSemaphorePermit,
}

impl SealedBatch {
    fn answer(self, outcome: impl Fn() -> Result<()>) {
        for (append, ack) in self.appends {
            // The caller may have gone away; its answer then has nobody to reach.
            let _ = append.reply.send(outcome().map(|()| ack));
        }
    }
}

/// Why a batch was not committed.
enum CommitFailure {
    /// Never reached etcd, or etcd refused it: certainly not committed.
    NotCommitted(StepDown),
    /// Sent, and neither confirmed nor refused before the deadline or the lease ran out.
    Unknown(String),
}

pub(super) fn spawn(term: Arc<Term>, resume: Resume) -> Result<Vec<JoinHandle<()>>> {
    let encoder = BatchEncoder::new(term.config.limits.clone(), term.config.zstd_level)?;
    let (queue, sealed) = mpsc::unbounded_channel();
    let watchdog_term = term.clone();
    let lost = term.leadership.lost();
    Ok(vec![
        tokio::spawn(seal_loop(term.clone(), queue, encoder, resume.next_seq)),
        tokio::spawn(commit_loop(term, sealed, resume.latest_revision)),
        tokio::spawn(async move {
            let reason = lost.await;
            watchdog_term.step_down(StepDown::LeadershipLost(reason));
        }),
    ])
}

async fn seal_loop(
    term: Arc<Term>,
    queue: mpsc::UnboundedSender<SealedBatch>,
    mut encoder: BatchEncoder,
    mut next_seq: Seq,
) {
    // Seal only once a slot is free, so the batch takes everything that arrived meanwhile.
    while term.accumulator.wait_for_appends().await {
        let Ok(slot) = term.slots.clone().acquire_owned().await else {
            return;
        };
        let Some(pending) = term.accumulator.take_batch() else {
            return;
        };
        if pending.is_empty() {
            continue;
        }
        let count: usize = pending.iter().map(|a| a.records.len()).sum();
        let first_seq = next_seq;
        let batch_end = first_seq.checked_add(count as u64 - 1).and_then(Seq::next);
        let mut records = Vec::with_capacity(count);
        let mut appends = Vec::with_capacity(pending.len());
        for mut append in pending {
            let ack = AppendAck {
                first_seq: next_seq,
                last_seq: Seq(next_seq.0 + append.records.len() as u64 - 1),
            };
            next_seq = Seq(ack.last_seq.0.saturating_add(1));
            records.append(&mut append.records);
            appends.push((append, ack));
        }
        let sealed = batch_end.and_then(|_| Batch::new(term.epoch(), first_seq, records));
        let store = term.store.clone();
        let work = tokio::task::spawn_blocking(move || {
            let encoded = sealed
                .and_then(|batch| encoder.encode(&batch))
                .and_then(|encoded| {
                    store.append_pending(&encoded)?;
                    Ok(encoded)
                });
            (encoder, encoded)
        })
        .await;
        let failure = match work {
            Ok((returned, Ok(encoded))) => {
                encoder = returned;
                if queue
                    .send(SealedBatch {
                        encoded,
                        appends,
                        _slot: slot,
                    })
                    .is_err()
                {
                    return;
                }
                continue;
            }
            Ok((_, Err(e))) => e.to_string(),
            Err(e) => e.to_string(),
        };
        let cause = StepDown::PipelineFailed(format!(
            "sealing the batch at seq {first_seq} failed: {failure}"
        ));
        for (append, _) in appends {
            let _ = append.reply.send(Err(cause.to_error()));
        }
        term.step_down(cause);
        return;
    }
}

async fn commit_loop(
    term: Arc<Term>,
    mut sealed: mpsc::UnboundedReceiver<SealedBatch>,
    mut latest_revision: i64,
) {
    while let Some(batch) = sealed.recv().await {
        if let Some(cause) = term.ended() {
            batch.answer(|| Err(cause.to_error()));
            continue;
        }
        let span = tracing::debug_span!("commit", epoch = %term.epoch(), first_seq = %batch.encoded.first_seq(), last_seq = %batch.encoded.last_seq());
        let _entered = span.enter();
        match commit_resolved(&term, &batch.encoded, latest_revision).await {
            Ok(revision) => {
                latest_revision = revision;
                let last_seq = batch.encoded.last_seq();
                record_commit(&term, &batch);
                let store = term.store.clone();
                let marked = blocking(move || store.mark_committed(last_seq)).await;
                // Committed in etcd is durable: acknowledge even if the local mark failed.
                batch.answer(|| Ok(()));
                term.committed.send_replace(last_seq);
                term.metrics
                    .pending_bytes
                    .set(term.accumulator.pending_bytes() as i64);
                if let Err(e) = marked {
                    term.step_down(StepDown::PipelineFailed(format!(
                        "marking seq {last_seq} committed locally failed: {e}"
                    )));
                }
            }
            Err(CommitFailure::NotCommitted(cause)) => {
                batch.answer(|| Err(cause.to_error()));
                term.step_down(cause);
            }
            Err(CommitFailure::Unknown(reason)) => {
                let (first_seq, last_seq) = (batch.encoded.first_seq(), batch.encoded.last_seq());
                batch.answer(|| {
                    Err(Error::CommitOutcomeUnknown {
                        first_seq,
                        last_seq,
                        reason: reason.clone(),
                    })
                });
                term.step_down(StepDown::LeadershipLost(reason));
            }
        }
    }
}

fn record_commit(term: &Term, batch: &SealedBatch) {
    let metrics = &term.metrics;
    let header = batch.encoded.header();
    metrics.commits.inc();
    metrics
        .committed_records
        .inc_by(u64::from(header.record_count));
    metrics
        .batch_records
        .observe(f64::from(header.record_count));
    metrics
        .batch_bytes
        .observe(batch.encoded.as_bytes().len() as f64);
    metrics.committed_seq.set(header.last_seq().0 as i64);
}

/// Commits one batch, retrying through etcd trouble until the commit deadline or the lease runs
/// out. An attempt whose answer was lost may have committed: the retry's compares then fail and
/// its `Else` branch shows `latest` pointing at this very batch, which settles it as committed.
/// No retry can write the batch twice.
async fn commit_resolved(
    term: &Term,
    batch: &EncodedBatch,
    latest_revision: i64,
) -> Result<i64, CommitFailure> {
    let epoch = term.epoch();
    let deadline = Instant::now() + term.config.commit_deadline;
    let mut kv = term.client.kv_client();
    let mut backoff = Backoff::new(term.config.lease_ttl / 4);
    let mut sent = false;
    loop {
        if !term.leadership.is_held() {
            let reason = "the lease may have expired: no keepalive answered in time".to_owned();
            return Err(if sent {
                CommitFailure::Unknown(reason)
            } else {
                CommitFailure::NotCommitted(StepDown::LeadershipLost(reason))
            });
        }
        let started = Instant::now();
        let attempt = timed(
            term.config.etcd_request_timeout,
            commit_batch(&mut kv, &term.layout, epoch, latest_revision, batch),
        )
        .await;
        match attempt {
            Ok(CommitOutcome::Committed { revision }) => {
                term.metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                return Ok(revision);
            }
            Ok(CommitOutcome::Refused(refusal)) => {
                let ours = refusal.latest.is_some_and(|p| {
                    p.epoch == epoch
                        && p.batch_first_seq == batch.first_seq()
                        && p.last_seq == batch.last_seq()
                });
                if sent && ours {
                    return Ok(refusal.latest_revision);
                }
                let reason = if refusal.is_fenced(epoch) {
                    "fenced"
                } else {
                    "conflict"
                };
                term.metrics
                    .commit_refusals
                    .with_label_values(&[reason])
                    .inc();
                if refusal.is_fenced(epoch) {
                    return Err(CommitFailure::NotCommitted(StepDown::Fenced {
                        epoch,
                        leader_epoch: refusal.leader_epoch,
                    }));
                }
                let moved = format!(
                    "latest moved to revision {} (seq {:?}) under epoch {epoch}'s feet",
                    refusal.latest_revision,
                    refusal.latest.map(|p| p.last_seq)
                );
                return Err(CommitFailure::NotCommitted(StepDown::LeadershipLost(moved)));
            }
            Err(e) => {
                sent = true;
                term.metrics.commit_retries.inc();
                if Instant::now() >= deadline {
                    return Err(CommitFailure::Unknown(format!(
                        "etcd did not confirm within the commit deadline: {e}"
                    )));
                }
                tracing::warn!(error = %e, "commit attempt failed; resolving and retrying");
                backoff.wait().await;
            }
        }
    }
}
