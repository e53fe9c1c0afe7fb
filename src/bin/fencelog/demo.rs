//! `fencelog demo`: the primary end to end against a private etcd. Producers append records
//! through `Primary::append` (each acknowledged only once etcd has its batch); the primary then
//! resigns, and a second store is rebuilt from etcd alone, verified batch by batch, applied,
//! and compared with the primary's record for record and digest for digest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fencelog::applier::STEP_RECORDS;
use fencelog::batch::BatchDecoder;
use fencelog::config::PrimaryConfig;
use fencelog::etcd::fetch::{append_verified, BatchPages};
use fencelog::etcd::process::EtcdProcess;
use fencelog::keys::KeyLayout;
use fencelog::local_store::{blocking, LocalStore, StoreOptions};
use fencelog::metrics::Metrics;
use fencelog::primary::Primary;
use fencelog::record::Seq;
use fencelog::workload::RecordGenerator;
use indicatif::{ProgressBar, ProgressStyle};

/// Concurrent producers, and records per append call.
const PRODUCERS: u64 = 128;
const RECORDS_PER_APPEND: u64 = 16;

pub async fn run(records: u64, batch_records: usize) -> anyhow::Result<()> {
    if records == 0 || batch_records == 0 {
        bail!("--records and --batch-records must be at least 1");
    }
    println!("starting a private etcd on 127.0.0.1 ...");
    let etcd = EtcdProcess::start().await?;
    println!("etcd is up at {}", etcd.endpoint());
    let client =
        fencelog::etcd::connect(&[etcd.endpoint().to_owned()], Duration::from_secs(5)).await?;

    let primary_dir = tempfile::tempdir()?;
    let primary_store = Arc::new(LocalStore::open(
        primary_dir.path(),
        StoreOptions::default(),
    )?);
    let mut config = PrimaryConfig::new("demo".parse()?, "demo-primary".parse()?, "127.0.0.1:7000");
    config.max_batch_records = batch_records;
    let metrics = Arc::new(Metrics::new()?);
    let primary = Arc::new(
        Primary::start(
            client.clone(),
            primary_store.clone(),
            config.clone(),
            metrics.clone(),
        )
        .await?,
    );
    println!("leading as epoch {}", primary.epoch());

    let started = Instant::now();
    append_records(&primary, records).await?;
    let commit_time = started.elapsed();
    let primary = Arc::into_inner(primary).context("producers still hold the primary")?;
    let applied = primary.wait_applied(Seq(records)).await;
    primary.shutdown().await?;
    println!("resigned; the primary's state is applied through seq {applied}");

    let rebuilt_dir = tempfile::tempdir()?;
    let rebuilt = Arc::new(LocalStore::open(
        rebuilt_dir.path(),
        StoreOptions::default(),
    )?);
    let started = Instant::now();
    rebuild_from_etcd(&client, &KeyLayout::new(&config.cluster), &rebuilt, records).await?;
    let rebuild_time = started.elapsed();

    let written = primary_store.state_digest()?;
    let copy = rebuilt.state_digest()?;
    let batches = metrics.commits.get();
    let encoded_bytes = metrics.batch_bytes.get_sample_sum() as u64;
    println!();
    println!("summary");
    println!("  appended      {records} records from {PRODUCERS} producers, {RECORDS_PER_APPEND} per call");
    println!(
        "  committed     in {batches} batches ({:.0} records per batch)",
        records as f64 / batches.max(1) as f64
    );
    println!(
        "  commit        {:.2}s, {} records/s acknowledged",
        commit_time.as_secs_f64(),
        rate(records, commit_time)
    );
    println!(
        "  in etcd       {encoded_bytes} bytes of compressed batches ({:.1} bytes per record)",
        encoded_bytes as f64 / records as f64
    );
    println!(
        "  rebuild       {:.2}s, {} records/s read from etcd, verified and applied",
        rebuild_time.as_secs_f64(),
        rate(records, rebuild_time)
    );
    println!(
        "  primary state {} keys, digest {:#018x}",
        written.keys, written.digest
    );
    println!(
        "  rebuilt state {} keys, digest {:#018x}",
        copy.keys, copy.digest
    );
    if written != copy || !same_logs(&primary_store, &rebuilt)? {
        bail!("the store rebuilt from etcd differs from the primary's");
    }
    println!("  result        the store rebuilt from etcd matches the primary's");
    Ok(())
}

async fn append_records(primary: &Arc<Primary>, records: u64) -> anyhow::Result<()> {
    let progress = progress_bar(records, "appending");
    let per_producer = records.div_ceil(PRODUCERS);
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let primary = primary.clone();
            let progress = progress.clone();
            let share = per_producer.min(records.saturating_sub(p * per_producer));
            tokio::spawn(async move {
                let mut generator = RecordGenerator::new(p + 1, 100_000, 256);
                let mut left = share;
                while left > 0 {
                    let n = left.min(RECORDS_PER_APPEND);
                    primary.append(generator.take_records(n as usize)).await?;
                    progress.inc(n);
                    left -= n;
                }
                Ok::<_, fencelog::Error>(())
            })
        })
        .collect();
    for producer in producers {
        producer.await??;
    }
    progress.finish();
    Ok(())
}

/// Reads every committed batch from etcd, verifies it, and applies it to `store`.
async fn rebuild_from_etcd(
    client: &etcd_client::Client,
    layout: &KeyLayout,
    store: &Arc<LocalStore>,
    records: u64,
) -> anyhow::Result<()> {
    let progress = progress_bar(records, "rebuilding");
    let limits = fencelog::limits::Limits::default();
    let mut pages = BatchPages::new(
        client,
        layout,
        &limits,
        Seq::FIRST,
        None,
        Duration::from_secs(5),
    );
    let mut decoder = BatchDecoder::new(limits)?;
    while let Some(page) = pages.next_page().await? {
        let count: u64 = page
            .iter()
            .map(|b| u64::from(b.header().record_count))
            .sum();
        let appending = store.clone();
        decoder = blocking(move || {
            append_verified(&appending, &mut decoder, &page)?;
            while appending.apply_next(STEP_RECORDS)?.is_some() {}
            Ok(decoder)
        })
        .await?;
        progress.inc(count);
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

fn rate(records: u64, d: Duration) -> u64 {
    (records as f64 / d.as_secs_f64().max(1e-9)) as u64
}
