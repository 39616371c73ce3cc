//! How leasegate gets its Vault token: the configured token (looked up, never revoked by
//! leasegate: it belongs to the operator) or a login (AppRole, cert, Kubernetes) whose token
//! leasegate owns. Login secrets (the secret_id, the JWT) are read into zeroizing memory and
//! serialised once into a zeroizing request body; no plain JSON value or string holds them.

use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::body::SecretBody;
use super::client::{Body, VaultClient, load_token};
use super::error::VaultError;
use super::token::Token;
use crate::config::{AuthMethod, RoleId, VaultAuth};
use crate::lease_clock::from_vault_secs;
use crate::metrics::labels::VaultOp;

/// A login or renew-self answer.
#[derive(Deserialize)]
pub(crate) struct LoginResponse {
    pub(crate) auth: AuthBody,
}

/// Its `auth` object. No `Debug`: it holds the token.
#[derive(Deserialize)]
pub(crate) struct AuthBody {
    client_token: SecretString,
    /// Token TTL in seconds (clamped when used).
    #[serde(default)]
    pub(crate) lease_duration: u64,
    /// Whether the token can be renewed.
    #[serde(default)]
    pub(crate) renewable: bool,
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

/// The AppRole login body. No `Debug`.
#[derive(Serialize)]
struct AppRoleLogin<'a> {
    role_id: &'a str,
    secret_id: &'a str,
}

/// The Kubernetes login body. No `Debug`.
#[derive(Serialize)]
struct KubernetesLogin<'a> {
    role: &'a str,
    jwt: &'a str,
}

/// A file holding a secret, trimmed; the text read is wiped, only the secret is kept.
fn read_secret_file(path: &Path) -> Result<SecretString, VaultError> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| VaultError::TokenFile(path.display().to_string(), e))?,
    );
    Ok(SecretString::from(text.trim().to_owned()))
}

/// Logs in with the configured method and returns the new token.
pub async fn login(client: &VaultClient, auth: &VaultAuth) -> Result<Token, VaultError> {
    let body = match &auth.method {
        AuthMethod::Token { .. } => return lookup(client, load_token(auth)?).await,
        AuthMethod::Approle {
            role_id,
            secret_id_file,
        } => approle_body(role_id, secret_id_file)?,
        AuthMethod::Cert { role, .. } => Body::Json(match role {
            Some(name) => serde_json::json!({ "name": name }),
            None => serde_json::json!({}),
        }),
        AuthMethod::Kubernetes { role, jwt_file } => Body::Secret(kubernetes_body(role, jwt_file)?),
    };
    let path = format!("auth/{}/login", auth.mount());
    let resp = client
        .request_as(VaultOp::Login, Method::POST, &path, Some(body), None)
        .await?;
    let login: LoginResponse = client.read_json("login response", resp).await?;
    Ok(token_from_login(login.auth, true))
}

/// The token a login answer carries; `owned`: leasegate logged in for it, so it revokes it
/// when done with it.
fn token_from_login(auth: AuthBody, owned: bool) -> Token {
    Token::new(
        auth.client_token,
        from_vault_secs(auth.lease_duration),
        auth.renewable,
        owned,
    )
}

/// The AppRole login body: the role ID and the secret ID read from its file.
fn approle_body(role_id: &RoleId, secret_id_file: &Path) -> Result<Body, VaultError> {
    let role_id = match role_id {
        RoleId::Inline(id) => SecretString::from(id.clone()),
        RoleId::File(path) => read_secret_file(path)?,
    };
    let secret_id = read_secret_file(secret_id_file)?;
    let (role_id, secret_id) = (role_id.expose_secret(), secret_id.expose_secret());
    let login = AppRoleLogin { role_id, secret_id };
    Ok(Body::Secret(SecretBody::json(
        &login,
        role_id.len() + secret_id.len(),
    )?))
}

/// The Kubernetes login body: the configured role and the service-account JWT.
pub(crate) fn kubernetes_body(role: &str, jwt_file: &Path) -> Result<SecretBody, VaultError> {
    let jwt = read_secret_file(jwt_file)?;
    let jwt = jwt.expose_secret();
    SecretBody::json(&KubernetesLogin { role, jwt }, role.len() + jwt.len())
}

/// `auth/token/lookup-self`: what Vault knows of the operator's token.
async fn lookup(client: &VaultClient, secret: SecretString) -> Result<Token, VaultError> {
    let resp = client
        .request_as(
            VaultOp::Lookup,
            Method::GET,
            "auth/token/lookup-self",
            None,
            Some(&secret),
        )
        .await?;
    let data: LookupResponse = client.read_json("lookup-self response", resp).await?;
    Ok(token_from_lookup(secret, data.data))
}

fn token_from_lookup(secret: SecretString, data: LookupData) -> Token {
    Token::new(secret, from_vault_secs(data.ttl), data.renewable, false)
}

/// How long a token renewal granted, from a renew-self answer.
pub(crate) fn renewal_granted(auth: &AuthBody) -> Duration {
    from_vault_secs(auth.lease_duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::body;

    fn parsed(body: &SecretBody) -> serde_json::Value {
        serde_json::from_slice(body.as_slice()).expect("JSON")
    }

    #[test]
    fn kubernetes_login_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let jwt = dir.path().join("token");
        std::fs::write(&jwt, "eyJhbGciOi.payload.sig\n").expect("write");
        let text = format!(
            "method = \"kubernetes\"\nrole = \"leasegate\"\njwt_file = {:?}\n",
            jwt.display().to_string()
        );
        let auth: VaultAuth = toml::from_str(&text).expect("parses");
        assert_eq!(auth.mount(), "kubernetes");
        let AuthMethod::Kubernetes { role, jwt_file } = &auth.method else {
            panic!("kubernetes: {:?}", auth.method);
        };
        let body = kubernetes_body(role, jwt_file).expect("body");
        assert_eq!(
            parsed(&body),
            serde_json::json!({ "role": "leasegate", "jwt": "eyJhbGciOi.payload.sig" })
        );
    }

    #[test]
    fn approle_login_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret-id");
        std::fs::write(&secret, "9f1c-secret\n").expect("write");
        let text = format!(
            "method = \"approle\"\nrole_id = \"r-1\"\nsecret_id_file = {:?}\n",
            secret.display().to_string()
        );
        let auth: VaultAuth = toml::from_str(&text).expect("parses");
        let AuthMethod::Approle {
            role_id,
            secret_id_file,
        } = &auth.method
        else {
            panic!("approle: {:?}", auth.method);
        };
        let Body::Secret(body) = approle_body(role_id, secret_id_file).expect("body") else {
            panic!("the AppRole body holds a secret");
        };
        assert_eq!(
            parsed(&body),
            serde_json::json!({ "role_id": "r-1", "secret_id": "9f1c-secret" })
        );
    }

    #[test]
    fn absurd_token_ttls_do_not_panic() {
        let max = u64::MAX;
        let text = format!(
            r#"{{"auth":{{"client_token":"hvs.x","lease_duration":{max},"renewable":true}}}}"#
        );
        let login: LoginResponse = body::parse("login", text.as_bytes()).expect("parses");
        assert_eq!(
            renewal_granted(&login.auth),
            crate::lease_clock::MAX_VAULT_DURATION
        );
        let token = token_from_login(login.auth, true);
        token.renewed(tokio::time::Instant::now(), Duration::MAX, true);
        let text = format!(r#"{{"data":{{"ttl":{max},"renewable":true}}}}"#);
        let lookup: LookupResponse = body::parse("lookup", text.as_bytes()).expect("parses");
        let token = token_from_lookup(SecretString::from("hvs.y".to_owned()), lookup.data);
        token.renewed(tokio::time::Instant::now(), from_vault_secs(u64::MAX), true);
    }
}
