//! A real etcd, started as a child process on loopback for tests, benches and demos.
//!
//! It listens on free 127.0.0.1 ports with a fresh data directory, runs with the flags operators
//! should use (a low `--snapshot-count`, so etcd does not keep gigabytes of raft entries in
//! memory), and is killed when dropped. The binary is `etcd` on the PATH, or `FENCELOG_ETCD_BIN`.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use tempfile::TempDir;

use crate::error::{Error, Result};

/// How long etcd gets to answer after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of etcd's log quoted when it fails to start.
const LOG_TAIL_BYTES: u64 = 4096;

/// A running etcd member, killed on drop.
pub struct EtcdProcess {
    child: Child,
    client_url: String,
    data_dir: TempDir,
    log_path: PathBuf,
}

impl EtcdProcess {
    /// Starts etcd and waits until it answers. Retries with new ports if another process took
    /// the ones it picked.
    pub async fn start() -> Result<EtcdProcess> {
        let mut last_error = None;
        for _ in 0..3 {
            match Self::start_once().await {
                Ok(etcd) => return Ok(etcd),
                Err(e @ Error::EtcdNotInstalled { .. }) => return Err(e),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("three attempts were made"))
    }

    async fn start_once() -> Result<EtcdProcess> {
        let binary = std::env::var("FENCELOG_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let data_dir = tempfile::Builder::new()
            .prefix("fencelog-etcd-")
            .tempdir()?;
        let client_url = format!("http://127.0.0.1:{}", free_port()?);
        let peer_url = format!("http://127.0.0.1:{}", free_port()?);
        let log_path = data_dir.path().join("etcd.log");
        let log = File::create(&log_path)?;
        let child = Command::new(&binary)
            .args(["--name", "fencelog-test"])
            .arg("--data-dir")
            .arg(data_dir.path().join("member"))
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("fencelog-test={peer_url}")])
            .args([
                "--snapshot-count",
                "5000",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::EtcdNotInstalled {
                    binary: binary.clone(),
                },
                _ => Error::Io(e),
            })?;
        let mut etcd = EtcdProcess {
            child,
            client_url,
            data_dir,
            log_path,
        };
        etcd.wait_ready().await?;
        Ok(etcd)
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.client_url
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// A new client of this etcd.
    pub async fn client(&self) -> Result<Client> {
        let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        Ok(Client::connect([self.client_url.as_str()], Some(options)).await?)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
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
        // Both fail only if the process is already gone, which is what we want anyway.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago; etcd may still lose a race for it, hence the retries.
fn free_port() -> Result<u16> {
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
