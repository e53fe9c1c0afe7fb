//! `fencelog inspect`: what a stopped node's local store holds, without changing it.

use std::path::Path;

use anyhow::Context;
use fencelog::local_store::{LocalStore, StoreOptions, STORE_FORMAT};

pub fn run(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let store = LocalStore::open_existing(data_dir, StoreOptions::default())
        .with_context(|| format!("inspecting {}", data_dir.display()))?;
    let positions = store.positions()?;
    let log = store.log_stats()?;
    let digest = store.state_digest()?;
    if json {
        let object = serde_json::json!({
            "store": data_dir.display().to_string(),
            "format": STORE_FORMAT,
            "received_seq": positions.received_seq.0,
            "epoch": positions.received_epoch.0,
            "last_applied_seq": positions.applied_seq.0,
            "log_end_seq": positions.log_end_seq.0,
            "log_batches": log.batches,
            "log_oldest_seq": log.oldest_seq.0,
            "log_bytes": log.bytes,
            "keys": digest.keys,
            "state_digest": format!("{:016x}", digest.digest),
        });
        println!("{object}");
        return Ok(());
    }
    println!("store         {}", data_dir.display());
    println!("format        {STORE_FORMAT}");
    println!(
        "received_seq  {} (epoch {})",
        positions.received_seq, positions.received_epoch
    );
    println!("applied_seq   {}", positions.applied_seq);
    println!("log_end_seq   {}", positions.log_end_seq);
    println!(
        "log           {} batches from seq {}, {} bytes",
        log.batches, log.oldest_seq, log.bytes
    );
    println!(
        "state         {} keys, digest {:016x}",
        digest.keys, digest.digest
    );
    Ok(())
}
