//! The running proxy: builds the shared state ([`crate::state`]), starts the listener and
//! admin server, answers signals (SIGHUP reloads: [`reload`]), and runs the graceful drain
//! along the shutdown tree (`shutdown`): not ready, keep accepting for `drain_delay`, stop
//! accepting, let sessions finish within
//! `shutdown_grace`, end the rest, revoke every outstanding lease, revoke leasegate's own
//! tokens, stop the background tasks, exit.

pub(crate) mod reload;
mod shutdown;
mod signals;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::audit::AuditLog;
use crate::cancel::CancelMap;
use crate::cancel::gate::CancelGate;
use crate::config::Config;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::prefetch::Prefetcher;
use crate::registry::Registry;
use crate::runtime::Shards;
use crate::state::{AppState, Live};
use crate::tls::TlsError;
use crate::vault::{Revoker, VaultClient, VaultError};
use shutdown::Shutdown;
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
    /// The admin socket could not be set up.
    #[error(transparent)]
    AdminSocket(#[from] crate::admin_socket::AdminSocketError),
    /// The Unix socket (`listen.unix_socket_dir`) could not be set up.
    #[error("unix socket: {0}")]
    UnixSocket(String),
}

impl From<TlsError> for StartError {
    fn from(e: TlsError) -> Self {
        StartError::Tls(e)
    }
}

/// Builds the shared state (inside a Tokio runtime: the revoker, the audit writer and the
/// cluster's resolvers start here, each on its part of `tree`).
fn build_state(config: &Config, tree: &Shutdown) -> Result<Arc<AppState>, StartError> {
    let metrics = Arc::new(Metrics::new());
    metrics
        .sessions_limit
        .set(i64::from(config.reloadable.limits.max_sessions));
    let vault = Arc::new(VaultClient::new(&config.fixed.vault, metrics.clone())?);
    let revoker = Revoker::spawn(vault.clone(), metrics.clone(), &tree.revoker());
    let prefetch = Arc::new(Prefetcher::new(
        config,
        vault.clone(),
        revoker.clone(),
        metrics.clone(),
    ));
    let live = Live::build(&config.reloadable, &tree.cluster())?;
    let dropped = metrics.audit_events_dropped_total.clone();
    let audit = AuditLog::spawn(config.fixed.audit.path.clone(), dropped, &tree.audit())
        .map_err(StartError::Audit)?;
    let sessions = Registry::new(metrics.clone());
    sessions.add_source(crate::registry::listing::prefetched(&prefetch));
    Ok(Arc::new(AppState {
        live: ArcSwap::from_pointee(live),
        audit,
        limiter: Limiter::new(config.reloadable.limits),
        revoker,
        prefetch,
        vault,
        metrics,
        cancels: Arc::new(CancelMap::default()),
        cancel_gate: CancelGate::new(&config.fixed.limits),
        ready: AtomicBool::new(false),
        sessions,
    }))
}

/// Runs until SIGTERM/SIGINT, then drains. A second signal during the drain exits at once
/// (status 130). SIGHUP reloads `path`.
pub async fn run(config: Config, path: PathBuf, shards: Shards) -> Result<(), StartError> {
    let tree = Shutdown::new();
    let started = start(&config, &tree, shards).await?;
    let state = &started.state;
    let mut signals = Signals::new();
    let (config, signal) =
        reload::until_stopped(state, config, &path, &mut signals, &tree.cluster()).await;
    tracing::info!(signal, grace = ?config.reloadable.listen.shutdown_grace, "shutting down: not ready");
    let vault_timeout = config.fixed.vault.timeout;
    let drain = async {
        let delay = config.reloadable.listen.drain_delay;
        tree.not_ready_then_wait(state, delay).await;
        tree.stop_accepting(state, started.accept, started.prefetch)
            .await;
        if !tree.grace(config.reloadable.listen.shutdown_grace).await {
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
async fn start(config: &Config, tree: &Shutdown, shards: Shards) -> Result<Started, StartError> {
    let listen = &config.fixed.listen;
    let pools = 1 + usize::from(listen.unix_socket_dir.is_some());
    let max = crate::fd_limit::raise_for(listen.max_connections, pools);
    let state = build_state(config, tree)?;
    let (vault, auth) = (state.vault.clone(), config.fixed.vault.auth.clone());
    let vault_auth = tree
        .vault_auth()
        .run(|stop| crate::vault::auth::maintain(vault, auth, stop));
    // Give the first login a moment so the first clients do not race it; failures are
    // retried in the background and /readyz stays 503 until a token works.
    let first_login = state.vault.tokens.wait_current();
    let _ = tokio::time::timeout(config.fixed.vault.timeout, first_login).await;
    let prefetch = tree.prefetch().run(|stop| state.prefetch.clone().run(stop));
    let listener = bind(config.fixed.listen.address).await?;
    if let Some(metrics) = &config.fixed.metrics {
        start_admin(metrics.address, &state, tree).await?;
    }
    if let Some(admin) = &config.fixed.admin {
        let socket = crate::admin_socket::bind(&admin.socket)?;
        tracing::info!(path = %admin.socket.display(), "admin socket listening");
        let tasks = tree.admin();
        tasks.spawn(crate::admin_socket::serve(
            socket,
            state.clone(),
            tasks.clone(),
        ));
    }
    let threads = shards.len();
    let (accept, local) = start_accepting(listener, max, config, &state, tree, shards.clone())?;
    let accept = start_unix_socket(accept, local.port(), max, config, &state, tree, shards)?;
    state.set_ready(true);
    tracing::info!(address = %local, session_threads = threads, "leasegate listening");
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
    let ready = {
        let state = state.clone();
        move || state.is_ready()
    };
    let metrics = state.metrics.clone();
    tasks.spawn(crate::admin::serve(admin, metrics, ready, tasks.clone()));
    Ok(())
}

/// Starts the accept loop (every session runs on the session tracker, under a child of the
/// sessions' token), holding at most `max` sessions at once; returns it and the address it
/// listens on.
fn start_accepting(
    listener: TcpListener,
    max: usize,
    config: &Config,
    state: &Arc<AppState>,
    tree: &Shutdown,
    shards: Shards,
) -> Result<(JoinHandle<()>, SocketAddr), StartError> {
    let address = config.fixed.listen.address;
    let local = listener
        .local_addr()
        .map_err(|e| StartError::Bind(address, e))?;
    let state = state.clone();
    let (session_tasks, sessions) = (tree.session_tasks.clone(), tree.sessions.clone());
    let accept = tree.accepting().run(|accepting| {
        crate::listener::accept_loop(
            listener,
            state,
            max,
            session_tasks,
            accepting,
            sessions,
            shards,
        )
    });
    Ok((accept, local))
}

/// With `listen.unix_socket_dir`: binds the Unix socket (named after the TCP listener's
/// `port`) and starts its accept loop beside the TCP one; returns the task that ends when
/// both have stopped. It holds at most `max` sessions at once, besides the TCP ones.
fn start_unix_socket(
    accept: JoinHandle<()>,
    port: u16,
    max: usize,
    config: &Config,
    state: &Arc<AppState>,
    tree: &Shutdown,
    shards: Shards,
) -> Result<JoinHandle<()>, StartError> {
    use crate::listener::unix::{UnixSocket, accept_loop};
    let Some(socket) =
        UnixSocket::bind(&config.fixed.listen, port).map_err(StartError::UnixSocket)?
    else {
        return Ok(accept);
    };
    tracing::info!(path = %socket.path().display(), "leasegate listening on the unix socket");
    let state = state.clone();
    let (session_tasks, sessions) = (tree.session_tasks.clone(), tree.sessions.clone());
    let unix = tree.accepting().run(|accepting| {
        accept_loop(
            socket,
            state,
            max,
            session_tasks,
            accepting,
            sessions,
            shards,
        )
    });
    Ok(tree.accepting().spawn(async move {
        let _ = accept.await;
        let _ = unix.await;
    }))
}

async fn bind(address: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|e| StartError::Bind(address, e))
}
