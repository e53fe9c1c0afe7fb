//! The gRPC service over a [`Node`]: appends go to its term while it leads, reads and gets to
//! its local store, whatever its role.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::proto::wal_server::{Wal, WalServer};
use super::proto::{self, append_stream_response::Outcome};
use super::security::ApiSecurity;
use super::{max_message_bytes, to_status};
use crate::error::{Error, Result};
use crate::local_store::{blocking, LocalStore};
use crate::node::Node;
use crate::record::{Record, Seq};

/// Records per `Read` response message, at most.
const READ_CHUNK_RECORDS: usize = 1024;
/// Payload bytes per `Read` response message, at most (unless one record is larger): keeps
/// each message under the decode limit whatever the record sizes.
const READ_CHUNK_BYTES: usize = 1024 * 1024;
/// Appends of one `AppendStream` in flight at once; the stream stops reading beyond it.
const STREAM_IN_FLIGHT: usize = 64;
/// How long `Get` waits for `min_seq` when the request does not say.
const DEFAULT_GET_TIMEOUT: Duration = Duration::from_secs(10);

pub struct WalApi {
    node: Arc<Node>,
    /// This node's own API address, reported by `Status`.
    address: String,
    security: ApiSecurity,
}

impl WalApi {
    pub fn new(node: Arc<Node>, address: String, security: ApiSecurity) -> WalApi {
        WalApi {
            node,
            address,
            security,
        }
    }
}

/// Serves the API on `listener` until `shutdown` resolves; in-flight calls finish first.
pub async fn serve(
    api: WalApi,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let limit = max_message_bytes(&api.node.config().primary.limits);
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = api.security.server_tls()? {
        server = server
            .tls_config(tls)
            .map_err(|e| Error::Credentials(format!("the API's TLS settings are refused: {e}")))?;
    }
    let service = WalServer::new(api)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    // Without TCP_NODELAY, small answers wait ~40 ms for the client's delayed ACK.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    server
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::Rpc {
            code: tonic::Code::Internal,
            message: format!("the API server failed: {e}"),
        })
}

/// The local log's received seq once it reaches `wanted`, or after [`DEFAULT_GET_TIMEOUT`].
async fn local_log_reaching(store: &Arc<LocalStore>, wanted: Seq) -> Result<Seq> {
    let deadline = tokio::time::Instant::now() + DEFAULT_GET_TIMEOUT;
    loop {
        let reader = store.clone();
        let received = blocking(move || reader.positions()).await?.received_seq;
        if received >= wanted || tokio::time::Instant::now() >= deadline {
            return Ok(received);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn records_of(request: proto::AppendRequest) -> Vec<Record> {
    request.records.into_iter().map(Record::from).collect()
}

fn ack(ack: crate::primary::AppendAck) -> proto::AppendResponse {
    proto::AppendResponse {
        first_seq: ack.first_seq.0,
        last_seq: ack.last_seq.0,
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Wal for WalApi {
    async fn append(
        &self,
        request: Request<proto::AppendRequest>,
    ) -> std::result::Result<Response<proto::AppendResponse>, Status> {
        self.security.authorize(&request)?;
        let records = records_of(request.into_inner());
        let acked = self.node.append(records).await;
        acked
            .map(|a| Response::new(ack(a)))
            .map_err(|e| to_status(&e))
    }

    type AppendStreamStream = BoxStream<proto::AppendStreamResponse>;

    async fn append_stream(
        &self,
        request: Request<Streaming<proto::AppendRequest>>,
    ) -> std::result::Result<Response<Self::AppendStreamStream>, Status> {
        self.security.authorize(&request)?;
        let mut inbound = request.into_inner();
        let (answers, answered) = mpsc::channel(STREAM_IN_FLIGHT);
        let node = self.node.clone();
        tokio::spawn(async move {
            let in_flight = Arc::new(Semaphore::new(STREAM_IN_FLIGHT));
            loop {
                let request = match inbound.message().await {
                    Ok(Some(request)) => request,
                    Ok(None) => return,
                    Err(status) => {
                        // A malformed or oversized message ends the stream with its status.
                        let _ = answers.send(Err(status)).await;
                        return;
                    }
                };
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    return;
                };
                let node = node.clone();
                let answers = answers.clone();
                tokio::spawn(async move {
                    let request_id = request.request_id;
                    let outcome = match node.append(records_of(request)).await {
                        Ok(a) => Outcome::Ack(ack(a)),
                        Err(e) => {
                            let leader = match &e {
                                Error::NotLeader { leader } => leader.clone().unwrap_or_default(),
                                _ => String::new(),
                            };
                            let status = to_status(&e);
                            Outcome::Failure(proto::Failure {
                                code: status.code() as i32,
                                message: status.message().to_owned(),
                                leader,
                            })
                        }
                    };
                    let response = proto::AppendStreamResponse {
                        request_id,
                        outcome: Some(outcome),
                    };
                    // A client that hung up no longer wants the answer.
                    let _ = answers.send(Ok(response)).await;
                    drop(permit);
                });
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(answered))))
    }

    type ReadStream = BoxStream<proto::ReadResponse>;

    async fn read(
        &self,
        request: Request<proto::ReadRequest>,
    ) -> std::result::Result<Response<Self::ReadStream>, Status> {
        let request = request.into_inner();
        let from = Seq(request.from_seq.max(1));
        if request.to_seq != 0 && request.to_seq < from.0 {
            return Err(to_status(&Error::InvalidRequest(format!(
                "to_seq {} is below from_seq {}",
                request.to_seq, from
            ))));
        }
        let store = self.node.store().clone();
        // Read-your-writes: an acknowledged seq may reach the local log a moment after its
        // ack, so wait (briefly) for the log to hold what this node knows is committed.
        let committed = self.node.status().committed_seq;
        let wanted = match request.to_seq {
            0 => committed,
            to => Seq(to.min(committed.0)),
        };
        let received = local_log_reaching(&store, wanted)
            .await
            .map_err(|e| to_status(&e))?;
        let to = match request.to_seq {
            0 => received,
            to => Seq(to.min(received.0)),
        };
        let (chunks, chunked) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut next = from;
            while next <= to {
                let want = ((to.0 - next.0 + 1) as usize).min(READ_CHUNK_RECORDS);
                let store = store.clone();
                let read = blocking(move || store.read(next, want, READ_CHUNK_BYTES)).await;
                let message = match read {
                    Ok(records) if records.is_empty() => return,
                    Ok(records) => {
                        next = Seq(records.last().map_or(to.0, |(seq, _)| seq.0) + 1);
                        Ok(proto::ReadResponse {
                            records: records
                                .into_iter()
                                .map(|(seq, record)| proto::SeqRecord {
                                    seq: seq.0,
                                    record: Some(record.into()),
                                })
                                .collect(),
                        })
                    }
                    Err(e) => Err(to_status(&e)),
                };
                let failed = message.is_err();
                if chunks.send(message).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(chunked))))
    }

    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> std::result::Result<Response<proto::GetResponse>, Status> {
        let request = request.into_inner();
        // A consistent read waits for what was committed when it arrived; on the primary it is
        // answered only if the term that knew that is still held once the value is read.
        let (committed, leading) = match request.consistent {
            true => self.node.consistent_read_point(),
            false => (Seq::NONE, None),
        };
        let wanted = Seq(request.min_seq).max(committed);
        let timeout = match request.timeout_ms {
            0 => DEFAULT_GET_TIMEOUT,
            ms => Duration::from_millis(ms.into()),
        };
        match tokio::time::timeout(timeout, self.node.wait_applied(wanted)).await {
            Ok(applied) => applied.map_err(|e| to_status(&e))?,
            Err(_) => {
                return Err(to_status(&Error::NotYetApplied {
                    wanted,
                    applied: self.node.status().applied_seq,
                    waited: timeout,
                }))
            }
        };
        let store = self.node.store().clone();
        let (value, applied) = blocking(move || store.get_applied(&request.key))
            .await
            .map_err(|e| to_status(&e))?;
        if leading.is_some_and(|primary| !primary.is_leading()) {
            return Err(to_status(&Error::NotLeader {
                leader: self.node.other_leader_addr().await,
            }));
        }
        Ok(Response::new(proto::GetResponse {
            found: value.is_some(),
            value: value.unwrap_or_default(),
            applied_seq: applied.0,
        }))
    }

    async fn status(
        &self,
        _request: Request<proto::StatusRequest>,
    ) -> std::result::Result<Response<proto::StatusResponse>, Status> {
        let status = self.node.status();
        let leader = match self.node.leader().await {
            Ok(leader) => leader,
            Err(e) => {
                tracing::debug!(error = %e, "status: cannot read the leader key");
                None
            }
        };
        Ok(Response::new(proto::StatusResponse {
            cluster: status.cluster,
            node: status.node,
            role: status.role.to_owned(),
            state: status.state.name().to_owned(),
            epoch: status.epoch.0,
            committed_seq: status.committed_seq.0,
            received_seq: status.received_seq.0,
            applied_seq: status.applied_seq.0,
            receive_lag_seconds: status.receive_lag_seconds,
            apply_lag_seconds: status.apply_lag_seconds,
            leader_node: leader.as_ref().map(|info| info.node.as_str().to_owned()),
            leader: leader.map(|info| info.addr),
            address: self.address.clone(),
            error: status.error,
        }))
    }

    type SnapshotStream = BoxStream<proto::SnapshotChunk>;

    async fn snapshot(
        &self,
        _request: Request<proto::SnapshotRequest>,
    ) -> std::result::Result<Response<Self::SnapshotStream>, Status> {
        let store = self.node.store().clone();
        let (header, file) = blocking(move || crate::snapshot::export(&store))
            .await
            .map_err(|e| to_status(&e))?;
        // A snapshot must continue into the log etcd holds, or its installer would need
        // another one at once.
        let trimmed = self.node.etcd_trimmed().await.map_err(|e| to_status(&e))?;
        if header.seq.saturating_add(1) < trimmed.0 {
            return Err(Status::failed_precondition(format!(
                "this node's state is at seq {}, but etcd holds the log only from seq {trimmed}: \
                 a snapshot from it could not be followed; it can serve one once its state \
                 reaches seq {} (trimming waits for it)",
                header.seq,
                trimmed.0 - 1
            )));
        }
        tracing::info!(
            seq = header.seq,
            keys = header.keys,
            bytes = header.bytes,
            "sending a snapshot"
        );
        let (chunks, chunked) = mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            use proto::snapshot_chunk::Kind;
            let first = proto::SnapshotChunk {
                kind: Some(Kind::Header(header)),
            };
            if chunks.blocking_send(Ok(first)).is_err() {
                return;
            }
            let mut frames = crate::snapshot::FrameReader::new(file);
            loop {
                let chunk = match frames.next_frame() {
                    Ok(Some(data)) => Ok(proto::SnapshotChunk {
                        kind: Some(Kind::Data(data)),
                    }),
                    Ok(None) => return,
                    Err(e) => Err(to_status(&e)),
                };
                let chunk = cut_off(chunk);
                let failed = chunk.is_err();
                // A client that hung up no longer wants the rest.
                if chunks.blocking_send(chunk).is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(chunked))))
    }

    async fn promote(
        &self,
        request: Request<proto::PromoteRequest>,
    ) -> std::result::Result<Response<proto::PromoteResponse>, Status> {
        self.security.authorize(&request)?;
        let force = request.into_inner().force;
        self.node.promote(force).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(proto::PromoteResponse {
            epoch: self.node.status().epoch.0,
        }))
    }
}

/// Fail point `api::cut_off_snapshot_stream` (tests): the snapshot stream breaks instead of sending a chunk.
fn cut_off(
    chunk: std::result::Result<proto::SnapshotChunk, Status>,
) -> std::result::Result<proto::SnapshotChunk, Status> {
    fail::fail_point!("api::cut_off_snapshot_stream", |_| Err(Status::aborted(
        "the snapshot stream was cut off"
    )));
    chunk
}
