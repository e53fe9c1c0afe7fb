//! The design fencelog replaces, as its reviewers described it: one etcd key per record holding
//! a JSON document with base64 key and payload, many keys per transaction, then the
//! `latest_sequence_id` pointer in a separate put (N + 1 proposals per batch).

use base64::Engine;
use etcd_client::{Client, KvClient, Txn, TxnOp};

use crate::error::Result;
use crate::record::Record;

/// Keys per transaction: etcd's default `--max-txn-ops` is 128, and the pointer goes apart.
pub const KEYS_PER_TXN: usize = 127;

/// Writes records the seed way, under `/seed/`.
pub struct SeedWriter {
    kv: KvClient,
    seq: u64,
}

impl SeedWriter {
    pub fn new(client: &Client) -> SeedWriter {
        SeedWriter {
            kv: client.kv_client(),
            seq: 0,
        }
    }

    /// Writes `records` (at most [`KEYS_PER_TXN`]) in one transaction, then moves the pointer.
    pub async fn write(&mut self, records: &[Record]) -> Result<()> {
        let puts: Vec<TxnOp> = records
            .iter()
            .map(|record| {
                self.seq += 1;
                TxnOp::put(
                    format!("/seed/oplog/{:020}", self.seq),
                    entry(self.seq, record),
                    None,
                )
            })
            .collect();
        self.kv.txn(Txn::new().and_then(puts)).await?;
        self.kv
            .put("/seed/latest_sequence_id", self.seq.to_string(), None)
            .await?;
        Ok(())
    }
}

/// One record as the seed design stored it.
fn entry(seq: u64, record: &Record) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let checksum = xxhash_rust::xxh3::xxh3_64(&record.value);
    format!(
        r#"{{"sequence_id":{seq},"op_type":"{:?}","object_key":"{}","payload":"{}","checksum":{checksum},"timestamp_ms":{}}}"#,
        record.op,
        b64.encode(&record.key),
        b64.encode(&record.value),
        seq * 3
    )
}
