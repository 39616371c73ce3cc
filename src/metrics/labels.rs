//! The label sets of leasegate's metrics, as types: each fixed set is an enum with `ALL` and
//! `as_str()` (the exported value), and is itself a Prometheus label set, so a family
//! declared over it accepts nothing else. Labels whose values come from the configuration
//! (`database`, `role`) or the build (`version`) are newtypes naming their label. README's
//! metric table lists these values; a test compares the two.

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
#[cfg(test)]
use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};

/// A metric's labels as README documents them: each label's name and its fixed values
/// (empty for values from the configuration or the build). Test-only: the README check.
#[cfg(test)]
pub(crate) trait LabelSchema {
    /// The labels, in the order they are exported.
    fn labels() -> Vec<(&'static str, &'static [&'static str])>;
}

#[cfg(test)]
impl LabelSchema for Counter {
    fn labels() -> Vec<(&'static str, &'static [&'static str])> {
        Vec::new()
    }
}

#[cfg(test)]
impl LabelSchema for Gauge {
    fn labels() -> Vec<(&'static str, &'static [&'static str])> {
        Vec::new()
    }
}

#[cfg(test)]
impl LabelSchema for Histogram {
    fn labels() -> Vec<(&'static str, &'static [&'static str])> {
        Vec::new()
    }
}

#[cfg(test)]
impl<S: LabelSchema, M, C> LabelSchema for Family<S, M, C> {
    fn labels() -> Vec<(&'static str, &'static [&'static str])> {
        S::labels()
    }
}

#[cfg(test)]
impl<A: LabelSchema, B: LabelSchema> LabelSchema for (A, B) {
    fn labels() -> Vec<(&'static str, &'static [&'static str])> {
        let mut labels = A::labels();
        labels.extend(B::labels());
        labels
    }
}

/// A label with a fixed set of values, each a Prometheus label set of its own.
pub(crate) trait FixedLabel: EncodeLabelSet + Copy + Eq + std::hash::Hash + 'static {
    /// Every value.
    fn all() -> &'static [Self];
}

/// Declares a fixed label set: the enum, `ALL`, `as_str()`, and its encoding as a label set.
macro_rules! label_set {
    ($(#[$doc:meta])* $name:ident = $label:literal {
        $($(#[$vdoc:meta])* $variant:ident => $text:literal,)+
    }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub(crate) enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in README's order.
            pub(crate) const ALL: &[$name] = &[$($name::$variant),+];
            /// The exported value.
            pub(crate) const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl FixedLabel for $name {
            fn all() -> &'static [Self] {
                $name::ALL
            }
        }

        impl EncodeLabelSet for $name {
            fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
                [($label, self.as_str())].encode(encoder)
            }
        }

        #[cfg(test)]
        impl LabelSchema for $name {
            fn labels() -> Vec<(&'static str, &'static [&'static str])> {
                const VALUES: &[&str] = &[$($text),+];
                vec![($label, VALUES)]
            }
        }
    };
}

/// Declares a label whose value comes from the configuration or the build.
macro_rules! open_label {
    ($(#[$doc:meta])* $name:ident = $label:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub(crate) struct $name(pub(crate) String);

        impl EncodeLabelSet for $name {
            fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
                [($label, self.0.as_str())].encode(encoder)
            }
        }

        #[cfg(test)]
        impl LabelSchema for $name {
            fn labels() -> Vec<(&'static str, &'static [&'static str])> {
                vec![($label, &[])]
            }
        }
    };
}

label_set! {
    /// `leasegate_sessions_total{outcome}`: how a connection ended.
    SessionOutcome = "outcome" {
        /// Served to its end.
        Ok => "ok",
        /// Refused for the client's fault ([`AuthFailureReason`] says why).
        Rejected => "rejected",
        /// Failed for another reason (Vault, upstream, shutdown).
        Error => "error",
    }
}

label_set! {
    /// `leasegate_session_setup_duration_seconds{phase}`.
    SetupPhase = "phase" {
        /// Accept to StartupMessage read.
        Tls => "tls",
        /// The credential from Vault (or prefetch).
        Vault => "vault",
        /// Upstream connect and login.
        UpstreamLogin => "upstream_login",
        /// Accept to ready for the client.
        Total => "total",
    }
}

label_set! {
    /// `leasegate_auth_failures_total{reason}`: why a client was refused before a credential.
    AuthFailureReason = "reason" {
        /// StartupMessage without TLS.
        Plaintext => "plaintext",
        /// TLS without a client certificate.
        NoClientCert => "no_client_cert",
        /// The TLS handshake failed.
        TlsHandshake => "tls_handshake",
        /// `login_timeout` passed.
        LoginTimeout => "login_timeout",
        /// A startup packet, parameter or negotiation step leasegate refuses.
        BadStartup => "bad_startup",
        /// No grant matches the identity.
        NoGrant => "no_grant",
        /// The grants do not cover the database.
        DatabaseNotGranted => "database_not_granted",
        /// The grants do not cover the role.
        RoleNotGranted => "role_not_granted",
        /// `limits.max_sessions`.
        GlobalSessionLimit => "global_session_limit",
        /// `limits.max_sessions_per_identity`.
        IdentitySessionLimit => "identity_session_limit",
        /// `limits.new_sessions_per_second_per_identity`.
        IdentityRateLimit => "identity_rate_limit",
    }
}

label_set! {
    /// `leasegate_tls_handshake_failures_total{reason}`.
    TlsFailureReason = "reason" {
        /// The certificate does not chain to `client_ca`.
        UnknownCa => "unknown_ca",
        /// The certificate expired.
        Expired => "expired",
        /// The certificate is not valid yet.
        NotYetValid => "not_yet_valid",
        /// The certificate is on a CRL.
        Revoked => "revoked",
        /// Any other certificate problem.
        BadCertificate => "bad_certificate",
        /// Direct TLS without ALPN `postgresql`.
        NoAlpn => "no_alpn",
        /// No protocol version or cipher in common.
        Incompatible => "incompatible",
        /// Not TLS at all.
        NotTls => "not_tls",
        /// The client closed the connection.
        Eof => "eof",
        /// A socket error.
        Io => "io",
        /// Anything else rustls reports.
        Other => "other",
    }
}

label_set! {
    /// `leasegate_vault_request*{op}`: which Vault call.
    VaultOp = "op" {
        /// `<mount>/creds/<role>`.
        Creds => "creds",
        /// `sys/leases/renew`.
        Renew => "renew",
        /// `sys/leases/revoke`.
        Revoke => "revoke",
        /// `auth/<mount>/login`.
        Login => "login",
        /// `auth/token/lookup-self`.
        Lookup => "lookup",
        /// `auth/token/renew-self`.
        RenewSelf => "renew_self",
        /// `auth/token/revoke-self`.
        RevokeSelf => "revoke_self",
        /// `LIST sys/leases/lookup/<mount>/creds/<role>/` (`leases check`).
        ListLeases => "list_leases",
        /// `sys/leases/lookup` of one lease (`leases check`).
        LookupLease => "lookup_lease",
    }
}

label_set! {
    /// `leasegate_vault_requests_total{status}`: how a Vault call ended.
    VaultStatus = "status" {
        /// Success.
        Success => "2xx",
        /// A redirect out of `vault.address`'s origin, not followed.
        Redirect => "3xx",
        /// A client error.
        ClientError => "4xx",
        /// A server error.
        ServerError => "5xx",
        /// `vault.timeout` passed.
        Timeout => "timeout",
        /// No answer (connect, TLS, DNS).
        Unreachable => "unreachable",
    }
}

label_set! {
    /// `leasegate_vault_auth_renewals_total{result}`: upkeep of leasegate's own Vault token.
    VaultAuthResult = "result" {
        /// The token was renewed.
        Ok => "ok",
        /// A renewal or login failed.
        Error => "error",
        /// leasegate logged in (again).
        Login => "login",
        /// A token leasegate logged in for was revoked.
        Revoked => "revoked",
    }
}

label_set! {
    /// `leasegate_config_reloads_total{result}`: what became of a reload.
    ReloadResult = "result" {
        /// The new configuration is in force.
        Ok => "ok",
        /// Refused (it does not load or validate); the running one stays.
        Error => "error",
    }
}

label_set! {
    /// `leasegate_lease_renewals_total{result}` and `leasegate_lease_revocations_total{result}`.
    LeaseResult = "result" {
        /// Done.
        Ok => "ok",
        /// Failed (for a revocation: given up after retries).
        Error => "error",
    }
}

label_set! {
    /// `leasegate_cancel_requests_total{result}`: what became of a cancel request.
    CancelResult = "result" {
        /// Sent upstream: the key of a session here.
        Forwarded => "forwarded",
        /// Unknown here, forwarded to the peers.
        ToPeers => "to_peers",
        /// Unknown key, dropped.
        UnknownKey => "unknown_key",
        /// A PeerCancelRequest from a certificate that is not a peer's.
        NotPeer => "not_peer",
        /// Over `cancels_per_second[_per_address]`.
        RateLimited => "rate_limited",
        /// Over `max_concurrent_cancels`.
        OverCapacity => "over_capacity",
        /// The cancel's work overran its limit.
        TimedOut => "timed_out",
    }
}

label_set! {
    /// `leasegate_cancel_peer_forwards_total{result}`, per peer address.
    PeerForwardResult = "result" {
        /// Sent.
        Sent => "sent",
        /// Unreachable, TLS failed or timed out.
        Failed => "failed",
    }
}

label_set! {
    /// `leasegate_upstream_errors_total{kind}`.
    UpstreamErrorKind = "kind" {
        /// TCP connect failed.
        Connect => "connect",
        /// `connect_timeout` passed.
        Timeout => "timeout",
        /// Upstream TLS failed.
        Tls => "tls",
        /// The upstream refused the login.
        Rejected => "rejected",
        /// An authentication method not allowed, or SCRAM failed.
        Auth => "auth",
        /// The upstream broke the protocol.
        Protocol => "protocol",
        /// The connection failed during login.
        Io => "io",
    }
}

label_set! {
    /// `leasegate_upstream_closes_total{how}`: how a session's upstream connection ended.
    UpstreamClose = "how" {
        /// Idle at ReadyForQuery: Terminate, and the server closed.
        Idle => "idle",
        /// A statement, COPY or pipeline was running: cancelled first, then closed in time.
        Busy => "busy",
        /// The server had closed the connection already.
        Gone => "gone",
        /// The backend did not close in time; the lease was revoked anyway.
        Timeout => "timeout",
    }
}

label_set! {
    /// `leasegate_relayed_bytes_total{direction}`.
    RelayDirection = "direction" {
        /// Client to upstream.
        ToUpstream => "to_upstream",
        /// Upstream to client.
        ToClient => "to_client",
    }
}

label_set! {
    /// `leasegate_warm_sessions_total{result}`: what became of a client that could use a warm
    /// session, or of a warm session the server closed.
    WarmResult = "result" {
        /// A warm session was handed to the client.
        Hit => "hit",
        /// None was ready for its database, role and startup parameters: the cold path.
        Miss => "miss",
        /// A warm session the server had closed, found and discarded (never handed out).
        Gone => "gone",
    }
}

label_set! {
    /// `leasegate_sessions_ended_total{reason}`: why a session that passed the grant check
    /// ended (each counts once).
    SessionEndReason = "reason" {
        /// `leasegate sessions end`.
        Operator => "operator",
        /// A reload removed its grant (`listen.end_sessions_on_revoke`).
        GrantRemoved => "grant_removed",
        /// The credential's maximum lifetime or `max_session_duration`.
        MaxLifetime => "max_lifetime",
        /// leasegate shut down.
        Shutdown => "shutdown",
        /// The client closed or its connection failed.
        Client => "client",
        /// The upstream closed or failed while relaying.
        Upstream => "upstream",
        /// Setup failed (Vault, upstream login) or anything else.
        Error => "error",
    }
}

label_set! {
    /// `leasegate_admin_requests_total{command}`: what the admin socket was asked.
    AdminCommand = "command" {
        /// `sessions list`.
        SessionsList => "sessions_list",
        /// `sessions end`.
        SessionsEnd => "sessions_end",
        /// `leases check` (with or without `--revoke`).
        LeasesCheck => "leases_check",
        /// Anything else (unknown path or method).
        Other => "other",
    }
}

label_set! {
    /// `leasegate_admin_requests_total{result}`: how an admin request ended.
    AdminResult = "result" {
        /// Answered.
        Ok => "ok",
        /// `sessions end` matched nothing.
        NoMatch => "no_match",
        /// A malformed request (bad pattern, bad reason, unknown path).
        BadRequest => "bad_request",
        /// The caller's uid is neither leasegate's nor root's.
        Refused => "refused",
        /// Vault failed during `leases check`.
        Error => "error",
    }
}

open_label! {
    /// `database`: a `[[databases]]` name from the configuration.
    DatabaseLabel = "database"
}

open_label! {
    /// `role`: a role a `[[databases]]` entry lists.
    RoleLabel = "role"
}

open_label! {
    /// `version`: the build's version.
    VersionLabel = "version"
}
