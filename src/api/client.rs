//! The client: talks to one node, or finds the primary through the leader key in etcd so that
//! applications need not know addresses.

use std::time::Duration;

use tonic::transport::Channel;

use super::proto::wal_client::WalClient as Stub;
use super::proto::{self, StatusResponse};
use super::security::{ApiAccess, Authorization};
use super::{from_status, max_message_bytes};
use crate::error::{Error, Result};
use crate::etcd;
use crate::etcd::leadership::current_leader;
use crate::etcd::EtcdAccess;
use crate::keys::{ClusterId, KeyLayout};
use crate::limits::Limits;
use crate::primary::AppendAck;
use crate::record::{Epoch, Record, Seq};

/// How long connecting to a node or to etcd may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How often a client waiting for a leader tries again.
const RETRY: Duration = Duration::from_millis(100);

/// True for the refusals a client may wait through, because what they lack comes with a
/// cluster that is starting or failing over, and nothing of the request was taken: an etcd
/// that does not answer (yet), no leader key in etcd (yet), a node that does not listen (yet),
/// a node that does not lead (yet, or any more).
pub fn waits_for_leader(error: &Error) -> bool {
    matches!(
        error,
        Error::EtcdUnreachable { .. }
            | Error::NoLeader { .. }
            | Error::Unreachable { .. }
            | Error::NotLeader { .. }
    )
}

/// Where a client finds its node.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// A node's API address (`host:port`).
    Server(String),
    /// Whoever leads `cluster`, found through the leader key.
    Etcd {
        endpoints: Vec<String>,
        cluster: ClusterId,
        /// TLS and user for a secured etcd.
        access: EtcdAccess,
    },
}

/// A connection to one node. Cheap to clone: clones share the HTTP/2 connection, and calls
/// from clones are multiplexed on it.
#[derive(Clone)]
pub struct WalClient {
    home: Home,
    /// TLS and the token, for a secured API.
    access: ApiAccess,
    /// The token's header, sent with every call.
    authorization: Option<Authorization>,
    addr: String,
    stub: Stub<Channel>,
}

/// Where a client goes back to when nobody names the leader: an [`Endpoint`], connected.
#[derive(Clone)]
enum Home {
    Server(String),
    /// The one etcd client every leader lookup uses (boxed: it is large).
    Leader {
        etcd: Box<etcd_client::Client>,
        cluster: ClusterId,
    },
}

impl WalClient {
    /// Connects to the node `endpoint` names (for `Etcd`, the current leader), over a plain
    /// connection without a token.
    pub async fn connect(endpoint: Endpoint) -> Result<WalClient> {
        WalClient::connect_with(endpoint, ApiAccess::default()).await
    }

    /// [`connect`](Self::connect) to a secured API: over TLS, with a certificate or a token as
    /// `access` says.
    pub async fn connect_with(endpoint: Endpoint, access: ApiAccess) -> Result<WalClient> {
        let authorization = access.authorization()?;
        let (addr, home) = match endpoint {
            Endpoint::Server(addr) => (addr.clone(), Home::Server(addr)),
            Endpoint::Etcd {
                endpoints,
                cluster,
                access: etcd_access,
            } => {
                let named = |e| etcd::failure::at_endpoints(&endpoints, e);
                let etcd = etcd::connect_with(&endpoints, &etcd_access, CONNECT_TIMEOUT)
                    .await
                    .map_err(named)?;
                let leader = find_leader(&etcd, &cluster).await.map_err(named)?;
                (
                    leader,
                    Home::Leader {
                        etcd: Box::new(etcd),
                        cluster,
                    },
                )
            }
        };
        let stub = open(&addr, &access).await?;
        Ok(WalClient {
            home,
            authorization,
            access,
            addr,
            stub,
        })
    }

    /// [`connect_with`](Self::connect_with), waiting up to `wait` through what a cluster that
    /// is just starting lacks ([`waits_for_leader`]): a leader key in etcd, a node that
    /// listens. The last refusal is returned once `wait` has passed.
    pub async fn connect_waiting(
        endpoint: Endpoint,
        access: ApiAccess,
        wait: Duration,
    ) -> Result<WalClient> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match WalClient::connect_with(endpoint.clone(), access.clone()).await {
                Err(e) if waits_for_leader(&e) && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "no leader yet; waiting");
                    tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + RETRY))
                        .await;
                }
                connected => return connected,
            }
        }
    }

    /// [`append`](Self::append), waiting up to `wait` for a node that leads when the append
    /// is refused because none does yet ([`waits_for_leader`]: a primary still recovering,
    /// a failover under way): through etcd, for whichever node leads; for a named server,
    /// for that node (a refusal naming another leader is returned at once). Such a refusal
    /// comes before the records are given seqs, so sending them again cannot log them twice;
    /// any other error is returned at once.
    pub async fn append_waiting(
        &mut self,
        records: Vec<Record>,
        wait: Duration,
    ) -> Result<AppendAck> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let refusal = match self.append(records.clone()).await {
                Err(e) if self.can_wait_out(&e) => e,
                answered => return answered,
            };
            let mut hint = match (&refusal, &self.home) {
                (Error::NotLeader { leader }, Home::Leader { .. }) => leader.clone(),
                _ => None,
            };
            loop {
                if tokio::time::Instant::now() >= deadline {
                    return Err(refusal);
                }
                tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + RETRY)).await;
                match self.reconnect(hint.take().as_deref()).await {
                    Ok(()) => break,
                    Err(e) if waits_for_leader(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// True if [`append_waiting`](Self::append_waiting) waits through `refusal`: one
    /// [`waits_for_leader`] covers, except that a client of one named node waits only for that
    /// node to lead (it may be recovering, or in its failover), so a refusal naming another
    /// leader is final.
    pub fn can_wait_out(&self, refusal: &Error) -> bool {
        match (refusal, &self.home) {
            (
                Error::NotLeader {
                    leader: Some(leader),
                },
                Home::Server(addr),
            ) => leader == addr,
            _ => waits_for_leader(refusal),
        }
    }

    /// The address of the node this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// After a failover: connects to `leader` when a refusal named it, else finds the leader
    /// again through etcd (or reconnects to the same server).
    pub async fn reconnect(&mut self, leader: Option<&str>) -> Result<()> {
        let addr = match (leader, &self.home) {
            (Some(leader), _) => leader.to_owned(),
            (None, Home::Server(addr)) => addr.clone(),
            (None, Home::Leader { etcd, cluster }) => find_leader(etcd, cluster).await?,
        };
        self.stub = open(&addr, &self.access).await?;
        self.addr = addr;
        Ok(())
    }

    /// `message` as a request carrying the token, if there is one.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        Authorization::request(self.authorization.as_ref(), message)
    }

    /// Appends `records` as one unit; answered once they are committed.
    pub async fn append(&mut self, records: Vec<Record>) -> Result<AppendAck> {
        let request = proto::AppendRequest {
            records: records.into_iter().map(proto::Record::from).collect(),
            request_id: 0,
        };
        let response = self
            .stub
            .append(self.request(request))
            .await
            .map_err(|s| from_status(&s))?
            .into_inner();
        Ok(AppendAck {
            first_seq: Seq(response.first_seq),
            last_seq: Seq(response.last_seq),
        })
    }

    /// Pipelined appends: every request sent on `requests` is answered on the returned stream,
    /// in completion order, with its `request_id`.
    pub async fn append_stream(
        &mut self,
        requests: impl tokio_stream::Stream<Item = proto::AppendRequest> + Send + 'static,
    ) -> Result<tonic::Streaming<proto::AppendStreamResponse>> {
        let response = self
            .stub
            .append_stream(self.request(requests))
            .await
            .map_err(|s| from_status(&s))?;
        Ok(response.into_inner())
    }

    /// The committed records `from..=to` (`to` = `None`: through what the node holds now), in
    /// chunks, in seq order.
    pub async fn read(&mut self, from: Seq, to: Option<Seq>) -> Result<ReadStream> {
        let request = proto::ReadRequest {
            from_seq: from.0,
            to_seq: to.map_or(0, |to| to.0),
        };
        let stream = self
            .stub
            .read(self.request(request))
            .await
            .map_err(|s| from_status(&s))?
            .into_inner();
        Ok(ReadStream { stream })
    }

    /// The value of `key` on this node, from a state that has applied at least `min_seq`
    /// (waiting up to `timeout` for it), and that state's applied seq.
    pub async fn get(
        &mut self,
        key: Vec<u8>,
        min_seq: Seq,
        timeout: Duration,
    ) -> Result<(Option<Vec<u8>>, Seq)> {
        self.get_from(key, min_seq, false, timeout).await
    }

    /// The value of `key` from a state that has applied everything the node knew committed when
    /// the request arrived: on the primary, a linearizable read (every append acknowledged
    /// before it is visible; refused with [`Error::NotLeader`] if the node stopped leading).
    pub async fn get_consistent(
        &mut self,
        key: Vec<u8>,
        timeout: Duration,
    ) -> Result<(Option<Vec<u8>>, Seq)> {
        self.get_from(key, Seq::NONE, true, timeout).await
    }

    async fn get_from(
        &mut self,
        key: Vec<u8>,
        min_seq: Seq,
        consistent: bool,
        timeout: Duration,
    ) -> Result<(Option<Vec<u8>>, Seq)> {
        let request = proto::GetRequest {
            key,
            min_seq: min_seq.0,
            timeout_ms: u32::try_from(timeout.as_millis())
                .unwrap_or(u32::MAX)
                .max(1),
            consistent,
        };
        let response = self
            .stub
            .get(self.request(request))
            .await
            .map_err(|s| from_status(&s))?
            .into_inner();
        let value = response.found.then_some(response.value);
        Ok((value, Seq(response.applied_seq)))
    }

    pub async fn status(&mut self) -> Result<StatusResponse> {
        let response = self
            .stub
            .status(self.request(proto::StatusRequest {}))
            .await;
        Ok(response.map_err(|s| from_status(&s))?.into_inner())
    }

    /// The node's state as a snapshot: a header, then data chunks (see [`crate::snapshot`]).
    pub async fn snapshot(&mut self) -> Result<tonic::Streaming<proto::SnapshotChunk>> {
        let response = self
            .stub
            .snapshot(self.request(proto::SnapshotRequest {}))
            .await;
        Ok(response.map_err(|s| from_status(&s))?.into_inner())
    }

    /// Makes the node the primary; returns its epoch.
    pub async fn promote(&mut self, force: bool) -> Result<Epoch> {
        let response = self
            .stub
            .promote(self.request(proto::PromoteRequest { force }))
            .await;
        Ok(Epoch(
            response.map_err(|s| from_status(&s))?.into_inner().epoch,
        ))
    }
}

/// The records of a `Read`, chunk by chunk.
pub struct ReadStream {
    stream: tonic::Streaming<proto::ReadResponse>,
}

impl ReadStream {
    /// The next chunk; `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<(Seq, Record)>>> {
        let Some(chunk) = self.stream.message().await.map_err(|s| from_status(&s))? else {
            return Ok(None);
        };
        let records = chunk
            .records
            .into_iter()
            .map(|r| {
                let record = r.record.ok_or_else(|| Error::Rpc {
                    code: tonic::Code::DataLoss,
                    message: format!("the node sent seq {} without its record", r.seq),
                })?;
                Ok((Seq(r.seq), Record::from(record)))
            })
            .collect::<Result<_>>()?;
        Ok(Some(records))
    }
}

async fn open(addr: &str, access: &ApiAccess) -> Result<Stub<Channel>> {
    let unreachable = |reason: String| Error::Unreachable {
        addr: addr.to_owned(),
        reason,
    };
    let mut endpoint = Channel::from_shared(access.url(addr))
        .map_err(|e| unreachable(format!("not a host:port address ({e})")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    if let Some(tls) = access.client_tls()? {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| unreachable(format!("TLS settings refused: {}", error_chain(&e))))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| unreachable(error_chain(&e)))?;
    // No limit of the client's own on what it sends: the node's limits decide, and its refusal
    // says which (a client-side limit fails the call with a bare h2 protocol error).
    Ok(Stub::new(channel)
        .max_decoding_message_size(max_message_bytes(&Limits::default()))
        .max_encoding_message_size(usize::MAX))
}

/// The leader's API address, from the leader key.
async fn find_leader(etcd: &etcd_client::Client, cluster: &ClusterId) -> Result<String> {
    let layout = KeyLayout::new(cluster);
    match current_leader(etcd, &layout, CONNECT_TIMEOUT).await? {
        Some((leader, _)) => Ok(leader.addr),
        None => Err(Error::NoLeader {
            cluster: cluster.as_str().to_owned(),
        }),
    }
}

/// An error with its causes on one line ("transport error: connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
