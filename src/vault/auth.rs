//! leasegate's own Vault token: logging in (`login`), renewing the token ahead of expiry
//! (`auth/token/renew-self`), logging in again when renewal fails or the token file changes,
//! keeping a replaced token renewed while leases it created are still live (Vault revokes a
//! token's leases when the token dies), and revoking a token leasegate logged in for
//! (`auth/token/revoke-self`) once no lease needs it, and at shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use reqwest::Method;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{Body, VaultClient};
use super::duration::later;
use super::error::VaultError;
pub use super::login::login;
use super::login::{LoginResponse, renewal_granted};
use super::token::Token;
use crate::config::VaultAuth;
use crate::metrics::labels::{VaultAuthResult, VaultOp};

/// `auth/token/renew-self` for one token; updates its expiry.
async fn renew(client: &VaultClient, token: &Token) -> Result<(), VaultError> {
    let resp = client
        .request_as(
            VaultOp::RenewSelf,
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
            VaultOp::RevokeSelf,
            Method::POST,
            "auth/token/revoke-self",
            None,
            Some(token.secret()),
        )
        .await;
    match result {
        Ok(_) => {
            client.metrics.vault_auth_renewal(VaultAuthResult::Revoked);
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
pub async fn maintain(client: Arc<VaultClient>, auth: VaultAuth, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(500);
    let mut token_file_mtime = auth.token_file().and_then(file_mtime);
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
                    && !auth.is_token()
                {
                    relogin = true;
                }
                continue;
            }
            match renew(&client, &token).await {
                Ok(()) => client.metrics.vault_auth_renewal(VaultAuthResult::Ok),
                Err(e) => {
                    client.metrics.vault_auth_renewal(VaultAuthResult::Error);
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
        if let Some(path) = auth.token_file() {
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
                    client.metrics.vault_auth_renewal(VaultAuthResult::Login);
                    tracing::info!(method = auth.method.name(), ttl = ?token.ttl, "logged in to Vault");
                    client.tokens.install(token);
                    backoff = Duration::from_millis(500);
                }
                Err(e) => {
                    client.metrics.vault_auth_renewal(VaultAuthResult::Error);
                    client.tokens.healthy.store(false, Ordering::SeqCst);
                    tracing::error!(method = auth.method.name(), error = %e, retry_in = ?backoff, "Vault login failed");
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
            VaultOp::Lookup,
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
