//! Follows the committed log in etcd into the local store, never skipping a seq.
//!
//! Read, then watch: committed batches from `received_seq + 1` on are read by key range in
//! pages at one revision, then the `batches/` prefix is watched from that revision + 1, so
//! nothing committed between the read and the watch is missed. Every batch is verified (full
//! decode, checksum) and must start right after `received_seq`; it is then appended to the local
//! log, and `received_seq` moved over it. Each catch-up first cuts the local log back to a prefix
//! of etcd's ([`reconcile`]). A duplicate (at or below `received_seq`) is
//! skipped. A batch that arrives past a gap waits in a bounded buffer while the gap is read from
//! etcd. A watch whose revision was compacted, a broken connection or an etcd restart send the
//! follower back to the read. What cannot be filled or verified stops it at the last good seq.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions};
use tokio::sync::watch;

use crate::batch::{BatchDecoder, EncodedBatch};
use crate::error::{Error, Result};
use crate::etcd::fetch::{append_verified, BatchPages};
use crate::etcd::reconcile::reconcile;
use crate::etcd::trim::read_trimmed;
use crate::etcd::{timed, Backoff};
use crate::keys::KeyLayout;
use crate::lifecycle::Event;
use crate::limits::Limits;
use crate::local_store::{blocking, LocalStore};
use crate::metrics::Metrics;
use crate::record::Seq;
use crate::standby::LifecycleCell;

/// Batches that may wait past a gap while it is filled.
const MAX_BUFFERED_BATCHES: usize = 256;
/// The watch client's decode limit: fragments stay under etcd's request limit, but a response
/// may still carry several events.
const WATCH_DECODE_LIMIT: usize = 64 << 20;

/// Why a watch ended.
enum WatchEnd {
    /// The start revision was compacted: read by key range again.
    Compacted,
    Broken(Error),
}

pub(crate) struct Follower {
    pub client: Client,
    pub layout: KeyLayout,
    pub limits: Limits,
    pub store: Arc<LocalStore>,
    pub metrics: Arc<Metrics>,
    pub request_timeout: Duration,
    /// How long to stay in `Recovering` before reading again.
    pub recovery_retry: Duration,
    pub received: watch::Sender<Seq>,
    pub lifecycle: Arc<LifecycleCell>,
    /// Held by each write into the local log for as long as it runs, on its blocking thread:
    /// aborting the follower does not stop a write under way, so whoever takes the store over
    /// (a promotion's recovery) first waits on this.
    pub writing: Arc<tokio::sync::Mutex<()>>,
}

impl Follower {
    /// Follows until the task is dropped: every failure leads back to a read, after a backoff
    /// (etcd trouble) or the recovery delay (a missing or damaged batch).
    pub async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_secs(5));
        self.lifecycle.raise(Event::Start, "following etcd");
        loop {
            let revision = match self.catch_up().await {
                Ok(revision) => revision,
                Err(e) => {
                    self.fail(&mut backoff, e).await;
                    continue;
                }
            };
            backoff.reset();
            self.lifecycle.raise(
                Event::CaughtUp,
                format!("received through seq {}", *self.received.borrow()),
            );
            if let Some(delay) = watch_delay() {
                tokio::time::sleep(delay).await;
            }
            match self.watch_from(revision + 1).await {
                WatchEnd::Compacted => self
                    .lifecycle
                    .raise(Event::Compacted, "the watch revision was compacted"),
                WatchEnd::Broken(e) => self.fail(&mut backoff, e).await,
            }
        }
    }

    /// Goes through `Reconnecting` (etcd trouble) or `Recovering` (a batch that cannot be filled
    /// or verified: stays at the last good seq) and back to reading.
    async fn fail(&self, backoff: &mut Backoff, cause: Error) {
        if is_transient(&cause) {
            self.metrics.watch_reconnects.inc();
            self.metrics
                .etcd_errors
                .with_label_values(&["follow"])
                .inc();
            self.lifecycle
                .raise(Event::ConnectionLost, cause.to_string());
            backoff.wait().await;
        } else if let Some(trimmed) = self.trimmed_past_us(&cause).await {
            self.lifecycle.raise(Event::Trimmed, trimmed.to_string());
            tokio::time::sleep(self.recovery_retry).await;
        } else {
            if matches!(cause, Error::CorruptBatch(_)) {
                self.metrics.checksum_failures.inc();
            }
            let received = *self.received.borrow();
            self.lifecycle.raise(
                Event::LogBroken,
                format!("stopped at seq {received}: {cause}"),
            );
            tokio::time::sleep(self.recovery_retry).await;
        }
        self.lifecycle.raise(Event::RetryDue, "reading again");
    }

    /// `Trimmed` when `cause` (or a batch missing from etcd) comes from the log being trimmed
    /// past this node's `received_seq`.
    async fn trimmed_past_us(&self, cause: &Error) -> Option<Error> {
        match cause {
            Error::Trimmed { needed, trimmed } => Some(Error::Trimmed {
                needed: *needed,
                trimmed: *trimmed,
            }),
            Error::MissingBatches { .. } => {
                let needed = self.received.borrow().next().ok()?;
                let trimmed = read_trimmed(&self.client, &self.layout, self.request_timeout)
                    .await
                    .ok()?;
                (needed < trimmed).then_some(Error::Trimmed { needed, trimmed })
            }
            _ => None,
        }
    }

    /// Cuts the local log back to a prefix of etcd's, then reads every committed batch after
    /// `received_seq` by key range; returns the revision read.
    async fn catch_up(&self) -> Result<i64> {
        let etcd = reconcile(
            &self.client,
            &self.layout,
            &self.store,
            self.request_timeout,
        )
        .await?;
        self.metrics.saw_committed(etcd.last_seq);
        let from = self.received.borrow().next()?;
        let trimmed = read_trimmed(&self.client, &self.layout, self.request_timeout).await?;
        if from < trimmed && from <= etcd.last_seq {
            return Err(Error::Trimmed {
                needed: from,
                trimmed,
            });
        }
        self.fill(from, None).await
    }

    /// Reads the batches `from ..= through` (to the end when `None`) and receives them; returns
    /// the revision they were read at.
    async fn fill(&self, from: Seq, through: Option<Seq>) -> Result<i64> {
        let mut pages = BatchPages::new(
            &self.client,
            &self.layout,
            &self.limits,
            from,
            through,
            self.request_timeout,
        );
        while let Some(page) = pages.next_page().await? {
            self.receive(page).await?;
        }
        Ok(pages.revision())
    }

    /// Verifies and appends batches that start right after `received_seq`, in order. Those
    /// before a damaged one are kept, and `received` says how far the log got either way.
    async fn receive(&self, batches: Vec<EncodedBatch>) -> Result<()> {
        if batches.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        let limits = self.limits.clone();
        let writing = self.writing.clone().lock_owned().await;
        let (outcome, received, appended) = blocking(move || {
            let _writing = writing;
            // Fail point (tests): the write takes long, as on a slow disk.
            fail::fail_point!("follower::slow_write", |_| Err(crate::Error::TaskFailed(
                "fail point follower::slow_write".into()
            )));
            let outcome = append_verified(&store, &mut BatchDecoder::new(limits)?, &batches);
            let received = store.positions()?.received_seq;
            let appended = batches.iter().take_while(|b| b.last_seq() <= received);
            let (count, sealed_at) = appended.fold((0, None), |(count, _), batch| {
                (count + 1, Some(batch.header().sealed_at_micros))
            });
            Ok((outcome, received, (count, sealed_at)))
        })
        .await?;
        if let (count, Some(sealed_at)) = appended {
            self.metrics.received_batches.inc_by(count);
            self.metrics.received(received, sealed_at);
        }
        self.received.send_replace(received);
        outcome
    }

    async fn watch_from(&self, revision: i64) -> WatchEnd {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision)
            .with_fragment();
        let mut watch_client = self
            .client
            .watch_client()
            .max_decoding_message_size(WATCH_DECODE_LIMIT);
        let mut stream = match timed(
            self.request_timeout,
            watch_client.watch(self.layout.batches_prefix(), Some(options)),
        )
        .await
        {
            Ok(stream) => stream,
            Err(e) => return WatchEnd::Broken(e),
        };
        let mut waiting: BTreeMap<Seq, EncodedBatch> = BTreeMap::new();
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => {
                    return WatchEnd::Broken(Error::Etcd(etcd_client::Error::WatchError(
                        "the watch stream ended".into(),
                    )))
                }
                Err(e) => return WatchEnd::Broken(e.into()),
            };
            if response.canceled() {
                if response.compact_revision() > 0 {
                    return WatchEnd::Compacted;
                }
                let reason = format!("the watch was canceled: {}", response.cancel_reason());
                return WatchEnd::Broken(Error::Etcd(etcd_client::Error::WatchError(reason)));
            }
            for event in response.events() {
                let Some(kv) = event.kv().filter(|_| event.event_type() == EventType::Put) else {
                    continue;
                };
                if drop_watched_batch() {
                    continue;
                }
                let parsed = self.layout.parse_batch_key(kv.key()).and_then(|key_seq| {
                    Ok((
                        key_seq,
                        EncodedBatch::parse(kv.value().to_vec(), &self.limits)?,
                    ))
                });
                match parsed {
                    Ok((key_seq, batch)) if key_seq == batch.first_seq() => {
                        self.metrics.saw_committed(batch.last_seq());
                        waiting.insert(batch.first_seq(), batch);
                    }
                    Ok((key_seq, batch)) => {
                        return WatchEnd::Broken(Error::MissingBatches {
                            expected: key_seq,
                            found: Some(batch.first_seq()),
                        });
                    }
                    Err(e) => return WatchEnd::Broken(e),
                }
            }
            if let Err(e) = self.drain(&mut waiting).await {
                return WatchEnd::Broken(e);
            }
        }
    }

    /// Receives the waiting batches that continue the log; fills a gap before them from etcd;
    /// drops duplicates.
    async fn drain(&self, waiting: &mut BTreeMap<Seq, EncodedBatch>) -> Result<()> {
        loop {
            let received = *self.received.borrow();
            while waiting
                .first_key_value()
                .is_some_and(|(first, batch)| *first <= received && batch.last_seq() <= received)
            {
                waiting.pop_first();
            }
            let Some((&first, _)) = waiting.first_key_value() else {
                return Ok(());
            };
            let next = received.next()?;
            if first == next {
                let mut run = Vec::new();
                let mut expected = next;
                while let Some(batch) = waiting.remove(&expected) {
                    expected = batch.last_seq().next()?;
                    run.push(batch);
                }
                self.receive(run).await?;
                continue;
            }
            if first < next {
                return Err(Error::MissingBatches {
                    expected: next,
                    found: Some(first),
                });
            }
            if waiting.len() > MAX_BUFFERED_BATCHES {
                return Err(Error::MissingBatches {
                    expected: next,
                    found: Some(first),
                });
            }
            tracing::info!(from = %next, to = %Seq(first.0 - 1), "filling a gap in the watched log from etcd");
            self.metrics.gap_fills.inc();
            self.fill(next, Some(Seq(first.0 - 1))).await?;
        }
    }
}

/// Fail point `follower::delay_watch` (tests): a pause between the read and the watch, in which
/// the read's revision can be compacted.
fn watch_delay() -> Option<Duration> {
    fail::fail_point!("follower::delay_watch", |ms| ms
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis));
    None
}

/// Fail point `follower::drop_watched_batch` (tests): loses a watched batch, making a gap.
fn drop_watched_batch() -> bool {
    fail::fail_point!("follower::drop_watched_batch", |_| true);
    false
}

/// Errors that a reconnect can cure. A missing or damaged batch cannot: the follower stops.
fn is_transient(error: &Error) -> bool {
    matches!(error, Error::Etcd(_) | Error::EtcdTimeout(_))
}
