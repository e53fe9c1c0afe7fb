//! `fencelog demo`: the main job end to end, with real processes. A private etcd, a `primary`
//! and a `standby --failover` daemon (this binary, as child processes); a load through the API
//! with a progress bar; the primary killed with SIGKILL mid-load; the standby promoting itself
//! and the load going on; then every acknowledged record checked on the new primary. Everything
//! started is stopped at the end, on success or failure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fencelog::api::{Endpoint, WalClient};
use fencelog::etcd::process::EtcdProcess;
use fencelog::record::Seq;

use crate::commands::{tsv_line, Target};
use crate::load::{self, LoadOptions};

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

    let mut primary = Daemon::spawn(work.path(), "primary", "demo-a", &endpoint, false)?;
    let mut standby = Daemon::spawn(work.path(), "standby", "demo-b", &endpoint, true)?;
    let leader = primary
        .wait_for("primary", None, Duration::from_secs(30))
        .await?;
    println!("demo-a leads at {} (epoch {})", primary.api, leader.epoch);
    standby
        .wait_for("standby", Some("watching"), Duration::from_secs(30))
        .await?;
    println!("demo-b follows at {} with failover on", standby.api);

    let acked_path = work.path().join("acked.tsv");
    let options = LoadOptions {
        target: Target {
            server: None,
            etcd: Some(vec![endpoint.clone()]),
            cluster: Some(CLUSTER.to_owned()),
        },
        records,
        value_size: 256,
        concurrency: 16,
        batch: 64,
        acked_out: Some(acked_path.clone()),
        random_values: false,
        failover_timeout: Duration::from_secs(30),
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
    standby.stop()?;
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

/// A daemon child process; killed when dropped.
struct Daemon {
    name: String,
    api: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(
        work: &Path,
        role: &str,
        name: &str,
        etcd: &str,
        failover: bool,
    ) -> anyhow::Result<Daemon> {
        let api = format!("127.0.0.1:{}", free_port()?);
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let log = work.join(format!("{name}.log"));
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg(role)
            .args(["--cluster", CLUSTER, "--node", name, "--etcd", etcd])
            .args(["--listen", &api, "--metrics", &metrics])
            .args(["--lease-ttl", LEASE_TTL_SECONDS])
            .arg("--data-dir")
            .arg(work.join(name))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        if failover {
            command.arg("--failover");
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start the {role} daemon"))?;
        Ok(Daemon {
            name: name.to_owned(),
            api,
            child,
            log,
        })
    }

    async fn client(&self) -> anyhow::Result<WalClient> {
        Ok(WalClient::connect(Endpoint::Server(self.api.clone())).await?)
    }

    /// Polls the node's status until it has `role` (and `state`).
    async fn wait_for(
        &mut self,
        role: &str,
        state: Option<&str>,
        limit: Duration,
    ) -> anyhow::Result<fencelog::api::proto::StatusResponse> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(exit) = self.child.try_wait()? {
                bail!(
                    "{} exited ({exit}); its log is in {}",
                    self.name,
                    self.log.display()
                );
            }
            if let Ok(mut client) = self.client().await {
                if let Ok(status) = client.status().await {
                    if status.role == role && state.map_or(true, |s| s == status.state) {
                        return Ok(status);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("{} is not {role} after {limit:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        // Already gone is fine: the point is that it is not running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and waits for a clean exit.
    fn stop(&mut self) -> anyhow::Result<()> {
        let pid = i32::try_from(self.child.id())?;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("{} did not stop cleanly ({status})", self.name);
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
