//! The HTTP endpoint for monitoring: `/metrics` (Prometheus text format), `/healthz` (the
//! process serves) and `/readyz` (the node does its job: it leads, or it follows caught up).

use std::future::Future;
use std::sync::Arc;

use axum::extract::State as Extract;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::node::{Node, Role};
use crate::standby::lifecycle::State;

struct Shared {
    node: Arc<Node>,
    metrics: Arc<Metrics>,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    node: Arc<Node>,
    metrics: Arc<Metrics>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let router = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(Shared { node, metrics }));
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn render_metrics(Extract(shared): Extract<Arc<Shared>>) -> impl IntoResponse {
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
