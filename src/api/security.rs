//! Who may call a node's API, and how a client proves it.
//!
//! The connection: TLS with the node's certificate, and, given a client CA, client certificates
//! verified against it — required for every connection, or optional so that monitoring without
//! one can still connect. The calls that change the log or who leads it (`Append`,
//! `AppendStream`, `Promote`) then need a proof: a verified client certificate, or the bearer
//! token. `Read`, `Get`, `Status` and `Snapshot` are open to any connection the TLS layer admits:
//! monitoring reads status, and a standby bootstraps from a snapshot. The metrics endpoint
//! serves the same TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use subtle::ConstantTimeEq;

use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::credentials::{read, ClientCertificate, Secret};
use crate::error::{Error, Result};

/// The metadata key a bearer token travels in.
const AUTHORIZATION: &str = "authorization";

/// How long a client gets to finish its TLS handshake, on the API and the metrics endpoint:
/// one that stalls (or sends garbage) is dropped then, not kept forever.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// TLS on the API's port.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The node's certificate and key (PEM).
    pub identity: ClientCertificate,
    /// Verify client certificates against this CA (PEM).
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse connections without a client certificate (mTLS). Without it,
    /// such connections may still call the open methods.
    pub client_cert_required: bool,
}

/// How a node's API server protects itself. The default is plain and open (loopback only).
#[derive(Clone, Debug, Default)]
pub struct ApiSecurity {
    pub tls: Option<ServerTls>,
    /// A bearer token that authorizes the guarded calls, as a client certificate does.
    pub token: Option<Secret>,
}

impl ApiSecurity {
    /// The server's TLS, its PEM files read now so that a missing one is named at start.
    pub(crate) fn server_tls(&self) -> Result<Option<ServerTlsConfig>> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                read(&tls.identity.cert, "API certificate")?,
                read(&tls.identity.key, "API key")?,
            ))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &tls.client_ca {
            config = config
                .client_ca_root(Certificate::from_pem(read(ca, "API client CA")?))
                .client_auth_optional(!tls.client_cert_required);
        }
        Ok(Some(config))
    }

    /// The same TLS for the metrics endpoint (`/metrics`, `/healthz`, `/readyz`): the node's
    /// certificate, and client certificates verified as for the API.
    pub fn http_tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let refused = |what: &str, e: &dyn std::fmt::Display| {
            Error::Credentials(format!("the metrics endpoint's TLS: {what}: {e}"))
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| refused("protocol versions", &e))?;
        let builder = match &tls.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in pem_certificates(ca, "API client CA")? {
                    roots.add(cert).map_err(|e| refused("the client CA", &e))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if tls.client_cert_required {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                builder.with_client_cert_verifier(
                    verifier.build().map_err(|e| refused("the client CA", &e))?,
                )
            }
            None => builder.with_no_client_auth(),
        };
        let key = PrivateKeyDer::from_pem_file(&tls.identity.key)
            .map_err(|e| refused(&format!("the key {}", tls.identity.key.display()), &e))?;
        let config = builder
            .with_single_cert(
                pem_certificates(&tls.identity.cert, "API certificate")?,
                key,
            )
            .map_err(|e| refused("the certificate and key", &e))?;
        Ok(Some(Arc::new(config)))
    }

    /// True when `Append`, `AppendStream` and `Promote` need a certificate or the token.
    pub fn guards_writes(&self) -> bool {
        self.token.is_some() || self.verifies_client_certificates()
    }

    fn verifies_client_certificates(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.client_ca.is_some())
    }

    /// Admits a guarded call that carries a client certificate the TLS layer verified, or the
    /// token; refuses it otherwise, without saying which proof was wrong.
    pub(crate) fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if !self.guards_writes() {
            return Ok(());
        }
        let verified_certificate = self.verifies_client_certificates()
            && request.peer_certs().is_some_and(|certs| !certs.is_empty());
        let token_matches = match (&self.token, bearer(request)) {
            (Some(token), Some(offered)) => constant_time_eq(token.expose(), offered),
            _ => false,
        };
        if verified_certificate || token_matches {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "this call needs a client certificate or the API token",
            ))
        }
    }
}

/// How a client reaches a node's API. The default is plain, without a token.
#[derive(Clone, Debug, Default)]
pub struct ApiAccess {
    /// Connect over TLS, trusting this CA (PEM) for the node's certificate.
    pub ca: Option<PathBuf>,
    /// Present this certificate (needs `ca`).
    pub client: Option<ClientCertificate>,
    /// Send this bearer token with every call.
    pub token: Option<Secret>,
}

impl ApiAccess {
    /// The URL of the node at `addr` (`host:port`).
    pub(crate) fn url(&self, addr: &str) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{addr}")
    }

    pub(crate) fn client_tls(&self) -> Result<Option<ClientTlsConfig>> {
        let Some(ca) = &self.ca else {
            if self.client.is_some() {
                return Err(Error::Credentials(
                    "a client certificate for the API needs the CA of the node's certificate"
                        .into(),
                ));
            }
            return Ok(None);
        };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "API CA")?));
        if let Some(client) = &self.client {
            config = config.identity(Identity::from_pem(
                read(&client.cert, "API client certificate")?,
                read(&client.key, "API client key")?,
            ));
        }
        Ok(Some(config))
    }

    /// The header that carries the token, made once per client; an error (which does not show
    /// the token) if the token holds characters a header cannot carry.
    pub(crate) fn authorization(&self) -> Result<Option<Authorization>> {
        self.token
            .as_ref()
            .map(|token| {
                format!("Bearer {}", token.expose())
                    .parse()
                    .map(Authorization)
                    .map_err(|_| {
                        Error::Credentials(
                            "the API token holds characters a header cannot carry".into(),
                        )
                    })
            })
            .transpose()
    }
}

/// The `authorization` header a client sends with every call.
#[derive(Clone)]
pub(crate) struct Authorization(AsciiMetadataValue);

impl Authorization {
    /// `message` as a request carrying this header.
    pub(crate) fn request<T>(authorization: Option<&Authorization>, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(Authorization(value)) = authorization {
            request.metadata_mut().insert(AUTHORIZATION, value.clone());
        }
        request
    }
}

/// The certificates of the PEM file at `path`.
fn pem_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let unreadable = |e: &dyn std::fmt::Display| {
        Error::Credentials(format!("the {what} {}: {e}", path.display()))
    };
    CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(&e))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| unreadable(&e))
}

/// The bearer token a request carries, if any.
fn bearer<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Compares in constant time (`subtle`), so that the time taken does not tell an attacker how
/// much of a guess was right.
fn constant_time_eq(expected: &str, offered: &str) -> bool {
    expected.as_bytes().ct_eq(offered.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_token(token: &str) -> ApiSecurity {
        ApiSecurity {
            tls: None,
            token: Some(Secret::new(token)),
        }
    }

    /// A call bearing `token`, as a client sends it.
    fn bearing(token: &str) -> Request<()> {
        let access = ApiAccess {
            token: Some(Secret::new(token)),
            ..ApiAccess::default()
        };
        Authorization::request(access.authorization().unwrap().as_ref(), ())
    }

    #[test]
    fn an_open_api_admits_every_call() {
        assert!(ApiSecurity::default().authorize(&Request::new(())).is_ok());
    }

    #[test]
    fn a_guarded_call_with_the_token_is_admitted() {
        assert!(with_token("t0ken").authorize(&bearing("t0ken")).is_ok());
    }

    #[test]
    fn a_guarded_call_without_the_token_is_refused() {
        let status = with_token("t0ken")
            .authorize(&Request::new(()))
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn a_guarded_call_with_another_token_is_refused() {
        assert!(with_token("t0ken").authorize(&bearing("t0ke")).is_err());
    }

    #[test]
    fn a_token_a_header_cannot_carry_is_refused_without_showing_it() {
        let access = ApiAccess {
            token: Some(Secret::new("bad\ntoken")),
            ..ApiAccess::default()
        };
        let error = access.authorization().err().unwrap().to_string();
        assert!(
            error.contains("cannot carry") && !error.contains("bad"),
            "{error}"
        );
    }
}
