//! Concurrent producers appending to a primary, as the applications of a WAL would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::primary::Primary;
use crate::record::Record;
use crate::workload::RecordGenerator;

/// Distinct records the `Prebuilt` producers draw from.
const PREBUILT_RECORDS: usize = 1 << 16;

/// How producers come by the records they append.
#[derive(Clone, Copy, Debug)]
pub enum Producers {
    /// Build each record (`RecordGenerator`, ~1 µs): real work per record, which the double
    /// buffer overlaps with commits.
    Building,
    /// Append clones of distinct records built beforehand (as compressible as built ones): the
    /// pipeline's own cost only.
    Prebuilt,
}

/// Appends `records` 256-byte records to `primary` from `producers` tasks, `per_append` records
/// per call; returns how long it took until every append was acknowledged.
pub async fn produce(
    primary: &Arc<Primary>,
    records: u64,
    per_append: usize,
    producers: usize,
    kind: Producers,
) -> Result<Duration> {
    let prebuilt: Arc<Vec<Record>> = Arc::new(match kind {
        Producers::Building => Vec::new(),
        Producers::Prebuilt => {
            RecordGenerator::new(99, 1_000_000, 256).take_records(PREBUILT_RECORDS)
        }
    });
    let started = Instant::now();
    let per_producer = records.div_ceil(producers as u64);
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let primary = primary.clone();
            let prebuilt = prebuilt.clone();
            tokio::spawn(async move {
                let mut generator = RecordGenerator::new(p as u64 + 1, 1_000_000, 256);
                let mut left = per_producer;
                while left > 0 {
                    let n = left.min(per_append as u64) as usize;
                    let records = match kind {
                        Producers::Building => generator.take_records(n),
                        Producers::Prebuilt => {
                            let at = (left as usize * 7919 + p * 104_729) % (PREBUILT_RECORDS - n);
                            prebuilt[at..at + n].to_vec()
                        }
                    };
                    primary.append(records).await?;
                    left -= n as u64;
                }
                Ok::<(), Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await
            .map_err(|e| Error::Benchmark(format!("a producer failed: {e}")))??;
    }
    Ok(started.elapsed())
}
