//! The client commands: `append`, `read`, `get`, `status` and `promote`, each one call to a
//! node's API.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use fencelog::api::{waits_for_leader, Endpoint, WalClient};
use fencelog::checker::value_digest;
use fencelog::record::{Record, Seq};

use crate::api_security::ApiClientSettings;
use crate::etcd_security::EtcdSecurity;

/// Which node a command talks to: one address, or the leader found through etcd. Each of the
/// three may come from the environment instead (see [`choose_target`] for which wins).
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// A node's API address (host:port) [env: FENCELOG_SERVER].
    #[arg(long, value_name = "HOST:PORT", help_heading = TARGET)]
    pub server: Option<String>,
    /// etcd endpoints (comma-separated), to find the primary through its leader key
    /// [env: FENCELOG_ETCD].
    #[arg(long, value_name = "URLS", value_delimiter = ',', help_heading = TARGET)]
    pub etcd: Option<Vec<String>>,
    /// The cluster whose primary to find (with --etcd) [env: FENCELOG_CLUSTER].
    #[arg(long, value_name = "ID", help_heading = TARGET)]
    pub cluster: Option<String>,
    /// Seconds to wait for a cluster that is starting or failing over: for etcd to answer,
    /// a leader to be elected, the node to listen and to lead.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, help_heading = TARGET)]
    pub wait: u64,
    #[command(flatten)]
    pub etcd_security: EtcdSecurity,
    #[command(flatten)]
    pub api_security: ApiClientSettings,
}

/// The `--help` section of [`Target`]'s own flags.
const TARGET: &str = "Target (one node, or the primary through etcd)";

/// A target's settings from one source: the flags, or the environment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TargetSettings {
    pub server: Option<String>,
    pub etcd: Option<Vec<String>>,
    pub cluster: Option<String>,
}

impl TargetSettings {
    /// `FENCELOG_SERVER`, `FENCELOG_ETCD` (comma-separated) and `FENCELOG_CLUSTER`; an empty
    /// variable counts as unset.
    fn from_env() -> TargetSettings {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        TargetSettings {
            server: var("FENCELOG_SERVER"),
            etcd: var("FENCELOG_ETCD").map(|v| v.split(',').map(|e| e.trim().to_owned()).collect()),
            cluster: var("FENCELOG_CLUSTER"),
        }
    }
}

/// Where a command goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chosen {
    Server(String),
    Etcd {
        endpoints: Vec<String>,
        cluster: String,
    },
}

/// Which target the flags and the environment name. Flags win: `--server` alone, or `--etcd`
/// and `--cluster` (either may come from the environment once the other is a flag); with
/// neither, `FENCELOG_SERVER`, then `FENCELOG_ETCD` with `FENCELOG_CLUSTER`. So a shell that
/// holds a daemon's `FENCELOG_ETCD`/`FENCELOG_CLUSTER` still lets `--server` pick one node.
pub fn choose_target(flags: TargetSettings, env: TargetSettings) -> Result<Chosen, String> {
    const NEITHER: &str = "give --server HOST:PORT, or --etcd URL and --cluster ID \
                           (or FENCELOG_SERVER, or FENCELOG_ETCD and FENCELOG_CLUSTER)";
    let by_etcd = |etcd: Option<Vec<String>>, cluster: Option<String>| match (etcd, cluster) {
        (Some(endpoints), Some(cluster)) => Ok(Chosen::Etcd { endpoints, cluster }),
        (Some(_), None) => Err("--etcd needs --cluster ID (or FENCELOG_CLUSTER)".to_owned()),
        (None, _) => Err("--cluster needs --etcd URL (or FENCELOG_ETCD)".to_owned()),
    };
    match flags {
        TargetSettings {
            server: Some(_),
            etcd: Some(_),
            ..
        }
        | TargetSettings {
            server: Some(_),
            cluster: Some(_),
            ..
        } => Err("--server and --etcd/--cluster name two targets: give one".to_owned()),
        TargetSettings {
            server: Some(server),
            ..
        } => Ok(Chosen::Server(server)),
        TargetSettings {
            etcd: None,
            cluster: None,
            ..
        } => match env {
            TargetSettings {
                server: Some(server),
                ..
            } => Ok(Chosen::Server(server)),
            TargetSettings {
                etcd: Some(endpoints),
                cluster: Some(cluster),
                ..
            } => Ok(Chosen::Etcd { endpoints, cluster }),
            _ => Err(NEITHER.to_owned()),
        },
        TargetSettings { etcd, cluster, .. } => by_etcd(etcd.or(env.etcd), cluster.or(env.cluster)),
    }
}

impl Target {
    /// The target the flags and the environment name (see [`choose_target`]).
    pub fn chosen(&self) -> anyhow::Result<Chosen> {
        let flags = TargetSettings {
            server: self.server.clone(),
            etcd: self.etcd.clone(),
            cluster: self.cluster.clone(),
        };
        choose_target(flags, TargetSettings::from_env()).map_err(anyhow::Error::msg)
    }

    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        Ok(match self.chosen()? {
            Chosen::Server(server) => Endpoint::Server(server),
            Chosen::Etcd { endpoints, cluster } => Endpoint::Etcd {
                endpoints,
                cluster: cluster.parse()?,
                access: self.etcd_security.access()?,
            },
        })
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

/// `read`'s output: only `tsv` so far, `<seq>\t<key>\t<xxh3-64 of the value, 16 hex digits>`
/// (a delete shows `-` as its digest).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ReadFormat {
    Tsv,
}

/// How keys and values are written on the command line and printed: as they are, or in
/// base64 (for bytes a shell cannot pass or a terminal cannot show).
#[derive(Args, Debug, Clone, Copy)]
pub struct Encoding {
    /// Keys and values given on the command line, and those printed, are base64 (standard
    /// alphabet, padded).
    #[arg(long)]
    pub base64: bool,
}

impl Encoding {
    /// The bytes `text` stands for; `what` names it in the error.
    pub fn decode(self, what: &str, text: &str) -> anyhow::Result<Vec<u8>> {
        use base64::Engine;
        match self.base64 {
            false => Ok(text.as_bytes().to_vec()),
            true => base64::engine::general_purpose::STANDARD
                .decode(text)
                .with_context(|| format!("{what} {text:?} is not base64 (--base64)")),
        }
    }

    /// `bytes` as printed: base64, or escaped where not printable ASCII (`\t`, `\xff`).
    pub fn show(self, bytes: &[u8]) -> String {
        use base64::Engine;
        match self.base64 {
            false => bytes.escape_ascii().to_string(),
            true => base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }
}

/// Where an appended value comes from.
pub enum ValueSource {
    Given(String),
    /// A file's bytes as they are; `-` is stdin.
    File(PathBuf),
}

/// Bytes a value file is read up to: past them no node takes the value, whatever its limits.
const MAX_VALUE_FILE_BYTES: u64 = fencelog::limits::HARD_MAX_UNCOMPRESSED as u64;

impl ValueSource {
    fn read(self, encoding: Encoding) -> anyhow::Result<Vec<u8>> {
        let path = match self {
            ValueSource::Given(text) => return encoding.decode("the value", &text),
            ValueSource::File(path) => path,
        };
        let mut value = Vec::new();
        let read = if path.as_os_str() == "-" {
            std::io::stdin()
                .lock()
                .take(MAX_VALUE_FILE_BYTES + 1)
                .read_to_end(&mut value)
        } else {
            std::fs::File::open(&path)
                .and_then(|file| file.take(MAX_VALUE_FILE_BYTES + 1).read_to_end(&mut value))
        };
        let name = match path.as_os_str() == "-" {
            true => "stdin".to_owned(),
            false => path.display().to_string(),
        };
        read.with_context(|| format!("cannot read the value from {name} (--value-file)"))?;
        if value.len() as u64 > MAX_VALUE_FILE_BYTES {
            bail!(
                "the value in {name} (--value-file) is over {} MiB, more than any node takes",
                MAX_VALUE_FILE_BYTES >> 20
            );
        }
        Ok(value)
    }
}

pub async fn append(
    target: &Target,
    key: &str,
    value: ValueSource,
    encoding: Encoding,
) -> anyhow::Result<()> {
    let records = vec![Record::put(
        encoding.decode("the key", key)?,
        value.read(encoding)?,
    )];
    let mut client = target.connect().await?;
    let ack = match client.append(records.clone()).await {
        Err(e) if client.can_wait_out(&e) && target.wait > 0 => {
            eprintln!("{e}: waiting up to {} s (--wait)", target.wait);
            // Past the wait the refusal is the one waited out; any other answer is its own.
            match client.append_waiting(records, target.wait()).await {
                Err(e) if client.can_wait_out(&e) => {
                    Err(e).with_context(|| format!("waited {} s (--wait)", target.wait))?
                }
                acked => acked?,
            }
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
    encoding: Encoding,
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
    let mut last = from - 1;
    while let Some(chunk) = stream.next_chunk().await? {
        for (seq, record) in chunk {
            let digest = value_digest(&record);
            writeln!(out, "{seq}\t{}\t{digest}", encoding.show(&record.key))?;
            last = seq.0;
        }
    }
    out.flush()?;
    match to {
        Some(to) if last < to => bail!(
            "--to {to} is past the log {} holds committed, which ends at seq {last}: printed \
             {} records, {from}..={last}",
            client.addr(),
            last + 1 - from
        ),
        _ => Ok(()),
    }
}

/// Which state a `get` reads.
pub enum ReadAt {
    /// One that has applied at least this seq.
    Applied(Seq),
    /// One that has applied everything the node knew committed when asked.
    Consistent,
}

/// Prints the value of `key` (its bytes, or base64, then a newline).
pub async fn get(
    target: &Target,
    key: &str,
    at: ReadAt,
    timeout: Duration,
    encoding: Encoding,
) -> anyhow::Result<()> {
    let bytes = encoding.decode("the key", key)?;
    let mut client = target.connect().await?;
    let (value, applied) = match at {
        ReadAt::Applied(seq) => client.get(bytes, seq, timeout).await?,
        ReadAt::Consistent => client.get_consistent(bytes, timeout).await?,
    };
    let Some(value) = value else {
        bail!("key {key:?} not found (the node has applied through seq {applied})");
    };
    let mut out = std::io::stdout().lock();
    match encoding.base64 {
        true => writeln!(out, "{}", encoding.show(&value))?,
        false => {
            out.write_all(&value)?;
            writeln!(out)?;
        }
    }
    Ok(())
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
    let (source, batches) = match target.chosen()? {
        Chosen::Etcd { endpoints, cluster } => {
            let access = target.etcd_security.access()?;
            read_etcd_log(&endpoints, &access, &cluster, &stores, &mut checker).await?
        }
        Chosen::Server(_) => {
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
    let (trimmed, mut pages) =
        fencelog::etcd::fetch::BatchPages::from_trimmed(&client, &layout, &limits, timeout).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn given(server: Option<&str>, etcd: Option<&str>, cluster: Option<&str>) -> TargetSettings {
        TargetSettings {
            server: server.map(str::to_owned),
            etcd: etcd.map(|e| vec![e.to_owned()]),
            cluster: cluster.map(str::to_owned),
        }
    }

    fn etcd(endpoint: &str, cluster: &str) -> Chosen {
        Chosen::Etcd {
            endpoints: vec![endpoint.to_owned()],
            cluster: cluster.to_owned(),
        }
    }

    const NOTHING: TargetSettings = TargetSettings {
        server: None,
        etcd: None,
        cluster: None,
    };

    #[test]
    fn a_server_flag_wins_over_a_daemons_etcd_and_cluster_in_the_environment() {
        let env = given(None, Some("http://e"), Some("c1"));
        let chosen = choose_target(given(Some("n:1"), None, None), env);
        assert_eq!(chosen, Ok(Chosen::Server("n:1".into())));
    }

    #[test]
    fn etcd_flags_win_over_a_server_in_the_environment() {
        let env = given(Some("n:1"), None, None);
        let chosen = choose_target(given(None, Some("http://e"), Some("c1")), env);
        assert_eq!(chosen, Ok(etcd("http://e", "c1")));
    }

    #[test]
    fn an_etcd_flag_takes_the_cluster_from_the_environment() {
        let env = given(None, Some("http://other"), Some("c1"));
        let chosen = choose_target(given(None, Some("http://e"), None), env);
        assert_eq!(chosen, Ok(etcd("http://e", "c1")));
    }

    #[test]
    fn a_cluster_flag_takes_etcd_from_the_environment() {
        let env = given(None, Some("http://e"), Some("c1"));
        let chosen = choose_target(given(None, None, Some("c2")), env);
        assert_eq!(chosen, Ok(etcd("http://e", "c2")));
    }

    #[test]
    fn without_flags_the_environments_server_wins_over_its_etcd() {
        let env = given(Some("n:1"), Some("http://e"), Some("c1"));
        assert_eq!(
            choose_target(NOTHING, env),
            Ok(Chosen::Server("n:1".into()))
        );
    }

    #[test]
    fn without_flags_the_environments_etcd_and_cluster_are_used() {
        let env = given(None, Some("http://e"), Some("c1"));
        assert_eq!(choose_target(NOTHING, env), Ok(etcd("http://e", "c1")));
    }

    #[test]
    fn a_server_and_etcd_flags_together_are_refused() {
        for flags in [
            given(Some("n:1"), Some("http://e"), None),
            given(Some("n:1"), None, Some("c1")),
        ] {
            let refused = choose_target(flags, NOTHING).unwrap_err();
            assert!(refused.contains("name two targets"), "{refused}");
        }
    }

    #[test]
    fn etcd_without_a_cluster_anywhere_asks_for_one() {
        let refused = choose_target(given(None, Some("http://e"), None), NOTHING).unwrap_err();
        assert!(refused.contains("--etcd needs --cluster"), "{refused}");
        let refused = choose_target(given(None, None, Some("c1")), NOTHING).unwrap_err();
        assert!(refused.contains("--cluster needs --etcd"), "{refused}");
    }

    #[test]
    fn nothing_anywhere_says_what_to_give() {
        let refused = choose_target(NOTHING, NOTHING).unwrap_err();
        assert!(refused.contains("give --server HOST:PORT"), "{refused}");
        assert!(refused.contains("FENCELOG_SERVER"), "{refused}");
        let only_a_cluster = given(None, None, Some("c1"));
        assert!(choose_target(NOTHING, only_a_cluster).is_err());
    }
}
