//! Faults with real processes under load, each followed by `fencelog check` over the whole
//! history: nothing acknowledged is lost or changed, the log stays dense, epochs never go back,
//! and every stopped node's state equals the replay of the log.
//!
//! Rounds: `FENCELOG_FAULT_ROUNDS` (default 2; the long mode in docs/RELIABILITY.md uses more).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{daemon, fencelog, CLUSTER};
use fencelog::node_process::NodeProcess;

const WAIT: Duration = Duration::from_secs(60);
/// Short leases, so that a failover takes about two seconds.
const NODE_ARGS: [&str; 2] = ["--lease-ttl", "2"];

fn rounds() -> usize {
    std::env::var("FENCELOG_FAULT_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2)
}

/// `fencelog load` in the background through etcd's leader key, writing what was acknowledged.
fn start_load(etcd: &common::EtcdProcess, records: u64, acked: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fencelog"))
        .args(["load", "--etcd", etcd.endpoint(), "--cluster", CLUSTER])
        .args(["--records", &records.to_string(), "--concurrency", "8"])
        .args(["--failover-timeout", "30", "--acked-out"])
        .arg(acked)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("load starts")
}

fn finish_load(load: Child) -> String {
    let output = load.wait_with_output().expect("load ends");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "load failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Waits until the node's committed seq reaches `seq`.
async fn committed(node: &NodeProcess, seq: u64) {
    let deadline = Instant::now() + WAIT;
    while node.status().await.map_or(0, |s| s.committed_seq) < seq {
        assert!(
            Instant::now() < deadline,
            "{} never committed seq {seq}",
            node.name()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `fencelog check` over the acked files against the leader and etcd, then over the stopped
/// nodes' stores; panics with its report on any violation.
async fn check(etcd: &common::EtcdProcess, acked: &[PathBuf], nodes: &mut [NodeProcess]) {
    let mut args = vec!["check", "--etcd", etcd.endpoint(), "--cluster", CLUSTER];
    let acked: Vec<String> = acked.iter().map(|p| p.display().to_string()).collect();
    for file in &acked {
        args.extend(["--acked", file]);
    }
    let (ok, out, err) = fencelog(&args);
    assert!(ok, "{out}{err}");
    // The nodes' states, once they have applied everything and stopped.
    let mut last = 0;
    for node in nodes.iter() {
        last = last.max(node.status().await.unwrap().committed_seq);
    }
    for node in nodes.iter() {
        let mut client = node.client().await.unwrap();
        client
            .get(b"-".to_vec(), fencelog::record::Seq(last), WAIT)
            .await
            .unwrap();
    }
    let mut dirs = Vec::new();
    for node in nodes.iter_mut() {
        assert!(node.stop(WAIT).await.unwrap().success());
        dirs.push(node.data_dir().display().to_string());
    }
    for dir in &dirs {
        args.extend(["--data-dir", dir]);
    }
    let (ok, out, err) = fencelog(&args);
    assert!(ok, "{out}{err}");
    assert!(out.contains("no violations"), "{out}");
    println!("{out}");
    assert!(
        out.contains(&format!("{} node states replayed", nodes.len())),
        "{out}"
    );

    // The same check refuses a history with one acknowledged value changed.
    let text = std::fs::read_to_string(&acked[0]).unwrap();
    let line = text.lines().next().expect("something was acknowledged");
    let (seq_and_key, _) = line.rsplit_once('\t').unwrap();
    let forged_path = format!("{}.forged", acked[0]);
    std::fs::write(&forged_path, format!("{seq_and_key}\t0000000000000000\n")).unwrap();
    let (ok, out, _) = fencelog(&[
        "check",
        "--etcd",
        etcd.endpoint(),
        "--cluster",
        CLUSTER,
        "--acked",
        &forged_path,
    ]);
    assert!(
        !ok && out.contains("VIOLATION"),
        "a forged acknowledgment passed: {out}"
    );
}

/// A primary `a`, and once it leads, a failover standby `b` following it.
async fn start_pair(etcd: &common::EtcdProcess, dir: &std::path::Path) -> Vec<NodeProcess> {
    let mut primary = daemon(etcd, dir, "primary", "a", &NODE_ARGS);
    primary.wait_for("primary", None, WAIT).await.unwrap();
    let failover = [&NODE_ARGS[..], &["--failover"]].concat();
    let mut standby = daemon(etcd, dir, "standby", "b", &failover);
    standby
        .wait_for("standby", Some("watching"), WAIT)
        .await
        .unwrap();
    vec![primary, standby]
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_primary_under_load_loses_no_acknowledged_record() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_pair(&etcd, dir.path()).await;
    let mut acked = Vec::new();
    let mut leader = 0;
    for round in 0..rounds() {
        let file = dir.path().join(format!("acked-{round}.tsv"));
        let base = nodes[leader].status().await.unwrap().committed_seq;
        let load = start_load(&etcd, 20_000, &file);
        committed(&nodes[leader], base + 5_000).await;
        nodes[leader].kill();
        let killed = Instant::now();
        let survivor = 1 - leader;
        nodes[survivor]
            .wait_for("primary", None, WAIT)
            .await
            .unwrap();
        println!(
            "round {round}: {} took over {:.2} s after the kill",
            nodes[survivor].name(),
            killed.elapsed().as_secs_f64()
        );
        // The killed node comes back as a failover standby on its old store.
        let mut restarted = daemon(
            &etcd,
            dir.path(),
            "standby",
            nodes[leader].name(),
            &[&NODE_ARGS[..], &["--failover"]].concat(),
        );
        restarted
            .wait_for("standby", Some("watching"), WAIT)
            .await
            .unwrap();
        nodes[leader] = restarted;
        let summary = finish_load(load);
        assert!(summary.contains("acknowledged"), "{summary}");
        acked.push(file);
        leader = survivor;
    }
    check(&etcd, &acked, &mut nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_primary_is_fenced_and_acknowledges_nothing_after() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_pair(&etcd, dir.path()).await;
    let file = dir.path().join("acked.tsv");
    let load = start_load(&etcd, 20_000, &file);
    committed(&nodes[0], 5_000).await;
    nodes[0].signal(libc::SIGSTOP).unwrap();
    nodes[1].wait_for("primary", None, WAIT).await.unwrap();
    nodes[0].signal(libc::SIGCONT).unwrap();
    // The old primary's next commit is refused: it steps down and follows the new one.
    nodes[0].wait_for("standby", None, WAIT).await.unwrap();
    finish_load(load);
    check(&etcd, &[file], &mut nodes).await;
}
