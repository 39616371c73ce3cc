//! A session's lease and the guarantee that it is revoked. A [`LeaseGuard`] exists from the
//! moment Vault issued the credential; dropping it (on any path, success or failure) hands the
//! lease id to the [`Revoker`], which revokes off the session's task with bounded retries and
//! exponential backoff with jitter.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::RngExt;
use secrecy::SecretString;
use tokio::sync::{Notify, mpsc};

use super::auth::Token;
use super::client::VaultClient;
use crate::metrics::Metrics;

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
            self.revoker.enqueue(id);
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.revoker.enqueue(id);
        }
    }
}

/// Most revocation attempts per lease before giving up (the lease then dies at its TTL).
const MAX_ATTEMPTS: u32 = 8;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Most revocations talking to Vault at once.
const MAX_IN_FLIGHT: usize = 32;

/// Revokes leases in the background. Cloning shares the queue.
#[derive(Clone)]
pub struct Revoker {
    tx: mpsc::UnboundedSender<String>,
    pending: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl Revoker {
    /// Starts the revoker task on the current runtime.
    pub fn spawn(vault: Arc<VaultClient>, metrics: Arc<Metrics>) -> Revoker {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let revoker = Revoker {
            tx,
            pending: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(Notify::new()),
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
        self.metrics.leases_active.inc();
        self.metrics.leases_issued_total.inc();
        LeaseGuard {
            id: Some(lease.id.clone()),
            revoker: self.clone(),
            _parent: lease.parent.clone(),
        }
    }

    fn enqueue(&self, id: String) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.metrics.revocations_pending.inc();
        if self.tx.send(id).is_err() {
            // The runtime is gone; nothing can revoke any more. The lease dies at its TTL.
            self.finished();
        }
    }

    fn finished(&self) {
        self.metrics.leases_active.dec();
        self.metrics.revocations_pending.dec();
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    async fn revoke_with_retries(&self, vault: &VaultClient, id: String) {
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=MAX_ATTEMPTS {
            match vault.revoke(&id).await {
                Ok(()) => {
                    tracing::debug!(lease_id = %id, attempt, "lease revoked");
                    self.metrics.revocation("ok");
                    self.finished();
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
        self.metrics.revocation("error");
        self.finished();
    }

    /// Revocations queued or in flight.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Waits until nothing is pending, or `limit` passes; returns what is still pending.
    pub async fn drain(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.idle.notified();
            if self.pending() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return self.pending();
            }
        }
    }
}
