//! docs/ops/ as an operator plugs it in: the alert rules pass `promtool`, and a real
//! Prometheus (Debian's `prometheus`) run on docs/ops/prometheus.yml scrapes a primary, a
//! standby and their etcd under a load, and answers the queries of the rules and of the
//! Grafana dashboard with the nodes' own figures.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{daemon, fencelog};
use fencelog::node_process::NodeProcess;
use serde_json::Value;

const STARTUP: Duration = Duration::from_secs(30);
/// How long Prometheus gets to show what the nodes export (it scrapes every second here).
const SCRAPED: Duration = Duration::from_secs(60);
const RECORDS: u64 = 20_000;

/// A file of docs/ops/, as the repository ships it.
fn ops_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/ops")
        .join(name)
}

/// The `fencelog_*` names `text` uses.
fn fencelog_metrics_in(text: &str) -> Vec<&str> {
    let mut used: Vec<&str> = text
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .filter(|word| word.starts_with("fencelog_"))
        .collect();
    used.sort_unstable();
    used.dedup();
    used
}

/// True if a node exports `name`: a metric of its own, or a histogram's series.
fn exported(name: &str, rendered: &str) -> bool {
    let histogram = ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .is_some_and(|base| rendered.contains(&format!("# TYPE {base} histogram")))
    });
    histogram || rendered.contains(&format!("# TYPE {name} "))
}

#[test]
fn the_alert_rules_pass_promtool() {
    let output = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(ops_file("alerts.yml"))
        .output()
        .expect("promtool runs (tools/test.sh installs Debian's prometheus)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("SUCCESS: 8 rules found"), "{text}");
}

#[test]
fn the_alert_rules_and_the_dashboard_use_only_metrics_a_node_exports() {
    let rendered = fencelog::metrics::Metrics::new().unwrap().render();
    for (file, at_least) in [("alerts.yml", 7), ("grafana-dashboard.json", 15)] {
        let text = std::fs::read_to_string(ops_file(file)).unwrap();
        let used = fencelog_metrics_in(&text);
        assert!(used.len() >= at_least, "{file}: {used:?}");
        for metric in used {
            assert!(
                exported(metric, &rendered),
                "{file} uses {metric}, which a node does not export"
            );
        }
    }
}

/// A Prometheus server on a free loopback port with its data in a temp dir; killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Runs on `config` (the rule files beside it), once it says it is ready.
    async fn start(config: &Path, dir: &Path) -> Prometheus {
        let addr = format!("127.0.0.1:{}", common::free_port());
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("prometheus runs (tools/test.sh installs Debian's prometheus)");
        let prometheus = Prometheus { child, addr, log };
        let deadline = Instant::now() + STARTUP;
        while prometheus.get("/-/ready").await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "prometheus is not ready after {STARTUP:?}: {}",
                prometheus.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        prometheus
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One HTTP/1.0 GET (so that the answer is not chunked); `(0, "")` if it cannot connect.
    async fn get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut stream) = tokio::net::TcpStream::connect(&self.addr).await else {
            return (0, String::new());
        };
        let request = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let response = String::from_utf8_lossy(&response).into_owned();
        let code = response.split(' ').nth(1).and_then(|c| c.parse().ok());
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
        (code.unwrap_or(0), body.unwrap_or_default())
    }

    /// The `data` of an API answer (`/api/v1/...`); panics on anything but `success`.
    async fn api(&self, path: &str) -> Value {
        let (code, body) = self.get(path).await;
        let answer: Value = serde_json::from_str(&body).unwrap_or_else(|e| {
            panic!("{path}: HTTP {code}, not JSON ({e}): {body}");
        });
        assert_eq!(answer["status"], "success", "{path}: {answer}");
        answer["data"].clone()
    }

    /// The result vector of an instant query.
    async fn query(&self, promql: &str) -> Vec<Value> {
        let encoded =
            percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
        let data = self.api(&format!("/api/v1/query?query={encoded}")).await;
        assert_eq!(data["resultType"], "vector", "{promql}: {data}");
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

/// A sample's value as a number (Prometheus sends `[time, "value"]`).
fn value_of(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A primary and a standby on a real etcd after a load of [`RECORDS`], and a Prometheus
/// scraping the three through docs/ops/prometheus.yml.
struct Monitored {
    prometheus: Prometheus,
    primary: NodeProcess,
    standby: NodeProcess,
    _etcd: common::EtcdProcess,
    _dir: tempfile::TempDir,
}

/// The scrape job docs/ops/prometheus.yml names the cluster's nodes by.
const JOB: &str = "fencelog-c1";

impl Monitored {
    async fn start() -> Monitored {
        let etcd = common::etcd().await;
        let dir = tempfile::tempdir().unwrap();
        let mut primary = daemon(&etcd, dir.path(), "primary", "alpha", &[]);
        primary.wait_for("primary", None, STARTUP).await.unwrap();
        let mut standby = daemon(&etcd, dir.path(), "standby", "beta", &[]);
        standby
            .wait_for("standby", Some("watching"), STARTUP)
            .await
            .unwrap();

        // docs/ops as shipped, but for the addresses of this test's processes and a 1 s scrape.
        let etcd_addr = etcd.endpoint().trim_start_matches("http://");
        let mut config = std::fs::read_to_string(ops_file("prometheus.yml")).unwrap();
        for (shipped, here) in [
            ("127.0.0.1:7401", primary.metrics_addr()),
            ("127.0.0.1:7411", standby.metrics_addr()),
            ("127.0.0.1:2379", etcd_addr),
            ("interval: 15s", "interval: 1s"),
        ] {
            assert!(config.contains(shipped), "prometheus.yml has no {shipped}");
            config = config.replace(shipped, here);
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        std::fs::copy(ops_file("alerts.yml"), dir.path().join("alerts.yml")).unwrap();
        let prometheus = Prometheus::start(&config_path, dir.path()).await;
        let cluster = Monitored {
            prometheus,
            primary,
            standby,
            _etcd: etcd,
            _dir: dir,
        };
        // Scraped once before the load, so that its counters' increase falls in the window.
        cluster.by_node("up", |up| up == [1.0, 1.0]).await;

        let records = RECORDS.to_string();
        let (ok, out, err) = fencelog(&[
            "load",
            "--server",
            cluster.primary.api(),
            "--records",
            &records,
            "--concurrency",
            "4",
        ]);
        assert!(ok, "{out}\n{err}");
        cluster
    }

    /// The values of `promql` for the primary and the standby (by their `instance` label),
    /// once Prometheus has both and they satisfy `wanted`; polled every 250 ms for up to
    /// [`SCRAPED`].
    async fn by_node(&self, promql: &str, wanted: impl Fn([f64; 2]) -> bool) -> [f64; 2] {
        let nodes = [self.primary.metrics_addr(), self.standby.metrics_addr()];
        let deadline = Instant::now() + SCRAPED;
        loop {
            let result = self.prometheus.query(promql).await;
            let of = |node: &str| {
                let sample = result.iter().find(|s| s["metric"]["instance"] == node);
                sample.map(value_of)
            };
            if let [Some(primary), Some(standby)] = nodes.map(of) {
                if wanted([primary, standby]) {
                    return [primary, standby];
                }
            }
            assert!(
                Instant::now() < deadline,
                "{promql}: not as wanted for both nodes after {SCRAPED:?}: {result:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_committed_seq_and_the_lag_of_a_primary_and_a_standby() {
    let cluster = Monitored::start().await;
    let all = RECORDS as f64;
    let committed = cluster
        .by_node("fencelog_committed_seq", |v| v == [all, all])
        .await;
    assert_eq!(committed, [all, all]);
    // The lag the dashboard draws and a person asks for: zero once both applied the load.
    let lag = cluster
        .by_node("fencelog_committed_seq - fencelog_applied_seq", |v| {
            v == [0.0, 0.0]
        })
        .await;
    assert_eq!(lag, [0.0, 0.0]);
    let rate = cluster
        .by_node("rate(fencelog_committed_records_total[1m])", |_| true)
        .await;
    assert!(rate[0] > 0.0, "the primary committed at {rate:?} records/s");

    // Typed as the node declares them, so that rate() and histogram_quantile() apply.
    let metadata = cluster.prometheus.api("/api/v1/metadata").await;
    for (metric, kind) in [
        ("fencelog_committed_seq", "gauge"),
        ("fencelog_committed_records_total", "counter"),
        ("fencelog_commit_seconds", "histogram"),
    ] {
        assert_eq!(metadata[metric][0]["type"], kind, "{metric}: {metadata}");
    }
    assert_eq!(
        cluster
            .prometheus
            .query(&format!("up{{job=\"{JOB}\"}} == 1"))
            .await
            .len(),
        2,
        "both nodes are scraped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_query_and_alert_rule_evaluates_on_the_scraped_metrics() {
    let cluster = Monitored::start().await;
    cluster
        .by_node("fencelog_committed_seq", |v| v[0] == RECORDS as f64)
        .await;
    // Enough scrapes after the load for every rate() to have two samples.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(ops_file("grafana-dashboard.json")).unwrap())
            .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut queried = 0;
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            // Grafana's variables, as it fills them in for this cluster.
            let expr = target["expr"].as_str().unwrap();
            let promql = expr.replace("$job", JOB).replace("$__rate_interval", "1m");
            let result = cluster.prometheus.query(&promql).await;
            assert!(
                !result.is_empty(),
                "panel {:?}: {promql} gives no series",
                panel["title"]
            );
            queried += 1;
        }
    }
    assert!(queried >= 20, "{queried} queries");

    // Every rule evaluated without an error (and none of them fires on a healthy cluster).
    let deadline = Instant::now() + SCRAPED;
    loop {
        let groups = cluster.prometheus.api("/api/v1/rules").await;
        let rules: Vec<Value> = groups["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let healthy = rules.len() == 8 && rules.iter().all(|r| r["health"] == "ok");
        if healthy {
            for rule in &rules {
                assert_eq!(rule["state"], "inactive", "{rule}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "rules not all healthy: {groups}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
