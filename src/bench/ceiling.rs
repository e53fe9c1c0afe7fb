//! The commit layer's ceiling: batches encoded beforehand, committed one after another by the
//! same fenced transaction a primary uses. No appends, no encoding on the clock: what etcd
//! itself allows on this machine.

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};

use crate::batch::{Batch, BatchEncoder, EncodedBatch};
use crate::error::{Error, Result};
use crate::etcd::commit::{commit_batch, CommitOutcome, Head};
use crate::keys::KeyLayout;
use crate::limits::Limits;
use crate::record::{Epoch, Record, Seq};

/// Commits encoded batches in seq order with the fenced transaction, one in flight.
pub struct FencedWriter {
    client: Client,
    layout: KeyLayout,
    epoch: Epoch,
    /// What `latest` holds: the next commit is chained to it.
    head: Head,
    next_seq: Seq,
}

impl FencedWriter {
    /// Takes the leadership of `cluster` (which nobody may hold) under a long lease, as a
    /// primary would.
    pub async fn lead(client: &Client, cluster: &str) -> Result<FencedWriter> {
        let mut client = client.clone();
        let layout = KeyLayout::new(&cluster.parse()?);
        let lease = client.lease_grant(600, None).await?.id();
        let txn = Txn::new()
            .when([Compare::create_revision(
                layout.leader(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                layout.leader(),
                "bench 127.0.0.1:1",
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let response = client.txn(txn).await?;
        if !response.succeeded() {
            return Err(Error::Benchmark(format!(
                "cluster {cluster} already has a leader"
            )));
        }
        let revision = response.header().map_or(0, |h| h.revision());
        Ok(FencedWriter {
            client,
            layout,
            epoch: Epoch(revision as u64),
            head: Head::Empty,
            next_seq: Seq(1),
        })
    }

    /// Encodes `count` batches that continue this writer's log, drawing records from `samples`
    /// in turn: done before a measurement, so that only the commits are timed.
    pub fn encode_batches(
        &self,
        samples: &[Vec<Record>],
        count: usize,
    ) -> Result<Vec<EncodedBatch>> {
        let mut encoder = BatchEncoder::new(Limits::default(), 1)?;
        let mut next = self.next_seq;
        (0..count)
            .map(|i| {
                let records = samples[i % samples.len()].clone();
                let len = records.len() as u64;
                let batch = Batch::new(self.epoch, next, records)?;
                next = Seq(next.0 + len);
                encoder.encode(&batch)
            })
            .collect()
    }

    /// The epoch the writer leads in.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The seq its next batch starts at.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// Commits `batch`, which must start at [`FencedWriter::next_seq`].
    pub async fn commit(&mut self, batch: &EncodedBatch) -> Result<()> {
        let outcome = commit_batch(
            &mut self.client.kv_client(),
            &self.layout,
            self.epoch,
            &self.head,
            batch,
        )
        .await?;
        match outcome {
            CommitOutcome::Committed { .. } => self.head = Head::after(batch, self.epoch),
            CommitOutcome::Refused(refusal) => {
                return Err(Error::Benchmark(format!(
                    "the fenced commit was refused: {refusal:?}"
                )))
            }
        }
        self.next_seq = batch.last_seq().next()?;
        Ok(())
    }
}
