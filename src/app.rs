//! The running proxy: builds the shared state ([`crate::state`]), starts the listener and
//! admin server, answers signals (SIGHUP reloads: [`reload`]), and runs the graceful
//! drain (stop accepting, not ready, let sessions finish within `shutdown_grace`, end the rest,
//! revoke every outstanding lease, exit).

pub mod reload;
mod signals;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditLog;
use crate::cancel::CancelMap;
use crate::cancel::gate::CancelGate;
use crate::config::Config;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::prefetch::Prefetcher;
use crate::state::{AppState, Live};
use crate::tls::TlsError;
use crate::vault::{Revoker, VaultClient, VaultError};
use signals::Signals;

/// Failures starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material problems.
    #[error("TLS: {0}")]
    Tls(TlsError),
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

impl From<TlsError> for StartError {
    fn from(e: TlsError) -> Self {
        StartError::Tls(e)
    }
}

/// Builds the shared state (must run inside a Tokio runtime: the revoker starts here).
pub fn build_state(config: &Config) -> Result<Arc<AppState>, StartError> {
    let metrics = Arc::new(Metrics::new());
    metrics
        .sessions_limit
        .set(i64::from(config.reloadable.limits.max_sessions));
    let vault = Arc::new(VaultClient::new(&config.fixed.vault, metrics.clone())?);
    let revoker = Revoker::spawn(vault.clone(), metrics.clone());
    let prefetch = Arc::new(Prefetcher::new(
        config,
        vault.clone(),
        revoker.clone(),
        metrics.clone(),
    ));
    Ok(Arc::new(AppState {
        live: ArcSwap::from_pointee(Live::build(&config.reloadable)?),
        audit: AuditLog::spawn(
            config.fixed.audit.path.clone(),
            metrics.audit_events_dropped_total.clone(),
        )
        .map_err(StartError::Audit)?,
        limiter: Limiter::new(config.reloadable.limits),
        revoker,
        prefetch,
        vault,
        metrics,
        cancels: Arc::new(CancelMap::default()),
        cancel_gate: CancelGate::new(&config.fixed.limits),
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
        config.fixed.vault.auth.clone(),
        auth_stop.clone(),
    ));
    // Give the first login a moment so the first clients do not race it; failures are
    // retried in the background and /readyz stays 503 until a token works.
    let first_login = state.vault.tokens.wait_current();
    let _ = tokio::time::timeout(config.fixed.vault.timeout, first_login).await;
    let prefetch_stop = CancellationToken::new();
    let prefetcher = tokio::spawn(state.prefetch.clone().run(prefetch_stop.clone()));
    let listener = TcpListener::bind(config.fixed.listen.address)
        .await
        .map_err(|e| StartError::Bind(config.fixed.listen.address, e))?;
    let accepting = CancellationToken::new();
    let sessions = CancellationToken::new();
    let admin_stop = CancellationToken::new();
    if let Some(metrics) = &config.fixed.metrics {
        let admin = TcpListener::bind(metrics.address)
            .await
            .map_err(|e| StartError::Bind(metrics.address, e))?;
        tracing::info!(address = %admin.local_addr().map_err(|e| StartError::Bind(metrics.address, e))?, "metrics listening");
        let ready = {
            let state = state.clone();
            move || state.is_ready()
        };
        tokio::spawn(crate::admin::serve(
            admin,
            state.metrics.clone(),
            ready,
            admin_stop.clone(),
        ));
    }
    let local = listener
        .local_addr()
        .map_err(|e| StartError::Bind(config.fixed.listen.address, e))?;
    let tracker = TaskTracker::new();
    let accept = tokio::spawn(crate::listener::accept_loop(
        listener,
        state.clone(),
        config.fixed.listen.max_connections,
        tracker.clone(),
        accepting.clone(),
        sessions.clone(),
    ));
    state.ready.store(true, Ordering::SeqCst);
    tracing::info!(address = %local, "leasegate listening");

    let mut signals = Signals::new();
    let (config, signal) = reload::until_stopped(&state, config, &path, &mut signals).await;
    tracing::info!(signal, grace = ?config.reloadable.listen.shutdown_grace, "shutting down: no new sessions");
    state.ready.store(false, Ordering::SeqCst);
    accepting.cancel();
    let _ = accept.await;
    tracker.close();
    prefetch_stop.cancel();
    let _ = prefetcher.await;
    let drain = async {
        if tokio::time::timeout(config.reloadable.listen.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = tracker.len(),
                "grace period over: ending open sessions"
            );
            sessions.cancel();
            // A session waiting for Vault lets its creds call finish (then revokes it).
            let ending =
                Duration::from_secs(10).max(config.fixed.vault.timeout + Duration::from_secs(2));
            let _ = tokio::time::timeout(ending, tracker.wait()).await;
        }
        let left = state.revoker.drain(config.fixed.vault.timeout * 4).await;
        if !left.is_empty() {
            tracing::error!(
                leases = left.len(),
                "leases left unrevoked at exit; they expire at their TTL"
            );
        }
        // The leases are done with: stop renewing and revoke the tokens leasegate logged in
        // for (an operator's token is left alone).
        auth_stop.cancel();
        let _ = (&mut vault_login).await;
        crate::vault::auth::logout(&state.vault).await;
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
