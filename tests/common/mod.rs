//! Helpers shared by the integration tests: record generators and a real etcd.

#![allow(dead_code)] // each test binary uses its own subset

use fencelog::batch::{Batch, BatchEncoder, EncodedBatch};
use fencelog::limits::Limits;
use fencelog::record::{Epoch, Record, Seq};
use fencelog::workload::RecordGenerator;

pub use fencelog::etcd_process::EtcdProcess;

/// Starts a real etcd; panics with etcd's own message (and how to install it) if it cannot.
pub async fn etcd() -> EtcdProcess {
    match EtcdProcess::start().await {
        Ok(etcd) => etcd,
        Err(e) => panic!("{e}"),
    }
}

/// `count` records of ~256 bytes over a keyspace of `keyspace` keys, seeded by `seed`.
pub fn records(seed: u64, count: usize, keyspace: u64) -> Vec<Record> {
    RecordGenerator::new(seed, keyspace, 256).take_records(count)
}

/// Encodes consecutive batches of `per_batch` records from seq 1 in `epoch`.
pub fn encoded_batches(epoch: Epoch, batches: usize, per_batch: usize) -> Vec<EncodedBatch> {
    let mut encoder = BatchEncoder::new(Limits::default(), 1).expect("default limits are valid");
    (0..batches)
        .map(|b| {
            let first = Seq(1 + (b * per_batch) as u64);
            let batch = Batch::new(epoch, first, records(b as u64, per_batch, 500)).expect("batch");
            encoder.encode(&batch).expect("encodes")
        })
        .collect()
}
