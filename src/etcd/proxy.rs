//! A TCP proxy on loopback in front of etcd, for fault tests: the network faults a real etcd
//! cannot be asked for.
//!
//! It forwards bytes both ways, in order, until told otherwise: [`FaultProxy::delay`] holds
//! every chunk for a while each way (a network round trip; pipelined: chunks behind one in
//! flight are not held up further), [`FaultProxy::lose_answers`] keeps forwarding requests to
//! etcd but throws its answers away (a reply lost on the way back: etcd did the work, the
//! client never hears of it), and [`FaultProxy::cut`] closes every open connection (a network
//! partition that heals at once: clients reconnect). A client connects to
//! [`FaultProxy::endpoint`] instead of etcd's own.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::Result;

/// Bytes forwarded per read.
const CHUNK: usize = 64 << 10;

/// What every connection of the proxy looks at.
struct Faults {
    /// Each way, in microseconds.
    delay_micros: AtomicU64,
    answers_lost: AtomicBool,
    /// Bumped by every cut: connections opened before it close.
    cuts: watch::Sender<u64>,
}

/// A running proxy; it stops (with its connections) when dropped.
pub struct FaultProxy {
    endpoint: String,
    faults: Arc<Faults>,
    acceptor: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`, an etcd client URL
    /// (`http://127.0.0.1:PORT`) or a bare `host:port`.
    pub async fn start(upstream: &str) -> Result<FaultProxy> {
        let upstream = upstream
            .strip_prefix("http://")
            .unwrap_or(upstream)
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let faults = Arc::new(Faults {
            delay_micros: AtomicU64::new(0),
            answers_lost: AtomicBool::new(false),
            cuts: watch::channel(0).0,
        });
        let shared = faults.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let faults = shared.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    // A connection etcd refuses ends at once, as a direct one would.
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        forward(client, server, faults).await;
                    }
                });
            }
        });
        Ok(FaultProxy {
            endpoint,
            faults,
            acceptor,
        })
    }

    /// The URL to give a client instead of etcd's.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// From now on, every chunk is held for `each_way` in either direction.
    pub fn delay(&self, each_way: Duration) {
        let micros = u64::try_from(each_way.as_micros()).unwrap_or(u64::MAX);
        self.faults.delay_micros.store(micros, Ordering::SeqCst);
    }

    /// From now on, etcd's answers are thrown away (`true`) or forwarded again (`false`).
    pub fn lose_answers(&self, lost: bool) {
        self.faults.answers_lost.store(lost, Ordering::SeqCst);
    }

    /// Closes every connection open now; new ones are accepted as before.
    pub fn cut(&self) {
        self.faults.cuts.send_modify(|cuts| *cuts += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        // Closes the connections still open.
        self.cut();
    }
}

/// Forwards both ways until either side closes or the proxy cuts the connection.
async fn forward(client: TcpStream, server: TcpStream, faults: Arc<Faults>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut cuts = faults.cuts.subscribe();
    cuts.mark_unchanged();
    let (from_client, to_client) = client.into_split();
    let (from_server, to_server) = server.into_split();
    tokio::select! {
        _ = pipe(from_client, to_server, &faults, Way::Request) => {}
        _ = pipe(from_server, to_client, &faults, Way::Answer) => {}
        _ = cuts.changed() => {}
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Request,
    Answer,
}

/// Copies `from` to `to`, each chunk once it is due (read time + the delay), in order: a reader
/// stamps the chunks and a writer sleeps until each is due, so the delay is paid once per
/// chunk in flight, not once per chunk in turn.
async fn pipe(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    faults: &Faults,
    way: Way,
) {
    let (due, mut chunks) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reading = async move {
        let mut buf = vec![0; CHUNK];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                return;
            }
            if way == Way::Answer && faults.answers_lost.load(Ordering::SeqCst) {
                continue;
            }
            let delay = Duration::from_micros(faults.delay_micros.load(Ordering::SeqCst));
            if due
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    };
    let writing = async move {
        while let Some((at, chunk)) = chunks.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // Either half ending ends the connection: a closed side has nothing more to say.
    tokio::select! {
        () = reading => {}
        () = writing => {}
    }
}
