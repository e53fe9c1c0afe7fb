//! The `fencelog` command line: inspect a node's local store, and a demo of the primary against
//! a real etcd.

mod demo;
mod inspect;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

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

#[derive(Subcommand)]
enum Command {
    /// Print a local store's positions, log size and state digest.
    Inspect {
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Start a private etcd and a primary, append records from concurrent producers, rebuild a
    /// second store from etcd, and check that both agree.
    Demo {
        /// Records to commit.
        #[arg(long, default_value_t = 200_000)]
        records: u64,
        /// Most records per batch.
        #[arg(long, default_value_t = 1024)]
        batch_records: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Inspect { data_dir } => inspect::run(&data_dir),
        Command::Demo {
            records,
            batch_records,
        } => demo::run(records, batch_records).await,
    }
}
