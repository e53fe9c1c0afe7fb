//! How fencelog reaches a secured etcd: over TLS (trusting a CA, optionally presenting a client
//! certificate) and as an etcd user. A password never comes from a command-line flag, where
//! `ps` would show it, and never reaches a log line or a debug print: it is a [`Secret`].

use std::path::PathBuf;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::credentials::{read, ClientCertificate, Secret};
use crate::error::Result;

/// An etcd user and its password.
#[derive(Clone, Debug)]
pub struct EtcdUser {
    pub name: String,
    pub password: Secret,
}

/// TLS to etcd.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// PEM file of the CA that signed etcd's server certificate.
    pub ca: PathBuf,
    /// For an etcd that requires client certificates (`--client-cert-auth`).
    pub client: Option<ClientCertificate>,
}

/// How to reach etcd. The default is plain and anonymous, for an etcd on loopback.
#[derive(Clone, Debug, Default)]
pub struct EtcdAccess {
    pub tls: Option<EtcdTls>,
    pub user: Option<EtcdUser>,
}

impl EtcdAccess {
    /// `options` with this access's TLS and user. The PEM files are read now, so that a missing
    /// one is an error naming it rather than a failed handshake later.
    pub fn apply(&self, mut options: ConnectOptions) -> Result<ConnectOptions> {
        if let Some(tls) = &self.tls {
            let mut config =
                TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca, "etcd CA")?));
            if let Some(client) = &tls.client {
                config = config.identity(Identity::from_pem(
                    read(&client.cert, "etcd client certificate")?,
                    read(&client.key, "etcd client key")?,
                ));
            }
            options = options.with_tls(config);
        }
        if let Some(user) = &self.user {
            options = options.with_user(user.name.clone(), user.password.expose());
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_ca_file_is_an_error_naming_it() {
        let access = EtcdAccess {
            tls: Some(EtcdTls {
                ca: "/nonexistent/ca.pem".into(),
                client: None,
            }),
            user: None,
        };
        let error = access.apply(ConnectOptions::new()).unwrap_err().to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }
}
