//! Handshake state-machine tests over loopback sockets: downgrade and pipelining attempts,
//! direct TLS with and without ALPN, missing client certificates.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

struct Pki {
    acceptor: TlsAcceptor,
    roots: rustls::RootCertStore,
    client_chain: Vec<CertificateDer<'static>>,
    client_key: Vec<u8>,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test ca");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let server_key = KeyPair::generate().expect("key");
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&server_key, &ca)
        .expect("server cert");
    let client_key = KeyPair::generate().expect("key");
    let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    client_params.subject_alt_names.push(SanType::URI(
        "spiffe://example.org/app/test".try_into().expect("uri"),
    ));
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params
        .signed_by(&client_key, &ca)
        .expect("client cert");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).expect("root");
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots.clone()),
        crate::tls::provider(),
    )
    .allow_unauthenticated()
    .build()
    .expect("verifier");
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(crate::tls::VERSIONS)
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .expect("server config");
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Pki {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        roots,
        client_chain: vec![client.der().clone()],
        client_key: client_key.serialize_der(),
    }
}

impl Pki {
    fn connector(&self, with_cert: bool, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(crate::tls::VERSIONS)
            .expect("versions")
            .with_root_certificates(self.roots.clone());
        let mut config = if with_cert {
            builder
                .with_client_auth_cert(
                    self.client_chain.clone(),
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.client_key.clone())),
                )
                .expect("client auth")
        } else {
            builder.with_no_client_auth()
        };
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

/// A listener whose single connection runs `accept`; returns the client socket and the result.
async fn serve_one(
    pki: &Pki,
) -> (
    TcpStream,
    tokio::task::JoinHandle<Result<Accepted, SessionError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = pki.acceptor.clone();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        accept(tcp, &acceptor).await
    });
    (TcpStream::connect(addr).await.expect("connect"), server)
}

fn startup_packet() -> Vec<u8> {
    let body = b"\0\x03\0\0user\0readonly\0database\0myapp\0\0";
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend_from_slice(body);
    p
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSS_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

/// SSLRequest, the server's `S`, then the TLS handshake (with or without a client certificate).
async fn tls_after_ssl_request(
    pki: &Pki,
    mut client: TcpStream,
    with_cert: bool,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    client.write_all(&SSL_REQUEST).await.expect("write");
    assert_eq!(client.read_u8().await.expect("answer"), b'S');
    let name = ServerName::try_from("localhost").expect("name");
    pki.connector(with_cert, &[])
        .connect(name, client)
        .await
        .expect("tls")
}

/// Reads one backend message and returns (type, SQLSTATE, message) of an ErrorResponse.
async fn read_error<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u8, String, String) {
    let tag = s.read_u8().await.expect("tag");
    let len = s.read_u32().await.expect("len") as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await.expect("body");
    let (mut code, mut msg) = (String::new(), String::new());
    for field in body.split(|b| *b == 0) {
        match field.first() {
            Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into(),
            Some(b'M') => msg = String::from_utf8_lossy(&field[1..]).into(),
            _ => {}
        }
    }
    (tag, code, msg)
}

#[tokio::test]
async fn plaintext_startup_is_refused_with_28000() {
    let pki = pki();
    let (mut client, server) = serve_one(&pki).await;
    client.write_all(&startup_packet()).await.expect("write");
    let (tag, code, msg) = read_error(&mut client).await;
    assert_eq!((tag, code.as_str()), (b'E', "28000"));
    assert_eq!(msg, "SSL with a client certificate is required");
    assert!(matches!(
        server.await.expect("join"),
        Err(SessionError::Plaintext)
    ));
}

#[tokio::test]
async fn bytes_pipelined_after_ssl_request_never_count_as_tls_input() {
    let pki = pki();
    let (mut client, server) = serve_one(&pki).await;
    // A man in the middle appends a StartupMessage to the SSLRequest, hoping the server
    // buffers it and treats it as if it had arrived inside TLS (CVE-2021-23214).
    let mut wire = SSL_REQUEST.to_vec();
    wire.extend_from_slice(&startup_packet());
    client.write_all(&wire).await.expect("write");
    assert_eq!(client.read_u8().await.expect("answer"), b'S');
    // The injected bytes are read as a TLS record and the handshake fails.
    assert!(matches!(
        server.await.expect("join"),
        Err(SessionError::Tls(_))
    ));
}

#[tokio::test]
async fn gssenc_is_declined_then_ssl_proceeds_to_a_session() {
    let pki = pki();
    let (mut client, server) = serve_one(&pki).await;
    client.write_all(&GSS_REQUEST).await.expect("write");
    assert_eq!(client.read_u8().await.expect("answer"), b'N');
    let mut tls = tls_after_ssl_request(&pki, client, true).await;
    tls.write_all(&startup_packet()).await.expect("startup");
    tls.flush().await.expect("flush");
    match server.await.expect("join") {
        Ok(Accepted::Session(hello)) => {
            assert_eq!(hello.role, "readonly");
            assert_eq!(hello.database, "myapp");
            assert_eq!(hello.principal.uris, vec!["spiffe://example.org/app/test"]);
        }
        _ => panic!("expected a session"),
    }
}

#[tokio::test]
async fn tls_without_client_certificate_gets_28000() {
    let pki = pki();
    let (client, server) = serve_one(&pki).await;
    let mut tls = tls_after_ssl_request(&pki, client, false).await;
    tls.write_all(&startup_packet()).await.expect("startup");
    let (_, code, msg) = read_error(&mut tls).await;
    assert_eq!(code, "28000");
    assert!(msg.contains("client certificate is required"), "{msg}");
    assert!(matches!(
        server.await.expect("join"),
        Err(SessionError::NoClientCert)
    ));
}

#[tokio::test]
async fn direct_tls_with_alpn_postgresql_is_accepted() {
    let pki = pki();
    let (client, server) = serve_one(&pki).await;
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = pki
        .connector(true, &[ALPN_POSTGRESQL])
        .connect(name, client)
        .await
        .expect("tls");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_POSTGRESQL));
    tls.write_all(&startup_packet()).await.expect("startup");
    tls.flush().await.expect("flush");
    assert!(matches!(
        server.await.expect("join"),
        Ok(Accepted::Session(_))
    ));
}

#[tokio::test]
async fn direct_tls_without_alpn_is_refused() {
    let pki = pki();
    let (client, server) = serve_one(&pki).await;
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = pki
        .connector(true, &[])
        .connect(name, client)
        .await
        .expect("tls");
    let (_, code, msg) = read_error(&mut tls).await;
    assert_eq!(code, "08P01");
    assert!(msg.contains("ALPN"), "{msg}");
    assert!(server.await.expect("join").is_err());
}

#[tokio::test]
async fn direct_tls_with_another_alpn_fails_the_handshake() {
    let pki = pki();
    let (client, server) = serve_one(&pki).await;
    let name = ServerName::try_from("localhost").expect("name");
    let result = pki.connector(true, &[b"h2"]).connect(name, client).await;
    assert!(result.is_err(), "handshake must fail without ALPN overlap");
    assert!(matches!(
        server.await.expect("join"),
        Err(SessionError::Tls(_))
    ));
}

#[tokio::test]
async fn ssl_request_inside_tls_is_refused() {
    let pki = pki();
    let (client, server) = serve_one(&pki).await;
    let mut tls = tls_after_ssl_request(&pki, client, true).await;
    tls.write_all(&SSL_REQUEST).await.expect("write");
    let (_, code, _) = read_error(&mut tls).await;
    assert_eq!(code, "08P01");
    assert!(server.await.expect("join").is_err());
}

fn peer_cancel() -> Vec<u8> {
    crate::protocol::startup::peer_cancel_packet(&CancelKey {
        pid: 7,
        secret: vec![1, 2, 3, 4],
    })
}

#[tokio::test]
async fn peer_cancel_in_plaintext_is_refused() {
    let pki = pki();
    let (mut client, server) = serve_one(&pki).await;
    client.write_all(&peer_cancel()).await.expect("write");
    let (_, code, msg) = read_error(&mut client).await;
    assert_eq!(code, "08P01");
    assert!(msg.contains("only accepted inside TLS"), "{msg}");
    assert!(server.await.expect("join").is_err());
}

#[tokio::test]
async fn cancels_inside_tls_say_who_sent_them_and_in_which_form() {
    for (packet, kind) in [
        (peer_cancel(), CancelKind::Peer),
        (
            peer_cancel()
                .iter()
                .enumerate()
                .map(|(i, b)| match i {
                    4..8 => 80_877_102u32.to_be_bytes()[i - 4],
                    _ => *b,
                })
                .collect(),
            CancelKind::Client,
        ),
    ] {
        let pki = pki();
        let (client, server) = serve_one(&pki).await;
        let mut tls = tls_after_ssl_request(&pki, client, true).await;
        tls.write_all(&packet).await.expect("write");
        tls.flush().await.expect("flush");
        match server.await.expect("join") {
            Ok(Accepted::Cancel(request)) => {
                assert_eq!(request.kind, kind);
                assert_eq!(request.key.pid, 7);
                let sender = request.sender.expect("sender identity");
                assert_eq!(sender.uris, vec!["spiffe://example.org/app/test"]);
            }
            _ => panic!("expected a {kind:?} cancel"),
        }
    }
}
