//! `fencelog load`: drives appends from concurrent workers, through a failover if one happens,
//! with a progress bar and a summary. With `--acked-out` every acknowledged record is written
//! as `<seq>\t<key>\t<xxh3 of the value>`, and nothing else is. An append refused because the
//! node does not lead (yet) is sent again to the primary (nothing of it was sequenced); any
//! other failed append is counted, never retried (its records may or may not have been
//! committed, and a retry would log them twice), never written, and makes the load exit
//! non-zero unless `--tolerate-failures`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fencelog::api::WalClient;
use fencelog::error::Error;
use fencelog::record::Record;
use fencelog::workload::RecordGenerator;
use indicatif::{HumanCount, ProgressBar, ProgressState, ProgressStyle};
use tokio::sync::mpsc;

use crate::commands::Target;
use fencelog::checker::tsv_columns;

#[derive(clap::Args)]
pub struct LoadOptions {
    #[command(flatten)]
    pub target: Target,
    /// Records to append.
    #[arg(long, value_name = "N")]
    pub records: u64,
    /// Bytes per value.
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub value_size: usize,
    /// Concurrent append calls.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub concurrency: usize,
    /// Records per append call.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub batch: usize,
    /// Write `<seq>\t<key>\t<xxh3 of value>` for every acknowledged record.
    #[arg(long, value_name = "FILE")]
    pub acked_out: Option<PathBuf>,
    /// Write over this many keys (record i goes to key i mod N) instead of a new key per
    /// record: a long history over a smaller state.
    #[arg(long, value_name = "N")]
    pub keyspace: Option<u64>,
    /// Incompressible values instead of JSON-like ones.
    #[arg(long)]
    pub random_values: bool,
    /// Seconds a worker keeps looking for a primary after losing it.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub failover_timeout: u64,
    /// Seconds an append may go unanswered: then it counts as failed (its outcome unknown, so
    /// it is not written to --acked-out) and the worker connects again.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub append_timeout: u64,
    /// Exit 0 even if appends failed (a load run across a failover on purpose).
    #[arg(long)]
    pub tolerate_failures: bool,
}

#[derive(Default)]
struct Tally {
    acked: u64,
    failed_records: u64,
    failed_appends: u64,
    /// Failed appends by kind, with the first message of each kind.
    errors: BTreeMap<String, (u64, String)>,
    /// Per append, in microseconds.
    latencies: Vec<u64>,
    /// Connections to a new primary after a failure.
    reconnects: u64,
    /// Appends sent again after a refusal that came before sequencing ("not the primary").
    resent: u64,
}

pub struct LoadSummary {
    pub acked: u64,
    /// The printable summary.
    pub summary: String,
}

pub async fn run(options: LoadOptions) -> anyhow::Result<LoadSummary> {
    if options.records == 0 || options.concurrency == 0 || options.batch == 0 {
        bail!("--records, --concurrency and --batch must be at least 1");
    }
    let client = options.target.connect().await?;
    let progress = ProgressBar::new(options.records).with_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} records ({rate}, eta {eta}) {msg}",
    )?
    .with_key("rate", |state: &ProgressState, out: &mut dyn std::fmt::Write| {
        // Whole records per second, grouped: "20,822/s" (indicatif's own shows 4 decimals).
        let _ = out.write_fmt(format_args!("{}/s", HumanCount(state.per_sec() as u64)));
    }));
    let (lines, written) = mpsc::channel::<Vec<String>>(256);
    let writer = match &options.acked_out {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            Some(tokio::task::spawn_blocking(move || {
                write_lines(file, written)
            }))
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        next_index: AtomicU64::new(0),
        key_prefix: format!("load-{:x}/", fencelog::batch::unix_micros_now()),
        tally: Mutex::new(Tally::default()),
        progress: progress.clone(),
    });
    let started = Instant::now();
    let workers: Vec<_> = (0..options.concurrency)
        .map(|worker| {
            let worker_run = Worker {
                client: client.clone(),
                shared: shared.clone(),
                lines: options.acked_out.as_ref().map(|_| lines.clone()),
                values: RecordGenerator::new(worker as u64 + 1, 1, 0),
                records: options.records,
                batch: options.batch as u64,
                value_size: options.value_size,
                keyspace: options.keyspace.unwrap_or(u64::MAX).max(1),
                random_values: options.random_values,
                failover_timeout: Duration::from_secs(options.failover_timeout),
                append_timeout: Duration::from_secs(options.append_timeout),
                failing_since: None,
            };
            tokio::spawn(worker_run.run())
        })
        .collect();
    drop(lines);
    let mut aborted = None;
    for worker in workers {
        if let Err(e) = worker.await.context("a load worker panicked")? {
            aborted.get_or_insert(e);
        }
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    if let Some(writer) = writer {
        writer
            .await
            .context("the acked-records writer panicked")??;
    }
    let tally = std::mem::take(&mut *shared.tally.lock().unwrap_or_else(|p| p.into_inner()));
    let value_bytes = tally.acked * options.value_size as u64;
    let summary = summarize(&tally, elapsed, value_bytes, options.batch);
    if let Some(e) = aborted {
        println!("{summary}");
        return Err(e.context("the load stopped early"));
    }
    if tally.failed_appends > 0 && !options.tolerate_failures {
        println!("{summary}");
        bail!(
            "{} appends failed (their records may or may not be committed; none is in --acked-out): \
             see the errors above, or pass --tolerate-failures",
            tally.failed_appends
        );
    }
    Ok(LoadSummary {
        acked: tally.acked,
        summary,
    })
}

struct Shared {
    next_index: AtomicU64,
    /// Makes keys unique per run.
    key_prefix: String,
    tally: Mutex<Tally>,
    progress: ProgressBar,
}

impl Shared {
    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Worker {
    client: WalClient,
    shared: Arc<Shared>,
    lines: Option<mpsc::Sender<Vec<String>>>,
    values: RecordGenerator,
    records: u64,
    batch: u64,
    value_size: usize,
    keyspace: u64,
    random_values: bool,
    failover_timeout: Duration,
    append_timeout: Duration,
    /// When this worker's last append failed, until one is acknowledged again: the next
    /// acknowledgment's latency counts from there, so the worst latency shows an outage.
    failing_since: Option<Instant>,
}

impl Worker {
    async fn run(mut self) -> anyhow::Result<()> {
        loop {
            let first = self
                .shared
                .next_index
                .fetch_add(self.batch, Ordering::Relaxed);
            if first >= self.records {
                return Ok(());
            }
            let last = (first + self.batch).min(self.records);
            let records: Vec<Record> = (first..last).map(|i| self.record(i)).collect();
            let count = records.len() as u64;
            let columns: Option<Vec<String>> = self
                .lines
                .as_ref()
                .map(|_| records.iter().map(tsv_columns).collect());
            let sent = self.failing_since.unwrap_or_else(Instant::now);
            let answer = loop {
                let answer =
                    tokio::time::timeout(self.append_timeout, self.client.append(records.clone()))
                        .await
                        .unwrap_or_else(|_| {
                            Err(unanswered(format!(
                                "no answer within {:?}",
                                self.append_timeout
                            )))
                        });
                match answer {
                    Err(e @ Error::NotLeader { .. }) => {
                        self.shared.tally().resent += 1;
                        self.reconnect(e).await?;
                    }
                    answer => break answer,
                }
            };
            match answer {
                Ok(ack) => {
                    self.failing_since = None;
                    let micros = sent.elapsed().as_micros() as u64;
                    {
                        let mut tally = self.shared.tally();
                        tally.acked += count;
                        tally.latencies.push(micros);
                    }
                    self.shared.progress.inc(count);
                    if let (Some(out), Some(columns)) = (&self.lines, columns) {
                        let acked = columns
                            .into_iter()
                            .enumerate()
                            .map(|(i, columns)| {
                                format!("{}\t{columns}", ack.first_seq.0 + i as u64)
                            })
                            .collect();
                        out.send(acked)
                            .await
                            .context("the acked-records writer stopped")?;
                    }
                }
                Err(e) => {
                    self.failing_since.get_or_insert(sent);
                    self.failed(count, &e);
                    self.reconnect(e).await?;
                }
            }
        }
    }

    fn record(&mut self, index: u64) -> Record {
        let key = format!("{}{:010}", self.shared.key_prefix, index % self.keyspace);
        let value = if self.random_values {
            self.values.next_random_value(self.value_size)
        } else {
            self.values.next_value(self.value_size)
        };
        Record::put(key, value)
    }

    fn failed(&self, records: u64, error: &Error) {
        tracing::debug!(%error, addr = self.client.addr(), "append failed");
        let kind = error_kind(error);
        let message = {
            let mut tally = self.shared.tally();
            tally.failed_records += records;
            tally.failed_appends += 1;
            let entry = tally.errors.entry(kind).or_insert((0, error.to_string()));
            entry.0 += 1;
            format!("{} failed", tally.failed_records)
        };
        self.shared.progress.inc(records);
        self.shared.progress.set_message(message);
    }

    /// After a failed append: finds the primary again (the refusal's leader hint, or etcd),
    /// for at most the failover timeout. Errors that no primary can cure end the load.
    async fn reconnect(&mut self, cause: Error) -> anyhow::Result<()> {
        if let Error::Rpc { code, .. } = &cause {
            if *code == tonic::Code::InvalidArgument || *code == tonic::Code::OutOfRange {
                bail!("the node refuses these appends: {cause}");
            }
        }
        let mut hint = match &cause {
            Error::NotLeader { leader } => leader.clone(),
            _ => None,
        };
        let deadline = Instant::now() + self.failover_timeout;
        loop {
            // A node that accepts the connection and then never answers must not hold the
            // worker past the deadline either.
            let attempt = tokio::time::timeout_at(
                deadline.into(),
                self.reconnect_to_primary(hint.as_deref()),
            )
            .await
            .unwrap_or_else(|_| Err(unanswered("the node did not answer".into())));
            match attempt {
                Ok(()) => {
                    tracing::debug!(addr = self.client.addr(), "reconnected");
                    self.shared.tally().reconnects += 1;
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "no primary reachable within {:?} after: {cause}; last try: {e}",
                        self.failover_timeout
                    )
                }
                Err(_) => {
                    hint = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Connects to `hint` (else whoever etcd names) and makes sure it leads: a node in the middle
    /// of a failover may name a leader that is gone, and appending there would only fail again.
    async fn reconnect_to_primary(&mut self, hint: Option<&str>) -> fencelog::Result<()> {
        self.client.reconnect(hint).await?;
        let status = self.client.status().await?;
        if status.role == "primary" {
            Ok(())
        } else {
            Err(Error::NotLeader {
                leader: status.leader,
            })
        }
    }
}

/// A call the load gave up waiting for: `deadlineexceeded` among the errors by kind.
fn unanswered(message: String) -> Error {
    Error::Rpc {
        code: tonic::Code::DeadlineExceeded,
        message,
    }
}

fn error_kind(error: &Error) -> String {
    match error {
        Error::NotLeader { .. } => "not_leader".into(),
        Error::Unreachable { .. } => "unreachable".into(),
        Error::NoLeader { .. } => "no_leader".into(),
        Error::Rpc { code, .. } => format!("{code:?}").to_lowercase(),
        _ => "other".into(),
    }
}

fn write_lines(file: std::fs::File, mut lines: mpsc::Receiver<Vec<String>>) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(file);
    while let Some(chunk) = lines.blocking_recv() {
        for line in chunk {
            writeln!(out, "{line}")?;
        }
    }
    out.flush()?;
    out.get_ref().sync_all()?;
    Ok(())
}

fn summarize(tally: &Tally, elapsed: Duration, value_bytes: u64, batch: usize) -> String {
    let seconds = elapsed.as_secs_f64().max(1e-9);
    let mut latencies = tally.latencies.clone();
    latencies.sort_unstable();
    let at = |q: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let index = ((latencies.len() - 1) as f64 * q).round() as usize;
        latencies[index] as f64 / 1000.0
    };
    let errors = if tally.errors.is_empty() {
        "none".to_owned()
    } else {
        let kinds: Vec<_> = tally
            .errors
            .iter()
            .map(|(kind, (n, first))| format!("\n    {kind} {n}, first: {first}"))
            .collect();
        format!("{} appends{}", tally.failed_appends, kinds.concat())
    };
    format!(
        "load summary\n  acknowledged  {} records ({} failed) in {:.2} s\n  throughput    {:.0} records/s, {:.1} MB/s of values\n  ack latency   p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (per append of up to {batch} records)\n  errors        {errors}\n  reconnects    {} ({} appends sent again after a refusal before sequencing)",
        tally.acked,
        tally.failed_records,
        seconds,
        tally.acked as f64 / seconds,
        value_bytes as f64 / seconds / 1e6,
        at(0.5),
        at(0.99),
        latencies.last().map_or(0.0, |&m| m as f64 / 1000.0),
        tally.reconnects,
        tally.resent,
    )
}
