//! `fencelog demo`: the commit path end to end against a private etcd. A writer takes the
//! leader key, writes each batch ahead to its local store, commits it with the fenced
//! transaction and marks it committed; a second store is then rebuilt from etcd alone, and the
//! two must agree record for record and digest for digest.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use fencelog::batch::{Batch, BatchEncoder, EncodedBatch};
use fencelog::etcd::commit::{commit_batch, CommitOutcome};
use fencelog::etcd::process::EtcdProcess;
use fencelog::keys::KeyLayout;
use fencelog::limits::Limits;
use fencelog::local_store::{LocalStore, StoreOptions};
use fencelog::record::{Epoch, Seq};
use fencelog::workload::RecordGenerator;
use indicatif::{ProgressBar, ProgressStyle};

/// Batches per range read while rebuilding: a page stays far below the client's 4 MiB limit.
const PAGE_BATCHES: i64 = 16;

pub async fn run(records: u64, batch_records: usize) -> anyhow::Result<()> {
    if records == 0 || batch_records == 0 {
        bail!("--records and --batch-records must be at least 1");
    }
    println!("starting a private etcd on 127.0.0.1 ...");
    let etcd = EtcdProcess::start().await?;
    let mut client = etcd.client().await?;
    println!("etcd is up at {}", etcd.endpoint());
    let layout = KeyLayout::new(&"demo".parse()?);
    let epoch = take_leadership(&mut client, &layout).await?;
    println!("leader key {} taken: epoch {epoch}", layout.leader());

    let writer_dir = tempfile::tempdir()?;
    let writer = LocalStore::open(writer_dir.path(), StoreOptions::default())?;
    let started = Instant::now();
    let committed =
        commit_records(&mut client, &layout, epoch, &writer, records, batch_records).await?;
    let commit_time = started.elapsed();
    while writer.apply_next()?.is_some() {}

    let reader_dir = tempfile::tempdir()?;
    let reader = LocalStore::open(reader_dir.path(), StoreOptions::default())?;
    let started = Instant::now();
    rebuild_from_etcd(&mut client, &layout, &reader, records).await?;
    while reader.apply_next()?.is_some() {}
    let rebuild_time = started.elapsed();

    let (written, rebuilt) = (writer.state_digest()?, reader.state_digest()?);
    let positions = reader.positions()?;
    println!();
    println!("summary");
    println!(
        "  committed     {records} records in {} batches of up to {batch_records}",
        committed.batches
    );
    println!(
        "  commit        {:.2}s, {} records/s (one transaction in flight)",
        secs(commit_time),
        rate(records, commit_time)
    );
    println!(
        "  compression   {} payload bytes -> {} in etcd (ratio {:.2})",
        committed.payload_bytes,
        committed.encoded_bytes,
        committed.payload_bytes as f64 / committed.encoded_bytes as f64
    );
    println!(
        "  rebuild       {:.2}s, {} records/s read from etcd, received and applied",
        secs(rebuild_time),
        rate(records, rebuild_time)
    );
    println!(
        "  positions     received {} applied {}",
        positions.received_seq, positions.applied_seq
    );
    println!(
        "  writer state  {} keys, digest {:#018x}",
        written.keys, written.digest
    );
    println!(
        "  rebuilt state {} keys, digest {:#018x}",
        rebuilt.keys, rebuilt.digest
    );
    if written != rebuilt || !same_logs(&writer, &reader)? {
        bail!("the store rebuilt from etcd differs from the writer's");
    }
    println!("  result        the store rebuilt from etcd matches the writer's");
    Ok(())
}

/// Creates the leader key under a lease if nobody holds it; its create revision is the epoch.
async fn take_leadership(client: &mut Client, layout: &KeyLayout) -> anyhow::Result<Epoch> {
    let lease = client.lease_grant(10, None).await?.id();
    let txn = Txn::new()
        .when([Compare::create_revision(
            layout.leader(),
            CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::put(
            layout.leader(),
            "demo-writer",
            Some(PutOptions::new().with_lease(lease)),
        )]);
    let response = client.txn(txn).await?;
    let revision = response
        .header()
        .map(|h| h.revision())
        .context("etcd sent no header")?;
    if !response.succeeded() {
        bail!("{} is already held", layout.leader());
    }
    Ok(Epoch(u64::try_from(revision)?))
}

struct Committed {
    batches: u64,
    payload_bytes: u64,
    encoded_bytes: u64,
}

async fn commit_records(
    client: &mut Client,
    layout: &KeyLayout,
    epoch: Epoch,
    store: &LocalStore,
    records: u64,
    batch_records: usize,
) -> anyhow::Result<Committed> {
    let progress = progress_bar(records, "committing");
    let mut encoder = BatchEncoder::new(Limits::default(), 1)?;
    let mut generator = RecordGenerator::new(1, 100_000, 256);
    let mut kv = client.kv_client();
    let mut totals = Committed {
        batches: 0,
        payload_bytes: 0,
        encoded_bytes: 0,
    };
    let (mut next_seq, mut latest_revision) = (Seq::FIRST, 0);
    while next_seq.0 <= records {
        let count = (records - next_seq.0 + 1).min(batch_records as u64) as usize;
        let batch = Batch::new(epoch, next_seq, generator.take_records(count))?;
        totals.payload_bytes += batch
            .records()
            .iter()
            .map(|r| (r.key.len() + r.value.len()) as u64)
            .sum::<u64>();
        let encoded = encoder.encode(&batch)?;
        store.append_pending(&encoded)?;
        match commit_batch(&mut kv, layout, epoch, latest_revision, &encoded).await? {
            CommitOutcome::Committed { revision } => latest_revision = revision,
            CommitOutcome::Refused(refusal) => {
                bail!("etcd refused batch {}: {refusal:?}", encoded.first_seq())
            }
        }
        store.mark_committed(encoded.last_seq())?;
        totals.batches += 1;
        totals.encoded_bytes += encoded.as_bytes().len() as u64;
        next_seq = encoded.last_seq().next()?;
        progress.inc(count as u64);
    }
    progress.finish();
    Ok(totals)
}

/// Reads every batch from etcd in pages of [`PAGE_BATCHES`] and appends it to `store`.
async fn rebuild_from_etcd(
    client: &mut Client,
    layout: &KeyLayout,
    store: &LocalStore,
    records: u64,
) -> anyhow::Result<()> {
    let progress = progress_bar(records, "rebuilding");
    let mut range_end = layout.batches_prefix().into_bytes();
    *range_end.last_mut().context("empty prefix")? += 1;
    let mut from = layout.batch(Seq::FIRST);
    let mut revision = 0;
    loop {
        let options = GetOptions::new()
            .with_range(range_end.clone())
            .with_limit(PAGE_BATCHES)
            .with_revision(revision);
        let page = client.get(from.clone(), Some(options)).await?;
        // Every page is read at the first page's revision: one consistent view of the log.
        revision = page
            .header()
            .map(|h| h.revision())
            .context("etcd sent no header")?;
        for kv in page.kvs() {
            let batch = EncodedBatch::parse(kv.value().to_vec(), &Limits::default())?;
            store.append_committed(&batch)?;
            progress.inc(u64::from(batch.header().record_count));
        }
        let Some(last) = page.kvs().last().filter(|_| page.more()) else {
            break;
        };
        from = layout.batch(layout.parse_batch_key(last.key())?.next()?);
    }
    progress.finish();
    Ok(())
}

/// Compares two logs record by record, a chunk at a time.
fn same_logs(a: &LocalStore, b: &LocalStore) -> anyhow::Result<bool> {
    const CHUNK: usize = 16 * 1024;
    let mut from = Seq::FIRST;
    loop {
        let chunk = a.read(from, CHUNK)?;
        if chunk != b.read(from, CHUNK)? {
            return Ok(false);
        }
        match chunk.last() {
            Some((last, _)) => from = last.next()?,
            None => return Ok(true),
        }
    }
}

fn progress_bar(total: u64, what: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(total).with_message(what);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} records ({per_sec}, {eta})")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn rate(records: u64, d: Duration) -> u64 {
    (records as f64 / d.as_secs_f64().max(1e-9)) as u64
}
