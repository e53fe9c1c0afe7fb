//! The flags that secure the API: a daemon's (`[api-security]` in its config file), which say
//! how it serves and how it calls its peers, and a client command's, which say how it connects.
//! A token comes from a file or `FENCELOG_API_TOKEN`, never from a flag, which `ps` would show.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use fencelog::api::security::ServerTls;
use fencelog::api::{ApiAccess, ApiSecurity};
use fencelog::credentials::{ClientCertificate, Secret};
use serde::Deserialize;

/// The environment variable that may hold the API token.
pub const TOKEN_ENV: &str = "FENCELOG_API_TOKEN";

/// How a daemon serves its API, and calls other nodes' APIs.
#[derive(Args, Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ApiServerSettings {
    /// Serve the API over TLS with this certificate (PEM); also this node's certificate when it
    /// calls another node.
    #[arg(
        long,
        env = "FENCELOG_TLS_CERT",
        help_heading = "API security",
        value_name = "FILE"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(
        long,
        env = "FENCELOG_TLS_KEY",
        help_heading = "API security",
        value_name = "FILE"
    )]
    pub tls_key: Option<PathBuf>,
    /// Verify client certificates against this CA (PEM) and require one on every connection,
    /// unless --open-reads.
    #[arg(
        long,
        env = "FENCELOG_TLS_CLIENT_CA",
        help_heading = "API security",
        value_name = "FILE"
    )]
    pub tls_client_ca: Option<PathBuf>,
    /// With --tls-client-ca: let clients without a certificate connect for Read, Get, Status
    /// and Snapshot; Append and Promote still need a certificate or the token.
    #[arg(long, env = "FENCELOG_OPEN_READS", help_heading = "API security", num_args = 0..=1, default_missing_value = "true")]
    pub open_reads: Option<bool>,
    /// CA (PEM) of the other nodes' API certificates [default: --tls-client-ca].
    #[arg(
        long,
        env = "FENCELOG_TLS_CA",
        help_heading = "API security",
        value_name = "FILE"
    )]
    pub tls_ca: Option<PathBuf>,
    /// File whose first line is a bearer token that authorizes Append and Promote (or set
    /// FENCELOG_API_TOKEN).
    #[arg(
        long,
        env = "FENCELOG_API_TOKEN_FILE",
        help_heading = "API security",
        value_name = "FILE"
    )]
    pub api_token_file: Option<PathBuf>,
}

impl ApiServerSettings {
    /// `self` where set, else `lower`.
    pub fn or(self, lower: ApiServerSettings) -> ApiServerSettings {
        ApiServerSettings {
            tls_cert: self.tls_cert.or(lower.tls_cert),
            tls_key: self.tls_key.or(lower.tls_key),
            tls_client_ca: self.tls_client_ca.or(lower.tls_client_ca),
            open_reads: self.open_reads.or(lower.open_reads),
            tls_ca: self.tls_ca.or(lower.tls_ca),
            api_token_file: self.api_token_file.or(lower.api_token_file),
        }
    }

    /// How the server protects itself, and how this node calls its peers.
    pub fn resolve(&self) -> anyhow::Result<(ApiSecurity, ApiAccess)> {
        let identity = certificate(&self.tls_cert, &self.tls_key, "--tls-cert", "--tls-key")?;
        if identity.is_none() && (self.tls_client_ca.is_some() || self.open_reads.is_some()) {
            bail!("--tls-client-ca and --open-reads need --tls-cert and --tls-key");
        }
        let token = Secret::from_file_or_env(self.api_token_file.as_deref(), TOKEN_ENV)?;
        let tls = identity.clone().map(|identity| ServerTls {
            identity,
            client_ca: self.tls_client_ca.clone(),
            client_cert_required: !self.open_reads.unwrap_or(false),
        });
        let peer_access = ApiAccess {
            ca: self.tls_ca.clone().or_else(|| self.tls_client_ca.clone()),
            client: identity,
            token: token.clone(),
        };
        if tls.is_some() && peer_access.ca.is_none() {
            bail!("with --tls-cert, give --tls-ca (or --tls-client-ca): the CA of the other nodes' certificates, for calls to them");
        }
        Ok((ApiSecurity { tls, token }, peer_access))
    }
}

/// How a client command connects to a node's API.
#[derive(Args, Debug, Clone, Default)]
pub struct ApiClientSettings {
    /// Connect over TLS, trusting this CA (PEM) for the node's certificate.
    #[arg(
        long,
        env = "FENCELOG_TLS_CA",
        help_heading = "API security",
        value_name = "FILE"
    )]
    pub tls_ca: Option<PathBuf>,
    /// Present this client certificate (PEM); needs --tls-ca and --tls-key.
    #[arg(
        long,
        env = "FENCELOG_TLS_CERT",
        help_heading = "API security",
        value_name = "FILE"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(
        long,
        env = "FENCELOG_TLS_KEY",
        help_heading = "API security",
        value_name = "FILE"
    )]
    pub tls_key: Option<PathBuf>,
    /// File whose first line is the API's bearer token (or set FENCELOG_API_TOKEN).
    #[arg(
        long,
        env = "FENCELOG_API_TOKEN_FILE",
        help_heading = "API security",
        value_name = "FILE"
    )]
    pub api_token_file: Option<PathBuf>,
}

impl ApiClientSettings {
    pub fn access(&self) -> anyhow::Result<ApiAccess> {
        let client = certificate(&self.tls_cert, &self.tls_key, "--tls-cert", "--tls-key")?;
        if client.is_some() && self.tls_ca.is_none() {
            bail!("--tls-cert needs --tls-ca (the CA of the node's certificate)");
        }
        Ok(ApiAccess {
            ca: self.tls_ca.clone(),
            client,
            token: Secret::from_file_or_env(self.api_token_file.as_deref(), TOKEN_ENV)?,
        })
    }
}

/// The certificate and key given with `cert_flag` and `key_flag`: both, or neither.
pub fn certificate(
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    cert_flag: &str,
    key_flag: &str,
) -> anyhow::Result<Option<ClientCertificate>> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(ClientCertificate {
            cert: cert.clone(),
            key: key.clone(),
        })),
        (None, None) => Ok(None),
        _ => bail!("{cert_flag} and {key_flag} go together"),
    }
}
