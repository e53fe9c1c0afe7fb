//! etcd a round trip away, for `fencelog bench`: etcd behind the project's delaying proxy
//! (`fencelog::etcd::proxy::FaultProxy`: every chunk held for the delay in each direction,
//! pipelined, on loopback, these kernels having no `netem`), a primary daemon committing
//! through it with 1, 2, 4 or 8 commit transactions in flight, loaded through its API
//! (`measure::api_load`); what its commits took, from its `/metrics`.

use std::time::Duration;

use anyhow::Context;
use fencelog::node_process::NodeProcess;

use super::state::{metric_value, metrics_text};

/// Clients appending at once, and records per append, for the rows a round trip away (the
/// load the "before" figures were measured with).
pub const CLIENTS: usize = 64;
pub const PER_APPEND: usize = 64;

/// A primary daemon's commits so far.
pub struct Commits {
    pub records_per_batch: f64,
    /// Batches per commit transaction (several go together when they waited for one).
    pub batches_per_transaction: f64,
    /// Mean time of one commit transaction (`fencelog_commit_seconds`).
    pub mean: Duration,
    /// Transactions etcd refused because the one before had not landed yet.
    pub behind: u64,
}

/// What `node`'s commits took, from its `/metrics`.
pub async fn commits(node: &NodeProcess) -> anyhow::Result<Commits> {
    let text = metrics_text(node.metrics_addr())
        .await
        .with_context(|| format!("cannot read the metrics at {}", node.metrics_addr()))?;
    let value = |name: &str| metric_value(&text, name);
    let commits = value("fencelog_commits_total").max(1.0);
    Ok(Commits {
        records_per_batch: value("fencelog_committed_records_total") / commits,
        batches_per_transaction: commits / value("fencelog_commit_transactions_total").max(1.0),
        mean: Duration::from_secs_f64(
            value("fencelog_commit_seconds_sum") / value("fencelog_commit_seconds_count").max(1.0),
        ),
        behind: value("fencelog_commit_refusals_total{reason=\"behind\"}") as u64,
    })
}

/// A delay as the rows name it: `0.5` or `2` (milliseconds).
pub fn in_ms(delay: Duration) -> String {
    format!("{}", delay.as_micros() as f64 / 1000.0)
}
