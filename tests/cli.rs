//! The `fencelog` command line as a person runs it.

mod common;

use common::fencelog;
use fencelog::local_store::{LocalStore, StoreOptions};

#[test]
fn demo_fails_over_mid_load_and_finds_every_acknowledged_record_on_the_new_primary() {
    let (ok, stdout, stderr) = fencelog(&["demo", "--records", "6000"]);
    assert!(ok, "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("killed the primary demo-a"), "{stdout}");
    assert!(stdout.contains("demo-b promoted itself"), "{stdout}");
    assert!(stdout.contains("load summary"), "{stdout}");
    assert!(
        stdout.contains("acknowledged records are on the new primary"),
        "{stdout}"
    );
}

#[test]
fn demo_refuses_too_few_records() {
    let (ok, _, stderr) = fencelog(&["demo", "--records", "0"]);
    assert!(!ok);
    assert!(stderr.contains("at least 100"), "{stderr}");
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
        let db = common::raw_sled(dir.path());
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
