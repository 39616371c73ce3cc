//! The SQLSTATE codes leasegate itself sends to clients, named as PostgreSQL's
//! `errcodes.txt` names them. Every ErrorResponse and NoticeResponse leasegate writes takes
//! one of these (an upstream's own ErrorResponse is forwarded as received); README's table
//! of errors clients see lists exactly this set, which a test checks.

/// A SQLSTATE leasegate reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SqlState {
    /// 01000: the WARNING before leasegate ends a session.
    Warning,
    /// 08004: the upstream asked for an authentication method leasegate does not allow.
    SqlserverRejectedEstablishmentOfSqlconnection,
    /// 08006: Vault or the upstream failed, the login timed out.
    ConnectionFailure,
    /// 08P01: a startup packet or negotiation step out of protocol.
    ProtocolViolation,
    /// 0A000: a protocol version or replication connection leasegate does not support.
    FeatureNotSupported,
    /// 22023: a startup parameter value PostgreSQL would not read either.
    InvalidParameterValue,
    /// 28000: no TLS, no certificate, no grant, no user name.
    InvalidAuthorizationSpecification,
    /// 42501: a startup parameter leasegate does not let through.
    InsufficientPrivilege,
    /// 42601: `options` PostgreSQL could not read.
    SyntaxError,
    /// 53300: a session limit.
    TooManyConnections,
    /// 57P01: leasegate ends the session (credential lifetime, max_session_duration,
    /// shutdown).
    AdminShutdown,
}

impl SqlState {
    /// Every code leasegate sends (for the checks against README).
    #[cfg(test)]
    pub(crate) const ALL: &[SqlState] = &[
        SqlState::Warning,
        SqlState::SqlserverRejectedEstablishmentOfSqlconnection,
        SqlState::ConnectionFailure,
        SqlState::ProtocolViolation,
        SqlState::FeatureNotSupported,
        SqlState::InvalidParameterValue,
        SqlState::InvalidAuthorizationSpecification,
        SqlState::InsufficientPrivilege,
        SqlState::SyntaxError,
        SqlState::TooManyConnections,
        SqlState::AdminShutdown,
    ];

    /// The five-character code as sent on the wire.
    pub(crate) const fn code(self) -> &'static str {
        match self {
            SqlState::Warning => "01000",
            SqlState::SqlserverRejectedEstablishmentOfSqlconnection => "08004",
            SqlState::ConnectionFailure => "08006",
            SqlState::ProtocolViolation => "08P01",
            SqlState::FeatureNotSupported => "0A000",
            SqlState::InvalidParameterValue => "22023",
            SqlState::InvalidAuthorizationSpecification => "28000",
            SqlState::InsufficientPrivilege => "42501",
            SqlState::SyntaxError => "42601",
            SqlState::TooManyConnections => "53300",
            SqlState::AdminShutdown => "57P01",
        }
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_sqlstates() {
        let mut codes: Vec<&str> = SqlState::ALL.iter().map(|s| s.code()).collect();
        assert!(codes.iter().all(|c| {
            c.len() == 5
                && c.bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
        }));
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), SqlState::ALL.len());
    }
}
