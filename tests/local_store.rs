//! The local store's contract: the log and the state advance separately, each never behind
//! its position's promise; the state is rebuilt on open from its checkpoint and the log after
//! it; both survive reopening and crashes, and the store refuses anything that would leave a gap
//! or a position pointing past what it covers.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fencelog::batch::{Batch, BatchEncoder, EncodedBatch};
use fencelog::limits::Limits;
use fencelog::local_store::{LocalStore, Positions, StoreOptions, STORE_FORMAT};
use fencelog::record::{Epoch, Op, Record, Seq};
use fencelog::Error;

fn open(dir: &std::path::Path) -> LocalStore {
    LocalStore::open(dir, StoreOptions::default()).expect("store opens")
}

/// Opening `dir` must fail; returns why.
fn open_refused(dir: &std::path::Path) -> Error {
    match LocalStore::open(dir, StoreOptions::default()) {
        Err(e) => e,
        Ok(store) => panic!("the store opened at {:?}", store.positions()),
    }
}

/// Fills a store in `dir` with `batches` committed and applied batches, then closes it.
fn fill_and_close(dir: &std::path::Path, batches: usize, per_batch: usize) {
    let store = open(dir);
    for batch in common::encoded_batches(Epoch(1), batches, per_batch) {
        store.append_committed(&batch).unwrap();
    }
    apply_all(&store);
}

/// Rewrites the closed store's format marker, as a store from another build would have it.
fn set_format(dir: &std::path::Path, format: u64) {
    let db = common::raw_sled(dir);
    db.open_tree("meta")
        .unwrap()
        .insert("format", &format.to_be_bytes())
        .unwrap();
    db.flush().unwrap();
}

fn apply_all(store: &LocalStore) {
    while store.apply_next().expect("applies").is_some() {}
}

/// The state that replaying `records` produces.
fn replay(records: &[(Seq, Record)]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut state = BTreeMap::new();
    for (_, record) in records {
        match record.op {
            Op::Put => state.insert(record.key.clone(), record.value.clone()),
            Op::Delete => state.remove(&record.key),
        };
    }
    state
}

/// Asserts that the store's state is exactly the replay of its log up to `applied_seq`.
fn assert_state_is_replay_of_log(store: &LocalStore) {
    let positions = store.positions().unwrap();
    let applied = positions.applied_seq.0 as usize;
    let log = store.read(Seq(1), applied, usize::MAX).unwrap();
    assert_eq!(log.len(), applied);
    let expected = replay(&log);
    let digest = store.state_digest().unwrap();
    assert_eq!(
        digest.keys,
        expected.len() as u64,
        "state has keys the log does not explain"
    );
    for (key, value) in &expected {
        assert_eq!(store.get(key).unwrap().as_ref(), Some(value));
    }
}

#[test]
fn append_apply_and_reopen_keep_everything() {
    let dir = tempfile::tempdir().unwrap();
    let batches = common::encoded_batches(Epoch(4), 6, 100);
    let digest = {
        let store = open(dir.path());
        for batch in &batches {
            store.append_committed(batch).unwrap();
        }
        apply_all(&store);
        store.state_digest().unwrap()
    };
    let store = open(dir.path());
    let expected = Positions {
        received_seq: Seq(600),
        applied_seq: Seq(600),
        checkpoint_seq: Seq::NONE,
        log_end_seq: Seq(600),
        received_epoch: Epoch(4),
    };
    assert_eq!(store.positions().unwrap(), expected);
    assert_eq!(store.state_digest().unwrap(), digest);
    assert_state_is_replay_of_log(&store);
}

#[test]
fn applied_state_is_the_replay_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for batch in common::encoded_batches(Epoch(1), 10, 200) {
        store.append_committed(&batch).unwrap();
    }
    apply_all(&store);
    assert_state_is_replay_of_log(&store);
}

#[test]
fn the_state_trails_the_log_until_applied() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let batches = common::encoded_batches(Epoch(1), 3, 10);
    for batch in &batches {
        store.append_committed(batch).unwrap();
    }
    assert_eq!(store.positions().unwrap().applied_seq, Seq::NONE);
    assert_eq!(store.state_digest().unwrap().keys, 0);
    let applied = store.apply_next().unwrap().unwrap();
    assert_eq!((applied.first_seq, applied.last_seq), (Seq(1), Seq(10)));
    assert_eq!(store.positions().unwrap().applied_seq, Seq(10));
}

#[test]
fn a_reopened_store_rebuilds_its_state_from_the_checkpoint_and_the_log_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let digest = {
        let store = open(dir.path());
        store
            .append_committed_all(&common::encoded_batches(Epoch(1), 4, 100))
            .unwrap();
        store.apply_next().unwrap();
        store.apply_next().unwrap();
        let written = store.checkpoint().unwrap().expect("the state moved");
        assert_eq!(written.meta.seq, Seq(200));
        apply_all(&store);
        store.state_digest().unwrap()
    };
    let store = open(dir.path());
    let p = store.positions().unwrap();
    assert_eq!((p.checkpoint_seq, p.applied_seq), (Seq(200), Seq(400)));
    assert_eq!(store.state_digest().unwrap(), digest);
    assert_state_is_replay_of_log(&store);
}

#[test]
fn a_checkpoint_is_written_only_when_the_state_moved() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.checkpoint().unwrap(), None);
    store
        .append_committed_all(&common::encoded_batches(Epoch(1), 2, 10))
        .unwrap();
    assert_eq!(store.checkpoint().unwrap(), None, "received is not applied");
    apply_all(&store);
    assert!(store.checkpoint().unwrap().is_some());
    assert_eq!(store.checkpoint().unwrap(), None);
}

#[test]
fn a_checkpoint_of_a_large_state_writes_only_the_pages_a_batch_touched() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut generator = fencelog::workload::RecordGenerator::new(1, 1_000_000, 200);
    let mut encoder = BatchEncoder::new(Limits::default(), 1).unwrap();
    let mut next = Seq(1);
    let mut append = |records: Vec<Record>| {
        let count = records.len() as u64;
        let batch = Batch::new(Epoch(1), next, records).unwrap();
        store
            .append_committed(&encoder.encode(&batch).unwrap())
            .unwrap();
        next = Seq(next.0 + count);
    };
    for _ in 0..20 {
        append(generator.take_records(1000));
    }
    apply_all(&store);
    let full = store.checkpoint().unwrap().unwrap();
    append(vec![Record::put(b"k00000000000".to_vec(), b"v".to_vec())]);
    apply_all(&store);
    let one = store.checkpoint().unwrap().unwrap();
    assert!(full.pages > 20, "{full:?}");
    assert_eq!(one.pages, 1, "{one:?}");
    assert!(one.bytes * 10 < full.bytes, "{one:?} vs {full:?}");
}

#[test]
fn a_format_2_store_is_migrated_into_a_checkpoint_even_with_an_apply_step_cut_short() {
    let batches = common::encoded_batches(Epoch(1), 2, 10);
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.append_committed_all(&batches).unwrap();
    }
    // What format 2 left after a crash inside a step: applied through 5, the step to 15 marked,
    // and the entries of seqs 1 to 8 written.
    let written = {
        let store = open(dir.path());
        store.read(Seq(1), 8, usize::MAX).unwrap()
    };
    {
        let db = common::raw_sled(dir.path());
        db.drop_tree("checkpoint").unwrap();
        let meta = db.open_tree("meta").unwrap();
        meta.insert("format", &2u64.to_be_bytes()).unwrap();
        meta.insert("applied_seq", &5u64.to_be_bytes()).unwrap();
        meta.insert("applying_through", &15u64.to_be_bytes())
            .unwrap();
        let state = db.open_tree("state").unwrap();
        for (_, record) in &written {
            state.insert(&record.key, record.value.as_slice()).unwrap();
        }
        db.flush().unwrap();
    }
    {
        let store = open(dir.path());
        let p = store.positions().unwrap();
        assert_eq!((p.checkpoint_seq, p.applied_seq), (Seq(20), Seq(20)));
        assert_state_is_replay_of_log(&store);
    }
    let db = common::raw_sled(dir.path());
    assert!(!db.tree_names().iter().any(|name| &name[..] == b"state"));
    let meta = db.open_tree("meta").unwrap();
    assert_eq!(
        meta.get("format").unwrap().as_deref(),
        Some(&STORE_FORMAT.to_be_bytes()[..])
    );
    assert!(meta.get("applied_seq").unwrap().is_none());
}

#[test]
fn read_starts_in_the_middle_of_a_batch_and_crosses_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let batches = common::encoded_batches(Epoch(1), 3, 100);
    for batch in &batches {
        store.append_committed(batch).unwrap();
    }
    let all = store.read(Seq(1), 1000, usize::MAX).unwrap();
    assert_eq!(all.len(), 300);
    let middle = store.read(Seq(150), 100, usize::MAX).unwrap();
    let seqs: Vec<u64> = middle.iter().map(|(s, _)| s.0).collect();
    assert_eq!(seqs, (150..250).collect::<Vec<_>>());
    assert_eq!(middle[..], all[149..249]);
}

#[test]
fn read_stops_at_its_byte_budget_but_returns_at_least_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .append_committed(&common::encoded_batches(Epoch(1), 1, 10)[0])
        .unwrap();
    let all = store.read(Seq(1), 10, usize::MAX).unwrap();
    let size = |(_, r): &(Seq, fencelog::record::Record)| r.key.len() + r.value.len();
    let three = size(&all[0]) + size(&all[1]) + size(&all[2]);
    assert_eq!(store.read(Seq(1), 10, three).unwrap(), all[..3]);
    assert_eq!(store.read(Seq(1), 10, three - 1).unwrap(), all[..2]);
    assert_eq!(store.read(Seq(1), 10, 1).unwrap(), all[..1]);
}

#[test]
fn read_past_the_received_seq_is_empty_and_below_the_log_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert!(store.read(Seq(1), 10, usize::MAX).unwrap().is_empty());
    store
        .append_committed(&common::encoded_batches(Epoch(1), 1, 5)[0])
        .unwrap();
    assert!(store.read(Seq(6), 10, usize::MAX).unwrap().is_empty());
    assert!(matches!(
        store.read(Seq(0), 10, usize::MAX),
        Err(Error::SeqNotInLog {
            seq: Seq(0),
            oldest: Seq(1),
            newest: Seq(5)
        })
    ));
}

#[test]
fn a_batch_that_would_leave_a_gap_or_repeat_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let batches = common::encoded_batches(Epoch(1), 3, 10);
    let gap = store.append_committed(&batches[1]).unwrap_err();
    assert!(
        matches!(
            gap,
            Error::LogGap {
                expected: Seq(1),
                found: Seq(11)
            }
        ),
        "{gap}"
    );
    store.append_committed(&batches[0]).unwrap();
    let repeat = store.append_committed(&batches[0]).unwrap_err();
    assert!(
        matches!(
            repeat,
            Error::LogGap {
                expected: Seq(11),
                found: Seq(1)
            }
        ),
        "{repeat}"
    );
    assert_eq!(store.positions().unwrap().received_seq, Seq(10));
}

#[test]
fn a_pending_batch_is_neither_read_nor_applied_until_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let batches = common::encoded_batches(Epoch(2), 2, 10);
    store.append_committed(&batches[0]).unwrap();
    store.append_pending(&batches[1]).unwrap();
    let p = store.positions().unwrap();
    assert_eq!((p.received_seq, p.log_end_seq), (Seq(10), Seq(20)));
    assert_eq!(store.read(Seq(1), 100, usize::MAX).unwrap().len(), 10);
    apply_all(&store);
    assert_eq!(store.positions().unwrap().applied_seq, Seq(10));

    store.mark_committed(Seq(20)).unwrap();
    assert_eq!(store.read(Seq(1), 100, usize::MAX).unwrap().len(), 20);
    apply_all(&store);
    assert_eq!(store.positions().unwrap().applied_seq, Seq(20));
}

#[test]
fn committed_appends_wait_for_pending_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let batches = common::encoded_batches(Epoch(2), 2, 10);
    store.append_pending(&batches[0]).unwrap();
    assert!(matches!(
        store.append_committed(&batches[1]),
        Err(Error::PendingTail { log_end: Seq(10) })
    ));
}

#[test]
fn only_a_batch_end_can_be_marked_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .append_pending(&common::encoded_batches(Epoch(2), 1, 10)[0])
        .unwrap();
    assert!(matches!(
        store.mark_committed(Seq(5)),
        Err(Error::NotBatchBoundary { .. })
    ));
    assert!(matches!(
        store.mark_committed(Seq(11)),
        Err(Error::NotBatchBoundary { .. })
    ));
    assert_eq!(store.positions().unwrap().received_seq, Seq::NONE);
}

/// A pending batch of seqs 1..=10 and the same records cut into 1..=4 and 5..=10.
fn pending_and_parts() -> (EncodedBatch, Vec<EncodedBatch>) {
    let mut encoder = BatchEncoder::new(Limits::default(), 1).unwrap();
    let records = common::records(3, 10, 500);
    let mut encode = |first: u64, records: &[Record]| {
        let batch = Batch::new(Epoch(2), Seq(first), records.to_vec()).unwrap();
        encoder.encode(&batch).unwrap()
    };
    let whole = encode(1, &records);
    let parts = vec![encode(1, &records[..4]), encode(5, &records[4..])];
    (whole, parts)
}

#[test]
fn a_pending_batch_replaced_by_its_parts_is_marked_committed_part_by_part() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (whole, parts) = pending_and_parts();
    store.append_pending(&whole).unwrap();
    store.replace_pending(&parts).unwrap();
    store.mark_committed(Seq(4)).unwrap();
    assert_eq!(store.read(Seq(1), 100, usize::MAX).unwrap().len(), 4);
    store.mark_committed(Seq(10)).unwrap();
    let p = store.positions().unwrap();
    assert_eq!((p.received_seq, p.log_end_seq), (Seq(10), Seq(10)));
    assert_eq!(store.read(Seq(1), 100, usize::MAX).unwrap().len(), 10);
}

#[test]
fn only_a_pending_batch_covered_exactly_by_its_parts_can_be_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (whole, parts) = pending_and_parts();
    store.append_pending(&whole).unwrap();
    for wrong in [
        &parts[..1],
        &parts[1..],
        &[parts[1].clone(), parts[0].clone()][..],
    ] {
        assert!(matches!(
            store.replace_pending(wrong),
            Err(Error::NotBatchBoundary { .. })
        ));
    }
    store.mark_committed(Seq(10)).unwrap();
    assert!(
        matches!(
            store.replace_pending(&parts),
            Err(Error::NotBatchBoundary { .. })
        ),
        "a committed batch is etcd's: its boundaries are never changed"
    );
}

#[test]
fn truncate_drops_an_uncommitted_suffix_so_another_batch_can_take_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let first_epoch = common::encoded_batches(Epoch(2), 3, 10);
    store.append_committed(&first_epoch[0]).unwrap();
    store.append_pending(&first_epoch[1]).unwrap();
    store.append_pending(&first_epoch[2]).unwrap();
    store.truncate_after(Seq(10)).unwrap();
    let p = store.positions().unwrap();
    assert_eq!((p.received_seq, p.log_end_seq), (Seq(10), Seq(10)));

    let next_epoch = common::encoded_batches(Epoch(9), 2, 10);
    store.append_committed(&next_epoch[1]).unwrap();
    assert_eq!(store.positions().unwrap().received_epoch, Epoch(9));
    let replaced: Vec<Record> = store
        .read(Seq(11), 10, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    assert_eq!(replaced, common::records(1, 10, 500));
    drop(store);
    assert_eq!(open(dir.path()).positions().unwrap().log_end_seq, Seq(20));
}

#[test]
fn truncate_refuses_to_cut_inside_a_batch_or_below_the_applied_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for batch in common::encoded_batches(Epoch(1), 2, 10) {
        store.append_committed(&batch).unwrap();
    }
    assert!(matches!(
        store.truncate_after(Seq(15)),
        Err(Error::NotBatchBoundary { .. })
    ));
    store.apply_next().unwrap();
    assert!(matches!(
        store.truncate_after(Seq::NONE),
        Err(Error::TruncateBelowApplied {
            to: Seq(0),
            applied: Seq(10)
        })
    ));
    assert_eq!(store.positions().unwrap().log_end_seq, Seq(20));
}

#[test]
fn a_reopened_store_keeps_its_pending_tail_pending() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let batches = common::encoded_batches(Epoch(1), 2, 10);
        store.append_committed(&batches[0]).unwrap();
        store.append_pending(&batches[1]).unwrap();
    }
    let p = open(dir.path()).positions().unwrap();
    assert_eq!((p.received_seq, p.log_end_seq), (Seq(10), Seq(20)));
}

#[test]
fn a_store_of_another_format_is_refused_with_its_directory_named() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    set_format(dir.path(), 99);
    let err = open_refused(dir.path());
    assert!(
        matches!(
            err,
            Error::StoreFormat {
                found: 99,
                supported: STORE_FORMAT,
                ..
            }
        ),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("move it aside"), "{message}");
}

#[test]
fn positions_that_point_past_the_log_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store
            .append_committed(&common::encoded_batches(Epoch(1), 1, 10)[0])
            .unwrap();
    }
    {
        let db = common::raw_sled(dir.path());
        let received = (15u128 << 64) | 1;
        db.open_tree("meta")
            .unwrap()
            .insert("received", &received.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let err = open_refused(dir.path());
    assert!(matches!(err, Error::StoreCorrupt { .. }), "{err}");
}

#[test]
fn a_damaged_store_file_is_refused_not_used() {
    let dir = tempfile::tempdir().unwrap();
    fill_and_close(dir.path(), 20, 100);
    let db_file = dir.path().join("db");
    let bytes = std::fs::read(&db_file).unwrap();
    let mut damaged = bytes.clone();
    for byte in damaged.iter_mut().skip(64).step_by(97) {
        *byte ^= 0xFF;
    }
    std::fs::write(&db_file, &damaged).unwrap();
    match LocalStore::open(dir.path(), StoreOptions::default()) {
        Err(e) => assert!(e.to_string().contains("move it aside"), "{e}"),
        Ok(store) => panic!("a damaged store opened at {:?}", store.positions()),
    }
}

/// A child process that appends and applies until it is killed, printing each received seq
/// once the store has made it durable. Run only by `kill_9_never_leaves_a_position_ahead_of_its_data`.
#[test]
#[ignore = "the crash test's child process"]
fn crash_child() {
    let Ok(dir) = std::env::var("FENCELOG_CRASH_DIR") else {
        return;
    };
    let store = open(dir.as_ref());
    let start = store.positions().unwrap().log_end_seq;
    let batches = common::encoded_batches(Epoch(1), 2000, 64);
    for (i, batch) in batches.iter().enumerate().skip((start.0 / 64) as usize) {
        store.append_committed(batch).unwrap();
        println!("{}", batch.last_seq());
        store.apply_next().unwrap();
        if i % 4 == 0 {
            store.checkpoint().unwrap();
        }
    }
}

#[test]
fn kill_9_never_leaves_a_position_ahead_of_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    for round in 0..6u64 {
        assert!(Instant::now() < deadline, "crash rounds took too long");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("FENCELOG_CRASH_DIR", dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Let it get some way in, then kill it at an arbitrary point.
        let mut acknowledged = Seq::NONE;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let wanted = 5 + round * 7;
        for line in lines.by_ref().take(wanted as usize) {
            if let Ok(seq) = line.unwrap().trim().parse() {
                acknowledged = Seq(seq);
            }
        }
        std::thread::sleep(Duration::from_millis(3 * round));
        child.kill().unwrap();
        child.wait().unwrap();

        let store = open(dir.path());
        let p = store.positions().unwrap();
        assert!(
            p.received_seq >= acknowledged,
            "round {round}: lost {acknowledged} > {p:?}"
        );
        assert!(p.checkpoint_seq <= p.applied_seq);
        assert!(p.applied_seq <= p.received_seq && p.received_seq <= p.log_end_seq);
        assert_state_is_replay_of_log(&store);
    }
}

#[test]
fn a_store_whose_sled_file_was_deleted_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store
            .append_committed(&common::encoded_batches(Epoch(1), 1, 10)[0])
            .unwrap();
    }
    std::fs::remove_file(dir.path().join("db")).unwrap();
    let err = open_refused(dir.path());
    assert!(matches!(err, Error::StoreCorrupt { .. }), "{err}");
}

#[test]
fn a_damaged_store_is_moved_aside_and_replaced_by_an_empty_one() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("node");
    fill_and_close(&dir, 3, 10);
    std::fs::remove_file(dir.join("db")).unwrap();

    let (store, moved) = LocalStore::open_or_rebuild(&dir, StoreOptions::default()).unwrap();
    let moved = moved.expect("the damaged store was moved aside");
    assert!(
        moved.join("fencelog-store").exists(),
        "kept for a person to look at"
    );
    assert!(moved
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("node.damaged-"));
    assert_eq!(store.positions().unwrap(), Positions::default());
    drop(store);
    let (_, moved_again) = LocalStore::open_or_rebuild(&dir, StoreOptions::default()).unwrap();
    assert_eq!(moved_again, None, "a healthy store stays where it is");
}

#[test]
fn a_store_of_another_format_is_not_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    set_format(dir.path(), 99);
    let err = LocalStore::open_or_rebuild(dir.path(), StoreOptions::default())
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, Error::StoreFormat { .. }), "{err}");
    assert!(dir.path().join("fencelog-store").exists());
}

#[test]
fn a_store_whose_sled_file_was_truncated_is_refused_or_keeps_a_consistent_prefix() {
    let dir = tempfile::tempdir().unwrap();
    fill_and_close(dir.path(), 20, 100);
    let db_file = dir.path().join("db");
    let len = std::fs::metadata(&db_file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db_file)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    // sled keeps the readable prefix of its log, as after a crash; whatever it keeps must be
    // a store whose positions cover their data, or the store must be refused.
    match LocalStore::open(dir.path(), StoreOptions::default()) {
        Err(e) => assert!(e.to_string().contains("move it aside"), "{e}"),
        Ok(store) => assert_state_is_replay_of_log(&store),
    }
}

#[test]
fn local_retention_keeps_the_newest_records_and_never_any_after_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .append_committed_all(&common::encoded_batches(Epoch(1), 10, 10))
        .unwrap();
    for _ in 0..5 {
        store.apply_next().unwrap();
    }
    assert_eq!(
        store.apply_retention(20, u64::MAX, Seq(u64::MAX)).unwrap(),
        None,
        "nothing is checkpointed yet: the whole log is the state's redo"
    );
    store.checkpoint().unwrap();
    assert_eq!(
        store.apply_retention(20, u64::MAX, Seq(u64::MAX)).unwrap(),
        Some(Seq(51))
    );
    apply_all(&store);
    store.checkpoint().unwrap();
    assert_eq!(
        store.apply_retention(20, u64::MAX, Seq(u64::MAX)).unwrap(),
        Some(Seq(81))
    );
    assert_eq!(
        store.apply_retention(20, u64::MAX, Seq(u64::MAX)).unwrap(),
        None
    );
    assert!(matches!(
        store.read(Seq(10), 10, usize::MAX),
        Err(Error::SeqNotInLog {
            oldest: Seq(81),
            ..
        })
    ));
    assert_eq!(store.read(Seq(81), 5, usize::MAX).unwrap().len(), 5);
    drop(store);

    let reopened = open(dir.path());
    let next = common::encoded_batches(Epoch(1), 11, 10).pop().unwrap();
    reopened.append_committed(&next).unwrap();
    assert_eq!(reopened.positions().unwrap().received_seq, Seq(110));
}

#[test]
fn local_retention_by_bytes_keeps_at_least_the_newest_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .append_committed_all(&common::encoded_batches(Epoch(1), 4, 10))
        .unwrap();
    apply_all(&store);
    store.checkpoint().unwrap();
    assert_eq!(
        store.apply_retention(u64::MAX, 1, Seq(u64::MAX)).unwrap(),
        Some(Seq(31))
    );
    assert_eq!(store.log_stats().unwrap().batches, 1);
}

/// One batch of `count` records from `first_seq`, committed in `epoch`.
fn batch_in(epoch: u64, first_seq: u64, count: usize) -> fencelog::batch::EncodedBatch {
    let batch = fencelog::batch::Batch::new(
        Epoch(epoch),
        Seq(first_seq),
        common::records(first_seq, count, 50),
    )
    .unwrap();
    fencelog::batch::BatchEncoder::new(Default::default(), 1)
        .unwrap()
        .encode(&batch)
        .unwrap()
}

#[test]
fn a_snapshot_carries_the_epoch_of_its_seq_and_a_store_installed_from_it_exports_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for (epoch, first) in [(1, 1), (2, 11), (3, 21)] {
        store.append_committed(&batch_in(epoch, first, 10)).unwrap();
    }
    apply_all(&store);
    let (header, file) = fencelog::snapshot::export(&store).unwrap();
    assert_eq!((header.seq, header.epoch), (30, 3));

    let installed = tempfile::tempdir().unwrap();
    let target = installed.path().join("store");
    let mut installer = fencelog::snapshot::Installer::create(
        &target,
        header,
        Limits::default(),
        fencelog::state::kv_factory(),
    )
    .unwrap();
    let mut frames = fencelog::snapshot::FrameReader::new(file);
    while let Some(frame) = frames.next_frame().unwrap() {
        installer.add(&frame).unwrap();
    }
    installer.finish().unwrap();
    let copy = open(&target);
    assert_eq!(copy.state_digest().unwrap(), store.state_digest().unwrap());
    let (again, _) = fencelog::snapshot::export(&copy).unwrap();
    assert_eq!(
        again, header,
        "nothing was applied after the base: the same snapshot"
    );
}
