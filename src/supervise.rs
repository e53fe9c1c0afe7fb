//! How a task ended, for the tasks that must never end in silence: the primary's pipeline
//! (whose supervisor steps the term down) and a standby's follower (which the node restarts).
//! Without this, a panic in one of them left a node that looked alive and did nothing.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;

/// Runs `task` to its end and says how it ended: `"stopped"`, or `"panicked: <message>"`.
pub(crate) async fn run_to_end(task: impl Future<Output = ()>) -> String {
    match unless_panicked(task).await {
        Ok(()) => "stopped".to_owned(),
        Err(panicked) => panicked,
    }
}

/// Runs `task` to its end: what it returned, or `"panicked: <message>"`.
pub(crate) async fn unless_panicked<T>(task: impl Future<Output = T>) -> Result<T, String> {
    AssertUnwindSafe(task)
        .catch_unwind()
        .await
        .map_err(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|m| (*m).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_owned());
            format!("panicked: {message}")
        })
}
