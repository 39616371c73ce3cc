//! The registry of live sessions, for the operator's console (`leasegate sessions list` and
//! `sessions end`, over the admin socket) and for a reload that ends what it no longer allows
//! (`listen.end_sessions_on_revoke`). A session registers once its grant allowed it
//! ([`Registry::register`]) and is deregistered by the guard it gets back, on every exit path.
//!
//! What a session shares is cheap: its facts, fixed at registration; the lease facts, written
//! when the credential arrives and at each renewal; per direction a few atomics the relay
//! stores once per chunk it relays ([`Traffic`]); and its end handle, the session's own stop
//! token with the [`EndReason`] that goes with it. Prefetched credentials (and later other
//! pools) are listed through a [`ListingSource`]: a snapshot, read-only.

pub(crate) mod listing;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::EndReason;
use crate::identity::Principal;
use crate::metrics::Metrics;
use crate::metrics::labels::SessionEndReason;
use crate::net::Transport;
pub(crate) use listing::{Kind, Listed, ListingSource};

/// One direction's traffic as the relay last stored it (relaxed atomics: a listing may see
/// one chunk's update half done, which only blurs the state for that instant).
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    /// Bytes written to the far side.
    bytes: AtomicU64,
    /// Messages of the direction's counted types (requests up, ReadyForQuery down).
    messages: AtomicU64,
    /// First body byte of the last counted message: down, the transaction status.
    last: AtomicU8,
    /// An extended-protocol message awaits its Sync (up).
    pending: AtomicBool,
}

impl Traffic {
    /// What the relay knows after writing a chunk: totals, not increments.
    pub(crate) fn store(&self, bytes: u64, messages: u64, last: u8, pending: bool) {
        self.bytes.store(bytes, Ordering::Relaxed);
        self.messages.store(messages, Ordering::Relaxed);
        if last != 0 {
            self.last.store(last, Ordering::Relaxed);
        }
        self.pending.store(pending, Ordering::Relaxed);
    }

    /// Bytes so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// The transport named `name` (`tcp`, `tls`, `unix`), for `sessions end --transport`.
pub(crate) fn transport_named(name: &str) -> Option<Transport> {
    [Transport::Tcp, Transport::Tls, Transport::Unix]
        .into_iter()
        .find(|t| t.as_str() == name)
}

/// The lease facts, known once the credential arrived.
#[derive(Debug, Clone, Default)]
struct LeaseFacts {
    /// The database user Vault created: what `pg_stat_activity` shows for the session.
    upstream_user: Option<String>,
    /// The lease, to find it in Vault (and in `leases check`).
    lease_id: Option<String>,
    /// The last successful renewal: a lease that stops being renewed is a sign of trouble.
    last_renewed: Option<SystemTime>,
    /// When the credential dies unless renewed.
    expires: Option<SystemTime>,
}

/// What the registry knows of one session before it starts setting up.
pub(crate) struct NewSession {
    /// How the client connected.
    pub transport: Transport,
    /// The client's address, as logs show it.
    pub client_addr: String,
    /// The identities, for matching `--identity` and for re-running the grant check.
    pub principal: Principal,
    /// The database asked for.
    pub database: String,
    /// The role asked for.
    pub role: String,
}

/// One registered session, shared by the session, its relay and watcher, and the registry.
pub(crate) struct Tracked {
    /// The id `sessions end --id` takes.
    pub id: u64,
    /// The facts given at registration.
    pub facts: NewSession,
    /// When it registered.
    pub started: SystemTime,
    /// Written at the credential and at each renewal, read by listings.
    lease: Mutex<LeaseFacts>,
    /// Client → upstream, stored by the relay (which shares this entry, so the counters
    /// need no allocation of their own).
    pub to_upstream: Traffic,
    /// Upstream → client, stored by the relay.
    pub to_client: Traffic,
    /// Relaying (after the client got its ReadyForQuery); before: setup.
    relaying: AtomicBool,
    /// The session's own stop token (a child of the sessions' token).
    stop: CancellationToken,
    /// Why leasegate stopped it, set before `stop` is cancelled (none: shutdown).
    cause: OnceLock<EndReason>,
    /// How it ended, when the session itself saw it (client, upstream, error).
    ended: OnceLock<SessionEndReason>,
}

impl Tracked {
    fn lease(&self) -> std::sync::MutexGuard<'_, LeaseFacts> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The credential arrived: its user, lease and how long it is good for.
    pub(crate) fn credential(&self, user: &str, lease_id: &str, left: Option<Duration>) {
        let mut lease = self.lease();
        lease.upstream_user = Some(user.to_owned());
        lease.lease_id = Some(lease_id.to_owned());
        lease.expires = left.map(|d| SystemTime::now() + d);
    }

    /// The upstream user and the lease, once the credential arrived (for audit lines).
    pub(crate) fn lease_ids(&self) -> (Option<String>, Option<String>) {
        let lease = self.lease();
        (lease.upstream_user.clone(), lease.lease_id.clone())
    }

    /// A renewal granted `ttl` from now (zero: no expiry).
    pub(crate) fn renewed(&self, ttl: Duration) {
        let now = SystemTime::now();
        let mut lease = self.lease();
        lease.last_renewed = Some(now);
        lease.expires = (!ttl.is_zero()).then(|| now + ttl);
    }

    /// The client got its ReadyForQuery: from now on the state comes from the traffic.
    pub(crate) fn relaying(&self) {
        self.relaying.store(true, Ordering::Relaxed);
    }

    /// The session saw how it ended (client, upstream, error); a cause set by leasegate
    /// (operator, reload, lifetime, shutdown) counts first.
    pub(crate) fn ended(&self, how: SessionEndReason) {
        let _ = self.ended.set(how);
    }

    /// The watcher is ending the session itself (maximum lifetime).
    pub(crate) fn ending(&self, reason: EndReason) {
        let _ = self.cause.set(reason);
    }

    /// Stops the session for `reason`; false when it was stopped already.
    pub(crate) fn end(&self, reason: EndReason) -> bool {
        if self.stop.is_cancelled() || self.cause.set(reason).is_err() {
            return false;
        }
        self.stop.cancel();
        true
    }

    /// What an operator (or a reload) ended the session with, if one did.
    pub(crate) fn cause(&self) -> Option<crate::error::SessionError> {
        let cause = self.cause.get();
        cause
            .filter(|c| !matches!(c, EndReason::MaxLifetime))
            .map(EndReason::error)
    }

    /// Why the session was stopped: what its client is told (57P01).
    pub(crate) fn stopped(&self) -> crate::error::SessionError {
        self.cause
            .get()
            .map_or(crate::error::SessionError::Shutdown, EndReason::error)
    }

    /// The `leasegate_sessions_ended_total{reason}` value, once it is over.
    fn end_label(&self) -> SessionEndReason {
        if let Some(cause) = self.cause.get() {
            return cause.label();
        }
        match self.ended.get() {
            Some(how) => *how,
            None if self.stop.is_cancelled() => SessionEndReason::Shutdown,
            None => SessionEndReason::Error,
        }
    }

    /// setup / idle / in transaction / active.
    fn state(&self) -> &'static str {
        if !self.relaying.load(Ordering::Relaxed) {
            return "setup";
        }
        let (up, down) = (&self.to_upstream, &self.to_client);
        let asked = up.messages.load(Ordering::Relaxed);
        let answered = down.messages.load(Ordering::Relaxed);
        if asked > answered || up.pending.load(Ordering::Relaxed) {
            return "active";
        }
        match down.last.load(Ordering::Relaxed) {
            b'T' | b'E' => "in transaction",
            _ => "idle",
        }
    }

    /// The row `sessions list` shows.
    pub(crate) fn listed(&self) -> Listed {
        let lease = self.lease().clone();
        Listed {
            kind: Kind::Session,
            id: Some(self.id),
            transport: Some(self.facts.transport.as_str().to_owned()),
            client_addr: Some(self.facts.client_addr.clone()),
            identities: self.facts.principal.all_identities(),
            database: self.facts.database.clone(),
            role: self.facts.role.clone(),
            upstream_user: lease.upstream_user,
            lease_id: lease.lease_id,
            started: Some(listing::time(self.started)),
            last_renewed: lease.last_renewed.map(listing::time),
            lease_expires: lease.expires.map(listing::time),
            bytes_to_upstream: self.to_upstream.bytes(),
            bytes_to_client: self.to_client.bytes(),
            state: self.state().to_owned(),
        }
    }
}

/// Every live session, and the sources of the other listed credentials.
pub(crate) struct Registry {
    /// The registered sessions by id (id order is registration order).
    sessions: Mutex<BTreeMap<u64, Arc<Tracked>>>,
    /// The next session id; ids are never reused while the process lives.
    next_id: AtomicU64,
    /// Prefetched credentials (warm sessions later), listed after the sessions.
    sources: Mutex<Vec<Arc<dyn ListingSource>>>,
    /// Woken whenever a session deregisters.
    gone: Notify,
    /// Where `leasegate_sessions_ended_total` is counted.
    metrics: Arc<Metrics>,
}

/// Deregisters its session when dropped, counting how it ended.
pub(crate) struct Registered {
    /// The entry, shared with the relay and the watcher.
    tracked: Arc<Tracked>,
    /// Where it is deregistered from.
    registry: Arc<Registry>,
}

impl std::ops::Deref for Registered {
    type Target = Tracked;
    fn deref(&self) -> &Tracked {
        &self.tracked
    }
}

impl Registered {
    /// The shared handle (for the watcher).
    pub(crate) fn handle(&self) -> Arc<Tracked> {
        self.tracked.clone()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.tracked.id);
        let label = self.tracked.end_label();
        self.registry.metrics.session_ended(label);
        self.registry.gone.notify_waiters();
    }
}

impl Registry {
    /// An empty registry counting session ends in `metrics`.
    pub(crate) fn new(metrics: Arc<Metrics>) -> Arc<Registry> {
        Arc::new(Registry {
            sessions: Mutex::default(),
            next_id: AtomicU64::new(1),
            sources: Mutex::default(),
            gone: Notify::new(),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Tracked>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a session that `stop` stops; it stays listed until the guard drops.
    pub(crate) fn register(
        self: &Arc<Self>,
        facts: NewSession,
        stop: CancellationToken,
    ) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tracked = Arc::new(Tracked {
            id,
            facts,
            started: SystemTime::now(),
            lease: Mutex::default(),
            to_upstream: Traffic::default(),
            to_client: Traffic::default(),
            relaying: AtomicBool::new(false),
            stop,
            cause: OnceLock::new(),
            ended: OnceLock::new(),
        });
        self.lock().insert(id, tracked.clone());
        Registered {
            tracked,
            registry: self.clone(),
        }
    }

    /// Adds a source of listed credentials (prefetch pools, warm sessions).
    pub(crate) fn add_source(&self, source: Arc<dyn ListingSource>) {
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(source);
    }

    /// The sessions in id order.
    pub(crate) fn sessions(&self) -> Vec<Arc<Tracked>> {
        self.lock().values().cloned().collect()
    }

    /// Every session, then what the sources hold.
    pub(crate) fn list(&self) -> Vec<Listed> {
        let mut rows: Vec<Listed> = self.sessions().iter().map(|t| t.listed()).collect();
        let sources = self
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for source in sources {
            rows.extend(source.listing());
        }
        rows
    }

    /// Ends every session `pick` chooses, for `reason`; returns what it ended, as listed
    /// just before.
    pub(crate) fn end_where(
        &self,
        pick: impl Fn(&Tracked) -> bool,
        reason: &EndReason,
    ) -> Vec<Listed> {
        let mut ended = Vec::new();
        for tracked in self.sessions() {
            if pick(&tracked) {
                let row = tracked.listed();
                if tracked.end(reason.clone()) {
                    ended.push(row);
                }
            }
        }
        ended
    }

    /// Waits (at most `limit`) until none of the sessions `ids` is registered any more;
    /// whether they all went.
    pub(crate) async fn wait_gone(&self, ids: &[u64], limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let gone = self.gone.notified();
            if ids.iter().all(|id| !self.lock().contains_key(id)) {
                return true;
            }
            if tokio::time::timeout_at(deadline, gone).await.is_err() {
                return false;
            }
        }
    }
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
