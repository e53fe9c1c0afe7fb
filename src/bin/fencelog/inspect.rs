//! `fencelog inspect`: what a node's local store holds, without changing it.

use std::path::Path;

use anyhow::Context;
use fencelog::local_store::{LocalStore, StoreOptions, STORE_FORMAT};

pub fn run(data_dir: &Path) -> anyhow::Result<()> {
    let store = LocalStore::open(data_dir, StoreOptions::default())
        .with_context(|| format!("inspecting {}", data_dir.display()))?;
    let positions = store.positions()?;
    let log = store.log_stats()?;
    let digest = store.state_digest()?;
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
        "state         {} keys, digest {:#018x}",
        digest.keys, digest.digest
    );
    Ok(())
}
