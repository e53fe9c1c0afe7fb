//! The daemons, the API and the CLI end to end: real `fencelog primary` / `fencelog standby`
//! processes against a real etcd, driven through the CLI exactly as a person (or an external
//! harness) would.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{daemon, fencelog, http_get, sample, scrape, CLUSTER};
use fencelog::api::proto;
use fencelog::node_process::NodeProcess;
use fencelog::record::{Record, Seq};

const STARTUP: Duration = Duration::from_secs(30);

/// etcd keeps only the newest 100 records, trimmed every 100 ms.
const QUICK_TRIMS: [&str; 6] = [
    "--retain-records",
    "100",
    "--retain-seconds",
    "0",
    "--trim-interval-ms",
    "100",
];

/// A real etcd and a directory for the daemons' stores and logs; both go when it drops, after
/// the daemons (declared later, dropped first).
struct Cluster {
    etcd: common::EtcdProcess,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        Cluster {
            etcd: common::etcd().await,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A `primary` daemon, once it leads.
    async fn primary(&self, name: &str, args: &[&str]) -> NodeProcess {
        let mut node = daemon(&self.etcd, self.dir.path(), "primary", name, args);
        node.wait_for("primary", None, STARTUP).await.unwrap();
        node
    }

    /// A `primary` daemon with extra environment variables, once it leads.
    async fn primary_with_env(&self, name: &str, env: &[(&str, &str)]) -> NodeProcess {
        let dir = self.dir.path();
        let mut node = common::daemon_with_env(&self.etcd, dir, "primary", name, &[], env);
        node.wait_for("primary", None, STARTUP).await.unwrap();
        node
    }

    /// A `standby` daemon, once it follows caught up.
    async fn standby(&self, name: &str, args: &[&str]) -> NodeProcess {
        let mut node = daemon(&self.etcd, self.dir.path(), "standby", name, args);
        node.wait_for("standby", Some("watching"), STARTUP)
            .await
            .unwrap();
        node
    }
}

/// `fencelog load` of `records` records into the node at `server`, 4 workers; must succeed.
fn load(server: &str, records: &str) {
    let (ok, out, err) = fencelog(&[
        "load",
        "--server",
        server,
        "--records",
        records,
        "--concurrency",
        "4",
    ]);
    assert!(ok, "{out}\n{err}");
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn append_read_get_and_status_work_through_the_cli() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &[]).await;
    let api = primary.api().to_owned();

    let (ok, out, err) = fencelog(&["append", "--server", &api, "color", "blue"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "seq 1");
    let (ok, out, err) = fencelog(&[
        "append",
        "--etcd",
        cluster.etcd.endpoint(),
        "--cluster",
        CLUSTER,
        "shape",
        "round",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "seq 2");

    let (ok, out, err) = fencelog(&["read", "--server", &api, "--from", "1", "--format", "tsv"]);
    assert!(ok, "{err}");
    let blue = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(b"blue"));
    let round = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(b"round"));
    assert_eq!(
        lines(&out),
        [format!("1\tcolor\t{blue}"), format!("2\tshape\t{round}")]
    );

    let (ok, out, err) = fencelog(&["get", "--server", &api, "--min-seq", "2", "shape"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "round");

    let (ok, out, err) = fencelog(&["status", "--server", &api, "--json"]);
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(status["node"], "alpha");
    assert_eq!(status["role"], "primary");
    assert_eq!(status["state"], "promoted");
    assert_eq!(status["committed_seq"], 2);
    assert_eq!(status["applied_seq"], 2);
    assert_eq!(status["lag_records"], 0);
    assert_eq!(status["leader"], api.as_str());
    assert!(status["epoch"].as_u64().unwrap() > 0);
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_refuses_appends_and_names_the_leader() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &[]).await;
    let mut standby = cluster.standby("beta", &[]).await;

    let (ok, out, err) = fencelog(&["append", "--server", standby.api(), "k", "v"]);
    assert!(!ok, "a standby acknowledged an append: {out}");
    assert_eq!(lines(&err).len(), 1, "{err}");
    assert!(err.contains("not the primary"), "{err}");
    assert!(err.contains(primary.api()), "{err}");

    let (ok, out, _) = fencelog(&["status", "--server", standby.api(), "--json"]);
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(status["role"], "standby");
    assert_eq!(status["state"], "watching");
    assert_eq!(status["leader"], primary.api());
    assert_eq!(status["leader_node"], "alpha");
    let (ok, out, _) = fencelog(&["status", "--server", standby.api()]);
    assert!(ok);
    assert!(
        out.contains(&format!("leader         alpha ({})", primary.api())),
        "{out}"
    );
    standby.stop(STARTUP).await.unwrap();
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn load_writes_exactly_the_acknowledged_records_and_read_agrees() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &[]).await;
    let acked = cluster.dir.path().join("acked.tsv");
    let (ok, out, err) = fencelog(&[
        "load",
        "--etcd",
        cluster.etcd.endpoint(),
        "--cluster",
        CLUSTER,
        "--records",
        "3000",
        "--value-size",
        "200",
        "--concurrency",
        "4",
        "--acked-out",
        acked.to_str().unwrap(),
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("acknowledged  3000 records (0 failed)"),
        "{out}"
    );
    assert!(out.contains("records/s"), "{out}");
    assert!(out.contains("p99"), "{out}");

    let acked = std::fs::read_to_string(&acked).unwrap();
    let (ok, read, err) = fencelog(&[
        "read",
        "--server",
        primary.api(),
        "--from",
        "1",
        "--format",
        "tsv",
    ]);
    assert!(ok, "{err}");
    let mut acked_lines = lines(&acked);
    acked_lines.sort_by_key(|l| l.split('\t').next().unwrap().parse::<u64>().unwrap());
    assert_eq!(acked_lines, lines(&read));
    let keys: std::collections::HashSet<_> = acked_lines
        .iter()
        .map(|l| l.split('\t').nth(1).unwrap())
        .collect();
    assert_eq!(keys.len(), 3000, "keys are unique per run");
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_resigns_so_a_failover_standby_takes_over_before_the_lease_expires() {
    let cluster = Cluster::start().await;
    // A TTL far longer than the wait below: only a resignation explains a prompt takeover.
    let ttl = ["--lease-ttl", "60"];
    let mut primary = cluster.primary("alpha", &ttl).await;
    let mut standby = cluster
        .standby("beta", &[&ttl[..], &["--failover"]].concat())
        .await;
    let (ok, _, err) = fencelog(&["append", "--server", primary.api(), "k", "v1"]);
    assert!(ok, "{err}");

    let exit = primary.stop(STARTUP).await.unwrap();
    assert!(
        exit.success(),
        "the primary exited with {exit}: {}",
        primary.log_text()
    );
    let promoted = standby
        .wait_for("primary", None, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(promoted.committed_seq >= 1);
    let (ok, out, err) = fencelog(&["append", "--server", standby.api(), "k", "v2"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("seq {}", promoted.committed_seq + 1));
    let log = primary.log_text();
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("node state: the primary shut down"), "{log}");
    standby.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_as_prometheus_text_and_move_with_appends() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &[]).await;
    let metrics = primary.metrics_addr().to_owned();
    assert_eq!(http_get(&metrics, "/healthz").await.0, 200);
    assert_eq!(http_get(&metrics, "/readyz").await.0, 200);

    let before = scrape(&metrics).await;
    for name in [
        "fencelog_batch_bytes",
        "fencelog_commit_seconds",
        "fencelog_seal_seconds",
        "fencelog_apply_seconds",
        "fencelog_etcd_errors_total",
        "fencelog_checksum_failures_total",
        "fencelog_watch_reconnects_total",
        "fencelog_commit_refusals_total",
    ] {
        assert!(before.docs.contains_key(name), "{name} is not exported");
    }

    let mut client = primary.client().await.unwrap();
    let records = (0..10).map(|i| Record::put(format!("k{i}"), "v")).collect();
    client.append(records).await.unwrap();
    client
        .get(b"k9".to_vec(), Seq(10), Duration::from_secs(10))
        .await
        .unwrap();
    let after = scrape(&metrics).await;
    let moved = |name: &str| sample(&after, name) - sample(&before, name);
    assert_eq!(moved("fencelog_appends_total"), 1.0);
    assert_eq!(moved("fencelog_appended_records_total"), 10.0);
    assert!(moved("fencelog_commits_total") >= 1.0);
    assert_eq!(sample(&after, "fencelog_committed_seq"), 10.0);
    assert_eq!(sample(&after, "fencelog_applied_seq"), 10.0);
    let promoted = after
        .samples
        .iter()
        .find(|s| s.metric == "fencelog_state" && s.labels.get("state") == Some("promoted"));
    assert!(matches!(promoted.unwrap().value, prometheus_parse::Value::Gauge(v) if v == 1.0));
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_come_from_the_config_file_and_env_and_flags_win() {
    let cluster = Cluster::start().await;
    let port = |()| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (listen, metrics) = (port(()), port(()));
    let config = cluster.dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "cluster = \"{CLUSTER}\"\nnode = \"from-file\"\ndata-dir = \"{}\"\netcd = [\"{}\"]\nlisten = \"{listen}\"\nlease-ttl = 7\nlog-format = \"json\"\n",
            cluster.dir.path().join("data").display(),
            cluster.etcd.endpoint()
        ),
    )
    .unwrap();
    let log_path = cluster.dir.path().join("node.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fencelog"))
        .args([
            "primary",
            "--config",
            config.to_str().unwrap(),
            "--node",
            "from-flag",
        ])
        .env("FENCELOG_METRICS", metrics.to_string())
        .env("FENCELOG_NODE", "from-env")
        .stderr(log)
        .spawn()
        .unwrap();
    let api = listen.to_string();
    let mut status = None;
    for _ in 0..300 {
        let (ok, out, _) = fencelog(&["status", "--server", &api, "--json"]);
        if ok {
            let s: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
            if s["role"] == "primary" {
                status = Some(s);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.expect("the daemon leads on the address from the file");
    assert_eq!(status["node"], "from-flag", "a flag wins over env and file");
    assert_eq!(
        http_get(&metrics.to_string(), "/healthz").await.0,
        200,
        "metrics address from env"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap())
        .unwrap_or_else(|e| panic!("log-format json from the file: {e}\n{log}"));
    assert!(first["fields"]["message"].is_string(), "{first}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_whose_appends_go_unanswered_gives_up_instead_of_hanging() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &[]).await;
    let acked = cluster.dir.path().join("acked.tsv");
    let load = std::process::Command::new(env!("CARGO_BIN_EXE_fencelog"))
        .args(["load", "--server", primary.api(), "--records", "10000000"])
        .args(["--concurrency", "2", "--append-timeout", "1"])
        .args(["--failover-timeout", "2", "--acked-out"])
        .arg(&acked)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Frozen once appends are acknowledged: it keeps the connection and answers nothing.
    let deadline = std::time::Instant::now() + STARTUP;
    while std::fs::metadata(&acked).map_or(0, |m| m.len()) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no append acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    primary.signal(libc::SIGSTOP).unwrap();
    let output = common::output_within(load, Duration::from_secs(60));
    primary.signal(libc::SIGCONT).unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(!output.status.success(), "{out}{err}");
    assert!(out.contains("deadlineexceeded"), "{out}{err}");
    assert!(err.contains("no primary reachable"), "{out}{err}");

    // What it wrote as acknowledged is in the log, as it says.
    let acked = std::fs::read_to_string(&acked).unwrap();
    let last = acked
        .lines()
        .filter_map(|l| l.split('\t').next()?.parse::<u64>().ok())
        .max();
    let committed = primary.status().await.unwrap().committed_seq;
    assert!(
        last.is_some_and(|seq| seq <= committed),
        "{last:?} > {committed}"
    );
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_flags_and_an_unreachable_etcd_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = format!(
        "primary --cluster c --node a --data-dir {} --etcd http://127.0.0.1:1",
        dir.path().join("data").display()
    );
    let secured = dir.path().join("secured.toml");
    std::fs::write(&secured, "[etcd-security]\netcd-user = \"alpha\"\n").unwrap();
    let five = dir.path().join("five.toml");
    std::fs::write(&five, "cluster = \"c\"\nlease-ttl = \"five\"\n").unwrap();
    let one_etcd = dir.path().join("one-etcd.toml");
    std::fs::write(&one_etcd, "etcd = \"http://127.0.0.1:1\"\n").unwrap();
    let a_file = dir.path().join("a-file");
    std::fs::write(&a_file, "mine").unwrap();
    let cases = [
        ("primary --bogus".to_owned(), "--bogus"),
        (
            "primary --clustr c".to_owned(),
            "tip: a similar argument exists: '--cluster'",
        ),
        (
            "primary".to_owned(),
            "--cluster, --node, --data-dir, --etcd are required",
        ),
        (
            format!("primary --config {}", five.display()),
            "line 2 (lease-ttl): invalid type: string \"five\", expected u64",
        ),
        (
            // A single endpoint as a string: taken, so only the others are missing.
            format!("primary --config {}", one_etcd.display()),
            "--cluster, --node, --data-dir are required",
        ),
        (daemon.replace("--cluster c ", ""), "--cluster is required"),
        (
            daemon.replace("--cluster c", "--cluster ../x"),
            "invalid cluster",
        ),
        (
            daemon.replace("--cluster c", &format!("--cluster {}", "x".repeat(65))),
            "invalid cluster",
        ),
        (daemon.replace("--node a", "--node a/b"), "invalid node"),
        (daemon.replace("--node a", "--node é"), "invalid node"),
        (daemon.replace("--node a", "--node .."), "invalid node"),
        (
            // Refused before etcd is waited for, and left as it was (checked below).
            daemon.replace(
                &dir.path().join("data").display().to_string(),
                &a_file.display().to_string(),
            ),
            "a-file is a file, not a directory: give the node a new or empty directory",
        ),
        (
            format!("{daemon} --listen nowhere"),
            "not a HOST:PORT address",
        ),
        (format!("{daemon} --lease-ttl 1"), "lease_ttl"),
        (
            format!("{daemon} --listen 127.0.0.1:0 --metrics 127.0.0.1:0"),
            "error: cannot reach etcd at http://127.0.0.1:1: connection refused",
        ),
        (
            format!("{daemon} --etcd-user alpha"),
            "--etcd-user needs a password",
        ),
        (
            format!("{daemon} --etcd-user alpha --etcd-password-file /nonexistent/pw"),
            "cannot read the secret file /nonexistent/pw",
        ),
        (
            format!("{daemon} --config {}", secured.display()),
            "--etcd-user needs a password",
        ),
        (format!("{daemon} --etcd-cert c.pem"), "go together"),
        (
            format!("{daemon} --listen 0.0.0.0:0"),
            "is not a loopback address",
        ),
        (format!("{daemon} --metrics 0.0.0.0:0"), "pass --insecure"),
        (
            format!("{daemon} --etcd-cert c.pem --etcd-key k.pem"),
            "--etcd-cert needs --etcd-ca",
        ),
        (
            format!(
                "{daemon} --etcd-ca /nonexistent/ca.pem --listen 127.0.0.1:0 --metrics 127.0.0.1:0"
            ),
            "cannot read the etcd CA /nonexistent/ca.pem",
        ),
        (
            "append --etcd http://127.0.0.1:1 --cluster c --wait 0 k v".to_owned(),
            "error:",
        ),
        (
            "append --server 127.0.0.1:1 --wait 0 k v".to_owned(),
            "cannot reach the node at 127.0.0.1:1",
        ),
        ("append k v".to_owned(), "--server"),
        (
            "read --server 127.0.0.1:1 --from 0".to_owned(),
            "at least 1",
        ),
    ];
    for (command, expected) in cases {
        let args: Vec<&str> = command.split_whitespace().collect();
        let (ok, _, err) = fencelog(&args);
        assert!(!ok, "{command} succeeded");
        // A daemon waiting for etcd logs it first (at WARN); the error itself is one line.
        let said: Vec<&str> = lines(&err)
            .into_iter()
            .filter(|line| !line.contains(" WARN "))
            .collect();
        assert_eq!(
            said.len(),
            1,
            "{command} printed more than one line:\n{err}"
        );
        assert!(err.contains(expected), "{command}: {err}");
    }
    assert_eq!(std::fs::read_to_string(&a_file).unwrap(), "mine");
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_oversized_messages_get_errors_and_the_node_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &[]).await;

    for addr in [primary.api(), primary.metrics_addr()] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let garbage: Vec<u8> = (0..64 * 1024u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        // The server may hang up mid-write; both outcomes are fine, a crash is not.
        let _ = stream.write_all(&garbage).await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink)).await;
    }

    let channel = tonic::transport::Channel::from_shared(format!("http://{}", primary.api()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = proto::wal_client::WalClient::new(channel).max_encoding_message_size(64 << 20);
    let huge = proto::AppendRequest {
        records: vec![proto::Record {
            key: b"k".to_vec(),
            value: vec![7; 8 << 20],
            delete: false,
        }],
        request_id: 0,
    };
    let refused = raw.append(huge).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused}");

    let mut client = primary.client().await.unwrap();
    let over_limit = Record::put("k", vec![1u8; 1024 * 1024 + 1]);
    let refused = client.append(vec![over_limit]).await.unwrap_err();
    assert!(refused.to_string().contains("over the limit"), "{refused}");
    let empty = client.append(vec![]).await.unwrap_err();
    assert!(empty.to_string().contains("at least one record"), "{empty}");

    let ack = client
        .append(vec![Record::put("still", "alive")])
        .await
        .unwrap();
    assert_eq!(ack.first_seq, Seq(1));
    assert_eq!(http_get(primary.metrics_addr(), "/healthz").await.0, 200);
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn records_at_the_limits_are_committed_and_one_byte_past_them_refused() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &[]).await;
    let mut client = primary.client().await.unwrap();
    let limits = fencelog::limits::Limits::default();
    let (key_limit, value_limit) = (limits.max_key_bytes, limits.max_value_bytes);
    let accepted = [
        (
            "a key at the limit",
            Record::put(vec![b'k'; key_limit], "v"),
        ),
        (
            "a value at the limit",
            Record::put("big", vec![3u8; value_limit]),
        ),
        ("an empty value", Record::put("empty", "")),
        ("an empty key", Record::put("", "v")),
        ("a delete", Record::delete("empty")),
    ];
    let refused = [
        (
            "a key one byte past the limit",
            Record::put(vec![b'k'; key_limit + 1], "v"),
            "record key is 4097 bytes, over the limit of 4096",
        ),
        (
            "a value one byte past the limit",
            Record::put("v", vec![3u8; value_limit + 1]),
            "over the limit",
        ),
        (
            "a delete with a value",
            Record {
                op: fencelog::record::Op::Delete,
                key: b"d".to_vec(),
                value: b"v".to_vec(),
            },
            "delete",
        ),
    ];
    for (case, record, reason) in refused {
        let error = client.append(vec![record]).await.unwrap_err();
        assert!(error.to_string().contains(reason), "{case}: {error}");
    }
    for (case, record) in accepted {
        let ack = client
            .append(vec![record.clone()])
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let read = client
            .get(record.key.clone(), ack.last_seq, Duration::from_secs(10))
            .await
            .unwrap();
        let expected = (record.op == fencelog::record::Op::Put).then_some(record.value);
        assert_eq!(read.0, expected, "{case}");
    }
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_append_stream_answers_every_request_with_its_own_seqs() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &[]).await;
    let mut client = primary.client().await.unwrap();
    let requests: Vec<_> = (0..50u64)
        .map(|id| proto::AppendRequest {
            records: (0..4)
                .map(|i| Record::put(format!("s{id}-{i}"), "v").into())
                .collect(),
            request_id: id,
        })
        .collect();
    let mut answers = client
        .append_stream(tokio_stream::iter(requests))
        .await
        .unwrap();
    let mut acked = HashMap::new();
    while let Some(answer) = answers.message().await.unwrap() {
        match answer.outcome {
            Some(proto::append_stream_response::Outcome::Ack(ack)) => {
                assert_eq!(ack.last_seq - ack.first_seq, 3);
                acked.insert(answer.request_id, ack.first_seq);
            }
            other => panic!("request {} failed: {other:?}", answer.request_id),
        }
    }
    assert_eq!(acked.len(), 50);
    let mut firsts: Vec<_> = acked.values().copied().collect();
    firsts.sort_unstable();
    assert_eq!(firsts, (0..50).map(|i| 1 + 4 * i).collect::<Vec<_>>());
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn promote_is_refused_while_the_primary_lives_and_forced_deposes_it() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &["--lease-ttl", "60"]).await;
    let mut standby = cluster.standby("beta", &[]).await;

    let (ok, _, err) = fencelog(&["promote", "--server", standby.api()]);
    assert!(!ok);
    assert!(err.contains("alpha") && err.contains("force"), "{err}");
    let (ok, out, err) = fencelog(&["promote", "--server", standby.api(), "--force"]);
    assert!(ok, "{err}");
    assert!(out.contains("leading as epoch"), "{out}");
    standby.wait_for("primary", None, STARTUP).await.unwrap();
    let (ok, out, err) = fencelog(&["append", "--server", standby.api(), "after", "promotion"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "seq 1");
    let (ok, _, err) = fencelog(&["append", "--server", primary.api(), "deposed", "primary"]);
    assert!(!ok, "the deposed primary acknowledged an append");
    assert!(
        err.contains("fenced") || err.contains("not the primary"),
        "{err}"
    );
    primary.wait_for("standby", None, STARTUP).await.unwrap();
    let (ok, _, err) = fencelog(&["append", "--server", primary.api(), "deposed", "primary"]);
    assert!(!ok, "the deposed primary acknowledged an append");
    assert!(err.contains(standby.api()), "{err}");
    standby.stop(STARTUP).await.unwrap();
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn get_with_a_min_seq_not_reached_fails_after_its_timeout() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &[]).await;
    let (ok, _, err) = fencelog(&[
        "get",
        "--server",
        primary.api(),
        "--min-seq",
        "1000",
        "--timeout",
        "1",
        "k",
    ]);
    assert!(!ok);
    assert!(err.contains("not yet seq 1000"), "{err}");
    let (ok, _, err) = fencelog(&["get", "--server", primary.api(), "missing"]);
    assert!(!ok);
    assert!(err.contains("not found"), "{err}");
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn inspect_json_shows_equal_digests_for_a_primary_and_its_standby() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &[]).await;
    let mut standby = cluster.standby("beta", &[]).await;
    load(primary.api(), "2000");
    standby
        .client()
        .await
        .unwrap()
        .get(b"none".to_vec(), Seq(2000), Duration::from_secs(30))
        .await
        .unwrap();
    assert!(standby.stop(STARTUP).await.unwrap().success());
    assert!(primary.stop(STARTUP).await.unwrap().success());

    let inspect = |node: &fencelog::node_process::NodeProcess| {
        let (ok, out, err) = fencelog(&[
            "inspect",
            "--data-dir",
            node.data_dir().to_str().unwrap(),
            "--json",
        ]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()
    };
    let (p, s) = (inspect(&primary), inspect(&standby));
    assert_eq!(p["last_applied_seq"], 2000);
    assert_eq!(p["received_seq"], 2000);
    assert_eq!(p["keys"], 2000);
    assert!(p["epoch"].as_u64().unwrap() > 0);
    assert_eq!(p["state_digest"].as_str().unwrap().len(), 16);
    for field in [
        "last_applied_seq",
        "received_seq",
        "keys",
        "state_digest",
        "epoch",
    ] {
        assert_eq!(p[field], s[field], "{field}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_primary_waits_for_the_leadership_and_says_so() {
    let cluster = Cluster::start().await;
    let ttl = ["--lease-ttl", "2"];
    let mut first = cluster.primary("alpha", &ttl).await;
    let (ok, _, err) = fencelog(&["append", "--server", first.api(), "k", "v"]);
    assert!(ok, "{err}");
    let mut second = daemon(&cluster.etcd, cluster.dir.path(), "primary", "beta", &ttl);
    second
        .wait_for("standby", Some("watching"), STARTUP)
        .await
        .unwrap();
    // Two and a half lease TTLs: the wait goes round once per TTL, and says so only once.
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    let log = second.log_text();
    assert_eq!(
        log.matches("another node leads; waiting for its key to go")
            .count(),
        1,
        "{log}"
    );
    assert_eq!(
        first.status().await.unwrap().role,
        "primary",
        "the first keeps its leadership"
    );

    first.kill();
    let took_over = second.wait_for("primary", None, STARTUP).await.unwrap();
    assert_eq!(
        took_over.committed_seq, 1,
        "the acknowledged record survives"
    );
    second.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_started_after_a_failover_standby_wins_the_first_election() {
    let cluster = Cluster::start().await;
    // A grace of 5 s: time enough for the primary's process to start and take the key.
    let args = ["--lease-ttl", "5", "--failover"];
    let mut standby = daemon(&cluster.etcd, cluster.dir.path(), "standby", "b", &args);
    standby
        .wait_for("standby", Some("watching"), STARTUP)
        .await
        .unwrap();
    let mut primary = cluster.primary("a", &["--lease-ttl", "3"]).await;
    // Past the standby's grace: it saw the primary lead, so it waits for it to go.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(standby.status().await.unwrap().role, "standby");
    assert_eq!(primary.status().await.unwrap().role, "primary");
    let log = standby.log_text();
    assert!(
        log.contains("campaigning unless a primary takes the leadership"),
        "{log}"
    );
    primary.kill();
    standby.wait_for("primary", None, STARTUP).await.unwrap();
    standby.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_append_through_etcd_before_any_primary_waits_for_one_and_is_committed_once() {
    let cluster = Cluster::start().await;
    let append = std::process::Command::new(env!("CARGO_BIN_EXE_fencelog"))
        .args([
            "append",
            "--etcd",
            cluster.etcd.endpoint(),
            "--cluster",
            CLUSTER,
        ])
        .args(["--wait", "30", "k", "v"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut primary = cluster.primary("a", &[]).await;
    let output = common::output_within(append, Duration::from_secs(60));
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{out}{err}");
    assert_eq!(out.trim(), "seq 1");
    assert_eq!(
        err.trim(),
        format!(
            "nobody leads cluster {CLUSTER}: no leader key in etcd: waiting up to 30 s (--wait)"
        )
    );
    assert_eq!(primary.status().await.unwrap().committed_seq, 1);
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_of_appends_over_the_limits_gets_the_nodes_refusal_and_exits_non_zero() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("a", &[]).await;
    let (ok, out, err) = fencelog(&[
        "load",
        "--server",
        primary.api(),
        "--records",
        "64",
        "--value-size",
        "700000",
    ]);
    assert!(!ok, "{out}{err}");
    assert!(err.contains("the node refuses these appends"), "{err}");
    assert!(!err.contains("h2 protocol error"), "{err}");
    assert!(out.contains("(64 failed)"), "{out}");
    assert_eq!(primary.status().await.unwrap().committed_seq, 0);
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failover_standby_alone_in_a_new_cluster_leads_after_its_grace() {
    let cluster = Cluster::start().await;
    let started = std::time::Instant::now();
    let mut standby = daemon(
        &cluster.etcd,
        cluster.dir.path(),
        "standby",
        "b",
        &["--lease-ttl", "2", "--failover"],
    );
    standby.wait_for("primary", None, STARTUP).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "it led before its grace of one lease TTL passed"
    );
    standby.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn read_streams_records_whose_total_is_far_over_one_message() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &[]).await;
    let mut client = primary.client().await.unwrap();
    for i in 0..4u8 {
        let record = Record::put(format!("big{i}"), vec![i; 1024 * 1024]);
        client.append(vec![record]).await.unwrap();
    }
    let mut stream = client.read(Seq(1), None).await.unwrap();
    let mut seqs = Vec::new();
    while let Some(chunk) = stream.next_chunk().await.unwrap() {
        assert!(chunk.len() <= 1, "a message over the size limit");
        seqs.extend(chunk.iter().map(|(seq, record)| {
            assert_eq!(record.value.len(), 1024 * 1024);
            seq.0
        }));
    }
    assert_eq!(seqs, [1, 2, 3, 4]);
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bootstrap_installs_the_primarys_state_and_the_node_follows_from_there() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &QUICK_TRIMS).await;
    load(primary.api(), "3000");
    let data = cluster.dir.path().join("beta");
    let (ok, out, err) = fencelog(&[
        "bootstrap",
        "--etcd",
        cluster.etcd.endpoint(),
        "--cluster",
        CLUSTER,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("installed the state of"), "{out}");
    let (ok, out, err) = fencelog(&["inspect", "--data-dir", data.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let installed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // The state as of the primary's applied seq (unique keys: one key per record).
    assert!(installed["last_applied_seq"].as_u64().unwrap() > 0);
    assert_eq!(installed["keys"], installed["last_applied_seq"]);

    let mut standby = cluster.standby("beta", &[]).await;
    let (ok, _, err) = fencelog(&["append", "--server", primary.api(), "after", "bootstrap"]);
    assert!(ok, "{err}");
    standby
        .client()
        .await
        .unwrap()
        .get(b"after".to_vec(), Seq(3001), Duration::from_secs(20))
        .await
        .unwrap();
    let status = standby.status().await.unwrap();
    assert_eq!(
        (status.applied_seq, status.state.as_str()),
        (3001, "watching")
    );
    standby.stop(STARTUP).await.unwrap();
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_below_the_local_log_names_the_oldest_seq_the_node_holds() {
    let cluster = Cluster::start().await;
    // The local log keeps 500 records, and only what etcd no longer holds may go from it.
    let args = [&["--local-retain-records", "500"][..], &QUICK_TRIMS].concat();
    let mut primary = cluster.primary("alpha", &args).await;
    load(primary.api(), "3000");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let err = loop {
        let (ok, _, err) = fencelog(&[
            "read",
            "--server",
            primary.api(),
            "--from",
            "1",
            "--to",
            "1",
        ]);
        if !ok {
            break err;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the local log was never trimmed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(err.contains("seq 1 is not in the local log"), "{err}");
    let (ok, out, err) = fencelog(&[
        "read",
        "--server",
        primary.api(),
        "--from",
        "2900",
        "--format",
        "tsv",
    ]);
    assert!(ok, "{err}");
    assert_eq!(lines(&out).len(), 101);
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_with_the_same_node_name_refuses_to_start_and_names_the_first() {
    let cluster = Cluster::start().await;
    let mut first = cluster.primary("alpha", &[]).await;
    let other_dir = tempfile::tempdir().unwrap();
    for role in ["primary", "standby"] {
        let mut impostor = daemon(&cluster.etcd, other_dir.path(), role, "alpha", &[]);
        let exit = impostor.wait_exit(STARTUP).await.unwrap();
        assert!(!exit.success(), "a second {role} named alpha ran");
        let log = impostor.log_text();
        assert!(
            log.contains(&format!(
                "node alpha of cluster {CLUSTER} is already running, at {}",
                first.api()
            )),
            "{log}"
        );
    }
    let (ok, out, err) = fencelog(&["append", "--server", first.api(), "k", "v"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "seq 1");
    let status = first.status().await.unwrap();
    assert_eq!(
        (status.role.as_str(), status.leader.as_deref()),
        ("primary", Some(first.api()))
    );

    // Once the first stops, its name is free at once.
    first.stop(STARTUP).await.unwrap();
    let mut second = daemon(&cluster.etcd, other_dir.path(), "primary", "alpha", &[]);
    second.wait_for("primary", None, STARTUP).await.unwrap();
    second.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_killed_and_restarted_on_its_own_store_takes_its_name_back_at_once() {
    let cluster = Cluster::start().await;
    let mut first = cluster.primary("alpha", &["--lease-ttl", "20"]).await;
    first.kill();
    first.start().unwrap();
    first.wait_for("primary", None, STARTUP).await.unwrap();
    assert!(
        first
            .log_text()
            .contains("found this node's own claim from before a restart"),
        "{}",
        first.log_text()
    );
    first.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_dir_holding_files_fencelog_did_not_create_is_refused_and_left_untouched() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &[]).await;
    load(primary.api(), "100");
    let data = cluster.dir.path().join("beta");
    std::fs::create_dir_all(data.join("photos")).unwrap();
    std::fs::write(data.join("notes.txt"), "mine").unwrap();
    let untouched = || {
        assert_eq!(
            std::fs::read_to_string(data.join("notes.txt")).unwrap(),
            "mine"
        );
        assert!(data.join("photos").is_dir());
        assert_eq!(
            std::fs::read_dir(&data).unwrap().count(),
            2,
            "nothing was added"
        );
    };

    let mut standby = daemon(&cluster.etcd, cluster.dir.path(), "standby", "beta", &[]);
    let exit = standby.wait_exit(STARTUP).await.unwrap();
    assert!(!exit.success());
    let log = standby.log_text();
    assert!(
        log.contains("is not a fencelog store and not empty")
            && (log.contains("notes.txt") || log.contains("photos")),
        "{log}"
    );
    untouched();

    let (ok, _, err) = fencelog(&[
        "bootstrap",
        "--etcd",
        cluster.etcd.endpoint(),
        "--cluster",
        CLUSTER,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert_eq!(lines(&err).len(), 1, "{err}");
    assert!(
        err.contains("is not a fencelog store and not empty"),
        "{err}"
    );
    untouched();
    primary.stop(STARTUP).await.unwrap();
}

#[test]
fn inspect_and_check_of_a_directory_without_a_store_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let (ok, _, err) = fencelog(&["inspect", "--data-dir", missing.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("there is no fencelog store at"), "{err}");
    assert!(!missing.exists(), "inspect created {}", missing.display());
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, _, err) = fencelog(&["inspect", "--data-dir", empty.to_str().unwrap()]);
    assert!(!ok, "{err}");
    assert_eq!(
        std::fs::read_dir(&empty).unwrap().count(),
        0,
        "inspect wrote into it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_after_trimming_reports_trimmed_seqs_as_unverified_and_verifies_them_from_a_store() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &QUICK_TRIMS).await;
    let acked = cluster.dir.path().join("acked.tsv");
    let (ok, out, err) = fencelog(&[
        "load",
        "--server",
        primary.api(),
        "--records",
        "3000",
        "--concurrency",
        "4",
        "--acked-out",
        acked.to_str().unwrap(),
    ]);
    assert!(ok, "{out}\n{err}");
    let client = common::client(&cluster.etcd).await;
    let layout = fencelog::keys::KeyLayout::new(&CLUSTER.parse().unwrap());
    let deadline = std::time::Instant::now() + STARTUP;
    while fencelog::etcd::trim::read_trimmed(&client, &layout, STARTUP)
        .await
        .unwrap()
        <= Seq(1_000)
    {
        assert!(std::time::Instant::now() < deadline, "never trimmed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let check = |extra: &[&str]| {
        let mut args = vec![
            "check",
            "--etcd",
            cluster.etcd.endpoint(),
            "--cluster",
            CLUSTER,
            "--acked",
            acked.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        fencelog(&args)
    };
    let (ok, out, err) = check(&[]);
    assert!(ok, "{out}\n{err}");
    assert!(!out.contains("VIOLATION"), "{out}");
    assert!(out.contains("not verified"), "{out}");
    assert!(out.contains("no violations"), "{out}");

    primary.stop(STARTUP).await.unwrap();
    let data = primary.data_dir().to_str().unwrap().to_owned();
    let (ok, out, err) = check(&["--data-dir", &data]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("3000 acknowledged records found as acknowledged"),
        "{out}"
    );
    assert!(!out.contains("not verified"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_caught_up_standby_shows_no_lag_in_seconds() {
    let cluster = Cluster::start().await;
    let mut primary = cluster.primary("alpha", &[]).await;
    let mut standby = cluster.standby("beta", &[]).await;
    let (ok, _, err) = fencelog(&["append", "--server", primary.api(), "k", "v"]);
    assert!(ok, "{err}");
    standby
        .client()
        .await
        .unwrap()
        .get(b"k".to_vec(), Seq(1), Duration::from_secs(20))
        .await
        .unwrap();
    // The batch was sealed over a second ago; a caught-up node lags by nothing.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    for node in [&primary, &standby] {
        let status = node.status().await.unwrap();
        assert_eq!(
            (status.apply_lag_seconds, status.receive_lag_seconds),
            (0.0, 0.0),
            "{}: {status:?}",
            node.name()
        );
    }
    standby.stop(STARTUP).await.unwrap();
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_logging_to_a_file_writes_no_colour_codes_and_debug_is_fencelogs_own() {
    let cluster = Cluster::start().await;
    let env = [("RUST_LOG", "debug"), ("NO_COLOR", "")];
    let mut primary = cluster.primary_with_env("alpha", &env).await;
    let (ok, _, err) = fencelog(&["append", "--server", primary.api(), "k", "v"]);
    assert!(ok, "{err}");
    primary.stop(STARTUP).await.unwrap();
    let log = primary.log_text();
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log file:\n{log}"
    );
    let debug: Vec<&str> = log.lines().filter(|l| l.contains(" DEBUG ")).collect();
    assert!(
        !debug.is_empty(),
        "RUST_LOG=debug gave no debug lines:\n{log}"
    );
    let foreign: Vec<&&str> = debug
        .iter()
        .filter(|l| {
            !l.split(" DEBUG ")
                .nth(1)
                .is_some_and(|t| t.starts_with("fencelog"))
        })
        .collect();
    assert!(
        foreign.is_empty(),
        "other crates' debug lines: {foreign:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rust_log_that_does_not_parse_is_reported_and_the_daemon_serves() {
    let cluster = Cluster::start().await;
    let env = [("RUST_LOG", "fencelog=loud")];
    let primary = cluster.primary_with_env("alpha", &env).await;
    let (ok, _, err) = fencelog(&["append", "--server", primary.api(), "k", "v"]);
    assert!(ok, "{err}");
    let log = primary.log_text();
    assert!(
        log.contains("RUST_LOG=\"fencelog=loud\" is not a log filter"),
        "{log}"
    );
    assert!(log.contains(" INFO "), "not at the default level:\n{log}");
}
