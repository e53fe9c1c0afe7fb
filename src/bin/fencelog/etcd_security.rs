//! The flags (and the config file's `[etcd-security]` table) that say how to reach a secured
//! etcd, shared by the daemons and the client commands. The password comes from a file or
//! `FENCELOG_ETCD_PASSWORD`, never from a flag, which `ps` would show.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use fencelog::credentials::Secret;
use fencelog::etcd::access::{EtcdTls, EtcdUser};
use fencelog::etcd::EtcdAccess;
use serde::Deserialize;

use crate::api_security::certificate;

/// The environment variable that may hold the etcd user's password.
pub const PASSWORD_ENV: &str = "FENCELOG_ETCD_PASSWORD";

#[derive(Args, Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EtcdSecurity {
    /// CA certificate (PEM) etcd's server certificate must chain to: connect over TLS
    /// (https:// endpoints).
    #[arg(
        long,
        env = "FENCELOG_ETCD_CA",
        help_heading = "etcd security",
        value_name = "FILE"
    )]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) to present to etcd; needs --etcd-key and --etcd-ca.
    #[arg(
        long,
        env = "FENCELOG_ETCD_CERT",
        help_heading = "etcd security",
        value_name = "FILE"
    )]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        env = "FENCELOG_ETCD_KEY",
        help_heading = "etcd security",
        value_name = "FILE"
    )]
    pub etcd_key: Option<PathBuf>,
    /// etcd user to authenticate as; the password from --etcd-password-file or
    /// FENCELOG_ETCD_PASSWORD.
    #[arg(
        long,
        env = "FENCELOG_ETCD_USER",
        help_heading = "etcd security",
        value_name = "USER"
    )]
    pub etcd_user: Option<String>,
    /// File whose first line is the etcd user's password.
    #[arg(
        long,
        env = "FENCELOG_ETCD_PASSWORD_FILE",
        help_heading = "etcd security",
        value_name = "FILE"
    )]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdSecurity {
    /// `self` where set, else `lower`.
    pub fn or(self, lower: EtcdSecurity) -> EtcdSecurity {
        EtcdSecurity {
            etcd_ca: self.etcd_ca.or(lower.etcd_ca),
            etcd_cert: self.etcd_cert.or(lower.etcd_cert),
            etcd_key: self.etcd_key.or(lower.etcd_key),
            etcd_user: self.etcd_user.or(lower.etcd_user),
            etcd_password_file: self.etcd_password_file.or(lower.etcd_password_file),
        }
    }

    /// The access these settings describe; reads the password now, so that a missing one
    /// stops the command before it reaches etcd.
    pub fn access(&self) -> anyhow::Result<EtcdAccess> {
        let client = certificate(&self.etcd_cert, &self.etcd_key, "--etcd-cert", "--etcd-key")?;
        let tls = match (&self.etcd_ca, client) {
            (Some(ca), client) => Some(EtcdTls {
                ca: ca.clone(),
                client,
            }),
            (None, Some(_)) => bail!("--etcd-cert needs --etcd-ca (the CA of etcd's certificate)"),
            (None, None) => None,
        };
        let user = match &self.etcd_user {
            Some(name) => {
                let password =
                    Secret::from_file_or_env(self.etcd_password_file.as_deref(), PASSWORD_ENV)?
                        .with_context(|| {
                            format!(
                                "--etcd-user needs a password: --etcd-password-file FILE or \
                                 {PASSWORD_ENV}"
                            )
                        })?;
                Some(EtcdUser {
                    name: name.clone(),
                    password,
                })
            }
            None if self.etcd_password_file.is_some() => {
                bail!("--etcd-password-file needs --etcd-user")
            }
            None => None,
        };
        Ok(EtcdAccess { tls, user })
    }
}
