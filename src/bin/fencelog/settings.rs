//! A daemon's settings, from three sources: flags win over `FENCELOG_*` environment variables
//! (clap reads both), which win over the TOML file given with `--config`; what none of them
//! sets takes the default from [`Defaults`] or, for the library's own settings (batching,
//! retention), from their `Default` in the library, documented beside them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use fencelog::config::{Pipeline, PrimaryConfig};
use fencelog::keys::{ClusterId, NodeName};
use fencelog::local_store::LocalRetention;
use fencelog::node::{Campaign, NodeConfig};
use fencelog::standby::StandbyConfig;
use serde::Deserialize;

use crate::api_security::ApiServerSettings;
use crate::etcd_security::EtcdSecurity;

/// The `--help` sections of a daemon's settings.
const REQUIRED: &str = "Required (as a flag, its FENCELOG_* variable, or in the --config file)";
const ADDRESSES: &str = "Addresses";
const LEADERSHIP: &str = "Leadership";
const BATCHING: &str = "Batching";
const RETENTION: &str = "Retention in etcd (while leading)";
const LOCAL_STORE: &str = "Local store";
const LOGGING: &str = "Logging";

/// The daemon's own defaults (documented in `docs/OPERATIONS.md`); the node's come from the
/// library (`PrimaryConfig::new`, `Retention::default`, `StoreOptions::default`).
pub struct Defaults;

impl Defaults {
    pub const LISTEN: &'static str = "127.0.0.1:7400";
    pub const METRICS: &'static str = "127.0.0.1:7401";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PipelineArg {
    Double,
    Single,
}

/// A standby's own flag, beside the settings both roles take.
#[derive(Args, Debug, Clone)]
pub struct StandbyArgs {
    /// Take over when the leader's lease ends; in a cluster where no node leads yet, after
    /// one lease TTL (so a `primary` started with it wins the first election).
    #[arg(long, env = "FENCELOG_FAILOVER", num_args = 0..=1, default_missing_value = "true", help_heading = LEADERSHIP)]
    pub failover: Option<bool>,
}

/// The settings a daemon takes. Every field is optional here: [`NodeSettings::resolve`] says
/// which ones are required once all sources are merged.
#[derive(Args, Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeSettings {
    /// The cluster this node belongs to.
    #[arg(long, value_name = "ID", env = "FENCELOG_CLUSTER", help_heading = REQUIRED)]
    pub cluster: Option<String>,
    /// This node's name, unique in the cluster.
    #[arg(long, value_name = "NAME", env = "FENCELOG_NODE", help_heading = REQUIRED)]
    pub node: Option<String>,
    /// Directory of the node's local store.
    #[arg(long, value_name = "DIR", env = "FENCELOG_DATA_DIR", help_heading = REQUIRED)]
    pub data_dir: Option<PathBuf>,
    /// etcd endpoints, comma-separated (http://127.0.0.1:2379,...).
    #[arg(long, value_name = "URLS", env = "FENCELOG_ETCD", value_delimiter = ',', help_heading = REQUIRED)]
    #[serde(default, deserialize_with = "one_or_many")]
    pub etcd: Option<Vec<String>>,
    /// Address the gRPC API listens on [default: 127.0.0.1:7400].
    #[arg(long, value_name = "HOST:PORT", env = "FENCELOG_LISTEN", help_heading = ADDRESSES)]
    pub listen: Option<String>,
    /// Address clients reach the API at, written into the leader key [default: --listen].
    #[arg(long, value_name = "HOST:PORT", env = "FENCELOG_ADVERTISE", help_heading = ADDRESSES)]
    pub advertise: Option<String>,
    /// Address of the /metrics, /healthz and /readyz endpoint [default: 127.0.0.1:7401].
    #[arg(long, value_name = "HOST:PORT", env = "FENCELOG_METRICS", help_heading = ADDRESSES)]
    pub metrics: Option<String>,
    /// Leadership lease TTL in seconds [default: 5].
    #[arg(long, value_name = "SECONDS", env = "FENCELOG_LEASE_TTL", help_heading = LEADERSHIP)]
    pub lease_ttl: Option<u64>,
    /// `failover` of a standby's config file: its flag is [`StandbyArgs::failover`], which a
    /// primary does not have (it always campaigns, and ignores this).
    #[arg(skip)]
    pub failover: Option<bool>,
    /// Serve the API and metrics unauthenticated on an address that is not loopback
    /// [default: false].
    #[arg(long, env = "FENCELOG_INSECURE", num_args = 0..=1, default_missing_value = "true", help_heading = ADDRESSES)]
    pub insecure: Option<bool>,
    /// Most records per committed batch [default: 1024].
    #[arg(long, value_name = "N", env = "FENCELOG_MAX_BATCH_RECORDS", help_heading = BATCHING)]
    pub max_batch_records: Option<usize>,
    /// Milliseconds a batch waits for more records after its first [default: 0].
    #[arg(long, value_name = "MS", env = "FENCELOG_LINGER_MS", help_heading = BATCHING)]
    pub linger_ms: Option<u64>,
    /// Commit pipeline: `double` overlaps the next batch with the commit [default: double].
    #[arg(long, env = "FENCELOG_PIPELINE", help_heading = BATCHING)]
    pub pipeline: Option<PipelineArg>,
    /// Commit transactions on their way to etcd at once (double pipeline): more hide the round
    /// trip to an etcd far away [default: 2].
    #[arg(long, value_name = "N", env = "FENCELOG_MAX_COMMITS_IN_FLIGHT", help_heading = BATCHING)]
    pub max_commits_in_flight: Option<usize>,
    /// While leading: always keep at least this many of the newest records in etcd [default: 100000].
    #[arg(long, value_name = "N", env = "FENCELOG_RETAIN_RECORDS", help_heading = RETENTION)]
    pub retain_records: Option<u64>,
    /// While leading: always keep the batches of the last S seconds in etcd [default: 60].
    #[arg(long, value_name = "SECONDS", env = "FENCELOG_RETAIN_SECONDS", help_heading = RETENTION)]
    pub retain_seconds: Option<u64>,
    /// While leading: most encoded bytes of batches etcd keeps; past it, the oldest go even if a
    /// standby still needs them [default: 536870912].
    #[arg(long, value_name = "BYTES", env = "FENCELOG_MAX_ETCD_LOG_BYTES", help_heading = RETENTION)]
    pub max_etcd_log_bytes: Option<u64>,
    /// While leading: milliseconds between trims [default: 5000].
    #[arg(long, value_name = "MS", env = "FENCELOG_TRIM_INTERVAL_MS", help_heading = RETENTION)]
    pub trim_interval_ms: Option<u64>,
    /// While leading: compact etcd's revision history behind each trim; compaction is etcd-wide, so
    /// on an etcd shared with others leave it to one of them or to etcd's own
    /// `--auto-compaction-*` [default: true].
    #[arg(long, env = "FENCELOG_ETCD_COMPACTION", num_args = 0..=1, default_missing_value = "true", help_heading = RETENTION)]
    pub etcd_compaction: Option<bool>,
    /// Milliseconds between checkpoints of the state while it changes: longer costs less CPU
    /// under a load that dirties the whole state, shorter leaves less log to replay after a
    /// crash [default: 2000].
    #[arg(long, value_name = "MS", env = "FENCELOG_CHECKPOINT_INTERVAL_MS", help_heading = LOCAL_STORE)]
    pub checkpoint_interval_ms: Option<u64>,
    /// Keep at most this many records in the local log (never any the state's last checkpoint
    /// does not cover) [default: all].
    #[arg(long, value_name = "N", env = "FENCELOG_LOCAL_RETAIN_RECORDS", help_heading = LOCAL_STORE)]
    pub local_retain_records: Option<u64>,
    /// Keep at most this many bytes of batches in the local log [default: all].
    #[arg(long, value_name = "BYTES", env = "FENCELOG_LOCAL_RETAIN_BYTES", help_heading = LOCAL_STORE)]
    pub local_retain_bytes: Option<u64>,
    /// Log format [default: text].
    #[arg(long, env = "FENCELOG_LOG_FORMAT", help_heading = LOGGING)]
    pub log_format: Option<LogFormat>,
    /// TLS and user for a secured etcd (`[etcd-security]` in the config file).
    #[command(flatten)]
    #[serde(default)]
    pub etcd_security: EtcdSecurity,
    /// TLS, client certificates and the token of the API (`[api-security]` in the config
    /// file).
    #[command(flatten)]
    #[serde(default)]
    pub api_security: ApiServerSettings,
}

/// A daemon's settings once merged and checked.
pub struct Resolved {
    pub data_dir: PathBuf,
    pub etcd: Vec<String>,
    pub etcd_access: fencelog::etcd::EtcdAccess,
    pub api_security: fencelog::api::ApiSecurity,
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    pub log_format: LogFormat,
    pub node: NodeConfig,
    /// How the local store is opened (its checkpoint policy).
    pub store: fencelog::local_store::StoreOptions,
}

impl NodeSettings {
    /// Reads a TOML settings file (the same names as the flags, e.g. `data-dir = "..."`).
    pub fn from_file(path: &Path) -> anyhow::Result<NodeSettings> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            let place = e
                .span()
                .map(|span| where_in(&text, span.start))
                .unwrap_or_default();
            anyhow::anyhow!("config file {}{place}: {}", path.display(), e.message())
        })
    }

    /// `self` where set, else `lower`.
    pub fn or(self, lower: NodeSettings) -> NodeSettings {
        NodeSettings {
            cluster: self.cluster.or(lower.cluster),
            node: self.node.or(lower.node),
            data_dir: self.data_dir.or(lower.data_dir),
            etcd: self.etcd.or(lower.etcd),
            listen: self.listen.or(lower.listen),
            advertise: self.advertise.or(lower.advertise),
            metrics: self.metrics.or(lower.metrics),
            lease_ttl: self.lease_ttl.or(lower.lease_ttl),
            failover: self.failover.or(lower.failover),
            insecure: self.insecure.or(lower.insecure),
            max_batch_records: self.max_batch_records.or(lower.max_batch_records),
            linger_ms: self.linger_ms.or(lower.linger_ms),
            pipeline: self.pipeline.or(lower.pipeline),
            max_commits_in_flight: self.max_commits_in_flight.or(lower.max_commits_in_flight),
            retain_records: self.retain_records.or(lower.retain_records),
            retain_seconds: self.retain_seconds.or(lower.retain_seconds),
            max_etcd_log_bytes: self.max_etcd_log_bytes.or(lower.max_etcd_log_bytes),
            trim_interval_ms: self.trim_interval_ms.or(lower.trim_interval_ms),
            etcd_compaction: self.etcd_compaction.or(lower.etcd_compaction),
            checkpoint_interval_ms: self.checkpoint_interval_ms.or(lower.checkpoint_interval_ms),
            local_retain_records: self.local_retain_records.or(lower.local_retain_records),
            local_retain_bytes: self.local_retain_bytes.or(lower.local_retain_bytes),
            log_format: self.log_format.or(lower.log_format),
            etcd_security: self.etcd_security.or(lower.etcd_security),
            api_security: self.api_security.or(lower.api_security),
        }
    }

    /// Checks the merged settings and fills in the defaults. `leads` is true for `primary`,
    /// which always campaigns.
    pub fn resolve(self, leads: bool) -> anyhow::Result<Resolved> {
        let etcd = self.etcd.unwrap_or_default();
        let missing: Vec<&str> = [
            ("cluster", self.cluster.is_none()),
            ("node", self.node.is_none()),
            ("data-dir", self.data_dir.is_none()),
            ("etcd", etcd.is_empty()),
        ]
        .into_iter()
        .filter_map(|(flag, missing)| missing.then_some(flag))
        .collect();
        let (Some(cluster), Some(node), Some(data_dir), true) =
            (self.cluster, self.node, self.data_dir, missing.is_empty())
        else {
            bail!("{}", missing_settings(&missing));
        };
        let cluster: ClusterId = cluster.parse()?;
        let node: NodeName = node.parse()?;
        let etcd_access = self.etcd_security.access()?;
        let listen = socket_addr(self.listen.as_deref().unwrap_or(Defaults::LISTEN), "listen")?;
        let metrics = socket_addr(
            self.metrics.as_deref().unwrap_or(Defaults::METRICS),
            "metrics",
        )?;
        let (api_security, peer_access) = self.api_security.resolve()?;
        if api_security.tls.is_none() && !self.insecure.unwrap_or(false) {
            for (addr, flag) in [(listen, "listen"), (metrics, "metrics")] {
                if !addr.ip().is_loopback() {
                    bail!(
                        "--{flag} {addr} is not a loopback address and the node serves no TLS \
                         (--tls-cert): pass --insecure to serve it there anyway"
                    );
                }
            }
        }
        let advertise = self.advertise.unwrap_or_else(|| listen.to_string());

        let mut primary = PrimaryConfig::new(cluster.clone(), node.clone(), advertise);
        if let Some(seconds) = self.lease_ttl {
            primary.lease_ttl = Duration::from_secs(seconds);
        }
        // The safety margin scales down with short TTLs so that they stay valid.
        primary.lease_safety_margin = primary.lease_safety_margin.min(primary.lease_ttl / 4);
        primary.max_batch_records = self.max_batch_records.unwrap_or(primary.max_batch_records);
        if let Some(ms) = self.linger_ms {
            primary.linger = Duration::from_millis(ms);
        }
        if let Some(pipeline) = self.pipeline {
            primary.pipeline = match pipeline {
                PipelineArg::Double => Pipeline::Double,
                PipelineArg::Single => Pipeline::Single,
            };
        }
        primary.max_commits_in_flight = self
            .max_commits_in_flight
            .unwrap_or(primary.max_commits_in_flight);
        let retention = &mut primary.retention;
        retention.retain_records = self.retain_records.unwrap_or(retention.retain_records);
        retention.retain_seconds = self.retain_seconds.unwrap_or(retention.retain_seconds);
        retention.max_etcd_log_bytes = self
            .max_etcd_log_bytes
            .unwrap_or(retention.max_etcd_log_bytes);
        if let Some(ms) = self.trim_interval_ms {
            retention.interval = Duration::from_millis(ms);
        }
        retention.compact = self.etcd_compaction.unwrap_or(retention.compact);
        primary.validate()?;
        // A failover standby gives a primary started with it one lease TTL to take the key.
        let campaign = match (leads, self.failover.unwrap_or(false)) {
            (true, _) => Campaign::AtOnce,
            (false, true) => Campaign::AfterLeader {
                grace: primary.lease_ttl,
            },
            (false, false) => Campaign::Never,
        };
        let standby = StandbyConfig::new(cluster, node);
        let mut store = fencelog::local_store::StoreOptions::default();
        if let Some(ms) = self.checkpoint_interval_ms {
            store.checkpoint.interval = Duration::from_millis(ms);
        }
        Ok(Resolved {
            store,
            data_dir,
            etcd,
            etcd_access,
            api_security,
            listen,
            metrics,
            log_format: self.log_format.unwrap_or(LogFormat::Text),
            node: NodeConfig {
                standby,
                primary,
                campaign,
                local_retention: LocalRetention {
                    retain_records: self.local_retain_records.unwrap_or(u64::MAX),
                    retain_bytes: self.local_retain_bytes.unwrap_or(u64::MAX),
                },
                peer_access,
            },
        })
    }
}

/// Every required setting that none of the sources gave, in one line.
fn missing_settings(flags: &[&str]) -> String {
    let names: Vec<String> = flags.iter().map(|flag| format!("--{flag}")).collect();
    let variables: Vec<String> = flags
        .iter()
        .map(|flag| format!("FENCELOG_{}", env_name(flag)))
        .collect();
    let verb = if flags.len() == 1 { "is" } else { "are" };
    format!(
        "{} {verb} required (or {} or the config file)",
        names.join(", "),
        variables.join(", ")
    )
}

/// Where byte `at` of a config file is, for an error: `, line N (key)`.
fn where_in(text: &str, at: usize) -> String {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let rest = &text[start..];
    let key = rest
        .lines()
        .next()
        .and_then(|l| l.split_once('='))
        .map(|(key, _)| key.trim());
    match key {
        Some(key) if !key.is_empty() => format!(", line {line} ({key})"),
        _ => format!(", line {line}"),
    }
}

/// `etcd = "http://a,http://b"` as well as `etcd = ["http://a", "http://b"]`.
fn one_or_many<'de, D>(deserializer: D) -> Result<Option<Vec<String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Some(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(endpoints) => endpoints.split(',').map(|e| e.trim().to_owned()).collect(),
        OneOrMany::Many(endpoints) => endpoints,
    }))
}

fn env_name(flag: &str) -> String {
    flag.to_uppercase().replace('-', "_")
}

/// An address to listen on: `IP:PORT`, or `HOST:PORT` with the host resolved now (its IPv4
/// address where it has one, so that `localhost` means 127.0.0.1 as the defaults do).
fn socket_addr(value: &str, flag: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        bail!("--{flag} {value:?} is not a HOST:PORT address");
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        bail!("--{flag} {value:?} is not a HOST:PORT address");
    }
    let addrs: Vec<SocketAddr> = value
        .to_socket_addrs()
        .with_context(|| format!("--{flag} {value:?}: cannot resolve {host}"))?
        .collect();
    addrs
        .iter()
        .find(|addr| addr.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| format!("--{flag} {value:?}: {host} has no address"))
}

#[cfg(test)]
mod tests {
    use clap::{Args, Command};
    use fencelog::config::PrimaryConfig;
    use fencelog::local_store::StoreOptions;

    use super::NodeSettings;

    /// The `[default: X]` a flag's help states.
    fn stated_default(flag: &str) -> String {
        let command = NodeSettings::augment_args(Command::new("node"));
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(flag))
            .unwrap_or_else(|| panic!("no --{flag}"));
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        let (_, default) = help
            .rsplit_once("[default: ")
            .unwrap_or_else(|| panic!("--{flag} states no default: {help}"));
        default.trim_end_matches(['.', ']']).to_owned()
    }

    #[test]
    fn the_help_states_the_librarys_defaults() {
        let primary = PrimaryConfig::new("c".parse().unwrap(), "n".parse().unwrap(), "a:1");
        let retention = &primary.retention;
        let store = StoreOptions::default();
        let expected = [
            ("lease-ttl", primary.lease_ttl.as_secs().to_string()),
            ("max-batch-records", primary.max_batch_records.to_string()),
            ("linger-ms", primary.linger.as_millis().to_string()),
            (
                "max-commits-in-flight",
                primary.max_commits_in_flight.to_string(),
            ),
            ("retain-records", retention.retain_records.to_string()),
            ("retain-seconds", retention.retain_seconds.to_string()),
            (
                "max-etcd-log-bytes",
                retention.max_etcd_log_bytes.to_string(),
            ),
            (
                "trim-interval-ms",
                retention.interval.as_millis().to_string(),
            ),
            ("etcd-compaction", retention.compact.to_string()),
            (
                "checkpoint-interval-ms",
                store.checkpoint.interval.as_millis().to_string(),
            ),
        ];
        for (flag, value) in expected {
            assert_eq!(stated_default(flag), value, "--{flag}");
        }
    }
}
