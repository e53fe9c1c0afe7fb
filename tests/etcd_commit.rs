//! Against a real etcd: a batch (or a run of them) and its commit pointer are written by one
//! fenced transaction, read back and decoded; a stale epoch, a pointer other than the one it is
//! chained to, or an existing batch key each make the transaction write nothing.

mod common;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use fencelog::batch::{BatchDecoder, EncodedBatch};
use fencelog::etcd::commit::{
    commit_batch, commit_run, moved, read_commit_view, settle, CommitOutcome, Head, Moved, Run,
    Settlement,
};
use fencelog::keys::KeyLayout;
use fencelog::limits::Limits;
use fencelog::local_store::{LocalStore, StoreOptions};
use fencelog::pointer::CommitPointer;
use fencelog::record::{Epoch, Seq};

fn layout() -> KeyLayout {
    KeyLayout::new(&"test-cluster".parse().unwrap())
}

/// Creates the leader key under a lease, as a primary does; its create revision is the epoch.
async fn take_leadership(client: &mut Client, layout: &KeyLayout, node: &str) -> Epoch {
    let lease = client.lease_grant(30, None).await.unwrap().id();
    let put = PutOptions::new().with_lease(lease);
    let txn = Txn::new()
        .when([Compare::create_revision(
            layout.leader(),
            CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::put(layout.leader(), node, Some(put))]);
    let response = client.txn(txn).await.unwrap();
    assert!(response.succeeded(), "someone else leads");
    Epoch(response.header().unwrap().revision() as u64)
}

/// A real etcd in which "node-a" has just taken the leadership of the test cluster.
async fn led_cluster() -> (common::EtcdProcess, Client, KeyLayout, Epoch) {
    let etcd = common::etcd().await;
    let mut client = etcd.client().await.unwrap();
    let layout = layout();
    let epoch = take_leadership(&mut client, &layout, "node-a").await;
    (etcd, client, layout, epoch)
}

/// Commits `batch` chained to `head`, which it then advances; panics if refused.
async fn commit_chained(
    client: &Client,
    layout: &KeyLayout,
    epoch: Epoch,
    head: &mut Head,
    batch: &EncodedBatch,
) {
    match commit_batch(&mut client.kv_client(), layout, epoch, head, batch).await {
        Ok(CommitOutcome::Committed { .. }) => *head = Head::after(batch, epoch),
        other => panic!("batch at {} not committed: {other:?}", batch.first_seq()),
    }
}

async fn get(client: &mut Client, key: String) -> Option<etcd_client::KeyValue> {
    client.get(key, None).await.unwrap().kvs().first().cloned()
}

#[tokio::test]
async fn a_batch_and_its_pointer_commit_in_one_transaction_and_decode_back() {
    let (_etcd, mut client, layout, epoch) = led_cluster().await;
    let batch = &common::encoded_batches(epoch, 1, 1024)[0];

    let outcome = commit_batch(&mut client.kv_client(), &layout, epoch, &Head::Empty, batch)
        .await
        .unwrap();
    let CommitOutcome::Committed { revision } = outcome else {
        panic!("refused: {outcome:?}")
    };

    let stored_batch = get(&mut client, layout.batch(Seq(1)))
        .await
        .expect("batch key exists");
    let stored_latest = get(&mut client, layout.latest())
        .await
        .expect("latest exists");
    assert_eq!(
        stored_batch.mod_revision(),
        revision,
        "batch and pointer share one revision"
    );
    assert_eq!(stored_latest.mod_revision(), revision);
    let mut decoder = BatchDecoder::new(Limits::default()).unwrap();
    let expected = BatchDecoder::new(Limits::default())
        .unwrap()
        .decode(batch.as_bytes())
        .unwrap();
    assert_eq!(decoder.decode(stored_batch.value()).unwrap(), expected);
    assert_eq!(
        CommitPointer::decode(stored_latest.value()).unwrap(),
        CommitPointer {
            last_seq: Seq(1024),
            epoch,
            batch_first_seq: Seq(1)
        }
    );
}

#[tokio::test]
async fn consecutive_commits_chain_on_the_pointer_each_leaves() {
    let (_etcd, mut client, layout, epoch) = led_cluster().await;
    let mut head = Head::Empty;
    for batch in &common::encoded_batches(epoch, 5, 100) {
        commit_chained(&client, &layout, epoch, &mut head, batch).await;
    }
    let latest = get(&mut client, layout.latest()).await.unwrap();
    assert_eq!(
        CommitPointer::decode(latest.value()).unwrap().last_seq,
        Seq(500)
    );
    let batches = client
        .get(
            layout.batches_prefix(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let first_seqs: Vec<Seq> = batches
        .kvs()
        .iter()
        .map(|kv| layout.parse_batch_key(kv.key()).unwrap())
        .collect();
    assert_eq!(first_seqs, [Seq(1), Seq(101), Seq(201), Seq(301), Seq(401)]);
}

#[tokio::test]
async fn a_deposed_primary_cannot_commit() {
    let etcd = common::etcd().await;
    let mut client = etcd.client().await.unwrap();
    let layout = layout();
    let old_epoch = take_leadership(&mut client, &layout, "node-a").await;
    client.delete(layout.leader(), None).await.unwrap();
    let new_epoch = take_leadership(&mut client, &layout, "node-b").await;

    let batch = &common::encoded_batches(old_epoch, 1, 10)[0];
    let outcome = commit_batch(
        &mut client.kv_client(),
        &layout,
        old_epoch,
        &Head::Empty,
        batch,
    )
    .await
    .unwrap();
    let CommitOutcome::Refused(refusal) = outcome else {
        panic!("a deposed primary committed")
    };
    assert!(refusal.is_fenced(old_epoch));
    assert_eq!(refusal.leader_epoch, Some(new_epoch));
    assert!(
        get(&mut client, layout.batch(Seq(1))).await.is_none(),
        "refused txn wrote a batch"
    );
    assert!(
        get(&mut client, layout.latest()).await.is_none(),
        "refused txn wrote the pointer"
    );
}

#[tokio::test]
async fn a_commit_without_a_leader_key_is_refused() {
    let etcd = common::etcd().await;
    let client = etcd.client().await.unwrap();
    let batch = &common::encoded_batches(Epoch(1), 1, 10)[0];
    let outcome = commit_batch(
        &mut client.kv_client(),
        &layout(),
        Epoch(1),
        &Head::Empty,
        batch,
    )
    .await
    .unwrap();
    let CommitOutcome::Refused(refusal) = outcome else {
        panic!("committed without leadership")
    };
    assert_eq!(refusal.leader_epoch, None);
}

#[tokio::test]
async fn a_commit_on_a_stale_pointer_is_refused_and_reports_the_head() {
    let (_etcd, mut client, layout, epoch) = led_cluster().await;
    let batches = common::encoded_batches(epoch, 2, 10);
    let mut kv = client.kv_client();
    let CommitOutcome::Committed { revision } =
        commit_batch(&mut kv, &layout, epoch, &Head::Empty, &batches[0])
            .await
            .unwrap()
    else {
        panic!("first commit refused")
    };

    let outcome = commit_batch(&mut kv, &layout, epoch, &Head::Empty, &batches[1])
        .await
        .unwrap();
    let CommitOutcome::Refused(refusal) = outcome else {
        panic!("committed on a stale revision")
    };
    assert!(!refusal.is_fenced(epoch));
    assert_eq!(refusal.latest_revision, revision);
    assert_eq!(refusal.latest.map(|p| p.last_seq), Some(Seq(10)));
    assert!(get(&mut client, layout.batch(Seq(11))).await.is_none());
    let value = refusal.latest_value.as_deref();
    assert_eq!(moved(value, &Head::Empty, &batches[1]), Some(Moved::Past));
}

#[tokio::test]
async fn a_commit_sent_before_the_one_it_follows_landed_is_refused_as_behind_then_lands() {
    let (_etcd, mut client, layout, epoch) = led_cluster().await;
    let batches = common::encoded_batches(epoch, 2, 10);
    let mut kv = client.kv_client();
    // The second batch, chained to the first, reaches etcd first: refused, nothing written.
    let after_first = Head::after(&batches[0], epoch);
    let early = commit_batch(&mut kv, &layout, epoch, &after_first, &batches[1])
        .await
        .unwrap();
    let CommitOutcome::Refused(refusal) = early else {
        panic!("committed ahead of the batch it follows: {early:?}")
    };
    let value = refusal.latest_value.as_deref();
    assert_eq!(moved(value, &after_first, &batches[1]), Some(Moved::Behind));
    assert!(get(&mut client, layout.batch(Seq(11))).await.is_none());

    let mut head = Head::Empty;
    commit_chained(&client, &layout, epoch, &mut head, &batches[0]).await;
    commit_chained(&client, &layout, epoch, &mut head, &batches[1]).await;
    let latest = get(&mut client, layout.latest()).await.unwrap();
    assert_eq!(
        CommitPointer::decode(latest.value()).unwrap().last_seq,
        Seq(20)
    );
}

#[tokio::test]
async fn a_commit_chained_to_a_batch_that_was_cut_into_parts_never_lands() {
    let (_etcd, mut client, layout, epoch) = led_cluster().await;
    // The batch 1..=20 was refused and committed as the parts 1..=10 and 11..=20 instead.
    let whole = &common::encoded_batches(epoch, 1, 20)[0];
    let parts = common::encoded_batches(epoch, 2, 10);
    let next = {
        let records = common::records(99, 5, 10);
        let batch = fencelog::batch::Batch::new(epoch, Seq(21), records).unwrap();
        fencelog::batch::BatchEncoder::new(Limits::default(), 1)
            .unwrap()
            .encode(&batch)
            .unwrap()
    };
    let mut head = Head::Empty;
    for part in &parts {
        commit_chained(&client, &layout, epoch, &mut head, part).await;
    }
    let stale = Head::after(whole, epoch);
    let outcome = commit_batch(&mut client.kv_client(), &layout, epoch, &stale, &next)
        .await
        .unwrap();
    let CommitOutcome::Refused(refusal) = outcome else {
        panic!("committed after a batch that never landed: {outcome:?}")
    };
    let value = refusal.latest_value.as_deref();
    assert_eq!(moved(value, &stale, &next), Some(Moved::Past));
    assert!(get(&mut client, layout.batch(Seq(21))).await.is_none());
}

#[tokio::test]
async fn an_existing_batch_key_is_never_overwritten() {
    let (_etcd, mut client, layout, epoch) = led_cluster().await;
    let original = &common::encoded_batches(epoch, 1, 10)[0];
    let mut kv = client.kv_client();
    commit_batch(&mut kv, &layout, epoch, &Head::Empty, original)
        .await
        .unwrap();
    let head = Head::after(original, epoch);

    let impostor = &common::encoded_batches(epoch, 1, 20)[0];
    let outcome = commit_batch(&mut kv, &layout, epoch, &head, impostor)
        .await
        .unwrap();
    assert!(matches!(outcome, CommitOutcome::Refused(_)), "{outcome:?}");
    let stored = get(&mut client, layout.batch(Seq(1))).await.unwrap();
    assert_eq!(stored.value(), original.as_bytes());
}

#[tokio::test]
async fn batches_read_from_etcd_rebuild_the_same_local_store() {
    let (_etcd, mut client, layout, epoch) = led_cluster().await;
    let primary_dir = tempfile::tempdir().unwrap();
    let primary = LocalStore::open(primary_dir.path(), StoreOptions::default()).unwrap();
    let mut head = Head::Empty;
    for batch in &common::encoded_batches(epoch, 8, 256) {
        primary.append_pending(batch).unwrap();
        commit_chained(&client, &layout, epoch, &mut head, batch).await;
        primary.mark_committed(batch.last_seq()).unwrap();
    }
    while primary.apply_next().unwrap().is_some() {}

    let standby_dir = tempfile::tempdir().unwrap();
    let standby = LocalStore::open(standby_dir.path(), StoreOptions::default()).unwrap();
    // Paginated, as a standby must: one range read may not exceed the client's decode limit.
    let page_options = etcd_client::GetOptions::new()
        .with_range(prefix_end(&layout.batches_prefix()))
        .with_limit(3);
    let mut from = layout.batches_prefix();
    loop {
        let page = client
            .get(from.clone(), Some(page_options.clone()))
            .await
            .unwrap();
        for kv in page.kvs() {
            let batch = EncodedBatch::parse(kv.value().to_vec(), &Limits::default()).unwrap();
            standby.append_committed(&batch).unwrap();
        }
        if !page.more() {
            break;
        }
        let last = page.kvs().last().unwrap();
        from = layout.batch(layout.parse_batch_key(last.key()).unwrap().next().unwrap());
    }
    while standby.apply_next().unwrap().is_some() {}
    assert_eq!(standby.positions().unwrap(), primary.positions().unwrap());
    assert_eq!(
        standby.state_digest().unwrap(),
        primary.state_digest().unwrap()
    );
}

/// The smallest key above every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    end
}

#[tokio::test]
async fn a_run_of_batches_lands_at_one_revision_each_under_its_own_key() {
    let (_etcd, mut client, layout, epoch) = led_cluster().await;
    let batches: Vec<_> = common::encoded_batches(epoch, 3, 10)
        .into_iter()
        .map(std::sync::Arc::new)
        .collect();
    let run = Run::new(&batches[0], &batches[1..]);

    let outcome = commit_run(&mut client.kv_client(), &layout, epoch, &Head::Empty, &run)
        .await
        .unwrap();
    let CommitOutcome::Committed { revision } = outcome else {
        panic!("refused: {outcome:?}")
    };
    for (batch, first) in batches.iter().zip([1, 11, 21]) {
        let stored = get(&mut client, layout.batch(Seq(first))).await.unwrap();
        assert_eq!(stored.value(), batch.as_bytes(), "batch at {first}");
        assert_eq!(stored.mod_revision(), revision);
    }
    let latest = get(&mut client, layout.latest()).await.unwrap();
    assert_eq!(
        Head::read(Some(latest.value())),
        Head::after(&batches[2], epoch),
        "latest points at the run's last batch"
    );
}

#[tokio::test]
async fn a_run_chained_to_a_pointer_that_moved_writes_none_of_its_batches() {
    let (_etcd, mut client, layout, epoch) = led_cluster().await;
    let batches = common::encoded_batches(epoch, 3, 10);
    let mut head = Head::Empty;
    commit_chained(&client, &layout, epoch, &mut head, &batches[0]).await;
    let rest: Vec<_> = batches[1..]
        .iter()
        .cloned()
        .map(std::sync::Arc::new)
        .collect();
    // Chained to no batch at all, as a run sent by a primary that missed the first one.
    let outcome = commit_run(
        &mut client.kv_client(),
        &layout,
        epoch,
        &Head::Empty,
        &Run::new(&rest[0], &rest[1..]),
    )
    .await
    .unwrap();
    assert!(matches!(outcome, CommitOutcome::Refused(_)), "{outcome:?}");
    for first in [11, 21] {
        assert!(get(&mut client, layout.batch(Seq(first))).await.is_none());
    }
}

#[tokio::test]
async fn a_run_whose_answer_was_lost_is_settled_by_its_first_batch() {
    let (_etcd, client, layout, epoch) = led_cluster().await;
    let batches: Vec<_> = common::encoded_batches(epoch, 3, 10)
        .into_iter()
        .map(std::sync::Arc::new)
        .collect();
    let run = Run::new(&batches[0], &batches[1..]);
    let mut kv = client.kv_client();
    let view = read_commit_view(&mut kv, &layout, run.first())
        .await
        .unwrap();
    assert_eq!(
        settle(&view, epoch, &Head::Empty, run.first()),
        Settlement::Open,
        "not sent yet: it may still land"
    );

    // Sent, and its answer lost: what etcd holds says it landed, whole.
    commit_run(&mut kv, &layout, epoch, &Head::Empty, &run)
        .await
        .unwrap();
    let view = read_commit_view(&mut kv, &layout, run.first())
        .await
        .unwrap();
    assert_eq!(
        settle(&view, epoch, &Head::Empty, run.first()),
        Settlement::Landed
    );
    assert_eq!(
        Head::read(view.latest.as_deref()),
        Head::after(run.last(), epoch),
        "latest points at its last batch"
    );
}
