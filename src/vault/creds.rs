//! The creds call: a fresh database credential and the guard of its lease. It is an
//! `impl VaultClient` of its own because it guards the lease with the [`Revoker`], which sits
//! above the HTTP client (the revoker calls the client to revoke).

use reqwest::Method;
use secrecy::SecretString;
use serde::Deserialize;

use super::body::{self, lease_id_in};
use super::client::VaultClient;
use super::error::VaultError;
use super::lease::{Lease, LeaseGuard, Revoker};
use crate::lease_clock::from_vault_secs;
use crate::metrics::labels::VaultOp;

#[derive(Deserialize)]
struct CredsResponse {
    lease_id: String,
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
    data: CredsData,
}

#[derive(Deserialize)]
struct CredsData {
    username: String,
    password: SecretString,
}

impl VaultClient {
    /// `GET /v1/<mount>/creds/<role>`: a fresh database credential and the guard of its
    /// lease. Never retried here: a retry after a timeout could create a second role nobody
    /// revokes. The lease id is taken from the body first (from a broken or cut-off body too,
    /// as far as it can be found) and guarded before anything else is parsed, so a 2xx
    /// answer whose body fails still has its lease revoked.
    pub async fn creds(
        &self,
        mount: &str,
        role: &str,
        revoker: &Revoker,
    ) -> Result<(Lease, LeaseGuard), VaultError> {
        let token = self.tokens.current().ok_or(VaultError::NoToken)?;
        // Revocations make room while this call is in flight, and learn how long it took.
        let _issuing = revoker.issuing();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let resp = self
            .request_as(
                VaultOp::Creds,
                Method::GET,
                &format!("{mount}/creds/{role}"),
                None,
                Some(token.secret()),
            )
            .await?;
        let (body, failed) = match body::read(resp, deadline, self.timeout).await {
            Ok(body) => (body, None),
            Err((partial, e)) => (partial, Some(e)),
        };
        // From here on the lease exists in Vault: guard it before anything else can fail.
        let guard = lease_id_in(&body).map(|id| revoker.guard_id(id, token.clone()));
        let parsed = match failed {
            Some(e) => Err(e),
            None => body::parse::<CredsResponse>("creds response", &body),
        };
        let result = match (parsed, guard) {
            (Ok(parsed), Some(guard)) => Ok((parsed, guard)),
            (Ok(_), None) => Err(VaultError::Malformed(
                "creds response without lease_id".into(),
            )),
            (Err(e), Some(guard)) => {
                tracing::warn!(lease_id = %guard.id(), error = %e,
                    "broken creds answer after Vault issued the lease: revoking it");
                Err(e)
            }
            (Err(e), None) => {
                tracing::error!(error = %e,
                    "broken creds answer without a readable lease_id: if Vault issued a \
                     credential, it stays valid until its TTL ends");
                Err(e)
            }
        };
        let (parsed, guard) = result?;
        let lease = Lease {
            id: parsed.lease_id,
            duration: from_vault_secs(parsed.lease_duration),
            renewable: parsed.renewable,
            username: parsed.data.username,
            password: parsed.data.password,
            parent: token,
        };
        Ok((lease, guard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_lease_durations_parse_clamped() {
        let body = format!(
            r#"{{"lease_id":"x","lease_duration":{},"renewable":true,"data":{{"username":"u","password":"p"}}}}"#,
            u64::MAX
        );
        let parsed: CredsResponse = body::parse("creds", body.as_bytes()).expect("parses");
        assert_eq!(
            from_vault_secs(parsed.lease_duration),
            crate::lease_clock::MAX_VAULT_DURATION
        );
    }
}
