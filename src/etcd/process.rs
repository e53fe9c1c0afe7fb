//! A real etcd, started as a child process on loopback for tests, benches and demos.
//!
//! It listens on free 127.0.0.1 ports with a fresh data directory, runs with the flags operators
//! should use (a low `--snapshot-count`, so etcd does not keep gigabytes of raft entries in
//! memory), and is killed when dropped. The binary is `etcd` on the PATH, or `FENCELOG_ETCD_BIN`.
//! Fault tests can kill it (`kill -9`), restart it on the same ports and data, or pause it
//! (`SIGSTOP`) to make it hang rather than refuse. [`EtcdCluster`] runs several members as one
//! cluster, so that a member (or the raft leader) can be killed while the others serve.
//! [`EtcdProcess::start_tls`] serves its client port over TLS, for the security tests.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use tempfile::TempDir;

use crate::error::{Error, Result};
use crate::etcd::proxy::FaultProxy;
use crate::etcd::EtcdAccess;

/// How long etcd gets to answer after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of etcd's log quoted when it fails to start.
const LOG_TAIL_BYTES: u64 = 4096;

/// TLS on a test etcd's client port.
#[derive(Clone, Debug)]
pub struct EtcdServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA client certificates must chain to (`--trusted-ca-file`).
    pub client_ca: PathBuf,
    /// Refuse clients without a certificate from `client_ca` (`--client-cert-auth`).
    pub require_client_cert: bool,
    /// How the harness itself connects, to see that etcd answers.
    pub access: EtcdAccess,
}

/// A running etcd member, killed on drop.
pub struct EtcdProcess {
    child: Option<Child>,
    binary: String,
    name: String,
    /// `--initial-cluster`: every member's `name=peer-url`.
    initial_cluster: String,
    client_url: String,
    /// Where it listens for its peers.
    peer_url: String,
    /// Where its peers reach it (`--initial-advertise-peer-urls`): `peer_url`, or a delaying
    /// proxy in front of it.
    advertised_peer_url: String,
    data_dir: TempDir,
    log_path: PathBuf,
    tls: Option<EtcdServerTls>,
    /// More flags of etcd's own.
    flags: Vec<String>,
}

impl EtcdProcess {
    /// Starts etcd and waits until it answers. Retries with new ports if another process took
    /// the ones it picked.
    pub async fn start() -> Result<EtcdProcess> {
        Self::start_with(None, &[]).await
    }

    /// Starts etcd serving its client port over `tls` (the URL is `https://`).
    pub async fn start_tls(tls: EtcdServerTls) -> Result<EtcdProcess> {
        Self::start_with(Some(tls), &[]).await
    }

    /// Starts etcd with more flags of its own, e.g. `--max-request-bytes 262144`.
    pub async fn start_with_flags(flags: &[&str]) -> Result<EtcdProcess> {
        Self::start_with(None, flags).await
    }

    async fn start_with(tls: Option<EtcdServerTls>, flags: &[&str]) -> Result<EtcdProcess> {
        let mut last_error = None;
        for _ in 0..3 {
            match Self::start_once(tls.clone(), flags).await {
                Ok(etcd) => return Ok(etcd),
                Err(e @ Error::EtcdNotInstalled { .. }) => return Err(e),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("three attempts were made"))
    }

    async fn start_once(tls: Option<EtcdServerTls>, flags: &[&str]) -> Result<EtcdProcess> {
        let (name, peer_url) = ("fencelog-test".to_owned(), loopback_url()?);
        let initial_cluster = format!("{name}={peer_url}");
        let mut etcd = EtcdProcess::member(name, peer_url, initial_cluster)?;
        etcd.flags = flags.iter().map(|f| f.to_string()).collect();
        if tls.is_some() {
            etcd.client_url = etcd.client_url.replacen("http://", "https://", 1);
            etcd.tls = tls;
        }
        etcd.spawn()?;
        etcd.wait_ready().await?;
        Ok(etcd)
    }

    /// A member not started yet, with its own data directory and client port.
    fn member(name: String, peer_url: String, initial_cluster: String) -> Result<EtcdProcess> {
        let data_dir = tempfile::Builder::new()
            .prefix("fencelog-etcd-")
            .tempdir()?;
        Ok(EtcdProcess {
            child: None,
            binary: std::env::var("FENCELOG_ETCD_BIN").unwrap_or_else(|_| "etcd".into()),
            name,
            initial_cluster,
            client_url: loopback_url()?,
            advertised_peer_url: peer_url.clone(),
            peer_url,
            log_path: data_dir.path().join("etcd.log"),
            data_dir,
            tls: None,
            flags: Vec::new(),
        })
    }

    fn spawn(&mut self) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let (client_url, peer_url) = (&self.client_url, &self.peer_url);
        let advertised_peer_url = &self.advertised_peer_url;
        let mut command = Command::new(&self.binary);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.client_ca);
            if tls.require_client_cert {
                command.arg("--client-cert-auth");
            }
        }
        let child = command
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.data_dir.path().join("member"))
            .args([
                "--listen-client-urls",
                client_url,
                "--advertise-client-urls",
                client_url,
            ])
            .args([
                "--listen-peer-urls",
                peer_url,
                "--initial-advertise-peer-urls",
                advertised_peer_url,
            ])
            .args(["--initial-cluster", &self.initial_cluster])
            .args([
                "--snapshot-count",
                "5000",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ])
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::EtcdNotInstalled {
                    binary: self.binary.clone(),
                },
                _ => Error::Io(e),
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills etcd with SIGKILL, keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Both fail only if the process is already gone, which is what we want anyway.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data directory, and waits until it answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready().await
    }

    /// Freezes etcd (SIGSTOP): requests hang instead of failing, as with a stalled disk or a
    /// partition.
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)?;
        // kill(2) returns once the signal is queued; an etcd thread running on another core
        // may still answer a request sent right after. Returns only once etcd is stopped.
        let stat = format!("/proc/{}/stat", self.running_pid()?);
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let state = std::fs::read_to_string(&stat)?;
            // `pid (comm) state ...`: the state follows the last ')'.
            let stopped = state
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .is_some_and(|c| c == 'T' || c == 't');
            if stopped {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Io(std::io::Error::other(
                    "etcd did not stop within 2 s of SIGSTOP",
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lets a paused etcd run again (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn running_pid(&self) -> Result<libc::pid_t> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| Error::Io(std::io::Error::other("etcd is not running")))?;
        libc::pid_t::try_from(child.id()).map_err(|e| Error::Io(std::io::Error::other(e)))
    }

    fn signal(&self, signal: libc::c_int) -> Result<()> {
        let pid = self.running_pid()?;
        // SAFETY: kill(2) with a pid we spawned and still own; it touches no memory of ours.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The client URL, `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn endpoint(&self) -> &str {
        &self.client_url
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// A new client of this etcd.
    pub async fn client(&self) -> Result<Client> {
        let mut options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        if let Some(tls) = &self.tls {
            options = tls.access.apply(options)?;
        }
        Ok(Client::connect([self.client_url.as_str()], Some(options)).await?)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait()?,
                None => return Err(self.start_error("it is not running".into())),
            };
            if let Some(status) = exited {
                return Err(self.start_error(format!("it exited with {status}")));
            }
            let answer = match self.client().await {
                Ok(mut client) => client.status().await.map(drop).map_err(Error::from),
                Err(e) => Err(e),
            };
            match answer {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(self.start_error(format!(
                        "it did not answer at {} within {READY_TIMEOUT:?}: {e}",
                        self.client_url
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn start_error(&mut self, reason: String) -> Error {
        // Read the log first: the process may still be writing to it.
        let log_tail = read_tail(&self.log_path).unwrap_or_else(|e| format!("(unreadable: {e})"));
        Error::EtcdStart { reason, log_tail }
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        // SIGKILL ends a paused (SIGSTOPped) etcd as well.
        self.kill();
    }
}

/// Several etcd members forming one cluster on loopback, each killed on drop.
pub struct EtcdCluster {
    members: Vec<EtcdProcess>,
    /// The proxies its members reach each other through, when they are a round trip apart:
    /// dropped after the members.
    _peer_proxies: Vec<FaultProxy>,
}

impl EtcdCluster {
    /// Starts `size` members together (none answers before a quorum has started) and waits
    /// until each answers. Retries with new ports if another process took the ones it picked.
    pub async fn start(size: usize) -> Result<EtcdCluster> {
        Self::start_apart(size, Duration::ZERO).await
    }

    /// As [`EtcdCluster::start`], with every member `each_way` from the others: each member
    /// advertises a delaying proxy ([`FaultProxy`]) in front of its peer port, so raft's
    /// replication pays the round trip, as between hosts. No proxy when `each_way` is zero.
    pub async fn start_apart(size: usize, each_way: Duration) -> Result<EtcdCluster> {
        let mut last_error = None;
        for _ in 0..3 {
            match Self::start_once(size, each_way).await {
                Ok(cluster) => return Ok(cluster),
                Err(e @ Error::EtcdNotInstalled { .. }) => return Err(e),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("three attempts were made"))
    }

    async fn start_once(size: usize, each_way: Duration) -> Result<EtcdCluster> {
        let mut peers = Vec::with_capacity(size);
        let mut proxies = Vec::new();
        for i in 0..size {
            let listen = loopback_url()?;
            let advertised = if each_way.is_zero() {
                listen.clone()
            } else {
                let proxy = FaultProxy::start(&listen).await?;
                proxy.delay(each_way);
                let url = proxy.endpoint().to_owned();
                proxies.push(proxy);
                url
            };
            peers.push((format!("member-{i}"), listen, advertised));
        }
        let initial_cluster = peers
            .iter()
            .map(|(name, _, advertised)| format!("{name}={advertised}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = peers
            .into_iter()
            .map(|(name, listen, advertised)| {
                let mut member = EtcdProcess::member(name, listen, initial_cluster.clone())?;
                member.advertised_peer_url = advertised;
                Ok(member)
            })
            .collect::<Result<Vec<_>>>()?;
        for member in &mut members {
            member.spawn()?;
        }
        for member in &mut members {
            member.wait_ready().await?;
        }
        Ok(EtcdCluster {
            members,
            _peer_proxies: proxies,
        })
    }

    /// Every member's client URL, comma-separated, as `--etcd` takes them.
    pub fn endpoints(&self) -> String {
        let urls: Vec<&str> = self.members.iter().map(EtcdProcess::endpoint).collect();
        urls.join(",")
    }

    pub fn member(&mut self, index: usize) -> &mut EtcdProcess {
        &mut self.members[index]
    }

    /// The index of the member that is raft leader now: the one that says it leads itself.
    pub async fn leader(&self) -> Result<usize> {
        for (index, member) in self.members.iter().enumerate() {
            if member.child.is_none() {
                continue;
            }
            let Ok(mut client) = member.client().await else {
                continue;
            };
            if let Ok(status) = client.status().await {
                if status.header().map(|h| h.member_id()) == Some(status.leader()) {
                    return Ok(index);
                }
            }
        }
        Err(Error::Io(std::io::Error::other(
            "no running etcd member says it leads",
        )))
    }
}

/// `http://127.0.0.1:PORT` on a port that was free a moment ago.
fn loopback_url() -> Result<String> {
    Ok(format!("http://127.0.0.1:{}", free_port()?))
}

/// A port that was free a moment ago; etcd may still lose a race for it, hence the retries.
pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn read_tail(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    Ok(String::from_utf8_lossy(&tail).into_owned())
}
