//! The running proxy: shared state, the listener and admin server, signals (SIGHUP reloads:
//! [`reload`]), and the graceful drain along the shutdown tree (`shutdown`): not ready, stop
//! accepting, let sessions finish within `shutdown_grace`, end the rest, revoke every
//! outstanding lease, revoke leasegate's own tokens, stop the background tasks, exit.

pub mod reload;
mod shutdown;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::audit::AuditLog;
use crate::cancel::CancelMap;
use crate::cancel::gate::CancelGate;
use crate::cluster::Cluster;
use crate::config::{Config, DatabaseConfig};
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::prefetch::Prefetcher;
use crate::tasks::Tasks;
use crate::tls::{self, TlsError};
use crate::vault::{Revoker, VaultClient, VaultError};
use shutdown::Shutdown;

/// A `[[databases]]` entry with its ready-made TLS connector.
pub struct DatabaseEntry {
    /// The configured entry.
    pub config: DatabaseConfig,
    /// TLS towards the upstream, `None` for `tls = "disable"`.
    pub tls: Option<TlsConnector>,
}

/// What SIGHUP reloads. A session takes one snapshot when it starts and keeps it, so a reload
/// never changes a session in flight.
pub struct Live {
    /// Client-facing TLS.
    pub tls: TlsAcceptor,
    /// The compiled grants.
    pub policy: Policy,
    /// Database entries by client-facing name.
    pub databases: HashMap<String, Arc<DatabaseEntry>>,
    /// Limit for TLS handshake plus startup packet.
    pub login_timeout: Duration,
    /// Peers for cancel forwarding.
    pub cluster: Option<Cluster>,
    /// Keepalive idle time for client sockets.
    pub tcp_keepalive: Duration,
}

impl Live {
    /// Builds everything reloadable from a validated config (inside a Tokio runtime: a
    /// `[cluster]` starts resolving its peers on `cluster`, until this `Live` is dropped).
    pub(crate) fn build(config: &Config, cluster: &Tasks) -> Result<Live, TlsError> {
        let mut databases = HashMap::new();
        for db in &config.databases {
            let entry = DatabaseEntry {
                tls: tls::upstream::connector(db)?,
                config: db.clone(),
            };
            databases.insert(db.name.clone(), Arc::new(entry));
        }
        Ok(Live {
            tls: tls::server::acceptor(&config.listen)?,
            policy: Policy::new(&config.grants),
            databases,
            login_timeout: config.listen.login_timeout,
            tcp_keepalive: config.listen.tcp_keepalive,
            cluster: config
                .cluster
                .as_ref()
                .map(|c| Cluster::new(c, &config.listen, cluster))
                .transpose()?,
        })
    }
}

/// Everything sessions share.
pub struct AppState {
    /// Reloadable configuration.
    pub live: ArcSwap<Live>,
    /// Audit log writer.
    pub audit: AuditLog,
    /// Session limits (one instance: a reload replaces its limits, its counts live on).
    pub limiter: Limiter,
    /// Vault client (shared connection pool).
    pub vault: Arc<VaultClient>,
    /// Background revocation queue.
    pub revoker: Revoker,
    /// Credentials issued ahead of demand.
    pub prefetch: Arc<Prefetcher>,
    /// Every exported metric.
    pub metrics: Arc<Metrics>,
    /// Cancel keys of live sessions.
    pub cancels: Arc<CancelMap>,
    /// Rate limits and the in-flight cap for cancel requests (not reloaded, like `limiter`).
    pub cancel_gate: CancelGate,
    /// False while starting and while draining.
    ready: AtomicBool,
}

impl AppState {
    /// Whether `/readyz` should answer 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.vault.tokens.healthy()
    }

    /// Ready once started, not ready from the start of the drain.
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

/// Failures starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material problems.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// Vault client problems.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// A listener could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// The audit log could not be opened.
    #[error("cannot open the audit log: {0}")]
    Audit(std::io::Error),
}

/// Builds the shared state (inside a Tokio runtime: the revoker, the audit writer and the
/// cluster's resolvers start here, each on its part of `tree`).
fn build_state(config: &Config, tree: &Shutdown) -> Result<Arc<AppState>, StartError> {
    let metrics = Arc::new(Metrics::new());
    metrics
        .sessions_limit
        .set(i64::from(config.limits.max_sessions));
    let vault = Arc::new(VaultClient::new(&config.vault, metrics.clone())?);
    let revoker = Revoker::spawn(vault.clone(), metrics.clone(), &tree.revoker());
    let prefetch = Arc::new(Prefetcher::new(
        config,
        vault.clone(),
        revoker.clone(),
        metrics.clone(),
    ));
    let live = Live::build(config, &tree.cluster())?;
    let dropped = metrics.audit_events_dropped_total.clone();
    let audit = AuditLog::spawn(config.audit.path.clone(), dropped, &tree.audit())
        .map_err(StartError::Audit)?;
    Ok(Arc::new(AppState {
        live: ArcSwap::from_pointee(live),
        audit,
        limiter: Limiter::new(config.limits.clone()),
        revoker,
        prefetch,
        vault,
        metrics,
        cancels: Arc::new(CancelMap::default()),
        cancel_gate: CancelGate::new(&config.limits),
        ready: AtomicBool::new(false),
    }))
}

/// Runs until SIGTERM/SIGINT, then drains. A second signal during the drain exits at once
/// (status 130). SIGHUP reloads `path`.
pub async fn run(config: Config, path: PathBuf) -> Result<(), StartError> {
    let tree = Shutdown::new();
    let started = start(&config, &tree).await?;
    let state = &started.state;
    let mut signals = Signals::new();
    let (config, signal) =
        reload::until_stopped(state, config, &path, &mut signals, &tree.cluster()).await;
    tracing::info!(signal, grace = ?config.listen.shutdown_grace, "shutting down: no new sessions");
    let vault_timeout = config.vault.timeout;
    let drain = async {
        tree.stop_accepting(state, started.accept, started.prefetch)
            .await;
        if !tree.grace(config.listen.shutdown_grace).await {
            tree.end_sessions(shutdown::session_end_budget(vault_timeout))
                .await;
        }
        shutdown::drain_leases(state, shutdown::revoke_drain_budget(vault_timeout)).await;
        let budget = shutdown::token_revoke_budget(vault_timeout);
        tree.revoke_own_tokens(started.vault_auth, budget).await;
        tree.stop_background().await;
    };
    tokio::select! {
        () = drain => tracing::info!("shutdown complete"),
        s = signals.next() => {
            tracing::warn!(signal = s, "second signal: exiting immediately");
            std::process::exit(130);
        }
    }
    Ok(())
}

/// What [`start`] leaves running that the drain stops step by step.
struct Started {
    state: Arc<AppState>,
    /// The accept loop.
    accept: JoinHandle<()>,
    /// Credential prefetch.
    prefetch: JoinHandle<()>,
    /// The Vault token upkeep.
    vault_auth: JoinHandle<()>,
}

/// Builds the state, logs in to Vault, starts prefetch, the admin server and the listener,
/// and turns ready.
async fn start(config: &Config, tree: &Shutdown) -> Result<Started, StartError> {
    let state = build_state(config, tree)?;
    let (vault, auth) = (state.vault.clone(), config.vault.auth.clone());
    let vault_auth = tree
        .vault_auth()
        .run(|stop| crate::vault::auth::maintain(vault, auth, stop));
    // Give the first login a moment so the first clients do not race it; failures are
    // retried in the background and /readyz stays 503 until a token works.
    let first_login = state.vault.tokens.wait_current();
    let _ = tokio::time::timeout(config.vault.timeout, first_login).await;
    let prefetch = tree.prefetch().run(|stop| state.prefetch.clone().run(stop));
    let listener = bind(config.listen.address).await?;
    if let Some(metrics) = &config.metrics {
        start_admin(metrics.address, &state, tree).await?;
    }
    let (accept, local) = start_accepting(listener, config, &state, tree)?;
    state.set_ready(true);
    tracing::info!(address = %local, "leasegate listening");
    Ok(Started {
        state,
        accept,
        prefetch,
        vault_auth,
    })
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `address` until the end of the drain.
async fn start_admin(
    address: SocketAddr,
    state: &Arc<AppState>,
    tree: &Shutdown,
) -> Result<(), StartError> {
    let admin = bind(address).await?;
    let local = admin
        .local_addr()
        .map_err(|e| StartError::Bind(address, e))?;
    tracing::info!(address = %local, "metrics listening");
    let tasks = tree.admin();
    tasks.spawn(crate::admin::serve(admin, state.clone(), tasks.clone()));
    Ok(())
}

/// Starts the accept loop (every session runs on the session tracker, under a child of the
/// sessions' token); returns it and the address it listens on.
fn start_accepting(
    listener: TcpListener,
    config: &Config,
    state: &Arc<AppState>,
    tree: &Shutdown,
) -> Result<(JoinHandle<()>, SocketAddr), StartError> {
    let address = config.listen.address;
    let local = listener
        .local_addr()
        .map_err(|e| StartError::Bind(address, e))?;
    let (state, max) = (state.clone(), config.listen.max_connections);
    let (session_tasks, sessions) = (tree.session_tasks.clone(), tree.sessions.clone());
    let accept = tree.accepting().run(|accepting| {
        crate::listener::accept_loop(listener, state, max, session_tasks, accepting, sessions)
    });
    Ok((accept, local))
}

async fn bind(address: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|e| StartError::Bind(address, e))
}

/// SIGTERM, SIGINT and SIGHUP as one stream.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
        }
    }

    async fn next(&mut self) -> &'static str {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => "SIGTERM",
            _ = recv(&mut self.int) => "SIGINT",
            _ = recv(&mut self.hup) => "SIGHUP",
        }
    }
}
