//! The crate's error types.
//!
//! [`BatchError`] says why bytes that claim to be a batch were refused; [`Error`] covers everything
//! else. Every message names what failed and, where an operator can act, what to do.

use std::path::PathBuf;

use crate::record::{Epoch, Seq, SeqExhausted};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an encoded batch was refused. A refused batch is never received into a log or applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchError {
    #[error("{len} bytes is shorter than the {header_len}-byte batch header")]
    Truncated { len: usize, header_len: usize },
    #[error("bad magic {found:02x?}: not a fencelog batch")]
    BadMagic { found: [u8; 4] },
    #[error(
        "batch format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("encoded batch is {len} bytes, over the limit of {limit}")]
    EncodedTooLarge { len: usize, limit: usize },
    #[error("header claims {len} uncompressed bytes, over the limit of {limit}")]
    UncompressedTooLarge { len: usize, limit: usize },
    #[error("header claims a batch of zero records")]
    Empty,
    #[error("header claims {count} records, more than {body_len} body bytes can hold")]
    TooManyRecords { count: u32, body_len: usize },
    #[error("header claims first seq 0; sequence numbers start at 1")]
    FirstSeqZero,
    #[error("{count} records from seq {first_seq} run past the largest sequence number")]
    SeqRangeOverflow { first_seq: u64, count: u32 },
    #[error("body does not decompress: {reason}")]
    Decompress { reason: String },
    #[error("body decompressed to {actual} bytes, header says {expected}")]
    UncompressedLenMismatch { expected: usize, actual: usize },
    #[error("checksum mismatch: header says {stored:#018x}, content hashes to {computed:#018x}")]
    ChecksumMismatch { stored: u64, computed: u64 },
    #[error("record {index} does not decode: {reason}")]
    RecordDecode { index: u32, reason: String },
    #[error("record {index}: {part} of {len} bytes is over the limit of {limit}")]
    RecordOverLimit {
        index: u32,
        part: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("record {index} is a delete that carries a value")]
    DeleteWithValue { index: u32 },
    #[error("{count} bytes follow the last record")]
    TrailingBytes { count: usize },
}

/// Everything else fencelog can fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },

    #[error("record {part} is {len} bytes, over the limit of {limit} bytes")]
    RecordTooLarge {
        part: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("a delete record carries a {len}-byte value; deletes have no value")]
    DeleteWithValue { len: usize },
    #[error(transparent)]
    SeqExhausted(#[from] SeqExhausted),
    #[error("a batch needs at least one record")]
    EmptyBatch,
    #[error("a batch cannot start at seq 0; sequence numbers start at 1")]
    BatchAtSeqZero,
    #[error("batch would be {len} {what} bytes, over the limit of {limit}: seal batches earlier")]
    BatchTooLarge {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("encoding a batch failed: {0}")]
    Encode(String),
    #[error("invalid limits: {0}")]
    InvalidLimits(String),

    #[error("corrupt batch: {0}")]
    CorruptBatch(#[from] BatchError),
    #[error("corrupt commit pointer: {0}")]
    CorruptPointer(String),
    #[error("key {key:?} is not a batch key")]
    NotABatchKey { key: String },

    #[error("cannot open the local store at {dir}: {source}; if it is damaged, move it aside and let the node rebuild it from etcd")]
    StoreOpen { dir: PathBuf, source: sled::Error },
    #[error("{dir} is not a fencelog store and not empty ({found}): fencelog never writes into a directory it did not create; give it an empty or new directory")]
    NotAStore { dir: PathBuf, found: String },
    #[error(
        "{path} is a file, not a directory: give the node a new or empty directory for its store"
    )]
    NotADirectory { path: PathBuf },
    #[error("node {node} of cluster {cluster} is already running, at {addr}: give this daemon another --node, or stop that one first (its claim was kept alive through a lease TTL of {ttl:?})")]
    NodeRunning {
        node: String,
        cluster: String,
        addr: String,
        ttl: std::time::Duration,
    },
    #[error("the local store at {dir} belongs elsewhere: {detail}")]
    StoreIdentity { dir: PathBuf, detail: String },
    #[error("there is no fencelog store at {dir}: give the data directory of a node")]
    NoStore { dir: PathBuf },
    #[error("the local store at {dir} is in use by another process: stop it first")]
    StoreLocked { dir: PathBuf },
    #[error("the local store at {dir} is damaged: {detail}; move it aside and let the node rebuild it from etcd")]
    StoreCorrupt { dir: PathBuf, detail: String },
    #[error("the local store at {dir} has format {found}, this build reads format {supported}; move it aside to rebuild it from etcd")]
    StoreFormat {
        dir: PathBuf,
        found: u64,
        supported: u64,
    },
    #[error("local store at {dir}: {source}")]
    StoreIo { dir: PathBuf, source: sled::Error },
    #[error("the state machine stopped: {0}")]
    State(#[from] crate::state::StateError),
    #[error("this node's state is not the key/value map (it runs a state machine of its embedder's own), so it has no values to get")]
    NotKeyValue,
    #[error(
        "batch starts at seq {found} but the log expects {expected}: the log never holds a gap"
    )]
    LogGap { expected: Seq, found: Seq },
    #[error("seq {seq} is not the end of a batch in the log; {what}")]
    NotBatchBoundary { seq: Seq, what: &'static str },
    #[error("cannot truncate the log to seq {to}: the state is already applied through {applied}")]
    TruncateBelowApplied { to: Seq, applied: Seq },
    #[error(
        "the log holds uncommitted batches up to seq {log_end}; commit or truncate them first"
    )]
    PendingTail { log_end: Seq },
    #[error("the batch at seq {seq} is from epoch {epoch}, older than epoch {previous}, which committed the seqs before it: refused")]
    EpochRegression {
        seq: Seq,
        epoch: Epoch,
        previous: Epoch,
    },
    #[error("seq {seq} is not in the local log, which holds seqs {oldest} through {newest}")]
    SeqNotInLog { seq: Seq, oldest: Seq, newest: Seq },

    #[error("not the primary{}", leader.as_ref().map(|l| format!(": the leader is at {l}")).unwrap_or_default())]
    NotLeader { leader: Option<String> },
    #[error("fenced: epoch {epoch} no longer leads ({})", match leader_epoch { Some(e) => format!("epoch {e} does"), None => "nobody does".into() })]
    Fenced {
        epoch: Epoch,
        leader_epoch: Option<Epoch>,
    },
    #[error("not committed: etcd refused a request of {bytes} bytes as too large (its --max-request-bytes is lower); this primary now seals batches of at most {cap} bytes: retry")]
    EtcdRequestTooLarge { bytes: usize, cap: usize },
    #[error("an append of {bytes} bytes cannot be committed: etcd refused a request of {refused} bytes (its --max-request-bytes), so batches are capped at {cap} bytes; raise etcd's --max-request-bytes or split the append")]
    RecordOverEtcdLimit {
        bytes: usize,
        refused: usize,
        cap: usize,
    },
    #[error("leadership lost: {reason}")]
    LeadershipLost { reason: String },
    #[error("the outcome of the commit of seqs {first_seq}..={last_seq} is unknown: {reason}; read the log to see whether they were committed")]
    CommitOutcomeUnknown {
        first_seq: Seq,
        last_seq: Seq,
        reason: String,
    },
    #[error("an append of {records} records and {bytes} bytes is larger than one batch ({max_records} records, {max_bytes} bytes): split it")]
    AppendTooLarge {
        records: usize,
        bytes: usize,
        max_records: usize,
        max_bytes: usize,
    },
    #[error("an append needs at least one record")]
    EmptyAppend,
    #[error("the local store has committed seqs through {local}, but etcd's latest is {etcd}: etcd lost committed data; restore it or move the store aside")]
    EtcdBehindLocal { local: Seq, etcd: Seq },
    #[error("etcd has no batch at seq {expected} ({}): the log has a gap", match found { Some(f) => format!("the next one starts at {f}"), None => "the log ends before it".into() })]
    MissingBatches { expected: Seq, found: Option<Seq> },
    #[error("seq {needed} was trimmed from etcd, which holds the log from seq {trimmed} on: this node needs a snapshot")]
    Trimmed { needed: Seq, trimmed: Seq },
    #[error("etcd did not answer within {0:?}")]
    EtcdTimeout(std::time::Duration),
    #[error("{leader} leads: promote only once its lease has expired, or force it (which revokes that lease)")]
    LeaderAlive { leader: String },
    #[error("invalid leader key value: {0}")]
    InvalidLeaderValue(String),
    #[error("invalid member registration: {0:?}")]
    InvalidMemberValue(String),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("etcd credentials: {0}")]
    Credentials(String),
    #[error("etcd refused access to {prefix}: {reason} (the etcd user's role must read and write that prefix)")]
    AccessDenied { prefix: String, reason: String },
    #[error("the node has applied through seq {applied}, not yet seq {wanted}, after waiting {waited:?}")]
    NotYetApplied {
        wanted: Seq,
        applied: Seq,
        waited: std::time::Duration,
    },
    #[error("nobody leads cluster {cluster}: no leader key in etcd")]
    NoLeader { cluster: String },
    #[error("no node could serve a snapshot ({refusals}); one can once its state reaches the log etcd holds: wait for the primary to apply, or start a standby that has")]
    NoSnapshotSource { refusals: String },
    #[error("cannot reach the node at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("node {node} {what}; its log is {}", log.display())]
    NodeProcess {
        node: String,
        what: String,
        log: PathBuf,
    },
    #[error("the snapshot is invalid: {0}; it was discarded and the store left as it was")]
    SnapshotInvalid(String),
    #[error("cannot hold the log in etcd for a snapshot: it was trimmed past the hold {attempts} times in a row")]
    TrimmedPastHold { attempts: usize },
    #[error("benchmark: {0}")]
    Benchmark(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("{message}")]
    Rpc { code: tonic::Code, message: String },
    #[error("a background task failed: {0}")]
    TaskFailed(String),
    #[error("shutting down")]
    ShuttingDown,

    #[error("etcd: {}", crate::etcd::failure::describe(.0))]
    Etcd(#[from] etcd_client::Error),
    #[error("cannot reach etcd at {endpoints}: {reason}")]
    EtcdUnreachable { endpoints: String, reason: String },
    #[error("{endpoints} is not an etcd endpoint: it does not answer etcd's gRPC API (an etcd client URL looks like http://127.0.0.1:2379, https:// for an etcd serving TLS)")]
    NotEtcd { endpoints: String },
    #[error("etcd at {endpoints} closed the connection without answering: is that an etcd client URL (http://127.0.0.1:2379, https:// for an etcd serving TLS)?")]
    EtcdClosed { endpoints: String },
    #[error("the etcd binary {binary:?} was not found: install it with `apt-get install etcd-server` (tools/test.sh does), or set FENCELOG_ETCD_BIN")]
    EtcdNotInstalled { binary: String },
    #[error("etcd did not start: {reason}\n--- last lines of its log ---\n{log_tail}")]
    EtcdStart { reason: String, log_tail: String },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}
