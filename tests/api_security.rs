//! The API secured: TLS with the node's certificate, client certificates (required, or optional
//! with open reads), and a bearer token for the calls that change the log or its leadership.
//! Daemons against a real etcd; certificates made in the test.

mod common;

use std::path::Path;
use std::time::Duration;

use common::pki::Authority;
use fencelog::api::{ApiAccess, Endpoint, WalClient};
use fencelog::credentials::{ClientCertificate, Secret};
use fencelog::node_process::NodeProcess;
use fencelog::record::{Record, Seq};
use tempfile::TempDir;

const STARTUP: Duration = Duration::from_secs(30);
const TOKEN: &str = "api-token-4f2a";
const REFUSED: &str = "needs a client certificate or the API token";

/// A primary daemon serving its API with `flags`, reached by its harness with a certificate
/// from `ca` (or the token, on a plain API).
struct SecuredPrimary {
    node: NodeProcess,
    ca: Authority,
    etcd: common::EtcdProcess,
    dir: TempDir,
}

impl SecuredPrimary {
    /// `flags(dir, ca, node certificate)` gives the daemon's security flags.
    async fn start(
        flags: impl FnOnce(&Path, &Authority, &ClientCertificate) -> Vec<String>,
    ) -> SecuredPrimary {
        let etcd = common::etcd().await;
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new(dir.path(), "api");
        let certificate = ca.issue("p1", false);
        let args = flags(dir.path(), &ca, &certificate);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let spec = common::daemon_spec(&etcd, dir.path(), "primary", "p1", &args, &[]);
        let mut node = NodeProcess::spawn(spec).expect("the daemon starts");
        // The harness proves itself with a certificate where the API serves TLS, else with
        // the token.
        let serves_tls = args.contains(&"--tls-cert");
        node.set_api_access(if serves_tls {
            ApiAccess {
                ca: Some(ca.cert.clone()),
                client: Some(certificate),
                token: None,
            }
        } else {
            ApiAccess {
                token: Some(Secret::new(TOKEN)),
                ..ApiAccess::default()
            }
        });
        node.wait_for("primary", None, STARTUP).await.unwrap();
        SecuredPrimary {
            node,
            ca,
            etcd,
            dir,
        }
    }

    async fn client(&self, access: ApiAccess) -> fencelog::Result<WalClient> {
        WalClient::connect_with(Endpoint::Server(self.node.api().to_owned()), access).await
    }

    /// Whether a client reaching the node with `access` gets its status.
    async fn status_with(&self, access: ApiAccess) -> fencelog::Result<()> {
        self.client(access).await?.status().await.map(drop)
    }

    /// TLS trusting the node, no certificate, no token.
    fn anonymous(&self) -> ApiAccess {
        ApiAccess {
            ca: Some(self.ca.cert.clone()),
            client: None,
            token: None,
        }
    }
}

fn tls_flags(ca: &Authority, certificate: &ClientCertificate) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        certificate.cert.display().to_string(),
        "--tls-key".into(),
        certificate.key.display().to_string(),
        "--tls-client-ca".into(),
        ca.cert.display().to_string(),
    ]
}

fn token_file(dir: &Path) -> String {
    let path = dir.join("api-token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    path.display().to_string()
}

async fn append(client: &mut WalClient) -> fencelog::Result<Seq> {
    client
        .append(vec![Record::put("k", "v")])
        .await
        .map(|ack| ack.last_seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_certificates_required_a_client_with_one_appends() {
    let primary = SecuredPrimary::start(|_, ca, cert| tls_flags(ca, cert)).await;
    let mut client = primary.node.client().await.unwrap();
    assert_eq!(append(&mut client).await.unwrap(), Seq(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_certificates_required_a_client_without_one_gets_nothing() {
    let primary = SecuredPrimary::start(|_, ca, cert| tls_flags(ca, cert)).await;
    let refused = primary.status_with(primary.anonymous()).await;
    assert!(
        refused.is_err(),
        "a client without a certificate was served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_nodes_ca_cannot_connect() {
    let primary = SecuredPrimary::start(|_, ca, cert| tls_flags(ca, cert)).await;
    let foreign = Authority::new(primary.dir.path(), "foreign");
    let access = ApiAccess {
        ca: Some(foreign.cert.clone()),
        client: Some(primary.ca.issue("client", false)),
        token: None,
    };
    let refused = primary.status_with(access).await;
    let message = refused.expect_err("a foreign CA connected").to_string();
    assert!(message.contains("UnknownIssuer"), "{message}");
}

/// TLS, client certificates optional (open reads), and the token.
fn open_reads_flags(dir: &Path, ca: &Authority, cert: &ClientCertificate) -> Vec<String> {
    let mut flags = tls_flags(ca, cert);
    flags.extend([
        "--open-reads".into(),
        "--api-token-file".into(),
        token_file(dir),
    ]);
    flags
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_open_reads_a_client_without_proof_reads_but_cannot_append_or_promote() {
    let primary = SecuredPrimary::start(open_reads_flags).await;
    let mut anonymous = primary.client(primary.anonymous()).await.unwrap();
    let mut owner = primary.node.client().await.unwrap();
    let seq = append(&mut owner).await.unwrap();

    assert_eq!(anonymous.status().await.unwrap().committed_seq, seq.0);
    let mut read = anonymous.read(Seq(1), Some(seq)).await.unwrap();
    assert_eq!(read.next_chunk().await.unwrap().unwrap().len(), 1);
    let appended = append(&mut anonymous).await.unwrap_err().to_string();
    assert!(appended.contains(REFUSED), "{appended}");
    let promoted = anonymous.promote(false).await.unwrap_err().to_string();
    assert!(promoted.contains(REFUSED), "{promoted}");
    assert_eq!(owner.status().await.unwrap().committed_seq, seq.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_open_reads_the_token_appends_and_never_shows() {
    let primary = SecuredPrimary::start(open_reads_flags).await;
    let mut with_token = primary
        .client(ApiAccess {
            token: Some(Secret::new(TOKEN)),
            ..primary.anonymous()
        })
        .await
        .unwrap();
    assert_eq!(append(&mut with_token).await.unwrap(), Seq(1));
    let shown = format!(
        "{:?}{}",
        with_token.status().await.unwrap(),
        primary.node.log_text()
    );
    assert!(!shown.contains(TOKEN), "the token shows: {shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused() {
    let primary = SecuredPrimary::start(open_reads_flags).await;
    let mut guessing = primary
        .client(ApiAccess {
            token: Some(Secret::new("api-token-4f2b")),
            ..primary.anonymous()
        })
        .await
        .unwrap();
    let refused = append(&mut guessing).await.unwrap_err().to_string();
    assert!(refused.contains(REFUSED), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_alone_guards_appends_on_a_plain_api() {
    let primary =
        SecuredPrimary::start(|dir, _, _| vec!["--api-token-file".into(), token_file(dir)]).await;
    let plain = ApiAccess::default();
    let mut anonymous = primary.client(plain.clone()).await.unwrap();
    let refused = append(&mut anonymous).await.unwrap_err().to_string();
    assert!(refused.contains(REFUSED), "{refused}");
    let mut with_token = primary
        .client(ApiAccess {
            token: Some(Secret::new(TOKEN)),
            ..plain
        })
        .await
        .unwrap();
    assert_eq!(append(&mut with_token).await.unwrap(), Seq(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_appends_over_tls_with_the_token_from_a_file() {
    let primary = SecuredPrimary::start(open_reads_flags).await;
    let token = token_file(primary.dir.path());
    let ca = primary.ca.cert.display().to_string();
    let (ok, out, err) = common::fencelog(&[
        "append",
        "--server",
        primary.node.api(),
        "--tls-ca",
        &ca,
        "--api-token-file",
        &token,
        "k",
        "v",
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("seq 1"), "{out}");
}

/// `GET path` on the metrics endpoint at `addr` over TLS trusting `ca`, presenting `client`.
async fn https_get(
    addr: &str,
    ca: &Path,
    client: Option<&ClientCertificate>,
    path: &str,
) -> std::io::Result<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(client) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&client.cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(&client.key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await?;
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_serves_tls_to_a_client_with_a_certificate_only() {
    let primary = SecuredPrimary::start(|_, ca, cert| tls_flags(ca, cert)).await;
    let addr = primary.node.metrics_addr();
    let client = primary.ca.issue("prometheus", false);
    let answer = https_get(addr, &primary.ca.cert, Some(&client), "/healthz")
        .await
        .expect("a client with a certificate is served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let refused = https_get(addr, &primary.ca.cert, None, "/healthz").await;
    assert!(
        !refused
            .as_ref()
            .is_ok_and(|a| a.starts_with("HTTP/1.1 200")),
        "a client without a certificate was served: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_open_reads_the_metrics_endpoint_serves_a_client_without_a_certificate() {
    let primary = SecuredPrimary::start(open_reads_flags).await;
    let answer = https_get(
        primary.node.metrics_addr(),
        &primary.ca.cert,
        None,
        "/metrics",
    )
    .await
    .expect("monitoring without a certificate is served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("fencelog_committed_seq"), "{answer}");
}

/// Opens `count` connections to `addr` that never send a byte of their TLS handshake.
async fn stalled_clients(addr: &str, count: usize) -> Vec<tokio::net::TcpStream> {
    let mut stalled = Vec::new();
    for _ in 0..count {
        stalled.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    stalled
}

/// Waits until the node closes `stalled` (its handshake timeout is 5 s).
async fn dropped_by_the_node(mut stalled: tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(15), stalled.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a client stalled in its TLS handshake was kept: {read:?}"
    );
}

/// Handshakes run side by side: a scrape is answered while other clients sit in theirs, which
/// the node cuts off only after its handshake timeout (5 s) — a listener that shook hands one
/// at a time would answer nobody within 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stalled_in_the_tls_handshake_hold_up_no_scrape_and_are_dropped() {
    let primary = SecuredPrimary::start(open_reads_flags).await;
    let addr = primary.node.metrics_addr();
    let stalled = stalled_clients(addr, 3).await;
    let scrape = https_get(addr, &primary.ca.cert, None, "/metrics");
    let answer = tokio::time::timeout(Duration::from_secs(3), scrape)
        .await
        .expect("answered while the stalled clients still handshake")
        .expect("the scrape is served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for client in stalled {
        dropped_by_the_node(client).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stalled_in_the_tls_handshake_hold_up_no_api_call_and_are_dropped() {
    let primary = SecuredPrimary::start(open_reads_flags).await;
    let stalled = stalled_clients(primary.node.api(), 3).await;
    let status = tokio::time::timeout(
        Duration::from_secs(3),
        primary.status_with(primary.anonymous()),
    )
    .await
    .expect("answered while the stalled clients still handshake");
    assert!(status.is_ok(), "{status:?}");
    for client in stalled {
        dropped_by_the_node(client).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_past_trimming_installs_a_snapshot_from_a_primary_behind_mtls() {
    let primary = SecuredPrimary::start(|_, ca, cert| {
        let mut flags = tls_flags(ca, cert);
        let retention = ["--retain-records", "1", "--retain-seconds", "0"];
        flags.extend(retention.map(String::from));
        flags.extend(["--trim-interval-ms", "50"].map(String::from));
        flags
    })
    .await;
    let mut client = primary.node.client().await.unwrap();
    let mut last = Seq(0);
    for _ in 0..20 {
        last = append(&mut client).await.unwrap();
    }
    let etcd = common::client(&primary.etcd).await;
    let layout = fencelog::keys::KeyLayout::new(&common::CLUSTER.parse().unwrap());
    let deadline = std::time::Instant::now() + STARTUP;
    while fencelog::etcd::trim::read_trimmed(&etcd, &layout, STARTUP)
        .await
        .unwrap()
        < Seq(2)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the log was never trimmed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let certificate = primary.ca.issue("s1", false);
    let args = tls_flags(&primary.ca, &certificate);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let spec = common::daemon_spec(
        &primary.etcd,
        primary.dir.path(),
        "standby",
        "s1",
        &args,
        &[],
    );
    let mut standby = NodeProcess::spawn(spec).expect("the standby starts");
    standby.set_api_access(ApiAccess {
        ca: Some(primary.ca.cert.clone()),
        client: Some(certificate),
        token: None,
    });
    let deadline = std::time::Instant::now() + STARTUP;
    let status = loop {
        let status = standby.status().await;
        if status.as_ref().is_ok_and(|s| s.applied_seq >= last.0)
            || std::time::Instant::now() > deadline
        {
            break status.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.applied_seq, last.0, "{status:?}");
    let log = standby.log_text();
    assert!(log.contains("installing a snapshot"), "{log}");
    assert!(
        log.contains("node state: stopped to install a snapshot"),
        "{log}"
    );
}
