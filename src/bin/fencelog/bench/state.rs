//! The state under load: does the applied state of a primary daemon and a standby daemon keep
//! up with what the primary commits through its API, and how fast does a node come back to a
//! usable state?

use std::time::{Duration, Instant};

use fencelog::api::proto::StatusResponse;
use fencelog::api::WalClient;
use fencelog::etcd::process::EtcdProcess;
use fencelog::node_process::NodeProcess;
use fencelog::workload::RecordGenerator;

use super::measure::{millis, percentile, start_daemon};

/// Clients appending at once, and records per append: `fencelog load --concurrency 64 --batch
/// 64`, which saturates a primary daemon here.
const CLIENTS: u64 = 64;
const PER_APPEND: usize = 64;
/// Key plus value: a ~200-byte value, as in issue 17's load.
const RECORD_BYTES: usize = 214;
/// The load runs at least this long whatever `--seconds` says: the lag must show whether it
/// stays bounded.
pub const MIN_LOAD: Duration = Duration::from_secs(30);

/// What one run measured.
pub struct StateRun {
    pub committed: u64,
    pub loaded: Duration,
    pub note: String,
}

/// One node's figures, sampled every 100 ms while the load lasts.
#[derive(Default)]
struct Lags {
    records: Vec<u64>,
    seconds: Vec<Duration>,
}

impl Lags {
    fn add(&mut self, committed: u64, status: &StatusResponse) {
        self.records
            .push(committed.saturating_sub(status.applied_seq));
        self.seconds
            .push(Duration::from_secs_f64(status.apply_lag_seconds.max(0.0)));
    }

    fn summary(&mut self) -> String {
        self.records.sort_unstable();
        self.seconds.sort_unstable();
        let quantile = |q: f64| {
            self.records
                .get(((self.records.len().max(1) - 1) as f64 * q).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        format!(
            "lag p50 {} / p99 {} / max {} records, p50 {} / p99 {} / max {}",
            quantile(0.5),
            quantile(0.99),
            quantile(1.0),
            millis(percentile(&self.seconds, 0.5)),
            millis(percentile(&self.seconds, 0.99)),
            millis(percentile(&self.seconds, 1.0)),
        )
    }
}

/// A primary and a standby daemon, loaded through the API for `duration` (at least
/// [`MIN_LOAD`]) over `keyspace` keys (`None`: unique keys); with `restarts`, the standby is
/// then restarted warm (SIGTERM, then kill -9) and a new one is started on an empty directory.
pub async fn run(
    etcd: &EtcdProcess,
    duration: Duration,
    keyspace: Option<u64>,
    restarts: bool,
) -> anyhow::Result<StateRun> {
    let duration = duration.max(MIN_LOAD);
    let (primary, _primary_dir) = start_daemon(etcd.endpoint(), "primary", Vec::new()).await?;
    let (mut standby, standby_dir) = start_daemon(etcd.endpoint(), "standby", Vec::new()).await?;
    let mut primary_api = primary.client().await?;
    let mut standby_api = standby.client().await?;
    let started = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|worker| {
            let client = primary_api.clone();
            tokio::spawn(load(client, worker, keyspace, started, duration))
        })
        .collect();
    let reader = tokio::spawn(consistent_reads(primary_api.clone(), started, duration));
    let (mut primary_lags, mut standby_lags) = (Lags::default(), Lags::default());
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let primary_status = primary_api.status().await?;
        let standby_status = standby_api.status().await?;
        primary_lags.add(primary_status.committed_seq, &primary_status);
        standby_lags.add(primary_status.committed_seq, &standby_status);
    }
    for worker in workers {
        worker.await??;
    }
    let loaded = started.elapsed();
    let mut reads = reader.await??;
    reads.sort_unstable();
    let at_end = primary_api.status().await?;
    let standby_at_end = standby_api.status().await?;
    let committed = at_end.committed_seq;
    let drain = Instant::now();
    let (mut primary_drained, mut standby_drained) = (None, None);
    let deadline = drain + Duration::from_secs(300);
    while primary_drained.is_none() || standby_drained.is_none() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the states did not drain in 5 minutes"
        );
        if primary_drained.is_none() && primary_api.status().await?.applied_seq >= committed {
            primary_drained = Some(drain.elapsed());
        }
        if standby_drained.is_none() && standby_api.status().await?.applied_seq >= committed {
            standby_drained = Some(drain.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let per_second = |records: u64| records as f64 / loaded.as_secs_f64().max(1e-9);
    let keys = keyspace.map_or("unique keys".to_owned(), |k| format!("a {k}-key keyspace"));
    let node = |applied: u64, lags: &mut Lags, drained: Option<Duration>, node: &NodeProcess| {
        format!(
            "applied {:.0} records/s ({:.1}% of the commits), {}, drained {} after the load, \
             RSS {}",
            per_second(applied),
            100.0 * applied as f64 / committed.max(1) as f64,
            lags.summary(),
            millis(drained.unwrap_or_default()),
            rss(node),
        )
    };
    let mut note = format!(
        "{CLIENTS} clients x {PER_APPEND} records of {RECORD_BYTES} B over {keys}, {:.0} s: \
         committed {:.0} records/s; the primary {}, {}; the standby {}, {}.",
        loaded.as_secs_f64(),
        per_second(committed),
        node(
            at_end.applied_seq,
            &mut primary_lags,
            primary_drained,
            &primary
        ),
        checkpoints(&primary).await,
        node(
            standby_at_end.applied_seq,
            &mut standby_lags,
            standby_drained,
            &standby
        ),
        checkpoints(&standby).await,
    );
    note.push_str(&format!(
        " Get --consistent on the primary under the load, one every 10 ms: p50 {}, p99 {}, max {} \
         over {} reads.",
        millis(percentile(&reads, 0.5)),
        millis(percentile(&reads, 0.99)),
        millis(percentile(&reads, 1.0)),
        reads.len()
    ));
    if restarts {
        let stopped = Instant::now();
        standby.stop(Duration::from_secs(60)).await?;
        let sigterm_stop = stopped.elapsed();
        let sigterm = restart_until_applied(&mut standby, committed).await?;
        standby.kill();
        let kill_9 = restart_until_applied(&mut standby, committed).await?;
        standby.stop(Duration::from_secs(60)).await?;
        drop(standby_dir);
        let (mut fresh, _fresh_dir) = spawn_standby(etcd).await?;
        let from_scratch = until_applied(&mut fresh, committed, Instant::now()).await?;
        note.push_str(&format!(
            " Standby restarts at {committed} records: after SIGTERM (its stop took {}) usable \
             with everything applied in {}, after kill -9 in {}; a new standby on an empty \
             directory (snapshot from the primary, then the log after it) in {} — warm restart \
             {:.1}% / {:.1}% of it.",
            millis(sigterm_stop),
            millis(sigterm),
            millis(kill_9),
            millis(from_scratch),
            100.0 * sigterm.as_secs_f64() / from_scratch.as_secs_f64().max(1e-9),
            100.0 * kill_9.as_secs_f64() / from_scratch.as_secs_f64().max(1e-9),
        ));
        fresh.kill();
    }
    Ok(StateRun {
        committed,
        loaded,
        note,
    })
}

/// One client appending until `duration` has passed since `started`.
async fn load(
    mut client: WalClient,
    worker: u64,
    keyspace: Option<u64>,
    started: Instant,
    duration: Duration,
) -> fencelog::Result<()> {
    let mut generator =
        RecordGenerator::new(worker + 1, keyspace.unwrap_or(u64::MAX), RECORD_BYTES);
    while started.elapsed() < duration {
        client.append(generator.take_records(PER_APPEND)).await?;
    }
    Ok(())
}

/// Consistent reads of one key, one every 10 ms while the load lasts; their latencies.
async fn consistent_reads(
    mut client: WalClient,
    started: Instant,
    duration: Duration,
) -> fencelog::Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    while started.elapsed() < duration {
        let asked = Instant::now();
        client
            .get_consistent(b"obj/0000000001".to_vec(), Duration::from_secs(10))
            .await?;
        latencies.push(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(latencies)
}

/// Starts a stopped node again; the time until it answers with everything applied.
async fn restart_until_applied(node: &mut NodeProcess, committed: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    node.start()?;
    until_applied(node, committed, started).await
}

/// A second standby, on an empty directory of its own.
async fn spawn_standby(etcd: &EtcdProcess) -> anyhow::Result<(NodeProcess, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let node = NodeProcess::spawn(super::measure::daemon_spec(
        etcd.endpoint(),
        "standby",
        dir.path(),
    )?)?;
    Ok((node, dir))
}

/// The time from `started` until `node` answers its status with `committed` applied.
async fn until_applied(
    node: &mut NodeProcess,
    committed: u64,
    started: Instant,
) -> anyhow::Result<Duration> {
    let deadline = started + Duration::from_secs(300);
    loop {
        if let Ok(status) = node.status().await {
            if status.applied_seq >= committed {
                return Ok(started.elapsed());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} did not apply through seq {committed} in 5 minutes",
            node.name()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The resident set of a daemon, from `/proc/<pid>/status`.
fn rss(node: &NodeProcess) -> String {
    let read = || -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid()?)).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    read().map_or_else(|| "?".into(), |kib| format!("{} MiB", kib / 1024))
}

/// What a daemon's checkpoints took, from its `/metrics`.
async fn checkpoints(node: &NodeProcess) -> String {
    let Some(text) = metrics_text(node.metrics_addr()).await else {
        return "checkpoints ?".into();
    };
    let value = |name: &str| metric_value(&text, name);
    let count = value("fencelog_checkpoint_seconds_count");
    format!(
        "{count:.0} checkpoints of {:.0} MB each on average, taking {} each",
        value("fencelog_checkpoint_bytes_total") / count.max(1.0) / 1e6,
        millis(Duration::from_secs_f64(
            value("fencelog_checkpoint_seconds_sum") / count.max(1.0)
        )),
    )
}

/// The value of the sample `name` (with its labels, as Prometheus text writes them) in the
/// metrics `text`; 0 when it is absent.
pub(super) fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The body of `GET /metrics` from `addr`, plain HTTP/1.1.
pub(super) async fn metrics_text(addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let response = String::from_utf8_lossy(&response).into_owned();
    Some(response.split_once("\r\n\r\n")?.1.to_owned())
}
