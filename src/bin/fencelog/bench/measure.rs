//! Each measurement of `fencelog bench`: its own etcd, its workload, its CPU accounting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fencelog::batch::{Batch, BatchEncoder};
use fencelog::bench::ceiling::FencedWriter;
use fencelog::bench::cpu::CpuClock;
use fencelog::bench::producers::{paced, produce, Producers};
use fencelog::bench::seed_style::{SeedWriter, KEYS_PER_TXN};
use fencelog::bench::standby;
use fencelog::config::{Pipeline, PrimaryConfig};
use fencelog::etcd::process::EtcdProcess;
use fencelog::limits::Limits;
use fencelog::local_store::LocalStore;
use fencelog::metrics::Metrics;
use fencelog::node_process::{NodeProcess, NodeSpec};
use fencelog::primary::Primary;
use fencelog::record::Record;
use fencelog::workload::RecordGenerator;

use super::{Measurement, Stage, REFERENCE_BATCH};

/// Runs `stage` on a fresh etcd for `duration`.
pub(super) async fn measure(
    stage: &Stage,
    duration: Duration,
    earlier: &[Measurement],
) -> anyhow::Result<Measurement> {
    let etcd = EtcdProcess::start().await?;
    let client =
        fencelog::etcd::connect(&[etcd.endpoint().to_owned()], Duration::from_secs(5)).await?;
    let etcd_pid = etcd.pid().context("etcd is not running")?;
    let mut records_per_batch = None;
    // The API stage's fencelog is its daemon, not this process.
    let daemon = match stage {
        Stage::Api { .. } => Some(start_daemon(&etcd).await?),
        _ => None,
    };
    let fencelog_pid = match &daemon {
        Some((node, _)) => node.pid().context("the daemon is not running")?,
        None => std::process::id(),
    };
    let clock = CpuClock::start(&[fencelog_pid, etcd_pid])?;
    let started = Instant::now();
    let running = || started.elapsed() < duration;
    let mut records = 0u64;
    let mut elapsed = None;
    let mut note = None;
    match stage {
        Stage::Ceiling { batch } => {
            let mut writer = FencedWriter::lead(&client, "ceiling").await?;
            let samples = samples(*batch, (16 * 1024 / batch).max(1));
            records_per_batch = Some(*batch as f64);
            let mut committing = Duration::ZERO;
            while running() {
                // Encoded before the commits are timed: only the transactions count.
                let batches = writer.encode_batches(&samples, samples.len())?;
                let commits = Instant::now();
                for batch in &batches {
                    writer.commit(batch).await?;
                }
                committing += commits.elapsed();
                records += (batches.len() * batch) as u64;
            }
            elapsed = Some(committing);
        }
        Stage::PlainLoop => {
            let mut writer = FencedWriter::lead(&client, "plain-loop").await?;
            let mut encoder = BatchEncoder::new(Limits::default(), 1)?;
            let samples = samples(REFERENCE_BATCH, 16);
            records_per_batch = Some(REFERENCE_BATCH as f64);
            for records_of_batch in samples.iter().cycle() {
                if !running() {
                    break;
                }
                let batch =
                    Batch::new(writer.epoch(), writer.next_seq(), records_of_batch.clone())?;
                writer.commit(&encoder.encode(&batch)?).await?;
                records += REFERENCE_BATCH as u64;
            }
        }
        Stage::SinglePuts => {
            let mut kv = client.kv_client();
            while running() {
                records += 1;
                kv.put(format!("/puts/{records:020}"), vec![7u8; 256], None)
                    .await?;
            }
        }
        Stage::Fencelog { pipeline, cap } => {
            let dir = tempfile::tempdir()?;
            let (primary, metrics) = start_primary(&client, dir.path(), *pipeline, *cap).await?;
            let per_append = (*cap).min(16);
            let producers = (2 * cap / per_append).clamp(4, 512);
            let chunk = (32 * cap).max(8192) as u64;
            while running() {
                let round = records / chunk;
                produce(
                    &primary,
                    chunk,
                    per_append,
                    producers,
                    Producers::Building,
                    round,
                )
                .await?;
                records += chunk;
            }
            elapsed = Some(started.elapsed());
            records_per_batch = Some(stop_primary(primary, &metrics).await?);
        }
        Stage::AckLatency { percent } => {
            let saturated = saturated_rate(earlier)?;
            let dir = tempfile::tempdir()?;
            let (primary, metrics) =
                start_primary(&client, dir.path(), Pipeline::Double, REFERENCE_BATCH).await?;
            let offered = saturated * f64::from(*percent) / 100.0;
            let sending = Instant::now();
            let latencies = paced(&primary, offered, duration, 16, 256).await?;
            elapsed = Some(sending.elapsed());
            records = metrics.appended_records.get();
            note = Some(format!(
                "Ack latency at {percent}% of the saturated rate ({offered:.0} records/s offered, \
                 {:.0} acknowledged): p50 {}, p99 {}, max {} over {} appends of 16 records, \
                 each from when it was due.",
                records as f64 / sending.elapsed().as_secs_f64().max(1e-9),
                millis(percentile(&latencies, 0.5)),
                millis(percentile(&latencies, 0.99)),
                millis(percentile(&latencies, 1.0)),
                latencies.len()
            ));
            records_per_batch = Some(stop_primary(primary, &metrics).await?);
        }
        Stage::Api {
            concurrency,
            per_append,
        } => {
            let (node, _) = daemon.as_ref().context("the daemon is not running")?;
            let client = node.client().await?;
            let per_append = *per_append;
            let workers: Vec<_> = (0..*concurrency as u64)
                .map(|worker| {
                    let mut client = client.clone();
                    tokio::spawn(async move {
                        let mut generator = RecordGenerator::new(worker + 1, 1_000_000, 256);
                        let mut appended = 0u64;
                        while started.elapsed() < duration {
                            client.append(generator.take_records(per_append)).await?;
                            appended += per_append as u64;
                        }
                        Ok::<u64, fencelog::Error>(appended)
                    })
                })
                .collect();
            for worker in workers {
                records += worker.await??;
            }
        }
        Stage::SledRaw => {
            let dir = tempfile::tempdir()?;
            let db = sled::open(dir.path())?;
            let mut generator = RecordGenerator::new(11, 1_000_000, 256);
            while running() {
                let batch = generator.take_records(1024);
                let db = db.clone();
                tokio::task::spawn_blocking(move || {
                    batch
                        .into_iter()
                        .try_for_each(|r| db.insert(r.key, r.value).map(drop))
                })
                .await??;
                records += 1024;
            }
        }
        Stage::Follow { percent } => {
            let offered = saturated_rate(earlier)? * f64::from(*percent) / 100.0;
            let (primary_dir, standby_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
            let (primary, metrics) = start_primary(
                &client,
                primary_dir.path(),
                Pipeline::Double,
                REFERENCE_BATCH,
            )
            .await?;
            let store = Arc::new(LocalStore::open(standby_dir.path(), Default::default())?);
            let follower = standby::standby(&client, &store).await?;
            let saturate = *percent >= 100;
            let load = {
                let primary = primary.clone();
                tokio::spawn(async move {
                    if saturate {
                        let mut round = 0;
                        while started.elapsed() < duration {
                            produce(&primary, 32_768, 16, 128, Producers::Building, round).await?;
                            round += 1;
                        }
                    } else {
                        paced(&primary, offered, duration, 16, 256).await?;
                    }
                    Ok::<(), fencelog::Error>(())
                })
            };
            let (mut receive_lags, mut apply_lags) = (Vec::new(), Vec::new());
            while !load.is_finished() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let status = follower.status();
                receive_lags.push(status.receive_lag);
                apply_lags.push(status.apply_lag);
            }
            load.await??;
            let loaded = started.elapsed();
            let applied_under_load = follower.applied_seq().0;
            records = follower.received_seq().0;
            let drain = Instant::now();
            follower.wait_applied(primary.committed_seq()).await;
            let drained = drain.elapsed();
            receive_lags.sort();
            apply_lags.sort();
            let raw = earlier
                .iter()
                .find(|m| m.what == Stage::SledRaw.name())
                .map(Measurement::per_second);
            let apply_rate = applied_under_load as f64 / loaded.as_secs_f64().max(1e-9);
            note =
                Some(format!(
                "Standby at {percent}% of the primary's rate: received {:.0} records/s, applied \
                 {apply_rate:.0} records/s ({} of sled's raw insert rate); receive lag p50 {} \
                 p99 {}, apply lag p50 {} p99 {} (sampled every 100 ms); the apply lag drained \
                 {:.2} s after the load stopped. Primary and standby share this process.",
                records as f64 / loaded.as_secs_f64().max(1e-9),
                raw.map_or_else(|| "?".into(), |raw| format!("{:.0}%", 100.0 * apply_rate / raw)),
                millis(percentile(&receive_lags, 0.5)),
                millis(percentile(&receive_lags, 0.99)),
                millis(percentile(&apply_lags, 0.5)),
                millis(percentile(&apply_lags, 0.99)),
                drained.as_secs_f64()
            ));
            elapsed = Some(loaded);
            follower.shutdown().await?;
            stop_primary(primary, &metrics).await?;
        }
        Stage::Replay { records: wanted } => {
            let (primary_dir, standby_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
            let last = standby::fill(&client, primary_dir.path(), *wanted).await?;
            let store = Arc::new(LocalStore::open(standby_dir.path(), Default::default())?);
            elapsed = Some(standby::receive(&client, &store, last, true).await?);
            let warm = standby::warm_restart(&client, &store).await?;
            records = last.0;
            let replay = elapsed.unwrap_or_default().as_secs_f64();
            note = Some(format!(
                "Warm restart vs full replay, {records} records: replay {replay:.2} s, warm \
                 restart {:.3} s = {:.1}% of the replay.",
                warm.as_secs_f64(),
                100.0 * warm.as_secs_f64() / replay.max(1e-9)
            ));
        }
        Stage::SeedStyle => {
            let mut writer = SeedWriter::new(&client);
            let mut generator = RecordGenerator::new(9, 1_000_000, 256);
            records_per_batch = Some(KEYS_PER_TXN as f64);
            while running() {
                let batch: Vec<Record> = generator.take_records(KEYS_PER_TXN);
                writer.write(&batch).await?;
                records += KEYS_PER_TXN as u64;
            }
        }
    }
    let elapsed = elapsed.unwrap_or_else(|| started.elapsed());
    let cores = clock.cores()?;
    if let Some((mut node, _dir)) = daemon {
        // Its store goes with the directory: no need to wait for it to apply its backlog.
        node.kill();
    }
    let cap = match stage {
        Stage::Ceiling { batch } => Some(*batch),
        Stage::Fencelog { cap, .. } => Some(*cap),
        _ => None,
    };
    Ok(Measurement {
        what: stage.name(),
        cap,
        note,
        plotted: matches!(
            stage,
            Stage::Ceiling { .. } | Stage::Fencelog { .. } | Stage::SeedStyle
        ),
        records,
        elapsed,
        records_per_batch,
        cpu: (cores[0], cores[1]),
    })
}

/// A `fencelog primary` daemon (this binary) leading a cluster of its own on `etcd`, and the
/// directory that holds its store and log.
async fn start_daemon(etcd: &EtcdProcess) -> anyhow::Result<(NodeProcess, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let spec = NodeSpec {
        binary: std::env::current_exe()?,
        role: "primary".into(),
        cluster: "bench".into(),
        node: "api".into(),
        etcd: etcd.endpoint().into(),
        data_dir: dir.path().join("data"),
        log: dir.path().join("primary.log"),
        extra_args: Vec::new(),
        env: Vec::new(),
    };
    let mut node = NodeProcess::spawn(spec)?;
    node.wait_for("primary", None, Duration::from_secs(30))
        .await?;
    Ok((node, dir))
}

/// A primary on a fresh store in `dir` with `pipeline` and batch cap `cap`.
async fn start_primary(
    client: &etcd_client::Client,
    dir: &std::path::Path,
    pipeline: Pipeline,
    cap: usize,
) -> anyhow::Result<(Arc<Primary>, Arc<Metrics>)> {
    let store = Arc::new(LocalStore::open(dir, Default::default())?);
    let mut config = PrimaryConfig::new("bench".parse()?, "bench".parse()?, "127.0.0.1:1");
    config.pipeline = pipeline;
    config.max_batch_records = cap;
    let metrics = Arc::new(Metrics::new()?);
    let primary = Primary::start(client.clone(), store, config, metrics.clone()).await?;
    Ok((Arc::new(primary), metrics))
}

/// Shuts `primary` down once its load has let go of it; returns its records per batch.
async fn stop_primary(primary: Arc<Primary>, metrics: &Metrics) -> anyhow::Result<f64> {
    Arc::into_inner(primary)
        .context("the load still holds the primary")?
        .shutdown()
        .await?;
    Ok(metrics.committed_records.get() as f64 / metrics.commits.get().max(1) as f64)
}

/// The rate fencelog double reached at the reference cap, measured earlier in the run.
fn saturated_rate(earlier: &[Measurement]) -> anyhow::Result<f64> {
    let saturated = Stage::Fencelog {
        pipeline: Pipeline::Double,
        cap: REFERENCE_BATCH,
    };
    earlier
        .iter()
        .find(|m| m.what == saturated.name())
        .map(Measurement::per_second)
        .context("the saturated run comes first")
}

/// The `q` quantile of sorted `values` (zero when there are none).
fn percentile(values: &[Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values[((values.len() - 1) as f64 * q).round() as usize]
}

fn millis(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

/// `count` distinct runs of `per_batch` 256-byte records.
fn samples(per_batch: usize, count: usize) -> Vec<Vec<Record>> {
    let mut generator = RecordGenerator::new(7, 1_000_000, 256);
    (0..count)
        .map(|_| generator.take_records(per_batch))
        .collect()
}
