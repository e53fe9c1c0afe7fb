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

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

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
///
/// Each way is a reader thread and a writer thread over blocking sockets: the writer sleeps
/// until each chunk is due with the OS's timer (tens of microseconds here), where tokio's
/// timer rounds every sleep up to its next millisecond tick — through it, a proxy set to no
/// delay added ~3 ms to each of etcd's round trips, and a delay under 1 ms could not be had.
async fn forward(client: TcpStream, server: TcpStream, faults: Arc<Faults>) {
    let mut cuts = faults.cuts.subscribe();
    cuts.mark_unchanged();
    let Ok(connection) = Connection::new(client, server) else {
        return;
    };
    let ended = Arc::new(Notify::new());
    for (from, to, way) in [
        (&connection.client, &connection.server, Way::Request),
        (&connection.server, &connection.client, Way::Answer),
    ] {
        let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
            connection.close();
            return;
        };
        pipe(
            from,
            to,
            faults.clone(),
            way,
            connection.clone(),
            ended.clone(),
        );
    }
    tokio::select! {
        _ = cuts.changed() => connection.close(),
        () = ended.notified() => {}
    }
}

/// Both sockets of a proxied connection, to close it from any of its threads.
#[derive(Clone)]
struct Connection {
    client: Arc<std::net::TcpStream>,
    server: Arc<std::net::TcpStream>,
}

impl Connection {
    fn new(client: TcpStream, server: TcpStream) -> std::io::Result<Connection> {
        let open = |socket: TcpStream| -> std::io::Result<std::net::TcpStream> {
            socket.set_nodelay(true)?;
            let socket = socket.into_std()?;
            socket.set_nonblocking(false)?;
            Ok(socket)
        };
        Ok(Connection {
            client: Arc::new(open(client)?),
            server: Arc::new(open(server)?),
        })
    }

    /// Ends every read and write on either side: the threads of both ways then end.
    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Request,
    Answer,
}

/// Copies `from` to `to`, each chunk once it is due (read time + the delay), in order: a reader
/// stamps the chunks and a writer sleeps until each is due, so the delay is paid once per
/// chunk in flight, not once per chunk in turn. Either thread ending closes the connection (a
/// closed side has nothing more to say) and tells `ended`.
fn pipe(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    faults: Arc<Faults>,
    way: Way,
    connection: Connection,
    ended: Arc<Notify>,
) {
    let (due, chunks) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let finish = {
        let connection = connection.clone();
        move || {
            connection.close();
            ended.notify_one();
        }
    };
    let finish_reading = finish.clone();
    let reading = move || {
        let mut buf = vec![0; CHUNK];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            if way == Way::Answer && faults.answers_lost.load(Ordering::SeqCst) {
                continue;
            }
            let delay = Duration::from_micros(faults.delay_micros.load(Ordering::SeqCst));
            if due
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
        finish_reading();
    };
    let writing = move || {
        while let Ok((at, chunk)) = chunks.recv() {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        finish();
    };
    for (name, work) in [
        (
            "fencelog-proxy-read",
            Box::new(reading) as Box<dyn FnOnce() + Send>,
        ),
        ("fencelog-proxy-write", Box::new(writing)),
    ] {
        if std::thread::Builder::new()
            .name(name.into())
            .spawn(work)
            .is_err()
        {
            // No thread, no forwarding: the connection closes, as a failed network would.
            connection.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An upstream that echoes every byte back, and counts what it received.
    async fn echo_server() -> (String, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let received = Arc::new(AtomicU64::new(0));
        let counted = received.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0; 1024];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        counted.fetch_add(n as u64, Ordering::SeqCst);
                    }
                });
            }
        });
        (address, received)
    }

    async fn connect(proxy: &FaultProxy) -> TcpStream {
        let address = proxy.endpoint().strip_prefix("http://").unwrap();
        TcpStream::connect(address).await.unwrap()
    }

    async fn read_exactly(socket: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        tokio::time::timeout(Duration::from_secs(5), socket.read_exact(&mut buf))
            .await
            .expect("the answer comes")
            .unwrap();
        buf
    }

    #[tokio::test]
    async fn bytes_go_through_in_order_both_ways_each_way_held_for_the_delay() {
        let (upstream, _) = echo_server().await;
        let proxy = FaultProxy::start(&upstream).await.unwrap();
        proxy.delay(Duration::from_millis(30));
        let mut socket = connect(&proxy).await;
        let started = Instant::now();
        for part in [&b"one,"[..], b"two,", b"three"] {
            socket.write_all(part).await.unwrap();
        }
        assert_eq!(read_exactly(&mut socket, 13).await, b"one,two,three");
        assert!(started.elapsed() >= Duration::from_millis(60));
    }

    #[tokio::test]
    async fn lost_answers_reach_the_server_but_never_the_client() {
        let (upstream, received) = echo_server().await;
        let proxy = FaultProxy::start(&upstream).await.unwrap();
        let mut socket = connect(&proxy).await;
        proxy.lose_answers(true);
        socket.write_all(b"lost").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while received.load(Ordering::SeqCst) < 4 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(received.load(Ordering::SeqCst), 4);
        let mut buf = [0; 4];
        let answer = tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buf)).await;
        assert!(answer.is_err(), "an answer came through: {answer:?}");
        proxy.lose_answers(false);
        let mut later = connect(&proxy).await;
        later.write_all(b"kept").await.unwrap();
        assert_eq!(read_exactly(&mut later, 4).await, b"kept");
    }

    #[tokio::test]
    async fn a_cut_closes_the_open_connections_and_new_ones_go_through() {
        let (upstream, _) = echo_server().await;
        let proxy = FaultProxy::start(&upstream).await.unwrap();
        let mut before = connect(&proxy).await;
        before.write_all(b"x").await.unwrap();
        assert_eq!(read_exactly(&mut before, 1).await, b"x");
        proxy.cut();
        let mut buf = [0; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), before.read(&mut buf))
            .await
            .expect("the cut connection ends");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let mut after = connect(&proxy).await;
        after.write_all(b"y").await.unwrap();
        assert_eq!(read_exactly(&mut after, 1).await, b"y");
    }
}
