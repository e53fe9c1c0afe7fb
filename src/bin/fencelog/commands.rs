//! The client commands: `append`, `read`, `get`, `status` and `promote`, each one call to a
//! node's API.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use fencelog::api::{waits_for_leader, Endpoint, WalClient};
use fencelog::checker::tsv_line;
use fencelog::record::{Record, Seq};

use crate::api_security::ApiClientSettings;
use crate::etcd_security::EtcdSecurity;

/// Which node a command talks to: one address, or the leader found through etcd.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// A node's API address (host:port).
    #[arg(long, conflicts_with_all = ["etcd", "cluster"], required_unless_present = "etcd")]
    pub server: Option<String>,
    /// etcd endpoints (comma-separated), to find the primary through its leader key.
    #[arg(long, value_delimiter = ',', requires = "cluster")]
    pub etcd: Option<Vec<String>>,
    /// The cluster whose primary to find (with --etcd).
    #[arg(long, requires = "etcd")]
    pub cluster: Option<String>,
    #[command(flatten)]
    pub etcd_security: EtcdSecurity,
    #[command(flatten)]
    pub api_security: ApiClientSettings,
    /// Seconds to wait for a cluster that is starting or failing over: for etcd to answer,
    /// a leader to be elected, the node to listen and to lead.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub wait: u64,
}

impl Target {
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        match (&self.server, &self.etcd, &self.cluster) {
            (Some(server), _, _) => Ok(Endpoint::Server(server.clone())),
            (None, Some(endpoints), Some(cluster)) => Ok(Endpoint::Etcd {
                endpoints: endpoints.clone(),
                cluster: cluster.parse()?,
                access: self.etcd_security.access()?,
            }),
            _ => bail!("give --server ADDR, or --etcd URL and --cluster ID"),
        }
    }

    /// Connects, waiting up to `--wait` for what a starting cluster lacks (said once on
    /// stderr, so that a wait is not mistaken for a hang).
    pub async fn connect(&self) -> anyhow::Result<WalClient> {
        let (endpoint, access) = (self.endpoint()?, self.api_security.access()?);
        match WalClient::connect_with(endpoint.clone(), access.clone()).await {
            Err(e) if waits_for_leader(&e) && self.wait > 0 => {
                eprintln!("{e}: waiting up to {} s (--wait)", self.wait);
                WalClient::connect_waiting(endpoint, access, self.wait())
                    .await
                    .with_context(|| format!("waited {} s (--wait)", self.wait))
            }
            connected => Ok(connected?),
        }
    }

    pub fn wait(&self) -> Duration {
        Duration::from_secs(self.wait)
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ReadFormat {
    /// `<seq>\t<key>\t<xxh3-64 of the value, 16 hex digits>`; a delete shows `-` as its digest.
    Tsv,
}

pub async fn append(target: &Target, key: String, value: String) -> anyhow::Result<()> {
    let mut client = target.connect().await?;
    let records = vec![Record::put(key, value)];
    let ack = match client.append(records.clone()).await {
        Err(e) if client.can_wait_out(&e) && target.wait > 0 => {
            eprintln!("{e}: waiting up to {} s (--wait)", target.wait);
            client
                .append_waiting(records, target.wait())
                .await
                .with_context(|| format!("waited {} s (--wait)", target.wait))?
        }
        acked => acked?,
    };
    println!("seq {}", ack.first_seq);
    Ok(())
}

pub async fn read(
    target: &Target,
    from: u64,
    to: Option<u64>,
    _format: ReadFormat,
) -> anyhow::Result<()> {
    if from == 0 {
        bail!("--from must be at least 1: seqs start at 1");
    }
    if to.is_some_and(|to| to < from) {
        bail!("--to must not be below --from");
    }
    let mut client = target.connect().await?;
    let mut stream = client.read(Seq(from), to.map(Seq)).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    while let Some(chunk) = stream.next_chunk().await? {
        for (seq, record) in chunk {
            writeln!(out, "{}", tsv_line(seq, &record))?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Which state a `get` reads.
pub enum ReadAt {
    /// One that has applied at least this seq.
    Applied(Seq),
    /// One that has applied everything the node knew committed when asked.
    Consistent,
}

pub async fn get(
    target: &Target,
    key: String,
    at: ReadAt,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut client = target.connect().await?;
    let (value, applied) = match at {
        ReadAt::Applied(seq) => client.get(key.clone().into_bytes(), seq, timeout).await?,
        ReadAt::Consistent => {
            client
                .get_consistent(key.clone().into_bytes(), timeout)
                .await?
        }
    };
    match value {
        Some(value) => {
            let mut out = std::io::stdout().lock();
            out.write_all(&value)?;
            writeln!(out)?;
            Ok(())
        }
        None => bail!("key {key:?} not found (the node has applied through seq {applied})"),
    }
}

pub async fn promote(
    server: String,
    force: bool,
    api_security: &ApiClientSettings,
) -> anyhow::Result<()> {
    let mut client =
        WalClient::connect_with(Endpoint::Server(server.clone()), api_security.access()?).await?;
    let epoch = client
        .promote(force)
        .await
        .with_context(|| format!("{server} was not promoted"))?;
    println!("promoted {server}: leading as epoch {epoch}");
    Ok(())
}

pub async fn status(target: &Target, json: bool) -> anyhow::Result<()> {
    let mut client = target.connect().await?;
    let s = client.status().await?;
    let lag_records = s.committed_seq.saturating_sub(s.applied_seq);
    if json {
        let object = serde_json::json!({
            "cluster": s.cluster,
            "node": s.node,
            "address": s.address,
            "role": s.role,
            "state": s.state,
            "epoch": s.epoch,
            "committed_seq": s.committed_seq,
            "received_seq": s.received_seq,
            "applied_seq": s.applied_seq,
            "lag_records": lag_records,
            "receive_lag_seconds": s.receive_lag_seconds,
            "apply_lag_seconds": s.apply_lag_seconds,
            "leader": s.leader,
            "leader_node": s.leader_node,
            "error": s.error,
        });
        println!("{object}");
        return Ok(());
    }
    println!(
        "node           {} ({} in cluster {})",
        s.node, s.address, s.cluster
    );
    println!("role           {}", s.role);
    println!("state          {}", s.state);
    println!("epoch          {}", s.epoch);
    println!("committed_seq  {}", s.committed_seq);
    println!("received_seq   {}", s.received_seq);
    println!("applied_seq    {}", s.applied_seq);
    println!(
        "lag            {lag_records} records; receive {:.3} s, apply {:.3} s",
        s.receive_lag_seconds, s.apply_lag_seconds
    );
    match (&s.leader_node, &s.leader) {
        (Some(node), Some(addr)) => println!("leader         {node} ({addr})"),
        _ => println!("leader         (nobody)"),
    }
    if let Some(error) = &s.error {
        println!("error          {error}");
    }
    Ok(())
}

/// Installs a snapshot of the target's state into a stopped node's data directory, with a
/// progress bar; the old store stays as it was unless the new one is complete and verified.
pub async fn bootstrap(target: &Target, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let mut client = target.connect().await?;
    let source = client.addr().to_owned();
    let bar = indicatif::ProgressBar::new(0).with_style(indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}) {msg}",
    )?);
    let started = std::time::Instant::now();
    let mut first_chunk = None;
    let header = fencelog::snapshot::bootstrap(
        &mut client,
        data_dir,
        fencelog::local_store::StoreOptions::default(),
        |progress| {
            first_chunk.get_or_insert_with(|| started.elapsed());
            bar.set_length(progress.total_bytes);
            bar.set_position(progress.bytes);
            bar.set_message(format!("{} keys", progress.total_keys));
        },
    )
    .await
    .with_context(|| format!("bootstrapping {} from {source}", data_dir.display()))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "installed the state of {source} as of seq {} into {}",
        header.seq,
        data_dir.display()
    );
    println!(
        "  {} keys, {:.1} MB in {seconds:.2} s ({:.0} keys/s, {:.1} MB/s), digest {:016x}",
        header.keys,
        header.bytes as f64 / 1e6,
        header.keys as f64 / seconds,
        header.bytes as f64 / 1e6 / seconds,
        header.digest
    );
    if let Some(first) = first_chunk {
        println!(
            "  the source exported its state in about {:.2} s (until the first chunk was installed)",
            first.as_secs_f64()
        );
    }
    Ok(())
}

/// `fencelog check`: the history checker over acknowledged-records files, the committed log
/// (with `--etcd`, the batches in etcd themselves, verified; with `--server`, a node's `Read`),
/// and stopped nodes' stores.
pub async fn check(
    target: &Target,
    acked_files: &[std::path::PathBuf],
    data_dirs: &[std::path::PathBuf],
) -> anyhow::Result<()> {
    use fencelog::checker::{parse_acked, Checker};
    let mut text = String::new();
    for file in acked_files {
        text.push_str(
            &std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?,
        );
        text.push('\n');
    }
    let (acked, mut violations) = parse_acked(&text)?;
    let acknowledged = acked.len();
    let mut nodes = Vec::new();
    let mut stores = Vec::new();
    for dir in data_dirs {
        let store = fencelog::local_store::LocalStore::open_existing(dir, Default::default())
            .with_context(|| format!("inspecting {}", dir.display()))?;
        nodes.push((dir.display().to_string(), store.state_digest()?));
        stores.push(store);
    }
    let mut checker = Checker::new(acked, nodes);
    let (source, batches) = match (&target.server, &target.etcd, &target.cluster) {
        (None, Some(endpoints), Some(cluster)) => {
            let access = target.etcd_security.access()?;
            let (etcd, batches) =
                read_etcd_log(endpoints, &access, cluster, &stores, &mut checker).await?;
            (etcd, batches)
        }
        _ => {
            let mut client = target.connect().await?;
            let mut stream = client.read(Seq(1), None).await?;
            while let Some(chunk) = stream.next_chunk().await? {
                for (seq, record) in chunk {
                    checker.committed(seq, &record);
                }
            }
            (client.addr().to_owned(), Vec::new())
        }
    };
    let epochs = fencelog::checker::epochs(&batches).len();
    let mut report = checker.finish(&batches);
    violations.append(&mut report.violations);
    println!(
        "checked {acknowledged} acknowledged records against the committed log {}..={} from {}",
        report.committed_first, report.committed_last, source
    );
    println!(
        "  {} acknowledged records found as acknowledged; {} batches in etcd over {epochs} epochs; {} node states replayed",
        report.acknowledged, report.batches_checked, report.nodes_checked
    );
    if report.unverified > 0 {
        println!(
            "  {} acknowledged records are below seq {}, where the log read starts (trimmed from etcd): \
             not verified; give a node's stopped store with --data-dir to verify them from its log",
            report.unverified, report.committed_first
        );
    }
    if violations.is_empty() {
        println!("  no violations");
        return Ok(());
    }
    for violation in violations.iter().take(SHOWN_VIOLATIONS) {
        println!("  VIOLATION {violation}");
    }
    if violations.len() > SHOWN_VIOLATIONS {
        println!(
            "  ... and {} more violations",
            violations.len() - SHOWN_VIOLATIONS
        );
    }
    anyhow::bail!("{} violations of the history", violations.len())
}

/// Violations printed in full; past them, only their count.
const SHOWN_VIOLATIONS: usize = 20;

/// Feeds the committed log to `checker`: what etcd trimmed from the stopped store among
/// `stores` whose log reaches back furthest (its batches were committed: a store holds only
/// committed batches below its `received_seq`), then etcd's batches, each verified. Returns
/// where it read and etcd's batch headers.
async fn read_etcd_log(
    endpoints: &[String],
    access: &fencelog::etcd::EtcdAccess,
    cluster: &str,
    stores: &[fencelog::local_store::LocalStore],
    checker: &mut fencelog::checker::Checker,
) -> anyhow::Result<(String, Vec<fencelog::batch::BatchHeader>)> {
    let timeout = std::time::Duration::from_secs(5);
    let client = fencelog::etcd::connect_with(endpoints, access, timeout).await?;
    let layout = fencelog::keys::KeyLayout::new(&cluster.parse()?);
    let limits = fencelog::limits::Limits::default();
    let trimmed = fencelog::etcd::trim::read_trimmed(&client, &layout, timeout).await?;
    let mut source = format!("etcd at {}", endpoints.join(","));
    let oldest = stores
        .iter()
        .filter_map(|store| Some((store.log_stats().ok()?.oldest_seq, store)))
        .filter(|(oldest, _)| *oldest < trimmed)
        .min_by_key(|(oldest, _)| *oldest);
    if let Some((oldest, store)) = oldest {
        let mut next = oldest;
        while next < trimmed {
            let records = store.read(next, 4096, 8 << 20)?;
            let Some(&(last, _)) = records.last() else {
                break;
            };
            for (seq, record) in records.iter().take_while(|(seq, _)| *seq < trimmed) {
                checker.committed(*seq, record);
            }
            next = last.next()?;
        }
        source = format!(
            "{}'s log (seqs {oldest}..{trimmed}) and {source}",
            store.dir().display()
        );
    }
    let mut pages =
        fencelog::etcd::fetch::BatchPages::new(&client, &layout, &limits, trimmed, None, timeout);
    let mut decoder = fencelog::batch::BatchDecoder::new(limits.clone())?;
    let mut headers = Vec::new();
    while let Some(page) = pages.next_page().await? {
        for batch in page {
            headers.push(*batch.header());
            for (seq, record) in decoder.decode(batch.as_bytes())?.iter() {
                checker.committed(seq, record);
            }
        }
    }
    Ok((source, headers))
}
