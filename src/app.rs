//! The running proxy: shared state, the listener and admin server, signals (SIGHUP reloads:
//! [`reload`]), and the graceful
//! drain (stop accepting, not ready, let sessions finish within `shutdown_grace`, end the rest,
//! revoke every outstanding lease, exit).

pub mod reload;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditLog;
use crate::cancel::CancelMap;
use crate::cancel::gate::CancelGate;
use crate::cluster::Cluster;
use crate::config::{Config, DatabaseConfig};
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::prefetch::Prefetcher;
use crate::tls::{self, TlsError};
use crate::vault::{Revoker, VaultClient, VaultError};

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
    /// `[cluster]` starts resolving its peers, until this `Live` is dropped).
    pub fn build(config: &Config) -> Result<Live, TlsError> {
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
                .map(|c| Cluster::new(c, &config.listen))
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

/// Builds the shared state (must run inside a Tokio runtime: the revoker starts here).
pub fn build_state(config: &Config) -> Result<Arc<AppState>, StartError> {
    let metrics = Arc::new(Metrics::new());
    metrics
        .sessions_limit
        .set(i64::from(config.limits.max_sessions));
    let vault = Arc::new(VaultClient::new(&config.vault, metrics.clone())?);
    let revoker = Revoker::spawn(vault.clone(), metrics.clone());
    let prefetch = Arc::new(Prefetcher::new(
        config,
        vault.clone(),
        revoker.clone(),
        metrics.clone(),
    ));
    Ok(Arc::new(AppState {
        live: ArcSwap::from_pointee(Live::build(config)?),
        audit: AuditLog::spawn(
            config.audit.path.clone(),
            metrics.audit_events_dropped_total.clone(),
        )
        .map_err(StartError::Audit)?,
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

/// Runs until SIGTERM/SIGINT, then drains. A second signal during the drain exits at once.
/// SIGHUP reloads `path`.
pub async fn run(config: Config, path: PathBuf) -> Result<(), StartError> {
    let state = build_state(&config)?;
    let auth_stop = CancellationToken::new();
    let mut vault_login = tokio::spawn(crate::vault::auth::maintain(
        state.vault.clone(),
        config.vault.auth.clone(),
        auth_stop.clone(),
    ));
    // Give the first login a moment so the first clients do not race it; failures are
    // retried in the background and /readyz stays 503 until a token works.
    let first_login = state.vault.tokens.wait_current();
    let _ = tokio::time::timeout(config.vault.timeout, first_login).await;
    let prefetch_stop = CancellationToken::new();
    let prefetcher = tokio::spawn(state.prefetch.clone().run(prefetch_stop.clone()));
    let listener = TcpListener::bind(config.listen.address)
        .await
        .map_err(|e| StartError::Bind(config.listen.address, e))?;
    let accepting = CancellationToken::new();
    let sessions = CancellationToken::new();
    let admin_stop = CancellationToken::new();
    if let Some(metrics) = &config.metrics {
        let admin = TcpListener::bind(metrics.address)
            .await
            .map_err(|e| StartError::Bind(metrics.address, e))?;
        tracing::info!(address = %admin.local_addr().map_err(|e| StartError::Bind(metrics.address, e))?, "metrics listening");
        tokio::spawn(crate::admin::serve(
            admin,
            state.clone(),
            admin_stop.clone(),
        ));
    }
    let local = listener
        .local_addr()
        .map_err(|e| StartError::Bind(config.listen.address, e))?;
    let tracker = TaskTracker::new();
    let accept = tokio::spawn(crate::listener::accept_loop(
        listener,
        state.clone(),
        config.listen.max_connections,
        tracker.clone(),
        accepting.clone(),
        sessions.clone(),
    ));
    state.ready.store(true, Ordering::SeqCst);
    tracing::info!(address = %local, "leasegate listening");

    let mut signals = Signals::new();
    let (config, signal) = reload::until_stopped(&state, config, &path, &mut signals).await;
    tracing::info!(signal, grace = ?config.listen.shutdown_grace, "shutting down: no new sessions");
    state.ready.store(false, Ordering::SeqCst);
    accepting.cancel();
    let _ = accept.await;
    tracker.close();
    prefetch_stop.cancel();
    let _ = prefetcher.await;
    let drain = async {
        if tokio::time::timeout(config.listen.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = tracker.len(),
                "grace period over: ending open sessions"
            );
            sessions.cancel();
            // A session waiting for Vault lets its creds call finish (then revokes it).
            let ending = Duration::from_secs(10).max(config.vault.timeout + Duration::from_secs(2));
            let _ = tokio::time::timeout(ending, tracker.wait()).await;
        }
        let left = state.revoker.drain(config.vault.timeout * 4).await;
        if !left.is_empty() {
            tracing::error!(
                leases = left.len(),
                "leases left unrevoked at exit; they expire at their TTL"
            );
        }
        // The leases are done with: stop renewing and revoke the tokens leasegate logged in
        // for (an operator's token is left alone); the upkeep does that as it stops.
        auth_stop.cancel();
        let _ = (&mut vault_login).await;
    };
    tokio::select! {
        _ = drain => tracing::info!("shutdown complete"),
        s = signals.next() => {
            tracing::warn!(signal = s, "second signal: exiting immediately");
            std::process::exit(130);
        }
    }
    admin_stop.cancel();
    Ok(())
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
