//! A `fencelog primary` or `fencelog standby` daemon run as a child process, for the demo and
//! the tests that need real processes (kill -9, SIGSTOP, graceful shutdown). Ports are picked
//! free on 127.0.0.1; stderr goes to a log file; the process is killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::api::proto::StatusResponse;
use crate::api::{ApiAccess, Endpoint, WalClient};
use crate::error::{Error, Result};
use crate::etcd::process::free_port;

/// How to start a daemon.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// The `fencelog` binary.
    pub binary: PathBuf,
    /// `primary` or `standby`.
    pub role: String,
    pub cluster: String,
    pub node: String,
    pub etcd: String,
    pub data_dir: PathBuf,
    /// Where stderr (the daemon's log) goes.
    pub log: PathBuf,
    /// More flags, e.g. `--failover`, `--lease-ttl 2`.
    pub extra_args: Vec<String>,
    /// Extra environment variables (e.g. `FAILPOINTS` for a build with fail points).
    pub env: Vec<(String, String)>,
}

pub struct NodeProcess {
    spec: NodeSpec,
    api: String,
    metrics: String,
    child: Option<Child>,
    /// How [`NodeProcess::client`] reaches a secured API.
    api_access: ApiAccess,
}

impl NodeProcess {
    /// Starts the daemon on free loopback ports.
    pub fn spawn(spec: NodeSpec) -> Result<NodeProcess> {
        let mut node = NodeProcess {
            api: format!("127.0.0.1:{}", free_port()?),
            metrics: format!("127.0.0.1:{}", free_port()?),
            spec,
            child: None,
            api_access: ApiAccess::default(),
        };
        node.start()?;
        Ok(node)
    }

    /// Makes [`client`](Self::client) (and the status calls that wait on the node) reach its
    /// API with `access`: for a daemon serving TLS or wanting a token.
    pub fn set_api_access(&mut self, access: ApiAccess) {
        self.api_access = access;
    }

    /// Starts it again (after a kill or a stop) on the same ports and data directory.
    pub fn start(&mut self) -> Result<()> {
        self.kill();
        let spec = &self.spec;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)?;
        let child = Command::new(&spec.binary)
            .arg(&spec.role)
            .args(["--cluster", &spec.cluster, "--node", &spec.node])
            .args(["--etcd", &spec.etcd])
            .args(["--listen", &self.api, "--metrics", &self.metrics])
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .args(&spec.extra_args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| self.failed(format!("cannot start: {e}")))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.spec.node
    }

    /// The API address.
    pub fn api(&self) -> &str {
        &self.api
    }

    /// The metrics and health address.
    pub fn metrics_addr(&self) -> &str {
        &self.metrics
    }

    pub fn data_dir(&self) -> &Path {
        &self.spec.data_dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub async fn client(&self) -> Result<WalClient> {
        WalClient::connect_with(Endpoint::Server(self.api.clone()), self.api_access.clone()).await
    }

    /// Polls the node's status until its role is `role` (and its state `state`); fails if the
    /// process exits or `limit` passes first.
    pub async fn wait_for(
        &mut self,
        role: &str,
        state: Option<&str>,
        limit: Duration,
    ) -> Result<StatusResponse> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(exit) = self.try_exit()? {
                return Err(self.failed(format!("exited ({exit}) while waiting to be {role}")));
            }
            let last = match self.status().await {
                Ok(status) if status.role == role && state.map_or(true, |s| s == status.state) => {
                    return Ok(status)
                }
                Ok(status) => format!("{} / {}", status.role, status.state),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(self.failed(format!("not {role} after {limit:?} (last seen: {last})")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node's status; a node that does not answer within 10 s is an error, not a hang.
    pub async fn status(&self) -> Result<StatusResponse> {
        let limit = Duration::from_secs(10);
        let status = async { self.client().await?.status().await };
        tokio::time::timeout(limit, status)
            .await
            .map_err(|_| self.failed(format!("did not answer a status call within {limit:?}")))?
    }

    /// SIGKILL; does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Already exited is fine: the point is that it no longer runs.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`, `libc::SIGSTOP`).
    pub fn signal(&self, signal: i32) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| self.failed("is not running".into()))?;
        let pid = i32::try_from(pid).map_err(|_| self.failed("has no valid pid".into()))?;
        // SAFETY: signalling our own child process, which we have not reaped yet.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Waits up to `limit` for the process to exit; kills it if it does not.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(exit) = self.try_exit()? {
                self.child = None;
                return Ok(exit);
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(self.failed(format!("did not exit within {limit:?}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for the exit.
    pub async fn stop(&mut self, limit: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        self.wait_exit(limit).await
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.spec.log).unwrap_or_default()
    }

    fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Err(self.failed("is not running".into())),
        }
    }

    fn failed(&self, what: String) -> Error {
        Error::NodeProcess {
            node: self.spec.node.clone(),
            what,
            log: self.spec.log.clone(),
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
