//! `fencelog demo`: the main job end to end, with real processes. A private etcd, a `primary`
//! and a `standby --failover` daemon (this binary, as child processes); a load through the API
//! with a progress bar; the primary killed with SIGKILL mid-load; the standby promoting itself
//! and the load going on; then every acknowledged record checked on the new primary. Everything
//! started is stopped at the end, on success or failure.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fencelog::api::WalClient;
use fencelog::etcd::process::EtcdProcess;
use fencelog::node_process::{NodeProcess, NodeSpec};
use fencelog::record::Seq;

use crate::commands::Target;
use crate::load::{self, LoadOptions};
use fencelog::checker::tsv_line;

const CLUSTER: &str = "demo";
/// Short, so the failover shows within seconds.
const LEASE_TTL_SECONDS: &str = "3";
/// The primary is killed once this share of the records is committed.
const KILL_AT: f64 = 0.4;

pub async fn run(records: u64) -> anyhow::Result<()> {
    if records < 100 {
        bail!("--records must be at least 100");
    }
    let work = tempfile::tempdir()?;
    println!("starting a private etcd on 127.0.0.1 ...");
    let etcd = EtcdProcess::start().await?;
    let endpoint = etcd.endpoint().to_owned();
    println!("etcd is up at {endpoint}");

    let mut primary = spawn(work.path(), "primary", "demo-a", &endpoint)?;
    let leader = primary
        .wait_for("primary", None, Duration::from_secs(30))
        .await?;
    println!("demo-a leads at {} (epoch {})", primary.api(), leader.epoch);
    // Started once demo-a leads: a failover standby takes any leadership nobody holds.
    let mut standby = spawn(work.path(), "standby", "demo-b", &endpoint)?;
    standby
        .wait_for("standby", Some("watching"), Duration::from_secs(30))
        .await?;
    println!("demo-b follows at {} with failover on", standby.api());

    let acked_path = work.path().join("acked.tsv");
    let options = LoadOptions {
        target: Target {
            server: None,
            etcd: Some(vec![endpoint.clone()]),
            cluster: Some(CLUSTER.to_owned()),
            etcd_security: Default::default(),
            api_security: Default::default(),
            wait: 10,
        },
        records,
        value_size: 256,
        concurrency: 16,
        batch: 64,
        acked_out: Some(acked_path.clone()),
        keyspace: None,
        random_values: false,
        failover_timeout: 30,
        append_timeout: 30,
        // The demo kills the primary: appends in flight then fail, and it says how many.
        tolerate_failures: true,
    };
    println!("appending {records} records through the API (16 workers, 64 records per call) ...");
    let loading = tokio::spawn(load::run(options));

    let kill_at = (records as f64 * KILL_AT) as u64;
    let mut watcher = standby.client().await?;
    while watcher.status().await?.committed_seq < kill_at {
        if loading.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed_at = Instant::now();
    primary.kill();
    println!("killed the primary demo-a (SIGKILL) at about seq {kill_at}");
    let promoted = standby
        .wait_for("primary", None, Duration::from_secs(60))
        .await?;
    println!(
        "demo-b promoted itself after {:.1} s: epoch {}, continuing at seq {}",
        killed_at.elapsed().as_secs_f64(),
        promoted.epoch,
        promoted.committed_seq + 1
    );

    let summary = loading.await.context("the load panicked")??;
    println!("{}", summary.summary);
    let status = standby.client().await?.status().await?;
    println!(
        "new primary   committed seq {}, applied seq {}, apply lag {:.3} s",
        status.committed_seq, status.applied_seq, status.apply_lag_seconds
    );
    let checked = check_acked(&mut standby.client().await?, &acked_path).await?;
    if checked != summary.acked {
        bail!(
            "{} records were acknowledged but the acked file lists {checked}",
            summary.acked
        );
    }
    println!("result        all {checked} acknowledged records are on the new primary, same key, same value digest");
    let stopped = standby.stop(Duration::from_secs(15)).await?;
    if !stopped.success() {
        bail!("the new primary did not stop cleanly ({stopped})");
    }
    Ok(())
}

/// Reads the whole log from the new primary and checks every acknowledged line against it.
async fn check_acked(client: &mut WalClient, acked: &Path) -> anyhow::Result<u64> {
    let mut committed = HashMap::new();
    let mut stream = client.read(Seq(1), None).await?;
    while let Some(chunk) = stream.next_chunk().await? {
        for (seq, record) in chunk {
            committed.insert(seq.0, tsv_line(seq, &record));
        }
    }
    let text = std::fs::read_to_string(acked)?;
    let mut checked = 0;
    for line in text.lines() {
        let seq: u64 = line
            .split('\t')
            .next()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad acked line {line:?}"))?;
        match committed.get(&seq) {
            Some(found) if found == line => checked += 1,
            Some(found) => bail!("acknowledged {line:?} but the log has {found:?}"),
            None => bail!("acknowledged {line:?} but the new primary's log lacks seq {seq}"),
        }
    }
    Ok(checked)
}

/// A daemon of this binary, with its data and log under `work`.
fn spawn(work: &Path, role: &str, name: &str, etcd: &str) -> anyhow::Result<NodeProcess> {
    let mut extra_args = vec!["--lease-ttl".to_owned(), LEASE_TTL_SECONDS.to_owned()];
    if role == "standby" {
        extra_args.push("--failover".to_owned());
    }
    Ok(NodeProcess::spawn(NodeSpec {
        binary: std::env::current_exe()?,
        role: role.to_owned(),
        cluster: CLUSTER.to_owned(),
        node: name.to_owned(),
        etcd: etcd.to_owned(),
        data_dir: work.join(name),
        log: work.join(format!("{name}.log")),
        extra_args,
        env: Vec::new(),
    })?)
}
