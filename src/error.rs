//! Session errors and their one mapping to what the client sees: SQLSTATE, severity, a
//! client-safe message, and the metric labels. Vault bodies, tokens and internal addresses
//! never reach a client message; the full error goes to the log.

use crate::limits::LimitHit;
use crate::policy::Denial;
use crate::protocol::startup::PacketError;
use crate::upstream::UpstreamError;
use crate::vault::VaultError;

/// Everything that can end a session before or during relaying.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// StartupMessage sent without TLS.
    #[error("plaintext connection refused")]
    Plaintext,
    /// TLS completed, but the client presented no certificate.
    #[error("no client certificate")]
    NoClientCert,
    /// The TLS handshake failed (bad certificate, wrong protocol, ...).
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    /// The pre-authentication phase took longer than `login_timeout`.
    #[error("login timed out")]
    LoginTimeout,
    /// A malformed or unsupported startup packet.
    #[error(transparent)]
    Packet(#[from] PacketError),
    /// A protocol step leasegate refuses (second SSLRequest, replication, ...).
    #[error("{message}")]
    Refused {
        /// SQLSTATE to report.
        code: &'static str,
        /// Client-visible message.
        message: String,
    },
    /// The grants do not allow the request.
    #[error("{message}")]
    Denied {
        /// Which check failed.
        denial: Denial,
        /// Client-visible message naming identity, role and database.
        message: String,
    },
    /// A session limit refused the client.
    #[error("{message}")]
    Limited {
        /// Which limit.
        hit: LimitHit,
        /// Client-visible message.
        message: String,
    },
    /// Vault could not issue a credential.
    #[error("could not obtain credentials for role {role:?}: {error}")]
    Vault {
        /// The role asked for.
        role: String,
        /// What Vault did (in the message, so not also a `source()`).
        error: VaultError,
    },
    /// Connecting or logging in upstream failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// leasegate is shutting down.
    #[error("leasegate is shutting down")]
    Shutdown,
}

impl SessionError {
    /// SQLSTATE for the client's ErrorResponse.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            SessionError::Plaintext | SessionError::NoClientCert | SessionError::Denied { .. } => {
                "28000"
            }
            SessionError::Tls(_) | SessionError::LoginTimeout => "08006",
            SessionError::Packet(PacketError::UnsupportedVersion(..)) => "0A000",
            SessionError::Packet(_) => "08P01",
            SessionError::Refused { code, .. } => code,
            SessionError::Limited { .. } => "53300",
            SessionError::Vault { .. } => "08006",
            SessionError::Upstream(e) => e.sqlstate(),
            SessionError::Shutdown => "57P01",
        }
    }

    /// The message the client sees.
    pub fn client_message(&self) -> String {
        match self {
            SessionError::Plaintext => "SSL with a client certificate is required".into(),
            SessionError::NoClientCert => {
                "a client certificate is required: connect with sslcert and sslkey".into()
            }
            SessionError::Tls(_) => "TLS handshake failed".into(),
            SessionError::LoginTimeout => "login timed out".into(),
            SessionError::Packet(e) => e.to_string(),
            SessionError::Refused { message, .. }
            | SessionError::Denied { message, .. }
            | SessionError::Limited { message, .. } => message.clone(),
            SessionError::Vault { role, error } => format!(
                "could not obtain credentials for role \"{role}\": {}",
                error.client_reason()
            ),
            SessionError::Upstream(e) => e.client_message(),
            SessionError::Shutdown => "terminating connection due to administrator command".into(),
        }
    }

    /// `leasegate_auth_failures_total{reason}` label when this is a refusal of the client,
    /// `None` for failures that are not the client's.
    pub fn auth_failure_reason(&self) -> Option<&'static str> {
        match self {
            SessionError::Plaintext => Some("plaintext"),
            SessionError::NoClientCert => Some("no_client_cert"),
            SessionError::Tls(_) => Some("tls_handshake"),
            SessionError::LoginTimeout => Some("login_timeout"),
            SessionError::Packet(_) | SessionError::Refused { .. } => Some("bad_startup"),
            SessionError::Denied { denial, .. } => Some(denial.label()),
            SessionError::Limited { hit, .. } => Some(hit.label()),
            SessionError::Vault { .. } | SessionError::Upstream(_) | SessionError::Shutdown => None,
        }
    }

    /// `leasegate_sessions_total{outcome}` label.
    pub fn outcome(&self) -> &'static str {
        if self.auth_failure_reason().is_some() {
            "rejected"
        } else {
            "error"
        }
    }

    /// `leasegate_tls_handshake_failures_total{reason}` label for a failed handshake.
    pub fn tls_failure_reason(&self) -> Option<&'static str> {
        let SessionError::Tls(e) = self else {
            return None;
        };
        let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return Some(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "eof"
            } else {
                "io"
            });
        };
        use rustls::{CertificateError as C, Error as E};
        Some(match tls {
            E::InvalidCertificate(C::UnknownIssuer) => "unknown_ca",
            E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "expired",
            E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => "not_yet_valid",
            E::InvalidCertificate(C::Revoked) => "revoked",
            E::InvalidCertificate(_) => "bad_certificate",
            E::NoApplicationProtocol => "no_alpn",
            E::PeerIncompatible(_) => "incompatible",
            E::InvalidMessage(_) => "not_tls",
            _ => "other",
        })
    }

    /// Whether the client can still be sent an ErrorResponse (not when TLS itself failed).
    pub fn reportable(&self) -> bool {
        !matches!(self, SessionError::Tls(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping() {
        let e = SessionError::Plaintext;
        assert_eq!(e.sqlstate(), "28000");
        assert_eq!(
            e.client_message(),
            "SSL with a client certificate is required"
        );
        assert_eq!(e.outcome(), "rejected");
        let e = SessionError::Vault {
            role: "readonly".into(),
            error: VaultError::Unreachable("tcp connect error 10.1.2.3:8200".into()),
        };
        assert_eq!(e.sqlstate(), "08006");
        assert!(!e.client_message().contains("10.1.2.3"));
        assert_eq!(e.outcome(), "error");
        assert_eq!(
            SessionError::Packet(PacketError::UnsupportedVersion(4, 0)).sqlstate(),
            "0A000"
        );
    }
}
