//! A session's lease and the guarantee that it is revoked. A [`LeaseGuard`] exists from the
//! moment Vault issued the credential; dropping it (on any path, success or failure) hands the
//! lease id to the [`Revoker`], which revokes off the session's task with bounded retries and
//! exponential backoff with jitter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngExt;
use secrecy::SecretString;
use tokio::sync::{Notify, mpsc};

use super::client::VaultClient;
use super::token::Token;
use crate::metrics::Metrics;
use crate::metrics::labels::LeaseResult;

/// A credential issued by Vault. No `Debug`: it holds the password.
pub struct Lease {
    /// Vault lease id, the handle for renew and revoke.
    pub id: String,
    /// Time to live Vault granted.
    pub duration: Duration,
    /// Whether Vault allows renewing it.
    pub renewable: bool,
    /// Database user name Vault created.
    pub username: String,
    /// Its password; redacted in Debug, zeroized on drop.
    pub password: SecretString,
    /// The Vault token that created the lease: Vault revokes a token's leases when the token
    /// dies, so it is kept renewed while this reference lives.
    pub parent: Arc<Token>,
}

/// Owns a lease id until the lease is handed to the revoker.
pub struct LeaseGuard {
    id: Option<String>,
    revoker: Revoker,
    /// Keeps the parent token renewed until the lease is revoked.
    _parent: Arc<Token>,
}

impl std::fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGuard").field("id", &self.id).finish()
    }
}

impl LeaseGuard {
    /// The lease id.
    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_default()
    }

    /// Hands the lease to the revoker now (same as dropping the guard).
    pub fn revoke(mut self) {
        if let Some(id) = self.id.take() {
            self.revoker.release(id);
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.revoker.release(id);
        }
    }
}

/// Most revocation attempts per lease before giving up (the lease then dies at its TTL).
const MAX_ATTEMPTS: u32 = 8;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Most revocations talking to Vault at once.
const MAX_IN_FLIGHT: usize = 32;

/// Where a lease the revoker knows of stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Held {
    /// A guard holds it (a session or the prefetch pool).
    Guarded,
    /// Handed to the revoker: queued, in flight or being retried.
    Revoking,
}

/// Every lease from its guard's creation until its revocation finished: what the drain at
/// shutdown waits for and reports. Touched once per lease at issue, release and finish,
/// never on the relay path.
#[derive(Default)]
struct Ledger {
    leases: Mutex<HashMap<String, Held>>,
    /// Woken whenever the ledger becomes empty.
    empty: Notify,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Revokes leases in the background. Cloning shares the queue.
#[derive(Clone)]
pub struct Revoker {
    tx: mpsc::UnboundedSender<String>,
    pending: Arc<AtomicUsize>,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
}

impl Revoker {
    /// Starts the revoker task on the current runtime.
    pub fn spawn(vault: Arc<VaultClient>, metrics: Arc<Metrics>) -> Revoker {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let revoker = Revoker {
            tx,
            pending: Arc::new(AtomicUsize::new(0)),
            ledger: Arc::default(),
            metrics,
        };
        let worker = revoker.clone();
        // Bounds the revocations in flight, so a mass disconnect does not flood Vault.
        let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        tokio::spawn(async move {
            while let Some(id) = rx.recv().await {
                let worker = worker.clone();
                let vault = vault.clone();
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    return;
                };
                tokio::spawn(async move {
                    worker.revoke_with_retries(&vault, id).await;
                    drop(permit);
                });
            }
        });
        revoker
    }

    /// Registers a freshly issued lease and returns its guard.
    pub fn guard(&self, lease: &Lease) -> LeaseGuard {
        self.guard_id(lease.id.clone(), lease.parent.clone())
    }

    /// Registers the lease `id` that `parent` created (as soon as its id is known, before
    /// the rest of Vault's answer is parsed) and returns its guard.
    pub fn guard_id(&self, id: String, parent: Arc<Token>) -> LeaseGuard {
        self.metrics.leases_active.inc();
        self.metrics.leases_issued_total.inc();
        self.ledger.lock().insert(id.clone(), Held::Guarded);
        LeaseGuard {
            id: Some(id),
            revoker: self.clone(),
            _parent: parent,
        }
    }

    /// A guard let go of `id`: revoke it, unless the drain already took it over.
    fn release(&self, id: String) {
        let mut leases = self.ledger.lock();
        match leases.get_mut(&id) {
            Some(held @ Held::Guarded) => *held = Held::Revoking,
            // The drain took it over (and may be done with it already).
            Some(Held::Revoking) | None => return,
        }
        drop(leases);
        self.enqueue(id);
    }

    fn enqueue(&self, id: String) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.metrics.revocations_pending.inc();
        if let Err(unsent) = self.tx.send(id) {
            // The runtime is gone; nothing can revoke any more. The lease dies at its TTL.
            self.finished(&unsent.0);
        }
    }

    fn finished(&self, id: &str) {
        self.metrics.leases_active.dec();
        self.metrics.revocations_pending.dec();
        self.pending.fetch_sub(1, Ordering::SeqCst);
        let mut leases = self.ledger.lock();
        leases.remove(id);
        if leases.is_empty() {
            self.ledger.empty.notify_waiters();
        }
    }

    async fn revoke_with_retries(&self, vault: &VaultClient, id: String) {
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=MAX_ATTEMPTS {
            match vault.revoke(&id).await {
                Ok(()) => {
                    tracing::debug!(lease_id = %id, attempt, "lease revoked");
                    self.metrics.revocation(LeaseResult::Ok);
                    self.finished(&id);
                    return;
                }
                Err(e) if attempt == MAX_ATTEMPTS => {
                    tracing::error!(lease_id = %id, attempts = attempt, error = %e,
                        "lease revocation failed; the credential stays valid until its TTL ends");
                }
                Err(e) => {
                    tracing::warn!(lease_id = %id, attempt, error = %e, "lease revocation failed, retrying");
                    let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
                    tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        self.metrics.revocation(LeaseResult::Error);
        self.finished(&id);
    }

    /// Revocations queued or in flight.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Leases still guarded (by sessions or the prefetch pool) or being revoked.
    pub fn outstanding(&self) -> usize {
        self.ledger.lock().len()
    }

    /// At shutdown: waits (at most `limit`) until no guard is alive and no revocation is
    /// pending. Halfway through, leases whose guards are still alive are taken over and
    /// revoked regardless (their sessions are ending with the process). Every lease still
    /// outstanding at the end is logged at ERROR, one line each, and returned.
    pub async fn drain(&self, limit: Duration) -> Vec<String> {
        let start = Instant::now();
        self.wait_empty(start + limit / 2).await;
        let taken: Vec<String> = {
            let mut leases = self.ledger.lock();
            leases
                .iter_mut()
                .filter(|(_, held)| **held == Held::Guarded)
                .map(|(id, held)| {
                    *held = Held::Revoking;
                    id.clone()
                })
                .collect()
        };
        for id in taken {
            tracing::warn!(lease_id = %id, "lease still held at shutdown: revoking it now");
            self.enqueue(id);
        }
        self.wait_empty(start + limit).await;
        let mut left: Vec<String> = self.ledger.lock().keys().cloned().collect();
        left.sort();
        for id in &left {
            tracing::error!(lease_id = %id,
                "lease left unrevoked at exit; the credential stays valid until its TTL ends");
        }
        left
    }

    /// Waits until the ledger is empty or `deadline` passes.
    async fn wait_empty(&self, deadline: Instant) {
        loop {
            let empty = self.ledger.empty.notified();
            if self.ledger.lock().is_empty() {
                return;
            }
            if tokio::time::timeout_at(deadline.into(), empty)
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::testing;

    fn parent() -> Arc<Token> {
        let secret = SecretString::from("parent".to_owned());
        Arc::new(Token::new(secret, Duration::ZERO, false, false))
    }

    #[tokio::test]
    async fn a_guard_kept_alive_past_the_drain_limit_is_reported_by_id() {
        let vault = testing::client(&testing::closed_address().await);
        let revoker = Revoker::spawn(vault, Arc::new(Metrics::new()));
        let held = revoker.guard_id("database/creds/readonly/held".into(), parent());
        let done = revoker.guard_id("database/creds/readonly/done".into(), parent());
        drop(done);
        assert_eq!(revoker.outstanding(), 2);
        let left = revoker.drain(Duration::from_millis(300)).await;
        // Vault is unreachable, so neither revocation can finish.
        assert_eq!(
            left,
            vec![
                "database/creds/readonly/done".to_owned(),
                "database/creds/readonly/held".to_owned()
            ]
        );
        // The drain took the held lease over: its guard dropping later queues nothing more.
        let pending = revoker.pending();
        drop(held);
        assert_eq!(revoker.pending(), pending);
    }

    #[tokio::test]
    async fn the_drain_waits_for_live_guards_and_revokes_their_leases() {
        let (address, seen) = testing::answering(204).await;
        let revoker = Revoker::spawn(testing::client(&address), Arc::new(Metrics::new()));
        let guard = revoker.guard_id("database/creds/readonly/late".into(), parent());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(guard);
        });
        let left = revoker.drain(Duration::from_secs(20)).await;
        assert!(left.is_empty(), "left {left:?}");
        assert_eq!(revoker.outstanding(), 0);
        let seen = seen.lock().expect("seen").clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].starts_with("PUT /v1/sys/leases/revoke "),
            "{}",
            seen[0]
        );
        assert!(
            seen[0].contains("database/creds/readonly/late"),
            "{}",
            seen[0]
        );
    }

    #[tokio::test]
    async fn a_guard_still_alive_at_the_drain_is_revoked_anyway() {
        let (address, seen) = testing::answering(204).await;
        let revoker = Revoker::spawn(testing::client(&address), Arc::new(Metrics::new()));
        let guard = revoker.guard_id("database/creds/readonly/stuck".into(), parent());
        let left = revoker.drain(Duration::from_secs(2)).await;
        assert!(left.is_empty(), "left {left:?}");
        let seen = seen.lock().expect("seen").clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].contains("database/creds/readonly/stuck"),
            "{}",
            seen[0]
        );
        drop(guard);
        assert_eq!(revoker.outstanding(), 0);
        assert_eq!(revoker.pending(), 0);
    }
}
