//! What a client is told, from one place: every ErrorResponse and NoticeResponse leasegate
//! writes comes from [`SessionError`] or [`SessionNotice`], each case with its typed
//! [`SqlState`], its severity, a client-safe message and (for errors) the metric labels.
//! Vault bodies, tokens and internal addresses never reach a client message; the full error
//! (its `Display`) goes to the log and the audit line.
//!
//! Error causes, here and in every error type of the crate, are stated once: in the message
//! (`{0}`) with no `source()`, because logs, the audit log and `check-config` print
//! `Display` only; a wrapped error of another layer is `transparent`.

use std::time::Duration;

use bytes::BytesMut;

use crate::escape::quoted;
use crate::limits::LimitHit;
use crate::metrics::labels::{
    AuthFailureReason, SessionEndReason, SessionOutcome, TlsFailureReason,
};
use crate::policy::Denial;
use crate::protocol::messages::{Severity, error_response, notice_response};
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::PacketError;
use crate::proxy_header::ProxyHeaderError;
use crate::upstream::UpstreamError;
use crate::upstream::params::ParamRefusal;
use crate::vault::VaultError;

/// Everything that ends a session: refusals before relaying, failures of Vault or the
/// upstream, and leasegate ending a live session (57P01). Where a refusal's `Display` is what
/// the client is told, the text is in its `#[error]`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
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
    /// A PostgreSQL 17 direct TLS connection that did not negotiate ALPN `postgresql`.
    #[error("direct TLS connections must negotiate the ALPN protocol \"postgresql\"")]
    NoAlpn,
    /// A PeerCancelRequest outside TLS (peers are known by their certificate only).
    #[error("peer cancel requests are only accepted inside TLS")]
    PlaintextPeerCancel,
    /// A second GSSENCRequest after leasegate declined the first.
    #[error("GSSENCRequest sent twice")]
    GssEncTwice,
    /// SSLRequest or GSSENCRequest inside TLS.
    #[error("encryption negotiation inside TLS is not allowed")]
    NegotiationInsideTls,
    /// The verified client certificate is unusable now (unparsable, expired, not yet valid).
    #[error("{0}")]
    BadCertificate(String),
    /// No (or an empty) `user` in the startup packet.
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    /// A replication connection (`replication` true or `database`).
    #[error("replication connections are not supported through leasegate")]
    Replication,
    /// `replication` is neither a boolean nor `database`; holds the value as sent.
    #[error("invalid value for parameter \"replication\": {}", quoted(.0))]
    ReplicationValue(String),
    /// A startup parameter or `options` content that does not reach the upstream.
    #[error("{}", .0.message(quoted))]
    StartupParameter(ParamRefusal),
    /// The grants do not allow the request.
    #[error("{}", denial_message(.denial, .identity, .role, .database))]
    Denied {
        /// Which check failed.
        denial: Denial,
        /// The certificate identity, as the client is told it.
        identity: String,
        /// The role asked for.
        role: String,
        /// The database asked for.
        database: String,
    },
    /// The grants do not allow a Unix-socket peer's request.
    #[error("{}", unix_denial_message(.denial, .identity, *.uid, .role, .database))]
    UnixDenied {
        /// Which check failed.
        denial: Denial,
        /// The peer's identity as the client is told it: `unix:user=NAME` (`unix:uid=N` for a
        /// uid without a name).
        identity: String,
        /// The peer's uid (`SO_PEERCRED`).
        uid: u32,
        /// The role asked for.
        role: String,
        /// The database asked for.
        database: String,
    },
    /// The kernel did not say who a Unix-socket peer is (its credentials or the user
    /// database could not be read).
    #[error("cannot identify the local client: {0}")]
    PeerCredentials(String),
    /// A second SSLRequest or GSSENCRequest on the Unix socket after leasegate declined one.
    #[error("SSLRequest or GSSENCRequest sent twice")]
    NegotiationTwice,
    /// A session limit refused the client.
    #[error("{}", limit_message(.hit, .identity))]
    Limited {
        /// Which limit.
        hit: LimitHit,
        /// The identity the grant matched, counted against the limit.
        identity: String,
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
    /// The credential reached Vault's max_ttl: leasegate ends the live session.
    #[error(
        "terminating connection: the database credential for role \"{role}\" reached its maximum lifetime"
    )]
    CredentialLifetime {
        /// The role of the credential.
        role: String,
    },
    /// Renewals of the credential kept failing (Vault unreachable, sealed or refusing) until
    /// its end: leasegate ends the live session before the credential expires.
    #[error(
        "terminating connection: the database credential for role \"{role}\" could not be renewed and is about to expire"
    )]
    CredentialUnrenewed {
        /// The role of the credential.
        role: String,
    },
    /// The database entry's `max_session_duration` passed: leasegate ends the live session.
    #[error(
        "terminating connection: the session reached max_session_duration ({})",
        humantime::format_duration(*.0)
    )]
    MaxSessionDuration(Duration),
    /// An operator ended the live session (`leasegate sessions end`, or a reload with
    /// `end_sessions_on_revoke` that removed its grant); holds the reason as the client is
    /// told it.
    #[error("terminated by the operator: {0}")]
    Terminated(String),
    /// A connection from `listen.proxy_protocol_from` without a valid PROXY header.
    #[error(transparent)]
    ProxyHeader(#[from] ProxyHeaderError),
}

/// Why leasegate itself ended a session: carried with the session's stop, so that the
/// watcher's FATAL 57P01 names it and `leasegate_sessions_ended_total{reason}` counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EndReason {
    /// `leasegate sessions end`, with the operator's text.
    Operator(String),
    /// A reload removed what allowed the session (`listen.end_sessions_on_revoke`).
    GrantRemoved,
    /// The credential's maximum lifetime or `max_session_duration`.
    MaxLifetime,
}

impl EndReason {
    /// What the client is told when its session is stopped for this reason.
    pub(crate) fn error(&self) -> SessionError {
        match self {
            EndReason::Operator(text) => SessionError::Terminated(text.clone()),
            EndReason::GrantRemoved => SessionError::Terminated("grant removed".into()),
            EndReason::MaxLifetime => SessionError::Shutdown,
        }
    }

    /// The `leasegate_sessions_ended_total{reason}` label.
    pub(crate) fn label(&self) -> SessionEndReason {
        match self {
            EndReason::Operator(_) => SessionEndReason::Operator,
            EndReason::GrantRemoved => SessionEndReason::GrantRemoved,
            EndReason::MaxLifetime => SessionEndReason::MaxLifetime,
        }
    }
}

fn denial_message(denial: &Denial, identity: &str, role: &str, database: &str) -> String {
    denied(
        denial,
        &format!("identity {}", quoted(identity)),
        role,
        database,
    )
}

/// As [`denial_message`], naming the local user and its uid.
fn unix_denial_message(
    denial: &Denial,
    identity: &str,
    uid: u32,
    role: &str,
    database: &str,
) -> String {
    let who = format!("local user {} (uid {uid})", quoted(identity));
    denied(denial, &who, role, database)
}

fn denied(denial: &Denial, identity: &str, role: &str, database: &str) -> String {
    let (role, db) = (quoted(role), quoted(database));
    match denial {
        Denial::NoGrant => {
            format!("{identity} has no grant (asked for role {role} on database {db})")
        }
        Denial::DatabaseNotGranted => {
            format!("{identity} is not granted database {db} (asked for role {role})")
        }
        Denial::RoleNotGranted => {
            format!("{identity} is not granted role {role} on database {db}")
        }
    }
}

/// The identity (certificate text) is quoted and escaped.
fn limit_message(hit: &LimitHit, identity: &str) -> String {
    let identity = quoted(identity);
    match hit {
        LimitHit::Global(n) => format!("too many sessions through leasegate (limit {n})"),
        LimitHit::IdentitySessions(n) => {
            format!("too many sessions for identity {identity} (limit {n})")
        }
        LimitHit::IdentityRate(r) => {
            format!("too many new sessions per second for identity {identity} (limit {r}/s)")
        }
    }
}

impl SessionError {
    /// SQLSTATE for the client's ErrorResponse.
    pub(crate) fn sqlstate(&self) -> SqlState {
        use SessionError as E;
        match self {
            E::Plaintext | E::NoClientCert | E::Denied { .. } | E::UnixDenied { .. } => {
                SqlState::InvalidAuthorizationSpecification
            }
            E::PeerCredentials(_) => SqlState::ConnectionFailure,
            E::BadCertificate(_) | E::NoUser => SqlState::InvalidAuthorizationSpecification,
            E::Vault {
                error: VaultError::NoDescriptors(_),
                ..
            } => SqlState::TooManyConnections,
            E::Tls(_) | E::LoginTimeout | E::Vault { .. } => SqlState::ConnectionFailure,
            E::Packet(PacketError::UnsupportedVersion(..)) | E::Replication => {
                SqlState::FeatureNotSupported
            }
            E::Packet(_) | E::NoAlpn | E::PlaintextPeerCancel | E::GssEncTwice => {
                SqlState::ProtocolViolation
            }
            E::NegotiationInsideTls | E::NegotiationTwice | E::ProxyHeader(_) => {
                SqlState::ProtocolViolation
            }
            E::ReplicationValue(_) => SqlState::InvalidParameterValue,
            E::StartupParameter(refusal) => refusal.sqlstate(),
            E::Limited { .. } => SqlState::TooManyConnections,
            E::Upstream(e) => e.sqlstate(),
            E::Shutdown | E::CredentialLifetime { .. } | E::MaxSessionDuration(_) => {
                SqlState::AdminShutdown
            }
            E::CredentialUnrenewed { .. } => SqlState::AdminShutdown,
            E::Terminated(_) => SqlState::AdminShutdown,
        }
    }

    /// Every session error ends the session.
    pub(crate) fn severity(&self) -> Severity {
        Severity::Fatal
    }

    /// The message the client sees.
    pub(crate) fn client_message(&self) -> String {
        match self {
            SessionError::Plaintext => "SSL with a client certificate is required".into(),
            SessionError::NoClientCert => {
                "a client certificate is required: connect with sslcert and sslkey".into()
            }
            SessionError::Tls(_) => "TLS handshake failed".into(),
            SessionError::Vault { role, error } => format!(
                "could not obtain credentials for role \"{role}\": {}",
                error.client_reason()
            ),
            SessionError::Upstream(e) => e.client_message(),
            SessionError::Shutdown => "terminating connection due to administrator command".into(),
            // The rest say in their `Display` exactly what the client is told.
            other => other.to_string(),
        }
    }

    /// Appends the FATAL ErrorResponse that tells the client.
    pub(crate) fn encode(&self, buf: &mut BytesMut) {
        error_response(
            buf,
            self.severity(),
            self.sqlstate(),
            &self.client_message(),
        );
    }

    /// `leasegate_auth_failures_total{reason}` label when this is a refusal of the client,
    /// `None` for failures that are not the client's.
    pub(crate) fn auth_failure_reason(&self) -> Option<AuthFailureReason> {
        use AuthFailureReason as R;
        use SessionError as E;
        Some(match self {
            E::Plaintext => R::Plaintext,
            E::NoClientCert => R::NoClientCert,
            E::Tls(_) => R::TlsHandshake,
            E::LoginTimeout => R::LoginTimeout,
            E::Packet(_) | E::NoAlpn | E::PlaintextPeerCancel | E::GssEncTwice => R::BadStartup,
            E::NegotiationInsideTls | E::BadCertificate(_) | E::NoUser => R::BadStartup,
            E::NegotiationTwice => R::BadStartup,
            E::ProxyHeader(_) => R::BadStartup,
            E::Replication | E::ReplicationValue(_) | E::StartupParameter(_) => R::BadStartup,
            E::Denied { denial, .. } | E::UnixDenied { denial, .. } => denial.label(),
            E::Limited { hit, .. } => hit.label(),
            E::Vault { .. } | E::Upstream(_) | E::Shutdown | E::PeerCredentials(_) => return None,
            E::CredentialLifetime { .. } | E::MaxSessionDuration(_) => return None,
            E::CredentialUnrenewed { .. } => return None,
            E::Terminated(_) => return None,
        })
    }

    /// `leasegate_sessions_total{outcome}` label of a session that ended with this error. (A
    /// session leasegate ended while relaying, with 57P01, counts as `ok`: it served.)
    pub(crate) fn outcome(&self) -> SessionOutcome {
        if self.auth_failure_reason().is_some() {
            SessionOutcome::Rejected
        } else {
            SessionOutcome::Error
        }
    }

    /// `leasegate_tls_handshake_failures_total{reason}` label for a failed handshake.
    pub(crate) fn tls_failure_reason(&self) -> Option<TlsFailureReason> {
        use TlsFailureReason as R;
        let SessionError::Tls(e) = self else {
            return None;
        };
        let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return Some(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                R::Eof
            } else {
                R::Io
            });
        };
        use rustls::{CertificateError as C, Error as E};
        Some(match tls {
            E::InvalidCertificate(C::UnknownIssuer) => R::UnknownCa,
            E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => R::Expired,
            E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => R::NotYetValid,
            E::InvalidCertificate(C::Revoked) => R::Revoked,
            E::InvalidCertificate(_) => R::BadCertificate,
            E::NoApplicationProtocol => R::NoAlpn,
            E::PeerIncompatible(_) => R::Incompatible,
            E::InvalidMessage(_) => R::NotTls,
            _ => R::Other,
        })
    }

    /// Whether the client can still be sent an ErrorResponse (not when TLS itself failed).
    pub(crate) fn reportable(&self) -> bool {
        !matches!(self, SessionError::Tls(_))
    }
}

/// The WARNING (NoticeResponse 01000) leasegate sends `expiry_warning` before it ends a live
/// session; the session goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionNotice {
    /// The credential cannot be renewed further ([`SessionError::CredentialLifetime`] or
    /// [`SessionError::CredentialUnrenewed`] follows).
    CredentialEnding {
        /// The role of the credential.
        role: String,
        /// Time until the session is ended.
        left: Duration,
    },
    /// `max_session_duration` is near ([`SessionError::MaxSessionDuration`] follows).
    MaxSessionEnding {
        /// Time until the session is ended.
        left: Duration,
    },
}

impl SessionNotice {
    /// Always 01000.
    pub(crate) fn sqlstate(&self) -> SqlState {
        SqlState::Warning
    }

    /// A warning: the session continues.
    pub(crate) fn severity(&self) -> Severity {
        Severity::Warning
    }

    /// The message the client sees; the time left is rounded up to whole seconds.
    pub(crate) fn client_message(&self) -> String {
        match self {
            SessionNotice::CredentialEnding { role, left } => format!(
                "the database credential for role \"{role}\" cannot be extended; this session will be ended in {}",
                seconds_rounded_up(*left)
            ),
            SessionNotice::MaxSessionEnding { left } => format!(
                "this session reaches max_session_duration and will be ended in {}",
                seconds_rounded_up(*left)
            ),
        }
    }

    /// Appends the NoticeResponse.
    pub(crate) fn encode(&self, buf: &mut BytesMut) {
        notice_response(
            buf,
            self.severity(),
            self.sqlstate(),
            &self.client_message(),
        );
    }
}

/// "3s" for anything above 2 s up to 3 s: a notice never announces less time than is left.
fn seconds_rounded_up(d: Duration) -> String {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

#[cfg(test)]
#[path = "error_tests.rs"]
mod tests;
