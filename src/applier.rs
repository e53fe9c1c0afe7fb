//! Applies received records to the state and checkpoints it, off the commit path: the one
//! apply step every node uses, primary and standby alike.
//!
//! The apply thread follows a `watch` of the received seq and applies the local log up to it a
//! batch at a time into the state in memory ([`LocalStore::apply_next`]), announcing the applied
//! seq after each. The checkpointer thread writes a checkpoint whenever
//! [`checkpoint::due`] says so. Encoding it is CPU work (under a load that dirties every page,
//! the whole state compressed), done by an encoder thread at a lower CPU priority (nice +10) so
//! that the commit path keeps the CPU before it; the checkpointer writes and flushes the pages
//! itself, at normal priority, because every log append flushes and waits for a flush in
//! progress: when the whole checkpoint ran at nice +10, a flush of tens of megabytes held the
//! flush lock for as long as a niced thread on a saturated machine took (docs/BENCHMARKS.md,
//! session 10). The state catches up from the local log, never from etcd. An apply error (a damaged
//! local log) stops the applier and is kept for status: the state stays at its last good seq,
//! never skips. A failed checkpoint is logged and counted; the next writes every page.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::local_store::LocalStore;
use crate::metrics::Metrics;
use crate::record::Seq;
use crate::state::{checkpoint, Changes, PageWrite, StateError};

/// The checkpoint encoder's nice value: background work yields to the commit path.
const ENCODER_NICENESS: libc::c_int = 10;
/// How often the checkpointer looks whether a checkpoint is due.
const CHECKPOINT_POLL: Duration = Duration::from_millis(50);

pub struct Applier {
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    checkpointer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Dropped to stop the checkpointer.
    stop_checkpoints: Mutex<Option<crossbeam_channel::Sender<()>>>,
    applied: watch::Receiver<Seq>,
    failure: Arc<Mutex<Option<String>>>,
    stop: watch::Sender<bool>,
}

impl Applier {
    /// Starts applying whatever `received` announces, and checkpointing as the store's policy
    /// says. When `received`'s sender is dropped, the applier catches up with the last announced
    /// seq and stops; dropping the applier does not stop it (the thread never blocks an async
    /// caller's drop). Must be called inside a tokio runtime.
    pub fn spawn(
        store: Arc<LocalStore>,
        received: watch::Receiver<Seq>,
        metrics: Arc<Metrics>,
    ) -> Applier {
        let start = store.positions().map(|p| p.applied_seq).unwrap_or_default();
        let (applied_tx, applied) = watch::channel(start);
        let failure = Arc::new(Mutex::new(None));
        let thread_failure = failure.clone();
        let (stop, stop_rx) = watch::channel(false);
        let runtime = Handle::current();
        let (apply_store, apply_metrics) = (store.clone(), metrics.clone());
        let thread = std::thread::Builder::new()
            .name("fencelog-applier".into())
            .spawn(move || {
                let input = Input { received, stop: stop_rx };
                run(&runtime, &apply_store, input, &applied_tx, &apply_metrics, &thread_failure);
            })
            .map_err(|e| tracing::error!(error = %e, "cannot start the applier thread; the state will not advance"))
            .ok();
        let (stop_checkpoints, stopped) = crossbeam_channel::bounded(0);
        let watched = applied.clone();
        let checkpointer = std::thread::Builder::new()
            .name("fencelog-checkpointer".into())
            .spawn(move || checkpoints(&store, &watched, &stopped, &metrics))
            .map_err(|e| tracing::error!(error = %e, "cannot start the checkpointer thread; the state will not be checkpointed"))
            .ok();
        Applier {
            thread: Mutex::new(thread),
            checkpointer: Mutex::new(checkpointer),
            stop_checkpoints: Mutex::new(Some(stop_checkpoints)),
            applied,
            failure,
            stop,
        }
    }

    /// Stops at the end of the current batch, without catching up, and the checkpointer at the
    /// end of the checkpoint it is writing, and waits for both threads to let go of the store:
    /// the state resumes from its applied seq under whoever applies next.
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        drop(
            self.stop_checkpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        for thread in [&self.thread, &self.checkpointer] {
            let thread = thread.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(thread) = thread {
                let joined = tokio::task::spawn_blocking(move || thread.join()).await;
                if !matches!(joined, Ok(Ok(()))) {
                    tracing::error!("an applier thread ended abnormally");
                }
            }
        }
    }

    pub fn applied_seq(&self) -> Seq {
        *self.applied.borrow()
    }

    /// A receiver of the applied seq as it moves.
    pub fn subscribe(&self) -> watch::Receiver<Seq> {
        self.applied.clone()
    }

    /// Why the applier stopped, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until the state reflects `seq`, or the applier stops short of it.
    pub async fn wait_applied(&self, seq: Seq) -> Seq {
        let mut applied = self.applied.clone();
        let reached = applied
            .wait_for(|applied| *applied >= seq)
            .await
            .map(|applied| *applied);
        reached.unwrap_or_else(|_| *self.applied.borrow())
    }
}

/// What the applier thread listens to.
struct Input {
    received: watch::Receiver<Seq>,
    stop: watch::Receiver<bool>,
}

fn run(
    runtime: &Handle,
    store: &LocalStore,
    mut input: Input,
    applied: &watch::Sender<Seq>,
    metrics: &Metrics,
    failure: &Mutex<Option<String>>,
) {
    let stopping = input.stop.clone();
    let catch_up = |target: Seq| -> bool {
        while *applied.borrow() < target && !*stopping.borrow() {
            let started = Instant::now();
            match apply_step(store) {
                Ok(Some(step)) => {
                    metrics
                        .apply_seconds
                        .observe(started.elapsed().as_secs_f64());
                    metrics.applied(step.last_seq, step.sealed_at_micros);
                    applied.send_replace(step.last_seq);
                }
                // The store's received seq trails the announced one: wait for the next news.
                Ok(None) => return true,
                Err(e) => {
                    tracing::error!(error = %e, applied = %applied.borrow().0, "apply failed; the state stays at its last good seq");
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    return false;
                }
            }
        }
        true
    };
    loop {
        // Copied out first: a borrow held across the catch-up would block the sender.
        let target = *input.received.borrow_and_update();
        if !catch_up(target) {
            return;
        }
        let news = runtime.block_on(async {
            tokio::select! {
                changed = input.received.changed() => changed.is_ok(),
                _ = input.stop.wait_for(|stop| *stop) => false,
            }
        });
        if *input.stop.borrow() {
            return;
        }
        if !news {
            let last = *input.received.borrow();
            catch_up(last);
            return;
        }
    }
}

/// One batch.
fn apply_step(store: &LocalStore) -> crate::Result<Option<crate::local_store::AppliedRange>> {
    // Fail point (tests): the step fails as on a damaged local log.
    fail::fail_point!("applier::step_fails", |_| Err(crate::Error::TaskFailed(
        "fail point applier::step_fails".into()
    )));
    store.apply_next()
}

/// The checkpointer: until `stop` is dropped, writes a checkpoint whenever one is due.
fn checkpoints(
    store: &LocalStore,
    applied: &watch::Receiver<Seq>,
    stop: &crossbeam_channel::Receiver<()>,
    metrics: &Metrics,
) {
    let policy = store.options().checkpoint;
    let encoder = Encoder::spawn();
    let (mut last_end, mut took) = (Instant::now(), Duration::ZERO);
    metrics
        .checkpoint_seq
        .set(store.positions().map_or(0, |p| p.checkpoint_seq.0) as i64);
    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_POLL)
    {
        let checkpointed = store.positions().map_or(Seq::NONE, |p| p.checkpoint_seq);
        let records = applied.borrow().0.saturating_sub(checkpointed.0);
        if !checkpoint::due(&policy, records, last_end.elapsed(), took) {
            continue;
        }
        let started = Instant::now();
        let encoded = store.checkpoint_encoded_by(|changes| match &encoder {
            Some(encoder) => encoder.encode(changes),
            None => changes.encode(),
        });
        match encoded {
            Ok(Some(written)) => {
                metrics
                    .checkpoint_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics.checkpoint_bytes.inc_by(written.bytes);
                metrics.checkpoint_seq.set(written.meta.seq.0 as i64);
                tracing::debug!(seq = %written.meta.seq, pages = written.pages, bytes = written.bytes, "checkpointed the state");
            }
            Ok(None) => {}
            Err(e) => {
                metrics.checkpoint_failures.inc();
                tracing::error!(error = %e, "cannot checkpoint the state; trying again after the interval, a restart replays more of the log meanwhile");
            }
        }
        last_end = Instant::now();
        took = started.elapsed();
    }
}

/// What a checkpoint encoder answers.
type Encoded = Result<Vec<PageWrite>, StateError>;

/// A thread at nice +10 that encodes checkpoints' changes; it ends when dropped.
struct Encoder {
    jobs: crossbeam_channel::Sender<(Box<dyn Changes>, crossbeam_channel::Sender<Encoded>)>,
}

impl Encoder {
    /// `None` if the thread cannot start: the checkpointer then encodes itself.
    fn spawn() -> Option<Encoder> {
        let (jobs, queue) =
            crossbeam_channel::bounded::<(Box<dyn Changes>, crossbeam_channel::Sender<Encoded>)>(1);
        std::thread::Builder::new()
            .name("fencelog-encoder".into())
            .spawn(move || {
                lower_priority();
                for (changes, answer) in queue {
                    // The checkpointer waits for the answer: it is never gone before it.
                    let _ = answer.send(changes.encode());
                }
            })
            .map_err(|e| tracing::warn!(error = %e, "cannot start the checkpoint encoder; checkpoints are encoded at normal priority"))
            .ok()?;
        Some(Encoder { jobs })
    }

    fn encode(&self, changes: Box<dyn Changes>) -> Encoded {
        let (answer, answered) = crossbeam_channel::bounded(1);
        match self.jobs.send((changes, answer)) {
            Ok(()) => answered
                .recv()
                .unwrap_or_else(|_| Err(StateError::Encode("the encoder thread ended".into()))),
            Err(crossbeam_channel::SendError((changes, _))) => changes.encode(),
        }
    }
}

/// Lowers this thread's CPU priority. Linux gives each thread its own nice value.
fn lower_priority() {
    // SAFETY: gettid and setpriority take and return plain integers and touch no memory of ours.
    let result = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, ENCODER_NICENESS)
    };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the checkpoint encoder's priority");
    }
}
