//! The commit layer: everything fencelog says to etcd.
//!
//! - [`leadership`]: the lease, the leader key (whose create revision is the epoch), keepalive;
//! - [`commit`]: the one fenced transaction per batch;
//! - [`claim`]: a running node's claim on its name, so that two daemons never share one;
//! - [`identity`]: the id of the cluster's log, and the store bound to it;
//! - [`fetch`]: committed batches read back by key range, in pages, at one revision;
//! - [`reconcile`]: a local log cut back to a prefix of etcd's before a node builds on it;
//! - [`process`]: a real etcd child process for tests, benches and demos;
//! - [`proxy`]: a TCP proxy that loses etcd's answers or cuts connections, for fault tests;
//! - [`endpoints`]: a client of several members kept off the ones that are down;
//! - [`access`]: TLS and an etcd user, for a secured etcd;
//! - [`failure`]: etcd's errors said in a line a person acts on.

pub mod access;
pub mod claim;
pub mod commit;
pub mod endpoints;
pub mod failure;
pub mod fetch;
pub mod identity;
pub mod leadership;
pub mod process;
pub mod proxy;
pub mod reconcile;
pub mod trim;

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::error::{Error, Result};

pub use access::EtcdAccess;

/// Connects to a plain, anonymous etcd at `endpoints` (tests, benches, loopback).
pub async fn connect(endpoints: &[String], request_timeout: Duration) -> Result<Client> {
    connect_with(endpoints, &EtcdAccess::default(), request_timeout).await
}

/// Connects to etcd at `endpoints` with `access` (TLS, a user) and fencelog's timeouts; with
/// several, a guard keeps the client off members that are down ([`endpoints::guard`]).
pub async fn connect_with(
    endpoints: &[String],
    access: &EtcdAccess,
    request_timeout: Duration,
) -> Result<Client> {
    let options = access.apply(
        ConnectOptions::new()
            .with_connect_timeout(request_timeout)
            .with_timeout(request_timeout)
            .with_keep_alive(Duration::from_secs(2), request_timeout),
    )?;
    let client = Client::connect(endpoints, Some(options.clone()))
        .await
        .map_err(|e| explain_closed_tls(e, access, endpoints))?;
    if endpoints.len() > 1 {
        endpoints::guard(&client, endpoints, &options);
    }
    Ok(client)
}

/// etcd refusing a client certificate in the TLS handshake shows, depending on timing, as a
/// cancelled request or as a bare "transport error" (a TLS alert, a broken pipe, a reset): say
/// what it most likely refused. An etcd that is down shows as "tcp connect error" instead, and a
/// server certificate we do not trust as "invalid peer certificate": neither is matched.
fn explain_closed_tls(
    error: etcd_client::Error,
    access: &EtcdAccess,
    endpoints: &[String],
) -> Error {
    let closed = match &error {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Cancelled || status.message() == "transport error"
        }
        _ => false,
    };
    match (&access.tls, closed) {
        (Some(tls), true) => {
            let refused = match &tls.client {
                Some(client) => format!(
                    "the client certificate {} (expired, or not from a CA it trusts?)",
                    client.cert.display()
                ),
                None => "a client without a certificate (does it require one?)".to_owned(),
            };
            Error::Credentials(format!(
                "etcd at {} closed the TLS connection: it did not accept {refused}: {error}",
                endpoints.join(",")
            ))
        }
        _ => error.into(),
    }
}

/// The reason etcd gave if it refused the caller's identity or permissions: retrying cannot
/// help, so a node stops with it instead of waiting for etcd to change its mind.
pub(crate) fn access_denied(error: &Error) -> Option<String> {
    match error {
        Error::Etcd(etcd_client::Error::GRpcStatus(status))
            if matches!(
                status.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ) =>
        {
            Some(status.message().to_owned())
        }
        _ => None,
    }
}

/// True when etcd answered that a lease does not exist: it expired or was revoked, and no
/// retry can bring it back. Re-opening a keepalive stream on such a lease fails this way
/// (etcd answers TTL 0, which etcd-client reports as "lease not found").
pub(crate) fn lease_gone(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("not found"),
        etcd_client::Error::GRpcStatus(status) => status.code() == tonic::Code::NotFound,
        _ => false,
    }
}

/// True when etcd refused a request as over its size limit (`--max-request-bytes`, or gRPC's
/// message limit above it): refused before it was proposed, so certainly not applied.
pub(crate) fn request_too_large(error: &Error) -> bool {
    match error {
        Error::Etcd(etcd_client::Error::GRpcStatus(status)) => match status.code() {
            tonic::Code::InvalidArgument => status.message().contains("request is too large"),
            tonic::Code::ResourceExhausted => status.message().contains("larger than max"),
            _ => false,
        },
        _ => false,
    }
}

/// Runs one etcd call, giving up after `limit`: a call to an unreachable etcd must not hang
/// a commit or a keepalive.
pub(crate) async fn timed<T, E: Into<Error>>(
    limit: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(Error::EtcdTimeout(limit)),
    }
}

/// Revokes `lease`, deleting every key under it at once. A lease already gone (expired, or
/// revoked by someone else) counts as revoked: there is nothing left to give up.
pub(crate) async fn revoke_lease(client: &Client, lease: i64, limit: Duration) -> Result<()> {
    match timed(limit, client.lease_client().revoke(lease)).await {
        Err(Error::Etcd(etcd_client::Error::GRpcStatus(status)))
            if status.code() == tonic::Code::NotFound =>
        {
            Ok(())
        }
        other => other.map(drop),
    }
}

/// Exponential backoff with jitter, capped: retries against etcd must not stampede it.
pub(crate) struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);

    pub(crate) fn new(cap: Duration) -> Backoff {
        Backoff {
            next: Self::FIRST,
            cap,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    pub(crate) async fn wait(&mut self) {
        // RandomState is seeded randomly: a cheap source of jitter without another dependency.
        let random = RandomState::new().build_hasher().finish();
        let jitter = self.next.mul_f64((random % 1000) as f64 / 2000.0);
        tokio::time::sleep(self.next + jitter).await;
        self.next = (self.next * 2).min(self.cap);
    }
}
