//! The client commands' inputs, as an operator gives them: values from a file or stdin, binary
//! keys and values in base64, the target from the environment, host names in addresses, and a
//! `read --to` past the end of the log. Real `fencelog primary` daemons on a real etcd.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::{daemon, fencelog, fencelog_with_env, output_within, CLUSTER};
use fencelog::node_process::NodeProcess;

const STARTUP: Duration = Duration::from_secs(30);

/// A real etcd, a primary that leads, and the directory of its store and log.
struct Leading {
    primary: NodeProcess,
    etcd: common::EtcdProcess,
    _dir: tempfile::TempDir,
}

async fn leading() -> Leading {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let mut primary = daemon(&etcd, dir.path(), "primary", "alpha", &[]);
    primary.wait_for("primary", None, STARTUP).await.unwrap();
    Leading {
        primary,
        etcd,
        _dir: dir,
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Bytes no command line can carry: every byte value, NULs and newlines among them.
fn binary(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// `fencelog get --base64 KEY` on `api` once it has applied seq 1, decoded.
fn get_bytes(api: &str, key: &str) -> Vec<u8> {
    let key = b64(key.as_bytes());
    let (ok, out, err) = fencelog(&["get", "--server", api, "--min-seq", "1", "--base64", &key]);
    assert!(ok, "{err}");
    base64::engine::general_purpose::STANDARD
        .decode(out.trim())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_value_from_a_file_is_appended_byte_for_byte_up_to_the_nodes_limit() {
    let node = leading().await;
    let api = node.primary.api();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("value");
    // The node's limit exactly: far past what a command line carries (~128 KiB per argument).
    let value = binary(1024 * 1024);
    std::fs::write(&file, &value).unwrap();

    let (ok, out, err) = fencelog(&[
        "append",
        "--server",
        api,
        "big",
        "--value-file",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "seq 1");
    assert_eq!(get_bytes(api, "big"), value);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_value_file_of_dash_is_read_from_stdin() {
    let node = leading().await;
    let api = node.primary.api();
    let value = binary(300 * 1024);
    let mut child = Command::new(env!("CARGO_BIN_EXE_fencelog"))
        .args(["append", "--server", api, "piped", "--value-file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&value).unwrap();
    let output = output_within(child, Duration::from_secs(30));
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "seq 1");
    assert_eq!(get_bytes(api, "piped"), value);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_value_file_over_the_nodes_limit_gets_its_refusal_in_one_line() {
    let node = leading().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("value");
    std::fs::write(&file, binary(1024 * 1024 + 1)).unwrap();
    let (ok, _, err) = fencelog(&[
        "append",
        "--server",
        node.primary.api(),
        "big",
        "--value-file",
        file.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("record value is 1048577 bytes, over the limit of 1048576 bytes"),
        "{err}"
    );

    let missing = dir.path().join("missing");
    let (ok, _, err) = fencelog(&[
        "append",
        "--server",
        node.primary.api(),
        "k",
        "--value-file",
        missing.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("cannot read the value from") && err.contains("(--value-file)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_keys_and_values_go_in_and_come_out_in_base64() {
    let node = leading().await;
    let api = node.primary.api();
    let (key, value) = ([0u8, 0xff, b'\t', b'\n'], [0u8, 1, 2, 3]);

    let (ok, out, err) = fencelog(&[
        "append",
        "--server",
        api,
        "--base64",
        &b64(&key),
        &b64(&value),
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "seq 1");
    let key64 = b64(&key);
    let (ok, out, err) = fencelog(&["get", "--server", api, "--min-seq", "1", "--base64", &key64]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), b64(&value));

    let digest = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&value));
    let (ok, out, err) = fencelog(&["read", "--server", api, "--from", "1", "--base64"]);
    assert!(ok, "{err}");
    assert_eq!(out, format!("1\t{}\t{digest}\n", b64(&key)));
    // Without --base64 the key's bytes are escaped, so a line keeps its three columns.
    let (ok, out, err) = fencelog(&["read", "--server", api, "--from", "1"]);
    assert!(ok, "{err}");
    assert_eq!(out, format!("1\t\\x00\\xff\\t\\n\t{digest}\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_that_is_not_base64_is_refused_before_anything_is_sent() {
    let node = leading().await;
    let api = node.primary.api();
    let (ok, _, err) = fencelog(&["append", "--server", api, "--base64", "!!", "AA=="]);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("the key \"!!\" is not base64 (--base64)"),
        "{err}"
    );
    let status = node.primary.status().await.unwrap();
    assert_eq!(status.committed_seq, 0, "nothing was appended");
}

#[tokio::test(flavor = "multi_thread")]
async fn read_to_past_the_committed_seq_prints_what_there_is_and_says_where_the_log_ends() {
    let node = leading().await;
    let api = node.primary.api();
    for value in ["a", "b", "c"] {
        let (ok, _, err) = fencelog(&["append", "--server", api, "k", value]);
        assert!(ok, "{err}");
    }
    let (ok, out, err) = fencelog(&["read", "--server", api, "--from", "2", "--to", "10"]);
    assert!(!ok, "a read short of --to is not a success");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.starts_with("2\tk\t") && out.contains("\n3\tk\t"),
        "{out}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--to 10 is past the log")
            && err.contains("which ends at seq 3: printed 2 records, 2..=3"),
        "{err}"
    );

    let (ok, out, err) = fencelog(&["read", "--server", api, "--from", "2", "--to", "3"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_commands_take_their_target_from_the_environment_and_flags_win() {
    let node = leading().await;
    let api = node.primary.api();
    let through_etcd = [
        ("FENCELOG_ETCD", node.etcd.endpoint()),
        ("FENCELOG_CLUSTER", CLUSTER),
    ];
    let (ok, out, err) = fencelog_with_env(&["append", "color", "blue"], &through_etcd);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "seq 1");

    let (ok, out, err) = fencelog_with_env(
        &["get", "--min-seq", "1", "color"],
        &[("FENCELOG_SERVER", api)],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "blue");

    // A daemon's environment pointing at an etcd that is down: --server still picks the node.
    let dead_etcd = [
        ("FENCELOG_ETCD", "http://127.0.0.1:1"),
        ("FENCELOG_CLUSTER", CLUSTER),
    ];
    let (ok, out, err) = fencelog_with_env(&["get", "--server", api, "color"], &dead_etcd);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "blue");

    let (ok, _, err) = fencelog_with_env(
        &["status", "--etcd", node.etcd.endpoint(), "--json"],
        &[("FENCELOG_CLUSTER", CLUSTER)],
    );
    assert!(
        ok,
        "--cluster from the environment with --etcd as a flag: {err}"
    );

    let (ok, _, err) = fencelog_with_env(&["status", "--server", api, "--cluster", CLUSTER], &[]);
    assert!(!ok);
    assert!(err.contains("name two targets"), "{err}");
}

/// A daemon started by hand (the test kit always gives it 127.0.0.1 addresses), killed on drop.
struct Started(std::process::Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn addresses_may_name_the_host_as_well_as_its_ip() {
    let etcd = common::etcd().await;
    let dir = tempfile::tempdir().unwrap();
    let free = common::free_port;
    let (api, metrics) = (
        format!("localhost:{}", free()),
        format!("localhost:{}", free()),
    );
    let etcd_by_name = etcd.endpoint().replace("127.0.0.1", "localhost");
    let data_dir = dir.path().join("alpha");
    let _primary = Started(
        Command::new(env!("CARGO_BIN_EXE_fencelog"))
            .args(["primary", "--cluster", CLUSTER, "--node", "alpha"])
            .args([
                "--etcd",
                &etcd_by_name,
                "--listen",
                &api,
                "--metrics",
                &metrics,
            ])
            .arg("--data-dir")
            .arg(&data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let (ok, out, err) = fencelog(&["append", "--server", &api, "color", "blue"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "seq 1");
    let (ok, out, err) = fencelog(&["status", "--etcd", &etcd_by_name, "--cluster", CLUSTER]);
    assert!(ok, "{err}");
    // The leader key holds the address the host name resolved to.
    let port = api.rsplit_once(':').unwrap().1;
    assert!(
        out.contains(&format!("leader         alpha (127.0.0.1:{port})")),
        "{out}"
    );
    let (code, _) = common::http_get(&metrics.replace("localhost", "127.0.0.1"), "/healthz").await;
    assert_eq!(code, 200);
}
