//! Credential prefetch: per database and role, keep a few leases issued ahead of demand so
//! that session setup does not wait for Vault and `CREATE ROLE`. Each prefetched lease goes
//! to exactly one session; waiting leases are renewed, revoked when unused past `max_idle`
//! (and replaced), dropped when Vault will not extend them further, and revoked at shutdown.
//! When to renew and whether a renewal was the last is the lease clock's decision
//! ([`crate::lease_clock`]).
//!
//! The same task keeps the warm sessions ([`warm`]): upstream sessions logged in ahead of
//! demand, each with a lease of its own.

pub(crate) mod warm;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DatabaseConfig};
use crate::lease_clock::{Jitter, Term, later};
use crate::metrics::Metrics;
use crate::metrics::labels::LeaseResult;
use crate::vault::lease::LeaseApi;
use crate::vault::{Lease, LeaseGuard, Revoker};

/// A lease waiting for its session.
struct Ready {
    lease: Lease,
    /// Revokes the lease when it leaves the pool other than to a session.
    guard: LeaseGuard,
    /// When it was issued: it is revoked once idle for `max_idle`.
    issued: Instant,
    /// Its lifetime as last granted, and when to renew it.
    term: Term,
}

impl Ready {
    /// Whether it still has enough time left to be handed out or kept: more than
    /// [`MIN_REMAINING`] (from the instant [`Ready::next_due`] names, it has not).
    fn alive(&self, now: Instant) -> bool {
        self.term.left(now).is_none_or(|left| left > MIN_REMAINING)
    }

    /// When something is next due for it: a renewal, its idle end, or too little time left.
    fn next_due(&self, max_idle: Duration) -> Instant {
        let dying = self
            .term
            .expires
            .map(|e| e.checked_sub(MIN_REMAINING).unwrap_or(e));
        [self.term.next_renew, dying]
            .into_iter()
            .flatten()
            .fold(later(self.issued, max_idle), Instant::min)
    }
}

/// Where a pool's credentials come from and are good for: a lease from another mount, or for
/// another server or database, must never reach a session after a reload changed them.
#[derive(Clone, PartialEq, Eq)]
struct Origin {
    mount: String,
    host: String,
    port: u16,
    upstream_database: String,
}

impl Origin {
    fn of(db: &DatabaseConfig) -> Origin {
        Origin {
            mount: db.mount.clone(),
            host: db.host.clone(),
            port: db.port,
            upstream_database: db.upstream_database().to_owned(),
        }
    }
}

/// The pool of one (database, role).
struct Pool {
    /// The configuration its waiting leases were issued for.
    origin: Origin,
    /// How many leases to keep waiting (`prefetch`; zero while draining).
    target: usize,
    /// `prefetch_max_idle`: a lease waiting longer is revoked and replaced.
    max_idle: Duration,
    /// The waiting leases, oldest first.
    ready: VecDeque<Ready>,
}

/// A prefetched credential handed to a session.
pub(crate) struct Prefetched {
    /// The credential.
    pub lease: Lease,
    /// Its guard (revokes on drop).
    pub guard: LeaseGuard,
    /// Time left before it expires (zero for a lease without TTL).
    pub remaining: Duration,
}

type Key = (String, String);

/// A waiting credential as `sessions list` shows it (a snapshot; no secret).
pub(crate) struct Waiting {
    /// The database entry's name.
    pub database: String,
    /// The role.
    pub role: String,
    /// The lease id.
    pub lease_id: String,
    /// The database user.
    pub username: String,
    /// When it was issued.
    pub issued: Instant,
    /// When it expires unless renewed.
    pub expires: Option<Instant>,
}

/// Every pool and the task that keeps them filled.
pub(crate) struct Prefetcher {
    /// Every pool by (database, role).
    pools: Mutex<HashMap<Key, Pool>>,
    /// Wakes the task: a lease was taken, or the configuration changed.
    wake: Notify,
    /// Where leases are issued and renewed.
    vault: Arc<dyn LeaseApi>,
    /// Guards the leases issued.
    revoker: Revoker,
    /// The pool gauges and renewal counters.
    metrics: Arc<Metrics>,
    /// The warm sessions, kept by the same task.
    warm: Arc<warm::WarmPool>,
}

/// Least time a waiting lease must have left to be handed out or kept.
const MIN_REMAINING: Duration = Duration::from_secs(5);

impl Prefetcher {
    /// A prefetcher with the pools the config asks for (none start filling until `run`).
    pub(crate) fn new(
        config: &Config,
        vault: Arc<dyn LeaseApi>,
        revoker: Revoker,
        metrics: Arc<Metrics>,
    ) -> Self {
        let p = Prefetcher {
            pools: Mutex::default(),
            wake: Notify::new(),
            warm: Arc::new(warm::WarmPool::new(
                config,
                vault.clone(),
                revoker.clone(),
                metrics.clone(),
            )),
            vault,
            revoker,
            metrics,
        };
        p.configure(config);
        p
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Pool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The warm sessions.
    pub(crate) fn warm(&self) -> &warm::WarmPool {
        &self.warm
    }

    /// Applies a (re)loaded config: new pools start filling, removed ones drain.
    pub(crate) fn configure(&self, config: &Config) {
        self.warm.configure(config);
        let mut pools = self.lock();
        for pool in pools.values_mut() {
            pool.target = 0;
        }
        for db in &config.reloadable.databases {
            for (role, &target) in &db.prefetch {
                let origin = Origin::of(db);
                let pool = pools
                    .entry((db.name.clone(), role.clone()))
                    .or_insert_with(|| Pool {
                        origin: origin.clone(),
                        target: 0,
                        max_idle: db.prefetch_max_idle,
                        ready: VecDeque::new(),
                    });
                if pool.origin != origin {
                    // Issued for another mount, server or database: revoked as they drop.
                    pool.ready.clear();
                    pool.origin = origin;
                }
                pool.target = target;
                pool.max_idle = db.prefetch_max_idle;
            }
        }
        drop(pools);
        self.wake.notify_one();
    }

    /// Takes a ready credential for (database, role), if one is waiting that was issued for
    /// this very entry (mount, host, port and upstream database as the session sees them).
    pub(crate) fn take(&self, db: &DatabaseConfig, role: &str) -> Option<Prefetched> {
        let database = db.name.as_str();
        let mut pools = self.lock();
        let pool = pools
            .get_mut(&(database.to_owned(), role.to_owned()))
            .filter(|p| p.origin == Origin::of(db))?;
        let now = Instant::now();
        let taken = loop {
            let ready = pool.ready.pop_front()?;
            if ready.alive(now) {
                break ready;
            }
            // Too close to expiry: its guard revokes it as it drops here.
        };
        self.set_gauge(database, role, pool.ready.len());
        drop(pools);
        self.wake.notify_one();
        Some(Prefetched {
            remaining: taken.term.left(now).unwrap_or_default(),
            lease: taken.lease,
            guard: taken.guard,
        })
    }

    /// Revokes every credential waiting for (database, role) and lets the pool fill again:
    /// one of them was refused upstream, so those issued with it most likely died with it
    /// (which ones is not known: a revocation outside leasegate leaves no trace here).
    /// Returns how many were discarded.
    pub(crate) fn discard(&self, db: &DatabaseConfig, role: &str) -> usize {
        let mut pools = self.lock();
        let Some(pool) = pools.get_mut(&(db.name.clone(), role.to_owned())) else {
            return 0;
        };
        let discarded = pool.ready.len();
        // Their guards revoke them as they drop.
        pool.ready.clear();
        self.set_gauge(&db.name, role, 0);
        drop(pools);
        self.wake.notify_one();
        discarded
    }

    /// Every credential waiting now, for `sessions list`.
    pub(crate) fn waiting(&self) -> Vec<Waiting> {
        let pools = self.lock();
        let mut out = Vec::new();
        for ((database, role), pool) in pools.iter() {
            out.extend(pool.ready.iter().map(|r| Waiting {
                database: database.clone(),
                role: role.clone(),
                lease_id: r.lease.id.clone(),
                username: r.lease.username.clone(),
                issued: r.issued,
                expires: r.term.expires,
            }));
        }
        out
    }

    fn set_gauge(&self, database: &str, role: &str, n: usize) {
        self.metrics.set_prefetch_ready(database, role, n);
    }

    /// Revokes every waiting lease (shutdown).
    pub(crate) fn clear(&self) {
        let mut pools = self.lock();
        for ((db, role), pool) in pools.iter_mut() {
            pool.target = 0;
            pool.ready.clear();
            self.set_gauge(db, role, 0);
        }
    }

    /// Keeps the pools (and the warm sessions) filled and their leases alive until `stop`;
    /// then revokes them all.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let warm = self.warm.clone().run(stop.clone());
        let prefetch = async {
            loop {
                let next = self.tick(&stop).await;
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = self.wake.notified() => {}
                    _ = stop.cancelled() => break,
                }
            }
            self.clear();
        };
        tokio::join!(prefetch, warm);
    }

    /// One pass over every pool; returns when the next pass is due.
    async fn tick(&self, stop: &CancellationToken) -> Instant {
        let mut next = Instant::now() + Duration::from_secs(30);
        let keys: Vec<Key> = self.lock().keys().cloned().collect();
        for key in keys {
            next = next.min(self.expire_and_renew(&key).await);
            if let Err(retry) = self.refill(&key, stop).await {
                next = next.min(retry);
            }
        }
        next
    }

    /// Drops idle or dying leases, renews the ones that are due; returns when this pool is
    /// next due.
    async fn expire_and_renew(&self, key: &Key) -> Instant {
        for (id, ttl) in self.expire(key) {
            let result = self.vault.renew(&id, ttl).await;
            self.metrics.lease_renewal(if result.is_ok() {
                LeaseResult::Ok
            } else {
                LeaseResult::Error
            });
            let now = Instant::now();
            let mut pools = self.lock();
            let Some(pool) = pools.get_mut(key) else {
                break;
            };
            let Some(pos) = pool.ready.iter().position(|r| r.lease.id == id) else {
                continue;
            };
            let term = &mut pool.ready[pos].term;
            match result {
                Ok(r) => {
                    if term.granted(now, ttl, r.duration, r.renewable, Jitter::random()) {
                        // Near max_ttl: its guard revokes it here, `refill` replaces it.
                        pool.ready.remove(pos);
                    }
                }
                Err(e) => {
                    tracing::warn!(lease_id = %id, error = %e, "prefetched lease renewal failed");
                    term.failed(now, Jitter::random());
                }
            }
        }
        let pools = self.lock();
        let idle = Instant::now() + Duration::from_secs(30);
        pools.get(key).map_or(idle, |p| {
            p.ready
                .iter()
                .map(|r| r.next_due(p.max_idle))
                .fold(idle, Instant::min)
        })
    }

    /// Drops the leases beyond the target, idle past `max_idle` or too close to expiry (their
    /// guards revoke them); returns the ones due for renewal, with the increment to ask for.
    fn expire(&self, key: &Key) -> Vec<(String, Duration)> {
        let now = Instant::now();
        let mut pools = self.lock();
        let Some(pool) = pools.get_mut(key) else {
            return Vec::new();
        };
        let (target, max_idle) = (pool.target, pool.max_idle);
        let mut kept = 0;
        pool.ready.retain(|r| {
            let keep = kept < target && now.duration_since(r.issued) < max_idle && r.alive(now);
            kept += usize::from(keep);
            keep
        });
        self.set_gauge(&key.0, &key.1, pool.ready.len());
        pool.ready
            .iter()
            .filter(|r| r.term.renew_due(now))
            .map(|r| (r.lease.id.clone(), r.lease.duration))
            .collect()
    }

    /// Issues credentials until the pool holds its target (or `stop`); `Err(retry_at)` after
    /// a failure. A creds call in flight is not cut short at `stop`: what Vault issued is
    /// pooled and revoked with the rest.
    async fn refill(&self, key: &Key, stop: &CancellationToken) -> Result<(), Instant> {
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let origin = {
                let pools = self.lock();
                match pools.get(key) {
                    Some(p) if p.ready.len() < p.target => p.origin.clone(),
                    _ => return Ok(()),
                }
            };
            let issued = self.vault.creds(&origin.mount, &key.1, &self.revoker).await;
            let (lease, guard) = match issued {
                Ok(issued) => issued,
                Err(e) => {
                    tracing::warn!(database = %key.0, role = %key.1, error = %e, "prefetch failed");
                    return Err(Instant::now() + Duration::from_secs(5));
                }
            };
            let now = Instant::now();
            let ready = Ready {
                term: Term::issued(now, lease.duration, lease.renewable, Jitter::random()),
                issued: now,
                guard,
                lease,
            };
            let mut pools = self.lock();
            // A reload may have changed the entry while Vault answered: then this lease is
            // not for the pool any more and its guard revokes it here.
            if let Some(pool) = pools.get_mut(key).filter(|p| p.origin == origin) {
                pool.ready.push_back(ready);
                self.set_gauge(&key.0, &key.1, pool.ready.len());
            }
        }
    }
}

#[cfg(test)]
#[path = "prefetch_tests.rs"]
mod tests;
