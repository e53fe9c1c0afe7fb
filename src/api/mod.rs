//! The node API: a gRPC service (`proto/fencelog.proto`) that every node serves, and the client
//! that applications and the CLI use.
//!
//! Errors cross the wire as gRPC statuses whose message is the library error's one-line text;
//! a node that does not lead says so with `FAILED_PRECONDITION` and the leader's address in the
//! [`LEADER_HEADER`] metadata, which the client turns back into [`Error::NotLeader`].
//! [`security`] says who may call what: TLS, client certificates, a bearer token.

mod client;
pub mod security;
mod server;

pub use client::{waits_for_leader, Endpoint, WalClient};
pub use security::{ApiAccess, ApiSecurity};
pub use server::{serve, WalApi};

use crate::error::Error;
use crate::record::{Op, Record};

/// The generated protobuf messages and service stubs.
pub mod proto {
    tonic::include_proto!("fencelog.v1");
}

/// Metadata key carrying the leader's API address on a `NotLeader` refusal.
pub const LEADER_HEADER: &str = "fencelog-leader";

/// The largest message either side decodes: one maximal batch of payload plus protobuf framing.
/// Anything larger is refused by tonic with `OUT_OF_RANGE` before it is buffered.
pub fn max_message_bytes(limits: &crate::limits::Limits) -> usize {
    limits.max_batch_bytes + 64 * 1024
}

impl From<Record> for proto::Record {
    fn from(record: Record) -> Self {
        proto::Record {
            delete: record.op == Op::Delete,
            key: record.key,
            value: record.value,
        }
    }
}

impl From<proto::Record> for Record {
    fn from(record: proto::Record) -> Self {
        Record {
            op: if record.delete { Op::Delete } else { Op::Put },
            key: record.key,
            value: record.value,
        }
    }
}

/// The status a library error travels as.
pub fn to_status(error: &Error) -> tonic::Status {
    use tonic::Code;
    let code = match error {
        Error::NotLeader { .. } | Error::LeaderAlive { .. } | Error::NotKeyValue => {
            Code::FailedPrecondition
        }
        Error::RecordTooLarge { .. }
        | Error::DeleteWithValue { .. }
        | Error::AppendTooLarge { .. }
        | Error::EmptyAppend
        | Error::InvalidName { .. }
        | Error::InvalidRequest(_)
        | Error::RecordOverEtcdLimit { .. } => Code::InvalidArgument,
        Error::SeqNotInLog { .. } => Code::OutOfRange,
        Error::NotYetApplied { .. } => Code::DeadlineExceeded,
        Error::Fenced { .. }
        | Error::LeadershipLost { .. }
        | Error::ShuttingDown
        | Error::Etcd(_)
        | Error::EtcdTimeout(_)
        | Error::NoLeader { .. }
        | Error::NoSnapshotSource { .. }
        | Error::EtcdRequestTooLarge { .. } => Code::Unavailable,
        Error::CommitOutcomeUnknown { .. } => Code::Unknown,
        Error::Rpc { code, .. } => *code,
        _ => Code::Internal,
    };
    let mut status = tonic::Status::new(code, error.to_string());
    if let Error::NotLeader {
        leader: Some(leader),
    } = error
    {
        if let Ok(value) = leader.parse() {
            status.metadata_mut().insert(LEADER_HEADER, value);
        }
    }
    status
}

/// The library error a status stands for, as far as the client can tell.
pub fn from_status(status: &tonic::Status) -> Error {
    if status.code() == tonic::Code::FailedPrecondition {
        if let Some(leader) = status.metadata().get(LEADER_HEADER) {
            return Error::NotLeader {
                leader: leader.to_str().ok().map(str::to_owned),
            };
        }
        if status.message().starts_with("not the primary") {
            return Error::NotLeader { leader: None };
        }
    }
    let mut message = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().replace('\n', " ")
    };
    // A transport failure says what happened only in its causes ("connection reset").
    let mut cause = std::error::Error::source(status);
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = inner.source();
    }
    Error::Rpc {
        code: status.code(),
        message,
    }
}
