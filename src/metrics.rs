//! The Prometheus registry and the handles every component updates.
//!
//! One `Metrics` per process, shared by `Arc`; `render` gives the text exposition format.

use prometheus::{
    exponential_buckets, Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::batch::unix_micros_now;
use crate::error::Result;
use crate::lifecycle::State;
use crate::record::Seq;

/// Seconds from `micros` (since the Unix epoch) to now; 0 if the clock says it is ahead.
fn seconds_since(micros: u64) -> f64 {
    unix_micros_now().saturating_sub(micros) as f64 / 1e6
}

/// How far a position (received or applied) is behind, in seconds: 0 once it has reached
/// `target`; else the age of the oldest record it lacks, from `waiting_sealed_at` — when the
/// first batch past the position was sealed, or, where that batch is not known here, the
/// batch ending at the position (an upper bound) — so it grows with the wall clock while the
/// position stands still, and never goes stale at the value of the last batch.
pub fn lag_seconds(
    position: Seq,
    target: Seq,
    waiting_sealed_at: Option<u64>,
    now_micros: u64,
) -> f64 {
    if position >= target {
        return 0.0;
    }
    waiting_sealed_at.map_or(0.0, |sealed| now_micros.saturating_sub(sealed) as f64 / 1e6)
}

pub struct Metrics {
    registry: Registry,
    /// Batches committed to etcd by this node as primary.
    pub commits: IntCounter,
    /// Commit transactions that landed (one carries one or more batches).
    pub commit_transactions: IntCounter,
    /// Records committed to etcd by this node as primary.
    pub committed_records: IntCounter,
    /// Commit transactions etcd refused, by reason (`fenced`, `conflict`).
    pub commit_refusals: IntCounterVec,
    /// Commit attempts whose outcome was unknown (timeout, lost connection) and was resolved.
    pub commit_retries: IntCounter,
    /// Times this node stopped leading, by reason.
    pub step_downs: IntCounterVec,
    /// Seconds from sending a commit transaction to its answer.
    pub commit_seconds: Histogram,
    /// Seconds to seal a batch and encode it (bincode, checksum, zstd): the commit path's CPU.
    pub seal_seconds: Histogram,
    /// Records per committed batch.
    pub batch_records: Histogram,
    /// Encoded bytes per committed batch.
    pub batch_bytes: Histogram,
    /// Payload bytes of appends waiting for a commit.
    pub pending_bytes: IntGauge,
    /// The last seq this node knows to be committed in etcd.
    pub committed_seq: IntGauge,
    /// The last seq in this node's local log as committed (`received_seq`).
    pub received_seq: IntGauge,
    /// The last seq applied to this node's state.
    pub applied_seq: IntGauge,
    /// `committed_seq - received_seq`.
    pub receive_lag_records: IntGauge,
    /// `committed_seq - applied_seq`.
    pub apply_lag_records: IntGauge,
    /// Seconds from the seal of the last received batch to its receipt.
    pub receive_lag_seconds: Gauge,
    /// Seconds from the seal of the batch holding the last applied seq to its apply.
    pub apply_lag_seconds: Gauge,
    /// This node's leadership epoch while it leads; 0 otherwise.
    pub epoch: IntGauge,
    /// Batches this node received from etcd as a standby (catch-up and watch).
    pub received_batches: IntCounter,
    /// Times a standby's follower reconnected to etcd.
    pub watch_reconnects: IntCounter,
    /// etcd requests that failed, by operation (`commit`, `follow`).
    pub etcd_errors: IntCounterVec,
    /// Batches refused because they failed verification (checksum, framing or limits).
    pub checksum_failures: IntCounter,
    /// Appends acknowledged by this node as primary.
    pub appends: IntCounter,
    /// Records in the appends acknowledged by this node as primary.
    pub appended_records: IntCounter,
    /// Seconds to apply one batch to the state in memory.
    pub apply_seconds: Histogram,
    /// Seconds per checkpoint of the state, from taking its changes to the flush.
    pub checkpoint_seconds: Histogram,
    /// Bytes of pages written by checkpoints.
    pub checkpoint_bytes: IntCounter,
    /// The seq of the state's last checkpoint: a restart replays the local log after it.
    pub checkpoint_seq: IntGauge,
    /// Checkpoints that failed (the local store failed); the next one writes every page.
    pub checkpoint_failures: IntCounter,
    /// Lifecycle transitions, by the state entered.
    pub state_transitions: IntCounterVec,
    /// Gaps in the watched log that a standby filled by reading etcd.
    pub gap_fills: IntCounter,
    /// Followers that ended by themselves (a panic: a bug) and were replaced.
    pub follower_restarts: IntCounter,
    /// The lowest seq still in etcd, as this node last trimmed it.
    pub trimmed_seq: IntGauge,
    /// Encoded bytes of the batches in etcd, as the primary counts them.
    pub etcd_log_bytes: IntGauge,
    /// Trim transactions that deleted old batches from etcd.
    pub trims: IntCounter,
    /// etcd revision compactions run after trims.
    pub compactions: IntCounter,
    /// Bytes of the snapshot being installed received so far.
    pub snapshot_bytes: IntGauge,
    /// Snapshots installed into this node's store.
    pub snapshots_installed: IntCounter,
    /// 1 for the node's current lifecycle state, 0 for the others.
    pub state: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics> {
        let registry = Registry::new_custom(Some("fencelog".into()), None)?;
        let counter = |name: &str, help: &str| -> Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counter_vec = |name: &str, help: &str, label: &str| -> Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let float_gauge = |name: &str, help: &str| -> Result<Gauge> {
            let g = Gauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let metrics = Metrics {
            commits: counter("commits_total", "Batches committed to etcd")?,
            commit_transactions: counter(
                "commit_transactions_total",
                "Commit transactions that landed, each carrying one or more batches",
            )?,
            committed_records: counter("committed_records_total", "Records committed to etcd")?,
            commit_refusals: counter_vec(
                "commit_refusals_total",
                "Commit transactions etcd refused",
                "reason",
            )?,
            commit_retries: counter(
                "commit_retries_total",
                "Commit attempts with an unknown outcome, resolved by reading back",
            )?,
            step_downs: counter_vec(
                "step_downs_total",
                "Times this node stopped leading",
                "reason",
            )?,
            commit_seconds: histogram(
                "commit_seconds",
                "etcd commit transaction latency",
                exponential_buckets(0.0002, 2.0, 16)?,
            )?,
            seal_seconds: histogram(
                "seal_seconds",
                "Time to seal and encode a batch",
                exponential_buckets(0.0001, 2.0, 16)?,
            )?,
            batch_records: histogram(
                "batch_records",
                "Records per committed batch",
                exponential_buckets(1.0, 2.0, 14)?,
            )?,
            batch_bytes: histogram(
                "batch_bytes",
                "Encoded bytes per committed batch",
                exponential_buckets(256.0, 2.0, 14)?,
            )?,
            pending_bytes: gauge(
                "pending_bytes",
                "Payload bytes of appends waiting for a commit",
            )?,
            committed_seq: gauge("committed_seq", "Last seq known committed in etcd")?,
            received_seq: gauge("received_seq", "Last committed seq in the local log")?,
            applied_seq: gauge("applied_seq", "Last seq applied to this node's state")?,
            receive_lag_records: gauge(
                "receive_lag_records",
                "Committed records not yet in the local log",
            )?,
            apply_lag_records: gauge(
                "apply_lag_records",
                "Committed records not yet applied to the state",
            )?,
            receive_lag_seconds: float_gauge(
                "receive_lag_seconds",
                "Seconds from the seal of the last received batch to its receipt",
            )?,
            apply_lag_seconds: float_gauge(
                "apply_lag_seconds",
                "Seconds from the seal of the last applied batch to its apply",
            )?,
            epoch: gauge("epoch", "Leadership epoch while leading, else 0")?,
            received_batches: counter(
                "received_batches_total",
                "Batches received from etcd as a standby",
            )?,
            watch_reconnects: counter(
                "watch_reconnects_total",
                "Times a standby's follower reconnected to etcd",
            )?,
            etcd_errors: counter_vec(
                "etcd_errors_total",
                "etcd requests that failed, by operation",
                "op",
            )?,
            checksum_failures: counter(
                "checksum_failures_total",
                "Batches refused because they failed verification (checksum, framing, limits)",
            )?,
            appends: counter("appends_total", "Appends acknowledged as primary")?,
            appended_records: counter(
                "appended_records_total",
                "Records in the appends acknowledged as primary",
            )?,
            apply_seconds: histogram(
                "apply_seconds",
                "Seconds to apply one batch to the state in memory",
                exponential_buckets(0.00001, 2.0, 18)?,
            )?,
            checkpoint_seconds: histogram(
                "checkpoint_seconds",
                "Seconds per checkpoint of the state, from taking its changes to the flush",
                exponential_buckets(0.001, 2.0, 16)?,
            )?,
            checkpoint_bytes: counter(
                "checkpoint_bytes_total",
                "Bytes of pages written by checkpoints of the state",
            )?,
            checkpoint_seq: gauge(
                "checkpoint_seq",
                "Seq of the state's last checkpoint; a restart replays the local log after it",
            )?,
            checkpoint_failures: counter(
                "checkpoint_failures_total",
                "Checkpoints of the state that failed",
            )?,
            state_transitions: counter_vec(
                "state_transitions_total",
                "Lifecycle transitions, by the state entered",
                "to",
            )?,
            gap_fills: counter(
                "gap_fills_total",
                "Gaps in the watched log filled by reading etcd",
            )?,
            follower_restarts: counter(
                "follower_restarts_total",
                "Followers that ended by themselves (a panic) and were replaced",
            )?,
            trimmed_seq: gauge("trimmed_seq", "Lowest seq still in etcd, as last trimmed")?,
            etcd_log_bytes: gauge(
                "etcd_log_bytes",
                "Encoded bytes of the batches in etcd, as the primary counts them",
            )?,
            trims: counter("trims_total", "Trim transactions that deleted old batches")?,
            compactions: counter(
                "compactions_total",
                "etcd revision compactions run after trims",
            )?,
            snapshot_bytes: gauge(
                "snapshot_bytes",
                "Bytes of the snapshot being installed received so far",
            )?,
            snapshots_installed: counter(
                "snapshots_installed_total",
                "Snapshots installed into this node's store",
            )?,
            state: {
                let g = IntGaugeVec::new(
                    Opts::new("state", "1 for the node's current lifecycle state"),
                    &["state"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            registry,
        };
        // Label values known up front are exported from the start, at 0, so that rates and
        // alerts work before the first event.
        for reason in ["fenced", "conflict", "behind"] {
            metrics.commit_refusals.with_label_values(&[reason]);
        }
        for op in ["commit", "follow", "trim"] {
            metrics.etcd_errors.with_label_values(&[op]);
        }
        for reason in ["fenced", "leadership_lost", "pipeline_failed", "shutdown"] {
            metrics.step_downs.with_label_values(&[reason]);
        }
        for state in State::ALL {
            metrics.state_transitions.with_label_values(&[state.name()]);
            metrics.state.with_label_values(&[state.name()]);
        }
        Ok(metrics)
    }

    /// Records that etcd holds the log through `seq`: the committed seq only moves forward.
    pub fn saw_committed(&self, seq: Seq) {
        if seq.0 as i64 > self.committed_seq.get() {
            self.committed_seq.set(seq.0 as i64);
        }
        self.refresh_lag_records();
    }

    /// Records a batch ending at `seq` sealed at `sealed_at_micros` landing in the local log.
    pub fn received(&self, seq: Seq, sealed_at_micros: u64) {
        self.received_seq.set(seq.0 as i64);
        self.receive_lag_seconds
            .set(seconds_since(sealed_at_micros));
        self.saw_committed(seq);
    }

    /// Records the state reaching `seq`, in a batch sealed at `sealed_at_micros`.
    pub fn applied(&self, seq: Seq, sealed_at_micros: u64) {
        self.applied_seq.set(seq.0 as i64);
        self.apply_lag_seconds.set(seconds_since(sealed_at_micros));
        self.refresh_lag_records();
    }

    fn refresh_lag_records(&self) {
        let committed = self.committed_seq.get();
        self.receive_lag_records
            .set((committed - self.received_seq.get()).max(0));
        self.apply_lag_records
            .set((committed - self.applied_seq.get()).max(0));
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec fails only on metric families that cannot exist here.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot render metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod lag_tests {
    use super::*;

    const NOW: u64 = 100_000_000;

    #[test]
    fn a_position_that_reached_its_target_has_no_lag_however_old_its_last_batch() {
        assert_eq!(lag_seconds(Seq(10), Seq(10), Some(1), NOW), 0.0);
        assert_eq!(lag_seconds(Seq(11), Seq(10), None, NOW), 0.0);
    }

    #[test]
    fn a_position_behind_lags_by_the_age_of_the_oldest_record_it_lacks() {
        assert_eq!(
            lag_seconds(Seq(5), Seq(10), Some(NOW - 2_500_000), NOW),
            2.5
        );
    }

    #[test]
    fn the_lag_of_a_position_standing_still_grows_with_the_clock() {
        let sealed = Some(NOW - 1_000_000);
        let earlier = lag_seconds(Seq(5), Seq(10), sealed, NOW);
        let later = lag_seconds(Seq(5), Seq(10), sealed, NOW + 30_000_000);
        assert_eq!((earlier, later), (1.0, 31.0));
    }
}
