//! TLS session resumption must not let a certificate back in after it expired. rustls clients
//! keep a resumption cache in their `ClientConfig` and offer what they stored on the next
//! connection; a server that resumed would restore the stored client chain without verifying
//! it again. leasegate resumes nothing: every connection is a full handshake that verifies the
//! certificate, so a short-lived certificate (a SPIFFE SVID, a cert-manager certificate) stops
//! working when it expires, as with PostgreSQL.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::{AlertDescription, ClientConfig, HandshakeKind, RootCertStore};

use crate::harness::fixture::{Fixture, GOOD_URI};
use crate::harness::pki::{ClientCert, Identity, Pki};
use crate::harness::security::{creds_requests, wait_tls_failures};
use crate::harness::wire::{PROTOCOL_3_0, Wire, tls_connect};

/// A client config for one TLS version, trusting the test CA, presenting `cert`. Each one is
/// used for several connections, so that its resumption cache comes into play.
fn client_config(
    pki: &Pki,
    cert: &ClientCert,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca_der()).expect("add test CA");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("TLS version")
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert.cert_der.clone()], cert.key_der())
        .expect("client cert and key match");
    Arc::new(config)
}

/// How one connection went: the handshake kind the client saw, and the login's outcome
/// (`Ok` with ReadyForQuery, or the error: a TLS alert shows up here).
struct Attempt {
    kind: Option<HandshakeKind>,
    login: Result<(), std::io::Error>,
}

impl Attempt {
    /// The TLS alert leasegate sent, if the login failed with one.
    fn alert(&self) -> Option<AlertDescription> {
        let err = self.login.as_ref().err()?;
        match err.get_ref()?.downcast_ref::<rustls::Error>()? {
            rustls::Error::AlertReceived(alert) => Some(*alert),
            _ => None,
        }
    }
}

/// SSLRequest, TLS with `config`, StartupMessage as `readonly` on `myapp`, then Terminate.
async fn attempt(port: u16, config: &Arc<ClientConfig>) -> Attempt {
    let tls = match tls_connect(port, config.clone()).await {
        Ok(tls) => tls,
        Err(e) => {
            return Attempt {
                kind: None,
                login: Err(e),
            };
        }
    };
    let kind = tls.get_ref().1.handshake_kind();
    let mut wire = Wire::new(tls);
    let login = match wire
        .startup(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")])
        .await
    {
        Ok(login) if login.messages.last().map(|m| m.tag) == Some(b'Z') => Ok(()),
        Ok(login) => Err(std::io::Error::other(format!("{:?}", login.messages))),
        Err(e) => Err(e),
    };
    if login.is_ok() {
        wire.terminate().await;
    }
    Attempt { kind, login }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_cannot_come_back_through_tls_resumption() {
    let f = Fixture::start("sec-resume").await;
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let mut clients = Vec::new();
    let mut expiry = SystemTime::now();
    for (i, version) in versions.into_iter().enumerate() {
        let (cert, not_after) = f.pki.short_lived_client(
            &format!("short-{i}"),
            Identity::Uri(GOOD_URI.into()),
            Duration::from_secs(12),
        );
        expiry = expiry.max(not_after);
        clients.push((version, client_config(&f.pki, &cert, version)));
    }

    // While the certificates are valid: sessions work, and a second connection with the same
    // ClientConfig (which would offer a stored session) gets a full handshake too.
    for (version, config) in &clients {
        for n in 0..2 {
            let a = attempt(f.proxy.port, config).await;
            if let Err(e) = &a.login {
                panic!("{version:?} session {n} with a valid certificate: {e}");
            }
            assert_eq!(a.kind, Some(HandshakeKind::Full), "{version:?} session {n}");
        }
    }
    let issued = creds_requests(&f.proxy).await;
    assert_eq!(issued, 4.0, "one credential per session");
    let before_expiry = f.issued().await;

    // Wait out the certificates' validity (whole seconds, so one more to be sure).
    let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(left + Duration::from_secs(1)).await;

    // Same ClientConfigs, certificates now expired: the handshake is full and refuses them.
    for (version, config) in &clients {
        let a = attempt(f.proxy.port, config).await;
        assert_ne!(
            a.kind,
            Some(HandshakeKind::Resumed),
            "{version:?}: leasegate resumed a TLS session"
        );
        assert_eq!(
            a.alert(),
            Some(AlertDescription::CertificateExpired),
            "{version:?}: the expired certificate must fail the handshake, got {:?}",
            a.login.as_ref().err()
        );
    }
    wait_tls_failures(&f.proxy, "expired", 2.0).await;
    assert_eq!(
        creds_requests(&f.proxy).await,
        issued,
        "no Vault creds request for an expired certificate"
    );
    f.wait_all_revoked(Duration::from_secs(10)).await;
    f.assert_nothing_issued_since(before_expiry).await;

    // A fresh handshake with a valid certificate still works, and is a full one.
    for version in versions {
        let a = attempt(f.proxy.port, &client_config(&f.pki, &f.good, version)).await;
        if let Err(e) = &a.login {
            panic!("{version:?} with a valid certificate: {e}");
        }
        assert_eq!(a.kind, Some(HandshakeKind::Full), "{version:?}");
    }
    f.wait_all_revoked(Duration::from_secs(10)).await;
}
