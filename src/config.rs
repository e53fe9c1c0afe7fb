//! The primary's settings, with their defaults in one place, validated once.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::etcd::leadership::{LeaderInfo, LeaseSettings};
use crate::etcd::trim::Retention;
use crate::keys::{ClusterId, NodeName};
use crate::limits::Limits;

/// How many sealed batches the commit pipeline holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pipeline {
    /// One batch at a time: appends wait while a batch is encoded and committed (the design
    /// fencelog replaces; kept to measure against).
    Single,
    /// While one batch is in its etcd transaction, the next is sealed, encoded and written to
    /// the local log. The default.
    Double,
}

/// The most commit transactions [`PrimaryConfig::max_commits_in_flight`] may allow.
pub const MAX_COMMITS_IN_FLIGHT: usize = 64;

/// The most batches one commit transaction carries: the full batches sealed while every
/// commit was in flight go to etcd together once one is answered (`etcd::commit::Run`), within
/// one batch's worth of bytes (`max_batch_bytes`, as etcd's refusals lowered it).
pub const MAX_BATCHES_PER_COMMIT: usize = 8;

#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    pub cluster: ClusterId,
    pub node: NodeName,
    /// The API address written into the leader key, so clients and standbys can find us.
    pub advertise_addr: String,
    /// TTL of the leadership lease. Default 5 s. Keepalives go out every third of it.
    pub lease_ttl: Duration,
    /// How long before the lease may have expired (counted from the last keepalive etcd
    /// answered) the primary stops committing. Default 1 s.
    pub lease_safety_margin: Duration,
    /// Seal a batch at this many records. Default 1024.
    pub max_batch_records: usize,
    /// Seal a batch at this many payload (key + value) bytes. Default 256 KiB, which zstd
    /// level 1 turns into roughly 64–96 KB: the size etcd handles best.
    pub max_batch_bytes: usize,
    /// The largest etcd request this primary has seen refused as too large (etcd's
    /// `--max-request-bytes` is below it), once one was: batches are then capped below it, and
    /// a record that cannot fit is refused. Learned, never set by hand. Default: none.
    pub etcd_refused_request: Option<usize>,
    /// How long a batch waits for more records after its first one. Default 0: a batch is
    /// sealed as soon as the pipeline has room (natural group commit).
    pub linger: Duration,
    pub pipeline: Pipeline,
    /// Commit transactions sent to etcd and not yet answered, at most, in the `Double`
    /// pipeline (`Single` commits one batch at a time, whatever this says). Each is
    /// chained to the one before (`etcd::commit`), so they land in order or not at all; more
    /// than one hides etcd's round trip when it is far away (batches that wait meanwhile go
    /// together in the next, `MAX_BATCHES_PER_COMMIT`). Default 2 (docs/BENCHMARKS.md, "Commits
    /// in flight, second round": the best or within 6% of it at 0–2 ms but one row; more are
    /// refused as behind too often, and seal smaller batches).
    pub max_commits_in_flight: usize,
    /// Payload bytes waiting for a commit, at most; appends wait beyond it. Default 64 MiB.
    pub max_pending_bytes: usize,
    /// How long one batch may keep retrying through etcd trouble before its appends fail and
    /// the primary steps down. Default 10 s.
    pub commit_deadline: Duration,
    /// Timeout of one etcd request. Default 2 s.
    pub etcd_request_timeout: Duration,
    /// zstd level for batches. Default 1 (fastest, and no larger than 3 on log records).
    pub zstd_level: i32,
    pub limits: Limits,
    /// How much of the log etcd keeps; see [`Retention`] for the defaults.
    pub retention: Retention,
}

impl PrimaryConfig {
    pub fn new(cluster: ClusterId, node: NodeName, advertise_addr: impl Into<String>) -> Self {
        PrimaryConfig {
            cluster,
            node,
            advertise_addr: advertise_addr.into(),
            lease_ttl: Duration::from_secs(5),
            lease_safety_margin: Duration::from_secs(1),
            max_batch_records: 1024,
            max_batch_bytes: 256 * 1024,
            etcd_refused_request: None,
            linger: Duration::ZERO,
            pipeline: Pipeline::Double,
            max_commits_in_flight: 2,
            max_pending_bytes: 64 * 1024 * 1024,
            commit_deadline: Duration::from_secs(10),
            etcd_request_timeout: Duration::from_secs(2),
            zstd_level: 1,
            limits: Limits::default(),
            retention: Retention::default(),
        }
    }

    /// What this node writes into the leader key.
    pub fn leader_info(&self) -> LeaderInfo {
        LeaderInfo {
            node: self.node.clone(),
            addr: self.advertise_addr.clone(),
        }
    }

    /// The lease timing a campaign uses.
    pub fn lease(&self) -> LeaseSettings {
        LeaseSettings {
            ttl: self.lease_ttl,
            safety_margin: self.lease_safety_margin,
            request_timeout: self.etcd_request_timeout,
        }
    }

    /// Sealed batches the pipeline holds at once, the one being filled among them: one
    /// (`Single`); in the `Double` pipeline one per commit in flight, and room beyond them for
    /// a run's worth (`MAX_BATCHES_PER_COMMIT`) of full batches to wait for the next
    /// transaction.
    pub fn pipeline_depth(&self) -> usize {
        match self.pipeline {
            Pipeline::Single => 1,
            Pipeline::Double => self.max_commits_in_flight + MAX_BATCHES_PER_COMMIT,
        }
    }

    /// Commit transactions the committer keeps on their way at once.
    pub fn commits_in_flight(&self) -> usize {
        match self.pipeline {
            Pipeline::Single => 1,
            Pipeline::Double => self.max_commits_in_flight,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.limits.validate()?;
        let fail = |msg: String| Err(Error::InvalidConfig(msg));
        if !(1..=MAX_COMMITS_IN_FLIGHT).contains(&self.max_commits_in_flight) {
            return fail(format!(
                "max_commits_in_flight {} must be between 1 and {MAX_COMMITS_IN_FLIGHT}",
                self.max_commits_in_flight
            ));
        }
        if self.lease_ttl < Duration::from_secs(2) {
            return fail(format!(
                "lease_ttl {:?} is under etcd's minimum useful TTL of 2 s",
                self.lease_ttl
            ));
        }
        if self.lease_safety_margin * 2 > self.lease_ttl {
            return fail(format!(
                "lease_safety_margin {:?} must be at most half of lease_ttl {:?}",
                self.lease_safety_margin, self.lease_ttl
            ));
        }
        if self.max_batch_records == 0 || self.max_batch_records > u32::MAX as usize {
            return fail(format!(
                "max_batch_records {} must be at least 1",
                self.max_batch_records
            ));
        }
        // A full batch of small records must still encode under the hard cap.
        let worst = crate::limits::worst_case_encoded_len(
            self.max_batch_bytes + self.max_batch_records * 11,
        );
        if self.max_batch_bytes == 0 || worst > self.limits.max_batch_bytes {
            return fail(format!(
                "max_batch_bytes {} with max_batch_records {} may encode to {worst} bytes, over the \
                 batch cap of {}",
                self.max_batch_bytes, self.max_batch_records, self.limits.max_batch_bytes
            ));
        }
        if self.max_pending_bytes < self.max_batch_bytes.max(self.limits.max_value_bytes) {
            return fail(format!(
                "max_pending_bytes {} must hold at least one full batch and one maximal value",
                self.max_pending_bytes
            ));
        }
        if self.retention.interval.is_zero() {
            return fail("retention interval must be above zero".into());
        }
        if self.max_pending_bytes > u32::MAX as usize {
            return fail(format!(
                "max_pending_bytes {} is over 4 GiB",
                self.max_pending_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PrimaryConfig {
        PrimaryConfig::new("c1".parse().unwrap(), "a".parse().unwrap(), "127.0.0.1:1")
    }

    #[test]
    fn the_double_pipeline_holds_the_commits_in_flight_and_a_runs_worth_of_batches_waiting() {
        let mut config = config();
        for k in [1, 2, 8] {
            config.max_commits_in_flight = k;
            assert_eq!(config.pipeline_depth(), k + MAX_BATCHES_PER_COMMIT);
            assert_eq!(config.commits_in_flight(), k);
            assert!(config.validate().is_ok());
        }
    }

    #[test]
    fn the_single_pipeline_holds_one_batch_and_commits_it_alone() {
        let mut config = config();
        config.pipeline = Pipeline::Single;
        for k in [1, 2, 8] {
            config.max_commits_in_flight = k;
            assert_eq!(config.pipeline_depth(), 1);
            assert_eq!(config.commits_in_flight(), 1);
            assert!(config.validate().is_ok());
        }
    }

    #[test]
    fn commits_in_flight_are_at_least_one_and_bounded() {
        let mut config = config();
        for k in [0, MAX_COMMITS_IN_FLIGHT + 1] {
            config.max_commits_in_flight = k;
            let refused = config.validate().unwrap_err().to_string();
            assert!(refused.contains("max_commits_in_flight"), "{refused}");
        }
    }
}
