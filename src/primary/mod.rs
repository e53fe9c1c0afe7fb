//! The primary: takes appends, gives each record a dense seq, and acknowledges it only once its
//! batch is committed in etcd by the fenced transaction.
//!
//! ```text
//! append ─▶ accumulator ─seal─▶ sealer: seqs, encode, local write-ahead ─▶ committer: etcd txn ─▶ ack
//!           (fills while the      (overlaps the previous batch's            (one txn in flight,
//!            pipeline is busy)     etcd round trip when `Double`)            batches in seq order)
//! ```
//!
//! A [`Primary`] is one leadership term. [`Primary::start`] campaigns (waiting while another
//! node leads), recovers the log from etcd, and starts the pipeline. The term ends when the
//! primary steps down — fenced by a newer leader, its lease lost, etcd unreachable past the
//! commit deadline, its local store failing — or shuts down; every unanswered append then fails
//! with an error that says which. A new term is a new `Primary::start`; [`PrimaryService`]
//! starts them one after another, as a daemon does.

mod accumulator;
mod pipeline;
mod recovery;
mod request_cap;
mod service;
mod trimmer;

pub use service::PrimaryService;

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use tokio::sync::{watch, Semaphore};

use crate::applier::Applier;
use crate::config::{Pipeline, PrimaryConfig};
use crate::error::{Error, Result};
use crate::etcd::leadership::Leadership;
use crate::keys::KeyLayout;
use crate::local_store::{blocking, LocalStore};
use crate::metrics::Metrics;
use crate::record::{Epoch, Record, Seq};

use accumulator::Accumulator;
use request_cap::RequestCap;

/// The seqs an append was given, once committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendAck {
    pub first_seq: Seq,
    pub last_seq: Seq,
}

/// Why a term ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepDown {
    /// A commit was refused: another epoch leads (or nobody does).
    Fenced {
        epoch: Epoch,
        leader_epoch: Option<Epoch>,
    },
    /// The lease may have expired, or etcd stayed unreachable past the commit deadline.
    LeadershipLost(String),
    /// Sealing, encoding or the local write failed: a node that cannot write its log must not
    /// lead.
    PipelineFailed(String),
    /// etcd refused a batch of one append, `bytes` long, as over its request limit: not
    /// committed, and the seqs given to it are owed to the batches sealed behind it. The term
    /// learned the lower cap ([`Primary::keep_learned_caps`]).
    RequestTooLarge {
        bytes: usize,
        /// The batch cap the term learned.
        cap: usize,
    },
    ShuttingDown,
}

impl StepDown {
    pub fn to_error(&self) -> Error {
        match self {
            StepDown::Fenced {
                epoch,
                leader_epoch,
            } => Error::Fenced {
                epoch: *epoch,
                leader_epoch: *leader_epoch,
            },
            StepDown::LeadershipLost(reason) => Error::LeadershipLost {
                reason: reason.clone(),
            },
            StepDown::PipelineFailed(reason) => Error::LeadershipLost {
                reason: format!("stepped down: {reason}"),
            },
            StepDown::RequestTooLarge { bytes, cap } => Error::EtcdRequestTooLarge {
                bytes: *bytes,
                cap: *cap,
            },
            StepDown::ShuttingDown => Error::ShuttingDown,
        }
    }

    /// The metric label.
    fn label(&self) -> &'static str {
        match self {
            StepDown::Fenced { .. } => "fenced",
            StepDown::LeadershipLost(_) => "leadership_lost",
            StepDown::PipelineFailed(_) => "pipeline_failed",
            StepDown::RequestTooLarge { .. } => "request_too_large",
            StepDown::ShuttingDown => "shutdown",
        }
    }
}

/// What the pipeline's tasks share.
struct Term {
    config: PrimaryConfig,
    layout: KeyLayout,
    client: Client,
    store: Arc<LocalStore>,
    metrics: Arc<Metrics>,
    leadership: Leadership,
    accumulator: Accumulator,
    /// One permit per sealed batch the pipeline may hold (`PrimaryConfig::pipeline_depth`).
    slots: Arc<Semaphore>,
    /// How busy the committer is, for the sealer.
    commit_load: pipeline::CommitLoad,
    /// `None` while leading; why the term ended once it has.
    ended: watch::Sender<Option<StepDown>>,
    /// The last seq etcd committed in this term (or before it).
    committed: watch::Receiver<Seq>,
    /// Batch size and etcd's request limit, as far as etcd's refusals taught them.
    request_cap: std::sync::Mutex<RequestCap>,
}

impl Term {
    fn epoch(&self) -> Epoch {
        self.leadership.epoch()
    }

    fn request_cap(&self) -> RequestCap {
        *self.request_cap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// etcd refused a request of `bytes` as too large: batches sealed from now on are smaller.
    fn learn_refusal(&self, bytes: usize) -> RequestCap {
        let mut cap = self.request_cap.lock().unwrap_or_else(|p| p.into_inner());
        *cap = cap.after_refusal(bytes);
        self.accumulator.lower_max_bytes(cap.max_batch_bytes);
        *cap
    }

    fn step_down(&self, cause: StepDown) {
        let first = self.ended.send_if_modified(|ended| {
            if ended.is_some() {
                return false;
            }
            *ended = Some(cause.clone());
            true
        });
        if !first {
            return;
        }
        if cause != StepDown::ShuttingDown {
            tracing::warn!(epoch = %self.epoch(), ?cause, "stepping down");
        }
        self.metrics
            .step_downs
            .with_label_values(&[cause.label()])
            .inc();
        self.metrics.epoch.set(0);
        self.leadership.lose(format!("{cause:?}"));
        self.accumulator.close(&cause);
    }

    fn ended(&self) -> Option<StepDown> {
        self.ended.borrow().clone()
    }
}

/// One leadership term of a primary. Dropping it without [`Primary::shutdown`] stops it as a
/// crash would: nothing is resigned, and the lease expires by itself.
pub struct Primary {
    term: Arc<Term>,
    /// Taken by the first `shutdown`.
    tasks: std::sync::Mutex<Option<pipeline::Tasks>>,
    applier: Applier,
    /// The last seq the local log holds as committed.
    received: watch::Receiver<Seq>,
}

impl Primary {
    /// Campaigns for leadership (waiting while another node leads), truncates the local log to
    /// what etcd committed, fetches committed batches it lacks, and starts taking appends at
    /// etcd's last seq + 1.
    pub async fn start(
        client: Client,
        store: Arc<LocalStore>,
        config: PrimaryConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Primary> {
        config.validate()?;
        let layout = KeyLayout::new(&config.cluster);
        let leadership = Leadership::campaign(
            &client,
            &layout,
            &config.leader_info(),
            config.lease(),
            &store,
        )
        .await?;
        Primary::lead(client, store, config, metrics, leadership).await
    }

    /// Starts a term under a leadership already won: a promoted standby's way in.
    pub async fn lead(
        client: Client,
        store: Arc<LocalStore>,
        config: PrimaryConfig,
        metrics: Arc<Metrics>,
        leadership: Leadership,
    ) -> Result<Primary> {
        config.validate()?;
        let layout = KeyLayout::new(&config.cluster);
        let resume = match recovery::recover(&client, &layout, &store, &config).await {
            Ok(resume) => resume,
            Err(e) => {
                if let Err(resign) = leadership.resign(&store).await {
                    tracing::warn!(error = %resign, "could not resign after a failed recovery");
                }
                return Err(e);
            }
        };
        tracing::info!(epoch = %leadership.epoch(), next_seq = %resume.next_seq, "leading");
        metrics.epoch.set(leadership.epoch().0 as i64);
        metrics.saw_committed(Seq(resume.next_seq.0 - 1));

        let committed_seq = Seq(resume.next_seq.0 - 1);
        let (committed_tx, committed) = watch::channel(committed_seq);
        let (received_tx, received) = watch::channel(committed_seq);
        let applier = Applier::spawn(store.clone(), received.clone(), metrics.clone());
        let request_cap = std::sync::Mutex::new(RequestCap {
            max_batch_bytes: config.max_batch_bytes,
            refused: config.etcd_refused_request,
        });
        let term = Arc::new(Term {
            request_cap,
            accumulator: Accumulator::new(
                config.max_pending_bytes,
                config.max_batch_records,
                config.max_batch_bytes,
                config.linger,
            ),
            slots: Arc::new(Semaphore::new(config.pipeline_depth())),
            commit_load: pipeline::CommitLoad::default(),
            ended: watch::channel(None).0,
            config,
            layout,
            client,
            store,
            metrics,
            leadership,
            committed,
        });
        let mut tasks = pipeline::spawn(term.clone(), resume, committed_tx, received_tx)?;
        tasks.helpers.push(pipeline::supervised(
            &term,
            "trimmer",
            trimmer::run(term.clone()),
        ));
        Ok(Primary {
            term,
            tasks: std::sync::Mutex::new(Some(tasks)),
            applier,
            received,
        })
    }

    /// Appends `records` as one run of consecutive seqs in one batch, and answers once that
    /// batch is committed in etcd. Waits while `max_pending_bytes` are pending.
    pub async fn append(&self, records: Vec<Record>) -> Result<AppendAck> {
        let bytes = self.check_append(&records)?;
        if let Some(cause) = self.term.ended() {
            return Err(cause.to_error());
        }
        if self.term.config.pipeline == Pipeline::Single {
            // A single buffer takes no appends while its batch is sealed and committing: wait
            // for the pipeline's one slot, which the sealer holds from seal to ack. Closed or
            // not, `push` says next whether the term still takes appends.
            let _ = self.term.slots.acquire().await;
        }
        let count = records.len() as u64;
        let answer = self.term.accumulator.push(records, bytes).await?;
        let metrics = &self.term.metrics;
        metrics
            .pending_bytes
            .set(self.term.accumulator.pending_bytes() as i64);
        let ack = answer.await.map_err(|_| Error::ShuttingDown)??;
        metrics.appends.inc();
        metrics.appended_records.inc_by(count);
        Ok(ack)
    }

    fn check_append(&self, records: &[Record]) -> Result<usize> {
        if records.is_empty() {
            return Err(Error::EmptyAppend);
        }
        let config = &self.term.config;
        let mut bytes = 0;
        for record in records {
            config.limits.check_record(record)?;
            bytes += record.key.len() + record.value.len();
        }
        let cap = self.term.request_cap();
        if let (Some(refused), true) = (cap.refused, bytes > cap.max_batch_bytes) {
            // Sealed alone it would be a request etcd refuses: refused before it has seqs.
            return Err(Error::RecordOverEtcdLimit {
                bytes,
                refused,
                cap: cap.max_batch_bytes,
            });
        }
        let too_many = records.len() > config.max_batch_records;
        // One record larger than a batch's byte target still makes a batch of its own.
        let too_big = records.len() > 1 && bytes > cap.max_batch_bytes;
        if too_many || too_big {
            return Err(Error::AppendTooLarge {
                records: records.len(),
                bytes,
                max_records: config.max_batch_records,
                max_bytes: cap.max_batch_bytes,
            });
        }
        Ok(bytes)
    }

    pub fn epoch(&self) -> Epoch {
        self.term.epoch()
    }

    /// Carries what this term learned of etcd's request limit into the configuration of the
    /// next: its batches are as small, and appends no request can carry refused up front.
    pub fn keep_learned_caps(&self, config: &mut PrimaryConfig) {
        let cap = self.term.request_cap();
        config.max_batch_bytes = cap.max_batch_bytes;
        config.etcd_refused_request = cap.refused;
    }

    /// True until the term ends.
    pub fn is_leading(&self) -> bool {
        self.term.ended().is_none()
    }

    /// The last seq etcd committed, as far as this node knows.
    pub fn committed_seq(&self) -> Seq {
        *self.term.committed.borrow()
    }

    /// The last seq applied to this node's state.
    /// Why the applier stopped, if it failed: the state no longer follows the log.
    pub fn applier_failure(&self) -> Option<String> {
        self.applier.failure()
    }

    pub fn applied_seq(&self) -> Seq {
        self.applier.applied_seq()
    }

    /// Waits until this node's state reflects `seq` (read-your-writes).
    pub async fn wait_applied(&self, seq: Seq) -> Seq {
        self.applier.wait_applied(seq).await
    }

    /// Payload bytes of appends not yet answered.
    pub fn pending_bytes(&self) -> usize {
        self.term.accumulator.pending_bytes()
    }

    /// Resolves with the reason once the term ends.
    pub async fn stepped_down(&self) -> StepDown {
        let mut ended = self.term.ended.subscribe();
        let cause = ended
            .wait_for(Option::is_some)
            .await
            .map(|cause| cause.clone());
        cause.ok().flatten().unwrap_or(StepDown::ShuttingDown)
    }

    /// Ends the term gracefully: refuses new appends, lets queued and in-flight ones finish
    /// (for at most the commit deadline), resigns so a standby can take over at once, and
    /// flushes the local store. An append whose commit is still in doubt then is settled from
    /// etcd, or answered `CommitOutcomeUnknown`: never "shutting down" for a batch that may
    /// have been sent. Also the way to clean up a term that has stepped down; a second call
    /// does nothing.
    pub async fn shutdown(&self) -> Result<()> {
        let Some(tasks) = self.take_tasks() else {
            return Ok(());
        };
        let config = &self.term.config;
        self.term.accumulator.stop_taking();
        let deadline = Instant::now() + config.commit_deadline;
        let depth = config.pipeline_depth();
        while self.term.ended().is_none() && Instant::now() < deadline {
            let idle =
                self.term.accumulator.is_empty() && self.term.slots.available_permits() == depth;
            if idle {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.term.step_down(StepDown::ShuttingDown);
        // Resigned, no attempt still on its way can land: a batch in doubt settles as absent
        // rather than unknown wherever etcd answers.
        let resigned = self.term.leadership.resign(&self.term.store).await;
        for task in tasks.helpers {
            task.abort();
            // Cancelled is the expected outcome; waiting makes sure the task has stopped.
            let _ = task.await;
        }
        // The committer settles what it has in flight: one attempt and one read, each bounded.
        let settling = config.etcd_request_timeout * 3;
        for task in tasks.commit_path {
            let abort = task.abort_handle();
            if tokio::time::timeout(settling, task).await.is_err() {
                abort.abort();
            }
        }
        // With the sealer and the committer gone, the local log writer marks the last commit
        // and ends.
        if let Err(e) = tasks.local_log.await {
            tracing::error!(error = %e, "the local log task failed");
        }
        let received = *self.received.borrow();
        self.applier.wait_applied(received).await;
        self.applier.stop().await;
        // A last checkpoint, so that a restart replays nothing.
        let store = self.term.store.clone();
        blocking(move || store.checkpoint().and_then(|_| store.flush())).await?;
        resigned
    }

    fn take_tasks(&self) -> Option<pipeline::Tasks> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        if let Some(tasks) = self.take_tasks() {
            let commit_path = tasks.commit_path.iter();
            for task in commit_path.chain(&tasks.helpers).chain([&tasks.local_log]) {
                task.abort();
            }
        }
    }
}
