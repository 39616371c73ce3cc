//! Keeping the warm pools: every pass takes out what must go (a closed backend, idle past
//! `warm_max_idle`, a lease running out, beyond the target, a set nobody wants) and closes it
//! before its lease is revoked, renews the leases due, and logs new sessions in until every
//! wanted set holds its target.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::session::{OpenError, WarmSession};
use super::{CHECK_EVERY, Key, MIN_REMAINING, Settings, WarmPool, retire_all};
use crate::lease_clock::Jitter;
use crate::metrics::labels::{LeaseResult, WarmResult};
use crate::upstream::Database;

/// Most warm sessions logging in at once per (database, role).
const OPEN_AT_ONCE: usize = 4;

impl WarmPool {
    /// Keeps the pools filled, checked and renewed until `stop`; then closes them all.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let next = self.pass(&stop).await;
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.wake.notified() => {}
                _ = stop.cancelled() => break,
            }
        }
        self.clear().await;
    }

    /// One pass over every pool; returns when the next is due.
    pub(super) async fn pass(&self, stop: &CancellationToken) -> Instant {
        let mut next = Instant::now() + CHECK_EVERY;
        let keys: Vec<Key> = self.lock().keys().cloned().collect();
        for key in keys {
            let (retiring, renew) = self.sweep(&key);
            retire_all(retiring).await;
            next = next.min(self.renew(&key, renew).await);
            if self.refill(&key, stop).await.is_err() {
                next = next.min(Instant::now() + Duration::from_secs(5));
            }
        }
        next
    }

    /// Takes out what must go (gone, idle, dying, beyond the target, sets nobody wants);
    /// returns it with the leases due for renewal.
    fn sweep(&self, key: &Key) -> (Vec<WarmSession>, Vec<(String, Duration)>) {
        let now = Instant::now();
        let mut pools = self.lock();
        let Some(pool) = pools.get_mut(key) else {
            return (Vec::new(), Vec::new());
        };
        let (target, max_idle) = (pool.target, pool.config.warm_max_idle);
        let mut out = std::mem::take(&mut pool.retiring);
        let mut gone = 0;
        for set in &mut pool.sets {
            let unwanted = now.duration_since(set.wanted) >= max_idle;
            let mut kept = 0;
            for w in std::mem::take(&mut set.ready) {
                if w.gone() {
                    gone += 1;
                    continue;
                }
                let keep = !unwanted
                    && kept < target
                    && now.duration_since(w.created) < max_idle
                    && w.alive(now, MIN_REMAINING);
                kept += usize::from(keep);
                if keep {
                    set.ready.push_back(w);
                } else {
                    out.push(w);
                }
            }
        }
        pool.sets
            .retain(|s| !s.ready.is_empty() || now.duration_since(s.wanted) < max_idle);
        let renew = pool
            .sets
            .iter()
            .flat_map(|s| s.ready.iter())
            .filter(|w| w.term.renew_due(now))
            .map(|w| (w.lease.id.clone(), w.lease.duration))
            .collect();
        self.metrics.set_warm_ready(&key.0, &key.1, pool.ready());
        drop(pools);
        for _ in 0..gone {
            self.metrics.warm_session(WarmResult::Gone);
        }
        (out, renew)
    }

    /// Renews the leases due; returns when this pool is next due.
    async fn renew(&self, key: &Key, due: Vec<(String, Duration)>) -> Instant {
        for (id, ttl) in due {
            let result = self.vault.renew(&id, ttl).await;
            let ok = if result.is_ok() {
                LeaseResult::Ok
            } else {
                LeaseResult::Error
            };
            self.metrics.lease_renewal(ok);
            let now = Instant::now();
            let mut pools = self.lock();
            let Some(pool) = pools.get_mut(key) else {
                break;
            };
            let found = pool.sets.iter_mut().find_map(|s| {
                let at = s.ready.iter().position(|w| w.lease.id == id)?;
                Some((s, at))
            });
            let Some((set, at)) = found else { continue };
            match result {
                Ok(r) => {
                    let term = &mut set.ready[at].term;
                    if term.granted(now, ttl, r.duration, r.renewable, Jitter::random()) {
                        // Near max_ttl: closed and replaced.
                        if let Some(w) = set.ready.remove(at) {
                            pool.retiring.push(w);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(lease_id = %id, error = %e, "warm session lease renewal failed");
                    set.ready[at].term.failed(now, Jitter::random());
                }
            }
        }
        let pools = self.lock();
        let idle = Instant::now() + CHECK_EVERY;
        pools.get(key).map_or(idle, |p| {
            p.sets
                .iter()
                .flat_map(|s| s.ready.iter())
                .filter_map(|w| w.term.next_renew)
                .fold(idle, Instant::min)
        })
    }

    /// Logs sessions in until every wanted set holds the target, keeping up to
    /// [`OPEN_AT_ONCE`] logins in flight and topping up as clients take sessions meanwhile
    /// (for at most [`CHECK_EVERY`], so the other pools get their pass); `Err` after a failed
    /// creds call (retried by a later pass). Logins in flight at `stop` finish: their sessions
    /// are pooled and closed with the rest.
    async fn refill(&self, key: &Key, stop: &CancellationToken) -> Result<(), ()> {
        let until = Instant::now() + CHECK_EVERY;
        let mut opening = JoinSet::new();
        let mut in_flight: Vec<Settings> = Vec::new();
        let mut failed = false;
        loop {
            if !failed && !stop.is_cancelled() && Instant::now() < until {
                let room = OPEN_AT_ONCE.saturating_sub(in_flight.len());
                for (database, settings) in self.missing(key, &in_flight, room) {
                    in_flight.push(settings.clone());
                    let (vault, revoker, role) =
                        (self.vault.clone(), self.revoker.clone(), key.1.clone());
                    opening.spawn(async move {
                        let opened =
                            WarmSession::open(&*vault, &revoker, &database, &role, &settings).await;
                        (database, settings, opened)
                    });
                }
            }
            let joined = tokio::select! {
                joined = opening.join_next() => match joined {
                    None => return if failed { Err(()) } else { Ok(()) },
                    Some(joined) => joined,
                },
                // A client took a session: top up while the others log in.
                () = self.wake.notified() => continue,
            };
            let Ok((database, settings, opened)) = joined else {
                continue;
            };
            if let Some(at) = in_flight.iter().position(|s| *s == settings) {
                in_flight.swap_remove(at);
            }
            failed |= !self.opened(key, &database, &settings, opened).await;
        }
    }

    /// Pools what one login produced; `false` after a failed creds call.
    async fn opened(
        &self,
        key: &Key,
        database: &Database,
        settings: &Settings,
        opened: Result<WarmSession, OpenError>,
    ) -> bool {
        match opened {
            Ok(w) => {
                if let Some(stray) = self.pool_opened(key, database, settings, w) {
                    stray.retire().await;
                }
                true
            }
            Err(e @ OpenError::Upstream(_)) => {
                // The cold path would fail alike: stop keeping this set until a client asks
                // for it again (a server that is down is not hammered meanwhile).
                tracing::warn!(database = %key.0, role = %key.1, error = %e,
                    "warm session login failed: not keeping this parameter set for now");
                if let Some(p) = self.lock().get_mut(key) {
                    p.sets.retain(|s| s.settings != *settings);
                }
                true
            }
            Err(e) => {
                tracing::warn!(database = %key.0, role = %key.1, error = %e,
                    "warm session creds call failed");
                false
            }
        }
    }

    /// Up to `room` sessions missing from the wanted sets, counting those `in_flight`.
    fn missing(
        &self,
        key: &Key,
        in_flight: &[Settings],
        room: usize,
    ) -> Vec<(Arc<Database>, Settings)> {
        let pools = self.lock();
        let Some(p) = pools.get(key) else {
            return Vec::new();
        };
        p.sets
            .iter()
            .flat_map(|s| {
                let coming = in_flight.iter().filter(|f| **f == s.settings).count();
                let n = p.target.saturating_sub(s.ready.len() + coming);
                std::iter::repeat_n((p.database.clone(), s.settings.clone()), n)
            })
            .take(room)
            .collect()
    }

    /// Pools a freshly opened session; returns it when a reload changed the entry meanwhile
    /// (it is not for the pool any more).
    fn pool_opened(
        &self,
        key: &Key,
        database: &Database,
        settings: &Settings,
        w: WarmSession,
    ) -> Option<WarmSession> {
        let mut pools = self.lock();
        let Some(pool) = pools.get_mut(key).filter(|p| p.config == database.config) else {
            return Some(w);
        };
        match pool.sets.iter_mut().find(|s| s.settings == *settings) {
            Some(set) => set.ready.push_back(w),
            None => pool.retiring.push(w),
        }
        self.metrics.set_warm_ready(&key.0, &key.1, pool.ready());
        None
    }
}
