//! Hand-written Vault HTTP calls: lease ids, durations and renewability matter here, and
//! generic client crates drop them. Every request runs under the configured timeout; the
//! connection pool is reused across sessions. Error bodies are logged, never shown to clients.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_TYPE, HeaderValue, LOCATION};
use reqwest::{Method, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use super::body::{self, SecretBody};
use super::error::VaultError;
use super::token::TokenStore;
use crate::config::{AuthMethod, VaultAuth, VaultConfig};
use crate::lease_clock::from_vault_secs;
use crate::metrics::Metrics;
use crate::metrics::labels::{VaultOp, VaultStatus};

/// A Vault client bound to one server and namespace, with the token store its auth method
/// keeps filled.
pub struct VaultClient {
    http: reqwest::Client,
    /// `vault.address` without a trailing slash; request paths are appended to it.
    base: String,
    /// `vault.address` parsed: the only origin requests and redirects may go to.
    origin: Url,
    namespace: Option<String>,
    /// The current token and the retired ones still parenting live leases.
    pub tokens: TokenStore,
    /// `vault.timeout`: the limit of every request, body included.
    pub(super) timeout: Duration,
    pub(crate) metrics: Arc<Metrics>,
    /// The runtime the client was built on (the control plane's): every request is sent
    /// there, so the pooled connections' tasks live on it, not on a session thread that may
    /// stop first (and no session thread drives another session's Vault connection).
    home: Option<tokio::runtime::Handle>,
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
pub fn load_token(auth: &VaultAuth) -> Result<SecretString, VaultError> {
    if let Some(token) = auth.inline_token() {
        return Ok(token.clone());
    }
    if let Some(path) = auth.token_file() {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| VaultError::TokenFile(path.display().to_string(), e))?,
        );
        let token = text.trim();
        if token.is_empty() {
            return Err(VaultError::NoToken);
        }
        return Ok(SecretString::from(token.to_owned()));
    }
    match std::env::var("VAULT_TOKEN").map(Zeroizing::new) {
        Ok(t) if !t.trim().is_empty() => Ok(SecretString::from(t.trim().to_owned())),
        _ => Err(VaultError::NoToken),
    }
}

impl VaultClient {
    /// Builds the client from `[vault]`.
    pub fn new(cfg: &VaultConfig, metrics: Arc<Metrics>) -> Result<VaultClient, VaultError> {
        let base = cfg.address.trim_end_matches('/').to_owned();
        let origin = Url::parse(&base)
            .map_err(|e| VaultError::Setup(format!("vault.address {base:?}: {e}")))?;
        let allowed = origin.clone();
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if redirect_allowed(&allowed, attempt.url(), attempt.previous().len()) {
                    attempt.follow()
                } else {
                    attempt.stop()
                }
            }))
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
        if let AuthMethod::Cert { cert, key, .. } = &cfg.auth.method {
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
            base,
            origin,
            namespace: cfg.namespace.clone(),
            tokens: TokenStore::default(),
            timeout: cfg.timeout,
            metrics,
            home: tokio::runtime::Handle::try_current().ok(),
        })
    }

    /// A request with the current token.
    pub(super) async fn request(
        &self,
        op: VaultOp,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<reqwest::Response, VaultError> {
        let token = self.tokens.current().ok_or(VaultError::NoToken)?;
        self.request_as(op, method, path, body.map(Body::Json), Some(token.secret()))
            .await
    }

    /// A request with an explicit token (`None`: a login, which carries no token). The token
    /// header is marked sensitive, and redirects are followed only within the configured
    /// origin: a 3xx elsewhere comes back as [`VaultError::Redirected`].
    pub(crate) async fn request_as(
        &self,
        op: VaultOp,
        method: Method,
        path: &str,
        body: Option<Body>,
        token: Option<&SecretString>,
    ) -> Result<reqwest::Response, VaultError> {
        let started = Instant::now();
        let mut req = self
            .http
            .request(method, format!("{}/v1/{path}", self.base))
            .header("X-Vault-Request", "true");
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(token.expose_secret()).map_err(|_| {
                VaultError::Setup("the Vault token is not a valid HTTP header value".into())
            })?;
            value.set_sensitive(true);
            req = req.header("X-Vault-Token", value);
        }
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        match body {
            Some(Body::Json(body)) => req = req.json(&body),
            Some(Body::Secret(secret)) => {
                req = req
                    .header(CONTENT_TYPE, "application/json")
                    .body(reqwest::Body::from(secret.into_bytes()));
            }
            None => {}
        }
        let result = self.send_at_home(req).await?;
        let status = match &result {
            Ok(r) if r.status().is_success() => VaultStatus::Success,
            Ok(r) if r.status().is_redirection() => VaultStatus::Redirect,
            Ok(r) if r.status().is_client_error() => VaultStatus::ClientError,
            Ok(_) => VaultStatus::ServerError,
            Err(e) if e.is_timeout() => VaultStatus::Timeout,
            Err(_) => VaultStatus::Unreachable,
        };
        self.metrics
            .vault_request(op, status, started.elapsed().as_secs_f64());
        let resp = result.map_err(|e| self.transport_error(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        if status.is_redirection() {
            return Err(self.redirected(&resp));
        }
        let detail = resp
            .json::<ErrorBody>()
            .await
            .unwrap_or_default()
            .errors
            .join("; ");
        Err(VaultError::Status { status, detail })
    }

    /// The error for a redirect the policy did not follow: where it pointed, as an origin.
    fn redirected(&self, resp: &reqwest::Response) -> VaultError {
        let to = resp
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| resp.url().join(l).ok())
            .map_or_else(
                || "an unreadable Location".to_owned(),
                |u| u.origin().ascii_serialization(),
            );
        VaultError::Redirected {
            status: resp.status(),
            to,
            from: self.origin.origin().ascii_serialization(),
        }
    }

    /// Reads a successful answer's body (it may hold a secret, so into zeroizing memory,
    /// within `vault.timeout`) and parses it.
    pub(crate) async fn read_json<T: DeserializeOwned>(
        &self,
        what: &str,
        resp: reqwest::Response,
    ) -> Result<T, VaultError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let body = body::read(resp, deadline, self.timeout)
            .await
            .map_err(|(_, e)| e)?;
        body::parse(what, &body)
    }

    /// Sends `req` on the client's home runtime (here when it has none), and waits for the
    /// response's head here; dropping the wait drops the request, as a plain `send` would.
    async fn send_at_home(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Result<reqwest::Response>, VaultError> {
        let Some(home) = &self.home else {
            return Ok(req.send().await);
        };
        let sent = tokio_util::task::AbortOnDropHandle::new(home.spawn(req.send()));
        sent.await
            .map_err(|e| VaultError::Unreachable(format!("the Vault client stopped: {e}")))
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
            if crate::fd_limit::exhausted_in_chain(&e) {
                VaultError::NoDescriptors(text)
            } else {
                VaultError::Unreachable(text)
            }
        }
    }

    /// `PUT /v1/sys/leases/renew`: asks for `increment` more; returns what Vault granted.
    pub async fn renew(&self, lease_id: &str, increment: Duration) -> Result<Renewed, VaultError> {
        let resp = self
            .request(
                VaultOp::Renew,
                Method::PUT,
                "sys/leases/renew",
                Some(serde_json::json!({
                    "lease_id": lease_id,
                    "increment": increment.as_secs().max(1),
                })),
            )
            .await?;
        let body: RenewResponse = self.read_json("renew response", resp).await?;
        Ok(Renewed {
            duration: from_vault_secs(body.lease_duration),
            renewable: body.renewable,
        })
    }

    /// `PUT /v1/sys/leases/revoke`. Idempotent, so the revoker retries it.
    pub async fn revoke(&self, lease_id: &str) -> Result<(), VaultError> {
        self.request(
            VaultOp::Revoke,
            Method::PUT,
            "sys/leases/revoke",
            Some(serde_json::json!({ "lease_id": lease_id })),
        )
        .await
        .map(drop)
    }
}

/// A request body: plain JSON, or JSON holding a secret (a secret_id, a JWT).
pub(crate) enum Body {
    /// Serialised with `serde_json`.
    Json(serde_json::Value),
    /// Already serialised, in memory that is zeroized when the request is done with it.
    Secret(SecretBody),
}

/// Most redirects followed for one request (all within the configured origin).
const MAX_REDIRECTS: usize = 5;

/// Whether a redirect to `next` may be followed: only to the configured origin (same
/// scheme, host and port, so never https to http), and at most [`MAX_REDIRECTS`] of them;
/// `hops` is how many requests the chain made so far.
pub(crate) fn redirect_allowed(configured: &Url, next: &Url, hops: usize) -> bool {
    hops <= MAX_REDIRECTS && next.origin() == configured.origin()
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
