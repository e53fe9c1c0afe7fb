//! The commit pipeline of one term: the sealer, the committer, and the local log writer.
//!
//! The sealer waits for appends and a free pipeline slot, then for the batch to fill or the
//! committer to be free (natural group commit), seals the accumulated appends into a batch
//! (assigning seqs), encodes it on a blocking thread, and hands it both to the committer
//! and to the local log writer. The committer keeps up to `max_commits_in_flight` commit
//! transactions on their way, each carrying the batches that waited for it (a run) and chained
//! to the batch before it (`etcd::commit`), and acknowledges each batch, in seq order, as soon
//! as etcd has it. The local log writer writes each batch ahead to the local log while its
//! transaction runs, and moves `received_seq` over it once etcd has committed it, then tells
//! the applier. In the `Double` pipeline the next batches are sealed and encoded while earlier
//! ones are in their etcd round trip; in the `Single` one (one slot), appends wait while a
//! batch commits. A batch etcd refuses as over its request limit is cut between its
//! appends into smaller batches, committed in its place with the same seqs
//! ([`super::request_cap`]). No sled write is on the commit path: sled stalls every write while a
//! transaction (the applier's) runs, and the commit path must not wait for the state. The local
//! log writer's queue is bounded, so a local log that falls far behind slows the sealer rather
//! than growing memory.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use etcd_client::KvClient;
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::batch::{Batch, BatchDecoder, BatchEncoder, EncodedBatch};
use crate::config::MAX_BATCHES_PER_COMMIT;
use crate::error::{Error, Result};
use crate::etcd::commit::{
    commit_run, moved, read_commit_view, settle, CommitOutcome, Head, Moved, Run, Settlement,
};
use crate::etcd::{request_too_large, timed, Backoff};
use crate::local_store::blocking;
use crate::primary::accumulator::PendingAppend;
use crate::primary::recovery::Resume;
use crate::primary::request_cap::{self, RequestCap};
use crate::primary::{AppendAck, StepDown, Term};
use crate::record::Seq;
use crate::supervise::{run_to_end, unless_panicked};

/// Sealed batches that may wait for the local log writer; past it the sealer waits.
const LOCAL_LOG_QUEUE: usize = 16;

/// A batch on its way to etcd, with the appends it answers.
struct SealedBatch {
    encoded: Arc<EncodedBatch>,
    appends: Vec<(PendingAppend, AppendAck)>,
    /// Its pipeline slot, freed when the batch is answered (shared by the parts of a batch
    /// that was cut: freed when the last is).
    _slot: Arc<OwnedSemaphorePermit>,
}

impl SealedBatch {
    fn answer(mut self, outcome: impl Fn() -> Result<()>) {
        for (append, ack) in std::mem::take(&mut self.appends) {
            // The caller may have gone away; its answer then has nobody to reach.
            let _ = append.reply.send(outcome().map(|()| ack));
        }
    }
}

impl Drop for SealedBatch {
    /// A batch dropped unanswered lost its committer (aborted, or panicked) at a point where
    /// its transaction may have been sent: "not committed" would not be provable.
    fn drop(&mut self) {
        if self.appends.is_empty() {
            return;
        }
        let (first_seq, last_seq) = (self.encoded.first_seq(), self.encoded.last_seq());
        for (append, _) in std::mem::take(&mut self.appends) {
            let _ = append.reply.send(Err(Error::CommitOutcomeUnknown {
                first_seq,
                last_seq,
                reason: "the committer stopped before its outcome was known".into(),
            }));
        }
    }
}

/// Consecutive sealed batches that go to etcd in one transaction: never empty.
struct SealedRun {
    first: SealedBatch,
    rest: Vec<SealedBatch>,
}

impl SealedRun {
    fn last(&self) -> &SealedBatch {
        self.rest.last().unwrap_or(&self.first)
    }

    fn len(&self) -> usize {
        1 + self.rest.len()
    }

    fn into_batches(self) -> impl DoubleEndedIterator<Item = SealedBatch> {
        std::iter::once(self.first).chain(self.rest)
    }
}

/// What the local log writer is asked to do, in order.
enum LocalWrite {
    /// Write a sealed batch ahead of its commit.
    Ahead(Arc<EncodedBatch>),
    /// Replace a batch written ahead by the parts it was cut into: the local log keeps etcd's
    /// batch boundaries, which the trimmer indexes and `mark_committed` moves along.
    Cut(Vec<Arc<EncodedBatch>>),
}

/// Why a batch was not committed.
enum CommitFailure {
    /// Never reached etcd, or etcd refused it: certainly not committed.
    NotCommitted(StepDown),
    /// etcd refused a request of `bytes` as over its limit before proposing it: not committed,
    /// and to be cut into batches etcd takes.
    TooLarge { bytes: usize },
    /// Sent, and neither confirmed nor refused before the deadline or the lease ran out.
    Unknown(String),
    /// Refused because the batch before it had not landed yet (`etcd::commit::Moved::Behind`)
    /// while our term leads: to be sent again, with the same compares, once that one has.
    /// `sent`: an earlier attempt went unanswered, and may still land.
    Behind { sent: bool },
}

/// The running tasks of a term's pipeline.
pub(super) struct Tasks {
    /// The sealer and the committer: they end by themselves once the term has ended, the
    /// committer only after settling the batch it has in flight.
    pub commit_path: [JoinHandle<()>; 2],
    /// The leadership watchdog and the trimmer: aborted on shutdown.
    pub helpers: Vec<JoinHandle<()>>,
    /// The local log writer: ends by itself once the sealer and the committer are gone and
    /// everything committed is marked.
    pub local_log: JoinHandle<()>,
}

pub(super) fn spawn(
    term: Arc<Term>,
    resume: Resume,
    committed: watch::Sender<Seq>,
    received: watch::Sender<Seq>,
) -> Result<Tasks> {
    let encoder = BatchEncoder::new(term.config.limits.clone(), term.config.zstd_level)?;
    let (to_committer, sealed) = mpsc::unbounded_channel();
    let (to_local_log, written_ahead) = mpsc::channel(LOCAL_LOG_QUEUE);
    let cutter = Cutter {
        encoder: Some(BatchEncoder::new(
            term.config.limits.clone(),
            term.config.zstd_level,
        )?),
        decoder: Some(BatchDecoder::new(term.config.limits.clone())?),
        to_local_log: to_local_log.clone(),
    };
    let watchdog_term = term.clone();
    let lost = term.leadership.lost();
    let local_log = supervised(
        &term,
        "local log writer",
        local_log_loop(term.clone(), written_ahead, committed.subscribe(), received),
    );
    let outputs = SealerOutputs {
        to_committer,
        to_local_log,
    };
    Ok(Tasks {
        commit_path: [
            supervised(
                &term,
                "sealer",
                seal_loop(term.clone(), outputs, encoder, resume.next_seq),
            ),
            supervised(
                &term,
                "committer",
                commit_loop(term.clone(), sealed, resume.head, committed, cutter),
            ),
        ],
        helpers: vec![tokio::spawn(async move {
            let reason = lost.await;
            watchdog_term.step_down(StepDown::LeadershipLost(reason));
        })],
        local_log,
    })
}

/// Runs one of the term's tasks. Should it end while the term runs — a panic, or a return that
/// nothing asked for — the term steps down: a task gone in silence would leave a primary that
/// holds its lease while its appends wait for ever.
pub(super) fn supervised(
    term: &Arc<Term>,
    name: &'static str,
    task: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    let term = term.clone();
    tokio::spawn(async move {
        let how = run_to_end(task).await;
        if term.ended().is_none() {
            term.step_down(StepDown::PipelineFailed(format!("the {name} task {how}")));
        }
    })
}

/// Where the sealer sends each sealed batch.
struct SealerOutputs {
    to_committer: mpsc::UnboundedSender<SealedBatch>,
    /// Bounded: batches leave their pipeline slot once acknowledged, so without a bound a slow
    /// local log could let committed-but-unwritten batches pile up in memory.
    to_local_log: mpsc::Sender<LocalWrite>,
}

async fn seal_loop(
    term: Arc<Term>,
    outputs: SealerOutputs,
    mut encoder: BatchEncoder,
    mut next_seq: Seq,
) {
    // Seal only once a slot is free, so the batch takes everything that arrived meanwhile.
    while term.accumulator.wait_for_appends().await {
        let Ok(slot) = term.slots.clone().acquire_owned().await else {
            return;
        };
        // Natural group commit: while every commit transaction is in flight, this batch keeps
        // filling; it is sealed once full (to go with the next transaction), or once a commit
        // is answered.
        let max_in_flight = term.config.commits_in_flight();
        while !seal_now(
            term.commit_load.busy(),
            max_in_flight,
            term.accumulator.is_full(),
        ) {
            term.accumulator.sealer_woken().await;
        }
        let Some(pending) = term.accumulator.take_batch() else {
            return;
        };
        if pending.is_empty() {
            continue;
        }
        let count: usize = pending.iter().map(|a| a.records.len()).sum();
        let first_seq = next_seq;
        let mut records = Vec::with_capacity(count);
        let mut appends = Vec::with_capacity(pending.len());
        for mut append in pending {
            let ack = AppendAck {
                first_seq: next_seq,
                last_seq: Seq(next_seq.0.saturating_add(append.records.len() as u64 - 1)),
            };
            next_seq = Seq(ack.last_seq.0.saturating_add(1));
            records.append(&mut append.records);
            appends.push((append, ack));
        }
        let epoch = term.epoch();
        let sealing = Instant::now();
        let work = tokio::task::spawn_blocking(move || {
            // Batch::new refuses a run of seqs that would pass u64::MAX.
            let encoded =
                Batch::new(epoch, first_seq, records).and_then(|batch| encoder.encode(&batch));
            (encoder, encoded)
        })
        .await;
        let failure = match work {
            Ok((returned, Ok(encoded))) => {
                term.metrics
                    .seal_seconds
                    .observe(sealing.elapsed().as_secs_f64());
                encoder = returned;
                let encoded = Arc::new(encoded);
                let sealed = SealedBatch {
                    encoded: encoded.clone(),
                    appends,
                    _slot: Arc::new(slot),
                };
                // Either receiver gone means the term is over; the batch was never sent.
                let not_sent = || Err(term.ended().unwrap_or(StepDown::ShuttingDown).to_error());
                let write = LocalWrite::Ahead(encoded);
                if outputs.to_local_log.send(write).await.is_err() {
                    sealed.answer(not_sent);
                    return;
                }
                term.commit_load.sealed();
                if let Err(mpsc::error::SendError(sealed)) = outputs.to_committer.send(sealed) {
                    sealed.answer(not_sent);
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

/// Whether the sealer seals the batch it fills now: once the committer could send it at once
/// (`busy`, its transactions in flight and those it has yet to send, below `max_in_flight`),
/// or once the batch is full.
fn seal_now(busy: usize, max_in_flight: usize, full: bool) -> bool {
    full || busy < max_in_flight
}

/// How busy the committer is, for the sealer to judge whether a batch sealed now goes out at
/// once.
#[derive(Default)]
pub(super) struct CommitLoad {
    /// Commit transactions on their way (the committer's window).
    in_flight: AtomicUsize,
    /// Batches sealed that the committer has not taken yet.
    unsent: AtomicUsize,
}

impl CommitLoad {
    /// Transactions in flight, plus one for the batches sealed and not yet sent, which go
    /// together in the next.
    fn busy(&self) -> usize {
        let unsent = self.unsent.load(Ordering::SeqCst).min(1);
        self.in_flight.load(Ordering::SeqCst) + unsent
    }

    fn sealed(&self) {
        self.unsent.fetch_add(1, Ordering::SeqCst);
    }

    fn taken(&self) {
        self.unsent.fetch_sub(1, Ordering::SeqCst);
    }

    fn set_in_flight(&self, in_flight: usize) {
        self.in_flight.store(in_flight, Ordering::SeqCst);
    }
}

/// The sealed batches on their way from the sealer, as the committer takes them.
struct FromSealer {
    receiver: mpsc::UnboundedReceiver<SealedBatch>,
    open: bool,
}

impl FromSealer {
    /// The next sealed batch if one is waiting.
    fn try_take(&mut self, term: &Term) -> Option<SealedBatch> {
        if !self.open {
            return None;
        }
        match self.receiver.try_recv() {
            Ok(batch) => {
                term.commit_load.taken();
                Some(batch)
            }
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                self.open = false;
                None
            }
        }
    }

    /// The next sealed batch, once one is sealed; `None` once the sealer is gone.
    async fn take(&mut self, term: &Term) -> Option<SealedBatch> {
        if !self.open {
            return None;
        }
        let batch = self.receiver.recv().await;
        match &batch {
            Some(_) => term.commit_load.taken(),
            None => self.open = false,
        }
        batch
    }
}

/// The runs of batches whose commit transactions are on their way, oldest first, each with
/// what its transaction expects `latest` to be.
///
/// The committer polls every attempt itself, in the order they were sent (`FuturesOrdered`
/// polls new futures in the order they were pushed), so each transaction reaches etcd's
/// connection after the one it is chained to. Attempts spawned as tasks of their own did not:
/// tokio runs the task spawned last first (its LIFO slot), and a transaction that overtakes
/// its predecessor is refused as behind and costs a round trip.
struct Window {
    runs: VecDeque<(SealedRun, Head)>,
    attempts: FuturesOrdered<Attempt>,
}

type Attempt = Pin<Box<dyn Future<Output = Result<Landed, CommitFailure>> + Send>>;

impl Window {
    fn new() -> Self {
        Window {
            runs: VecDeque::new(),
            attempts: FuturesOrdered::new(),
        }
    }

    fn len(&self) -> usize {
        self.runs.len()
    }

    fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Sends the transaction of `run`, chained to `head`; `sent`: an attempt of it went
    /// unanswered.
    fn send(&mut self, term: &Arc<Term>, run: SealedRun, head: Head, sent: bool) {
        let (attempting, chained_to) = (term.clone(), head.clone());
        let first = run.first.encoded.clone();
        let rest: Vec<Arc<EncodedBatch>> = run.rest.iter().map(|b| b.encoded.clone()).collect();
        // Instrumented, never entered across an await: an entered span would leak into
        // whatever else ran on the thread meanwhile.
        let span = tracing::debug_span!("commit", epoch = %term.epoch(), first_seq = %first.first_seq(), last_seq = %run.last().encoded.last_seq(), batches = run.len());
        let attempt = async move {
            // Fail point (tests): the process dies here, as with SIGKILL, with the batch sealed
            // and going to the local log but not yet sent to etcd.
            fail::fail_point!("pipeline::abort_before_commit", |_| std::process::abort());
            commit_resolved(&attempting, &Run::new(&first, &rest), &chained_to, sent).await
        }
        .instrument(span);
        // A panic in one attempt answers its batches as in doubt, as a failed task would,
        // rather than taking the committer and every other batch in the window with it.
        let attempt = unless_panicked(attempt).map(|ended| {
            ended.unwrap_or_else(|panicked| {
                Err(CommitFailure::Unknown(format!(
                    "the attempt to commit it {panicked}"
                )))
            })
        });
        self.attempts.push_back(Box::pin(attempt));
        self.runs.push_back((run, head));
    }

    /// The oldest run once its attempt is answered (later ones may be answered meanwhile;
    /// their answers wait their turn). Never ready while the window is empty.
    async fn oldest_answered(&mut self) -> (SealedRun, Head, Result<Landed, CommitFailure>) {
        loop {
            match self.attempts.next().await {
                Some(result) => {
                    if let Some((run, head)) = self.runs.pop_front() {
                        return (run, head, result);
                    }
                }
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// The runs in the window, in order, their attempts dropped unanswered: an attempt
    /// already sent may still land, which the run's next attempt is told (`sent`) where it
    /// matters.
    fn abandon(&mut self) -> Vec<(SealedRun, Head)> {
        self.attempts = FuturesOrdered::new();
        self.runs.drain(..).collect()
    }
}

/// Commits the sealed batches in seq order with up to `max_commits_in_flight` transactions
/// on their way at once, and answers them in that order. Batches waiting when a transaction
/// can go are sent together in it, as one run (up to [`MAX_BATCHES_PER_COMMIT`], within
/// [`run_budget`]). Each transaction is chained to the run before it (`etcd::commit`), so one
/// sent before its predecessor landed is refused as behind and sent again once the
/// predecessor is answered; a run that fails takes the ones chained to it along, each answered
/// with what etcd proves of it.
async fn commit_loop(
    term: Arc<Term>,
    sealed: mpsc::UnboundedReceiver<SealedBatch>,
    head: Head,
    committed: watch::Sender<Seq>,
    mut cutter: Cutter,
) {
    let max_in_flight = term.config.commits_in_flight();
    let mut sealed = FromSealer {
        receiver: sealed,
        open: true,
    };
    // Batches to send before anything newly sealed: parts of a batch etcd refused as too
    // large, the batches of a run it refused as too large, and the runs chained to them.
    let mut queued: VecDeque<SealedBatch> = VecDeque::new();
    let mut window = Window::new();
    // What the next run sent is chained to.
    let mut next_head = head;
    loop {
        while window.len() < max_in_flight {
            let first = match queued.pop_front().or_else(|| sealed.try_take(&term)) {
                Some(batch) => batch,
                None if window.is_empty() => match sealed.take(&term).await {
                    Some(batch) => batch,
                    None => break,
                },
                None => break,
            };
            if let Some(cause) = term.ended() {
                first.answer(|| Err(cause.to_error()));
                continue;
            }
            let run = gather_run(&term, first, &mut queued, &mut sealed);
            let after = Head::after(&run.last().encoded, term.epoch());
            let chained_to = std::mem::replace(&mut next_head, after);
            window.send(&term, run, chained_to, false);
        }
        term.commit_load.set_in_flight(window.len());
        // The oldest is answered first; meanwhile a newly sealed batch may join the window.
        let room = window.len() < max_in_flight && sealed.open && queued.is_empty();
        if window.is_empty() {
            if !sealed.open && queued.is_empty() {
                return;
            }
            continue;
        }
        let (run, head, result) = tokio::select! {
            answered = window.oldest_answered() => answered,
            batch = sealed.take(&term), if room => {
                queued.extend(batch);
                continue;
            }
        };
        term.commit_load.set_in_flight(window.len());
        match result {
            Ok(landed) => acknowledge(&term, run, landed, &committed),
            Err(CommitFailure::Behind { sent }) => {
                // etcd took it before the run before it, which has landed since: the same
                // transaction again, safe to repeat. Those chained after it most likely met the
                // same fate, or will: they go again right behind it, in order, rather than a
                // round trip each. Their attempts may still be on their way (`sent`).
                let rest = window.abandon();
                window.send(&term, run, head, sent);
                for (later, chained_to) in rest {
                    window.send(&term, later, chained_to, true);
                }
            }
            Err(CommitFailure::TooLarge { bytes }) => {
                // Not proposed; those chained to it can never land: send them again after
                // it, cut — a run into its batches, a batch into parts — under a lower cap.
                let rest = window.abandon();
                next_head = head;
                for (later, _) in rest.into_iter().rev() {
                    for batch in later.into_batches().rev() {
                        queued.push_front(batch);
                    }
                }
                let cap = term.learn_refusal(bytes);
                term.metrics
                    .commit_refusals
                    .with_label_values(&["too_large"])
                    .inc();
                let parts = if run.rest.is_empty() {
                    cutter.cut(&term, run.first, bytes, cap).await
                } else {
                    tracing::warn!(
                        bytes,
                        cap = cap.max_batch_bytes,
                        batches = run.len(),
                        "etcd refused a run of batches as too large; sending them in smaller runs"
                    );
                    run.into_batches().collect()
                };
                for part in parts.into_iter().rev() {
                    queued.push_front(part);
                }
            }
            Err(CommitFailure::NotCommitted(cause)) => {
                // It can never land, so neither can those chained to it.
                for batch in run.into_batches() {
                    batch.answer(|| Err(cause.to_error()));
                }
                for (later, _) in window.abandon() {
                    for batch in later.into_batches() {
                        batch.answer(|| Err(cause.to_error()));
                    }
                }
                term.step_down(cause);
            }
            Err(CommitFailure::Unknown(reason)) => {
                for batch in run.into_batches() {
                    let (first_seq, last_seq) =
                        (batch.encoded.first_seq(), batch.encoded.last_seq());
                    batch.answer(|| {
                        Err(Error::CommitOutcomeUnknown {
                            first_seq,
                            last_seq,
                            reason: reason.clone(),
                        })
                    });
                }
                // Those chained to it settle for themselves, the term having ended.
                term.step_down(StepDown::LeadershipLost(reason));
            }
        }
    }
}

/// `first` and the batches waiting right behind it that go in the same transaction: up to
/// [`MAX_BATCHES_PER_COMMIT`], within [`run_budget`] bytes. One that does not fit waits at the
/// front of `queued` for the next.
fn gather_run(
    term: &Term,
    first: SealedBatch,
    queued: &mut VecDeque<SealedBatch>,
    sealed: &mut FromSealer,
) -> SealedRun {
    let budget = run_budget(term);
    let mut bytes = first.encoded.as_bytes().len();
    let mut run = SealedRun {
        first,
        rest: Vec::new(),
    };
    while run.len() < MAX_BATCHES_PER_COMMIT {
        let Some(next) = queued.pop_front().or_else(|| sealed.try_take(term)) else {
            break;
        };
        let next_bytes = next.encoded.as_bytes().len();
        if bytes + next_bytes > budget {
            queued.push_front(next);
            break;
        }
        bytes += next_bytes;
        run.rest.push(next);
    }
    run
}

/// The encoded bytes a run of more than one batch may have: one batch's payload cap, as
/// etcd's refusals lowered it — about what etcd takes best in one proposal, and below any
/// request it refused.
fn run_budget(term: &Term) -> usize {
    term.request_cap().max_batch_bytes
}

/// Answers the batches of a run etcd has, in order: the local log may mark them, their appends
/// are acknowledged, and their slots are free for the sealer.
fn acknowledge(term: &Term, run: SealedRun, landed: Landed, committed: &watch::Sender<Seq>) {
    // Fail point (tests): the process dies here, committed in etcd but not yet acknowledged.
    fail::fail_point!("pipeline::abort_before_ack", |_| std::process::abort());
    term.metrics.commit_transactions.inc();
    for batch in run.into_batches() {
        record_commit(term, &batch);
        committed.send_replace(batch.encoded.last_seq());
        batch.answer(|| Ok(()));
    }
    if let Some(cause) = landed.then {
        term.step_down(cause);
        return;
    }
    term.accumulator.wake_sealer();
    term.metrics
        .pending_bytes
        .set(term.accumulator.pending_bytes() as i64);
}

/// Cuts batches etcd refused as too large into parts it takes.
struct Cutter {
    /// Moved to a blocking thread while a batch is cut, and back.
    encoder: Option<BatchEncoder>,
    decoder: Option<BatchDecoder>,
    to_local_log: mpsc::Sender<LocalWrite>,
}

impl Cutter {
    /// Cuts `batch`, refused at `bytes`, between its appends into parts under `cap` (what the
    /// term learned from the refusal; re-encoded, same seqs), and has the local log replace it
    /// by them; the parts, to be committed in its place. A batch of one append cannot be cut:
    /// that append is refused, and the term ends (module [`request_cap`]).
    async fn cut(
        &mut self,
        term: &Term,
        mut batch: SealedBatch,
        bytes: usize,
        cap: RequestCap,
    ) -> Vec<SealedBatch> {
        let sizes: Vec<usize> = batch.appends.iter().map(|(a, _)| a.bytes).collect();
        if sizes.len() == 1 {
            tracing::warn!(bytes, cap = cap.max_batch_bytes, "etcd refused a batch of one append as too large; refusing the append and stepping down");
            batch.answer(|| {
                Err(Error::RecordOverEtcdLimit {
                    bytes: sizes[0],
                    refused: bytes,
                    cap: cap.max_batch_bytes,
                })
            });
            term.step_down(StepDown::RequestTooLarge {
                bytes,
                cap: cap.max_batch_bytes,
            });
            return Vec::new();
        }
        let runs = request_cap::cut(&sizes, cap.max_batch_bytes);
        tracing::warn!(
            bytes,
            cap = cap.max_batch_bytes,
            parts = runs.len(),
            "etcd refused a batch as too large; committing it in smaller batches"
        );
        let encoded = match self
            .encode_parts(&batch.encoded, &batch.appends, &runs)
            .await
        {
            Ok(encoded) => encoded,
            Err(e) => {
                let cause = StepDown::PipelineFailed(format!(
                    "cutting the batch at seq {} etcd refused as too large failed: {e}",
                    batch.encoded.first_seq()
                ));
                batch.answer(|| Err(cause.to_error()));
                term.step_down(cause);
                return Vec::new();
            }
        };
        if self
            .to_local_log
            .send(LocalWrite::Cut(encoded.clone()))
            .await
            .is_err()
        {
            let cause = term.ended().unwrap_or(StepDown::ShuttingDown);
            batch.answer(|| Err(cause.to_error()));
            return Vec::new();
        }
        let slot = batch._slot.clone();
        let mut appends = std::mem::take(&mut batch.appends).into_iter();
        runs.iter()
            .zip(encoded)
            .map(|(&len, encoded)| SealedBatch {
                encoded,
                appends: appends.by_ref().take(len).collect(),
                _slot: slot.clone(),
            })
            .collect()
    }

    /// The parts of `encoded`, `runs` appends each, encoded on a blocking thread.
    async fn encode_parts(
        &mut self,
        encoded: &Arc<EncodedBatch>,
        appends: &[(PendingAppend, AppendAck)],
        runs: &[usize],
    ) -> Result<Vec<Arc<EncodedBatch>>> {
        let mut lens = Vec::with_capacity(runs.len());
        let mut at = 0;
        for &run in runs {
            let records = appends[at..at + run]
                .iter()
                .map(|(_, ack)| (ack.last_seq.0 - ack.first_seq.0 + 1) as usize);
            lens.push(records.sum());
            at += run;
        }
        let (Some(mut encoder), Some(mut decoder)) = (self.encoder.take(), self.decoder.take())
        else {
            return Err(Error::Encode(
                "the cutter's codec was lost to an earlier failure".into(),
            ));
        };
        let whole = encoded.clone();
        let (encoder, decoder, parts) = tokio::task::spawn_blocking(move || {
            let parts = decoder
                .decode(whole.as_bytes())
                .map_err(Error::from)
                .and_then(|batch| batch.cut(&lens))
                .and_then(|parts| {
                    parts
                        .iter()
                        .map(|part| encoder.encode(part).map(Arc::new))
                        .collect::<Result<Vec<_>>>()
                });
            (encoder, decoder, parts)
        })
        .await
        .map_err(|e| Error::TaskFailed(format!("cutting a batch: {e}")))?;
        self.encoder = Some(encoder);
        self.decoder = Some(decoder);
        parts
    }
}

/// Writes each sealed batch ahead to the local log, and moves `received_seq` over what etcd
/// has committed and the log holds, then tells the applier. Once the sealer and the committer
/// are gone, it marks what is left to mark and ends, which in turn ends the applier.
async fn local_log_loop(
    term: Arc<Term>,
    mut writes: mpsc::Receiver<LocalWrite>,
    mut committed: watch::Receiver<Seq>,
    received: watch::Sender<Seq>,
) {
    let mut written = *received.borrow();
    let (mut writers_open, mut committer_open) = (true, true);
    loop {
        // Every write queued goes first: the committer queues a cut before it commits the
        // first part, so the seq marked below always ends a batch in the local log.
        while writers_open {
            match writes.try_recv() {
                Ok(write) => match write_locally(&term, write).await {
                    Some(end) => written = written.max(end),
                    None => return,
                },
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => writers_open = false,
            }
        }
        // Both are batch ends, so the smaller one is too.
        let markable = written.min(*committed.borrow_and_update());
        if markable > *received.borrow() {
            let store = term.store.clone();
            if let Err(e) = blocking(move || store.mark_committed(markable)).await {
                term.step_down(StepDown::PipelineFailed(format!(
                    "marking seq {markable} committed locally failed: {e}"
                )));
                return;
            }
            term.metrics.received_seq.set(markable.0 as i64);
            received.send_replace(markable);
            continue;
        }
        if !writers_open && !committer_open {
            return;
        }
        tokio::select! {
            write = writes.recv(), if writers_open => match write {
                Some(write) => match write_locally(&term, write).await {
                    Some(end) => written = written.max(end),
                    None => return,
                },
                None => writers_open = false,
            },
            changed = committed.changed(), if committer_open => committer_open = changed.is_ok(),
        }
    }
}

/// Does one local write; the end of what the log now holds, or `None` once it failed (the term
/// then steps down).
async fn write_locally(term: &Term, write: LocalWrite) -> Option<Seq> {
    let store = term.store.clone();
    let (last_seq, done) = match write {
        LocalWrite::Ahead(batch) => {
            let last_seq = batch.last_seq();
            (
                last_seq,
                blocking(move || store.append_pending(&batch)).await,
            )
        }
        LocalWrite::Cut(parts) => {
            let last_seq = parts.last().map_or(Seq::NONE, |p| p.last_seq());
            (
                last_seq,
                blocking(move || store.replace_pending(&parts)).await,
            )
        }
    };
    match done {
        Ok(()) => Some(last_seq),
        Err(e) => {
            term.step_down(StepDown::PipelineFailed(format!(
                "writing the batch ending at seq {last_seq} to the local log failed: {e}"
            )));
            None
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
    metrics.saw_committed(header.last_seq());
}

/// Commits one run of batches, retrying through etcd trouble until the commit deadline or the
/// lease runs out. Retries have the same compares, so none can write a batch twice. Once an
/// attempt was sent unanswered, every way out but a confirmed commit first settles it from
/// etcd by its first batch ([`settle`]; the run lands whole or not at all): an attempt that
/// landed is acknowledged, whatever refused the ones after it; "not committed" is answered
/// only where etcd proves it.
async fn commit_resolved(
    term: &Term,
    run: &Run<'_>,
    head: &Head,
    mut sent: bool,
) -> Result<Landed, CommitFailure> {
    let batch = run.first();
    let epoch = term.epoch();
    let deadline = Instant::now() + term.config.commit_deadline;
    let mut kv = term.client.kv_client();
    let mut backoff = Backoff::new(term.config.lease_ttl / 4);
    loop {
        if !term.leadership.is_held() {
            // A term that ended (shutdown, a step-down) gave its leadership up first.
            let cause = term.ended().unwrap_or_else(|| {
                StepDown::LeadershipLost(
                    "the lease may have expired: no keepalive answered in time".to_owned(),
                )
            });
            if !sent {
                return Err(CommitFailure::NotCommitted(cause));
            }
            return settle_in_doubt(term, &mut kv, batch, head, cause).await;
        }
        let started = Instant::now();
        let attempt = timed(
            term.config.etcd_request_timeout,
            commit_run(&mut kv, &term.layout, epoch, head, run),
        )
        .await;
        match attempt {
            Ok(CommitOutcome::Committed { .. }) => {
                term.metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                return Ok(Landed { then: None });
            }
            Ok(CommitOutcome::Refused(refusal)) => {
                let fenced = refusal.is_fenced(epoch);
                let latest = refusal.latest_value.as_deref();
                if !fenced && moved(latest, head, batch) == Some(Moved::Behind) {
                    term.metrics
                        .commit_refusals
                        .with_label_values(&["behind"])
                        .inc();
                    return Err(CommitFailure::Behind { sent });
                }
                term.metrics
                    .commit_refusals
                    .with_label_values(&[if fenced { "fenced" } else { "conflict" }])
                    .inc();
                let cause = if fenced {
                    StepDown::Fenced {
                        epoch,
                        leader_epoch: refusal.leader_epoch,
                    }
                } else {
                    StepDown::LeadershipLost(format!(
                        "latest moved to revision {} (seq {:?}) under epoch {epoch}'s feet",
                        refusal.latest_revision,
                        refusal.latest.map(|p| p.last_seq)
                    ))
                };
                if !sent {
                    return Err(CommitFailure::NotCommitted(cause));
                }
                // An earlier attempt may be what refused this one, or may have landed before
                // a new leader moved the log on.
                return settle_in_doubt(term, &mut kv, batch, head, cause).await;
            }
            // etcd refuses an oversized request before proposing it: nothing was written.
            Err(e) if !sent && request_too_large(&e) => {
                return Err(CommitFailure::TooLarge { bytes: run.bytes() });
            }
            Err(e) => {
                sent = true;
                term.metrics.commit_retries.inc();
                term.metrics
                    .etcd_errors
                    .with_label_values(&["commit"])
                    .inc();
                if Instant::now() >= deadline {
                    let cause = StepDown::LeadershipLost(format!(
                        "etcd did not confirm within the commit deadline: {e}"
                    ));
                    return settle_in_doubt(term, &mut kv, batch, head, cause).await;
                }
                tracing::warn!(error = %e, "commit attempt failed; resolving and retrying");
                backoff.wait().await;
            }
        }
    }
}

/// A batch etcd has.
struct Landed {
    /// Why the term ends after answering it, if it does: it landed, but another epoch leads.
    then: Option<StepDown>,
}

/// Settles a batch sent unanswered (or answered only by the refusal of a later attempt) from one
/// read of etcd. `cause` is why the term would end were it not committed.
async fn settle_in_doubt(
    term: &Term,
    kv: &mut KvClient,
    batch: &EncodedBatch,
    head: &Head,
    cause: StepDown,
) -> Result<Landed, CommitFailure> {
    let epoch = term.epoch();
    let read = timed(
        term.config.etcd_request_timeout,
        read_commit_view(kv, &term.layout, batch),
    )
    .await;
    let view = match read {
        Ok(view) => view,
        Err(e) => {
            return Err(CommitFailure::Unknown(format!(
                "{}; reading etcd to settle it failed: {e}",
                cause.to_error()
            )))
        }
    };
    let settlement = settle(&view, epoch, head, batch);
    tracing::info!(?settlement, "settled a commit in doubt from etcd");
    match settlement {
        Settlement::Landed => Ok(Landed {
            then: (view.leader_epoch != Some(epoch)).then_some(StepDown::Fenced {
                epoch,
                leader_epoch: view.leader_epoch,
            }),
        }),
        Settlement::Absent => Err(CommitFailure::NotCommitted(cause)),
        Settlement::Open => Err(CommitFailure::Unknown(format!(
            "{}; an attempt sent earlier may still land",
            cause.to_error()
        ))),
        Settlement::Unknown => Err(CommitFailure::Unknown(format!(
            "{}; the log in etcd was trimmed past it since, so etcd cannot tell",
            cause.to_error()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::{seal_now, CommitLoad};

    #[test]
    fn batches_sealed_and_not_yet_sent_count_as_one_transaction_to_come() {
        let load = CommitLoad::default();
        load.set_in_flight(1);
        assert_eq!(load.busy(), 1);
        load.sealed();
        load.sealed();
        assert_eq!(load.busy(), 2, "two waiting batches go in one transaction");
        load.taken();
        load.taken();
        assert_eq!(load.busy(), 1);
    }

    #[test]
    fn a_batch_is_sealed_as_soon_as_a_commit_slot_is_free() {
        assert!(seal_now(0, 1, false));
        assert!(seal_now(1, 2, false));
        assert!(seal_now(3, 4, false));
    }

    #[test]
    fn a_batch_keeps_filling_while_every_commit_slot_is_busy() {
        assert!(!seal_now(1, 1, false));
        assert!(!seal_now(2, 2, false));
        assert!(!seal_now(8, 8, false));
    }

    #[test]
    fn a_full_batch_is_sealed_whatever_is_in_flight() {
        assert!(seal_now(1, 1, true));
        assert!(seal_now(8, 8, true));
    }
}
