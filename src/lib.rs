//! fencelog: a replicated write-ahead log.
//!
//! A primary gives each appended record a dense sequence number, packs records into batches,
//! and commits each batch to etcd in one transaction fenced on its leadership key, so a deposed
//! primary can never commit. Standbys read and watch those batches, keep an exact copy of the
//! log in a local sled store, and apply it to a materialized key/value state.
//!
//! Module map (see `docs/ARCHITECTURE.md` for the data flow and the invariants):
//! - [`record`]: records, sequence numbers and epochs;
//! - [`limits`]: size limits shared by the append path and the decoder;
//! - [`batch`]: the batch wire format (bincode, xxh3, zstd) and its defensive decoder;
//! - [`keys`]: validated cluster and node names and the etcd key layout;
//! - [`pointer`](mod@pointer): the `/latest` commit pointer;
//! - [`etcd`]: the commit layer: leadership, the fenced commit transaction, reading batches
//!   back, a secured etcd's TLS and user, and a real etcd process for tests;
//! - [`local_store`]: the sled store of a node (log, state checkpoint, positions);
//! - [`state`]: the state in memory behind the [`state::StateMachine`] trait, the built-in
//!   key/value map, and its checkpoint;
//! - [`applier`]: applies received batches to the state, off the commit path;
//! - [`config`]: the primary's settings and their defaults;
//! - [`credentials`]: secrets that are never printed, and PEM files, for etcd and the API;
//! - [`primary`]: the append API and the double-buffered commit pipeline;
//! - [`lifecycle`]: a node's states and the one table of the moves between them (pure);
//! - [`standby`]: follows the committed log into the local store (read, then watch);
//! - [`node`]: a standby that takes over when the primary goes, and follows again after;
//! - [`node_process`]: a daemon as a child process, for the demo and process-level tests;
//! - [`api`]: the gRPC node API and its client;
//! - [`http`]: the `/metrics`, `/healthz` and `/readyz` endpoint;
//! - [`snapshot`]: a node's state exported, streamed and installed, for nodes the log was
//!   trimmed past;
//! - [`metrics`]: the Prometheus registry;
//! - [`checker`]: the history checker (acknowledged vs committed vs applied);
//! - [`workload`]: synthetic records for benches, tests and the load tool;
//! - [`bench`](mod@bench): the workloads `fencelog bench` and the criterion benches share;
//! - [`error`]: the crate's error type.

pub mod api;
pub mod applier;
pub mod batch;
pub mod bench;
pub mod checker;
pub mod config;
pub mod credentials;
pub mod error;
pub mod etcd;
pub mod http;
pub mod keys;
pub mod lifecycle;
pub mod limits;
pub mod local_store;
pub mod metrics;
pub mod node;
pub mod node_process;
pub mod pointer;
pub mod primary;
pub mod record;
pub mod snapshot;
pub mod standby;
pub mod state;
mod supervise;
pub mod workload;

pub use error::{BatchError, Error, Result};
