//! Each measurement of `fencelog bench`: its own etcd, its workload, its CPU accounting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fencelog::api::proto::StatusResponse;
use fencelog::api::WalClient;
use fencelog::batch::{Batch, BatchEncoder};
use fencelog::bench::ceiling::FencedWriter;
use fencelog::bench::cpu::CpuClock;
use fencelog::bench::producers::{paced, produce, saturating, Producers};
use fencelog::bench::seed_style::{SeedWriter, KEYS_PER_TXN};
use fencelog::bench::standby;
use fencelog::config::{Pipeline, PrimaryConfig};
use fencelog::etcd::process::EtcdProcess;
use fencelog::etcd::proxy::FaultProxy;
use fencelog::limits::Limits;
use fencelog::local_store::LocalStore;
use fencelog::metrics::Metrics;
use fencelog::node_process::{NodeProcess, NodeSpec};
use fencelog::primary::Primary;
use fencelog::record::Record;
use fencelog::workload::RecordGenerator;

use super::{distant, Distant, Measurement, Stage, REFERENCE_BATCH};

/// Runs `stage` on a fresh etcd for `duration`.
pub(super) async fn measure(
    stage: &Stage,
    duration: Duration,
    earlier: &[Measurement],
) -> anyhow::Result<Measurement> {
    let etcd = EtcdProcess::start().await?;
    // etcd a round trip away: everything of the stage reaches it through the delaying proxy.
    let proxy = match stage {
        Stage::PlainLoop { away: Some(away) } | Stage::Distant { away, .. } => {
            let proxy = FaultProxy::start(etcd.endpoint()).await?;
            proxy.delay(*away);
            Some(proxy)
        }
        _ => None,
    };
    let endpoint = proxy.as_ref().map_or(etcd.endpoint(), |p| p.endpoint());
    let client = fencelog::etcd::connect(&[endpoint.to_owned()], Duration::from_secs(5)).await?;
    let etcd_pid = etcd.pid().context("etcd is not running")?;
    let mut records_per_batch = None;
    let (mut encode_per_batch, mut commit_per_batch) = (None, None);
    let mut distant = None;
    // The API stages' fencelog is their daemon, not this process.
    let daemon = match stage {
        Stage::Api { .. } => Some(start_daemon(endpoint, "primary", Vec::new()).await?),
        Stage::Distant { cap, in_flight, .. } => {
            let args = [
                "--max-batch-records".to_owned(),
                cap.to_string(),
                "--max-commits-in-flight".to_owned(),
                in_flight.to_string(),
            ];
            Some(start_daemon(endpoint, "primary", args.to_vec()).await?)
        }
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
    // Read when the load stops where what follows it (a primary's shutdown waits for its apply
    // to catch up) would dilute the figures.
    let mut cores_under_load = None;
    match stage {
        Stage::Ceiling { batch } => {
            let mut writer = FencedWriter::lead(&client, "ceiling").await?;
            let samples = samples(*batch, (16 * 1024 / batch).max(1));
            records_per_batch = Some(*batch as f64);
            let (mut committing, mut commits) = (Duration::ZERO, 0);
            while running() {
                // Encoded before the commits are timed: only the transactions count.
                let batches = writer.encode_batches(&samples, samples.len())?;
                let started_commits = Instant::now();
                for batch in &batches {
                    writer.commit(batch).await?;
                }
                committing += started_commits.elapsed();
                commits += batches.len() as u32;
                records += (batches.len() * batch) as u64;
            }
            elapsed = Some(committing);
            commit_per_batch = committing.checked_div(commits);
        }
        Stage::PlainLoop { away } => {
            let mut writer = FencedWriter::lead(&client, "plain-loop").await?;
            let mut encoder = BatchEncoder::new(Limits::default(), 1)?;
            // The records fencelog's producers build, built here in line: the same work per
            // record reaches the commit, done one step after another.
            let mut generator = RecordGenerator::new(7, 1_000_000, 256);
            records_per_batch = Some(REFERENCE_BATCH as f64);
            let (mut encoding, mut committing, mut batches) = (Duration::ZERO, Duration::ZERO, 0);
            while running() {
                let records_of_batch = generator.take_records(REFERENCE_BATCH);
                let encode = Instant::now();
                let batch = Batch::new(writer.epoch(), writer.next_seq(), records_of_batch)?;
                let encoded = encoder.encode(&batch)?;
                let commit = Instant::now();
                encoding += commit - encode;
                writer.commit(&encoded).await?;
                committing += commit.elapsed();
                batches += 1;
                records += REFERENCE_BATCH as u64;
            }
            encode_per_batch = encoding.checked_div(batches);
            commit_per_batch = committing.checked_div(batches);
            distant = away.map(|away| Distant {
                away,
                cap: REFERENCE_BATCH,
                in_flight: None,
                ack: None,
                batches_per_transaction: Some(1.0),
                behind: None,
            });
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
            let producers = saturating(*cap, per_append);
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
            cores_under_load = Some(clock.cores()?);
            (records_per_batch, encode_per_batch, commit_per_batch) =
                stop_primary(primary, &metrics).await?.columns();
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
            cores_under_load = Some(clock.cores()?);
            (records_per_batch, encode_per_batch, commit_per_batch) =
                stop_primary(primary, &metrics).await?.columns();
        }
        Stage::Api {
            concurrency,
            per_append,
        } => {
            let (node, _) = daemon.as_ref().context("the daemon is not running")?;
            let run = api_load(node, *concurrency, *per_append, duration).await?;
            (records, elapsed) = (run.records, Some(run.elapsed));
        }
        Stage::Distant {
            away,
            cap,
            in_flight,
        } => {
            let (node, _) = daemon.as_ref().context("the daemon is not running")?;
            let run = api_load(node, distant::CLIENTS, distant::PER_APPEND, duration).await?;
            (records, elapsed) = (run.records, Some(run.elapsed));
            cores_under_load = Some(clock.cores()?);
            let commits = distant::commits(node).await?;
            records_per_batch = Some(commits.records_per_batch);
            commit_per_batch = Some(commits.mean);
            distant = Some(Distant {
                away: *away,
                cap: *cap,
                in_flight: Some(*in_flight),
                ack: Some((
                    percentile(&run.latencies, 0.5),
                    percentile(&run.latencies, 0.99),
                )),
                batches_per_transaction: Some(commits.batches_per_transaction),
                behind: Some(commits.behind),
            });
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
            let primary_dir = tempfile::tempdir()?;
            let (primary, metrics) = start_primary(
                &client,
                primary_dir.path(),
                Pipeline::Double,
                REFERENCE_BATCH,
            )
            .await?;
            // The standby is a daemon of its own, as in production: its apply thread is
            // scheduled beside the primary's process, not inside it.
            let (mut node, _standby_dir) =
                start_daemon(etcd.endpoint(), "standby", Vec::new()).await?;
            let mut standby = node.client().await?;
            let standby_cpu =
                CpuClock::start(&[node.pid().context("the standby is not running")?])?;
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
                let status = standby.status().await?;
                receive_lags.push(Duration::from_secs_f64(status.receive_lag_seconds));
                apply_lags.push(Duration::from_secs_f64(status.apply_lag_seconds));
            }
            load.await??;
            let loaded = started.elapsed();
            let at_load_end = standby.status().await?;
            let standby_cores = standby_cpu.cores()?[0];
            cores_under_load = Some(clock.cores()?);
            let committed = primary.committed_seq().0;
            let drain = Instant::now();
            let drained_status = wait_applied(&mut standby, committed).await?;
            let drained = drain.elapsed();
            records = at_load_end.received_seq;
            receive_lags.sort();
            apply_lags.sort();
            let apply_rate = at_load_end.applied_seq as f64 / loaded.as_secs_f64().max(1e-9);
            let drain_rate = (drained_status.applied_seq - at_load_end.applied_seq) as f64
                / drained.as_secs_f64().max(1e-9);
            note = Some(format!(
                "Standby daemon at {percent}% of the primary's rate: received {:.0} records/s, \
                 applied {apply_rate:.0} records/s under load ({} of sled's raw insert rate, \
                 the standby using {standby_cores:.2} cores beside the primary and etcd); \
                 receive lag p50 {} p99 {}, apply lag p50 {} p99 {} (sampled every 100 ms); \
                 the apply lag drained {:.2} s after the load stopped, applying {drain_rate:.0} \
                 records/s meanwhile ({} of sled's raw rate, beside the primary's own apply \
                 catching up).",
                records as f64 / loaded.as_secs_f64().max(1e-9),
                of_sled_raw(earlier, apply_rate),
                millis(percentile(&receive_lags, 0.5)),
                millis(percentile(&receive_lags, 0.99)),
                millis(percentile(&apply_lags, 0.5)),
                millis(percentile(&apply_lags, 0.99)),
                drained.as_secs_f64(),
                of_sled_raw(earlier, drain_rate),
            ));
            elapsed = Some(loaded);
            node.stop(Duration::from_secs(30)).await?;
            stop_primary(primary, &metrics).await?;
        }
        Stage::Replay { records: wanted } => {
            let (primary_dir, standby_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
            let last = standby::fill(&client, primary_dir.path(), *wanted).await?;
            let store = Arc::new(LocalStore::open(standby_dir.path(), Default::default())?);
            // The replay alone: the fill's CPU is not counted.
            let replay_clock = CpuClock::start(&[std::process::id(), etcd_pid])?;
            let replay = standby::receive(&client, &store, last, true).await?;
            cores_under_load = Some(replay_clock.cores()?);
            let warm = standby::warm_restart(&client, &store).await?;
            records = last.0;
            elapsed = Some(replay);
            let replay = replay.as_secs_f64();
            let rate = records as f64 / replay.max(1e-9);
            note = Some(format!(
                "Warm restart vs full replay, {records} records: replay {replay:.2} s ({rate:.0} \
                 records/s received and applied by a standby with nothing else running: {} of \
                 sled's raw insert rate), warm restart {:.3} s = {:.2}% of the replay.",
                of_sled_raw(earlier, rate),
                warm.as_secs_f64(),
                100.0 * warm.as_secs_f64() / replay.max(1e-9)
            ));
        }
        Stage::State { keyspace } => {
            let run = super::state::run(&etcd, duration, *keyspace, keyspace.is_some()).await?;
            records = run.committed;
            elapsed = Some(run.loaded);
            note = Some(run.note);
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
    let cores = match cores_under_load {
        Some(cores) => cores,
        None => clock.cores()?,
    };
    if let Some((mut node, _dir)) = daemon {
        // Its store goes with the directory: no need to wait for it to apply its backlog.
        node.kill();
    }
    let cap = match stage {
        Stage::Ceiling { batch } => Some(*batch),
        Stage::Fencelog { cap, .. } | Stage::Distant { cap, .. } => Some(*cap),
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
        distant,
        records,
        elapsed,
        records_per_batch,
        encode_per_batch,
        commit_per_batch,
        cpu: (cores[0], cores[1]),
    })
}

/// What a load through a primary daemon's API measured.
pub(super) struct ApiLoad {
    pub records: u64,
    pub elapsed: Duration,
    /// Every append's time from its call to its acknowledgment, sorted.
    pub latencies: Vec<Duration>,
}

/// `clients` clients appending `per_append` 256-byte records at a time to `node` for
/// `duration`, each waiting for its acknowledgment before its next append.
pub(super) async fn api_load(
    node: &NodeProcess,
    clients: usize,
    per_append: usize,
    duration: Duration,
) -> anyhow::Result<ApiLoad> {
    let client = node.client().await?;
    let started = Instant::now();
    let workers: Vec<_> = (0..clients as u64)
        .map(|worker| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut generator = RecordGenerator::new(worker + 1, 1_000_000, 256);
                let mut latencies = Vec::new();
                while started.elapsed() < duration {
                    let sent = Instant::now();
                    client.append(generator.take_records(per_append)).await?;
                    latencies.push(sent.elapsed());
                }
                Ok::<_, fencelog::Error>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.append(&mut worker.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(ApiLoad {
        records: (latencies.len() * per_append) as u64,
        elapsed,
        latencies,
    })
}

/// A `fencelog primary` or `fencelog standby` daemon (this binary) of the bench cluster on
/// the etcd at `endpoint`, with `extra_args`, and the directory that holds its store and log.
/// A primary is returned leading, a standby watching.
pub(super) async fn start_daemon(
    endpoint: &str,
    role: &str,
    extra_args: Vec<String>,
) -> anyhow::Result<(NodeProcess, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let mut spec = daemon_spec(endpoint, role, dir.path())?;
    spec.extra_args = extra_args;
    let mut node = NodeProcess::spawn(spec)?;
    let state = (role == "standby").then_some("watching");
    node.wait_for(role, state, Duration::from_secs(30)).await?;
    Ok((node, dir))
}

/// A daemon of the bench cluster on the etcd at `endpoint`, with its store and log in `dir`.
pub(super) fn daemon_spec(
    endpoint: &str,
    role: &str,
    dir: &std::path::Path,
) -> anyhow::Result<NodeSpec> {
    Ok(NodeSpec {
        binary: std::env::current_exe()?,
        role: role.into(),
        cluster: "bench".into(),
        node: format!("{role}-daemon"),
        etcd: endpoint.into(),
        data_dir: dir.join("data"),
        log: dir.join(format!("{role}.log")),
        extra_args: Vec::new(),
        env: Vec::new(),
    })
}

/// Waits for a standby daemon to apply through `seq`; its status once it has.
async fn wait_applied(standby: &mut WalClient, seq: u64) -> anyhow::Result<StatusResponse> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let status = standby.status().await?;
        if status.applied_seq >= seq {
            return Ok(status);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the standby applied only through seq {} of {seq} in 5 minutes",
            status.applied_seq
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// A primary's batches, from its metrics.
struct BatchFigures {
    records: f64,
    /// Mean seal-and-encode time (`seal_seconds`).
    encode: Duration,
    /// Mean etcd transaction time (`commit_seconds`).
    commit: Duration,
}

impl BatchFigures {
    /// As the report's records-per-batch, encode and commit columns.
    fn columns(&self) -> (Option<f64>, Option<Duration>, Option<Duration>) {
        (Some(self.records), Some(self.encode), Some(self.commit))
    }
}

/// Shuts `primary` down once its load has let go of it; returns what its batches took.
async fn stop_primary(primary: Arc<Primary>, metrics: &Metrics) -> anyhow::Result<BatchFigures> {
    Arc::into_inner(primary)
        .context("the load still holds the primary")?
        .shutdown()
        .await?;
    let mean = |histogram: &prometheus::Histogram| {
        Duration::from_secs_f64(
            histogram.get_sample_sum() / histogram.get_sample_count().max(1) as f64,
        )
    };
    Ok(BatchFigures {
        records: metrics.committed_records.get() as f64 / metrics.commits.get().max(1) as f64,
        encode: mean(&metrics.seal_seconds),
        commit: mean(&metrics.commit_seconds),
    })
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

/// `rate` as a percentage of sled's raw insert rate measured earlier in the run.
fn of_sled_raw(earlier: &[Measurement], rate: f64) -> String {
    earlier
        .iter()
        .find(|m| m.what == Stage::SledRaw.name())
        .map_or_else(
            || "?".into(),
            |raw| format!("{:.0}%", 100.0 * rate / raw.per_second().max(1e-9)),
        )
}

/// The `q` quantile of sorted `values` (zero when there are none).
pub(super) fn percentile(values: &[Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values[((values.len() - 1) as f64 * q).round() as usize]
}

pub(super) fn millis(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

/// `count` distinct runs of `per_batch` 256-byte records.
fn samples(per_batch: usize, count: usize) -> Vec<Vec<Record>> {
    let mut generator = RecordGenerator::new(7, 1_000_000, 256);
    (0..count)
        .map(|_| generator.take_records(per_batch))
        .collect()
}
