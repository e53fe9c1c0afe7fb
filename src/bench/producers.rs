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

/// How many closed-loop producers, each with one append of `per_append` records in flight,
/// keep `cap`-record batches full: records for the batch committing, the one being sealed and
/// the one filling, and some to spare. With fewer, the pipeline waits on its producers instead
/// of etcd, and a double buffer has nothing to overlap.
pub fn saturating(cap: usize, per_append: usize) -> usize {
    (4 * cap / per_append.max(1)).clamp(4, 1024)
}

/// Appends `records` 256-byte records to `primary` from `producers` tasks, `per_append` records
/// per call; returns how long it took until every append was acknowledged. Calls with different
/// `round`s build different records: calls that repeated them would apply the same few keys
/// over and over, a hot set far cheaper for sled than random keys over the whole keyspace.
pub async fn produce(
    primary: &Arc<Primary>,
    records: u64,
    per_append: usize,
    producers: usize,
    kind: Producers,
    round: u64,
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
                let seed = round * producers as u64 + p as u64 + 1;
                let mut generator = RecordGenerator::new(seed, 1_000_000, 256);
                let mut left = per_producer;
                while left > 0 {
                    let n = left.min(per_append as u64) as usize;
                    let records = match kind {
                        Producers::Building => generator.take_records(n),
                        Producers::Prebuilt => {
                            let at = (left as usize * 7919 + seed as usize * 104_729)
                                % (PREBUILT_RECORDS - n);
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

/// Appends at a fixed offered rate for `duration`, `per_append` records per append, and returns
/// each append's latency from when it was due (not when it was sent, so that a stall counts for
/// every append it delayed) to its acknowledgment. `senders` tasks take the due appends in turn.
pub async fn paced(
    primary: &Arc<Primary>,
    records_per_second: f64,
    duration: Duration,
    per_append: usize,
    senders: usize,
) -> Result<Vec<Duration>> {
    let interval = Duration::from_secs_f64(per_append as f64 / records_per_second.max(1.0));
    let appends = (duration.as_secs_f64() / interval.as_secs_f64()).ceil() as u64;
    let start = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..senders as u64)
        .map(|sender| {
            let primary = primary.clone();
            tokio::spawn(async move {
                let mut generator = RecordGenerator::new(sender + 1, 1_000_000, 256);
                let mut latencies = Vec::new();
                let mut slot = sender;
                while slot < appends {
                    let due = start + interval.mul_f64(slot as f64);
                    tokio::time::sleep_until(due).await;
                    primary.append(generator.take_records(per_append)).await?;
                    latencies.push(due.elapsed());
                    slot += senders as u64;
                }
                Ok::<_, Error>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(
            task.await
                .map_err(|e| Error::Benchmark(format!("a sender failed: {e}")))??,
        );
    }
    latencies.sort();
    Ok(latencies)
}
