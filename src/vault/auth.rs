//! leasegate's own Vault token: logging in (`login`), renewing the token ahead of expiry
//! (`auth/token/renew-self`), logging in again when renewal fails, the token cannot be renewed
//! further or the token file changes, keeping a replaced token renewed while leases it created
//! are still live (Vault revokes a token's leases when the token dies), and revoking a token
//! leasegate logged in for (`auth/token/revoke-self`) once no lease needs it, and at shutdown.
//! When to renew and when a grant is final is the lease clock's decision
//! ([`crate::lease_clock`]); the calls go through [`TokenApi`], so the upkeep's timing is
//! tested with paused time against a script.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use reqwest::Method;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{Body, Renewed, VaultClient};
use super::error::VaultError;
use super::lease::Call;
pub use super::login::login;
use super::login::{LoginResponse, renewal_granted};
use super::token::{Token, TokenStore};
use crate::config::VaultAuth;
use crate::lease_clock::{Backoff, Jitter, later};
use crate::metrics::Metrics;
use crate::metrics::labels::{VaultAuthResult, VaultOp};

/// The token calls the upkeep makes. [`Vault`] is the implementation; the unit tests answer
/// from a script.
pub(crate) trait TokenApi: Send + Sync {
    /// The tokens kept alive.
    fn tokens(&self) -> &TokenStore;
    /// Where renewals, logins and revocations are counted.
    fn metrics(&self) -> &Metrics;
    /// Logs in with the configured method.
    fn login(&self) -> Call<'_, Token>;
    /// `auth/token/renew-self`, asking for the token's TTL at login.
    fn renew_self<'a>(&'a self, token: &'a Token) -> Call<'a, Renewed>;
    /// `auth/token/lookup-self`.
    fn lookup_self<'a>(&'a self, token: &'a Token) -> Call<'a, ()>;
    /// `auth/token/revoke-self`.
    fn revoke_self<'a>(&'a self, token: &'a Token) -> Call<'a, ()>;
}

/// The real token calls: a client and the configured login.
struct Vault<'a> {
    client: &'a VaultClient,
    auth: &'a VaultAuth,
}

impl Vault<'_> {
    /// A call with `token` (not the current one) to a token endpoint.
    async fn call(
        &self,
        op: VaultOp,
        method: Method,
        path: &str,
        body: Option<Body>,
        token: &Token,
    ) -> Result<reqwest::Response, VaultError> {
        let secret = Some(token.secret());
        self.client.request_as(op, method, path, body, secret).await
    }

    async fn renew(&self, token: &Token) -> Result<Renewed, VaultError> {
        let increment = serde_json::json!({ "increment": token.ttl.as_secs() });
        let path = "auth/token/renew-self";
        let resp = self
            .call(
                VaultOp::RenewSelf,
                Method::POST,
                path,
                Some(Body::Json(increment)),
                token,
            )
            .await?;
        let login: LoginResponse = self.client.read_json("renew-self response", resp).await?;
        Ok(Renewed {
            duration: renewal_granted(&login.auth),
            renewable: login.auth.renewable,
        })
    }
}

impl TokenApi for Vault<'_> {
    fn tokens(&self) -> &TokenStore {
        &self.client.tokens
    }

    fn metrics(&self) -> &Metrics {
        &self.client.metrics
    }

    fn login(&self) -> Call<'_, Token> {
        Box::pin(login(self.client, self.auth))
    }

    fn renew_self<'a>(&'a self, token: &'a Token) -> Call<'a, Renewed> {
        Box::pin(self.renew(token))
    }

    fn lookup_self<'a>(&'a self, token: &'a Token) -> Call<'a, ()> {
        let path = "auth/token/lookup-self";
        Box::pin(async move {
            self.call(VaultOp::Lookup, Method::GET, path, None, token)
                .await
                .map(drop)
        })
    }

    fn revoke_self<'a>(&'a self, token: &'a Token) -> Call<'a, ()> {
        let path = "auth/token/revoke-self";
        Box::pin(async move {
            self.call(VaultOp::RevokeSelf, Method::POST, path, None, token)
                .await
                .map(drop)
        })
    }
}

/// `auth/token/revoke-self` for a token leasegate logged in for (operators' tokens are
/// left alone). Vault also revokes whatever leases the token still parents.
async fn revoke_token(api: &dyn TokenApi, token: &Token, why: &'static str) {
    if !token.owned {
        return;
    }
    match api.revoke_self(token).await {
        Ok(()) => {
            api.metrics().vault_auth_renewal(VaultAuthResult::Revoked);
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
pub async fn check_login(client: &VaultClient, auth: &VaultAuth) -> Result<(), VaultError> {
    let api = Vault { client, auth };
    let token = api.login().await?;
    revoke_token(&api, &token, "check-config").await;
    Ok(())
}

/// Revokes the retired tokens that no lease needs any more.
async fn revoke_unused(api: &dyn TokenApi) {
    for token in api.tokens().take_unused() {
        revoke_token(api, &token, "retired token without leases").await;
    }
}

/// Once the upkeep has stopped: revokes every token leasegate logged in for, current and
/// retired (Vault then also revokes any lease they still parent).
async fn logout(api: &dyn TokenApi) {
    for token in api.tokens().take_all() {
        revoke_token(api, &token, "shutdown").await;
    }
}

/// How often the token file is checked for changes, and the longest the upkeep sleeps.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How often Vault is asked whether it still accepts the current token.
const HEALTH_EVERY: Duration = Duration::from_secs(15);
/// Waits between failed logins: from half a second, doubling, at most 30 s.
const LOGIN_RETRY: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// What the configured method lets the upkeep do.
struct Upkeep {
    /// The method's name, for log lines.
    method: &'static str,
    /// Log in again when the current token cannot be renewed any more and is running out
    /// (not for an operator's token: logging in again would only look the same token up).
    replace_final: bool,
    /// The operator's token file, watched for a new token.
    token_file: Option<PathBuf>,
}

impl Upkeep {
    fn of(auth: &VaultAuth) -> Upkeep {
        Upkeep {
            method: auth.method.name(),
            replace_final: !auth.is_token(),
            token_file: auth.token_file().map(Path::to_path_buf),
        }
    }
}

/// Logs in (retrying with backoff until it works), keeps tokens alive until `stop`, then
/// revokes the tokens leasegate logged in for (`maintain` stops only once the leases are
/// done with: at the end of the drain).
pub async fn maintain(client: Arc<VaultClient>, auth: VaultAuth, stop: CancellationToken) {
    let api = Vault {
        client: &client,
        auth: &auth,
    };
    keep(&api, &Upkeep::of(&auth), &stop).await;
}

/// The upkeep until `stop`, then the logout.
async fn keep(api: &dyn TokenApi, upkeep: &Upkeep, stop: &CancellationToken) {
    let mut retry = LOGIN_RETRY;
    let mut token_file = upkeep.token_file.as_deref().map(FileWatch::new);
    let mut last_check = Instant::now();
    loop {
        let mut relogin = renew_due(api, upkeep).await;
        relogin |= token_file.as_mut().is_some_and(FileWatch::changed);
        if !relogin && last_check.elapsed() >= HEALTH_EVERY {
            last_check = Instant::now();
            relogin = !health_check(api).await;
        }
        if relogin {
            if let Err(e) = log_in(api, upkeep.method).await {
                let wait = retry.next_wait(Jitter::random());
                tracing::error!(method = upkeep.method, error = %e, retry_in = ?wait, "Vault login failed");
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = stop.cancelled() => break,
                }
            }
            retry.reset();
        }
        revoke_unused(api).await;
        let next = api
            .tokens()
            .tokens()
            .iter()
            .filter_map(|(t, _)| t.term().next_renew)
            .fold(later(Instant::now(), CHECK_EVERY), Instant::min);
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = stop.cancelled() => break,
        }
    }
    logout(api).await;
}

/// Logs in and installs the new token.
async fn log_in(api: &dyn TokenApi, method: &'static str) -> Result<(), VaultError> {
    match api.login().await {
        Ok(token) => {
            api.metrics().vault_auth_renewal(VaultAuthResult::Login);
            tracing::info!(method, ttl = ?token.ttl, "logged in to Vault");
            api.tokens().install(token);
            Ok(())
        }
        Err(e) => {
            api.metrics().vault_auth_renewal(VaultAuthResult::Error);
            api.tokens().healthy.store(false, Ordering::SeqCst);
            Err(e)
        }
    }
}

/// Renews every token that is due. Returns whether the current token must be replaced: there
/// is none, its renewal failed, or it cannot be renewed any more and is running out.
async fn renew_due(api: &dyn TokenApi, upkeep: &Upkeep) -> bool {
    let mut relogin = api.tokens().current().is_none();
    let now = Instant::now();
    for (token, current) in api.tokens().tokens() {
        let term = token.term();
        if !term.renew_due(now) {
            relogin |= current
                && upkeep.replace_final
                && !term.renewable()
                && term.running_out(now, token.ttl);
            continue;
        }
        match api.renew_self(&token).await {
            Ok(r) => {
                api.metrics().vault_auth_renewal(VaultAuthResult::Ok);
                token.renewed(Instant::now(), r.duration, r.renewable);
            }
            Err(e) => {
                api.metrics().vault_auth_renewal(VaultAuthResult::Error);
                tracing::warn!(error = %e, current, "Vault token renewal failed");
                token.renew_failed(Instant::now());
                relogin |= current;
            }
        }
    }
    relogin
}

/// The token file's modification time as last seen.
struct FileWatch {
    path: PathBuf,
    seen: Option<SystemTime>,
}

impl FileWatch {
    fn new(path: &Path) -> FileWatch {
        FileWatch {
            path: path.to_owned(),
            seen: file_mtime(path),
        }
    }

    /// Whether the file changed since the last look.
    fn changed(&mut self) -> bool {
        let mtime = file_mtime(&self.path);
        if mtime == self.seen {
            return false;
        }
        self.seen = mtime;
        tracing::info!(path = %self.path.display(), "Vault token file changed");
        true
    }
}

fn file_mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Looks up the current token; false when Vault says it is no longer valid. A Vault that
/// cannot be reached is unhealthy but keeps the token (it may come back).
async fn health_check(api: &dyn TokenApi) -> bool {
    let Some(token) = api.tokens().current() else {
        return false;
    };
    let healthy = &api.tokens().healthy;
    match api.lookup_self(&token).await {
        Ok(()) => {
            healthy.store(true, Ordering::SeqCst);
            true
        }
        Err(VaultError::Status { status, .. }) if status.as_u16() == 403 => {
            healthy.store(false, Ordering::SeqCst);
            tracing::warn!("Vault no longer accepts leasegate's token; logging in again");
            false
        }
        Err(e) => {
            healthy.store(false, Ordering::SeqCst);
            tracing::warn!(error = %e, "Vault health check failed");
            true
        }
    }
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
