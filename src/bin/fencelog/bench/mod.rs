//! `fencelog bench`: the benchmark suite in one process and one sitting, each measurement on a
//! fresh etcd of its own, run for a bounded time, with the CPU fencelog and etcd used beside
//! each rate; prints a table (and writes it as a markdown report with `--report`, and a chart of
//! records/s against batch size with `--plot`).
//!
//! It measures the commit layer's ceiling (pre-encoded fenced transactions) and single-key puts;
//! fencelog's primary in process (double and single pipeline at several batch caps, producers
//! building each record, the primary's own state apply running) and a primary daemon through
//! its gRPC API; the seed design's writer; sled's raw insert rate; ack latency at half the
//! saturated rate; a standby's receive and apply rates and lags at half and full rate; and a
//! full replay against a warm restart; and with etcd a round trip away (each of `--delays-ms`
//! through the delaying proxy), the plain loop and a primary daemon with each of
//! `--commits-in-flight`. The criterion benches share the workloads (`fencelog::bench`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use fencelog::bench::seed_style::KEYS_PER_TXN;
use fencelog::config::Pipeline;
use indicatif::{ProgressBar, ProgressStyle};

mod distant;
mod measure;
mod plot;
mod report;
mod state;

/// The batch size the targets compare at.
const REFERENCE_BATCH: usize = 1024;

#[derive(Args)]
pub struct BenchOptions {
    /// Seconds each measurement runs.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    seconds: u64,
    /// Batch caps (records) of fencelog's own runs.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', default_values_t = [128, 1024, 4096])]
    caps: Vec<usize>,
    /// Also write the report, as markdown, to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Records a standby replays onto an empty store, then restarts warm on (0: skip).
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    replay_records: u64,
    /// Run only the measurements whose name contains this text (e.g. `fencelog double`; those
    /// measured against the saturated rate need `fencelog double, batch cap 1024` too).
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,
    /// Delays (milliseconds, each way) to put etcd behind for the rows a round trip away.
    #[arg(long, value_name = "MS,MS,...", value_delimiter = ',', default_values_t = [0.0, 0.5, 1.0, 2.0])]
    delays_ms: Vec<f64>,
    /// Commit transactions in flight of the primary daemons a round trip away from etcd.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', default_values_t = [1, 2, 4, 8])]
    commits_in_flight: Vec<usize>,
    /// Batch caps (records) of the primary daemons a round trip away from etcd.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', default_values_t = [128, 1024])]
    distant_caps: Vec<usize>,
    /// Draw records/s against batch size, and against etcd's delay, into this PNG.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    /// The TrueType font the plot is labelled with.
    #[arg(
        long,
        value_name = "FILE.ttf",
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
}

/// One measured rate.
struct Measurement {
    what: String,
    /// The batch size the stage was run at (ceiling and fencelog stages).
    cap: Option<usize>,
    records: u64,
    elapsed: Duration,
    records_per_batch: Option<f64>,
    /// Mean time to encode (or seal and encode) one batch, and to commit one, where the stage
    /// has batches: where its time goes.
    encode_per_batch: Option<Duration>,
    commit_per_batch: Option<Duration>,
    /// Cores used by this process (fencelog) and by etcd while it ran.
    cpu: (f64, f64),
    /// What the rate alone does not say (latencies, lags, restart time), for the report.
    note: Option<String>,
    /// Drawn in the plot (a writer's rate at a batch size).
    plotted: bool,
    /// Where etcd was a round trip away: how far, and what the commits did.
    distant: Option<Distant>,
}

/// A row with etcd a round trip away.
struct Distant {
    /// The delay each way.
    away: Duration,
    cap: usize,
    /// Commit transactions in flight (`None`: the plain loop, one at a time).
    in_flight: Option<usize>,
    /// Ack latency p50 and p99 of the appends through the API.
    ack: Option<(Duration, Duration)>,
    /// Batches per commit transaction.
    batches_per_transaction: Option<f64>,
    /// Transactions etcd refused because the one before had not landed yet.
    behind: Option<u64>,
}

impl Measurement {
    fn per_second(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

enum Stage {
    Ceiling {
        batch: usize,
    },
    /// Build a batch's records, encode it, then commit it, one after another: no pipeline at
    /// all. `away`: through the delaying proxy, each way.
    PlainLoop {
        away: Option<Duration>,
    },
    SinglePuts,
    Fencelog {
        pipeline: Pipeline,
        cap: usize,
    },
    SeedStyle,
    /// fencelog double at the reference cap, offered `percent` % of the rate it reached.
    AckLatency {
        percent: u32,
    },
    /// A `fencelog primary` daemon driven through its gRPC API by `concurrency` clients
    /// appending `per_append` records per call.
    Api {
        concurrency: usize,
        per_append: usize,
    },
    /// A `fencelog primary` daemon whose etcd is `away` each way, with batch cap `cap` and
    /// `in_flight` commit transactions in flight, driven through its API by
    /// [`distant::CLIENTS`] clients appending [`distant::PER_APPEND`] records per call.
    Distant {
        away: Duration,
        cap: usize,
        in_flight: usize,
    },
    /// sled inserting random keys (1M keyspace, 256-byte records): the ceiling of any apply.
    SledRaw,
    /// A standby following a primary (double, reference cap) loaded at `percent` % of its
    /// saturated rate (100: saturated).
    Follow {
        percent: u32,
    },
    /// A standby replaying `records` onto an empty store, then restarting warm on it.
    Replay {
        records: u64,
    },
    /// A primary and a standby daemon under a saturated API load over `keyspace` keys (`None`:
    /// unique keys), for at least 30 s: does the applied state keep up?
    State {
        keyspace: Option<u64>,
    },
}

impl Stage {
    fn name(&self) -> String {
        match self {
            Stage::Ceiling { batch } => format!("ceiling: pre-encoded {batch}-record fenced txns"),
            Stage::PlainLoop { away: None } => format!(
                "plain loop: build {REFERENCE_BATCH} records, encode, then commit them"
            ),
            Stage::PlainLoop { away: Some(away) } => format!(
                "plain loop, etcd {} ms away: build {REFERENCE_BATCH} records, encode, then commit them",
                distant::in_ms(*away)
            ),
            Stage::Distant {
                away,
                cap,
                in_flight,
            } => format!(
                "primary daemon through the API, etcd {} ms away, batch cap {cap}, {in_flight} in flight",
                distant::in_ms(*away)
            ),
            Stage::SinglePuts => "etcd single-key puts (256 B), one in flight".into(),
            Stage::Fencelog { pipeline, cap } => format!(
                "fencelog {}, batch cap {cap}",
                match pipeline {
                    Pipeline::Double => "double",
                    Pipeline::Single => "single",
                }
            ),
            Stage::SeedStyle => format!("seed style: {KEYS_PER_TXN} keys per txn + pointer put"),
            Stage::AckLatency { percent } => format!(
                "fencelog double, batch cap {REFERENCE_BATCH}, paced at {percent}% of its rate"
            ),
            Stage::Api {
                concurrency,
                per_append,
            } => format!(
                "fencelog primary daemon through the API, {concurrency} clients x {per_append} records"
            ),
            Stage::SledRaw => "sled raw random-key inserts, one at a time".into(),
            Stage::Follow { percent } => format!(
                "standby receiving from a primary at {percent}% of its rate"
            ),
            Stage::Replay { records } => {
                format!("standby: full replay of {records} records onto an empty store")
            }
            Stage::State { keyspace } => format!(
                "state under an API load, {}",
                keyspace.map_or("unique keys".to_owned(), |k| format!("{k}-key keyspace"))
            ),
        }
    }
}

pub async fn run(options: BenchOptions) -> anyhow::Result<()> {
    anyhow::ensure!(options.seconds > 0, "--seconds must be at least 1");
    anyhow::ensure!(
        options
            .caps
            .iter()
            .chain(&options.distant_caps)
            .all(|&c| c > 0),
        "--caps and --distant-caps must be at least 1"
    );
    anyhow::ensure!(
        options.commits_in_flight.iter().all(|&k| k > 0),
        "--commits-in-flight must be at least 1"
    );
    anyhow::ensure!(
        options.delays_ms.iter().all(|d| d.is_finite() && *d >= 0.0),
        "--delays-ms must be milliseconds, 0 or more"
    );
    let delays: Vec<Duration> = options
        .delays_ms
        .iter()
        .map(|ms| Duration::from_micros((ms * 1000.0).round() as u64))
        .collect();
    let duration = Duration::from_secs(options.seconds);
    let mut stages: Vec<Stage> = options
        .caps
        .iter()
        .map(|&batch| Stage::Ceiling { batch })
        .collect();
    stages.push(Stage::PlainLoop { away: None });
    stages.push(Stage::SinglePuts);
    for pipeline in [Pipeline::Double, Pipeline::Single] {
        for &cap in &options.caps {
            stages.push(Stage::Fencelog { pipeline, cap });
        }
    }
    stages.push(Stage::Api {
        concurrency: 32,
        per_append: 256,
    });
    stages.push(Stage::SeedStyle);
    stages.push(Stage::SledRaw);
    if options.caps.contains(&REFERENCE_BATCH) {
        stages.push(Stage::AckLatency { percent: 50 });
        stages.push(Stage::Follow { percent: 50 });
        stages.push(Stage::Follow { percent: 100 });
    }
    for &away in &delays {
        stages.push(Stage::PlainLoop { away: Some(away) });
        for &cap in &options.distant_caps {
            for &in_flight in &options.commits_in_flight {
                stages.push(Stage::Distant {
                    away,
                    cap,
                    in_flight,
                });
            }
        }
    }
    stages.push(Stage::State {
        keyspace: Some(1_000_000),
    });
    stages.push(Stage::State { keyspace: None });
    if options.replay_records > 0 {
        stages.push(Stage::Replay {
            records: options.replay_records,
        });
    }

    if let Some(only) = &options.only {
        stages.retain(|stage| stage.name().contains(only.as_str()));
        anyhow::ensure!(
            !stages.is_empty(),
            "no measurement's name contains {only:?}"
        );
    }
    let progress = ProgressBar::new(stages.len() as u64).with_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} measurements: {msg}",
    )?);
    progress.enable_steady_tick(Duration::from_millis(200));
    let started = Instant::now();
    let mut results = Vec::new();
    for stage in &stages {
        progress.set_message(stage.name());
        let measurement = measure::measure(stage, duration, &results)
            .await
            .with_context(|| format!("measuring {}", stage.name()))?;
        progress.println(format!(
            "{:<55} {:>10.0} records/s",
            measurement.what,
            measurement.per_second()
        ));
        results.push(measurement);
        progress.inc(1);
    }
    progress.finish_and_clear();

    let report = report::report(&results, options.seconds, started.elapsed());
    println!("{report}");
    if let Some(path) = &options.report {
        std::fs::write(path, &report)
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    if let Some(path) = &options.plot {
        plot::draw(path, &options.font, &report::charts(&results))
            .with_context(|| format!("cannot draw {}", path.display()))?;
        println!("plot written to {}", path.display());
    }
    Ok(())
}
