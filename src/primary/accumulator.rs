//! Appends waiting to be sealed into a batch: the buffer that fills while the batch before it
//! is committed.
//!
//! Bounded in payload bytes by a semaphore: an append first takes room for its bytes, waiting
//! while the buffer and the batches in the pipeline hold `max_pending_bytes` (backpressure), and
//! gives the room back only when its batch is committed or failed. Seqs are not assigned here:
//! the sealer assigns them, in the order appends are sealed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};
use crate::primary::{AppendAck, StepDown};
use crate::record::Record;

/// One append call, waiting for its batch.
pub(crate) struct PendingAppend {
    pub records: Vec<Record>,
    pub bytes: usize,
    pub reply: oneshot::Sender<Result<AppendAck>>,
    /// Its share of `max_pending_bytes`, released when the append is answered.
    pub _room: OwnedSemaphorePermit,
}

struct Queue {
    appends: VecDeque<PendingAppend>,
    /// Records and payload bytes in `appends`.
    records: usize,
    bytes: usize,
    /// Set by a shutdown: new appends are refused, queued ones are still sealed.
    stopped_taking: bool,
    closed: Option<StepDown>,
}

pub(crate) struct Accumulator {
    queue: Mutex<Queue>,
    sealer_wake: Notify,
    room: Arc<Semaphore>,
    max_pending_bytes: usize,
    max_records: usize,
    /// Lowered once etcd refused a batch as too large ([`Accumulator::lower_max_bytes`]).
    max_bytes: AtomicUsize,
    linger: Duration,
}

impl Accumulator {
    pub fn new(
        max_pending_bytes: usize,
        max_records: usize,
        max_bytes: usize,
        linger: Duration,
    ) -> Accumulator {
        Accumulator {
            queue: Mutex::new(Queue {
                appends: VecDeque::new(),
                records: 0,
                bytes: 0,
                stopped_taking: false,
                closed: None,
            }),
            sealer_wake: Notify::new(),
            room: Arc::new(Semaphore::new(max_pending_bytes)),
            max_pending_bytes,
            max_records,
            max_bytes: AtomicUsize::new(max_bytes),
            linger,
        }
    }

    /// Queues an append once there is room for its bytes; the receiver gets its answer.
    pub async fn push(
        &self,
        records: Vec<Record>,
        bytes: usize,
    ) -> Result<oneshot::Receiver<Result<AppendAck>>> {
        // A single record may exceed the batch size; it still must fit the pending bound.
        let wanted = bytes.clamp(1, self.max_pending_bytes) as u32;
        let room = match self.room.clone().acquire_many_owned(wanted).await {
            Ok(room) => room,
            Err(_) => return Err(self.closed_error()),
        };
        let (reply, answer) = oneshot::channel();
        let mut queue = self.lock();
        if let Some(cause) = &queue.closed {
            return Err(cause.to_error());
        }
        if queue.stopped_taking {
            return Err(Error::ShuttingDown);
        }
        queue.records += records.len();
        queue.bytes += bytes;
        queue.appends.push_back(PendingAppend {
            records,
            bytes,
            reply,
            _room: room,
        });
        drop(queue);
        self.sealer_wake.notify_one();
        Ok(answer)
    }

    /// Waits until an append is queued, then lingers if configured. False once closed.
    pub async fn wait_for_appends(&self) -> bool {
        loop {
            {
                let queue = self.lock();
                if queue.closed.is_some() {
                    return false;
                }
                if !queue.appends.is_empty() {
                    break;
                }
            }
            self.sealer_wake.notified().await;
        }
        if !self.linger.is_zero() && !self.is_full() {
            tokio::time::sleep(self.linger).await;
        }
        true
    }

    /// Takes as many queued appends as fit one batch, in order (at least one, if any is queued:
    /// a single record larger than the batch target makes a batch of its own). `None` once
    /// closed.
    pub fn take_batch(&self) -> Option<Vec<PendingAppend>> {
        let mut queue = self.lock();
        if queue.closed.is_some() {
            return None;
        }
        let (mut records, mut bytes) = (0, 0);
        let max_bytes = self.max_bytes.load(Ordering::Relaxed);
        let mut sealed = Vec::new();
        while let Some(next) = queue.appends.front() {
            let fits =
                records + next.records.len() <= self.max_records && bytes + next.bytes <= max_bytes;
            if !sealed.is_empty() && !fits {
                break;
            }
            records += next.records.len();
            bytes += next.bytes;
            sealed.extend(queue.appends.pop_front());
        }
        queue.records -= records;
        queue.bytes -= bytes;
        Some(sealed)
    }

    /// Payload bytes of appends not yet answered (queued or in the pipeline).
    pub fn pending_bytes(&self) -> usize {
        self.max_pending_bytes - self.room.available_permits()
    }

    /// True when no append waits to be sealed.
    pub fn is_empty(&self) -> bool {
        self.lock().appends.is_empty()
    }

    /// Refuses new appends from now on (they were never sent: `ShuttingDown`); the queued
    /// ones are still sealed and committed.
    pub fn stop_taking(&self) {
        self.lock().stopped_taking = true;
    }

    /// Fails every queued append with `cause`, refuses new ones, and wakes the sealer to stop.
    pub fn close(&self, cause: &StepDown) {
        let drained: Vec<PendingAppend> = {
            let mut queue = self.lock();
            queue.closed.get_or_insert_with(|| cause.clone());
            queue.records = 0;
            queue.bytes = 0;
            queue.appends.drain(..).collect()
        };
        self.room.close();
        for append in drained {
            let _ = append.reply.send(Err(cause.to_error()));
        }
        self.sealer_wake.notify_one();
    }

    /// True when the queued appends fill a batch (or the accumulator is closed: nothing more
    /// is worth waiting for).
    pub fn is_full(&self) -> bool {
        let queue = self.lock();
        queue.closed.is_some()
            || queue.records >= self.max_records
            || queue.bytes >= self.max_bytes.load(Ordering::Relaxed)
    }

    /// Seals batches of at most `max_bytes` payload bytes from now on.
    pub fn lower_max_bytes(&self, max_bytes: usize) {
        self.max_bytes.fetch_min(max_bytes, Ordering::Relaxed);
    }

    /// Wakes the sealer: the pipeline has room, or its state changed.
    pub fn wake_sealer(&self) {
        self.sealer_wake.notify_one();
    }

    /// Waits for the next wake-up of the sealer (an append, a freed slot, a close).
    pub async fn sealer_woken(&self) {
        self.sealer_wake.notified().await;
    }

    fn closed_error(&self) -> Error {
        self.lock()
            .closed
            .as_ref()
            .map_or(Error::ShuttingDown, StepDown::to_error)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}
