//! Every error type states its cause once: in its message or as its `source()`, never both
//! (anyhow's `{:#}` prints the whole chain, so a cause in both is printed twice). Test-only;
//! it sits at the crate root because it builds one value of every error type.

use std::error::Error;
use std::io;
use std::path::PathBuf;

use crate::app::StartError;
use crate::config::ConfigError;
use crate::error::SessionError;
use crate::limits::LimitHit;
use crate::policy::Denial;
use crate::protocol::options::OptionsError;
use crate::protocol::startup::PacketError;
use crate::tls::TlsError;
use crate::upstream::UpstreamError;
use crate::upstream::params::ParamRefusal;
use crate::vault::VaultError;

/// Fails when any error in `e`'s chain repeats the message of its `source()`.
#[track_caller]
fn assert_cause_once(e: &(dyn Error + 'static)) {
    let mut level: &(dyn Error + 'static) = e;
    while let Some(source) = level.source() {
        let (outer, inner) = (level.to_string(), source.to_string());
        assert!(
            !outer.contains(&inner),
            "{outer:?} repeats its source {inner:?} (chain of {e:?})"
        );
        level = source;
    }
}

fn os_error() -> io::Error {
    io::Error::from_raw_os_error(2)
}

fn config_errors() -> Vec<ConfigError> {
    vec![
        ConfigError::Read {
            path: PathBuf::from("/nope"),
            error: os_error(),
        },
        ConfigError::Parse {
            path: PathBuf::from("/x.toml"),
            message: "unknown field".into(),
        },
        ConfigError::Invalid(vec!["a".into(), "b".into()]),
    ]
}

fn tls_errors() -> Vec<TlsError> {
    vec![
        TlsError::Read {
            path: "/nope.pem".into(),
            error: os_error(),
        },
        TlsError::Invalid("no certificate".into()),
        TlsError::Rustls(rustls::Error::NoCertificatesPresented),
    ]
}

fn vault_errors() -> Vec<VaultError> {
    let status = reqwest::StatusCode::FORBIDDEN;
    vec![
        VaultError::NoToken,
        VaultError::TokenFile("/token".into(), os_error()),
        VaultError::Setup("bad CA".into()),
        VaultError::Timeout(std::time::Duration::from_secs(5)),
        VaultError::Unreachable("connection refused".into()),
        VaultError::Status {
            status,
            detail: "permission denied".into(),
        },
        VaultError::Malformed("missing field".into()),
        VaultError::Redirected {
            status: reqwest::StatusCode::FOUND,
            to: "http://elsewhere:80".into(),
            from: "http://vault:8200".into(),
        },
    ]
}

fn upstream_errors() -> Vec<UpstreamError> {
    vec![
        UpstreamError::Connect {
            database: "myapp".into(),
            error: io::Error::from(io::ErrorKind::ConnectionRefused),
        },
        UpstreamError::Timeout("myapp".into()),
        UpstreamError::Tls {
            database: "myapp".into(),
            reason: "the server does not accept TLS".into(),
        },
        UpstreamError::Rejected {
            code: "3D000".into(),
            message: "database does not exist".into(),
            raw: bytes::Bytes::new(),
        },
        UpstreamError::AuthMethod("cleartext".into()),
        UpstreamError::Scram("bad signature".into()),
        UpstreamError::Protocol("unexpected message".into()),
        UpstreamError::from(io::Error::from(io::ErrorKind::UnexpectedEof)),
    ]
}

fn packet_errors() -> Vec<PacketError> {
    vec![
        PacketError::from(io::Error::from(io::ErrorKind::UnexpectedEof)),
        PacketError::BadLength(3),
        PacketError::UnsupportedVersion(4, 0),
        PacketError::Malformed("truncated".into()),
        PacketError::NotUtf8("\"user\"".into()),
    ]
}

fn session_errors() -> Vec<SessionError> {
    let mut all = vec![
        SessionError::Plaintext,
        SessionError::NoClientCert,
        SessionError::Tls(os_error()),
        SessionError::LoginTimeout,
        SessionError::NoAlpn,
        SessionError::PlaintextPeerCancel,
        SessionError::GssEncTwice,
        SessionError::NegotiationInsideTls,
        SessionError::BadCertificate("client certificate has expired".into()),
        SessionError::NoUser,
        SessionError::Replication,
        SessionError::ReplicationValue("maybe".into()),
        SessionError::StartupParameter(ParamRefusal::NotAllowed("work_mem".into())),
        SessionError::Denied {
            denial: Denial::NoGrant,
            identity: "cn:a".into(),
            role: "readonly".into(),
            database: "myapp".into(),
        },
        SessionError::Limited {
            hit: LimitHit::Global(1),
            identity: "cn:a".into(),
        },
        SessionError::Shutdown,
        SessionError::CredentialLifetime {
            role: "readonly".into(),
        },
        SessionError::CredentialUnrenewed {
            role: "readonly".into(),
        },
        SessionError::MaxSessionDuration(std::time::Duration::from_secs(60)),
    ];
    all.extend(packet_errors().into_iter().map(SessionError::Packet));
    all.extend(upstream_errors().into_iter().map(SessionError::Upstream));
    all.extend(vault_errors().into_iter().map(|error| SessionError::Vault {
        role: "readonly".into(),
        error,
    }));
    all
}

#[test]
fn every_error_states_its_cause_once() {
    for e in config_errors() {
        assert_cause_once(&e);
        assert_cause_once(anyhow::Error::from(e).as_ref());
    }
    for e in tls_errors() {
        assert_cause_once(&e);
        assert_cause_once(&StartError::from(e));
    }
    for e in vault_errors() {
        assert_cause_once(&e);
        assert_cause_once(&StartError::Vault(e));
    }
    assert_cause_once(&StartError::Bind(([127, 0, 0, 1], 1).into(), os_error()));
    assert_cause_once(&StartError::Audit(os_error()));
    for e in session_errors() {
        assert_cause_once(&e);
    }
    for e in [
        OptionsError::NoArgument,
        OptionsError::NoValue("x".into()),
        OptionsError::Argument("y".into()),
    ] {
        assert_cause_once(&e);
    }
}

#[test]
fn a_cause_kept_in_the_message_is_not_also_a_source() {
    let read = ConfigError::Read {
        path: PathBuf::from("/nope"),
        error: os_error(),
    };
    assert!(read.to_string().contains(&os_error().to_string()));
    assert!(read.source().is_none());
    let e = SessionError::Vault {
        role: "readonly".into(),
        error: VaultError::TokenFile("/token".into(), os_error()),
    };
    assert!(e.source().is_none(), "{e}");
    // anyhow prints the chain: the OS error appears once.
    let printed = format!("{:#}", anyhow::Error::from(read));
    assert_eq!(
        printed.matches(&os_error().to_string()).count(),
        1,
        "{printed}"
    );
}
