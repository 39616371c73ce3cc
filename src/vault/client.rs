//! Hand-written Vault HTTP calls: lease ids, durations and renewability matter here, and
//! generic client crates drop them. Every request runs under the configured timeout; the
//! connection pool is reused across sessions. Error bodies are logged, never shown to clients.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::auth::TokenStore;
use super::lease::Lease;
use crate::config::{AuthMethod, VaultAuthConfig, VaultConfig};
use crate::metrics::Metrics;
use std::sync::Arc;

/// Failures talking to Vault.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// No token could be found in config, token_file or VAULT_TOKEN.
    #[error("no Vault token: set vault.auth.token, vault.auth.token_file or VAULT_TOKEN")]
    NoToken,
    /// The token file could not be read.
    #[error("cannot read Vault token file {0}: {1}")]
    TokenFile(String, std::io::Error),
    /// The CA bundle or client could not be set up.
    #[error("Vault client setup: {0}")]
    Setup(String),
    /// The request did not complete in time.
    #[error("Vault did not answer within {0:?}")]
    Timeout(Duration),
    /// Connection refused, reset, DNS failure, TLS failure.
    #[error("Vault unreachable: {0}")]
    Unreachable(String),
    /// Vault answered with an error status.
    #[error("Vault answered {status}: {detail}")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// Vault's `errors` array, joined (for logs only).
        detail: String,
    },
    /// The answer did not have the expected shape.
    #[error("unexpected Vault answer: {0}")]
    Malformed(String),
}

impl VaultError {
    /// Short, client-safe description (no Vault bodies, tokens or addresses).
    pub fn client_reason(&self) -> String {
        match self {
            VaultError::Timeout(d) => format!("Vault did not answer within {d:?}"),
            VaultError::Unreachable(_) => "Vault is unreachable".into(),
            VaultError::Status { status, .. } => {
                format!("Vault refused the request (HTTP {})", status.as_u16())
            }
            VaultError::Malformed(_) => "Vault sent an unexpected answer".into(),
            VaultError::NoToken | VaultError::TokenFile(..) | VaultError::Setup(_) => {
                "leasegate has no usable Vault token".into()
            }
        }
    }
}

/// A Vault client bound to one server and namespace, with the token store its auth method
/// keeps filled.
pub struct VaultClient {
    http: reqwest::Client,
    base: String,
    namespace: Option<String>,
    /// The current token and the retired ones still parenting live leases.
    pub tokens: TokenStore,
    timeout: Duration,
    pub(crate) metrics: Arc<Metrics>,
}

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

#[derive(Deserialize)]
struct RenewResponse {
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

/// What a lease renewal granted.
#[derive(Debug, Clone, Copy)]
pub struct Renewed {
    /// New time to live, from now.
    pub duration: Duration,
    /// Whether further renewals are possible.
    pub renewable: bool,
}

#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<String>,
}

/// Finds the token: inline, then token_file, then `VAULT_TOKEN`.
pub fn load_token(auth: &VaultAuthConfig) -> Result<SecretString, VaultError> {
    if let Some(token) = &auth.token {
        return Ok(token.clone());
    }
    if let Some(path) = &auth.token_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| VaultError::TokenFile(path.display().to_string(), e))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(VaultError::NoToken);
        }
        return Ok(SecretString::from(token.to_owned()));
    }
    match std::env::var("VAULT_TOKEN") {
        Ok(t) if !t.trim().is_empty() => Ok(SecretString::from(t.trim().to_owned())),
        _ => Err(VaultError::NoToken),
    }
}

impl VaultClient {
    /// Builds the client from `[vault]`.
    pub fn new(cfg: &VaultConfig, metrics: Arc<Metrics>) -> Result<VaultClient, VaultError> {
        let mut builder = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .no_proxy();
        if let Some(path) = &cfg.ca_cert {
            let pem = std::fs::read(path)
                .map_err(|e| VaultError::Setup(format!("{}: {e}", path.display())))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| VaultError::Setup(format!("{}: {e}", path.display())))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        if cfg.auth.method == AuthMethod::Cert
            && let (Some(cert), Some(key)) = (&cfg.auth.cert, &cfg.auth.key)
        {
            let mut pem = std::fs::read(cert)
                .map_err(|e| VaultError::Setup(format!("{}: {e}", cert.display())))?;
            pem.push(b'\n');
            pem.extend(
                std::fs::read(key)
                    .map_err(|e| VaultError::Setup(format!("{}: {e}", key.display())))?,
            );
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|e| VaultError::Setup(format!("vault.auth cert/key: {e}")))?;
            zeroize::Zeroize::zeroize(&mut pem);
            builder = builder.identity(identity);
        }
        let http = builder
            .build()
            .map_err(|e| VaultError::Setup(e.to_string()))?;
        Ok(VaultClient {
            http,
            base: cfg.address.trim_end_matches('/').to_owned(),
            namespace: cfg.namespace.clone(),
            tokens: TokenStore::default(),
            timeout: cfg.timeout,
            metrics,
        })
    }

    async fn request(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<reqwest::Response, VaultError> {
        let token = self.tokens.current().ok_or(VaultError::NoToken)?;
        self.request_as(op, method, path, body, Some(token.secret()))
            .await
    }

    /// A request with an explicit token (`None`: a login, which carries no token).
    pub(crate) async fn request_as(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        token: Option<&SecretString>,
    ) -> Result<reqwest::Response, VaultError> {
        let started = Instant::now();
        let mut req = self
            .http
            .request(method, format!("{}/v1/{path}", self.base))
            .header("X-Vault-Request", "true");
        if let Some(token) = token {
            req = req.header("X-Vault-Token", token.expose_secret());
        }
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let result = req.send().await;
        let status = match &result {
            Ok(r) if r.status().is_success() => "2xx",
            Ok(r) if r.status().is_client_error() => "4xx",
            Ok(_) => "5xx",
            Err(e) if e.is_timeout() => "timeout",
            Err(_) => "unreachable",
        };
        self.metrics
            .vault_request(op, status, started.elapsed().as_secs_f64());
        let resp = result.map_err(|e| self.transport_error(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let detail = resp
            .json::<ErrorBody>()
            .await
            .unwrap_or_default()
            .errors
            .join("; ");
        Err(VaultError::Status { status, detail })
    }

    fn transport_error(&self, e: reqwest::Error) -> VaultError {
        if e.is_timeout() {
            VaultError::Timeout(self.timeout)
        } else {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            VaultError::Unreachable(text)
        }
    }

    /// `GET /v1/<mount>/creds/<role>`: a fresh database credential and its lease. Never retried
    /// here: a retry after a timeout could create a second role nobody revokes.
    pub async fn creds(&self, mount: &str, role: &str) -> Result<Lease, VaultError> {
        let token = self.tokens.current().ok_or(VaultError::NoToken)?;
        let resp = self
            .request_as(
                "creds",
                Method::GET,
                &format!("{mount}/creds/{role}"),
                None,
                Some(token.secret()),
            )
            .await?;
        let body: CredsResponse = resp
            .json()
            .await
            .map_err(|e| VaultError::Malformed(format!("creds response: {e}")))?;
        if body.lease_id.is_empty() {
            return Err(VaultError::Malformed(
                "creds response without lease_id".into(),
            ));
        }
        Ok(Lease {
            id: body.lease_id,
            duration: Duration::from_secs(body.lease_duration),
            renewable: body.renewable,
            username: body.data.username,
            password: body.data.password,
            parent: token,
        })
    }

    /// `PUT /v1/sys/leases/renew`: asks for `increment` more; returns what Vault granted.
    pub async fn renew(&self, lease_id: &str, increment: Duration) -> Result<Renewed, VaultError> {
        let resp = self
            .request(
                "renew",
                Method::PUT,
                "sys/leases/renew",
                Some(serde_json::json!({
                    "lease_id": lease_id,
                    "increment": increment.as_secs().max(1),
                })),
            )
            .await?;
        let body: RenewResponse = resp
            .json()
            .await
            .map_err(|e| VaultError::Malformed(format!("renew response: {e}")))?;
        Ok(Renewed {
            duration: Duration::from_secs(body.lease_duration),
            renewable: body.renewable,
        })
    }

    /// `PUT /v1/sys/leases/revoke`. Idempotent, so the revoker retries it.
    pub async fn revoke(&self, lease_id: &str) -> Result<(), VaultError> {
        self.request(
            "revoke",
            Method::PUT,
            "sys/leases/revoke",
            Some(serde_json::json!({ "lease_id": lease_id })),
        )
        .await
        .map(drop)
    }
}
