//! The admin socket's requests and answers, shared by the server ([`super::routes`]) and the
//! command-line client (`crate::console`): JSON bodies, and for `GET /v1/sessions` one
//! [`Listed`] object per line.

use serde::{Deserialize, Serialize};

pub(crate) use crate::registry::Listed;

/// `GET`: every session and pooled credential, one JSON object per line.
pub(crate) const SESSIONS: &str = "/v1/sessions";
/// `POST` an [`EndRequest`]: answered with an [`EndAnswer`].
pub(crate) const SESSIONS_END: &str = "/v1/sessions/end";
/// `POST` a [`CheckRequest`]: answered with a [`CheckAnswer`].
pub(crate) const LEASES_CHECK: &str = "/v1/leases/check";

/// Longest `--reason` accepted (it goes into the client's ErrorResponse).
pub(crate) const MAX_REASON: usize = 200;

/// What `sessions end` matches: an id, or an identity pattern (as in grants) with an optional
/// database and role.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct EndRequest {
    /// `--id`.
    pub id: Option<u64>,
    /// `--identity`: an identity pattern.
    pub identity: Option<String>,
    /// `--database`.
    pub database: Option<String>,
    /// `--role`.
    pub role: Option<String>,
    /// `--transport`: `tcp`, `tls` or `unix`.
    pub transport: Option<String>,
    /// `--reason`: what the client is told after `terminated by the operator: `.
    pub reason: Option<String>,
}

/// What `sessions end` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EndAnswer {
    /// The sessions ended, as listed just before.
    pub ended: Vec<Listed>,
    /// Every one of them had closed (upstream closed, lease handed to the revoker) when the
    /// answer was sent.
    pub closed: bool,
}

/// `leases check`, and whether to revoke.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct CheckRequest {
    /// `--revoke`: revoke the unheld leases this instance's token created.
    pub revoke: bool,
}

/// A lease Vault lists that no session or pool of this instance holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Unheld {
    /// The lease id.
    pub lease_id: String,
    /// When Vault issued it (RFC 3339).
    pub issued: Option<String>,
    /// When it expires unless renewed.
    pub expires: Option<String>,
    /// Issued at or after the creation of leasegate's current token, and not so recently
    /// that a creds call of this instance could still be answering: taken as created by this
    /// instance's token (Vault does not say; see README).
    pub ours: bool,
    /// Issued within the last `vault.timeout`: possibly a creds call still in flight, never
    /// revoked.
    pub recent: bool,
    /// Revoked by this check.
    pub revoked: bool,
    /// Why the revocation failed, when it did.
    pub error: Option<String>,
}

/// What `leases check` found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CheckAnswer {
    /// The `<mount>/creds/<role>` paths listed.
    pub paths: Vec<String>,
    /// Leases Vault lists there.
    pub listed: usize,
    /// Of those, held by this instance (sessions, prefetch, revocations under way).
    pub held: usize,
    /// The others.
    pub unheld: Vec<Unheld>,
    /// When leasegate's current token was created, if Vault said.
    pub token_created: Option<String>,
}
