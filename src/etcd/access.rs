//! How fencelog reaches a secured etcd: over TLS (trusting a CA, optionally presenting a client
//! certificate) and as an etcd user. A password never comes from a command-line flag, where
//! `ps` would show it, and never reaches a log line or a debug print: it is a [`Secret`].

use std::fmt;
use std::path::{Path, PathBuf};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::error::{Error, Result};

/// A password: redacted when printed, readable only through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The first line of the file at `path`: a trailing newline is not part of the secret.
    pub fn from_file(path: &Path) -> Result<Secret> {
        let text = read(path, "password file")?;
        match text.lines().next() {
            Some(line) if !line.is_empty() => Ok(Secret(line.to_owned())),
            _ => Err(Error::Credentials(format!(
                "the password file {} is empty",
                path.display()
            ))),
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// An etcd user and its password.
#[derive(Clone, Debug)]
pub struct EtcdUser {
    pub name: String,
    pub password: Secret,
}

/// A client certificate and its key, PEM files.
#[derive(Clone, Debug)]
pub struct ClientCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
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

fn read(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::Credentials(format!("cannot read the {what} {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_redacted_when_printed() {
        let user = EtcdUser {
            name: "alpha".into(),
            password: Secret::new("hunter2"),
        };
        let printed = format!("{user:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("alpha"), "{printed}");
    }

    #[test]
    fn a_password_file_gives_its_first_line_without_the_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().expose(), "s3cret");
    }

    #[test]
    fn an_empty_password_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "\n").unwrap();
        let error = Secret::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("is empty"), "{error}");
    }

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
