//! A node's local sled store: the log of batches, the state it materializes (in memory, with
//! its checkpoint), and the positions that say how far each has come.
//!
//! | tree         | key                     | value                                         |
//! |--------------|-------------------------|-----------------------------------------------|
//! | `log`        | first seq (big-endian)  | the encoded batch, as committed to etcd       |
//! | `checkpoint` | `meta`, `p` + page id   | the state as of one seq ([`crate::state::checkpoint`]) |
//! | `meta`       | `format`, `lease_id`, `claim_lease`, `log_base`, `log_base_epoch` | u64, big-endian |
//! | `meta`       | `identity`              | `<cluster> <node> <log id>`, UTF-8            |
//! | `meta`       | `received`              | received seq and its batch's epoch, u64 + u64, big-endian |
//!
//! The log and the state advance separately, like a Postgres standby's received and replayed
//! positions. The state is a [`StateMachine`] in memory, applied a whole batch at a time
//! ([`apply_next`](LocalStore::apply_next)); its durable copy is the last checkpoint
//! ([`checkpoint`](LocalStore::checkpoint)), and `open` rebuilds it from that checkpoint and the
//! log after it. Invariants, kept by every write and checked on open:
//! - the log is contiguous: each batch starts right after the one before it;
//! - `log_base <= checkpoint_seq <= applied_seq <= received_seq <= log end`; `checkpoint_seq`,
//!   `applied_seq` and `received_seq` end batches (or are the log's base);
//! - `received_seq` moves only after the log write it covers (or, for a primary's write-ahead
//!   batch, once etcd has committed it); a crash in between leaves a log tail past
//!   `received_seq`, which is never read or applied, and which the node drops before it follows
//!   etcd again;
//! - the log keeps every batch after `checkpoint_seq`: it is the state's redo.
//!
//! No sled transactions, on purpose: sled 0.34 runs each one under a process-wide write lock,
//! and once any transaction has run, every sled read and write in the process takes that lock
//! too. These invariants rest instead on each single-key write and each batch being atomic and on
//! sled recovering a prefix of the writes after a crash (its log is replayed up to the first
//! torn write). `kill_9_never_leaves_a_position_ahead_of_its_data` checks it.
//!
//! All calls block on sled; async callers run them on a blocking thread. Never call sled's
//! `flush_async` from many tasks (it deadlocks in 0.34.7): this store flushes with `flush()`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use sled::Tree;

use crate::batch::{BatchDecoder, BatchHeader, EncodedBatch};
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::record::{Epoch, Op, Record, RecordRef, Seq};
use crate::state::checkpoint::{self, CheckpointMeta, PageTable};
use crate::state::{kv_factory, Changes, Factory, KvState, PageWrite, StateError, StateMachine};

/// The layout version this build writes. It reads [`MIGRATED_FORMAT`] too, and rewrites it.
pub const STORE_FORMAT: u64 = 3;
/// The layout before the state moved into memory: the state was a sled tree `state` of one
/// entry per key, applied in steps (`applied_seq`, `applying_through`). Opening such a store
/// turns it into a checkpoint once.
pub const MIGRATED_FORMAT: u64 = 2;

/// A file beside sled's own, written once the store exists. sled recovers a damaged file by
/// keeping what it can read, which may be nothing: the marker tells "new" from "lost".
const MARKER_FILE: &str = "fencelog-store";

const FORMAT: &[u8] = b"format";
const RECEIVED: &[u8] = b"received";
/// Format 2's state positions, read only to migrate it.
const APPLIED_SEQ: &[u8] = b"applied_seq";
const APPLYING_THROUGH: &[u8] = b"applying_through";
/// Format 2's state tree, read only to migrate it.
const FORMAT_2_STATE: &str = "state";
const LEASE_ID: &[u8] = b"lease_id";
/// The lease of the node's claim on its name (`nodes/<node>`), so that a restarted daemon
/// recognises its own claim from before a crash.
const CLAIM_LEASE: &[u8] = b"claim_lease";
/// The seq the log starts after: the state up to it came from a snapshot (0: from the start).
const LOG_BASE: &[u8] = b"log_base";
/// The epoch that committed seq `log_base` (the batch is gone: dropped by local retention, or
/// before a snapshot): a snapshot taken at the base carries it.
const LOG_BASE_EPOCH: &[u8] = b"log_base_epoch";
/// Whose store this is: `<cluster> <node> <log id>`, recorded the first time a node uses it.
const IDENTITY: &[u8] = b"identity";

/// When the store makes its writes durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushPolicy {
    /// Flush after every log write and every applied batch: a write is on disk when the call
    /// returns. The default.
    EveryWrite,
    /// Let sled flush in the background every `interval_ms`: faster, and a crash may lose the
    /// last writes, which the node then fetches again from etcd.
    Background { interval_ms: u64 },
}

/// How a store is opened. The default: [`Limits::default`], [`FlushPolicy::EveryWrite`] and
/// the built-in [`KvState`].
#[derive(Clone)]
pub struct StoreOptions {
    /// The limits batches in the log were encoded with; decoding checks against them.
    pub limits: Limits,
    pub flush: FlushPolicy,
    /// Makes the empty state machine the log is applied to and the checkpoint loaded into.
    pub state: Factory,
    /// When the node's applier checkpoints the state.
    pub checkpoint: checkpoint::Policy,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            limits: Limits::default(),
            flush: FlushPolicy::EveryWrite,
            state: kv_factory(),
            checkpoint: checkpoint::Policy::default(),
        }
    }
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("limits", &self.limits)
            .field("flush", &self.flush)
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

/// How far the log and the state have come.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Positions {
    /// The log holds every committed record up to here.
    pub received_seq: Seq,
    /// The state (in memory) reflects the log up to here.
    pub applied_seq: Seq,
    /// The state's last checkpoint is as of here: a restart replays the log after it.
    pub checkpoint_seq: Seq,
    /// The last seq in the log, committed or not; above `received_seq` only on a primary whose
    /// write-ahead batch is still being committed.
    pub log_end_seq: Seq,
    /// The epoch of the batch that ends at `received_seq`.
    pub received_epoch: Epoch,
}

/// A digest of the state at one applied seq ([`crate::state::Digest`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateDigest {
    pub applied_seq: Seq,
    pub keys: u64,
    /// The wrapping sum of [`crate::state::pair_hash`] over every pair.
    pub digest: u64,
}

impl StateDigest {
    pub fn at(applied_seq: Seq, digest: crate::state::Digest) -> StateDigest {
        StateDigest {
            applied_seq,
            keys: digest.keys,
            digest: digest.value,
        }
    }
}

/// What the log holds, for operators.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub batches: u64,
    /// The first seq of the oldest batch; 0 when the log is empty.
    pub oldest_seq: Seq,
    /// Encoded (compressed) bytes of all batches.
    pub bytes: u64,
}

/// How much of its local log a node keeps ([`LocalStore::apply_retention`]); by default everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalRetention {
    pub retain_records: u64,
    pub retain_bytes: u64,
}

impl Default for LocalRetention {
    fn default() -> Self {
        LocalRetention {
            retain_records: u64::MAX,
            retain_bytes: u64::MAX,
        }
    }
}

impl LocalRetention {
    pub fn keeps_everything(&self) -> bool {
        *self == LocalRetention::default()
    }
}

/// One batch of the log as retention sees it: its seqs, size and seal time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoggedBatch {
    pub first_seq: Seq,
    pub last_seq: Seq,
    /// Encoded (compressed) bytes.
    pub bytes: u64,
    pub sealed_at_micros: u64,
}

/// The seqs just applied to the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppliedRange {
    pub first_seq: Seq,
    pub last_seq: Seq,
    /// When the primary sealed the batch these records belong to.
    pub sealed_at_micros: u64,
}

/// The state machine, and how far the log has been applied to it.
struct Applied {
    machine: Box<dyn StateMachine>,
    seq: Seq,
    /// The epoch of the batch that ends at `seq`.
    epoch: Epoch,
}

/// The checkpoint as written: its page table, and whether the next checkpoint must write
/// every page (one failed part way, after its changes were taken from the machine).
#[derive(Default)]
struct Checkpointer {
    table: PageTable,
    full: bool,
}

/// What one checkpoint wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointStats {
    pub meta: CheckpointMeta,
    /// Pages written or removed, and the bytes written.
    pub pages: usize,
    pub bytes: u64,
}

pub struct LocalStore {
    dir: PathBuf,
    db: sled::Db,
    log: Tree,
    checkpoint: Tree,
    meta: Tree,
    limits: Limits,
    flush: FlushPolicy,
    factory: Factory,
    checkpoint_policy: checkpoint::Policy,
    /// Serializes log writes (append, commit, truncate): each checks the log's end, then writes.
    writer: Mutex<()>,
    /// One flush at a time: sled 0.34.7's flushes are not safe to run from many threads at once.
    flusher: Mutex<()>,
    /// The state. Applying a batch and taking a checkpoint's changes hold it for writing, briefly.
    state: RwLock<Applied>,
    /// Serializes applying: held from reading a batch to applying it. Holds the decoder.
    applier: Mutex<BatchDecoder>,
    /// Serializes checkpoints and snapshot exports, which read the checkpoint whole.
    checkpointer: Mutex<Checkpointer>,
    /// The seq of the last checkpoint written.
    checkpoint_seq: AtomicU64,
    /// The first I/O error sled reported. sled 0.34 fails every later write once one failed
    /// (disk full, a failing disk), even when the cause is gone: only reopening recovers.
    failure: OnceLock<String>,
}

impl LocalStore {
    /// Opens the store in `dir`, creating it if `dir` is absent or empty. Refuses a directory
    /// that holds anything but a fencelog store (fencelog never writes into, nor later
    /// removes, what it did not create), a store of another format, and one whose positions
    /// do not fit its log.
    pub fn open(dir: impl AsRef<Path>, options: StoreOptions) -> Result<LocalStore> {
        let dir = dir.as_ref().to_path_buf();
        let marker = dir.join(MARKER_FILE);
        let existed = marker.exists();
        if !existed {
            check_ours_or_empty(&dir)?;
        }
        let mut config = sled::Config::new().path(&dir);
        if let FlushPolicy::Background { interval_ms } = options.flush {
            config = config.flush_every_ms(Some(interval_ms));
        }
        let db = open_waiting_for_lock(&config, &dir)?;
        let open_tree = |name: &str| {
            db.open_tree(name).map_err(|source| Error::StoreOpen {
                dir: dir.clone(),
                source,
            })
        };
        let store = LocalStore {
            log: open_tree("log")?,
            checkpoint: open_tree("checkpoint")?,
            meta: open_tree("meta")?,
            state: RwLock::new(Applied {
                machine: (options.state)(),
                seq: Seq::NONE,
                epoch: Epoch::default(),
            }),
            applier: Mutex::new(BatchDecoder::new(options.limits.clone())?),
            checkpointer: Mutex::new(Checkpointer::default()),
            checkpoint_seq: AtomicU64::new(0),
            failure: OnceLock::new(),
            factory: options.state,
            checkpoint_policy: options.checkpoint,
            limits: options.limits,
            flush: options.flush,
            writer: Mutex::new(()),
            flusher: Mutex::new(()),
            db,
            dir,
        };
        let format = store.check_format(existed)?;
        if !existed {
            write_marker(&marker)?;
        }
        store.check_positions()?;
        match format {
            MIGRATED_FORMAT => store.migrate_from_format_2()?,
            _ => store.load_checkpoint()?,
        }
        store.replay()?;
        Ok(store)
    }

    /// Opens the store that exists in `dir`, for a command that only reads: refuses, and
    /// creates nothing, where there is none.
    pub fn open_existing(dir: impl AsRef<Path>, options: StoreOptions) -> Result<LocalStore> {
        let dir = dir.as_ref();
        if !dir.join(MARKER_FILE).exists() {
            return Err(Error::NoStore {
                dir: dir.to_path_buf(),
            });
        }
        LocalStore::open(dir, options)
    }

    /// Opens the store in `dir`; one that is damaged (sled reports corruption, or lost the data
    /// the store was created with) is moved aside to `<dir>.damaged-<unix seconds>`, never
    /// used, and an empty store takes its place, to be rebuilt from etcd. Returns where the
    /// damaged store went, if it was moved. Any other failure (a lock, another format, I/O) is
    /// returned as is: those need a person.
    pub fn open_or_rebuild(
        dir: impl AsRef<Path>,
        options: StoreOptions,
    ) -> Result<(LocalStore, Option<PathBuf>)> {
        let dir = dir.as_ref();
        match LocalStore::open(dir, options.clone()) {
            Err(e @ Error::StoreCorrupt { .. })
            | Err(
                e @ Error::StoreOpen {
                    source: sled::Error::Corruption { .. },
                    ..
                },
            ) => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let mut aside = dir.as_os_str().to_owned();
                aside.push(format!(".damaged-{stamp}"));
                let aside = PathBuf::from(aside);
                std::fs::rename(dir, &aside)?;
                tracing::error!(error = %e, moved_to = %aside.display(), "the local store is damaged; moved it aside, rebuilding from etcd");
                Ok((LocalStore::open(dir, options)?, Some(aside)))
            }
            other => other.map(|store| (store, None)),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The options this store was opened with: a store that replaces it (a snapshot) is opened
    /// with the same.
    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            limits: self.limits.clone(),
            flush: self.flush,
            state: self.factory.clone(),
            checkpoint: self.checkpoint_policy,
        }
    }

    /// Binds the store to `identity` the first time, and afterwards refuses any other: a store
    /// of another cluster or node, or of a log etcd no longer has (its prefix wiped and created
    /// anew, another etcd), would mix two logs. A store written before identities were recorded
    /// is bound on its first use.
    pub fn bind_identity(&self, identity: &StoreIdentity) -> Result<()> {
        let recorded = self.meta.get(IDENTITY).map_err(|e| self.io(e))?;
        let Some(recorded) = recorded else {
            self.meta
                .insert(IDENTITY, identity.encode().as_bytes())
                .map_err(|e| self.io(e))?;
            return self.flush();
        };
        let recorded = StoreIdentity::decode(&recorded)
            .ok_or_else(|| self.corrupt("its identity record does not parse".into()))?;
        if let Some(detail) = recorded.mismatch(identity) {
            return Err(Error::StoreIdentity {
                dir: self.dir.clone(),
                detail,
            });
        }
        Ok(())
    }

    /// The I/O error that made this store unusable until it is reopened, if one did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    pub fn positions(&self) -> Result<Positions> {
        let (received_seq, received_epoch) = self.received()?;
        Ok(Positions {
            received_seq,
            applied_seq: self.read_applied().seq,
            checkpoint_seq: Seq(self.checkpoint_seq.load(Ordering::SeqCst)),
            log_end_seq: self.log_end()?,
            received_epoch,
        })
    }

    /// Appends committed batches in order, each followed by `received_seq` advanced over it;
    /// each must start right after the one before (the first right after `received_seq`). With
    /// [`FlushPolicy::EveryWrite`] they are flushed once, together, before the call returns: one flush per group, not per batch, because a flush also carries
    /// whatever the applier wrote meanwhile.
    pub fn append_committed_all(&self, batches: &[EncodedBatch]) -> Result<()> {
        for batch in batches {
            self.append_unflushed(batch)?;
        }
        self.flush_if_every_write()
    }

    /// Appends one committed batch; see [`append_committed_all`](Self::append_committed_all).
    pub fn append_committed(&self, batch: &EncodedBatch) -> Result<()> {
        self.append_committed_all(std::slice::from_ref(batch))
    }

    fn append_unflushed(&self, batch: &EncodedBatch) -> Result<()> {
        let _writer = lock(&self.writer);
        let positions = self.positions()?;
        if positions.log_end_seq != positions.received_seq {
            return Err(Error::PendingTail {
                log_end: positions.log_end_seq,
            });
        }
        self.check_follows(positions.log_end_seq, batch)?;
        let header = batch.header();
        // Epochs only grow along the log: an older one was never committed by a fenced txn.
        if header.epoch < positions.received_epoch {
            return Err(Error::EpochRegression {
                seq: header.first_seq,
                epoch: header.epoch,
                previous: positions.received_epoch,
            });
        }
        self.log
            .insert(header.first_seq.to_be_bytes(), batch.as_bytes())
            .map_err(|e| self.io(e))?;
        self.set_received(header.last_seq(), header.epoch)
    }

    /// Writes a batch ahead of its etcd commit (a primary's write-ahead), leaving
    /// `received_seq` where it is. [`mark_committed`](Self::mark_committed) moves it once etcd
    /// has the batch; [`truncate_after`](Self::truncate_after) drops it if etcd never will.
    pub fn append_pending(&self, batch: &EncodedBatch) -> Result<()> {
        let _writer = lock(&self.writer);
        self.check_follows(self.log_end()?, batch)?;
        self.log
            .insert(batch.first_seq().to_be_bytes(), batch.as_bytes())
            .map_err(|e| self.io(e))?;
        // No flush: nothing is acknowledged on the strength of a pending batch, and recovery
        // drops it anyway.
        Ok(())
    }

    /// Replaces a batch written ahead with the consecutive `parts` it was cut into (etcd refused
    /// it as too large and takes the parts instead), so that the local log keeps etcd's batch
    /// boundaries. The parts must cover exactly the seqs of one pending batch. Atomic: a crash
    /// leaves the batch or its parts, both past `received_seq`.
    pub fn replace_pending<B: std::borrow::Borrow<EncodedBatch>>(&self, parts: &[B]) -> Result<()> {
        let _writer = lock(&self.writer);
        let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
            return Ok(());
        };
        let (first_seq, last_seq) = (first.borrow().first_seq(), last.borrow().last_seq());
        let consecutive = parts
            .windows(2)
            .all(|w| w[0].borrow().last_seq().next().ok() == Some(w[1].borrow().first_seq()));
        let replaced = self
            .log
            .get(first_seq.to_be_bytes())
            .map_err(|e| self.io(e))?
            .map(|bytes| self.header(&first_seq.to_be_bytes(), &bytes))
            .transpose()?;
        let pending = first_seq > self.received()?.0;
        if !consecutive || !pending || replaced.map(|h| h.last_seq()) != Some(last_seq) {
            return Err(Error::NotBatchBoundary {
                seq: first_seq,
                what:
                    "only a pending batch can be replaced, by consecutive parts covering its seqs",
            });
        }
        let mut writes = sled::Batch::default();
        for part in parts {
            let part = part.borrow();
            writes.insert(&part.first_seq().to_be_bytes(), part.as_bytes());
        }
        self.log.apply_batch(writes).map_err(|e| self.io(e))
    }

    /// Advances `received_seq` to `through`, which must end a batch in the log.
    pub fn mark_committed(&self, through: Seq) -> Result<()> {
        let _writer = lock(&self.writer);
        let (received, _) = self.received()?;
        if through < received {
            return Err(Error::NotBatchBoundary {
                seq: through,
                what: "it is below received_seq",
            });
        }
        let header = self
            .batch_ending_at(through)?
            .ok_or(Error::NotBatchBoundary {
                seq: through,
                what: "only a batch's last seq can be marked committed",
            })?;
        self.set_received(through, header.epoch)?;
        self.flush_if_every_write()
    }

    /// Drops every batch after `seq` (a suffix etcd never committed) and lowers `received_seq`
    /// to at most `seq`. `seq` must end a batch (or be 0) and not be below `applied_seq`.
    pub fn truncate_after(&self, seq: Seq) -> Result<()> {
        let _writer = lock(&self.writer);
        let positions = self.positions()?;
        if seq < positions.applied_seq {
            return Err(Error::TruncateBelowApplied {
                to: seq,
                applied: positions.applied_seq,
            });
        }
        if seq != self.log_base()? && self.batch_ending_at(seq)?.is_none() {
            return Err(Error::NotBatchBoundary {
                seq,
                what: "the log can only be cut between batches",
            });
        }
        let doomed = self
            .log
            .range(seq.next()?.to_be_bytes()..)
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.io(e))?;
        let received = positions.received_seq.min(seq);
        let received_epoch = match received {
            Seq::NONE => Epoch::default(),
            seq => self
                .batch_ending_at(seq)?
                .map_or(positions.received_epoch, |h| h.epoch),
        };
        // Position first, then the batches newest first: a crash part way leaves a shorter
        // tail past `received_seq`, still contiguous, still never read.
        self.set_received(received, received_epoch)?;
        for key in doomed.iter().rev() {
            self.log.remove(key).map_err(|e| self.io(e))?;
        }
        self.flush_if_every_write()
    }

    /// Applies the next received batch after `applied_seq` to the state. Returns `None` when
    /// the state has caught up with `received_seq`. An error of the state machine leaves the
    /// state at its last good seq.
    pub fn apply_next(&self) -> Result<Option<AppliedRange>> {
        let mut decoder = lock(&self.applier);
        let applied = self.read_applied().seq;
        let (received, _) = self.received()?;
        if applied >= received {
            return Ok(None);
        }
        let first = applied.next()?;
        let bytes = self
            .log
            .get(first.to_be_bytes())
            .map_err(|e| self.io(e))?
            .ok_or_else(|| {
                self.corrupt(format!(
                    "the log has no batch starting at seq {first}, right after the applied state"
                ))
            })?;
        let batch = decoder
            .decode_view(&bytes)
            .map_err(|e| self.corrupt(format!("the log's batch at seq {first}: {e}")))?;
        let range = AppliedRange {
            first_seq: first,
            last_seq: batch.header.last_seq(),
            sealed_at_micros: batch.header.sealed_at_micros,
        };
        let mut state = self.write_applied();
        state.machine.apply(first, &batch.records)?;
        state.seq = range.last_seq;
        state.epoch = batch.header.epoch;
        Ok(Some(range))
    }

    /// Applies everything received: how `open` rebuilds the state after its checkpoint.
    fn replay(&self) -> Result<()> {
        let from = self.read_applied().seq;
        let mut replayed = 0u64;
        while let Some(range) = self.apply_next()? {
            replayed += range.last_seq.0 - range.first_seq.0 + 1;
        }
        if replayed > 0 {
            tracing::info!(from = %from, records = replayed, dir = %self.dir.display(), "replayed the local log after the checkpoint");
        }
        Ok(())
    }

    /// Loads the last checkpoint into the (empty) state and checks it against its digest. A
    /// store without one starts from an empty state at the log's base, which must then be 0.
    fn load_checkpoint(&self) -> Result<()> {
        let meta = checkpoint::read_meta(&self.checkpoint).map_err(|e| self.io(e))?;
        let (meta, table) = match meta {
            Some(meta) => meta.map_err(|e| self.corrupt(format!("its checkpoint: {e}")))?,
            None if self.log_base()? == Seq::NONE => Default::default(),
            None => {
                return Err(self.corrupt(format!(
                    "its log starts after seq {} but it has no checkpoint of the state there",
                    self.log_base()?
                )))
            }
        };
        let (received, _) = self.received()?;
        let at_base = meta.seq == self.log_base()?;
        if meta.seq > received || meta.seq < self.log_base()? {
            return Err(self.corrupt(format!(
                "its checkpoint at seq {} is outside the log it holds ({} to {received})",
                meta.seq,
                self.log_base()?
            )));
        }
        if !at_base && self.batch_ending_at(meta.seq)?.is_none() {
            return Err(self.corrupt(format!(
                "its checkpoint at seq {} does not end a batch in the log",
                meta.seq
            )));
        }
        let machine = self.load_pages(&table)?;
        let strays = checkpoint::remove_strays(&self.checkpoint, &table).map_err(|e| self.io(e))?;
        if strays > 0 {
            tracing::info!(pages = strays, dir = %self.dir.display(), "removed the pages of a checkpoint that was cut short");
        }
        lock(&self.checkpointer).table = table;
        let digest = machine.digest();
        if digest != meta.digest {
            return Err(self.corrupt(format!(
                "its checkpoint at seq {} holds {} keys with digest {:016x}, not the {} keys with digest {:016x} it was written with",
                meta.seq, digest.keys, digest.value, meta.digest.keys, meta.digest.value
            )));
        }
        *self.write_applied() = Applied {
            machine,
            seq: meta.seq,
            epoch: meta.epoch,
        };
        self.checkpoint_seq.store(meta.seq.0, Ordering::SeqCst);
        Ok(())
    }

    /// A fresh machine with every page of the checkpoint `table` describes loaded.
    fn load_pages(&self, table: &PageTable) -> Result<Box<dyn StateMachine>> {
        let mut machine = (self.factory)();
        for page in checkpoint::pages(&self.checkpoint, table) {
            let (id, bytes) = page
                .map_err(|e| self.io(e))?
                .map_err(|id| self.corrupt(format!("its checkpoint lacks its page {id:02x?}")))?;
            machine
                .load_page(&id, &bytes)
                .map_err(|e| self.corrupt(format!("its checkpoint: {e}")))?;
        }
        Ok(machine)
    }

    /// Turns a format-2 store (a sled entry per key, applied up to `applied_seq`, a step maybe
    /// cut short after `applying_through` was written) into a checkpoint: the old entries are
    /// put into the state, the log after `applied_seq` replayed over them (which also redoes an
    /// interrupted step: puts and deletes replayed in order give the same state), a full
    /// checkpoint written, the format raised, and only then the old tree dropped. A crash part
    /// way leaves a format-2 store, migrated again from the start.
    fn migrate_from_format_2(&self) -> Result<()> {
        let old = self.db.open_tree(FORMAT_2_STATE).map_err(|e| self.io(e))?;
        let applied = Seq(self.meta_u64(APPLIED_SEQ)?);
        let (received, _) = self.received()?;
        if applied > received {
            return Err(self.corrupt(format!(
                "applied_seq {applied} is past received_seq {received}"
            )));
        }
        self.checkpoint.clear().map_err(|e| self.io(e))?;
        let mut machine = (self.factory)();
        for entry in old.iter() {
            let (key, value) = entry.map_err(|e| self.io(e))?;
            let put = RecordRef {
                op: Op::Put,
                key: &key,
                value: &value,
            };
            machine.apply(applied, &[put])?;
        }
        // A step may have stopped inside a batch: replay from that batch's start (replaying
        // records the entries already reflect leaves them as they are).
        let base = self.log_base()?;
        let (applied, epoch) = match self.batch_ending_at(applied)? {
            Some(header) => (applied, header.epoch),
            None if applied == base => (applied, self.log_base_epoch()?),
            None => {
                let start = self.batch_start_before(applied)?;
                match self.batch_ending_at(start)? {
                    Some(header) => (start, header.epoch),
                    None => (start, self.log_base_epoch()?),
                }
            }
        };
        *self.write_applied() = Applied {
            machine,
            seq: applied,
            epoch,
        };
        self.replay()?;
        *lock(&self.checkpointer) = Checkpointer {
            table: PageTable::default(),
            full: true,
        };
        self.checkpoint()?;
        self.put_meta(FORMAT, STORE_FORMAT)?;
        self.flush()?;
        self.db.drop_tree(FORMAT_2_STATE).map_err(|e| self.io(e))?;
        self.meta.remove(APPLIED_SEQ).map_err(|e| self.io(e))?;
        self.meta.remove(APPLYING_THROUGH).map_err(|e| self.io(e))?;
        self.flush()?;
        tracing::info!(dir = %self.dir.display(), "migrated the store from format 2: its state is now a checkpoint");
        Ok(())
    }

    /// The seq before the batch that holds `seq`: where a replay covering `seq` starts.
    fn batch_start_before(&self, seq: Seq) -> Result<Seq> {
        let entry = self.log.range(..=seq.to_be_bytes()).next_back().transpose();
        match entry.map_err(|e| self.io(e))? {
            Some((key, _)) => Ok(Seq(self.key_seq(&key)?.0 - 1)),
            None => self.log_base(),
        }
    }

    /// Writes a checkpoint of the state as it is now, if it moved since the last one: the
    /// changes are taken under the state's lock, encoded without it, and written under a new
    /// generation, switched to by one write of the meta, then flushed
    /// ([`crate::state::checkpoint`]). Returns what it wrote.
    pub fn checkpoint(&self) -> Result<Option<CheckpointStats>> {
        self.checkpoint_encoded_by(|changes| changes.encode())
    }

    /// [`checkpoint`](Self::checkpoint), with the changes encoded by `encode`: the applier's
    /// checkpointer has them encoded on a thread of lower CPU priority, and writes and flushes
    /// them itself, at the priority of the commit path whose flushes wait for its own.
    pub fn checkpoint_encoded_by(
        &self,
        encode: impl FnOnce(Box<dyn Changes>) -> std::result::Result<Vec<PageWrite>, StateError>,
    ) -> Result<Option<CheckpointStats>> {
        let mut checkpointer = lock(&self.checkpointer);
        let full = checkpointer.full;
        let (changes, meta) = {
            let mut state = self.write_applied();
            if state.seq.0 == self.checkpoint_seq.load(Ordering::SeqCst) && !full {
                return Ok(None);
            }
            let changes = state.machine.take_changes(full);
            let meta = CheckpointMeta {
                seq: state.seq,
                epoch: state.epoch,
                digest: state.machine.digest(),
            };
            (changes, meta)
        };
        // Taken changes are gone from the machine: until they are written, the next checkpoint
        // must write every page.
        checkpointer.full = true;
        let mut pages = encode(changes)?;
        if full {
            // Every page was written: any other the old checkpoint had is gone.
            let written: std::collections::HashSet<&[u8]> =
                pages.iter().map(|p| p.id.as_slice()).collect();
            let gone = checkpoint::ids(&checkpointer.table)
                .filter(|id| !written.contains(id))
                .map(|id| PageWrite {
                    id: id.to_vec(),
                    bytes: None,
                })
                .collect::<Vec<_>>();
            pages.extend(gone);
        }
        // Fail point (tests): the process dies with a checkpoint encoded, not yet written.
        fail::fail_point!("store::abort_before_checkpoint_write", |_| {
            std::process::abort()
        });
        let flush = || {
            let _flusher = lock(&self.flusher);
            self.db.flush().map(drop)
        };
        checkpoint::write(
            &self.checkpoint,
            &meta,
            &pages,
            &mut checkpointer.table,
            flush,
        )
        .map_err(|e| self.io(e))?;
        self.flush()?;
        checkpointer.full = false;
        self.checkpoint_seq.store(meta.seq.0, Ordering::SeqCst);
        let bytes = pages
            .iter()
            .map(|p| p.bytes.as_ref().map_or(0, |b| b.len() as u64))
            .sum();
        Ok(Some(CheckpointStats {
            meta,
            pages: pages.len(),
            bytes,
        }))
    }

    /// Up to `max_records` received records from `from` on, stopping before the payload (keys
    /// and values) would pass `max_bytes` — but always at least one record when there is one.
    /// Empty when `from` is past `received_seq`; an error when `from` is below the oldest seq the
    /// log holds.
    pub fn read(
        &self,
        from: Seq,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Seq, Record)>> {
        let (received, _) = self.received()?;
        if from > received || max_records == 0 {
            return Ok(Vec::new());
        }
        let first_batch = self
            .log
            .range(..=from.to_be_bytes())
            .next_back()
            .transpose()
            .map_err(|e| self.io(e))?;
        let Some((start_key, _)) = first_batch.filter(|_| from != Seq::NONE) else {
            let oldest = self.log.first().map_err(|e| self.io(e))?.map(|(k, _)| k);
            let oldest = match oldest {
                Some(key) => self.key_seq(&key)?,
                None => self.log_base()?.next()?,
            };
            return Err(Error::SeqNotInLog {
                seq: from,
                oldest,
                newest: received,
            });
        };
        let last_wanted = Seq(received
            .0
            .min(from.0.saturating_add(max_records as u64 - 1)));
        let mut decoder = BatchDecoder::new(self.limits.clone())?;
        let mut records = Vec::new();
        let mut payload = 0;
        for entry in self.log.range(start_key..) {
            let (key, bytes) = entry.map_err(|e| self.io(e))?;
            let batch = decoder.decode(&bytes).map_err(|e| {
                self.corrupt(format!("the log's batch at seq {}: {e}", seq_of_key(&key)))
            })?;
            let first_seq = batch.first_seq();
            for (seq, record) in (first_seq.0..).map(Seq).zip(batch.into_records()) {
                if seq < from {
                    continue;
                }
                let size = record.key.len() + record.value.len();
                if seq > last_wanted || (!records.is_empty() && payload + size > max_bytes) {
                    return Ok(records);
                }
                payload += size;
                records.push((seq, record));
                if seq == last_wanted {
                    return Ok(records);
                }
            }
        }
        Ok(records)
    }

    /// Counts the log's batches and bytes: a full scan, for inspection rather than hot paths.
    pub fn log_stats(&self) -> Result<LogStats> {
        let mut stats = LogStats::default();
        for entry in self.log.iter() {
            let (key, bytes) = entry.map_err(|e| self.io(e))?;
            if stats.batches == 0 {
                stats.oldest_seq = self.key_seq(&key)?;
            }
            stats.batches += 1;
            stats.bytes += bytes.len() as u64;
        }
        Ok(stats)
    }

    /// Drops the oldest batches of the log while more than `retain_records` records or
    /// `retain_bytes` encoded bytes would remain, but never a batch the state has not fully
    /// applied, nor one holding `etcd_trimmed` or a later seq: etcd still holds those, and a
    /// node that may lead must have every batch etcd has (its trimmer indexes them from its
    /// log). Returns the new oldest seq when it dropped anything. Reads below it then fail
    /// with [`Error::SeqNotInLog`] naming it.
    pub fn apply_retention(
        &self,
        retain_records: u64,
        retain_bytes: u64,
        etcd_trimmed: Seq,
    ) -> Result<Option<Seq>> {
        let _writer = lock(&self.writer);
        let checkpointed = Seq(self.checkpoint_seq.load(Ordering::SeqCst));
        let end = self.log_end()?;
        let mut kept_bytes = 0u64;
        let mut keep_from = None;
        for entry in self.log.iter().rev() {
            let (key, bytes) = entry.map_err(|e| self.io(e))?;
            let header = self.header(&key, &bytes)?;
            kept_bytes = kept_bytes.saturating_add(bytes.len() as u64);
            let kept_records = end.0 - header.first_seq.0 + 1;
            let over = kept_bytes > retain_bytes || kept_records > retain_records;
            let droppable = header.last_seq() <= checkpointed && header.last_seq() < etcd_trimmed;
            if over && droppable && keep_from.is_some() {
                break;
            }
            keep_from = Some(header.first_seq);
        }
        let Some(keep_from) = keep_from else {
            return Ok(None);
        };
        let doomed = self
            .log
            .range(..keep_from.to_be_bytes())
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.io(e))?;
        if doomed.is_empty() {
            return Ok(None);
        }
        let base_epoch = match self.batch_ending_at(Seq(keep_from.0 - 1))? {
            Some(header) => header.epoch,
            None => self.log_base_epoch()?,
        };
        // The base first: a crash part way leaves batches below it, which are never read.
        self.put_meta(LOG_BASE_EPOCH, base_epoch.0)?;
        self.put_meta(LOG_BASE, keep_from.0 - 1)?;
        for key in &doomed {
            self.log.remove(key).map_err(|e| self.io(e))?;
        }
        self.flush_if_every_write()?;
        Ok(Some(keep_from))
    }

    /// The received batches from the one starting at `from` on, by their headers.
    pub fn logged_batches(&self, from: Seq) -> Result<Vec<LoggedBatch>> {
        let (received, _) = self.received()?;
        let mut batches = Vec::new();
        for entry in self.log.range(from.to_be_bytes()..) {
            let (key, bytes) = entry.map_err(|e| self.io(e))?;
            let header = self.header(&key, &bytes)?;
            if header.last_seq() > received {
                break;
            }
            batches.push(LoggedBatch {
                first_seq: header.first_seq,
                last_seq: header.last_seq(),
                bytes: bytes.len() as u64,
                sealed_at_micros: header.sealed_at_micros,
            });
        }
        Ok(batches)
    }

    /// When the batch holding `seq` was sealed, if the log holds it.
    pub fn sealed_at(&self, seq: Seq) -> Result<Option<u64>> {
        let entry = self.log.range(..=seq.to_be_bytes()).next_back().transpose();
        let Some((key, bytes)) = entry.map_err(|e| self.io(e))? else {
            return Ok(None);
        };
        let header = self.header(&key, &bytes)?;
        Ok((header.last_seq() >= seq).then_some(header.sealed_at_micros))
    }

    /// The applied value of `key`, if any. Only for a store whose state is the built-in
    /// [`KvState`]; another machine answers [`Error::NotKeyValue`].
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get_applied(key).map(|(value, _)| value)
    }

    /// [`get`](Self::get), with the applied seq of the state the value was read from.
    pub fn get_applied(&self, key: &[u8]) -> Result<(Option<Vec<u8>>, Seq)> {
        self.read_state(|machine, applied| {
            let kv = machine
                .as_any()
                .downcast_ref::<KvState>()
                .ok_or(Error::NotKeyValue)?;
            Ok((kv.get(key).map(<[u8]>::to_vec), applied))
        })
    }

    /// Runs `read` on the state at the seq it is applied to, holding off applying meanwhile:
    /// keep it short. A machine of the embedder's own is reached with `as_any().downcast_ref`.
    pub fn read_state<R>(&self, read: impl FnOnce(&dyn StateMachine, Seq) -> R) -> R {
        let state = self.read_applied();
        read(state.machine.as_ref(), state.seq)
    }

    /// The digest of the whole state at its applied seq.
    pub fn state_digest(&self) -> Result<StateDigest> {
        let state = self.read_applied();
        Ok(StateDigest::at(state.seq, state.machine.digest()))
    }

    /// Brings the checkpoint up to the applied state, then hands each of its pages, in id
    /// order, to `each`, and returns what it is of. Applying goes on meanwhile (the pages are
    /// the checkpoint's, not the live state's); only the next checkpoint waits.
    pub(crate) fn export_checkpoint(
        &self,
        mut each: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<CheckpointMeta> {
        self.checkpoint()?;
        let checkpointer = lock(&self.checkpointer);
        let meta = checkpoint::read_meta(&self.checkpoint)
            .map_err(|e| self.io(e))?
            .transpose()
            .map_err(|e| self.corrupt(format!("its checkpoint: {e}")))?
            .map(|(meta, _)| meta)
            .unwrap_or_default();
        for page in checkpoint::pages(&self.checkpoint, &checkpointer.table) {
            let (id, bytes) = page
                .map_err(|e| self.io(e))?
                .map_err(|id| self.corrupt(format!("its checkpoint lacks its page {id:02x?}")))?;
            each(&id, &bytes)?;
        }
        Ok(meta)
    }

    /// Writes snapshot pages into an empty store being installed; see
    /// [`finish_snapshot`](Self::finish_snapshot).
    pub(crate) fn insert_snapshot_pages(&self, pages: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        // Plain inserts, not a sled batch: the store is staged, so a chunk need not be atomic,
        // and sled 0.34 runs batches under its process-wide concurrency lock.
        let mut checkpointer = lock(&self.checkpointer);
        checkpoint::stage_pages(&self.checkpoint, pages, &mut checkpointer.table)
            .map_err(|e| self.io(e))
    }

    /// Makes a store filled by [`insert_snapshot_pages`](Self::insert_snapshot_pages) the
    /// state as of `meta`: the pages loaded and checked against `meta`'s digest, an empty log
    /// after its seq, received and applied there, flushed.
    pub(crate) fn finish_snapshot(&self, meta: CheckpointMeta) -> Result<()> {
        if self.log.first().map_err(|e| self.io(e))?.is_some() {
            return Err(self.corrupt("a snapshot is installed only into an empty store".into()));
        }
        let table = lock(&self.checkpointer).table.clone();
        let machine = self.load_pages(&table).map_err(|e| match e {
            Error::StoreCorrupt { detail, .. } => Error::SnapshotInvalid(detail),
            e => e,
        })?;
        let digest = machine.digest();
        if digest != meta.digest {
            return Err(Error::SnapshotInvalid(format!(
                "its pages hold {} keys with digest {:016x}; the header says {} keys, digest {:016x}",
                digest.keys, digest.value, meta.digest.keys, meta.digest.value
            )));
        }
        checkpoint::write(
            &self.checkpoint,
            &meta,
            &[],
            &mut lock(&self.checkpointer).table,
            || Ok(()),
        )
        .map_err(|e| self.io(e))?;
        self.put_meta(LOG_BASE_EPOCH, meta.epoch.0)?;
        self.put_meta(LOG_BASE, meta.seq.0)?;
        self.set_received(meta.seq, meta.epoch)?;
        self.flush()?;
        *self.write_applied() = Applied {
            machine,
            seq: meta.seq,
            epoch: meta.epoch,
        };
        self.checkpoint_seq.store(meta.seq.0, Ordering::SeqCst);
        Ok(())
    }

    fn read_applied(&self) -> RwLockReadGuard<'_, Applied> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_applied(&self) -> RwLockWriteGuard<'_, Applied> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The etcd lease this node last led under, so that a restarted primary can recognise its
    /// own leader key and revoke it instead of waiting out the TTL.
    pub fn lease_id(&self) -> Result<Option<i64>> {
        self.meta_lease(LEASE_ID)
    }

    pub fn set_lease_id(&self, id: Option<i64>) -> Result<()> {
        self.set_meta_lease(LEASE_ID, id)
    }

    /// The lease of this node's claim on its name, last time it ran.
    pub fn claim_lease(&self) -> Result<Option<i64>> {
        self.meta_lease(CLAIM_LEASE)
    }

    pub fn set_claim_lease(&self, id: Option<i64>) -> Result<()> {
        self.set_meta_lease(CLAIM_LEASE, id)
    }

    /// An etcd lease id kept in `meta` (0: none).
    fn meta_lease(&self, name: &[u8]) -> Result<Option<i64>> {
        let id = self.meta_u64(name)?;
        Ok((id != 0).then_some(id as i64))
    }

    /// Records an etcd lease id in `meta`, durably: it must outlive a crash to be recognised.
    fn set_meta_lease(&self, name: &[u8], id: Option<i64>) -> Result<()> {
        self.put_meta(name, id.map_or(0, |id| id as u64))?;
        self.flush()
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        let _flusher = lock(&self.flusher);
        self.db.flush().map(drop).map_err(|e| self.io(e))
    }

    fn flush_if_every_write(&self) -> Result<()> {
        match self.flush {
            FlushPolicy::EveryWrite => self.flush(),
            FlushPolicy::Background { .. } => Ok(()),
        }
    }

    /// `existed`: the store was created before, so sled must still hold its format marker.
    /// Returns the store's format: [`STORE_FORMAT`], or [`MIGRATED_FORMAT`] to migrate.
    fn check_format(&self, existed: bool) -> Result<u64> {
        match self.meta.get(FORMAT).map_err(|e| self.io(e))? {
            Some(_) => {
                let found = self.meta_u64(FORMAT)?;
                if found != STORE_FORMAT && found != MIGRATED_FORMAT {
                    return Err(Error::StoreFormat {
                        dir: self.dir.clone(),
                        found,
                        supported: STORE_FORMAT,
                    });
                }
                Ok(found)
            }
            None if existed => Err(self.corrupt(
                "sled opened without the data this store was created with (a damaged or deleted file)"
                    .into(),
            )),
            None if self.meta.is_empty() && self.log.is_empty() && self.checkpoint.is_empty() => {
                self.meta.insert(FORMAT, &STORE_FORMAT.to_be_bytes()).map_err(|e| self.io(e))?;
                self.flush()?;
                Ok(STORE_FORMAT)
            }
            None => Err(self.corrupt("it holds data but no format marker".into())),
        }
    }

    fn check_positions(&self) -> Result<()> {
        let p = self.positions()?;
        if p.received_seq > p.log_end_seq {
            return Err(self.corrupt(format!(
                "received_seq {} is past the log's end {}",
                p.received_seq, p.log_end_seq
            )));
        }
        let at_base = p.received_seq == self.log_base()?;
        if !at_base && self.batch_ending_at(p.received_seq)?.is_none() {
            return Err(self.corrupt(format!(
                "received_seq {} does not end a batch in the log",
                p.received_seq
            )));
        }
        Ok(())
    }

    /// Refuses a batch that does not start right after `log_end`.
    fn check_follows(&self, log_end: Seq, batch: &EncodedBatch) -> Result<()> {
        let expected = log_end.next()?;
        if batch.first_seq() != expected {
            return Err(Error::LogGap {
                expected,
                found: batch.first_seq(),
            });
        }
        Ok(())
    }

    fn log_end(&self) -> Result<Seq> {
        match self.log.last().map_err(|e| self.io(e))? {
            Some((key, bytes)) => Ok(self.header(&key, &bytes)?.last_seq()),
            None => self.log_base(),
        }
    }

    fn log_base(&self) -> Result<Seq> {
        Ok(Seq(self.meta_u64(LOG_BASE)?))
    }

    /// The epoch of seq `log_base`. A store written before it was recorded has only a bound:
    /// the epoch of the batch right after the base (no later batch's epoch is older), or, with
    /// no batch after it, the received epoch, which is then the base's own.
    fn log_base_epoch(&self) -> Result<Epoch> {
        if self
            .meta
            .contains_key(LOG_BASE_EPOCH)
            .map_err(|e| self.io(e))?
        {
            return Ok(Epoch(self.meta_u64(LOG_BASE_EPOCH)?));
        }
        match self.log.first().map_err(|e| self.io(e))? {
            Some((key, bytes)) => Ok(self.header(&key, &bytes)?.epoch),
            None => Ok(self.received()?.1),
        }
    }

    /// The header of the batch that ends exactly at `seq`, if there is one.
    fn batch_ending_at(&self, seq: Seq) -> Result<Option<BatchHeader>> {
        let entry = self.log.range(..=seq.to_be_bytes()).next_back().transpose();
        let Some((key, bytes)) = entry.map_err(|e| self.io(e))? else {
            return Ok(None);
        };
        let header = self.header(&key, &bytes)?;
        Ok((header.last_seq() == seq).then_some(header))
    }

    fn header(&self, key: &[u8], bytes: &[u8]) -> Result<BatchHeader> {
        let header = BatchHeader::parse(bytes, &self.limits).map_err(|e| {
            self.corrupt(format!("the log's batch at seq {}: {e}", seq_of_key(key)))
        })?;
        if header.first_seq.to_be_bytes() != key {
            return Err(self.corrupt(format!(
                "the log's batch under key {key:02x?} says it starts at seq {}",
                header.first_seq
            )));
        }
        Ok(header)
    }

    fn key_seq(&self, key: &[u8]) -> Result<Seq> {
        key.try_into()
            .map(|k| Seq(u64::from_be_bytes(k)))
            .map_err(|_| self.corrupt(format!("log key {key:02x?} is not a seq")))
    }

    /// The received seq and the epoch of the batch it ends.
    fn received(&self) -> Result<(Seq, Epoch)> {
        match self.meta.get(RECEIVED).map_err(|e| self.io(e))? {
            None => Ok((Seq::NONE, Epoch::default())),
            Some(bytes) if bytes.len() == 16 => {
                let both = u128::from_be_bytes(bytes.as_ref().try_into().unwrap_or_default());
                Ok((Seq((both >> 64) as u64), Epoch(both as u64)))
            }
            Some(bytes) => Err(self.corrupt(format!(
                "meta value \"received\" is {} bytes, expected 16",
                bytes.len()
            ))),
        }
    }

    /// One write, so the seq and its epoch never disagree.
    fn set_received(&self, seq: Seq, epoch: Epoch) -> Result<()> {
        let both = (u128::from(seq.0) << 64) | u128::from(epoch.0);
        self.meta
            .insert(RECEIVED, &both.to_be_bytes())
            .map(drop)
            .map_err(|e| self.io(e))
    }

    fn put_meta(&self, name: &[u8], value: u64) -> Result<()> {
        self.meta
            .insert(name, &value.to_be_bytes())
            .map(drop)
            .map_err(|e| self.io(e))
    }

    fn meta_u64(&self, name: &[u8]) -> Result<u64> {
        match self.meta.get(name).map_err(|e| self.io(e))? {
            None => Ok(0),
            Some(bytes) => bytes
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| {
                    self.corrupt(format!(
                        "meta value {:?} is {} bytes, expected 8",
                        String::from_utf8_lossy(name),
                        bytes.len()
                    ))
                }),
        }
    }

    fn io(&self, source: sled::Error) -> Error {
        match source {
            sled::Error::Corruption { .. } => self.corrupt(source.to_string()),
            sled::Error::Io(ref e) => {
                self.failure.get_or_init(|| e.to_string());
                Error::StoreIo {
                    dir: self.dir.clone(),
                    source,
                }
            }
            source => Error::StoreIo {
                dir: self.dir.clone(),
                source,
            },
        }
    }

    fn corrupt(&self, detail: String) -> Error {
        Error::StoreCorrupt {
            dir: self.dir.clone(),
            detail,
        }
    }
}

/// Which cluster, node and log a store belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreIdentity {
    pub cluster: String,
    pub node: String,
    /// The id of the cluster's log in etcd (`/fencelog/<cluster>/log_id`).
    pub log_id: String,
}

impl StoreIdentity {
    fn encode(&self) -> String {
        format!("{} {} {}", self.cluster, self.node, self.log_id)
    }

    fn decode(bytes: &[u8]) -> Option<StoreIdentity> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.split(' ');
        let identity = StoreIdentity {
            cluster: parts.next()?.to_owned(),
            node: parts.next()?.to_owned(),
            log_id: parts.next()?.to_owned(),
        };
        parts.next().is_none().then_some(identity)
    }

    /// What differs between this (recorded) identity and `given`, said for an operator.
    fn mismatch(&self, given: &StoreIdentity) -> Option<String> {
        if (&self.cluster, &self.node) != (&given.cluster, &given.node) {
            return Some(format!(
                "it is node {} of cluster {}, not node {} of cluster {}: start it as --cluster {} --node {}, \
                 or give node {} a data directory of its own",
                self.node, self.cluster, given.node, given.cluster, self.cluster, self.node, given.node
            ));
        }
        if self.log_id != given.log_id {
            return Some(format!(
                "it holds the log {} of cluster {}, but etcd's log of that cluster is {} (its /fencelog/{}/ \
                 was wiped and created anew, or this is another etcd): point the node at the etcd it came \
                 from, or move the store aside to rebuild it from this one",
                self.log_id, self.cluster, given.log_id, self.cluster
            ));
        }
        None
    }
}

/// Whether `dir` is absent, empty, or a fencelog store (its marker file is there). Anything
/// else is someone's directory: refused, with the first foreign entry named.
pub fn check_ours_or_empty(dir: &Path) -> Result<()> {
    if dir.join(MARKER_FILE).exists() {
        return Ok(());
    }
    if dir.exists() && !dir.is_dir() {
        return Err(Error::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let mut entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::Io(e)),
    };
    match entries.next() {
        None => Ok(()),
        Some(entry) => Err(Error::NotAStore {
            dir: dir.to_path_buf(),
            found: format!("it holds {:?}", entry?.file_name()),
        }),
    }
}

fn write_marker(path: &Path) -> Result<()> {
    let file = std::fs::File::create(path)?;
    std::io::Write::write_all(
        &mut &file,
        format!("fencelog local store, format {STORE_FORMAT}\n").as_bytes(),
    )?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// How long `open` waits for sled's lock on the directory: a store closed a moment ago in this
/// process is released only once sled's background flusher lets go of it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn open_waiting_for_lock(config: &sled::Config, dir: &Path) -> Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    return Err(Error::StoreLocked {
                        dir: dir.to_path_buf(),
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(source) => {
                return Err(Error::StoreOpen {
                    dir: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Runs a blocking store call on tokio's blocking threads, off the async workers.
pub async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| Error::TaskFailed(e.to_string()))?
}

/// A log key as a seq, for messages about keys that may be damaged.
fn seq_of_key(key: &[u8]) -> String {
    key.try_into()
        .map(|k| u64::from_be_bytes(k).to_string())
        .unwrap_or_else(|_| format!("{key:02x?}"))
}

/// The guarded data stays consistent across a panic (sled writes are atomic), so a poisoned
/// lock is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
