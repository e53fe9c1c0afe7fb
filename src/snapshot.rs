//! State snapshots: how a node that the log in etcd was trimmed past gets the state back.
//!
//! A healthy node (the primary) brings its state's checkpoint up to its applied seq `S` (which
//! ends a batch) and copies the checkpoint's pages into a temporary file of checksummed frames
//! ([`export`]: applying goes on meanwhile, only the next checkpoint waits), and streams it over
//! the API: a header (`S`, epoch, key count, state digest, bytes, layout), then the frames. The
//! receiver writes the pages into a fresh store beside its data directory ([`Installer`]):
//! every frame's checksum and the pages' order are verified as they come, and at the end the
//! pages are loaded into a state machine whose key count and digest must match the header; only
//! then does the new store replace the old one (two renames), with received = applied = `S`
//! and an empty log after `S`, from which the node follows etcd. An interrupted or corrupt
//! snapshot leaves the old store as it was. Pages are opaque here: a snapshot carries any
//! [`crate::state::StateMachine`]'s state.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::GetOptions;
use xxhash_rust::xxh3::xxh3_64;

use crate::api::proto::{snapshot_chunk, SnapshotData, SnapshotHeader};
use crate::api::WalClient;
use crate::error::{Error, Result};
use crate::etcd::leadership::current_leader;
use crate::etcd::timed;
use crate::keys::{ClusterId, KeyLayout, NodeName};
use crate::limits::Limits;
use crate::local_store::{blocking, check_ours_or_empty, LocalStore, StoreOptions};
use crate::record::{Epoch, Seq};
use crate::standby::membership::MemberInfo;
use crate::state::checkpoint::CheckpointMeta;
use crate::state::{Digest, Factory};

/// Page bytes per frame (one larger page goes alone): well under the API's message limit.
pub const FRAME_BYTES: usize = 1024 * 1024;

/// The layout of a snapshot's data this build sends and reads: the state's checkpoint pages,
/// each a u32 id length (big-endian), the id, a u32 page length, the page. A node of an older
/// build sent key/value pairs, layout 0.
pub const LAYOUT_PAGES: u32 = 1;

/// Exports `store`'s state into a temporary file of frames; blocking. Returns the header and
/// the file, rewound.
pub fn export(store: &LocalStore) -> Result<(SnapshotHeader, File)> {
    let mut file = BufWriter::new(tempfile::tempfile()?);
    let mut frame = Vec::with_capacity(FRAME_BYTES + 64 * 1024);
    let mut bytes = 0u64;
    let meta = store.export_checkpoint(|id, page| {
        if !frame.is_empty() && frame.len() + 8 + id.len() + page.len() > FRAME_BYTES {
            write_frame(&mut file, &frame)?;
            frame.clear();
        }
        for part in [id, page] {
            frame.extend_from_slice(&(part.len() as u32).to_be_bytes());
            frame.extend_from_slice(part);
        }
        bytes += (8 + id.len() + page.len()) as u64;
        Ok(())
    })?;
    if !frame.is_empty() {
        write_frame(&mut file, &frame)?;
    }
    let mut file = file.into_inner().map_err(|e| Error::Io(e.into_error()))?;
    std::io::Seek::rewind(&mut file)?;
    let header = SnapshotHeader {
        seq: meta.seq.0,
        epoch: meta.epoch.0,
        keys: meta.digest.keys,
        digest: meta.digest.value,
        bytes,
        layout: LAYOUT_PAGES,
    };
    Ok((header, file))
}

fn write_frame(out: &mut impl Write, pages: &[u8]) -> Result<()> {
    out.write_all(&(pages.len() as u32).to_be_bytes())?;
    out.write_all(pages)?;
    out.write_all(&xxh3_64(pages).to_be_bytes())?;
    Ok(())
}

/// Reads the frames [`export`] wrote, one at a time.
pub struct FrameReader {
    file: BufReader<File>,
}

impl FrameReader {
    pub fn new(file: File) -> FrameReader {
        FrameReader {
            file: BufReader::new(file),
        }
    }

    /// The next frame as a chunk of the stream; `None` at the end.
    pub fn next_frame(&mut self) -> Result<Option<SnapshotData>> {
        let mut len = [0u8; 4];
        match self.file.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let mut pages = vec![0u8; u32::from_be_bytes(len) as usize];
        self.file.read_exact(&mut pages)?;
        let mut checksum = [0u8; 8];
        self.file.read_exact(&mut checksum)?;
        Ok(Some(SnapshotData {
            pages,
            checksum: u64::from_be_bytes(checksum),
        }))
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::SnapshotInvalid(reason.into())
}

/// Installs a snapshot into a fresh store at `dir`, verifying as it goes.
pub struct Installer {
    store: LocalStore,
    header: SnapshotHeader,
    last_page: Option<Vec<u8>>,
    bytes: u64,
}

/// The largest page a snapshot may carry: a page holds at most about twice its target size and
/// one pair, far below this.
const MAX_PAGE_BYTES: usize = 64 * 1024 * 1024;

impl Installer {
    /// Creates an empty store at `dir` (removing what a failed install left there: only a
    /// store of fencelog's own is ever removed), whose state `state` makes.
    pub fn create(
        dir: &Path,
        header: SnapshotHeader,
        limits: Limits,
        state: Factory,
    ) -> Result<Installer> {
        if header.layout != LAYOUT_PAGES {
            return Err(invalid(format!(
                "its data has layout {}, this build reads layout {LAYOUT_PAGES} (a node of another \
                 build sent it): upgrade the nodes to one build",
                header.layout
            )));
        }
        check_ours_or_empty(dir)?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        let options = StoreOptions {
            limits,
            state,
            ..StoreOptions::default()
        };
        Ok(Installer {
            store: LocalStore::open(dir, options)?,
            header,
            last_page: None,
            bytes: 0,
        })
    }

    /// Verifies and writes one chunk.
    pub fn add(&mut self, data: &SnapshotData) -> Result<()> {
        let computed = xxh3_64(&data.pages);
        if computed != data.checksum {
            return Err(invalid(format!(
                "chunk checksum mismatch: says {:#018x}, content hashes to {computed:#018x}",
                data.checksum
            )));
        }
        let pages = self.decode(&data.pages)?;
        self.bytes += data.pages.len() as u64;
        if self.bytes > self.header.bytes {
            return Err(invalid(format!(
                "more than the {} bytes the header announced",
                self.header.bytes
            )));
        }
        self.store.insert_snapshot_pages(&pages)
    }

    fn decode(&mut self, mut bytes: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut pages = Vec::new();
        while !bytes.is_empty() {
            let mut take = |what: &str| -> Result<Vec<u8>> {
                let (len, rest) = bytes
                    .split_first_chunk::<4>()
                    .ok_or_else(|| invalid(format!("a chunk ends inside a {what} length")))?;
                let len = u32::from_be_bytes(*len) as usize;
                if len > MAX_PAGE_BYTES || len > rest.len() {
                    return Err(invalid(format!(
                        "a {what} of {len} bytes is over the limit of {MAX_PAGE_BYTES} or past the chunk"
                    )));
                }
                let (part, rest) = rest.split_at(len);
                bytes = rest;
                Ok(part.to_vec())
            };
            let id = take("page id")?;
            let page = take("page")?;
            if self.last_page.as_ref().is_some_and(|last| *last >= id) {
                return Err(invalid("pages are not in strictly increasing order"));
            }
            self.last_page = Some(id.clone());
            pages.push((id, page));
        }
        Ok(pages)
    }

    /// Page bytes installed so far.
    pub fn progress(&self) -> u64 {
        self.bytes
    }

    /// Checks the whole against the header (the pages loaded must hold its keys and digest) and
    /// makes the store the state as of its seq.
    pub fn finish(self) -> Result<()> {
        if self.bytes != self.header.bytes {
            return Err(invalid(format!(
                "got {} bytes; the header says {}",
                self.bytes, self.header.bytes
            )));
        }
        self.store.finish_snapshot(CheckpointMeta {
            seq: Seq(self.header.seq),
            epoch: Epoch(self.header.epoch),
            digest: Digest {
                keys: self.header.keys,
                value: self.header.digest,
            },
        })
    }
}

/// How far a bootstrap got.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// The seq the snapshot's state is at: the node follows the log from the next one.
    pub seq: Seq,
    pub bytes: u64,
    pub total_keys: u64,
    pub total_bytes: u64,
}

/// The nodes to take a snapshot from, in the order to ask them: the primary (through its leader
/// key), then the other running nodes (their claims), furthest applied first; never `me`. A node
/// whose state cannot continue into the log etcd holds refuses to serve one, so a standby far
/// enough ahead serves it when the primary cannot (a new primary whose state lags `trimmed`).
pub async fn sources(
    client: &etcd_client::Client,
    cluster: &ClusterId,
    me: &NodeName,
    request_timeout: Duration,
) -> Result<Vec<String>> {
    let layout = KeyLayout::new(cluster);
    let leader = current_leader(client, &layout, request_timeout).await?;
    let prefixed = || GetOptions::new().with_prefix();
    let mut kv = client.kv_client();
    let claims = timed(
        request_timeout,
        kv.get(layout.node_claims_prefix(), Some(prefixed())),
    )
    .await?;
    let members = timed(
        request_timeout,
        kv.get(layout.members_prefix(), Some(prefixed())),
    )
    .await?;
    let named = |kv: &etcd_client::KeyValue, prefix: &str| {
        let name = kv.key_str().ok()?.strip_prefix(prefix)?.to_owned();
        Some((name, kv.value_str().ok()?.to_owned()))
    };
    let claims_prefix = layout.node_claims_prefix();
    let members_prefix = layout.members_prefix();
    let running: Vec<(String, String)> = claims
        .kvs()
        .iter()
        .filter_map(|kv| named(kv, &claims_prefix))
        .collect();
    let applied: Vec<(String, Seq)> = members
        .kvs()
        .iter()
        .filter_map(|kv| named(kv, &members_prefix))
        .filter_map(|(node, value)| {
            Some((node, MemberInfo::decode(value.as_bytes()).ok()?.applied_seq))
        })
        .collect();
    let leader = leader.map(|(info, _)| (info.node.to_string(), info.addr));
    let order = order_sources(leader, &running, &applied, me.as_str());
    if order.is_empty() {
        return Err(Error::NoLeader {
            cluster: cluster.as_str().to_owned(),
        });
    }
    Ok(order)
}

/// The addresses to ask, in order: the leader's, then every other running node's by applied
/// seq, furthest first (a node with no registration last); `me` never.
fn order_sources(
    leader: Option<(String, String)>,
    running: &[(String, String)],
    applied: &[(String, Seq)],
    me: &str,
) -> Vec<String> {
    let applied_of = |node: &str| {
        applied
            .iter()
            .find(|(name, _)| name == node)
            .map(|&(_, seq)| seq)
    };
    let leader_node = leader.as_ref().map(|(node, _)| node.clone());
    let mut others: Vec<&(String, String)> = running
        .iter()
        .filter(|(node, _)| node != me && Some(node) != leader_node.as_ref())
        .collect();
    others.sort_by_key(|(node, _)| std::cmp::Reverse(applied_of(node)));
    leader
        .filter(|(node, _)| node != me)
        .map(|(_, addr)| addr)
        .into_iter()
        .chain(others.into_iter().map(|(_, addr)| addr.clone()))
        .collect()
}

/// Completes a snapshot swap that a crash cut between its two renames, when the old store had
/// gone to `<dir>.replaced-*` and the verified snapshot not yet from `<dir>.snapshot` to `<dir>`
/// (a replaced store exists only once the snapshot is complete). Returns whether it did; call it
/// before opening the store.
pub fn finish_interrupted_swap(data_dir: &Path) -> Result<bool> {
    let staging = sibling(data_dir, "snapshot");
    if data_dir.exists() || !staging.exists() {
        return Ok(false);
    }
    let (Some(parent), Some(name)) = (data_dir.parent(), data_dir.file_name()) else {
        return Ok(false);
    };
    let mut prefix = name.to_owned();
    prefix.push(".replaced-");
    let prefix = prefix.to_string_lossy().into_owned();
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let mut replaced = Vec::new();
    for entry in std::fs::read_dir(parent)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            replaced.push(entry.path());
        }
    }
    if replaced.is_empty() {
        return Ok(false);
    }
    std::fs::rename(&staging, data_dir)?;
    tracing::warn!(dir = %data_dir.display(), "completed a snapshot install that a crash interrupted");
    for old in replaced {
        if let Err(e) = std::fs::remove_dir_all(&old) {
            tracing::warn!(error = %e, dir = %old.display(), "cannot remove the replaced store");
        }
    }
    Ok(true)
}

/// Downloads a snapshot from `source` and makes it the store in `data_dir`, which must not be
/// open. Until the snapshot is complete and verified, `data_dir` is not touched.
pub async fn bootstrap(
    source: &mut WalClient,
    data_dir: &Path,
    options: StoreOptions,
    mut progress: impl FnMut(Progress),
) -> Result<SnapshotHeader> {
    // Refused before anything is downloaded: the swap below moves `data_dir` aside and
    // removes it, which is only ever done to a store of fencelog's own.
    check_ours_or_empty(data_dir)?;
    let staging = sibling(data_dir, "snapshot");
    let installed = download(source, &staging, options, &mut progress).await;
    let header = match installed {
        Ok(header) => header,
        Err(e) => {
            if let Err(cleanup) = std::fs::remove_dir_all(&staging) {
                tracing::debug!(error = %cleanup, "no staging directory to remove");
            }
            return Err(e);
        }
    };
    let replaced = sibling(
        data_dir,
        &format!("replaced-{}", crate::batch::unix_micros_now()),
    );
    if data_dir.exists() {
        std::fs::rename(data_dir, &replaced)?;
    }
    // A crash here leaves no store in `data_dir`: `finish_interrupted_swap` completes the swap.
    fail::fail_point!("snapshot::abort_between_renames", |_| std::process::abort());
    std::fs::rename(&staging, data_dir)?;
    if replaced.exists() {
        if let Err(e) = std::fs::remove_dir_all(&replaced) {
            tracing::warn!(error = %e, dir = %replaced.display(), "cannot remove the replaced store");
        }
    }
    tracing::info!(seq = header.seq, keys = header.keys, dir = %data_dir.display(), "installed a snapshot");
    Ok(header)
}

async fn download(
    source: &mut WalClient,
    staging: &Path,
    options: StoreOptions,
    progress: &mut impl FnMut(Progress),
) -> Result<SnapshotHeader> {
    let mut stream = source.snapshot().await?;
    let header = match stream
        .message()
        .await
        .map_err(|s| crate::api::from_status(&s))?
    {
        Some(crate::api::proto::SnapshotChunk {
            kind: Some(snapshot_chunk::Kind::Header(header)),
        }) => header,
        _ => return Err(invalid("the stream does not start with a header")),
    };
    tracing::info!(
        seq = header.seq,
        keys = header.keys,
        bytes = header.bytes,
        "receiving a snapshot"
    );
    let dir = staging.to_path_buf();
    let (limits, state) = (options.limits, options.state);
    let mut installer = blocking(move || Installer::create(&dir, header, limits, state)).await?;
    progress(Progress {
        seq: Seq(header.seq),
        bytes: 0,
        total_keys: header.keys,
        total_bytes: header.bytes,
    });
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| crate::api::from_status(&s))?
    {
        let Some(snapshot_chunk::Kind::Data(data)) = chunk.kind else {
            return Err(invalid("a second header"));
        };
        let mut data = data;
        corrupt_chunk(&mut data);
        installer = blocking(move || installer.add(&data).map(|()| installer)).await?;
        fail::fail_point!("snapshot::abort_mid_install", |_| std::process::abort());
        progress(Progress {
            seq: Seq(header.seq),
            bytes: installer.progress(),
            total_keys: header.keys,
            total_bytes: header.bytes,
        });
    }
    blocking(move || installer.finish()).await?;
    Ok(header)
}

/// `<data_dir>.<suffix>`, beside the data directory.
fn sibling(data_dir: &Path, suffix: &str) -> PathBuf {
    let mut name = data_dir.as_os_str().to_owned();
    name.push(format!(".{suffix}"));
    PathBuf::from(name)
}

/// Fail point `snapshot::corrupt_chunk` (tests): flips a byte of a received chunk.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn corrupt_chunk(data: &mut SnapshotData) {
    fail::fail_point!("snapshot::corrupt_chunk", |_| {
        if let Some(byte) = data.pages.first_mut() {
            *byte ^= 0xff;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|&(a, b)| (a.to_owned(), b.to_owned()))
            .collect()
    }

    fn leader(node: &str, addr: &str) -> Option<(String, String)> {
        Some((node.to_owned(), addr.to_owned()))
    }

    #[test]
    fn the_leader_is_asked_first_then_the_others_furthest_applied_first() {
        let running = pairs(&[("a", "A"), ("b", "B"), ("c", "C"), ("d", "D")]);
        let applied = vec![
            ("b".to_owned(), Seq(10)),
            ("c".to_owned(), Seq(30)),
            ("a".to_owned(), Seq(5)),
        ];
        let order = order_sources(leader("a", "A"), &running, &applied, "me");
        assert_eq!(order, ["A", "C", "B", "D"]);
    }

    #[test]
    fn a_node_never_asks_itself() {
        let running = pairs(&[("a", "A"), ("me", "M")]);
        assert_eq!(order_sources(leader("a", "A"), &running, &[], "me"), ["A"]);
        assert_eq!(order_sources(leader("me", "M"), &running, &[], "me"), ["A"]);
    }

    #[test]
    fn with_no_leader_the_running_nodes_are_asked() {
        let running = pairs(&[("a", "A"), ("b", "B")]);
        let applied = vec![("b".to_owned(), Seq(1))];
        assert_eq!(order_sources(None, &running, &applied, "me"), ["B", "A"]);
    }

    #[test]
    fn a_leader_without_a_claim_is_still_asked() {
        assert_eq!(order_sources(leader("a", "A"), &[], &[], "me"), ["A"]);
    }
}
