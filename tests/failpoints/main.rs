//! In-process tests that force faults with fail points against a real etcd: the follower's
//! recovery paths, the primary's retention, a snapshot cut off or corrupt. Built only with
//! `--features failpoints` (`[[test]] required-features`; tools/test.sh passes it). The fault
//! tests with real daemons are `tests/faults.rs`.

#[path = "../common/mod.rs"]
mod common;

mod follower;
mod primary;
mod snapshot;
