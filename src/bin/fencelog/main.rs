//! The `fencelog` command line: the `primary` and `standby` daemons, the client commands
//! (`append`, `load`, `read`, `get`, `status`, `promote`), `inspect` for a stopped node's store,
//! and the `demo`.
//!
//! Errors end the process with one line on stderr (`error: ...`) and a non-zero status.

mod api_security;
mod bench;
mod commands;
mod daemon;
mod demo;
mod etcd_security;
mod inspect;
mod load;
mod logs;
mod settings;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use commands::{Encoding, ReadFormat, Target, ValueSource};
use settings::{LogFormat, NodeSettings, StandbyArgs};

#[derive(Parser)]
#[command(
    name = "fencelog",
    version,
    about = "A replicated write-ahead log on etcd and sled"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct DaemonArgs {
    /// A TOML file with the settings below (flags and FENCELOG_* variables override it).
    #[arg(long, env = "FENCELOG_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: NodeSettings,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node that leads: it campaigns for the leadership (waiting while another node
    /// leads), then takes appends.
    Primary(DaemonArgs),
    /// Run a node that follows the committed log (and takes over with --failover).
    Standby {
        #[command(flatten)]
        args: DaemonArgs,
        #[command(flatten)]
        standby: StandbyArgs,
    },
    /// Append one record; prints `seq N` once it is committed.
    Append {
        #[command(flatten)]
        target: Target,
        /// The record's key.
        key: String,
        /// The record's value (or --value-file).
        #[arg(required_unless_present = "value_file")]
        value: Option<String>,
        /// Take the value from this file, as it is (`-`: stdin); for values a command line
        /// cannot carry (up to the node's limit, 1 MiB by default).
        #[arg(long, value_name = "PATH", conflicts_with = "value")]
        value_file: Option<PathBuf>,
        #[command(flatten)]
        encoding: Encoding,
    },
    /// Drive appends from concurrent workers and print throughput and ack latency.
    Load(load::LoadOptions),
    /// Print committed records `--from..=--to` as `<seq>\t<key>\t<xxh3 of value>`.
    Read {
        #[command(flatten)]
        target: Target,
        /// First seq to print (seqs start at 1).
        #[arg(long, value_name = "SEQ")]
        from: u64,
        /// Last seq to print; past what the node holds committed, it prints what there is
        /// and fails saying where the log ends [default: what the node holds now].
        #[arg(long, value_name = "SEQ")]
        to: Option<u64>,
        /// Output format: `tsv` is `<seq>\t<key>\t<xxh3-64 of the value>`, a delete's digest `-`.
        #[arg(long, value_enum, default_value = "tsv")]
        format: ReadFormat,
        #[command(flatten)]
        encoding: Encoding,
    },
    /// Print a key's value from the node's applied state.
    Get {
        #[command(flatten)]
        target: Target,
        /// Wait until the node has applied this seq (read-your-writes).
        #[arg(long, value_name = "SEQ")]
        min_seq: Option<u64>,
        /// Wait until the node has applied everything it knew committed when asked: on the
        /// primary, a linearizable read.
        #[arg(long, conflicts_with = "min_seq")]
        consistent: bool,
        /// Seconds to wait for --min-seq or --consistent.
        #[arg(long, value_name = "SECONDS", default_value_t = 10)]
        timeout: u64,
        /// The key to look up.
        key: String,
        #[command(flatten)]
        encoding: Encoding,
    },
    /// Show a node's role, state, positions and lag.
    Status {
        #[command(flatten)]
        target: Target,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Make a standby the primary.
    Promote {
        /// The node's API address.
        #[arg(long, value_name = "HOST:PORT")]
        server: String,
        /// Depose a live primary first (revokes its lease).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        api_security: api_security::ApiClientSettings,
    },
    /// Replace a stopped node's store with a snapshot of another node's state (the primary's
    /// with --etcd/--cluster), for a node the log in etcd was trimmed past.
    Bootstrap {
        #[command(flatten)]
        target: Target,
        /// The stopped node's data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
    /// Check a history after faults: every acknowledged record committed once, unchanged; the
    /// log dense; epochs never going back (with --etcd); stopped nodes' states equal the replay.
    Check {
        #[command(flatten)]
        target: Target,
        /// `load --acked-out` files (repeatable).
        #[arg(long = "acked", value_name = "FILE", required = true)]
        acked: Vec<PathBuf>,
        /// A stopped node's data directory whose state to check (repeatable).
        #[arg(long = "data-dir", value_name = "DIR")]
        data_dirs: Vec<PathBuf>,
    },
    /// Print a stopped node's store: positions, log size and state digest.
    Inspect {
        /// The node's data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The benchmark suite: the commit layer's ceiling, fencelog in process and through its API,
    /// the seed design's writer, a standby's rates and lags, replay vs warm restart, ack latency
    /// at a fixed load; each on a private etcd, with CPU use (see docs/BENCHMARKS.md).
    Bench(bench::BenchOptions),
    /// Start a private etcd, a primary and a failover standby, push a load, kill the primary,
    /// and check that the promoted standby has every acknowledged record.
    Demo {
        /// Records to append.
        #[arg(long, value_name = "N", default_value_t = 200_000)]
        records: u64,
    },
}

fn main() {
    // Builds with fail points take them from the FAILPOINTS variable (tests crash daemons at
    // exact steps this way); other builds have none.
    #[cfg(feature = "failpoints")]
    let _fail_points = fail::FailScenario::setup();
    // Every command's help in one layout: each description on the line below its flag.
    let command = Cli::command().mut_subcommands(|sub| sub.next_line_help(true));
    let cli = match command
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches))
    {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line: the reason and clap's tip ("a similar argument exists: '--cluster'"),
            // without the usage block.
            let rendered = e.render().to_string();
            let reason: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.starts_with("Usage:"))
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with("For more information"))
                .collect();
            eprintln!("{} (see --help)", reason.join("; ").replace(":; ", ": "));
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli.command)) {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Primary(args) => run_daemon(args, None).await,
        Command::Standby { args, standby } => run_daemon(args, Some(standby)).await,
        command => {
            logs::init(LogFormat::Text, "warn");
            run_client(command).await
        }
    }
}

/// Runs a `primary` (no `standby` flags) or a `standby`.
async fn run_daemon(args: DaemonArgs, standby: Option<StandbyArgs>) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => NodeSettings::from_file(path)?,
        None => NodeSettings::default(),
    };
    let mut merged = args.settings.or(file);
    let leads = standby.is_none();
    if let Some(standby) = standby {
        merged.failover = standby.failover.or(merged.failover);
    }
    let settings = merged.resolve(leads)?;
    logs::init(settings.log_format, "info");
    daemon::run(settings, if leads { "primary" } else { "standby" }).await
}

async fn run_client(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Append {
            target,
            key,
            value,
            value_file,
            encoding,
        } => {
            let value = match (value, value_file) {
                (_, Some(path)) => ValueSource::File(path),
                (Some(value), None) => ValueSource::Given(value),
                (None, None) => anyhow::bail!("give a VALUE or --value-file PATH"),
            };
            commands::append(&target, &key, value, encoding).await
        }
        Command::Load(options) => {
            let summary = load::run(options).await?;
            println!("{}", summary.summary);
            Ok(())
        }
        Command::Read {
            target,
            from,
            to,
            format,
            encoding,
        } => commands::read(&target, from, to, format, encoding).await,
        Command::Get {
            target,
            min_seq,
            consistent,
            timeout,
            key,
            encoding,
        } => {
            let at = match (consistent, min_seq) {
                (true, _) => commands::ReadAt::Consistent,
                (false, seq) => commands::ReadAt::Applied(fencelog::record::Seq(seq.unwrap_or(0))),
            };
            commands::get(&target, &key, at, Duration::from_secs(timeout), encoding).await
        }
        Command::Status { target, json } => commands::status(&target, json).await,
        Command::Promote {
            server,
            force,
            api_security,
        } => commands::promote(server, force, &api_security).await,
        Command::Inspect { data_dir, json } => inspect::run(&data_dir, json),
        Command::Check {
            target,
            acked,
            data_dirs,
        } => commands::check(&target, &acked, &data_dirs).await,
        Command::Bootstrap { target, data_dir } => commands::bootstrap(&target, &data_dir).await,
        Command::Demo { records } => demo::run(records).await,
        Command::Bench(options) => bench::run(options).await,
        Command::Primary(_) | Command::Standby { .. } => unreachable!("daemons are run by `run`"),
    }
}

/// An error as one line: its contexts, then causes down to the first of fencelog's own errors,
/// whose message already says why (what lies under it is a library's text, often in Rust debug
/// form, often said again); a cause already in the line is not repeated.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        if cause.downcast_ref::<fencelog::Error>().is_some() {
            break;
        }
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_its_contexts_then_fencelogs_message_without_what_lies_under_it() {
        let status = tonic::Status::unavailable("tcp connect error");
        let error = anyhow::Error::new(fencelog::Error::Etcd(status.into()))
            .context("cannot find the leader");
        assert_eq!(
            one_line(&error),
            "cannot find the leader: etcd: cannot connect: tcp connect error"
        );
    }

    #[test]
    fn a_cause_already_in_the_line_is_not_said_twice() {
        let error = anyhow::anyhow!("disk full").context("cannot write: disk full");
        assert_eq!(one_line(&error), "cannot write: disk full");
    }

    #[test]
    fn a_multi_line_message_becomes_one_line() {
        assert_eq!(one_line(&anyhow::anyhow!("a\nb")), "a b");
    }
}
