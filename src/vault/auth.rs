//! leasegate's own Vault token: logging in (token, AppRole, cert, Kubernetes), renewing the
//! token ahead of expiry (`auth/token/renew-self`), logging in again when renewal fails or
//! the token file changes, and keeping a replaced token renewed while leases it created are
//! still live (Vault revokes a token's leases when the token dies).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{VaultClient, VaultError, load_token};
use crate::config::{AuthMethod, VaultAuthConfig};

/// One Vault token and what is known of its lifetime. No `Debug` derive: it holds a secret.
pub struct Token {
    secret: SecretString,
    /// TTL granted at login, also the increment asked for on renewal (zero: never expires).
    ttl: Duration,
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
            .finish()
    }
}

impl Token {
    fn new(secret: SecretString, ttl: Duration, renewable: bool) -> Token {
        let now = Instant::now();
        let expires = (!ttl.is_zero()).then(|| now + ttl);
        Token {
            secret,
            ttl,
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
}

fn renew_at(now: Instant, expires: Instant) -> Instant {
    now + expires.saturating_duration_since(now) * 2 / 3
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

    fn install(&self, token: Token) {
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

    /// Every token to keep renewed: the current one and retired ones with live leases.
    fn tokens(&self) -> Vec<(Arc<Token>, bool)> {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        // A retired token referenced only by this list parents no live lease any more.
        retired.retain(|t| Arc::strong_count(t) > 1);
        let mut all: Vec<_> = retired.iter().map(|t| (t.clone(), false)).collect();
        all.extend(self.current().map(|t| (t, true)));
        all
    }

    /// Number of replaced tokens still kept alive for their leases.
    pub fn retired_count(&self) -> usize {
        self.tokens().iter().filter(|(_, current)| !current).count()
    }
}

#[derive(Deserialize)]
struct LoginResponse {
    auth: AuthBody,
}

#[derive(Deserialize)]
struct AuthBody {
    client_token: SecretString,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

#[derive(Deserialize)]
struct LookupResponse {
    data: LookupData,
}

#[derive(Deserialize)]
struct LookupData {
    #[serde(default)]
    ttl: u64,
    #[serde(default)]
    renewable: bool,
}

fn read_secret_file(path: &std::path::Path) -> Result<SecretString, VaultError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| VaultError::TokenFile(path.display().to_string(), e))?;
    Ok(SecretString::from(text.trim().to_owned()))
}

/// Logs in with the configured method and returns the new token.
pub async fn login(client: &VaultClient, auth: &VaultAuthConfig) -> Result<Token, VaultError> {
    let body = match auth.method {
        AuthMethod::Token => return lookup(client, load_token(auth)?).await,
        AuthMethod::Approle => {
            let role_id = match (&auth.role_id, &auth.role_id_file) {
                (Some(id), _) => id.clone(),
                (None, Some(path)) => read_secret_file(path)?.expose_secret().to_owned(),
                (None, None) => return Err(VaultError::Setup("approle needs role_id".into())),
            };
            let secret_path = auth
                .secret_id_file
                .as_ref()
                .ok_or_else(|| VaultError::Setup("approle needs secret_id_file".into()))?;
            let secret_id = read_secret_file(secret_path)?;
            serde_json::json!({ "role_id": role_id, "secret_id": secret_id.expose_secret() })
        }
        AuthMethod::Cert => match &auth.role {
            Some(name) => serde_json::json!({ "name": name }),
            None => serde_json::json!({}),
        },
        AuthMethod::Kubernetes => kubernetes_body(auth)?,
    };
    let path = format!("auth/{}/login", auth.mount());
    let resp = client
        .request_as("login", Method::POST, &path, Some(body), None)
        .await?;
    let login: LoginResponse = resp
        .json()
        .await
        .map_err(|e| VaultError::Malformed(format!("login response: {e}")))?;
    Ok(Token::new(
        login.auth.client_token,
        Duration::from_secs(login.auth.lease_duration),
        login.auth.renewable,
    ))
}

/// The Kubernetes login body: the configured role and the service-account JWT.
pub fn kubernetes_body(auth: &VaultAuthConfig) -> Result<serde_json::Value, VaultError> {
    let role = auth
        .role
        .as_ref()
        .ok_or_else(|| VaultError::Setup("kubernetes needs role".into()))?;
    let jwt = read_secret_file(&auth.jwt_file)?;
    Ok(serde_json::json!({ "role": role, "jwt": jwt.expose_secret() }))
}

/// `auth/token/lookup-self`: what Vault knows of a given token.
async fn lookup(client: &VaultClient, secret: SecretString) -> Result<Token, VaultError> {
    let resp = client
        .request_as(
            "lookup",
            Method::GET,
            "auth/token/lookup-self",
            None,
            Some(&secret),
        )
        .await?;
    let data: LookupResponse = resp
        .json()
        .await
        .map_err(|e| VaultError::Malformed(format!("lookup-self response: {e}")))?;
    Ok(Token::new(
        secret,
        Duration::from_secs(data.data.ttl),
        data.data.renewable,
    ))
}

/// `auth/token/renew-self` for one token; updates its expiry.
async fn renew(client: &VaultClient, token: &Token) -> Result<(), VaultError> {
    let resp = client
        .request_as(
            "renew_self",
            Method::POST,
            "auth/token/renew-self",
            Some(serde_json::json!({ "increment": token.ttl.as_secs() })),
            Some(token.secret()),
        )
        .await?;
    let login: LoginResponse = resp
        .json()
        .await
        .map_err(|e| VaultError::Malformed(format!("renew-self response: {e}")))?;
    let now = Instant::now();
    let granted = Duration::from_secs(login.auth.lease_duration);
    token.set_state(|s| {
        s.expires = Some(now + granted);
        // Capped below what was asked for: the token is near its max TTL.
        s.renewable = login.auth.renewable && granted + Duration::from_secs(1) >= token.ttl;
        s.next_renew = s.renewable.then(|| renew_at(now, now + granted));
    });
    Ok(())
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
                    token.set_state(|s| {
                        s.next_renew = Some(Instant::now() + CHECK_EVERY);
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
        let next = client
            .tokens
            .tokens()
            .iter()
            .filter_map(|(t, _)| t.state().next_renew)
            .fold(Instant::now() + CHECK_EVERY, Instant::min);
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

    #[test]
    fn kubernetes_login_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let jwt = dir.path().join("token");
        std::fs::write(&jwt, "eyJhbGciOi.payload.sig\n").expect("write");
        let text = format!(
            "method = \"kubernetes\"\nrole = \"leasegate\"\njwt_file = {:?}\n",
            jwt.display().to_string()
        );
        let auth: VaultAuthConfig = toml::from_str(&text).expect("parses");
        assert_eq!(auth.mount(), "kubernetes");
        let body = kubernetes_body(&auth).expect("body");
        assert_eq!(
            body,
            serde_json::json!({ "role": "leasegate", "jwt": "eyJhbGciOi.payload.sig" })
        );
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = Token::new(
            SecretString::from("hvs.secret".to_owned()),
            Duration::from_secs(60),
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
        ));
        let held = store.current().expect("current");
        store.install(Token::new(
            SecretString::from("b".to_owned()),
            Duration::ZERO,
            false,
        ));
        assert_eq!(store.retired_count(), 1);
        drop(held);
        assert_eq!(store.retired_count(), 0);
    }
}
