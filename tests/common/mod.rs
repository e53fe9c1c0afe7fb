//! Helpers shared by the integration tests: record generators and a real etcd.

#![allow(dead_code)] // each test binary uses its own subset

pub mod pki;

use fencelog::batch::{Batch, BatchEncoder, EncodedBatch};
use fencelog::limits::Limits;
use fencelog::record::{Epoch, Record, Seq};
use fencelog::workload::RecordGenerator;

pub use fencelog::etcd::process::{EtcdCluster, EtcdProcess};

/// What a fencelog process can be pointed at: one etcd, or a cluster of several.
pub trait Etcd {
    /// The `--etcd` argument: client URLs, comma-separated.
    fn endpoints(&self) -> String;
}

impl Etcd for EtcdProcess {
    fn endpoints(&self) -> String {
        self.endpoint().to_owned()
    }
}

impl Etcd for EtcdCluster {
    fn endpoints(&self) -> String {
        EtcdCluster::endpoints(self)
    }
}

/// A loopback port nothing listens on (for a moment: bind it soon).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Starts a real etcd; panics with etcd's own message (and how to install it) if it cannot.
pub async fn etcd() -> EtcdProcess {
    match EtcdProcess::start().await {
        Ok(etcd) => etcd,
        Err(e) => panic!("{e}"),
    }
}

/// `count` records of ~256 bytes over a keyspace of `keyspace` keys, seeded by `seed`.
pub fn records(seed: u64, count: usize, keyspace: u64) -> Vec<Record> {
    RecordGenerator::new(seed, keyspace, 256).take_records(count)
}

/// Encodes consecutive batches of `per_batch` records from seq 1 in `epoch`.
pub fn encoded_batches(epoch: Epoch, batches: usize, per_batch: usize) -> Vec<EncodedBatch> {
    let mut encoder = BatchEncoder::new(Limits::default(), 1).expect("default limits are valid");
    (0..batches)
        .map(|b| {
            let first = Seq(1 + (b * per_batch) as u64);
            let batch = Batch::new(epoch, first, records(b as u64, per_batch, 500)).expect("batch");
            encoder.encode(&batch).expect("encodes")
        })
        .collect()
}

/// A primary's pieces for one node: its store and its configuration.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub store: std::sync::Arc<fencelog::local_store::LocalStore>,
    pub config: fencelog::config::PrimaryConfig,
}

pub const CLUSTER: &str = "test-cluster";

/// A node named `name` with a fresh store and default settings.
pub fn node(name: &str) -> Node {
    node_with(name, Default::default())
}

/// A node named `name` with a fresh store opened with `options` (a state machine of its own).
pub fn node_with(name: &str, options: fencelog::local_store::StoreOptions) -> Node {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = fencelog::local_store::LocalStore::open(dir.path(), options).expect("store opens");
    let config = fencelog::config::PrimaryConfig::new(
        CLUSTER.parse().expect("valid cluster"),
        name.parse().expect("valid node name"),
        format!("127.0.0.1:7{:03}", name.len()),
    );
    Node {
        dir,
        store: std::sync::Arc::new(store),
        config,
    }
}

/// Retention that trims etcd to its newest `records` every 100 ms, whatever their age.
pub fn quick_retention(records: u64) -> fencelog::etcd::trim::Retention {
    fencelog::etcd::trim::Retention {
        retain_records: records,
        retain_seconds: 0,
        max_etcd_log_bytes: u64::MAX,
        interval: std::time::Duration::from_millis(100),
        compact: true,
    }
}

/// Waits (up to 30 s) until etcd's log of the test cluster was trimmed past `seq + 1`: a node
/// stopped at `seq` can then only come back through a snapshot.
pub async fn trimmed_past(etcd: &EtcdProcess, seq: fencelog::record::Seq) {
    let wait = std::time::Duration::from_secs(30);
    let client = client(etcd).await;
    let layout = fencelog::keys::KeyLayout::new(&CLUSTER.parse().expect("valid cluster"));
    let deadline = std::time::Instant::now() + wait;
    let after = fencelog::record::Seq(seq.0 + 1);
    while fencelog::etcd::trim::read_trimmed(&client, &layout, wait)
        .await
        .expect("trimmed reads")
        <= after
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the log was not trimmed past seq {seq}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A client of `etcd` with fencelog's timeouts.
pub async fn client(etcd: &EtcdProcess) -> etcd_client::Client {
    fencelog::etcd::connect(
        &[etcd.endpoint().to_owned()],
        std::time::Duration::from_secs(2),
    )
    .await
    .expect("etcd answers")
}

/// Starts a primary on `node` against `etcd`.
pub async fn start_primary(
    etcd: &EtcdProcess,
    node: &Node,
) -> fencelog::Result<fencelog::primary::Primary> {
    let metrics = std::sync::Arc::new(fencelog::metrics::Metrics::new().expect("metrics"));
    fencelog::primary::Primary::start(
        client(etcd).await,
        node.store.clone(),
        node.config.clone(),
        metrics,
    )
    .await
}

/// Every committed record in etcd, by seq, read back through the verified paged reader.
pub async fn committed_records(etcd: &EtcdProcess) -> Vec<(Seq, Record)> {
    use fencelog::batch::BatchDecoder;
    use fencelog::etcd::fetch::BatchPages;
    let client = client(etcd).await;
    let layout = fencelog::keys::KeyLayout::new(&CLUSTER.parse().expect("valid cluster"));
    let limits = Limits::default();
    let mut pages = BatchPages::new(
        &client,
        &layout,
        &limits,
        Seq(1),
        None,
        std::time::Duration::from_secs(5),
    );
    let mut decoder = BatchDecoder::new(limits.clone()).expect("valid limits");
    let mut records = Vec::new();
    while let Some(page) = pages
        .next_page()
        .await
        .expect("etcd's log reads back without a gap")
    {
        for batch in page {
            let batch = decoder
                .decode(batch.as_bytes())
                .expect("committed batches verify");
            records.extend(batch.iter().map(|(seq, record)| (seq, record.clone())));
        }
    }
    records
}

/// etcd's commit pointer, if any.
pub async fn latest(etcd: &EtcdProcess) -> Option<fencelog::pointer::CommitPointer> {
    let layout = fencelog::keys::KeyLayout::new(&CLUSTER.parse().expect("valid cluster"));
    let response = client(etcd)
        .await
        .get(layout.latest(), None)
        .await
        .expect("etcd answers");
    response
        .kvs()
        .first()
        .map(|kv| fencelog::pointer::CommitPointer::decode(kv.value()).expect("latest decodes"))
}

/// Waits until nothing but `store`'s caller holds it, so its directory can go: tasks of a
/// dropped (crashed) primary let go of the store only as the runtime cancels them.
pub async fn released(store: &std::sync::Arc<fencelog::local_store::LocalStore>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::sync::Arc::strong_count(store) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the store is still held after 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Waits (up to 20 s) until `standby`'s local log holds `seq`; panics with its status if the
/// follower stopped short of it.
pub async fn received(standby: &fencelog::standby::Standby, seq: Seq) {
    let reached = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        standby.wait_received(seq),
    )
    .await
    .expect("the standby gets there in time");
    assert!(
        reached.is_some_and(|r| r >= seq),
        "the follower stopped: {:?}",
        standby.status()
    );
}

/// Runs the `fencelog` binary; returns (success, stdout, stderr).
pub fn fencelog(args: &[&str]) -> (bool, String, String) {
    fencelog_with_env(args, &[])
}

/// Waits for `child` to exit and collects its output, for at most `limit`: past it the child
/// is killed and the test fails with what it printed, rather than hang.
pub fn output_within(
    child: std::process::Child,
    limit: std::time::Duration,
) -> std::process::Output {
    let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || drop(done.send(child.wait_with_output())));
    if let Ok(output) = finished.recv_timeout(limit) {
        return output.expect("the child's output can be read");
    }
    // SAFETY: kill(2) on our own child, not reaped yet: its waiter is still blocked on it.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let output = finished
        .recv()
        .expect("the waiter answers")
        .expect("the child's output can be read");
    panic!(
        "still running after {limit:?}, killed it.\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs the `fencelog` binary with extra environment variables.
pub fn fencelog_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fencelog"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("the fencelog binary runs");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (
        output.status.success(),
        text(output.stdout),
        text(output.stderr),
    )
}

/// A daemon process of the `fencelog` binary, with its data directory and log in `dir`.
pub fn daemon(
    etcd: &impl Etcd,
    dir: &std::path::Path,
    role: &str,
    name: &str,
    extra_args: &[&str],
) -> fencelog::node_process::NodeProcess {
    daemon_with_env(etcd, dir, role, name, extra_args, &[])
}

/// [`daemon`] with extra environment variables.
pub fn daemon_with_env(
    etcd: &impl Etcd,
    dir: &std::path::Path,
    role: &str,
    name: &str,
    extra_args: &[&str],
    env: &[(&str, &str)],
) -> fencelog::node_process::NodeProcess {
    let spec = daemon_spec(etcd, dir, role, name, extra_args, env);
    fencelog::node_process::NodeProcess::spawn(spec).expect("the daemon starts")
}

/// How [`daemon_with_env`] starts a node: its data directory is `dir/<name>`, its log
/// `dir/<name>.log`.
pub fn daemon_spec(
    etcd: &impl Etcd,
    dir: &std::path::Path,
    role: &str,
    name: &str,
    extra_args: &[&str],
    env: &[(&str, &str)],
) -> fencelog::node_process::NodeSpec {
    fencelog::node_process::NodeSpec {
        binary: env!("CARGO_BIN_EXE_fencelog").into(),
        role: role.to_owned(),
        cluster: CLUSTER.to_owned(),
        node: name.to_owned(),
        etcd: etcd.endpoints(),
        data_dir: dir.join(name),
        log: dir.join(format!("{name}.log")),
        extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// The node's `/metrics`, parsed as Prometheus text.
pub async fn scrape(metrics_addr: &str) -> prometheus_parse::Scrape {
    let (code, body) = http_get(metrics_addr, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text")
}

/// The value of the counter or gauge `name` (its first series) in `scrape`.
pub fn sample(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    let sample = scrape.samples.iter().find(|s| s.metric == name);
    match sample.unwrap_or_else(|| panic!("no {name}")).value {
        prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
        ref other => panic!("{name} is {other:?}"),
    }
}

/// The current value of the counter or gauge `name` on the node's `/metrics`.
pub async fn metric(metrics_addr: &str, name: &str) -> f64 {
    sample(&scrape(metrics_addr).await, name)
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("sends");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("reads");
    let response = String::from_utf8_lossy(&response).into_owned();
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("an HTTP status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// A node (standby role, campaigning with `failover`) serving the API on a free loopback port,
/// which its leader key advertises. Stop it with [`ServedNode::stop`].
pub struct ServedNode {
    pub node: std::sync::Arc<fencelog::node::Node>,
    pub addr: String,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<fencelog::Result<()>>,
}

impl ServedNode {
    pub async fn start(
        etcd: &EtcdProcess,
        pieces: &Node,
        retention: fencelog::etcd::trim::Retention,
        failover: bool,
    ) -> ServedNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("bound").to_string();
        let mut primary = pieces.config.clone();
        primary.advertise_addr = addr.clone();
        primary.retention = retention;
        let mut standby =
            fencelog::standby::StandbyConfig::new(primary.cluster.clone(), primary.node.clone());
        standby.recovery_retry = std::time::Duration::from_millis(300);
        let config = fencelog::node::NodeConfig {
            standby,
            primary,
            campaign: if failover {
                fencelog::node::Campaign::AtOnce
            } else {
                fencelog::node::Campaign::Never
            },
            local_retention: Default::default(),
            peer_access: Default::default(),
        };
        let metrics = std::sync::Arc::new(fencelog::metrics::Metrics::new().expect("metrics"));
        let node = std::sync::Arc::new(
            fencelog::node::Node::start(client(etcd).await, pieces.store.clone(), config, metrics)
                .await
                .expect("the node starts"),
        );
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let api = fencelog::api::WalApi::new(node.clone(), addr.clone(), Default::default());
        let server = tokio::spawn(fencelog::api::serve(api, listener, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        ServedNode {
            node,
            addr,
            stop,
            server,
        }
    }

    /// A node started with `failover`, once it leads (within 30 s): the primary of a test.
    pub async fn start_leading(
        etcd: &EtcdProcess,
        pieces: &Node,
        retention: fencelog::etcd::trim::Retention,
    ) -> ServedNode {
        let served = ServedNode::start(etcd, pieces, retention, true).await;
        tokio::time::timeout(std::time::Duration::from_secs(30), served.node.leading())
            .await
            .expect("the node leads within 30 s");
        served
    }

    /// Shuts the node down (a primary resigns) and stops serving.
    pub async fn stop(self) {
        self.node.shutdown().await.expect("clean shutdown");
        self.stop.send_replace(true);
        self.server.await.expect("joins").expect("served");
    }
}

/// Opens a closed store's sled database directly (to damage it on purpose). sled lets go of
/// its lock a moment after a store is dropped (its flusher thread), so this waits up to 10 s.
pub fn raw_sled(dir: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("cannot open {}: {e}", dir.display()),
        }
    }
}

/// Every record a store's log holds as received, by seq.
pub fn whole_log(store: &fencelog::local_store::LocalStore) -> Vec<(Seq, Record)> {
    store
        .read(Seq(1), usize::MAX, usize::MAX)
        .expect("the log reads from seq 1")
}

/// A fail point set (`fail::cfg` actions) for as long as the guard lives, and removed when it
/// drops — also when the test panics — so no later step meets it by accident. In-process only:
/// daemons take theirs from `FAILPOINTS` in their environment.
#[must_use = "the fail point is removed when the guard drops"]
pub struct FailPoint(String);

impl FailPoint {
    pub fn set(name: &str, actions: &str) -> FailPoint {
        fail::cfg(name, actions).expect("valid fail point actions");
        FailPoint(name.to_owned())
    }
}

impl Drop for FailPoint {
    fn drop(&mut self) {
        fail::remove(&self.0);
    }
}
