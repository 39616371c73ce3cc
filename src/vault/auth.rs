//! leasegate's own Vault token: logging in (`login`), renewing the token ahead of expiry
//! (`auth/token/renew-self`), logging in again when renewal fails or the token file changes,
//! keeping a replaced token renewed while leases it created are still live (Vault revokes a
//! token's leases when the token dies), and revoking a token leasegate logged in for
//! (`auth/token/revoke-self`) once no lease needs it, and at shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use reqwest::Method;
use secrecy::SecretString;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{Body, VaultClient, VaultError};
use super::duration::later;
pub use super::login::login;
use super::login::{LoginResponse, renewal_granted};
use crate::config::{AuthMethod, VaultAuthConfig};

/// One Vault token and what is known of its lifetime. No `Debug` derive: it holds a secret.
pub struct Token {
    secret: SecretString,
    /// TTL granted at login, also the increment asked for on renewal (zero: never expires).
    ttl: Duration,
    /// leasegate logged in for this token (AppRole, cert, Kubernetes), so it revokes it when
    /// no lease needs it any more; an operator's token (`token`, `token_file`, `VAULT_TOKEN`)
    /// is never revoked.
    owned: bool,
    state: Mutex<TokenState>,
}

#[derive(Clone, Copy)]
struct TokenState {
    /// When the token expires; `None` for tokens without TTL (root, non-expiring).
    expires: Option<Instant>,
    renewable: bool,
    next_renew: Option<Instant>,
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
        let now = Instant::now();
        let expires = (!ttl.is_zero()).then(|| later(now, ttl));
        Token {
            secret,
            ttl,
            owned,
            state: Mutex::new(TokenState {
                expires,
                renewable: renewable && expires.is_some(),
                next_renew: expires.map(|e| renew_at(now, e)),
            }),
        }
    }

    /// The token itself.
    pub fn secret(&self) -> &SecretString {
        &self.secret
    }

    fn state(&self) -> TokenState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, f: impl FnOnce(&mut TokenState)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Records a renewal at `now` that granted `granted`.
    pub(crate) fn renewed(&self, now: Instant, granted: Duration, renewable: bool) {
        self.set_state(|s| {
            let expires = later(now, granted);
            s.expires = Some(expires);
            // Capped below what was asked for: the token is near its max TTL.
            s.renewable = renewable && granted.saturating_add(Duration::from_secs(1)) >= self.ttl;
            s.next_renew = s.renewable.then(|| renew_at(now, expires));
        });
    }
}

fn renew_at(now: Instant, expires: Instant) -> Instant {
    later(now, expires.saturating_duration_since(now) * 2 / 3)
}

/// The current token, the replaced ones still parenting leases, and Vault's health as the
/// last auth call saw it.
#[derive(Default)]
pub struct TokenStore {
    current: RwLock<Option<Arc<Token>>>,
    retired: Mutex<Vec<Arc<Token>>>,
    healthy: AtomicBool,
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
    fn tokens(&self) -> Vec<(Arc<Token>, bool)> {
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
    fn take_unused(&self) -> Vec<Arc<Token>> {
        let mut retired = self.lock_retired();
        let (unused, kept) = retired.drain(..).partition(|t| Arc::strong_count(t) == 1);
        *retired = kept;
        unused
    }

    /// Removes and returns every token, current and retired (shutdown).
    fn take_all(&self) -> Vec<Arc<Token>> {
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

/// `auth/token/renew-self` for one token; updates its expiry.
async fn renew(client: &VaultClient, token: &Token) -> Result<(), VaultError> {
    let resp = client
        .request_as(
            "renew_self",
            Method::POST,
            "auth/token/renew-self",
            Some(Body::Json(
                serde_json::json!({ "increment": token.ttl.as_secs() }),
            )),
            Some(token.secret()),
        )
        .await?;
    let login: LoginResponse = client.read_json("renew-self response", resp).await?;
    token.renewed(
        Instant::now(),
        renewal_granted(&login.auth),
        login.auth.renewable,
    );
    Ok(())
}

/// `auth/token/revoke-self` for a token leasegate logged in for (operators' tokens are
/// left alone). Vault also revokes whatever leases the token still parents.
async fn revoke_token(client: &VaultClient, token: &Token, why: &'static str) {
    if !token.owned {
        return;
    }
    let result = client
        .request_as(
            "revoke_self",
            Method::POST,
            "auth/token/revoke-self",
            None,
            Some(token.secret()),
        )
        .await;
    match result {
        Ok(_) => {
            client.metrics.vault_auth_renewal("revoked");
            tracing::info!(why, "Vault token revoked");
        }
        // Vault no longer knows the token: nothing left to revoke.
        Err(VaultError::Status { status, .. }) if status.as_u16() == 403 => {
            tracing::debug!(why, "Vault token was already invalid");
        }
        Err(e) => {
            tracing::warn!(why, error = %e, "Vault token revocation failed; it expires at its TTL");
        }
    }
}

/// Logs in once as leasegate would, then revokes the token again if leasegate owns it
/// (`check-config --online` must not leave tokens behind).
pub async fn check_login(client: &VaultClient, auth: &VaultAuthConfig) -> Result<(), VaultError> {
    let token = login(client, auth).await?;
    revoke_token(client, &token, "check-config").await;
    Ok(())
}

/// Revokes the retired tokens that no lease needs any more.
async fn revoke_unused(client: &VaultClient) {
    for token in client.tokens.take_unused() {
        revoke_token(client, &token, "retired token without leases").await;
    }
}

/// At shutdown, after the leases are revoked and `maintain` has stopped: revokes every token
/// leasegate logged in for, current and retired (Vault then also revokes any lease they
/// still parent).
pub async fn logout(client: &VaultClient) {
    for token in client.tokens.take_all() {
        revoke_token(client, &token, "shutdown").await;
    }
}

fn file_mtime(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// How often the token file is checked for changes and Vault's health is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Logs in (retrying with backoff until it works), then keeps tokens alive until `stop`.
pub async fn maintain(client: Arc<VaultClient>, auth: VaultAuthConfig, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(500);
    let mut token_file_mtime = auth.token_file.as_deref().and_then(file_mtime);
    let mut last_check = Instant::now();
    loop {
        let mut relogin = client.tokens.current().is_none();
        // Renew every token that is due.
        let now = Instant::now();
        for (token, current) in client.tokens.tokens() {
            let state = token.state();
            if state.next_renew.is_none_or(|at| now < at) {
                // Not renewable any more and close to expiry: replace the current token.
                if current
                    && !state.renewable
                    && state
                        .expires
                        .is_some_and(|e| e.saturating_duration_since(now) < token.ttl / 3)
                    && auth.method != AuthMethod::Token
                {
                    relogin = true;
                }
                continue;
            }
            match renew(&client, &token).await {
                Ok(()) => client.metrics.vault_auth_renewal("ok"),
                Err(e) => {
                    client.metrics.vault_auth_renewal("error");
                    tracing::warn!(error = %e, current, "Vault token renewal failed");
                    // Retry well before the token expires.
                    token.set_state(|s| {
                        let now = Instant::now();
                        let left = s.expires.map(|e| e.saturating_duration_since(now));
                        let wait = left.map_or(CHECK_EVERY, |left| {
                            (left / 4).clamp(Duration::from_millis(250), CHECK_EVERY)
                        });
                        s.next_renew = Some(later(now, wait));
                    });
                    relogin |= current;
                }
            }
        }
        if let Some(path) = &auth.token_file {
            let mtime = file_mtime(path);
            if mtime != token_file_mtime {
                token_file_mtime = mtime;
                tracing::info!(path = %path.display(), "Vault token file changed");
                relogin = true;
            }
        }
        if !relogin && last_check.elapsed() >= CHECK_EVERY * 3 {
            last_check = Instant::now();
            relogin = !health_check(&client).await;
        }
        if relogin {
            match login(&client, &auth).await {
                Ok(token) => {
                    client.metrics.vault_auth_renewal("login");
                    tracing::info!(method = ?auth.method, ttl = ?token.ttl, "logged in to Vault");
                    client.tokens.install(token);
                    backoff = Duration::from_millis(500);
                }
                Err(e) => {
                    client.metrics.vault_auth_renewal("error");
                    client.tokens.healthy.store(false, Ordering::SeqCst);
                    tracing::error!(method = ?auth.method, error = %e, retry_in = ?backoff, "Vault login failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            }
        }
        revoke_unused(&client).await;
        let next = client
            .tokens
            .tokens()
            .iter()
            .filter_map(|(t, _)| t.state().next_renew)
            .fold(later(Instant::now(), CHECK_EVERY), Instant::min);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Looks up the current token; false when Vault says it is no longer valid. A Vault that
/// cannot be reached is unhealthy but keeps the token (it may come back).
async fn health_check(client: &VaultClient) -> bool {
    let Some(token) = client.tokens.current() else {
        return false;
    };
    let result = client
        .request_as(
            "lookup",
            Method::GET,
            "auth/token/lookup-self",
            None,
            Some(token.secret()),
        )
        .await;
    match result {
        Ok(_) => {
            client.tokens.healthy.store(true, Ordering::SeqCst);
            true
        }
        Err(VaultError::Status { status, .. }) if status.as_u16() == 403 => {
            client.tokens.healthy.store(false, Ordering::SeqCst);
            tracing::warn!("Vault no longer accepts leasegate's token; logging in again");
            false
        }
        Err(e) => {
            client.tokens.healthy.store(false, Ordering::SeqCst);
            tracing::warn!(error = %e, "Vault health check failed");
            true
        }
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
