//! `[listen] proxy_protocol_from`: behind HAProxy with `send-proxy-v2` the audit log records
//! the client's own address and port, not HAProxy's; a v1 header from a trusted address works
//! too; a PROXY header from an address that is not trusted is refused (08P01) with no Vault
//! call, and so is a trusted address that sends no header.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::client::tls_config;
use crate::harness::fixture::Fixture;
use crate::harness::fleet::{Fleet, FleetOptions};
use crate::harness::haproxy::LB_SOURCE;
use crate::harness::poll_until;
use crate::harness::proxy::set;
use crate::harness::wire::{PROTOCOL_3_0, Wire, first_error, tls_connect};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A PROXY v2 header (PROXY command, TCP over IPv4) claiming `src` → `dst`.
fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else {
        panic!("IPv4 only");
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src.ip().octets());
    h.extend_from_slice(&dst.ip().octets());
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// A TCP connection to `port` from the local address `source`.
async fn connect_from(source: &str, port: u16) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source"))
        .expect("bind source address");
    socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect")
}

/// Sends `bytes` and returns what leasegate answered before closing (≤ 5 s).
async fn answer_to(mut tcp: TcpStream, bytes: &[u8]) -> Vec<u8> {
    tcp.write_all(bytes).await.expect("send");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    rest
}

/// Polls the audit files until one holds a `session_start` line; returns all their lines.
async fn audit_lines(files: &[std::path::PathBuf], needle: &str) -> Vec<serde_json::Value> {
    let mut found = Vec::new();
    poll_until(
        Duration::from_secs(10),
        "the session in the audit log",
        || {
            let text: String = files
                .iter()
                .map(|f| std::fs::read_to_string(f).unwrap_or_default())
                .collect();
            found = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let hit = text.contains(needle);
            async move {
                if hit {
                    Ok(())
                } else {
                    Err(format!("audit so far: {text}"))
                }
            }
        },
    )
    .await;
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_the_audit_log_shows_the_clients_address_not_haproxys() {
    let options = FleetOptions {
        drain_delay: "0s",
        ..FleetOptions::default()
    };
    let fleet = Fleet::start("lb-proxyproto", options).await;
    let tls = tls_connect(fleet.lb.port, tls_config(&fleet.pki, Some(&fleet.good)))
        .await
        .expect("TLS through HAProxy");
    let client = tls.get_ref().0.local_addr().expect("local address");
    let mut w = Wire::new(tls);
    let login = w
        .startup(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")])
        .await
        .expect("startup through HAProxy");
    assert_eq!(
        login.messages.last().map(|m| m.tag),
        Some(b'Z'),
        "{login:?}"
    );
    w.terminate().await;
    let files: Vec<_> = fleet.replicas.iter().map(|r| r.audit.clone()).collect();
    let lines = audit_lines(&files, "\"session_end\"").await;
    let addrs: Vec<&str> = lines
        .iter()
        .filter(|l| l["event"] == "session_start" || l["event"] == "session_end")
        .filter_map(|l| l["client_addr"].as_str())
        .collect();
    assert!(!addrs.is_empty(), "session lines: {lines:?}");
    for addr in &addrs {
        assert_eq!(
            *addr,
            client.to_string(),
            "the client's address and port: {lines:?}"
        );
    }
    assert!(
        !lines.iter().any(|l| l["client_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(LB_SOURCE))),
        "HAProxy's address is in no audit line: {lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_are_taken_from_trusted_addresses_only_and_required_from_them() {
    let audit = crate::harness::root().tempdir("pp-audit-");
    let audit_file = audit.path().join("audit.log");
    let path = audit_file.display().to_string();
    let f = Fixture::start_edited(
        "lb-proxyproto-trust",
        |cfg| cfg,
        |t| {
            let from = toml::Value::Array(vec![format!("{LB_SOURCE}/32").into()]);
            set(t, "listen.proxy_protocol_from", from);
            set(t, "audit.path", path);
        },
    )
    .await;
    let port = f.proxy.port;
    let forged = v2_header(
        "198.51.100.1:1234".parse().expect("a"),
        format!("127.0.0.1:{port}").parse().expect("a"),
    );

    // From 127.0.0.1, which is not trusted, a header is no PostgreSQL packet.
    let answer = answer_to(
        connect_from("127.0.0.1", port).await,
        &[forged.clone(), SSL_REQUEST.to_vec()].concat(),
    )
    .await;
    let err = first_error(&answer).unwrap_or_else(|| panic!("ErrorResponse expected: {answer:?}"));
    assert_eq!(err.get(&'C').map(String::as_str), Some("08P01"), "{err:?}");

    // From the trusted address, a connection without a header is refused.
    let answer = answer_to(connect_from(LB_SOURCE, port).await, &SSL_REQUEST).await;
    let err = first_error(&answer).unwrap_or_else(|| panic!("ErrorResponse expected: {answer:?}"));
    assert_eq!(err.get(&'C').map(String::as_str), Some("08P01"), "{err:?}");
    assert_eq!(
        err.get(&'M').map(String::as_str),
        Some("a PROXY protocol header is required from this address")
    );
    f.assert_nothing_issued().await;

    // From the trusted address, a v1 header names the client for the audit log.
    let mut tcp = connect_from(LB_SOURCE, port).await;
    let v1 = format!("PROXY TCP4 192.0.2.9 127.0.0.1 40001 {port}\r\n");
    tcp.write_all(v1.as_bytes()).await.expect("v1 header");
    let answer = answer_to(tcp, &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await;
    assert_eq!(answer, b"S", "after the header the SSLRequest is answered");
    let lines = audit_lines(&[audit_file], "192.0.2.9:40001").await;
    assert!(
        lines.iter().any(|l| l["client_addr"] == "192.0.2.9:40001"),
        "{lines:?}"
    );
    let refused: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["event"] == "refused").collect();
    assert!(
        refused.iter().any(|l| l["client_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))),
        "the forged header's refusal has the connection's address: {lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l["client_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("198.51.100.1"))),
        "the forged address is used nowhere: {lines:?}"
    );
    f.assert_nothing_issued().await;
}
