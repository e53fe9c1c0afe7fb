//! A secured etcd: TLS with client certificates and user/password auth, and a least-privilege
//! role per cluster. Certificates are generated here (rcgen); etcd is real, started with
//! `--client-cert-auth` and auth enabled.

mod common;

use common::pki::Authority;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{GetOptions, Permission};
use fencelog::credentials::{ClientCertificate, Secret};
use fencelog::etcd::access::{EtcdTls, EtcdUser};
use fencelog::etcd::process::{EtcdProcess, EtcdServerTls};
use fencelog::etcd::EtcdAccess;
use fencelog::local_store::LocalStore;
use fencelog::metrics::Metrics;
use fencelog::node_process::{NodeProcess, NodeSpec};
use fencelog::primary::Primary;
use fencelog::record::Record;
use tempfile::TempDir;

const TIMEOUT: Duration = Duration::from_secs(5);
const STARTUP: Duration = Duration::from_secs(30);
const ROOT_PASSWORD: &str = "root-password";
const ALPHA_PASSWORD: &str = "alpha-password";

/// An etcd that requires TLS client certificates from `ca` and has auth enabled, with `root`,
/// and users `alpha` and `beta` whose roles read and write only their own cluster's prefix.
struct SecuredEtcd {
    etcd: EtcdProcess,
    ca: Authority,
    _dir: TempDir,
}

impl SecuredEtcd {
    async fn start() -> SecuredEtcd {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new(dir.path(), "trusted");
        let server = ca.issue("localhost", false);
        let root_access = EtcdAccess {
            tls: Some(EtcdTls {
                ca: ca.cert.clone(),
                client: Some(ca.issue("root", false)),
            }),
            user: None,
        };
        let etcd = EtcdProcess::start_tls(EtcdServerTls {
            cert: server.cert,
            key: server.key,
            client_ca: ca.cert.clone(),
            require_client_cert: true,
            access: root_access,
        })
        .await
        .expect("etcd starts with TLS");
        let mut auth = etcd.client().await.unwrap().auth_client();
        auth.user_add("root", ROOT_PASSWORD, None).await.unwrap();
        auth.user_grant_role("root", "root").await.unwrap();
        for (user, password) in [("alpha", ALPHA_PASSWORD), ("beta", "beta-password")] {
            let role = format!("fencelog-{user}");
            auth.role_add(role.as_str()).await.unwrap();
            let prefix = format!("/fencelog/{user}/");
            auth.role_grant_permission(role.as_str(), Permission::read_write(prefix).with_prefix())
                .await
                .unwrap();
            auth.user_add(user, password, None).await.unwrap();
            auth.user_grant_role(user, role.as_str()).await.unwrap();
        }
        auth.auth_enable().await.unwrap();
        SecuredEtcd {
            etcd,
            ca,
            _dir: dir,
        }
    }

    /// Access as `user` with `password`, over TLS with a client certificate from our CA.
    fn access(&self, user: &str, password: &str) -> EtcdAccess {
        EtcdAccess {
            tls: Some(EtcdTls {
                ca: self.ca.cert.clone(),
                client: Some(self.ca.issue(user, false)),
            }),
            user: Some(EtcdUser {
                name: user.into(),
                password: Secret::new(password),
            }),
        }
    }

    async fn connect(&self, access: &EtcdAccess) -> fencelog::Result<etcd_client::Client> {
        fencelog::etcd::connect_with(&[self.etcd.endpoint().to_owned()], access, TIMEOUT).await
    }

    /// How many keys etcd holds under `prefix`, counted as root.
    async fn keys_under(&self, prefix: &str) -> i64 {
        let root = self
            .connect(&self.access("root", ROOT_PASSWORD))
            .await
            .unwrap();
        root.kv_client()
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .unwrap()
            .count()
    }
}

/// Starts a primary of `cluster` through `client` on a fresh store.
async fn start_primary(
    client: etcd_client::Client,
    cluster: &str,
) -> (fencelog::Result<Primary>, TempDir) {
    let (started, _, dir) = start_configured_primary(client, cluster, |_| ()).await;
    (started, dir)
}

/// [`start_primary`] with `configure` applied to its settings; also returns its metrics.
async fn start_configured_primary(
    client: etcd_client::Client,
    cluster: &str,
    configure: impl FnOnce(&mut fencelog::config::PrimaryConfig),
) -> (fencelog::Result<Primary>, Arc<Metrics>, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(dir.path(), Default::default()).unwrap());
    let mut config = fencelog::config::PrimaryConfig::new(
        cluster.parse().unwrap(),
        "p1".parse().unwrap(),
        "127.0.0.1:1",
    );
    config.lease_ttl = Duration::from_secs(2);
    config.lease_safety_margin = Duration::from_millis(500);
    configure(&mut config);
    let metrics = Arc::new(Metrics::new().unwrap());
    let started = tokio::time::timeout(
        Duration::from_secs(20),
        Primary::start(client, store, config, metrics.clone()),
    )
    .await
    .expect("starting a primary is bounded");
    (started, metrics, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_its_clusters_role_commits_over_tls() {
    let etcd = SecuredEtcd::start().await;
    let client = etcd
        .connect(&etcd.access("alpha", ALPHA_PASSWORD))
        .await
        .expect("alpha connects");
    let (primary, _dir) = start_primary(client, "alpha").await;
    let primary = primary.expect("alpha leads its own cluster");
    let ack = primary
        .append(vec![Record::put("k", "v")])
        .await
        .expect("alpha appends");
    assert_eq!(ack.last_seq.0, 1);
    primary.shutdown().await.unwrap();
    assert!(etcd.keys_under("/fencelog/alpha/").await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_primary_trims_and_compacts_its_own_log() {
    let etcd = SecuredEtcd::start().await;
    let client = etcd
        .connect(&etcd.access("alpha", ALPHA_PASSWORD))
        .await
        .expect("alpha connects");
    let (primary, metrics, _dir) = start_configured_primary(client, "alpha", |config| {
        config.retention.retain_records = 1;
        config.retention.retain_seconds = 0;
        config.retention.interval = Duration::from_millis(100);
    })
    .await;
    let primary = primary.expect("alpha leads its own cluster");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metrics.compactions.get() == 0 && std::time::Instant::now() < deadline {
        primary.append(vec![Record::put("k", "v")]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(metrics.trims.get() > 0, "never trimmed");
    assert!(metrics.compactions.get() > 0, "never compacted");
    primary.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_wrong_password_is_refused_with_a_clear_error() {
    let etcd = SecuredEtcd::start().await;
    let Err(error) = etcd
        .connect(&etcd.access("alpha", "not-the-password"))
        .await
    else {
        panic!("a wrong password connects");
    };
    let message = error.to_string();
    assert!(message.contains("authentication failed"), "{message}");
    assert!(!message.contains("not-the-password"), "{message}");
    assert_eq!(etcd.keys_under("/fencelog/").await, 0);
}

#[tokio::test]
async fn a_role_scoped_to_another_cluster_cannot_touch_this_one() {
    let etcd = SecuredEtcd::start().await;
    let client = etcd
        .connect(&etcd.access("beta", "beta-password"))
        .await
        .expect("beta connects");
    let (primary, _dir) = start_primary(client, "alpha").await;
    let message = primary.err().expect("beta leads alpha").to_string();
    assert!(message.contains("permission denied"), "{message}");
    assert_eq!(etcd.keys_under("/fencelog/alpha/").await, 0);
}

/// Connecting with `tls` instead of a certificate from the trusted CA fails, and writes nothing.
async fn refused_over(etcd: &SecuredEtcd, tls: EtcdTls) -> String {
    let access = EtcdAccess {
        tls: Some(tls),
        user: Some(EtcdUser {
            name: "alpha".into(),
            password: Secret::new(ALPHA_PASSWORD),
        }),
    };
    let refused = match etcd.connect(&access).await {
        Err(e) => e.to_string(),
        Ok(client) => start_primary(client, "alpha")
            .await
            .0
            .err()
            .expect("a refused certificate commits")
            .to_string(),
    };
    assert_eq!(etcd.keys_under("/fencelog/").await, 0);
    refused
}

/// [`refused_over`] TLS that trusts etcd's CA and presents `client`.
async fn refused_client(etcd: &SecuredEtcd, client: Option<ClientCertificate>) -> String {
    let tls = EtcdTls {
        ca: etcd.ca.cert.clone(),
        client,
    };
    refused_over(etcd, tls).await
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let etcd = SecuredEtcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let foreign = Authority::new(dir.path(), "foreign");
    let message = refused_over(
        &etcd,
        EtcdTls {
            ca: foreign.cert.clone(),
            client: Some(etcd.ca.issue("alpha", false)),
        },
    )
    .await;
    assert!(message.contains("UnknownIssuer"), "{message}");
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let etcd = SecuredEtcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let foreign = Authority::new(dir.path(), "foreign");
    let message = refused_client(&etcd, Some(foreign.issue("alpha", false))).await;
    assert!(
        message.contains("did not accept the client certificate"),
        "{message}"
    );
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    let etcd = SecuredEtcd::start().await;
    let message = refused_client(&etcd, Some(etcd.ca.issue("alpha", true))).await;
    assert!(
        message.contains("did not accept the client certificate"),
        "{message}"
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let etcd = SecuredEtcd::start().await;
    let message = refused_client(&etcd, None).await;
    assert!(
        message.contains("did not accept a client without a certificate"),
        "{message}"
    );
}

/// The flags that reach the secured etcd as `user` with a certificate from its CA; the password
/// is given apart ([`password_file_flag`] or `FENCELOG_ETCD_PASSWORD`).
fn daemon_flags(etcd: &SecuredEtcd, user: &str) -> Vec<String> {
    let certificate = etcd.ca.issue(user, false);
    [
        ("--etcd-ca", &etcd.ca.cert),
        ("--etcd-cert", &certificate.cert),
        ("--etcd-key", &certificate.key),
    ]
    .into_iter()
    .flat_map(|(flag, path)| [flag.to_owned(), path.display().to_string()])
    .chain(["--etcd-user".to_owned(), user.to_owned()])
    .collect()
}

/// `--etcd-password-file` with `password` written into a file in `dir`.
fn password_file_flag(dir: &Path, password: &str) -> [String; 2] {
    let file = dir.join("etcd-password");
    std::fs::write(&file, format!("{password}\n")).unwrap();
    ["--etcd-password-file".into(), file.display().to_string()]
}

fn daemon(
    etcd: &SecuredEtcd,
    dir: &Path,
    role: &str,
    name: &str,
    args: Vec<String>,
    env: &[(&str, &str)],
) -> NodeProcess {
    NodeProcess::spawn(NodeSpec {
        binary: env!("CARGO_BIN_EXE_fencelog").into(),
        role: role.into(),
        cluster: "alpha".into(),
        node: name.into(),
        etcd: etcd.etcd.endpoint().into(),
        data_dir: dir.join(name),
        log: dir.join(format!("{name}.log")),
        extra_args: args,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
    .expect("the daemon starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_with_a_least_privilege_user_run_end_to_end_and_never_show_the_password() {
    let etcd = SecuredEtcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let flags = daemon_flags(&etcd, "alpha");
    let with_file = [
        flags.clone(),
        password_file_flag(dir.path(), ALPHA_PASSWORD).into(),
    ]
    .concat();
    let mut primary = daemon(&etcd, dir.path(), "primary", "p1", with_file, &[]);
    primary.wait_for("primary", None, STARTUP).await.unwrap();
    // The standby takes its password from the environment.
    let env = [("FENCELOG_ETCD_PASSWORD", ALPHA_PASSWORD)];
    let mut standby = daemon(&etcd, dir.path(), "standby", "s1", flags, &env);
    standby
        .wait_for("standby", Some("watching"), STARTUP)
        .await
        .unwrap();

    let mut client = primary.client().await.unwrap();
    let ack = client
        .append(vec![Record::put("k", "v")])
        .await
        .expect("the primary commits through the secured etcd");
    let deadline = std::time::Instant::now() + STARTUP;
    let status = loop {
        let status = standby.status().await.unwrap();
        if status.applied_seq >= ack.last_seq.0 || std::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.applied_seq, ack.last_seq.0, "{status:?}");

    let shown = format!(
        "{status:?}{:?}{}{}",
        primary.status().await.unwrap(),
        primary.log_text(),
        standby.log_text()
    );
    assert!(
        !shown.contains(ALPHA_PASSWORD),
        "the password shows: {shown}"
    );
    assert_eq!(
        primary.log_text().matches("unauthenticated").count(),
        1,
        "the API's lack of authentication is said once at start"
    );
    standby.stop(STARTUP).await.unwrap();
    primary.stop(STARTUP).await.unwrap();
}

#[tokio::test]
async fn a_daemon_whose_role_is_another_clusters_exits_saying_so() {
    let etcd = SecuredEtcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        daemon_flags(&etcd, "beta"),
        password_file_flag(dir.path(), "beta-password").into(),
    ]
    .concat();
    let mut primary = daemon(&etcd, dir.path(), "primary", "p1", flags, &[]);
    let exit = primary.wait_exit(STARTUP).await.unwrap();
    assert!(!exit.success());
    let log = primary.log_text();
    assert!(
        log.contains("permission denied") && log.contains("/fencelog/alpha/"),
        "{log}"
    );
    assert_eq!(etcd.keys_under("/fencelog/").await, 0);
}
