//! Hostile StartupMessages inside TLS, and direct TLS: an empty user, no or an empty
//! database (the user's name, as PostgreSQL reads it), `user` given twice (the last counts,
//! as in PostgreSQL, for the grant check too), 1,200 parameters, a 1 MiB packet: each refused
//! with its SQLSTATE before any Vault call; a query pipelined behind the StartupMessage is
//! answered after ReadyForQuery. Direct TLS without ALPN `postgresql` gets 08P01 inside TLS
//! (as PostgreSQL 17), offering only another protocol fails the handshake, and an SSLRequest
//! inside TLS is a protocol violation.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::harness::client::tls_config;
use crate::harness::fixture::{Fixture, logged_in};
use crate::harness::security::creds_requests;
use crate::harness::wire::{Msg, PROTOCOL_3_0, Wire, startup_packet, tls_connect};
use crate::sec_hostile::{SSL_REQUEST, answer_in_tls, assert_refused};

/// The FATAL error's (SQLSTATE, message) of an answer, or panics.
#[track_caller]
fn fatal(what: &str, msgs: &[Msg]) -> (String, String) {
    let err = msgs.last().filter(|m| m.tag == b'E');
    let fields = err
        .map(Msg::fields)
        .unwrap_or_else(|| panic!("{what}: FATAL, got {msgs:?}"));
    eprintln!("{what}: {fields:?}");
    assert_eq!(
        fields.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{what}"
    );
    (fields[&'C'].clone(), fields[&'M'].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_startup_parameters_are_refused_before_vault_or_read_as_postgres_does() {
    let f = Fixture::start("sec-hostile-params").await;
    let p = |params: &[(&str, &str)]| startup_packet(PROTOCOL_3_0, params);
    let many: Vec<(String, String)> = (0..1_200)
        .map(|i| (format!("p{i:04}"), "x".into()))
        .collect();
    let mut many_refs: Vec<(&str, &str)> = vec![("user", "readonly"), ("database", "myapp")];
    many_refs.extend(many.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut huge = (1u32 << 20).to_be_bytes().to_vec();
    huge.extend_from_slice(&196_608u32.to_be_bytes());
    huge.extend_from_slice(b"user\0readonly\0application_name\0");
    huge.extend_from_slice(&[b'a'; 8_000]);
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "empty user",
            p(&[("user", ""), ("database", "myapp")]),
            "28000",
            "no PostgreSQL user name specified in startup packet",
        ),
        (
            "no database: the user's name",
            p(&[("user", "readonly")]),
            "28000",
            "is not granted database \"readonly\"",
        ),
        (
            "empty database: the user's name",
            p(&[("user", "readonly"), ("database", "")]),
            "28000",
            "is not granted database \"readonly\"",
        ),
        // PostgreSQL takes the last of duplicated keys; so does the grant check.
        (
            "user given twice, the last not granted",
            p(&[
                ("user", "readonly"),
                ("database", "myapp"),
                ("user", "readwrite"),
            ]),
            "28000",
            "is not granted role \"readwrite\"",
        ),
        ("1,200 parameters", p(&many_refs), "42501", "p0000"),
        (
            "a 1 MiB packet",
            huge,
            "08P01",
            "invalid startup packet length 1048576",
        ),
    ];
    for (what, packet, code, needle) in &cases {
        let (got, message) = fatal(what, &answer_in_tls(&f, packet).await);
        assert_eq!(&got, code, "{what}: {message}");
        assert!(
            message.contains(needle),
            "{what}: {message:?} contains {needle:?}"
        );
    }
    f.assert_nothing_issued().await;

    // The last `user` is the one checked and logged in with.
    let msgs = answer_in_tls(
        &f,
        &p(&[
            ("user", "readwrite"),
            ("database", "myapp"),
            ("user", "readonly"),
        ]),
    )
    .await;
    assert_eq!(msgs.last().map(|m| m.tag), Some(b'Z'), "{msgs:?}");
    // A query pipelined behind the StartupMessage is answered after ReadyForQuery.
    let tls = tls_connect(f.proxy.port, tls_config(&f.pki, Some(&f.good)))
        .await
        .expect("TLS");
    let mut wire = Wire::new(tls);
    let mut both = p(&[("user", "readonly"), ("database", "myapp")]);
    both.extend_from_slice(&crate::harness::wire::query_message("select 'pipelined'"));
    wire.send(&both).await.expect("send");
    let login = wire
        .recv_until_ready(Duration::from_secs(30))
        .await
        .expect("login");
    assert_eq!(login.last().map(|m| m.tag), Some(b'Z'), "{login:?}");
    let answer = wire
        .recv_until_ready(Duration::from_secs(10))
        .await
        .expect("answer");
    let rows: Vec<_> = answer.iter().filter_map(Msg::data_row).collect();
    assert_eq!(
        rows,
        vec![vec![Some("pipelined".to_string())]],
        "{answer:?}"
    );
    wire.terminate().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

/// A direct TLS connection (no SSLRequest, as `sslnegotiation=direct`) offering `alpn`.
async fn direct_tls(f: &Fixture, alpn: &[&[u8]]) -> std::io::Result<crate::harness::wire::Tls> {
    let mut config = (*tls_config(&f.pki, Some(&f.good))).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(("127.0.0.1", f.proxy.port)).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_needs_alpn_postgresql_and_no_second_negotiation() {
    let f = Fixture::start("sec-hostile-direct").await;
    let startup = startup_packet(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")]);
    // Without ALPN: refused inside TLS with 08P01, as PostgreSQL 17 refuses it.
    let tls = direct_tls(&f, &[]).await.expect("direct TLS without ALPN");
    let mut wire = Wire::new(tls);
    wire.send(&startup).await.expect("send");
    let seen = wire
        .closed_within(Duration::from_secs(5))
        .await
        .expect("closed");
    assert_refused(
        "direct TLS without ALPN",
        &seen,
        "08P01",
        "ALPN protocol \"postgresql\"",
    );
    // Offering only another protocol: the handshake fails (no_application_protocol).
    let answer = direct_tls(&f, &[b"http/1.1"]).await;
    let text = format!("{:?}", answer.as_ref().err());
    eprintln!("direct TLS offering http/1.1: {text}");
    assert!(
        answer.is_err() && text.contains("NoApplicationProtocol"),
        "{text}"
    );
    // With ALPN, an SSLRequest inside TLS is a protocol violation.
    let tls = direct_tls(&f, &[b"postgresql"]).await.expect("direct TLS");
    let mut wire = Wire::new(tls);
    wire.send(&SSL_REQUEST).await.expect("send");
    let seen = wire
        .closed_within(Duration::from_secs(5))
        .await
        .expect("closed");
    assert_refused("SSLRequest inside direct TLS", &seen, "08P01", "inside TLS");
    // And a proper direct TLS session works.
    let tls = direct_tls(&f, &[b"postgresql"]).await.expect("direct TLS");
    let wire = logged_in(tls, "readonly").await;
    wire.terminate().await;
    assert_eq!(
        creds_requests(&f.proxy).await,
        1.0,
        "only the proper session asked Vault"
    );
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

/// psql without TLS (`sslmode=disable`) is told why, as a FATAL error (28000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_without_tls_is_told_tls_with_a_certificate_is_required() {
    let f = Fixture::start("sec-hostile-psql-plain").await;
    let info = format!(
        "host=127.0.0.1 port={} dbname=myapp user=readonly sslmode=disable",
        f.proxy.port
    );
    let out = crate::harness::client::psql(&info, "select 1").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("psql: {stderr}");
    assert!(!out.status.success(), "psql without TLS must fail");
    assert!(
        stderr.contains("FATAL:  SSL with a client certificate is required"),
        "psql says: {stderr}"
    );
    f.assert_nothing_issued().await;
}
