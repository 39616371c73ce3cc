//! Warm sessions: per database and role (`warm = { readonly = 4 }`), upstream sessions kept
//! logged in ahead of demand, so a session's setup skips the creds call and the upstream
//! login. Each is logged in with a fresh lease of its own and handed to exactly one client,
//! never reused; it is replaced as it is used.
//!
//! A backend's startup parameters cannot be changed after its login as if they had been sent
//! at startup (`RESET ALL` returns to them, `SHOW` and ParameterStatus report them), so warm
//! sessions are kept per startup-parameter *set*: the client's checked settings, sorted (the
//! exact parameters its cold login would send). A client gets a warm session only from the
//! set equal to its own; any other client takes the cold path, and its set is remembered:
//! the pool keeps sessions for the empty set and up to [`MAX_SETS`] sets wanted in the last
//! `warm_max_idle`. A set nobody wanted for `warm_max_idle` is dropped with its sessions.
//!
//! Waiting sessions are checked every [`CHECK_EVERY`] and once more right before hand-off
//! ([`WarmSession::gone`]: a closed or talking backend is discarded, never handed out), their
//! leases renewed like prefetched ones ([`crate::lease_clock::Term`]), closed and revoked
//! after `warm_max_idle`, when Vault will not extend them, when a reload changed their
//! database entry in any way, and at shutdown ([`WarmPool::clear`], from the prefetch task
//! the shutdown tree stops before the drain).

mod session;
mod upkeep;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::{Config, DatabaseConfig};
use crate::metrics::Metrics;
use crate::metrics::labels::WarmResult;
use crate::upstream::{Database, LoggedIn};
use crate::vault::lease::LeaseApi;
use crate::vault::{Lease, LeaseGuard, Revoker};
use session::WarmSession;

/// Most startup-parameter sets kept warm per database and role.
pub(crate) const MAX_SETS: usize = 4;
/// How often waiting sessions are checked for a server that closed them.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Least lease time a warm session must have left to be handed out or kept.
const MIN_REMAINING: Duration = Duration::from_secs(5);

/// A client's checked startup settings in canonical order: the key of a parameter set.
type Settings = Vec<(String, String)>;
type Key = (String, String);

/// The sessions of one startup-parameter set.
struct SetPool {
    /// The settings they were logged in with, sorted.
    settings: Settings,
    /// When a client last asked for this set: a set unwanted for `warm_max_idle` is dropped.
    wanted: Instant,
    /// Logged in and waiting, oldest first.
    ready: VecDeque<WarmSession>,
}

/// The warm sessions of one (database, role).
struct Pool {
    /// The entry they were logged in for: a session is handed only to a client whose
    /// snapshot of the entry is equal, and a reload that changes it retires them.
    config: DatabaseConfig,
    /// What to connect to (the entry with its TLS connector).
    database: Arc<Database>,
    /// Sessions to keep per set (`warm`; zero once the role or entry is gone).
    target: usize,
    /// Startup-parameter sets kept warm, at most [`MAX_SETS`].
    sets: Vec<SetPool>,
    /// Taken out of the pool (idle, dying, beyond the target, from a changed entry): closed
    /// and revoked by the next pass.
    retiring: Vec<WarmSession>,
}

impl Pool {
    fn ready(&self) -> usize {
        self.sets.iter().map(|s| s.ready.len()).sum()
    }
}

/// A warm session handed to a client session.
pub(crate) struct Warm {
    /// Its credential (the session's watcher renews it from here).
    pub lease: Lease,
    /// Its guard: revokes when the client session ends.
    pub guard: LeaseGuard,
    /// Time left on the lease (zero for a lease without TTL).
    pub remaining: Duration,
    /// The logged-in upstream and what the client must be told.
    pub logged_in: LoggedIn,
}

/// One waiting warm session as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WarmInfo {
    /// `[[databases]]` name.
    pub database: String,
    /// Vault role.
    pub role: String,
    /// The database user of its lease.
    pub upstream_user: String,
    /// Its lease id.
    pub lease_id: String,
    /// When it logged in.
    pub created: SystemTime,
    /// When its lease expires (`None`: no TTL).
    pub lease_expires: Option<SystemTime>,
}

/// Every warm pool and the pass that keeps them.
pub(crate) struct WarmPool {
    /// Pools by (database, role).
    pools: Mutex<HashMap<Key, Pool>>,
    /// Wakes the pass: a session was taken, a new set wanted, the configuration changed.
    wake: Notify,
    /// Issues and renews the sessions' leases.
    vault: Arc<dyn LeaseApi>,
    /// Guards them.
    revoker: Revoker,
    /// `leasegate_warm_ready`, `leasegate_warm_sessions_total`, renewal counters.
    metrics: Arc<Metrics>,
}

impl WarmPool {
    /// Pools as `config` asks (none fills until `run`).
    pub(crate) fn new(
        config: &Config,
        vault: Arc<dyn LeaseApi>,
        revoker: Revoker,
        metrics: Arc<Metrics>,
    ) -> WarmPool {
        let pool = WarmPool {
            pools: Mutex::default(),
            wake: Notify::new(),
            vault,
            revoker,
            metrics,
        };
        pool.configure(config);
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Pool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a (re)loaded config: new pools start with the empty set, pools of a changed
    /// entry retire their sessions, removed ones empty.
    pub(crate) fn configure(&self, config: &Config) {
        let now = Instant::now();
        let mut pools = self.lock();
        for pool in pools.values_mut() {
            pool.target = 0;
        }
        for db in &config.reloadable.databases {
            for (role, &target) in db.warm.iter().filter(|(_, n)| **n > 0) {
                let database = match Database::new(db) {
                    Ok(d) => Arc::new(d),
                    Err(e) => {
                        tracing::warn!(database = %db.name, error = %e, "no warm sessions");
                        continue;
                    }
                };
                let key = (db.name.clone(), role.clone());
                let pool = pools.entry(key).or_insert_with(|| Pool {
                    config: db.clone(),
                    database: database.clone(),
                    target: 0,
                    sets: vec![SetPool {
                        settings: Vec::new(),
                        wanted: now,
                        ready: VecDeque::new(),
                    }],
                    retiring: Vec::new(),
                });
                if pool.config != *db {
                    for set in &mut pool.sets {
                        pool.retiring.extend(set.ready.drain(..));
                    }
                    pool.config = db.clone();
                    pool.database = database;
                }
                pool.target = target;
            }
        }
        drop(pools);
        self.wake.notify_one();
    }

    /// The warm session for a client of `role` on `db` (its snapshot of the entry) whose
    /// checked startup settings are `settings`, if one is waiting and its backend is still
    /// there. `None` for a role without warm sessions, and on a miss (which remembers the
    /// client's set, so the pool starts keeping sessions for it).
    pub(crate) fn take(
        &self,
        db: &DatabaseConfig,
        role: &str,
        settings: &[(String, String)],
    ) -> Option<Warm> {
        let settings = canonical(settings);
        let now = Instant::now();
        let mut pools = self.lock();
        let pool = pools
            .get_mut(&(db.name.clone(), role.to_owned()))
            .filter(|p| p.target > 0 && p.config == *db)?;
        let found = pool.sets.iter().position(|s| s.settings == settings);
        let Some(at) = found else {
            want(pool, settings, now);
            drop(pools);
            self.metrics.warm_session(WarmResult::Miss);
            self.wake.notify_one();
            return None;
        };
        let set = &mut pool.sets[at];
        set.wanted = now;
        let mut taken = None;
        while let Some(w) = set.ready.pop_front() {
            if w.gone() {
                self.metrics.warm_session(WarmResult::Gone);
            } else if !w.alive(now, MIN_REMAINING) {
                pool.retiring.push(w);
            } else {
                taken = Some(w);
                break;
            }
        }
        let ready = pool.ready();
        drop(pools);
        self.metrics.set_warm_ready(&db.name, role, ready);
        self.metrics.warm_session(match taken {
            Some(_) => WarmResult::Hit,
            None => WarmResult::Miss,
        });
        self.wake.notify_one();
        taken.map(|w| Warm {
            remaining: w.term.left(now).unwrap_or_default(),
            lease: w.lease,
            guard: w.guard,
            logged_in: w.logged_in,
        })
    }

    /// Every waiting warm session (database, role, user, lease, created, expiry): a cheap
    /// copy under the lock, for `sessions list`.
    pub(crate) fn snapshot(&self) -> Vec<WarmInfo> {
        let now = Instant::now();
        let pools = self.lock();
        let mut out: Vec<WarmInfo> = pools
            .iter()
            .flat_map(|((database, role), pool)| {
                pool.sets
                    .iter()
                    .flat_map(|s| s.ready.iter())
                    .map(|w| WarmInfo {
                        database: database.clone(),
                        role: role.clone(),
                        upstream_user: w.lease.username.clone(),
                        lease_id: w.lease.id.clone(),
                        created: w.created_at,
                        lease_expires: w.expires_at(now),
                    })
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.database, &a.role, a.created).cmp(&(&b.database, &b.role, b.created))
        });
        out
    }

    /// Closes every waiting session and revokes its lease (shutdown).
    pub(crate) async fn clear(&self) {
        let retiring: Vec<WarmSession> = {
            let mut pools = self.lock();
            let mut all = Vec::new();
            for ((db, role), pool) in pools.iter_mut() {
                pool.target = 0;
                all.append(&mut pool.retiring);
                for set in &mut pool.sets {
                    all.extend(set.ready.drain(..));
                }
                self.metrics.set_warm_ready(db, role, 0);
            }
            all
        };
        retire_all(retiring).await;
    }
}

/// The settings sorted by name: two clients with equal sets log in identically.
fn canonical(settings: &[(String, String)]) -> Settings {
    let mut s = settings.to_vec();
    s.sort();
    s
}

/// Remembers a set a client wanted: replaces the least recently wanted set when the pool
/// holds [`MAX_SETS`] (its sessions retire).
fn want(pool: &mut Pool, settings: Settings, now: Instant) {
    if pool.sets.len() >= MAX_SETS
        && let Some(oldest) = (0..pool.sets.len()).min_by_key(|&i| pool.sets[i].wanted)
    {
        let old = pool.sets.swap_remove(oldest);
        pool.retiring.extend(old.ready);
    }
    pool.sets.push(SetPool {
        settings,
        wanted: now,
        ready: VecDeque::new(),
    });
}

/// Closes the sessions, all at once, each within its close limit.
async fn retire_all(sessions: Vec<WarmSession>) {
    if sessions.is_empty() {
        return;
    }
    let mut closing = JoinSet::new();
    for w in sessions {
        closing.spawn(w.retire());
    }
    while closing.join_next().await.is_some() {}
}

#[cfg(test)]
#[path = "warm_tests.rs"]
mod tests;
