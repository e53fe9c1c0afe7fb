//! The `fencelog` command line as a person runs it.

use std::process::Command;

use fencelog::local_store::{LocalStore, StoreOptions};

fn fencelog(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fencelog"))
        .args(args)
        .output()
        .expect("runs");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (
        output.status.success(),
        text(output.stdout),
        text(output.stderr),
    )
}

#[test]
fn demo_appends_through_a_primary_and_rebuilds_an_identical_store_from_etcd() {
    let (ok, stdout, stderr) = fencelog(&["demo", "--records", "5000", "--batch-records", "300"]);
    assert!(ok, "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("appended      5000 records"), "{stdout}");
    assert!(stdout.contains("applied through seq 5000"), "{stdout}");
    assert!(stdout.contains("matches the primary's"), "{stdout}");
}

#[test]
fn demo_refuses_zero_records() {
    let (ok, _, stderr) = fencelog(&["demo", "--records", "0"]);
    assert!(!ok);
    assert!(stderr.contains("at least 1"), "{stderr}");
}

#[test]
fn inspect_reports_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    drop(LocalStore::open(dir.path(), StoreOptions::default()).unwrap());
    let (ok, stdout, stderr) = fencelog(&["inspect", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("received_seq  0 (epoch 0)"), "{stdout}");
    assert!(stdout.contains("state         0 keys"), "{stdout}");
}

#[test]
fn inspect_of_a_store_of_another_format_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    drop(LocalStore::open(dir.path(), StoreOptions::default()).unwrap());
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("format", &7u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let (ok, _, stderr) = fencelog(&["inspect", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("has format 7") && stderr.contains("move it aside"),
        "{stderr}"
    );
}
