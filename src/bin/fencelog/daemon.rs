//! `fencelog primary` and `fencelog standby`: a node serving the gRPC API and the metrics
//! endpoint until SIGINT or SIGTERM.
//!
//! Both run a [`Node`]: it follows the committed log as a standby and, when it may lead (always
//! for `primary`, with `--failover` for `standby`), campaigns for the leader key, so a primary
//! started while another node leads follows it and waits, and never overwrites its key. On a
//! signal the node shuts down first (a primary lets in-flight appends finish, then resigns so a
//! standby takes over at once), then the servers, then the store is flushed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fencelog::api::{self, WalApi};
use fencelog::error::Error;
use fencelog::etcd::leadership::{current_leader, LeaderInfo};
use fencelog::keys::KeyLayout;
use fencelog::local_store::{blocking, LocalStore};
use fencelog::metrics::Metrics;
use fencelog::node::{Campaign, Node};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::settings::Resolved;

/// How long the servers may take to finish their calls after the node stopped.
const SERVER_DRAIN: Duration = Duration::from_secs(5);
/// How often the daemon looks whether its local store has failed.
const STORE_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// How long a starting daemon waits for etcd to answer.
const ETCD_STARTUP_WAIT: Duration = Duration::from_secs(10);
/// How often it tries meanwhile.
const ETCD_RETRY: Duration = Duration::from_millis(200);

pub async fn run(settings: Resolved, role: &str) -> anyhow::Result<()> {
    let config = settings.node.clone();
    let cluster = config.primary.cluster.clone();
    let api_listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", settings.listen))?;
    let metrics_listener = TcpListener::bind(settings.metrics)
        .await
        .with_context(|| format!("cannot listen on {} (--metrics)", settings.metrics))?;

    // Read now: a missing certificate or key stops the daemon before it joins the cluster.
    let http_tls = settings
        .api_security
        .http_tls()
        .context("cannot set up TLS for the API and metrics")?;
    // Checked before etcd is waited for: someone else's files are refused at once.
    fencelog::local_store::check_ours_or_empty(&settings.data_dir).with_context(|| {
        format!(
            "cannot open the store in {} (--data-dir)",
            settings.data_dir.display()
        )
    })?;
    let layout = KeyLayout::new(&cluster);
    let (client, leader) =
        reach_etcd(&settings, &layout, config.primary.etcd_request_timeout).await?;

    let dir = settings.data_dir.clone();
    let options = settings.store.clone();
    let store = blocking(move || {
        fencelog::snapshot::finish_interrupted_swap(&dir)?;
        LocalStore::open_or_rebuild(&dir, options)
    })
    .await
    .with_context(|| format!("cannot open the store in {}", settings.data_dir.display()))?;
    let (store, moved_aside) = store;
    if let Some(damaged) = moved_aside {
        tracing::warn!(
            moved_to = %damaged.display(),
            "the local store was damaged: moved aside; rebuilding it from etcd"
        );
    }
    let store = Arc::new(store);
    let metrics = Arc::new(Metrics::new()?);

    match (&leader, config.campaign) {
        (_, Campaign::Never) => {}
        (Some((info, _)), _) if info.node != config.primary.node => tracing::info!(
            leader = %info.node, addr = %info.addr,
            "another node leads: following it, and waiting for the leadership"
        ),
        (Some(_), _) => {}
        (None, Campaign::AtOnce) => tracing::info!("nobody leads: campaigning"),
        (None, Campaign::AfterLeader { grace }) => tracing::info!(
            grace = ?grace,
            "nobody leads: campaigning unless a primary takes the leadership within the grace"
        ),
    }
    let node = Arc::new(Node::start(client, store.clone(), config.clone(), metrics.clone()).await?);
    tracing::info!(
        role, cluster = %cluster, node = %config.primary.node,
        api = %settings.listen, metrics = %settings.metrics,
        failover = config.campaign.campaigns(), "serving"
    );
    if !settings.api_security.guards_writes() {
        tracing::warn!(
            api = %settings.listen,
            "the API is unauthenticated: whoever reaches it can append, promote and read"
        );
    }

    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
        // An error means the sender is gone: stop as well.
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let api_task = tokio::spawn(api::serve(
        WalApi::new(
            node.clone(),
            config.primary.advertise_addr.clone(),
            settings.api_security.clone(),
        ),
        api_listener,
        until_stopped(stopped.clone()),
    ));
    let http_task = tokio::spawn(fencelog::http::serve(
        node.clone(),
        metrics,
        metrics_listener,
        http_tls,
        until_stopped(stopped),
    ));

    tokio::select! {
        signal_name = wait_for_signal() => tracing::info!(signal = signal_name?, "shutting down"),
        _ = node.stopped() => match node.store().failure() {
            Some(failure) => return Err(store_failed(&node, failure)),
            None => anyhow::bail!("the node stopped on an error (see the log above)"),
        },
        failure = store_failure(&node) => {
            tracing::error!(error = %failure, "the local store failed; stopping the node");
            // Leadership is given up on the way if etcd lets it; the store cannot be flushed.
            if tokio::time::timeout(SERVER_DRAIN, node.shutdown()).await.is_err() {
                tracing::warn!("the node did not shut down in time");
            }
            return Err(store_failed(&node, &failure));
        }
    }
    let shut = node.shutdown().await;
    stop.send_replace(true);
    for (name, task) in [("API", api_task), ("metrics", http_task)] {
        match tokio::time::timeout(SERVER_DRAIN, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the {name} server failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the {name} server task failed"),
            Err(_) => tracing::warn!("the {name} server did not finish its calls in time"),
        }
    }
    let flushed = blocking(move || store.flush()).await;
    shut.context("the node did not shut down cleanly")?;
    flushed.context("cannot flush the local store")?;
    tracing::info!("stopped");
    Ok(())
}

/// Connects to etcd and reads the leader key, waiting up to [`ETCD_STARTUP_WAIT`] for an etcd
/// that does not answer yet (one started at the same time as the daemon).
async fn reach_etcd(
    settings: &Resolved,
    layout: &KeyLayout,
    timeout: Duration,
) -> anyhow::Result<(etcd_client::Client, Option<(LeaderInfo, i64)>)> {
    let deadline = Instant::now() + ETCD_STARTUP_WAIT;
    let mut said = false;
    loop {
        let attempt = async {
            let client =
                fencelog::etcd::connect_with(&settings.etcd, &settings.etcd_access, timeout)
                    .await?;
            let leader = current_leader(&client, layout, timeout).await?;
            Ok((client, leader))
        };
        let error = match attempt.await {
            Ok(reached) => return Ok(reached),
            Err(e) => fencelog::etcd::failure::at_endpoints(&settings.etcd, e),
        };
        match error {
            Error::EtcdUnreachable { .. } if Instant::now() < deadline => {
                if !said {
                    tracing::warn!(error = %error, wait = ?ETCD_STARTUP_WAIT, "waiting for etcd");
                    said = true;
                }
                tokio::time::sleep(ETCD_RETRY).await;
            }
            Error::EtcdUnreachable { .. } | Error::NotEtcd { .. } | Error::EtcdClosed { .. } => {
                return Err(error.into())
            }
            error => {
                return Err(anyhow::Error::new(error).context(format!(
                    "cannot read {} from etcd at {}",
                    layout.root(),
                    settings.etcd.join(",")
                )))
            }
        }
    }
}

/// Resolves with the local store's I/O failure: sled refuses every write after one, so the
/// process stops (a supervisor restarts it) rather than serve from a store that cannot move.
async fn store_failure(node: &Node) -> String {
    loop {
        tokio::time::sleep(STORE_CHECK_INTERVAL).await;
        if let Some(failure) = node.store().failure() {
            return failure.to_owned();
        }
    }
}

fn store_failed(node: &Node, failure: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the local store in {} failed: {failure}. Once the cause is fixed (disk space, the disk), \
         start the node again: it recovers its store and catches up from etcd",
        node.store().dir().display()
    )
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}
