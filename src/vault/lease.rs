//! A session's lease and the guarantee that it is revoked. A [`LeaseGuard`] exists from the
//! moment Vault issued the credential; dropping it (on any path, success or failure) hands the
//! lease id to the [`Revoker`], which revokes off the session's task with bounded retries and
//! exponential backoff with jitter ([`crate::lease_clock::Backoff`]). The lease calls go
//! through [`LeaseApi`], so their timing is tested with paused time against a script.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::client::{Renewed, VaultClient};
use super::error::VaultError;
use super::pacing::{Issuing, Pacer, RevokeSlot};
use super::token::Token;
use crate::lease_clock::{Backoff, Jitter};
use crate::metrics::Metrics;
use crate::metrics::labels::LeaseResult;
use crate::tasks::Tasks;

/// A Vault call in flight, boxed so that [`LeaseApi`] can be a trait object.
pub(crate) type Call<'a, T> = Pin<Box<dyn Future<Output = Result<T, VaultError>> + Send + 'a>>;

/// The lease calls: issue, renew, revoke. [`VaultClient`] is the implementation; the unit
/// tests of the revoker, prefetch and the session watcher answer from a script instead.
pub(crate) trait LeaseApi: Send + Sync {
    /// `GET <mount>/creds/<role>`: a fresh credential and its guard.
    fn creds<'a>(
        &'a self,
        mount: &'a str,
        role: &'a str,
        revoker: &'a Revoker,
    ) -> Call<'a, (Lease, LeaseGuard)>;
    /// Renews `lease_id` by `increment`; what Vault granted.
    fn renew<'a>(&'a self, lease_id: &'a str, increment: Duration) -> Call<'a, Renewed>;
    /// Revokes `lease_id`.
    fn revoke<'a>(&'a self, lease_id: &'a str) -> Call<'a, ()>;
    /// The longest any of these calls takes (`vault.timeout`): the revoker paces itself by it.
    fn timeout(&self) -> Duration;
}

impl LeaseApi for VaultClient {
    fn creds<'a>(
        &'a self,
        mount: &'a str,
        role: &'a str,
        revoker: &'a Revoker,
    ) -> Call<'a, (Lease, LeaseGuard)> {
        Box::pin(VaultClient::creds(self, mount, role, revoker))
    }

    fn renew<'a>(&'a self, lease_id: &'a str, increment: Duration) -> Call<'a, Renewed> {
        Box::pin(VaultClient::renew(self, lease_id, increment))
    }

    fn revoke<'a>(&'a self, lease_id: &'a str) -> Call<'a, ()> {
        Box::pin(VaultClient::revoke(self, lease_id))
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }
}

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
/// Waits between attempts: from 200 ms, doubling, at most 10 s (about 23 s in all).
const RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));

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
    /// How many revocations may run at once: creds calls keep priority.
    pacer: Arc<Pacer>,
}

impl Revoker {
    /// Starts the revoker on `tasks`: it revokes until their token is cancelled (after the
    /// drain at shutdown; what is still being retried then dies at its TTL).
    pub(crate) fn spawn(vault: Arc<dyn LeaseApi>, metrics: Arc<Metrics>, tasks: &Tasks) -> Revoker {
        let (tx, rx) = mpsc::unbounded_channel::<String>();
        let revoker = Revoker {
            tx,
            pending: Arc::new(AtomicUsize::new(0)),
            ledger: Arc::default(),
            pacer: Arc::new(Pacer::new(vault.timeout(), metrics.clone())),
            metrics,
        };
        tasks.spawn(revoker.clone().dispatch(rx, vault, tasks.clone()));
        revoker
    }

    /// Takes queued lease ids and revokes each in a task of its own, as many at once as the
    /// pacer allows (a mass disconnect neither floods Vault nor delays new sessions' creds).
    async fn dispatch(
        self,
        mut rx: mpsc::UnboundedReceiver<String>,
        vault: Arc<dyn LeaseApi>,
        tasks: Tasks,
    ) {
        let stop = tasks.stop();
        loop {
            let id = tokio::select! {
                id = rx.recv() => id,
                () = stop.cancelled() => None,
            };
            let Some(id) = id else { return };
            let Some(slot) = self.pacer.slot(stop).await else {
                return;
            };
            let (worker, vault, stop) = (self.clone(), vault.clone(), stop.clone());
            tasks.spawn(async move {
                worker.revoke_with_retries(&*vault, id, slot, &stop).await;
            });
        }
    }

    /// A creds call starts: revocations make room for it until the guard drops.
    pub(crate) fn issuing(&self) -> Issuing {
        self.pacer.issuing()
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

    /// Revokes `id`, retrying with [`RETRY`] up to [`MAX_ATTEMPTS`] times (or until `stop`).
    /// Each attempt holds a slot of the pacer; a retry waits for one again after its backoff.
    async fn revoke_with_retries(
        &self,
        vault: &dyn LeaseApi,
        id: String,
        first: RevokeSlot,
        stop: &CancellationToken,
    ) {
        let mut backoff = RETRY;
        let mut slot = Some(first);
        for attempt in 1..=MAX_ATTEMPTS {
            let held = match slot.take() {
                Some(s) => s,
                None => match self.pacer.slot(stop).await {
                    Some(s) => s,
                    None => return,
                },
            };
            match vault.revoke(&id).await {
                Ok(()) => {
                    held.succeeded();
                    tracing::debug!(lease_id = %id, attempt, "lease revoked");
                    self.metrics.revocation(LeaseResult::Ok);
                    self.finished(&id);
                    return;
                }
                Err(e) if attempt == MAX_ATTEMPTS => {
                    drop(held);
                    tracing::error!(lease_id = %id, attempts = attempt, error = %e,
                        "lease revocation failed; the credential stays valid until its TTL ends");
                }
                Err(e) => {
                    drop(held);
                    tracing::warn!(lease_id = %id, attempt, error = %e, "lease revocation failed, retrying");
                    let wait = backoff.next_wait(Jitter::random());
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        // Shutting down after the drain: the lease dies at its TTL.
                        () = stop.cancelled() => return,
                    }
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

    /// Every lease a guard holds (sessions, prefetch pools) or a revocation is under way
    /// for: what this instance knows it holds.
    pub(crate) fn held(&self) -> Vec<String> {
        self.ledger.lock().keys().cloned().collect()
    }

    /// At shutdown: waits (at most `limit`) until no guard is alive and no revocation is
    /// pending. Halfway through, leases whose guards are still alive are taken over and
    /// revoked regardless (their sessions are ending with the process). Every lease still
    /// outstanding at the end is logged at ERROR, one line each, and returned.
    pub async fn drain(&self, limit: Duration) -> Vec<String> {
        let start = Instant::now();
        self.pacer.issuance_over();
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
#[path = "lease_tests.rs"]
mod tests;
