//! The mapping of each error and notice to what the client sees.

use super::*;
use crate::protocol::options::OptionsError;

fn code(e: &SessionError) -> &'static str {
    e.sqlstate().code()
}

/// The `leasegate_auth_failures_total{reason}` value, as exported.
fn reason(e: &SessionError) -> Option<&'static str> {
    e.auth_failure_reason().map(AuthFailureReason::as_str)
}

#[test]
fn mapping() {
    let e = SessionError::Plaintext;
    assert_eq!(code(&e), "28000");
    assert_eq!(
        e.client_message(),
        "SSL with a client certificate is required"
    );
    assert_eq!(e.outcome().as_str(), "rejected");
    let e = SessionError::Vault {
        role: "readonly".into(),
        error: VaultError::Unreachable("tcp connect error 10.1.2.3:8200".into()),
    };
    assert_eq!(code(&e), "08006");
    assert!(!e.client_message().contains("10.1.2.3"));
    assert_eq!(e.outcome().as_str(), "error");
    assert_eq!(
        code(&SessionError::Packet(PacketError::UnsupportedVersion(4, 0))),
        "0A000"
    );
}

#[test]
fn handshake_refusals_keep_their_codes_and_texts() {
    for (e, sqlstate, message) in [
        (
            SessionError::NoAlpn,
            "08P01",
            "direct TLS connections must negotiate the ALPN protocol \"postgresql\"",
        ),
        (
            SessionError::PlaintextPeerCancel,
            "08P01",
            "peer cancel requests are only accepted inside TLS",
        ),
        (
            SessionError::GssEncTwice,
            "08P01",
            "GSSENCRequest sent twice",
        ),
        (
            SessionError::NegotiationInsideTls,
            "08P01",
            "encryption negotiation inside TLS is not allowed",
        ),
        (
            SessionError::BadCertificate("client certificate has expired".into()),
            "28000",
            "client certificate has expired",
        ),
        (
            SessionError::NoUser,
            "28000",
            "no PostgreSQL user name specified in startup packet",
        ),
        (
            SessionError::Replication,
            "0A000",
            "replication connections are not supported through leasegate",
        ),
        (
            SessionError::ReplicationValue("may\nbe".into()),
            "22023",
            "invalid value for parameter \"replication\": \"may\\nbe\"",
        ),
        (SessionError::LoginTimeout, "08006", "login timed out"),
    ] {
        assert_eq!((code(&e), e.client_message().as_str()), (sqlstate, message));
        let expected = match e {
            SessionError::LoginTimeout => "login_timeout",
            _ => "bad_startup",
        };
        assert_eq!(reason(&e), Some(expected));
        assert_eq!(e.severity(), Severity::Fatal);
    }
}

#[test]
fn startup_parameter_refusals_take_the_refusals_code_and_quote_the_name() {
    let e = SessionError::StartupParameter(ParamRefusal::NotAllowed("post_auth\"delay".into()));
    assert_eq!(code(&e), "42501");
    assert_eq!(
        e.client_message(),
        "startup parameter \"post_auth\\\"delay\" is not allowed through leasegate"
    );
    let e = SessionError::StartupParameter(ParamRefusal::Options(OptionsError::NoArgument));
    assert_eq!(code(&e), "42601");
    assert_eq!(reason(&e), Some("bad_startup"));
}

#[test]
fn denials_name_identity_role_and_database_escaped() {
    let denied = |denial| SessionError::Denied {
        denial,
        identity: "cn:evil\u{1b}[2J".into(),
        role: "readwrite".into(),
        database: "my\"app".into(),
    };
    let e = denied(Denial::NoGrant);
    assert_eq!(code(&e), "28000");
    assert_eq!(
        e.client_message(),
        "identity \"cn:evil\\u{1b}[2J\" has no grant (asked for role \"readwrite\" on database \
         \"my\\\"app\")"
    );
    assert_eq!(reason(&e), Some("no_grant"));
    let e = denied(Denial::RoleNotGranted);
    assert_eq!(
        e.to_string(),
        "identity \"cn:evil\\u{1b}[2J\" is not granted role \"readwrite\" on database \"my\\\"app\""
    );
    assert_eq!(reason(&e), Some("role_not_granted"));
}

#[test]
fn limit_messages_escape_the_identity() {
    let limited = |hit, identity: &str| SessionError::Limited {
        hit,
        identity: identity.into(),
    };
    let e = limited(LimitHit::IdentitySessions(1), "cn:evil\"\n\u{1b}[2Jx");
    assert_eq!(code(&e), "53300");
    assert_eq!(
        e.client_message(),
        "too many sessions for identity \"cn:evil\\\"\\n\\u{1b}[2Jx\" (limit 1)"
    );
    let long = limited(LimitHit::IdentityRate(1.0), &"y".repeat(300)).client_message();
    assert!(long.contains(&format!("\"{}…\"", "y".repeat(64))), "{long}");
    let e = limited(LimitHit::Global(3), "cn:a");
    assert_eq!(
        e.client_message(),
        "too many sessions through leasegate (limit 3)"
    );
    assert_eq!(reason(&e), Some("global_session_limit"));
}

#[test]
fn leasegate_ending_a_session_is_57p01_after_a_01000_warning() {
    let shutdown = SessionError::Shutdown;
    assert_eq!(code(&shutdown), "57P01");
    assert_eq!(
        shutdown.client_message(),
        "terminating connection due to administrator command"
    );
    let e = SessionError::CredentialLifetime {
        role: "readonly".into(),
    };
    assert_eq!(code(&e), "57P01");
    assert_eq!(
        e.client_message(),
        "terminating connection: the database credential for role \"readonly\" reached its \
         maximum lifetime"
    );
    let e = SessionError::CredentialUnrenewed {
        role: "readonly".into(),
    };
    assert_eq!(code(&e), "57P01");
    assert_eq!(
        e.client_message(),
        "terminating connection: the database credential for role \"readonly\" could not be \
         renewed and is about to expire"
    );
    assert_eq!(reason(&e), None);
    let e = SessionError::MaxSessionDuration(Duration::from_secs(90));
    assert_eq!(
        e.client_message(),
        "terminating connection: the session reached max_session_duration (1m 30s)"
    );
    assert_eq!(reason(&e), None);
    let n = SessionNotice::CredentialEnding {
        role: "readonly".into(),
        left: Duration::from_millis(2001),
    };
    assert_eq!(
        (n.sqlstate().code(), n.severity()),
        ("01000", Severity::Warning)
    );
    assert_eq!(
        n.client_message(),
        "the database credential for role \"readonly\" cannot be extended; this session will \
         be ended in 3s"
    );
    let n = SessionNotice::MaxSessionEnding {
        left: Duration::from_secs(60),
    };
    assert_eq!(
        n.client_message(),
        "this session reaches max_session_duration and will be ended in 1m"
    );
}

#[test]
fn encoded_messages_carry_severity_code_and_text() {
    let mut buf = BytesMut::new();
    SessionError::NoUser.encode(&mut buf);
    assert_eq!(buf[0], b'E');
    let body = String::from_utf8_lossy(&buf[5..]).into_owned();
    assert!(
        body.starts_with("SFATAL\0VFATAL\0C28000\0Mno PostgreSQL user name"),
        "{body:?}"
    );
    buf.clear();
    SessionNotice::MaxSessionEnding {
        left: Duration::from_secs(1),
    }
    .encode(&mut buf);
    assert_eq!(buf[0], b'N');
    let body = String::from_utf8_lossy(&buf[5..]).into_owned();
    assert!(
        body.starts_with("SWARNING\0VWARNING\0C01000\0M"),
        "{body:?}"
    );
}

#[test]
fn announced_time_is_rounded_up() {
    assert_eq!(seconds_rounded_up(Duration::from_millis(990)), "1s");
    assert_eq!(seconds_rounded_up(Duration::from_millis(2000)), "2s");
    assert_eq!(seconds_rounded_up(Duration::from_millis(2001)), "3s");
    assert_eq!(seconds_rounded_up(Duration::from_secs(61)), "1m 1s");
}

#[test]
fn an_operator_end_is_57p01_naming_the_reason() {
    let e = EndReason::Operator("compromised key".into()).error();
    assert_eq!(code(&e), "57P01");
    assert_eq!(
        e.client_message(),
        "terminated by the operator: compromised key"
    );
    assert_eq!(reason(&e), None, "not a refusal of the client");
    let e = EndReason::GrantRemoved.error();
    assert_eq!(
        e.client_message(),
        "terminated by the operator: grant removed"
    );
    assert_eq!(EndReason::GrantRemoved.label().as_str(), "grant_removed");
}

#[test]
fn a_unix_denial_names_the_local_user_and_uid() {
    let e = SessionError::UnixDenied {
        denial: Denial::NoGrant,
        identity: "unix:user=nobody".into(),
        uid: 65534,
        role: "readonly".into(),
        database: "myapp".into(),
    };
    assert_eq!(code(&e), "28000");
    assert_eq!(
        e.client_message(),
        "local user \"unix:user=nobody\" (uid 65534) has no grant (asked for role \"readonly\" \
         on database \"myapp\")"
    );
    assert_eq!(reason(&e), Some("no_grant"));
    assert_eq!(code(&SessionError::NegotiationTwice), "08P01");
    assert_eq!(reason(&SessionError::PeerCredentials("x".into())), None);
}

#[test]
fn out_of_file_descriptors_is_53300_and_says_so_not_that_vault_or_postgres_failed() {
    let emfile = || std::io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
    let vault = SessionError::Vault {
        role: "readonly".into(),
        error: VaultError::NoDescriptors("tcp open error: Too many open files".into()),
    };
    assert_eq!(code(&vault), "53300");
    assert_eq!(
        vault.client_message(),
        "could not obtain credentials for role \"readonly\": leasegate has no file descriptor \
         left (its open-file limit is reached)"
    );
    let upstream = SessionError::Upstream(crate::upstream::UpstreamError::Connect {
        database: "myapp".into(),
        error: emfile(),
    });
    assert_eq!(code(&upstream), "53300");
    assert_eq!(
        upstream.client_message(),
        "leasegate has no file descriptor left to connect to upstream for database \"myapp\" \
         (its open-file limit is reached)"
    );
    let refused = SessionError::Upstream(crate::upstream::UpstreamError::Connect {
        database: "myapp".into(),
        error: std::io::ErrorKind::ConnectionRefused.into(),
    });
    assert_eq!(code(&refused), "08006");
}
