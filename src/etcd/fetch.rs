//! Committed batches read back from etcd: by key range from a seq on, in pages, every page at
//! the revision of the first, so the pages form one consistent view of the log.
//!
//! A page holds at most [`PAGE_BATCHES`] batches; the client's decode limit is raised to fit a
//! page of maximal batches (etcd-client's default of 4 MiB would refuse a large range). Pages
//! are checked for continuity by their headers: a batch that does not start right after the
//! previous one is a gap, reported as [`Error::MissingBatches`], never skipped. Callers verify
//! each batch's checksum with a full decode before they keep it.

use std::time::Duration;

use etcd_client::{Client, GetOptions, KvClient};

use crate::batch::{BatchDecoder, EncodedBatch};
use crate::error::{Error, Result};
use crate::etcd::timed;
use crate::etcd::trim::parse_trimmed;
use crate::keys::KeyLayout;
use crate::limits::Limits;
use crate::local_store::LocalStore;
use crate::record::Seq;

/// Batches per range read.
pub const PAGE_BATCHES: usize = 16;

/// Reads committed batches from `from` on, page by page.
pub struct BatchPages {
    kv: KvClient,
    layout: KeyLayout,
    limits: Limits,
    request_timeout: Duration,
    next: Seq,
    through: Option<Seq>,
    /// 0 until the first page is read; then the revision every page is read at.
    revision: i64,
    done: bool,
    /// Why the batch after the last page returned cannot be read: returned by the next call,
    /// so that the good batches before a damaged one still reach the reader.
    failed: Option<Error>,
}

impl BatchPages {
    /// Pages of the batches `from ..= through` (to the end of the log when `through` is
    /// `None`). `from` must start a batch: callers pass the seq after the last one they hold.
    pub fn new(
        client: &Client,
        layout: &KeyLayout,
        limits: &Limits,
        from: Seq,
        through: Option<Seq>,
        request_timeout: Duration,
    ) -> BatchPages {
        let page_bytes = PAGE_BATCHES * limits.max_batch_bytes + (1 << 20);
        BatchPages {
            kv: client.kv_client().max_decoding_message_size(page_bytes),
            layout: layout.clone(),
            limits: limits.clone(),
            request_timeout,
            next: from,
            through,
            revision: 0,
            done: through.is_some_and(|t| t < from),
            failed: None,
        }
    }

    /// The log as etcd holds it now: `trimmed` (its lowest seq) and the pages of every batch
    /// from there on, all read at the revision `trimmed` was read at, so that a trim between
    /// the two reads cannot look like a gap. A trimmer compacts one trim behind: a read that
    /// outlasts two trims fails as compacted rather than mixing two views.
    pub async fn from_trimmed(
        client: &Client,
        layout: &KeyLayout,
        limits: &Limits,
        request_timeout: Duration,
    ) -> Result<(Seq, BatchPages)> {
        let response = timed(
            request_timeout,
            client.kv_client().get(layout.trimmed(), None),
        )
        .await?;
        let trimmed = parse_trimmed(response.kvs().first().map(|kv| kv.value()))?;
        let mut pages = BatchPages::new(client, layout, limits, trimmed, None, request_timeout);
        pages.revision = response.header().map_or(0, |h| h.revision());
        Ok((trimmed, pages))
    }

    /// The revision the pages were read at (0 before the first page).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The next page in seq order, or `None` when the range is exhausted.
    pub async fn next_page(&mut self) -> Result<Option<Vec<EncodedBatch>>> {
        if let Some(failed) = self.failed.take() {
            self.done = true;
            return Err(failed);
        }
        if self.done {
            return Ok(None);
        }
        let options = GetOptions::new()
            .with_range(prefix_end(&self.layout.batches_prefix()))
            .with_limit(PAGE_BATCHES as i64)
            .with_revision(self.revision);
        let response = timed(
            self.request_timeout,
            self.kv.get(self.layout.batch(self.next), Some(options)),
        )
        .await?;
        if self.revision == 0 {
            self.revision = response.header().map_or(0, |h| h.revision());
        }
        let mut page = Vec::with_capacity(response.kvs().len());
        for kv in response.kvs() {
            let batch = match self.parse(kv.key(), kv.value()) {
                Ok(batch) => batch,
                Err(e) if page.is_empty() => return Err(e),
                Err(e) => {
                    self.failed = Some(e);
                    return Ok(Some(page));
                }
            };
            self.next = batch.last_seq().next()?;
            let reached_end = self.through.is_some_and(|t| batch.last_seq() >= t);
            page.push(batch);
            if reached_end {
                self.done = true;
                return Ok(Some(page));
            }
        }
        if !response.more() {
            self.done = true;
            if self.through.is_some() {
                return Err(Error::MissingBatches {
                    expected: self.next,
                    found: None,
                });
            }
        }
        Ok((!page.is_empty()).then_some(page))
    }

    /// The batch at `key`, if it is the one expected next.
    fn parse(&self, key: &[u8], value: &[u8]) -> Result<EncodedBatch> {
        let key_seq = self.layout.parse_batch_key(key)?;
        let batch = EncodedBatch::parse(value.to_vec(), &self.limits)?;
        if batch.first_seq() != self.next || key_seq != self.next {
            return Err(Error::MissingBatches {
                expected: self.next,
                found: Some(batch.first_seq()),
            });
        }
        Ok(batch)
    }
}

/// Verifies each batch of a page with a full decode and appends the page to the store as
/// committed, up to the first batch that fails verification (which is refused). Blocking: run
/// it with [`crate::local_store::blocking`].
pub fn append_verified(
    store: &LocalStore,
    decoder: &mut BatchDecoder,
    page: &[EncodedBatch],
) -> Result<()> {
    let mut verified = 0;
    let mut damage = None;
    for batch in page {
        if let Err(e) = decoder.decode(batch.as_bytes()) {
            damage = Some(e);
            break;
        }
        verified += 1;
    }
    store.append_committed_all(&page[..verified])?;
    damage.map_or(Ok(()), |e| Err(e.into()))
}

/// The smallest key above every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}
