//! Applies received records to the state, off the commit path: the one apply step every node
//! uses, primary and standby alike.
//!
//! It follows a `watch` of the received seq and applies the local log up to it in steps of at
//! most [`STEP_RECORDS`] records, announcing the applied seq after each. It runs on its own
//! thread at a lower CPU priority (nice +10): applying random keys into sled is an order of
//! magnitude slower than committing batches, so under saturation the commit path keeps the CPU
//! and the apply lag grows, to drain when the load drops. The state catches up from the local
//! log, never from etcd. An apply error (a damaged local log) stops the applier and is kept for
//! status: the state stays at its last good seq, never skips.

use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::local_store::LocalStore;
use crate::metrics::Metrics;
use crate::record::Seq;

/// Records applied per step: the applied seq is announced (and persisted) this often.
pub const STEP_RECORDS: usize = 1024;
/// The applier thread's nice value: background work yields to the commit path.
const APPLIER_NICENESS: libc::c_int = 10;

pub struct Applier {
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    applied: watch::Receiver<Seq>,
    failure: Arc<Mutex<Option<String>>>,
    stop: watch::Sender<bool>,
}

impl Applier {
    /// Starts applying whatever `received` announces. When `received`'s sender is dropped, the
    /// applier catches up with the last announced seq and stops; dropping the applier does not
    /// stop it (the thread never blocks an async caller's drop). Must be called inside a tokio
    /// runtime.
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
        let thread = std::thread::Builder::new()
            .name("fencelog-applier".into())
            .spawn(move || {
                lower_priority();
                let input = Input { received, stop: stop_rx };
                run(&runtime, &store, input, &applied_tx, &metrics, &thread_failure);
            })
            .map_err(|e| tracing::error!(error = %e, "cannot start the applier thread; the state will not advance"))
            .ok();
        Applier {
            thread: Mutex::new(thread),
            applied,
            failure,
            stop,
        }
    }

    /// Stops at the end of the current step, without catching up, and waits for the thread to
    /// let go of the store: the state resumes from `applied_seq` under whoever applies next.
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("the applier thread ended abnormally");
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
            let started = std::time::Instant::now();
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

/// One step of at most [`STEP_RECORDS`] records.
fn apply_step(store: &LocalStore) -> crate::Result<Option<crate::local_store::AppliedRange>> {
    // Fail point (tests): the step fails as on a damaged local log.
    fail::fail_point!("applier::step_fails", |_| Err(crate::Error::TaskFailed(
        "fail point applier::step_fails".into()
    )));
    store.apply_next(STEP_RECORDS)
}

/// Lowers this thread's CPU priority. Linux gives each thread its own nice value.
fn lower_priority() {
    // SAFETY: gettid and setpriority take and return plain integers and touch no memory of ours.
    let result = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, APPLIER_NICENESS)
    };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the applier's priority");
    }
}
