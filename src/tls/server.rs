//! The client-facing TLS acceptor. Client certificates must chain to `client_ca` (and pass the
//! CRLs); a client that presents no certificate still completes the handshake so that it can be
//! told, in PostgreSQL's own error format, that a certificate is required.
//!
//! TLS session resumption is off, as in PostgreSQL: rustls restores a resumed session's client
//! chain without verifying it again, so an expired or since-revoked certificate could come
//! back in through a session opened while it was still good. No session cache, no TLS 1.2
//! tickets, no TLS 1.3 tickets: every handshake is a full one and verifies the certificate.

use std::sync::Arc;

use rustls::pki_types::CertificateRevocationListDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use tokio_rustls::TlsAcceptor;

use super::{TlsError, load_certs, load_key, load_roots, provider};
use crate::config::ListenConfig;
use crate::escape::logged;

/// ALPN protocol id PostgreSQL 17 clients offer.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Builds the acceptor from the `[listen]` section.
/// (The key's permissions are checked with the other secret files when the configuration
/// loads: `Config::validate`.)
pub fn acceptor(listen: &ListenConfig) -> Result<TlsAcceptor, TlsError> {
    let certs = load_certs(&listen.cert)?;
    let key = load_key(&listen.key)?;
    for warning in intermediate_anchors(&listen.client_ca)? {
        tracing::warn!("{warning}");
    }
    let verifier = client_verifier(listen, true)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(super::VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    disable_resumption(&mut config);
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// No stateful resumption (session IDs, TLS 1.3 stateful tickets) and no stateless tickets.
fn disable_resumption(config: &mut rustls::ServerConfig) {
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    // The builder's default ticketer never produces tickets; say so rather than rely on it.
    config.ticketer = Arc::new(NeverProducesTickets);
}

/// A ticketer that is disabled: no TLS 1.2 session tickets.
#[derive(Debug)]
struct NeverProducesTickets;

impl rustls::server::ProducesTickets for NeverProducesTickets {
    fn enabled(&self) -> bool {
        false
    }
    fn lifetime(&self) -> u32 {
        0
    }
    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// The client-certificate verifier of `[listen]`: chain to `client_ca`, the CRLs, the
/// clientAuth usage. `allow_anonymous` lets a client without a certificate finish the
/// handshake (to be told in PostgreSQL's format that it needs one).
pub fn client_verifier(
    listen: &ListenConfig,
    allow_anonymous: bool,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let roots = load_roots(&listen.client_ca)?;
    let mut crls = Vec::new();
    for path in &listen.crl {
        crls.extend(load_crls(path)?);
    }
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).with_crls(crls);
    let builder = if allow_anonymous {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder
        .build()
        .map_err(|e| TlsError::Invalid(format!("client_ca: {e}")))
}

/// One warning per certificate in `client_ca` that is not self-signed (its issuer is another
/// name, or its own key does not verify its signature). rustls makes every certificate there
/// a trust anchor: a chain through such an intermediate stops at it, so its own expiry and
/// its issuer's CRL are never checked.
pub fn intermediate_anchors(path: &std::path::Path) -> Result<Vec<String>, TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let mut warnings = Vec::new();
    for cert in load_certs(path)? {
        let (_, x509) = X509Certificate::from_der(cert.as_ref())
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))?;
        let self_issued = x509.issuer().as_raw() == x509.subject().as_raw();
        if self_issued && x509.verify_signature(None).is_ok() {
            continue;
        }
        warnings.push(format!(
            "listen.client_ca: {} holds certificate {} issued by {}, which is not self-signed: \
             it becomes a trust anchor, so its own expiry and its issuer's CRL no longer apply \
             to client certificates issued through it; put the root CA in client_ca and let \
             clients send the intermediate with their certificate",
            path.display(),
            logged(&x509.subject().to_string()),
            logged(&x509.issuer().to_string()),
        ));
    }
    Ok(warnings)
}

fn load_crls(
    path: &std::path::Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.display().to_string(),
        error,
    })?;
    if !data.starts_with(b"-----") {
        return Ok(vec![CertificateRevocationListDer::from(data)]);
    }
    CertificateRevocationListDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, SanType,
    };
    use rustls::HandshakeKind;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn ca_params(cn: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
    }

    /// A CA, a server certificate for localhost and a client certificate, as files and as a
    /// `[listen]` section naming them.
    struct Files {
        _dir: tempfile::TempDir,
        listen: ListenConfig,
        ca: rustls::pki_types::CertificateDer<'static>,
        client: (rustls::pki_types::CertificateDer<'static>, Vec<u8>),
    }

    fn files() -> Files {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca =
            CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
        let server_key = KeyPair::generate().expect("key");
        let server = CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .signed_by(&server_key, &ca)
            .expect("server cert");
        let client_key = KeyPair::generate().expect("key");
        let mut client_params = CertificateParams::default();
        client_params
            .subject_alt_names
            .push(SanType::URI("spiffe://t/app".try_into().expect("uri")));
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params
            .signed_by(&client_key, &ca)
            .expect("client cert");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            path
        };
        let listen = toml::from_str(&format!(
            "address = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            write("server.pem", &server.pem()),
            write("server-key.pem", &server_key.serialize_pem()),
            write("ca.pem", &ca.pem()),
        ))
        .expect("[listen]");
        Files {
            _dir: dir,
            listen,
            ca: ca.der().clone(),
            client: (client.der().clone(), client_key.serialize_der()),
        }
    }

    /// One connection: handshake with `client`, one byte from the server (so the client has
    /// processed any ticket sent after the handshake); how each side says it went.
    async fn handshake(
        acceptor: &TlsAcceptor,
        client: &Arc<rustls::ClientConfig>,
    ) -> (Option<HandshakeKind>, Option<HandshakeKind>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = acceptor.clone();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut tls = acceptor.accept(tcp).await.expect("server handshake");
            tls.write_all(b"x").await.expect("write");
            tls.flush().await.expect("flush");
            let kind = tls.get_ref().1.handshake_kind();
            let _ = tls.read_u8().await;
            kind
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(client.clone())
            .connect(name, tcp)
            .await
            .expect("client handshake");
        assert_eq!(tls.read_u8().await.expect("read"), b'x');
        let client_kind = tls.get_ref().1.handshake_kind();
        let _ = tls.shutdown().await;
        (client_kind, server.await.expect("server task"))
    }

    #[tokio::test]
    async fn no_client_handshake_is_ever_resumed() {
        let f = files();
        let acceptor = acceptor(&f.listen).expect("acceptor");
        let config = acceptor.config();
        assert!(!config.session_storage.can_cache(), "no session cache");
        assert_eq!(config.send_tls13_tickets, 0, "no TLS 1.3 tickets");
        assert!(!config.ticketer.enabled(), "no TLS 1.2 tickets");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(f.ca.clone()).expect("root");
        for version in VERSIONS_EACH {
            // One ClientConfig for every connection: rustls clients keep a resumption cache
            // and offer what they stored on the next handshake.
            let client = rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[version])
                .expect("version")
                .with_root_certificates(roots.clone())
                .with_client_auth_cert(
                    vec![f.client.0.clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(f.client.1.clone())),
                )
                .expect("client config");
            let client = Arc::new(client);
            for attempt in 0..3 {
                let kinds = handshake(&acceptor, &client).await;
                assert_eq!(
                    kinds,
                    (Some(HandshakeKind::Full), Some(HandshakeKind::Full)),
                    "{version:?} connection {attempt}: (client, server) handshake kinds"
                );
            }
        }
    }

    const VERSIONS_EACH: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];

    #[test]
    fn only_self_signed_certificates_pass_as_trust_anchors() {
        let root_key = KeyPair::generate().expect("key");
        let root = ca_params("test root").self_signed(&root_key).expect("root");
        let root_params = ca_params("test root");
        let issuer = Issuer::from_params(&root_params, &root_key);
        let inter_key = KeyPair::generate().expect("key");
        let inter = ca_params("test intermediate")
            .signed_by(&inter_key, &issuer)
            .expect("intermediate");
        // Same name as the root, another key: self-issued but not self-signed.
        let impostor_key = KeyPair::generate().expect("key");
        let impostor = ca_params("test root")
            .signed_by(&impostor_key, &issuer)
            .expect("impostor");

        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("client-ca.pem");
        let write = |pems: &[&str]| std::fs::write(&bundle, pems.concat()).expect("write");
        write(&[&root.pem()]);
        assert!(intermediate_anchors(&bundle).expect("loads").is_empty());

        write(&[&root.pem(), &inter.pem(), &impostor.pem()]);
        let warnings = intermediate_anchors(&bundle).expect("loads");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("\"CN=test intermediate\"")
                && warnings[0].contains("issued by \"CN=test root\"")
                && warnings[0].contains("trust anchor")
                && warnings[0].contains("CRL"),
            "{}",
            warnings[0]
        );
        assert!(warnings[1].contains("\"CN=test root\""), "{}", warnings[1]);
    }
}
