//! Faults with real processes under load, each followed by `fencelog check` over the whole
//! history: nothing acknowledged is lost or changed, the log stays dense, epochs never go back,
//! and every stopped node's state equals the replay of the log.
//!
//! Rounds: `FENCELOG_FAULT_ROUNDS` (default 2; the long mode in docs/RELIABILITY.md uses more).
//! Built only with `--features failpoints` (`[[test]] required-features`): many of these kill
//! or stall a daemon at an exact step through `FAILPOINTS`.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::EtcdCluster;
use common::{daemon, fencelog, metric, Etcd, CLUSTER};
use fencelog::api::proto::StatusResponse;
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

/// `fencelog load` in the background through etcd's leader key, writing what was acknowledged
/// to `acked` and its log to `acked` + `.log` (a file, not a pipe: a pipe nobody reads while
/// the test waits would block a load that logs much, e.g. under `RUST_LOG=debug`).
fn start_load(etcd: &impl Etcd, records: u64, acked: &std::path::Path) -> Load {
    let log = acked.with_extension("log");
    let child = Command::new(env!("CARGO_BIN_EXE_fencelog"))
        .args(["load", "--etcd", &etcd.endpoints(), "--cluster", CLUSTER])
        .args(["--records", &records.to_string(), "--concurrency", "8"])
        .args([
            "--failover-timeout",
            "30",
            "--tolerate-failures",
            "--acked-out",
        ])
        .arg(acked)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("the load's log file"))
        .spawn()
        .expect("load starts");
    Load { child, log }
}

/// A running `fencelog load`.
struct Load {
    child: Child,
    log: PathBuf,
}

/// Waits for a load to end (bounded: a load stuck on an unanswered append fails the test);
/// returns its summary.
fn finish_load(load: Load) -> String {
    let output = common::output_within(load.child, Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "load failed: {stdout}{}",
        std::fs::read_to_string(&load.log).unwrap_or_default()
    );
    stdout
}

/// Waits until the node's committed seq reaches `seq`.
async fn committed(node: &NodeProcess, seq: u64) {
    reached(node, seq, |s| s.committed_seq).await;
}

/// Waits until whichever node leads has committed `seq` (leadership may move during a fault).
async fn committed_by_either(nodes: &[NodeProcess], seq: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut most = 0;
        for node in nodes {
            most = most.max(node.status().await.map_or(0, |s| s.committed_seq));
        }
        if most >= seq {
            return;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = nodes.iter().map(NodeProcess::log_text).collect();
            panic!("no node committed seq {seq}:\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `position` of the node's status reaches `seq`.
async fn reached(node: &NodeProcess, seq: u64, position: fn(&StatusResponse) -> u64) {
    let deadline = Instant::now() + WAIT;
    while node.status().await.map_or(0, |s| position(&s)) < seq {
        assert!(
            Instant::now() < deadline,
            "{} never reached seq {seq}; its log:\n{}",
            node.name(),
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `fencelog check` over the acked files against the leader and etcd, then over the stopped
/// nodes' stores; panics with its report on any violation.
async fn check(etcd: &impl Etcd, acked: &[PathBuf], nodes: &mut [NodeProcess]) {
    let endpoints = etcd.endpoints();
    let mut args = vec!["check", "--etcd", &endpoints, "--cluster", CLUSTER];
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
        &endpoints,
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

/// A primary `a`, and once it leads, a standby `b` following it (taking over if `failover`),
/// with `env` in their environments (e.g. fail points).
async fn start_pair_with(
    etcd: &impl Etcd,
    dir: &std::path::Path,
    failover: bool,
    env: PairEnv<'_>,
) -> Vec<NodeProcess> {
    let mut primary = common::daemon_with_env(etcd, dir, "primary", "a", &NODE_ARGS, env.primary);
    primary.wait_for("primary", None, WAIT).await.unwrap();
    let mut args = NODE_ARGS.to_vec();
    if failover {
        args.push("--failover");
    }
    let mut standby = common::daemon_with_env(etcd, dir, "standby", "b", &args, env.standby);
    standby
        .wait_for("standby", Some("watching"), WAIT)
        .await
        .unwrap();
    vec![primary, standby]
}

/// Extra environment variables for the primary and the standby of a pair.
#[derive(Clone, Copy, Default)]
struct PairEnv<'a> {
    primary: &'a [(&'a str, &'a str)],
    standby: &'a [(&'a str, &'a str)],
}

/// [`start_pair_with`] a failover standby.
async fn start_pair(etcd: &impl Etcd, dir: &std::path::Path) -> Vec<NodeProcess> {
    start_pair_with(etcd, dir, true, PairEnv::default()).await
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

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_a_standby_while_it_applies_restarts_it_warm_with_the_same_state() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let mut pair = start_pair_with(&etcd, dir.path(), false, PairEnv::default()).await;
    let (mut standby, primary) = (pair.remove(1), pair.remove(0));
    let file = dir.path().join("acked.tsv");
    let load = start_load(&etcd, 10_000 * rounds() as u64, &file);
    for round in 0..rounds() {
        reached(&standby, 5_000 * (round as u64 + 1), |s| s.received_seq).await;
        standby.kill();
        let restarted = Instant::now();
        standby.start().unwrap();
        let status = standby.wait_for("standby", None, WAIT).await.unwrap();
        assert!(
            status.received_seq > 0,
            "round {round}: the standby restarted from zero"
        );
        println!(
            "round {round}: restarted at received seq {} in {:.2} s",
            status.received_seq,
            restarted.elapsed().as_secs_f64()
        );
    }
    finish_load(load);
    check(&etcd, &[file], &mut [primary, standby]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_killed_and_restarted_under_load_loses_no_acknowledged_record() {
    let mut etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_pair(&etcd, dir.path()).await;
    let file = dir.path().join("acked.tsv");
    let load = start_load(&etcd, 5_000 * rounds() as u64 + 20_000, &file);
    for round in 0..rounds() {
        committed(&nodes[0], 5_000 * (round as u64 + 1)).await;
        etcd.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        etcd.restart().await.unwrap();
        println!("round {round}: etcd killed and restarted");
    }
    finish_load(load);
    check(&etcd, &[file], &mut nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_members_and_the_raft_leader_killed_under_load_lose_no_acknowledged_record() {
    let mut cluster = EtcdCluster::start(3)
        .await
        .expect("a 3-member etcd cluster starts");
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_pair(&cluster, dir.path()).await;
    let file = dir.path().join("acked.tsv");
    // Rounds alternate: a follower member, then the raft leader's member.
    let rounds = rounds() as u64;
    let load = start_load(&cluster, 10_000 * rounds + 10_000, &file);
    let mut progress = 0;
    for round in 0..rounds {
        let kill_leader = round % 2 == 1;
        progress += 5_000;
        committed_by_either(&nodes, progress).await;
        let leader = cluster.leader().await.unwrap();
        let victim = if kill_leader {
            leader
        } else {
            (leader + 1) % 3
        };
        cluster.member(victim).kill();
        // Appends keep committing on the two members left.
        progress += 5_000;
        committed_by_either(&nodes, progress).await;
        cluster.member(victim).restart().await.unwrap();
        println!(
            "round {round}: etcd member {victim} ({}) killed, {progress} committed, restarted",
            if kill_leader {
                "the raft leader"
            } else {
                "a follower"
            }
        );
    }
    finish_load(load);
    check(&cluster, &[file], &mut nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_stopped_past_compaction_and_then_past_trimming_catches_up_under_load() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let (primary, mut standby) = start_trimming_pair(&etcd, dir.path(), 8_000).await;
    let acked: Vec<PathBuf> = (0..5)
        .map(|n| dir.path().join(format!("acked-{n}.tsv")))
        .collect();
    let snapshots = "fencelog_snapshots_installed_total";

    // Away while etcd's revisions are compacted past where it stopped, its records retained.
    finish_load(start_load(&etcd, 10_000, &acked[0]));
    reached(&standby, 10_000, |s| s.received_seq).await;
    assert!(standby.stop(WAIT).await.unwrap().success());
    let stopped_at = etcd_revision(&etcd).await;
    finish_load(start_load(&etcd, 7_000, &acked[1]));
    compacted_past(&etcd, stopped_at).await;
    // Once it is registered again its position holds the trimming back (before, it held nothing).
    standby.start().unwrap();
    registered(&etcd, "b").await;
    finish_load(start_load(&etcd, 10_000, &acked[2]));
    let end = primary.status().await.unwrap().committed_seq;
    reached(&standby, end, |s| s.applied_seq).await;
    assert_eq!(metric(standby.metrics_addr(), snapshots).await, 0.0);

    // Away while the log is trimmed past it: it installs a snapshot, then follows.
    assert!(standby.stop(WAIT).await.unwrap().success());
    finish_load(start_load(&etcd, 15_000, &acked[3]));
    trimmed_past(&primary, end + 1).await;
    let load = start_load(&etcd, 10_000, &acked[4]);
    standby.start().unwrap();
    finish_load(load);
    let end = primary.status().await.unwrap().committed_seq;
    reached(&standby, end, |s| s.applied_seq).await;
    let installed = metric(standby.metrics_addr(), snapshots).await;
    assert_eq!(
        installed,
        1.0,
        "{}\nPRIMARY\n{}",
        standby.log_text(),
        primary.log_text()
    );

    check_trimmed(primary, standby, &acked).await;
}

/// [`check`] for a log that etcd holds only the tail of: against the primary's full local log,
/// with the standby's state, once both have applied everything; stops both.
async fn check_trimmed(mut primary: NodeProcess, mut standby: NodeProcess, acked: &[PathBuf]) {
    let end = primary.status().await.unwrap().committed_seq;
    reached(&standby, end, |s| s.applied_seq).await;
    assert!(standby.stop(WAIT).await.unwrap().success());
    let mut args = vec!["check".to_owned(), "--server".into(), primary.api().into()];
    for file in acked {
        args.extend(["--acked".into(), file.display().to_string()]);
    }
    args.extend([
        "--data-dir".into(),
        standby.data_dir().display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = fencelog(&args);
    assert!(ok && out.contains("1 node states replayed"), "{out}{err}");
    println!("{out}");
    let exit = primary.stop(WAIT).await.unwrap();
    assert!(exit.success(), "{exit}: {}", primary.log_text());
}

/// Waits until the primary has trimmed etcd's log past `seq` (it trims as it applies).
async fn trimmed_past(primary: &NodeProcess, seq: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let trimmed = metric(primary.metrics_addr(), "fencelog_trimmed_seq").await;
        if trimmed > seq as f64 {
            return;
        }
        assert!(Instant::now() < deadline, "trimmed only to {trimmed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `node`'s standby registration is in etcd.
async fn registered(etcd: &common::EtcdProcess, node: &str) {
    let mut client = common::client(etcd).await;
    let layout = fencelog::keys::KeyLayout::new(&CLUSTER.parse().unwrap());
    let key = layout.member(&node.parse().unwrap());
    let deadline = Instant::now() + WAIT;
    while client
        .get(key.clone(), None)
        .await
        .unwrap()
        .kvs()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "{node} never registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A primary `a` that keeps only the newest `retain_records` records in etcd and trims every
/// 50 ms, and a standby `b` following it.
async fn start_trimming_pair(
    etcd: &common::EtcdProcess,
    dir: &std::path::Path,
    retain_records: u64,
) -> (NodeProcess, NodeProcess) {
    let retain = retain_records.to_string();
    let retention = [
        "--retain-records",
        &retain,
        "--retain-seconds",
        "0",
        "--trim-interval-ms",
        "50",
    ];
    let primary_args = [&NODE_ARGS[..], &retention].concat();
    let mut primary = daemon(etcd, dir, "primary", "a", &primary_args);
    primary.wait_for("primary", None, WAIT).await.unwrap();
    let mut standby = daemon(etcd, dir, "standby", "b", &NODE_ARGS);
    standby
        .wait_for("standby", Some("watching"), WAIT)
        .await
        .unwrap();
    (primary, standby)
}

/// etcd's current revision.
async fn etcd_revision(etcd: &common::EtcdProcess) -> i64 {
    let mut client = common::client(etcd).await;
    let answer = client.get("-", None).await.unwrap();
    answer
        .header()
        .expect("etcd answers with a header")
        .revision()
}

/// Waits until etcd has compacted its history past `revision`.
async fn compacted_past(etcd: &common::EtcdProcess, revision: i64) {
    let mut client = common::client(etcd).await;
    let deadline = Instant::now() + WAIT;
    let at_revision = || Some(etcd_client::GetOptions::new().with_revision(revision));
    while client.get("-", at_revision()).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "etcd never compacted past revision {revision}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_store_is_moved_aside_and_rebuilt_from_etcd() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let mut pair = start_pair_with(&etcd, dir.path(), false, PairEnv::default()).await;
    let (mut standby, primary) = (pair.remove(1), pair.remove(0));
    let file = dir.path().join("acked.tsv");
    finish_load(start_load(&etcd, 5_000, &file));
    reached(&standby, 5_000, |s| s.applied_seq).await;
    assert!(standby.stop(WAIT).await.unwrap().success());

    // Lose sled's data file, as a bad disk or an operator's mistake would.
    let db = standby.data_dir().join("db");
    std::fs::write(&db, b"").unwrap();
    standby.start().unwrap();
    let status = standby
        .wait_for("standby", Some("watching"), WAIT)
        .await
        .unwrap();
    reached(&standby, 5_000, |s| s.applied_seq).await;
    let log = standby.log_text();
    assert!(log.contains("moved it aside"), "{log}");
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|entry| entry.ok())
        .any(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("b.damaged-")
        });
    assert!(aside, "the damaged store was not kept aside");
    assert!(status.received_seq <= 5_000);
    check(&etcd, &[file], &mut [primary, standby]).await;
}

/// The primary dies at `fail_point` (its 31st time there: the fail point aborts the process,
/// as SIGKILL would, at that exact step); the failover standby takes over, the dead node rejoins
/// on its store, and the history holds.
async fn a_primary_killed_at_an_exact_step(fail_point: &str) {
    a_primary_with_commits_in_flight_killed_at_an_exact_step(fail_point, "2").await;
}

/// [`a_primary_killed_at_an_exact_step`] with `in_flight` commit transactions allowed.
async fn a_primary_with_commits_in_flight_killed_at_an_exact_step(
    fail_point: &str,
    in_flight: &str,
) {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let crash = format!("{fail_point}=30*off->return");
    let env = PairEnv {
        primary: &[
            ("FAILPOINTS", crash.as_str()),
            ("FENCELOG_MAX_COMMITS_IN_FLIGHT", in_flight),
        ],
        ..PairEnv::default()
    };
    let mut pair = start_pair_with(&etcd, dir.path(), true, env).await;
    let file = dir.path().join("acked.tsv");
    let load = start_load(&etcd, 20_000, &file);
    let exit = pair[0].wait_exit(WAIT).await.unwrap();
    assert!(!exit.success(), "{fail_point} was never reached");
    pair[1].wait_for("primary", None, WAIT).await.unwrap();
    let failover = [&NODE_ARGS[..], &["--failover"]].concat();
    pair[0] = daemon(&etcd, dir.path(), "standby", "a", &failover);
    pair[0]
        .wait_for("standby", Some("watching"), WAIT)
        .await
        .unwrap();
    finish_load(load);
    check(&etcd, &[file], &mut pair).await;
}

/// The primary's commit of its 31st batch panics. The term steps down — a task gone in
/// silence left a primary that kept its lease while its appends waited for ever — the failover
/// standby takes over, and the history holds.
#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_task_that_panics_ends_the_term_and_loses_nothing_acknowledged() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let panics = [(
        "FAILPOINTS",
        "pipeline::abort_before_commit=30*off->1*panic->off",
    )];
    let env = PairEnv {
        primary: &panics,
        ..PairEnv::default()
    };
    let mut pair = start_pair_with(&etcd, dir.path(), true, env).await;
    let file = dir.path().join("acked.tsv");
    let load = start_load(&etcd, 20_000, &file);
    if let Err(e) = pair[1].wait_for("primary", None, WAIT).await {
        panic!(
            "{e}\nA:\n{}\nB:\n{}",
            pair[0].log_text(),
            pair[1].log_text()
        );
    }
    finish_load(load);
    let log = pair[0].log_text();
    assert!(log.contains("the attempt to commit it panicked"), "{log}");
    check(&etcd, &[file], &mut pair).await;
}

/// The standby's follower panics on its first watched batch: the node follows again with a
/// new follower (it used to sit in `watching`, alive and receiving nothing) and catches up.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_that_panics_is_replaced_and_the_standby_catches_up() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let panics = [("FAILPOINTS", "follower::drop_watched_batch=1*panic->off")];
    let env = PairEnv {
        standby: &panics,
        ..PairEnv::default()
    };
    let mut pair = start_pair_with(&etcd, dir.path(), false, env).await;
    let file = dir.path().join("acked.tsv");
    finish_load(start_load(&etcd, 5_000, &file));
    let end = pair[0].status().await.unwrap().committed_seq;
    reached(&pair[1], end, |s| s.applied_seq).await;
    let log = pair[1].log_text();
    assert!(log.contains("the follower ended; following again"), "{log}");
    let restarts = metric(pair[1].metrics_addr(), "fencelog_follower_restarts_total").await;
    assert_eq!(restarts, 1.0);
    check(&etcd, &[file], &mut pair).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_killed_between_sealing_and_its_etcd_txn_loses_nothing_acknowledged() {
    a_primary_killed_at_an_exact_step("pipeline::abort_before_commit").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_killed_after_its_etcd_txn_before_the_ack_loses_nothing_acknowledged() {
    a_primary_killed_at_an_exact_step("pipeline::abort_before_ack").await;
}

/// Killed with up to eight commits on their way, some landed and unacknowledged: the new
/// primary's log holds every acknowledged record once, and whatever else landed, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_primary_killed_with_eight_commits_in_flight_loses_nothing_acknowledged() {
    a_primary_with_commits_in_flight_killed_at_an_exact_step("pipeline::abort_before_ack", "8")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_killed_in_the_middle_of_a_checkpoint_comes_back_with_the_same_state() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    // Dies with its third checkpoint encoded and not yet written.
    let crash = [
        (
            "FAILPOINTS",
            "store::abort_before_checkpoint_write=2*off->return",
        ),
        ("FENCELOG_CHECKPOINT_INTERVAL_MS", "100"),
    ];
    let env = PairEnv {
        standby: &crash,
        ..PairEnv::default()
    };
    let mut pair = start_pair_with(&etcd, dir.path(), false, env).await;
    let file = dir.path().join("acked.tsv");
    let load = start_load(&etcd, 20_000, &file);
    let exit = pair[1].wait_exit(WAIT).await.unwrap();
    assert!(
        !exit.success(),
        "store::abort_before_checkpoint_write was never reached"
    );
    pair[1] = daemon(&etcd, dir.path(), "standby", "b", &NODE_ARGS);
    pair[1].wait_for("standby", None, WAIT).await.unwrap();
    let replayed = pair[1]
        .log_text()
        .contains("replayed the local log after the checkpoint");
    println!("restarted; the log after the last checkpoint was replayed on open: {replayed}");
    finish_load(load);
    check(&etcd, &[file], &mut pair).await;
}

/// A primary keeping only 2,000 records in etcd, and a standby `b` (started with `env`) that was
/// away while the log was trimmed past it: it needs a snapshot as soon as it starts.
async fn a_standby_trimmed_past(
    etcd: &common::EtcdProcess,
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (NodeProcess, NodeProcess, Vec<PathBuf>) {
    let (primary, mut standby) = start_trimming_pair(etcd, dir, 2_000).await;
    let acked = vec![dir.join("acked-0.tsv"), dir.join("acked-1.tsv")];
    finish_load(start_load(etcd, 5_000, &acked[0]));
    reached(&standby, 5_000, |s| s.applied_seq).await;
    assert!(standby.stop(WAIT).await.unwrap().success());
    finish_load(start_load(etcd, 20_000, &acked[1]));
    trimmed_past(&primary, 5_001).await;
    let standby = common::daemon_with_env(etcd, dir, "standby", "b", &NODE_ARGS, env);
    (primary, standby, acked)
}

/// The applied seq in a stopped node's store, from `fencelog inspect --json`.
fn applied_in_store(data_dir: &std::path::Path) -> u64 {
    let dir = data_dir.display().to_string();
    let (ok, out, err) = fencelog(&["inspect", "--json", "--data-dir", &dir]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json["last_applied_seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("{out}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_killed_in_the_middle_of_a_snapshot_install_keeps_its_store_and_installs_again() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let crash = [("FAILPOINTS", "snapshot::abort_mid_install=1*off->return")];
    let (primary, mut standby, acked) = a_standby_trimmed_past(&etcd, dir.path(), &crash).await;
    let exit = standby.wait_exit(WAIT).await.unwrap();
    assert!(
        !exit.success(),
        "snapshot::abort_mid_install was never reached"
    );
    assert_eq!(
        applied_in_store(standby.data_dir()),
        5_000,
        "the old store changed"
    );

    let mut standby = daemon(&etcd, dir.path(), "standby", "b", &NODE_ARGS);
    let end = primary.status().await.unwrap().committed_seq;
    reached(&standby, end, |s| s.applied_seq).await;
    let installed = metric(standby.metrics_addr(), "fencelog_snapshots_installed_total").await;
    assert_eq!(installed, 1.0);
    standby.wait_for("standby", None, WAIT).await.unwrap();
    check_trimmed(primary, standby, &acked).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_killed_between_the_snapshot_renames_finishes_the_install_on_restart() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let crash = [("FAILPOINTS", "snapshot::abort_between_renames=return")];
    let (primary, mut standby, acked) = a_standby_trimmed_past(&etcd, dir.path(), &crash).await;
    let exit = standby.wait_exit(WAIT).await.unwrap();
    assert!(
        !exit.success(),
        "snapshot::abort_between_renames was never reached"
    );
    assert!(
        !standby.data_dir().exists(),
        "the old store was not moved yet"
    );

    let standby = daemon(&etcd, dir.path(), "standby", "b", &NODE_ARGS);
    let end = primary.status().await.unwrap().committed_seq;
    reached(&standby, end, |s| s.applied_seq).await;
    let log = standby.log_text();
    assert!(
        log.contains("completed a snapshot install that a crash interrupted"),
        "{log}"
    );
    let installed = metric(standby.metrics_addr(), "fencelog_snapshots_installed_total").await;
    assert_eq!(installed, 0.0, "it downloaded a second snapshot");
    check_trimmed(primary, standby, &acked).await;
}

/// A small tmpfs mounted on a temporary directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "cannot mount a tmpfs (the disk-full test needs root and CAP_SYS_ADMIN)"
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the disk up to `free_bytes` left with a file; returns the file.
    fn fill(&self, free_bytes: u64) -> PathBuf {
        let stats = nix_free_bytes(self.path());
        let filler = self.path().join("filler");
        let file = std::fs::File::create(&filler).unwrap();
        file.set_len(0).unwrap();
        let mut left = stats.saturating_sub(free_bytes);
        let chunk = vec![0u8; 1 << 20];
        let mut writer = std::io::BufWriter::new(file);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            std::io::Write::write_all(&mut writer, &chunk[..n]).unwrap();
            left -= n as u64;
        }
        std::io::Write::flush(&mut writer).unwrap();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn nix_free_bytes(path: &std::path::Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_whose_disk_fills_up_stops_clearly_and_recovers_once_there_is_space() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(64);
    // Its data on the small disk, its log where there is room.
    let spec = fencelog::node_process::NodeSpec {
        data_dir: disk.path().join("a"),
        ..common::daemon_spec(&etcd, dir.path(), "primary", "a", &NODE_ARGS, &[])
    };
    let mut primary = NodeProcess::spawn(spec.clone()).unwrap();
    primary.wait_for("primary", None, WAIT).await.unwrap();
    let failover = [&NODE_ARGS[..], &["--failover"]].concat();
    let mut standby = daemon(&etcd, dir.path(), "standby", "b", &failover);
    standby
        .wait_for("standby", Some("watching"), WAIT)
        .await
        .unwrap();
    // About 6 MB left: the primary's log and state fill it within the first 10,000 records.
    let filler = disk.fill(6 << 20);
    let file = dir.path().join("acked.tsv");
    let load = start_load(&etcd, 40_000, &file);
    let exit = primary.wait_exit(WAIT).await.unwrap();
    assert!(!exit.success());
    let log = primary.log_text();
    assert!(log.contains("No space left on device"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains("the local store in") && last.contains("start the node again"),
        "{last}"
    );
    println!("{last}");
    standby.wait_for("primary", None, WAIT).await.unwrap();
    let summary = finish_load(load);
    println!("{summary}");

    // Space returns; the node starts again on its store, as a supervisor would restart it.
    std::fs::remove_file(filler).unwrap();
    let spec = fencelog::node_process::NodeSpec {
        role: "standby".into(),
        extra_args: failover.iter().map(|a| a.to_string()).collect(),
        ..spec
    };
    let mut restarted = NodeProcess::spawn(spec).unwrap();
    let status = restarted.wait_for("standby", None, WAIT).await.unwrap();
    assert!(
        status.received_seq > 0,
        "it restarted from zero: {}",
        restarted.log_text()
    );
    check(&etcd, &[file], &mut [restarted, standby]).await;
}

/// The standby's applier fails on its first step (as on a damaged local log): the node stays
/// up, but `/readyz` fails and `status` names the error, and its apply lag grows with the
/// clock instead of showing its last value.
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_whose_applier_failed_is_not_ready_and_says_why() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let fails = [("FAILPOINTS", "applier::step_fails=return")];
    let env = PairEnv {
        standby: &fails,
        ..PairEnv::default()
    };
    let mut pair = start_pair_with(&etcd, dir.path(), false, env).await;
    let (ok, _, err) = common::fencelog(&["append", "--server", pair[0].api(), "k", "v"]);
    assert!(ok, "{err}");
    let deadline = std::time::Instant::now() + WAIT;
    let failed = loop {
        let status = pair[1].status().await.unwrap();
        if status.error.is_some() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the applier never failed: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let error = failed.error.clone().unwrap();
    assert!(error.contains("the applier stopped"), "{error}");
    let (code, body) = common::http_get(pair[1].metrics_addr(), "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("the applier stopped"), "{body}");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let later = pair[1].status().await.unwrap();
    assert_eq!(later.applied_seq, 0);
    assert!(
        later.apply_lag_seconds >= failed.apply_lag_seconds + 1.0,
        "a stalled applier's lag grows: {} then {}",
        failed.apply_lag_seconds,
        later.apply_lag_seconds
    );
    let (ok, out, _) = common::fencelog(&["status", "--server", pair[1].api()]);
    assert!(ok);
    assert!(out.contains("error          the applier stopped"), "{out}");
    for node in &mut pair {
        node.stop(WAIT).await.unwrap();
    }
}

/// A standby promoted while its follower is writing a batch into the local log: the write
/// runs on a blocking thread that aborting the follower does not stop, so the term's recovery
/// waits for it rather than fetch the same batch beside it (it failed with `LogGap` and the
/// node waited a TTL). Fail points make the follower's write and the recovery slow so that they
/// would overlap.
#[tokio::test(flavor = "multi_thread")]
async fn a_promotion_waits_for_the_followers_write_before_it_recovers() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let slow = [(
        "FAILPOINTS",
        "follower::slow_write=sleep(1500);primary::slow_recovery=sleep(3000)",
    )];
    let env = PairEnv {
        standby: &slow,
        ..PairEnv::default()
    };
    let mut pair = start_pair_with(&etcd, dir.path(), false, env).await;
    let (ok, _, err) = common::fencelog(&["append", "--server", pair[0].api(), "k", "v"]);
    assert!(ok, "{err}");
    // The standby's follower is now asleep inside its write of seq 1.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, out, err) = common::fencelog(&["promote", "--server", pair[1].api(), "--force"]);
    assert!(
        ok,
        "the promotion failed: {out}\n{err}\n{}",
        pair[1].log_text()
    );
    pair[1].wait_for("primary", None, WAIT).await.unwrap();
    let (ok, out, err) = common::fencelog(&["append", "--server", pair[1].api(), "k2", "v2"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "seq 2");
    let log = pair[1].log_text();
    assert!(!log.contains("could not start the term"), "{log}");
    for node in &mut pair {
        node.stop(WAIT).await.unwrap();
    }
}

/// Two clusters on one etcd, both trimming every 50 ms under load, one of them compacting
/// etcd's (shared) revision history, which compacts the other's too: the standbys of both
/// still follow every record without a snapshot they did not need (a read
/// or watch at a compacted revision is read again by key range), and both histories hold.
#[tokio::test(flavor = "multi_thread")]
async fn two_clusters_trimming_and_compacting_one_etcd_both_keep_their_promises() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let retention = [
        "--lease-ttl",
        "2",
        "--retain-records",
        "2000",
        "--retain-seconds",
        "0",
        "--trim-interval-ms",
        "50",
    ];
    let mut nodes = Vec::new();
    for cluster in ["east", "west"] {
        for (role, name) in [("primary", "a"), ("standby", "b")] {
            // West leaves compaction to east: the way to share an etcd (OPERATIONS.md).
            let mut args = retention.to_vec();
            if cluster == "west" {
                args.extend(["--etcd-compaction", "false"]);
            }
            let mut spec = common::daemon_spec(&etcd, dir.path(), role, name, &args, &[]);
            spec.cluster = cluster.to_owned();
            spec.data_dir = dir.path().join(format!("{cluster}-{name}"));
            spec.log = dir.path().join(format!("{cluster}-{name}.log"));
            let mut node = NodeProcess::spawn(spec).unwrap();
            let (role, state) = if role == "primary" {
                ("primary", None)
            } else {
                ("standby", Some("watching"))
            };
            node.wait_for(role, state, WAIT).await.unwrap();
            nodes.push(node);
        }
    }
    let loads: Vec<_> = ["east", "west"]
        .iter()
        .map(|cluster| {
            let acked = dir.path().join(format!("{cluster}.tsv"));
            let child = Command::new(env!("CARGO_BIN_EXE_fencelog"))
                .args(["load", "--etcd", etcd.endpoint(), "--cluster", cluster])
                .args(["--records", "30000", "--concurrency", "8", "--acked-out"])
                .arg(&acked)
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(acked.with_extension("log")).unwrap())
                .spawn()
                .unwrap();
            (
                Load {
                    child,
                    log: acked.with_extension("log"),
                },
                acked,
            )
        })
        .collect();
    let mut acked_files = Vec::new();
    for (load, acked) in loads {
        finish_load(load);
        acked_files.push(acked);
    }
    for (pair, (cluster, acked)) in nodes
        .chunks(2)
        .zip(["east", "west"].iter().zip(&acked_files))
    {
        let end = pair[0].status().await.unwrap().committed_seq;
        reached(&pair[1], end, |s| s.applied_seq).await;
        let compactions = metric(pair[0].metrics_addr(), "fencelog_compactions_total").await;
        match *cluster {
            "east" => assert!(compactions > 0.0, "east's primary never compacted"),
            _ => assert_eq!(
                compactions, 0.0,
                "west compacted with --etcd-compaction false"
            ),
        }
        let snapshots = metric(pair[1].metrics_addr(), "fencelog_snapshots_installed_total").await;
        assert_eq!(snapshots, 0.0, "{cluster}'s standby needed a snapshot");
        let (ok, out, err) = fencelog(&[
            "check",
            "--etcd",
            etcd.endpoint(),
            "--cluster",
            cluster,
            "--acked",
            acked.to_str().unwrap(),
        ]);
        assert!(ok, "{cluster}: {out}{err}");
        assert!(out.contains("no violations"), "{cluster}: {out}");
        let primary = pair[0].status().await.unwrap();
        let standby = pair[1].status().await.unwrap();
        assert_eq!(primary.committed_seq, 30_000, "{cluster}");
        assert_eq!(standby.applied_seq, primary.committed_seq, "{cluster}");
    }
    // Equal states: the standby's digest is the primary's.
    for node in &mut nodes {
        node.stop(WAIT).await.unwrap();
    }
    for cluster in ["east", "west"] {
        let digest = |name: &str| {
            let data = dir.path().join(format!("{cluster}-{name}"));
            let (ok, out, err) =
                fencelog(&["inspect", "--data-dir", data.to_str().unwrap(), "--json"]);
            assert!(ok, "{err}");
            let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
            json["state_digest"].clone()
        };
        assert_eq!(digest("a"), digest("b"), "{cluster}");
    }
}

/// A standby the log was trimmed past, whose primary's state is behind what etcd holds (its
/// applier stopped, as a new primary's may still be catching up), takes its snapshot from a
/// standby whose state is far enough ahead: the primary refuses one it could not continue.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_the_primary_cannot_serve_comes_from_a_standby_far_enough_ahead() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let stalled = [("FAILPOINTS", "applier::step_fails=return")];
    let mut primary = common::daemon_with_env(&etcd, dir.path(), "primary", "a", &[], &stalled);
    primary.wait_for("primary", None, WAIT).await.unwrap();
    let mut ahead = daemon(&etcd, dir.path(), "standby", "b", &[]);
    ahead.wait_for("standby", None, WAIT).await.unwrap();
    let (ok, out, err) = fencelog(&[
        "load",
        "--server",
        primary.api(),
        "--records",
        "2000",
        "--concurrency",
        "4",
    ]);
    assert!(ok, "{out}{err}");
    reached(&ahead, 2000, |s| s.applied_seq).await;

    // Trim by hand, as the primary's own trimmer would once past its state: every batch
    // below the first one at or after seq 1001.
    let client = common::client(&etcd).await;
    let layout = fencelog::keys::KeyLayout::new(&CLUSTER.parse().unwrap());
    let mut kv = client.kv_client();
    let batches = kv
        .get(
            layout.batches_prefix(),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .unwrap();
    let kept = batches
        .kvs()
        .iter()
        .map(|kv| layout.parse_batch_key(kv.key()).unwrap())
        .find(|seq| seq.0 > 1000)
        .unwrap();
    kv.delete(
        layout.batches_prefix(),
        Some(etcd_client::DeleteOptions::new().with_range(layout.batch(kept))),
    )
    .await
    .unwrap();
    kv.put(layout.trimmed(), kept.0.to_string(), None)
        .await
        .unwrap();

    let mut late = daemon(&etcd, dir.path(), "standby", "c", &[]);
    reached(&late, 2000, |s| s.applied_seq).await;
    assert_eq!(
        metric(late.metrics_addr(), "fencelog_snapshots_installed_total").await,
        1.0
    );
    assert!(
        late.log_text()
            .contains("this node cannot serve a snapshot; asking the next"),
        "the primary was asked first and refused"
    );
    assert_eq!(primary.status().await.unwrap().applied_seq, 0);
    for node in [&mut late, &mut ahead, &mut primary] {
        node.stop(WAIT).await.unwrap();
    }
}
