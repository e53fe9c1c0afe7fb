//! A snapshot that is cut off midway or corrupt is discarded: the old store is untouched, and
//! a retry installs a complete one. Fail points place the fault.

use crate::common;
use common::{node, ServedNode};
use fail::FailScenario;
use fencelog::api::{Endpoint, WalClient};
use fencelog::etcd::trim::Retention;
use fencelog::local_store::{LocalStore, StoreOptions};
use fencelog::record::Seq;
use fencelog::snapshot::bootstrap;
use fencelog::workload::RecordGenerator;

/// A primary serving the API with 2,000 applied records (with its pieces, which must outlive
/// it), and a closed store in `old` holding another state, whose digest is returned.
async fn setup(
    etcd: &common::EtcdProcess,
    old: &tempfile::TempDir,
) -> (common::Node, ServedNode, fencelog::local_store::StateDigest) {
    let pieces = node("primary");
    let primary = ServedNode::start_leading(etcd, &pieces, Retention::default()).await;
    let mut generator = RecordGenerator::new(5, 5_000, 256);
    for _ in 0..20 {
        primary
            .node
            .append(generator.take_records(100))
            .await
            .unwrap();
    }
    primary.node.wait_applied(Seq(2_000)).await.unwrap();
    let store = LocalStore::open(old.path(), StoreOptions::default()).unwrap();
    let batches = common::encoded_batches(fencelog::record::Epoch(1), 3, 10);
    store.append_committed_all(&batches).unwrap();
    while store.apply_next().unwrap().is_some() {}
    let digest = store.state_digest().unwrap();
    drop(store);
    (pieces, primary, digest)
}

async fn install(primary: &ServedNode, dir: &std::path::Path) -> fencelog::Result<u64> {
    let mut source = WalClient::connect(Endpoint::Server(primary.addr.clone())).await?;
    bootstrap(&mut source, dir, StoreOptions::default(), |_| {})
        .await
        .map(|header| header.seq)
}

fn digest_of(dir: &std::path::Path) -> fencelog::local_store::StateDigest {
    LocalStore::open(dir, StoreOptions::default())
        .unwrap()
        .state_digest()
        .unwrap()
}

/// With `fail_point` on, an install fails with `expected` in its error and leaves the old
/// store as it was; with it off again, a retry installs the primary's state.
async fn a_failed_install_keeps_the_old_store_and_a_retry_succeeds(
    fail_point: &str,
    expected: &str,
) {
    let scenario = FailScenario::setup();
    let etcd = common::etcd().await;
    let old = tempfile::tempdir().unwrap();
    let (_pieces, primary, old_digest) = setup(&etcd, &old).await;

    let failing = common::FailPoint::set(fail_point, "return");
    let failed = install(&primary, old.path()).await;
    assert!(
        failed
            .as_ref()
            .is_err_and(|e| e.to_string().contains(expected)),
        "{failed:?}"
    );
    assert_eq!(
        digest_of(old.path()),
        old_digest,
        "the old store is untouched"
    );

    drop(failing);
    assert_eq!(install(&primary, old.path()).await.unwrap(), 2_000);
    assert_eq!(
        digest_of(old.path()),
        primary.node.store().state_digest().unwrap()
    );
    primary.stop().await;
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_cut_off_midway_leaves_the_old_store_and_a_retry_succeeds() {
    a_failed_install_keeps_the_old_store_and_a_retry_succeeds(
        "api::cut_off_snapshot_stream",
        "cut off",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_snapshot_chunk_is_refused_and_the_old_store_kept() {
    a_failed_install_keeps_the_old_store_and_a_retry_succeeds(
        "snapshot::corrupt_chunk",
        "checksum mismatch",
    )
    .await;
}
