//! Hostile input before TLS, as an attacker sends it to the real binary: lengths of 0, 7, 8
//! and 2^31-1, CancelRequests of the wrong size, GSSENCRequest then SSLRequest (libpq's
//! `gssencmode=prefer` order), SSLRequest with plaintext pipelined behind it, an HTTP request,
//! a TLS record that is no ClientHello, and every kind of protocol version (3.1 to 3.99 are
//! negotiated down to 3.0 with NegotiateProtocolVersion's full version code, as PostgreSQL
//! does; other majors get FATAL 0A000; "1234.5678" is CancelRequest's code, so such a packet is
//! a cancel with an unknown key, dropped unanswered). Each answer is PostgreSQL's (an ErrorResponse with its
//! SQLSTATE where PostgreSQL sends one, else a closed connection), nothing reaches Vault, and
//! a good client is served afterwards.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::client::tls_config;
use crate::harness::fixture::{Fixture, logged_in};
use crate::harness::security::{counter, creds_requests, wait_auth_failures, wait_counter};
use crate::harness::wire::{
    Msg, PROTOCOL_3_0, TlsClose, Wire, first_error, send_tls_packet, startup_packet, tls_connect,
};

pub(crate) const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

/// Sends `bytes` in plaintext and returns everything leasegate sends until it closes (5 s).
async fn plaintext(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.write_all(bytes).await.expect("send");
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut seen)).await;
    assert!(
        read.is_ok(),
        "leasegate closes within 5 s after {bytes:02x?}; sent so far {seen:02x?}"
    );
    seen
}

/// A packet of `len` (as announced) with `code` and `body`.
fn packet(len: u32, code: u32, body: &[u8]) -> Vec<u8> {
    [&len.to_be_bytes()[..], &code.to_be_bytes()[..], body].concat()
}

/// Asserts that `seen` is exactly one FATAL ErrorResponse with `code` mentioning `needle`.
#[track_caller]
pub(crate) fn assert_refused(what: &str, seen: &[u8], code: &str, needle: &str) {
    let fields =
        first_error(seen).unwrap_or_else(|| panic!("{what}: ErrorResponse, got {seen:02x?}"));
    eprintln!("{what}: {fields:?}");
    assert_eq!(
        fields.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{what}"
    );
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some(code),
        "{what}: {fields:?}"
    );
    let message = fields.get(&'M').cloned().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{what}: {message:?} contains {needle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_first_packets_get_postgres_answers_and_reach_nothing() {
    let f = Fixture::start("sec-hostile-pre").await;
    let port = f.proxy.port;
    let cancel_code = 80_877_102;
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "length 0",
            packet(0, 0, &[]),
            "08P01",
            "invalid startup packet length 0",
        ),
        (
            "length 7",
            packet(7, 0, &[]),
            "08P01",
            "invalid startup packet length 7",
        ),
        (
            "length 2^31-1",
            packet(0x7fff_ffff, 196_608, b"user\0"),
            "08P01",
            "length 2147483647",
        ),
        (
            "length 8, version 3.0, no parameters",
            packet(8, 196_608, &[]),
            "08P01",
            "invalid startup packet layout",
        ),
        (
            "cancel without a secret",
            packet(12, cancel_code, &[0, 0, 0, 1]),
            "08P01",
            "cancel request of invalid length",
        ),
        (
            "cancel with a 300-byte secret",
            packet(312, cancel_code, &[7; 304]),
            "08P01",
            "cancel request of invalid length",
        ),
        (
            "SSLRequest with a body",
            packet(12, 80_877_103, &[0; 4]),
            "08P01",
            "encryption request with a body",
        ),
        (
            "HTTP",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "08P01",
            "invalid startup packet length 1195725856",
        ),
        (
            "protocol 2.0 in plaintext",
            startup_packet((2, 0), &[("user", "readonly")]),
            "0A000",
            "unsupported frontend protocol 2.0",
        ),
        (
            "GSSENCRequest twice",
            [GSSENC_REQUEST, GSSENC_REQUEST].concat(),
            "08P01",
            "GSSENCRequest sent twice",
        ),
    ];
    for (what, bytes, code, needle) in &cases {
        let seen = plaintext(port, bytes).await;
        // GSSENCRequest is answered `N` first.
        let seen = if what.starts_with("GSSENC") {
            assert_eq!(seen.first(), Some(&b'N'), "{what}: {seen:02x?}");
            &seen[1..]
        } else {
            &seen[..]
        };
        assert_refused(what, seen, code, needle);
    }
    wait_auth_failures(&f.proxy, "bad_startup", cases.len() as f64).await;

    // SSLRequest with a plaintext Query pipelined behind it (CVE-2021-23214): the bytes are
    // not a ClientHello, so TLS fails and nothing of them is read as a message.
    let mut injected = SSL_REQUEST.to_vec();
    injected.extend_from_slice(&startup_packet(
        PROTOCOL_3_0,
        &[("user", "readonly"), ("database", "myapp")],
    ));
    let seen = plaintext(port, &injected).await;
    eprintln!("SSLRequest + pipelined startup: {seen:02x?}");
    assert_eq!(seen.first(), Some(&b'S'), "{seen:02x?}");
    assert!(
        first_error(&seen[1..]).is_none(),
        "no PostgreSQL answer inside TLS: {seen:02x?}"
    );
    // A TLS record that is not a ClientHello, without SSLRequest (direct TLS): a TLS alert at
    // most, then the close.
    let seen = plaintext(port, &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]).await;
    eprintln!("bogus direct TLS: {seen:02x?}");
    assert!(
        seen.is_empty() || seen[0] == 0x15,
        "an alert record or nothing: {seen:02x?}"
    );
    // Two SSLRequests: the second one is not a ClientHello either.
    let seen = plaintext(port, &[SSL_REQUEST, SSL_REQUEST].concat()).await;
    assert_eq!(seen.first(), Some(&b'S'), "{seen:02x?}");
    assert!(first_error(&seen[1..]).is_none(), "{seen:02x?}");
    wait_auth_failures(&f.proxy, "tls_handshake", 3.0).await;

    // GSSENCRequest then SSLRequest, as libpq with gssencmode=prefer: `N`, `S`, and the
    // session works.
    let mut tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.write_all(&GSSENC_REQUEST).await.expect("GSSENCRequest");
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.expect("answer");
    assert_eq!(answer[0], b'N');
    drop(tcp);
    let tls = gss_then_tls(&f).await;
    let wire = logged_in(tls, "readonly").await;
    wire.terminate().await;
    assert_eq!(
        creds_requests(&f.proxy).await,
        1.0,
        "only the GSSENC-then-SSL session asked Vault"
    );
    f.wait_all_revoked(Duration::from_secs(10)).await;
    f.assert_good_client_works().await;
}

/// GSSENCRequest → `N`, SSLRequest → `S`, then the TLS handshake with the good certificate.
async fn gss_then_tls(f: &Fixture) -> crate::harness::wire::Tls {
    let mut tcp = TcpStream::connect(("127.0.0.1", f.proxy.port))
        .await
        .expect("connect");
    tcp.write_all(&[GSSENC_REQUEST, SSL_REQUEST].concat())
        .await
        .expect("GSSENCRequest and SSLRequest");
    let mut answers = [0u8; 2];
    tcp.read_exact(&mut answers).await.expect("answers");
    assert_eq!(&answers, b"NS");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(tls_config(&f.pki, Some(&f.good)))
        .connect(name, tcp)
        .await
        .expect("TLS after N and S")
}

/// The answer to a StartupMessage for `version` inside TLS: every message up to ReadyForQuery
/// or a FATAL error.
async fn startup_answer(f: &Fixture, version: (u16, u16)) -> Vec<Msg> {
    let tls = tls_connect(f.proxy.port, tls_config(&f.pki, Some(&f.good)))
        .await
        .expect("TLS");
    let mut wire = Wire::new(tls);
    let login = wire
        .startup(version, &[("user", "readonly"), ("database", "myapp")])
        .await
        .unwrap_or_else(|e| panic!("protocol {version:?}: {e}"));
    wire.terminate().await;
    login.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_versions_are_negotiated_or_refused_as_postgres_does() {
    let f = Fixture::start("sec-hostile-versions").await;
    for minor in [1, 2, 99, 0xffff] {
        let msgs = startup_answer(&f, (3, minor)).await;
        eprintln!("3.{minor}: {msgs:?}");
        let (offered, options) = msgs[0]
            .negotiate_protocol()
            .unwrap_or_else(|| panic!("3.{minor}: NegotiateProtocolVersion first: {msgs:?}"));
        assert_eq!(offered, 3 << 16, "3.{minor}: the full version code of 3.0");
        assert!(options.is_empty(), "{options:?}");
        assert_eq!(
            msgs.last().map(|m| m.tag),
            Some(b'Z'),
            "3.{minor}: {msgs:?}"
        );
    }
    let after_negotiated = creds_requests(&f.proxy).await;
    for version in [
        (2, 0),
        (4, 0),
        (0, 0),
        (1, 0),
        (0xffff, 0xffff),
        (1234, 5681),
    ] {
        let msgs = startup_answer(&f, version).await;
        let err = msgs.last().filter(|m| m.tag == b'E');
        let fields = err.map(Msg::fields).unwrap_or_default();
        eprintln!("{version:?}: {fields:?}");
        assert_eq!(
            fields.get(&'S').map(String::as_str),
            Some("FATAL"),
            "{version:?}: {msgs:?}"
        );
        assert_eq!(
            fields.get(&'C').map(String::as_str),
            Some("0A000"),
            "{version:?}: {msgs:?}"
        );
        let want = format!("unsupported frontend protocol {}.{}", version.0, version.1);
        assert!(fields[&'M'].contains(&want), "{version:?}: {fields:?}");
    }
    // "Version" 1234.5678 is CancelRequest's code: such a StartupMessage is read as a cancel
    // with an unknown key (its parameters as the key), dropped unanswered as PostgreSQL does.
    let cancels = "leasegate_cancel_requests_total";
    let unknown = counter(&f.proxy, cancels, &[("result", "unknown_key")]).await;
    let packet = startup_packet((1234, 5678), &[("user", "readonly"), ("database", "myapp")]);
    let close = send_tls_packet(f.proxy.port, tls_config(&f.pki, Some(&f.good)), &packet)
        .await
        .expect("send");
    assert_eq!(close, TlsClose::CloseNotify, "closed without an answer");
    wait_counter(
        &f.proxy,
        cancels,
        &[("result", "unknown_key")],
        unknown + 1.0,
    )
    .await;
    // 1234.5679 with parameters is an SSLRequest with a body, inside TLS.
    let packet = startup_packet((1234, 5679), &[("user", "readonly")]);
    let msgs = answer_in_tls(&f, &packet).await;
    let fields = msgs.last().map(Msg::fields).unwrap_or_default();
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("08P01"),
        "{msgs:?}"
    );
    assert_eq!(
        creds_requests(&f.proxy).await,
        after_negotiated,
        "no refused version asks Vault"
    );
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

/// Sends `packet` inside TLS (good certificate); the messages up to ReadyForQuery or FATAL.
pub(crate) async fn answer_in_tls(f: &Fixture, packet: &[u8]) -> Vec<Msg> {
    let tls = tls_connect(f.proxy.port, tls_config(&f.pki, Some(&f.good)))
        .await
        .expect("TLS");
    let mut wire = Wire::new(tls);
    wire.send(packet).await.expect("send");
    let msgs = wire
        .recv_until_ready(Duration::from_secs(30))
        .await
        .expect("an answer");
    wire.terminate().await;
    msgs
}
