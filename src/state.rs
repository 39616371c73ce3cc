//! The state sessions share: the reloadable snapshot ([`Live`], swapped whole by a reload)
//! and the long-lived services ([`AppState`]). Built by [`crate::app`], read by the listener,
//! the sessions and the cancel path.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;

use crate::audit::AuditLog;
use crate::cancel::CancelMap;
use crate::cancel::gate::CancelGate;
use crate::cluster::Cluster;
use crate::config::ReloadableConfig;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::prefetch::Prefetcher;
use crate::registry::Registry;
use crate::tasks::Tasks;
use crate::tls::{self, TlsError};
use crate::upstream::Database;
use crate::vault::{Revoker, VaultClient};

/// What SIGHUP reloads. A session takes one snapshot when it starts and keeps it, so a reload
/// never changes a session in flight.
pub(crate) struct Live {
    /// Client-facing TLS.
    pub tls: TlsAcceptor,
    /// The compiled grants.
    pub policy: Policy,
    /// Database entries by client-facing name.
    pub databases: HashMap<String, Arc<Database>>,
    /// Limit for TLS handshake plus startup packet.
    pub login_timeout: Duration,
    /// Peers for cancel forwarding.
    pub cluster: Option<Cluster>,
    /// Keepalive idle time for client sockets.
    pub tcp_keepalive: Duration,
    /// Sources whose connections start with a PROXY protocol header (`crate::proxy_header`).
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

impl Live {
    /// Builds everything reloadable from a validated config (inside a Tokio runtime: a
    /// `[cluster]` starts resolving its peers on `cluster`, until this `Live` is dropped).
    pub(crate) fn build(config: &ReloadableConfig, cluster: &Tasks) -> Result<Live, TlsError> {
        let mut databases = HashMap::new();
        for db in &config.databases {
            databases.insert(db.name.clone(), Arc::new(Database::new(db)?));
        }
        Ok(Live {
            tls: tls::server::acceptor(&config.listen)?,
            policy: Policy::new(&config.grants),
            databases,
            login_timeout: config.listen.login_timeout,
            tcp_keepalive: config.listen.tcp_keepalive,
            proxy_protocol_from: config.listen.proxy_protocol_from.clone(),
            cluster: config
                .cluster
                .as_ref()
                .map(|c| Cluster::new(c, &config.listen, cluster))
                .transpose()?,
        })
    }
}

/// Everything sessions share.
pub(crate) struct AppState {
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
    /// False while starting and while draining (set by [`crate::app`]).
    pub(crate) ready: AtomicBool,
    /// The live sessions, for the admin socket and `end_sessions_on_revoke`.
    pub sessions: Arc<Registry>,
}

impl AppState {
    /// Whether `/readyz` should answer 200.
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.vault.tokens.healthy()
    }

    /// Ready once started, not ready from the start of the drain.
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}
