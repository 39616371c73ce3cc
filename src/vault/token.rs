//! leasegate's own Vault tokens: one token, what is known of its lifetime and whether
//! leasegate owns it (`Token`), and the store of the current token and the replaced ones
//! still parenting leases (`TokenStore`). A leaf: no I/O here; `auth` renews and revokes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use secrecy::SecretString;
use tokio::time::Instant;

use crate::lease_clock::{Jitter, Term};

/// One Vault token and what is known of its lifetime. No `Debug` derive: it holds a secret.
pub struct Token {
    secret: SecretString,
    /// TTL granted at login, also the increment asked for on renewal (zero: never expires).
    pub(super) ttl: Duration,
    /// leasegate logged in for this token (AppRole, cert, Kubernetes), so it revokes it when
    /// no lease needs it any more; an operator's token (`token`, `token_file`, `VAULT_TOKEN`)
    /// is never revoked.
    pub(super) owned: bool,
    /// Its lifetime as last granted and when to renew it (the lease clock decides).
    term: Mutex<Term>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("secret", &"[REDACTED]")
            .field("ttl", &self.ttl)
            .field("owned", &self.owned)
            .finish()
    }
}

impl Token {
    pub(crate) fn new(secret: SecretString, ttl: Duration, renewable: bool, owned: bool) -> Token {
        let term = Term::issued(Instant::now(), ttl, renewable, Jitter::random());
        Token {
            secret,
            ttl,
            owned,
            term: Mutex::new(term),
        }
    }

    /// The token itself.
    pub fn secret(&self) -> &SecretString {
        &self.secret
    }

    /// Its lifetime as known now.
    pub(super) fn term(&self) -> Term {
        *self.lock_term()
    }

    fn lock_term(&self) -> std::sync::MutexGuard<'_, Term> {
        self.term.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a renewal at `now` that granted `granted` (the TTL at login was asked for).
    pub(crate) fn renewed(&self, now: Instant, granted: Duration, renewable: bool) {
        let asked = self.ttl;
        self.lock_term()
            .granted(now, asked, granted, renewable, Jitter::random());
    }

    /// Records a failed renewal at `now` (retried with backoff).
    pub(super) fn renew_failed(&self, now: Instant) {
        self.lock_term().failed(now, Jitter::random());
    }
}

/// The current token, the replaced ones still parenting leases, and Vault's health as the
/// last auth call saw it.
#[derive(Default)]
pub struct TokenStore {
    current: RwLock<Option<Arc<Token>>>,
    retired: Mutex<Vec<Arc<Token>>>,
    pub(super) healthy: AtomicBool,
    installed: tokio::sync::Notify,
}

impl TokenStore {
    /// The token new requests use.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until a token is installed.
    pub async fn wait_current(&self) {
        loop {
            let installed = self.installed.notified();
            if self.current().is_some() {
                return;
            }
            installed.await;
        }
    }

    /// Whether leasegate holds a token that Vault accepted at the last check.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst) && self.current().is_some()
    }

    pub(crate) fn install(&self, token: Token) {
        let old = self
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .replace(Arc::new(token));
        if let Some(old) = old {
            self.retired
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(old);
        }
        self.healthy.store(true, Ordering::SeqCst);
        self.installed.notify_waiters();
    }

    fn lock_retired(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Token>>> {
        self.retired.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every token to keep renewed: the current one and retired ones with live leases.
    pub(super) fn tokens(&self) -> Vec<(Arc<Token>, bool)> {
        let retired = self.lock_retired();
        let mut all: Vec<_> = retired
            .iter()
            .filter(|t| Arc::strong_count(t) > 1)
            .map(|t| (t.clone(), false))
            .collect();
        drop(retired);
        all.extend(self.current().map(|t| (t, true)));
        all
    }

    /// Removes and returns the retired tokens no lease needs any more. A retired token
    /// referenced only by this list parents no live lease, and nothing can take a new
    /// reference to it while the list is locked.
    pub(super) fn take_unused(&self) -> Vec<Arc<Token>> {
        let mut retired = self.lock_retired();
        let (unused, kept) = retired.drain(..).partition(|t| Arc::strong_count(t) == 1);
        *retired = kept;
        unused
    }

    /// Removes and returns every token, current and retired (shutdown).
    pub(super) fn take_all(&self) -> Vec<Arc<Token>> {
        let mut all = std::mem::take(&mut *self.lock_retired());
        let current = self
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        all.extend(current);
        self.healthy.store(false, Ordering::SeqCst);
        all
    }

    /// Number of replaced tokens still kept alive for their leases.
    pub fn retired_count(&self) -> usize {
        self.tokens().iter().filter(|(_, current)| !current).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn token_debug_is_redacted() {
        let t = Token::new(
            SecretString::from("hvs.secret".to_owned()),
            Duration::from_secs(60),
            true,
            true,
        );
        assert!(!format!("{t:?}").contains("hvs.secret"));
    }

    #[test]
    fn retired_tokens_live_while_leases_hold_them() {
        let store = TokenStore::default();
        store.install(Token::new(
            SecretString::from("a".to_owned()),
            Duration::ZERO,
            false,
            true,
        ));
        let held = store.current().expect("current");
        store.install(Token::new(
            SecretString::from("b".to_owned()),
            Duration::ZERO,
            false,
            true,
        ));
        assert_eq!(store.retired_count(), 1);
        assert!(store.take_unused().is_empty(), "a lease still needs it");
        drop(held);
        assert_eq!(store.retired_count(), 0);
        let unused = store.take_unused();
        assert_eq!(unused.len(), 1);
        assert_eq!(unused[0].secret().expose_secret(), "a");
        assert!(store.take_unused().is_empty(), "taken once");
        let all = store.take_all();
        assert_eq!(all.len(), 1);
        assert!(store.current().is_none());
    }
}
