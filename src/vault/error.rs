//! What can go wrong talking to Vault, and the client-safe text for each.

use std::time::Duration;

use reqwest::StatusCode;

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
    /// leasegate itself had no file descriptor left for the connection (EMFILE, ENFILE).
    #[error("no file descriptor left to connect to Vault: {0}")]
    NoDescriptors(String),
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
    /// Vault (or something in front of it) redirected the request to another origin or from
    /// https to http; leasegate does not follow, so the token and login secrets stay put.
    #[error(
        "Vault answered {status} redirecting to {to}; not followed (only redirects within {from} are)"
    )]
    Redirected {
        /// The redirect status.
        status: StatusCode,
        /// Origin (scheme, host, port) of the `Location`, never its path or query.
        to: String,
        /// Origin of the configured `vault.address`.
        from: String,
    },
}

impl VaultError {
    /// Short, client-safe description (no Vault bodies, tokens or addresses).
    pub fn client_reason(&self) -> String {
        match self {
            VaultError::Timeout(d) => format!("Vault did not answer within {d:?}"),
            VaultError::Unreachable(_) => "Vault is unreachable".into(),
            VaultError::NoDescriptors(_) => {
                "leasegate has no file descriptor left (its open-file limit is reached)".into()
            }
            VaultError::Status { status, .. } => {
                format!("Vault refused the request (HTTP {})", status.as_u16())
            }
            VaultError::Malformed(_) => "Vault sent an unexpected answer".into(),
            VaultError::Redirected { .. } => "Vault redirected the request elsewhere".into(),
            VaultError::NoToken | VaultError::TokenFile(..) | VaultError::Setup(_) => {
                "leasegate has no usable Vault token".into()
            }
        }
    }
}
