//! The HTTP endpoint for monitoring: `/metrics` (Prometheus text format), `/healthz` (the
//! process serves) and `/readyz` (the node does its job: it leads, or it follows caught up).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State as Extract;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::api::security::HANDSHAKE_TIMEOUT;
use crate::error::Result;
use crate::lifecycle::State;
use crate::metrics::Metrics;
use crate::node::{Node, Role};

struct Shared {
    node: Arc<Node>,
    metrics: Arc<Metrics>,
}

/// Serves until `shutdown` resolves; over TLS with `tls`.
pub async fn serve(
    node: Arc<Node>,
    metrics: Arc<Metrics>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let router = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(Shared { node, metrics }));
    match tls {
        Some(config) => {
            let mut builder = tls_listener::builder(TlsAcceptor::from(config));
            builder.handshake_timeout(HANDSHAKE_TIMEOUT);
            axum::serve(TlsListener(builder.listen(listener)), router)
                .with_graceful_shutdown(shutdown)
                .await?
        }
        None => {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await?
        }
    }
    Ok(())
}

/// Connections that are TLS once accepted. `tls_listener` runs the handshakes side by side, so
/// a client that stalls in one holds up nobody; one that fails or times out is dropped and only
/// logged at debug level, as garbage on the port deserves.
struct TlsListener(tls_listener::TlsListener<TcpListener, TlsAcceptor>);

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(accepted) => return accepted,
                Err(tls_listener::Error::ListenerError(e)) => {
                    tracing::debug!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => tracing::debug!(error = %e, "metrics endpoint: TLS handshake failed"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.listener().local_addr()
    }
}

async fn render_metrics(Extract(shared): Extract<Arc<Shared>>) -> impl IntoResponse {
    shared.node.refresh_lags();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
}

async fn healthz(Extract(shared): Extract<Arc<Shared>>) -> impl IntoResponse {
    match shared.node.role() {
        Role::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "stopped\n"),
        _ => (StatusCode::OK, "ok\n"),
    }
}

async fn readyz(Extract(shared): Extract<Arc<Shared>>) -> impl IntoResponse {
    let state = shared.node.state();
    if let Some(failure) = shared.node.applier_failure() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{state}: the applier stopped: {failure}\n"),
        );
    }
    let ready = match shared.node.role() {
        Role::Primary(primary) => primary.is_leading(),
        Role::Standby(_) => state == State::Watching,
        Role::Stopped => false,
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, format!("{state}\n"))
}
