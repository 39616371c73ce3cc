//! What can go wrong reaching or logging in to an upstream database, and how it shows.

use bytes::Bytes;

use crate::metrics::labels::UpstreamErrorKind;
use crate::protocol::sqlstate::SqlState;

/// Failures reaching or logging in to the upstream database.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// TCP connect failed.
    #[error("could not connect to upstream for database \"{database}\": {error}")]
    Connect {
        /// The `[[databases]]` name (not the address: that stays in the logs).
        database: String,
        /// Why (in the message, so not also a `source()`).
        error: std::io::Error,
    },
    /// Connecting and logging in took longer than `connect_timeout`.
    #[error("upstream for database \"{0}\" did not answer in time")]
    Timeout(String),
    /// The upstream refused TLS or the TLS handshake failed.
    #[error("TLS to upstream for database \"{database}\" failed: {reason}")]
    Tls {
        /// The `[[databases]]` name.
        database: String,
        /// Why.
        reason: String,
    },
    /// The upstream answered the login with an ErrorResponse; forwarded verbatim.
    #[error("upstream refused login: {code} {message}")]
    Rejected {
        /// SQLSTATE the upstream sent.
        code: String,
        /// Message the upstream sent.
        message: String,
        /// The whole ErrorResponse, as received.
        raw: Bytes,
    },
    /// The upstream asked for an authentication method leasegate does not allow.
    #[error("upstream asked for {0} authentication, which leasegate does not allow here")]
    AuthMethod(String),
    /// SCRAM failed, including a server signature that did not verify.
    #[error("upstream SCRAM authentication failed: {0}")]
    Scram(String),
    /// The upstream broke the protocol.
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    /// The connection failed during login.
    #[error("upstream connection lost during login: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for UpstreamError {
    fn from(e: std::io::Error) -> Self {
        UpstreamError::Io(e)
    }
}

impl UpstreamError {
    /// SQLSTATE for the client.
    pub(crate) fn sqlstate(&self) -> SqlState {
        match self {
            UpstreamError::Connect { error, .. } if crate::fd_limit::exhausted(error) => {
                SqlState::TooManyConnections
            }
            UpstreamError::AuthMethod(_) => SqlState::SqlserverRejectedEstablishmentOfSqlconnection,
            UpstreamError::Protocol(_) => SqlState::ProtocolViolation,
            // Rejected is forwarded verbatim; this is only its fallback.
            _ => SqlState::ConnectionFailure,
        }
    }

    /// Client-visible message.
    pub(crate) fn client_message(&self) -> String {
        match self {
            UpstreamError::Connect { database, error } if crate::fd_limit::exhausted(error) => {
                format!(
                    "leasegate has no file descriptor left to connect to upstream for database \"{database}\" (its open-file limit is reached)"
                )
            }
            UpstreamError::Connect { database, .. } => {
                format!("could not connect to upstream for database \"{database}\"")
            }
            UpstreamError::Rejected { message, .. } => message.clone(),
            UpstreamError::Io(_) => "upstream connection lost during login".into(),
            other => other.to_string(),
        }
    }

    /// Metric label for `leasegate_upstream_errors_total{kind}`.
    pub(crate) fn kind(&self) -> UpstreamErrorKind {
        match self {
            UpstreamError::Connect { .. } => UpstreamErrorKind::Connect,
            UpstreamError::Timeout(_) => UpstreamErrorKind::Timeout,
            UpstreamError::Tls { .. } => UpstreamErrorKind::Tls,
            UpstreamError::Rejected { .. } => UpstreamErrorKind::Rejected,
            UpstreamError::AuthMethod(_) | UpstreamError::Scram(_) => UpstreamErrorKind::Auth,
            UpstreamError::Protocol(_) => UpstreamErrorKind::Protocol,
            UpstreamError::Io(_) => UpstreamErrorKind::Io,
        }
    }

    /// Whether the upstream refused the login as a wrong password (28P01): PostgreSQL's
    /// answer for a role that no longer exists, or whose password expired, too.
    pub(crate) fn password_refused(&self) -> bool {
        matches!(self, UpstreamError::Rejected { code, .. } if code == "28P01")
    }

    /// The upstream's own ErrorResponse, to forward as-is.
    pub(crate) fn raw_error(&self) -> Option<&Bytes> {
        match self {
            UpstreamError::Rejected { raw, .. } => Some(raw),
            _ => None,
        }
    }
}
