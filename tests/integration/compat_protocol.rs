//! Startup-protocol edge cases with a hand-written client (TLS with the good client
//! certificate, server verified as `localhost`): protocol 3.2 with a `_pq_.` option is
//! negotiated down with NegotiateProtocolVersion and the session works, raw startup parameters
//! (TimeZone, DateStyle, application_name) reach the server, ParameterStatus after SET is
//! relayed, protocol 4.0 / replication / no user / oversized packets get PostgreSQL's errors,
//! and silent clients are dropped after `login_timeout` while others log in.

use std::time::{Duration, Instant};

use crate::harness::client::tls_config;
use crate::harness::compat::CompatRow;
use crate::harness::fixture::Fixture;
use crate::harness::wire::{Msg, PROTOCOL_3_0, Wire, first_error, tls_connect};

const CLIENT: &str = "raw wire protocol (test harness)";
const ORDER: u32 = 60;

fn row(slug: &str) -> CompatRow {
    CompatRow::new(slug, ORDER, CLIENT, "protocol 3.0; 3.2 and 4.0 requested")
}

async fn tls_wire(f: &Fixture) -> Wire<crate::harness::wire::Tls> {
    let tls = tls_connect(f.proxy.port, tls_config(&f.pki, Some(&f.good)))
        .await
        .expect("SSLRequest + TLS handshake with leasegate");
    Wire::new(tls)
}

#[tokio::test]
async fn protocol_3_2_with_pq_option_is_negotiated_and_the_session_works() {
    let mut row = row("protocol-1-negotiation");
    let f = Fixture::start("compat-proto-3-2").await;
    let mut w = tls_wire(&f).await;

    row.step("3.2 + _pq_ option → NegotiateProtocolVersion, session works");
    let login = w
        .startup(
            (3, 2),
            &[
                ("user", "readonly"),
                ("database", "myapp"),
                ("_pq_.test_option", "on"),
                ("application_name", "compat-raw"),
                ("TimeZone", "Pacific/Chatham"),
                ("DateStyle", "SQL, DMY"),
            ],
        )
        .await
        .expect("startup answered");
    let tags: String = login.messages.iter().map(|m| m.tag as char).collect();
    let (offered, options) = login.messages[0]
        .negotiate_protocol()
        .unwrap_or_else(|| panic!("first message is NegotiateProtocolVersion: {tags}"));
    assert_eq!(
        options,
        vec!["_pq_.test_option".to_string()],
        "{:?}",
        login.messages[0]
    );
    assert_eq!(
        login.messages[1].auth_code(),
        Some(0),
        "AuthenticationOk follows: {tags}"
    );
    assert_eq!(login.messages.last().map(|m| m.tag), Some(b'Z'), "{tags}");
    let (_, secret) = login.key.clone().expect("BackendKeyData");
    assert_eq!(secret.len(), 4, "a protocol 3.0 cancel key (4-byte secret)");

    row.step("TimeZone/DateStyle/application_name startup parameters");
    let p = &login.parameters;
    assert_eq!(
        p.get("TimeZone").map(String::as_str),
        Some("Pacific/Chatham")
    );
    assert_eq!(p.get("DateStyle").map(String::as_str), Some("SQL, DMY"));
    assert_eq!(
        p.get("application_name").map(String::as_str),
        Some("compat-raw")
    );
    assert_eq!(
        w.query_column("SHOW TimeZone").await,
        vec![Some("Pacific/Chatham".into())]
    );
    assert_eq!(
        w.query_column("select to_char(date '2024-03-01', 'DD/MM') || ' ' || date '2024-03-01'")
            .await,
        vec![Some("01/03 01/03/2024".into())],
        "DateStyle SQL, DMY in effect"
    );
    let user = w.query_column("select current_user::text").await;
    assert!(
        user[0]
            .as_deref()
            .is_some_and(|u| u.starts_with(&f.mount.prefix)),
        "dynamic user {user:?}"
    );

    row.step("ParameterStatus after SET");
    let msgs = w
        .simple_query("SET application_name = 'changed'")
        .await
        .expect("SET");
    let statuses: Vec<(String, String)> = msgs.iter().filter_map(Msg::parameter_status).collect();
    assert_eq!(
        statuses,
        vec![("application_name".to_string(), "changed".to_string())],
        "{msgs:?}"
    );
    assert_eq!(
        w.query_column("SHOW application_name").await,
        vec![Some("changed".into())]
    );
    w.terminate().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;

    row.step("NegotiateProtocolVersion encodes 3.0 as PostgreSQL does");
    // The version field carries the full code, 3 << 16 | 0 = 196608, as PostgreSQL sends it
    // (FrontendProtocol / PG_PROTOCOL_LATEST); libpq reads it so, and libpq 18 refuses a value
    // below 3.0 ("server requested downgrade to pre-3.0 protocol version").
    assert_eq!(
        offered,
        3 << 16,
        "NegotiateProtocolVersion must offer 196608 (3.0), as PostgreSQL does"
    );
}

/// Sends `startup` inside TLS and expects a FATAL ErrorResponse with `code`, then the close.
async fn refused_in_tls(
    f: &Fixture,
    version: (u16, u16),
    params: &[(&str, &str)],
    code: &str,
) -> String {
    let mut w = tls_wire(f).await;
    let login = w.startup(version, params).await.expect("an answer");
    let err = login
        .messages
        .last()
        .filter(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("ErrorResponse {code} expected, got {:?}", login.messages));
    let fields = err.fields();
    assert_eq!(
        fields.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{fields:?}"
    );
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some(code),
        "{fields:?}"
    );
    assert!(
        w.closed_within(Duration::from_secs(5)).await.is_ok(),
        "connection closed after the FATAL error"
    );
    fields.get(&'M').cloned().unwrap_or_default()
}

#[tokio::test]
async fn protocol_4_replication_and_missing_user_are_refused() {
    let mut row = row("protocol-2-refusals");
    let f = Fixture::start("compat-proto-refusals").await;

    row.step("4.0 → 0A000");
    let msg = refused_in_tls(
        &f,
        (4, 0),
        &[("user", "readonly"), ("database", "myapp")],
        "0A000",
    )
    .await;
    assert!(msg.contains("protocol"), "message: {msg}");

    row.step("replication → 0A000");
    for mode in ["database", "true"] {
        let msg = refused_in_tls(
            &f,
            PROTOCOL_3_0,
            &[
                ("user", "readonly"),
                ("database", "myapp"),
                ("replication", mode),
            ],
            "0A000",
        )
        .await;
        assert!(msg.contains("replication"), "message: {msg}");
    }

    row.step("no user → 28000");
    let msg = refused_in_tls(&f, PROTOCOL_3_0, &[("database", "myapp")], "28000").await;
    assert!(msg.contains("user"), "message: {msg}");
    f.assert_nothing_issued().await;
    f.assert_good_client_works().await;
}

#[tokio::test]
async fn oversized_startup_packet_is_refused_with_08p01() {
    let mut row = row("protocol-3-oversized");
    let f = Fixture::start("compat-proto-oversized").await;
    // Length 20000 (PostgreSQL's limit is 10000), version 3.0, then some parameter bytes.
    let mut packet = 20_000u32.to_be_bytes().to_vec();
    packet.extend_from_slice(&196_608u32.to_be_bytes());
    packet.extend_from_slice(b"user\0readonly\0");

    row.step("oversized startup packet → 08P01 (TLS and plaintext)");
    let mut w = tls_wire(&f).await;
    w.send(&packet).await.expect("send oversized header");
    let seen = w
        .closed_within(Duration::from_secs(5))
        .await
        .expect("leasegate closes the connection");
    let fields = first_error(&seen).unwrap_or_else(|| panic!("ErrorResponse expected: {seen:?}"));
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("08P01"),
        "{fields:?}"
    );
    assert_eq!(
        fields.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{fields:?}"
    );

    row.phase("oversized first packet in plaintext");
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", f.proxy.port))
        .await
        .expect("connect");
    let mut w = Wire::new(tcp);
    w.send(&packet).await.expect("send oversized header");
    let seen = w
        .closed_within(Duration::from_secs(5))
        .await
        .expect("leasegate closes the connection");
    let fields = first_error(&seen).unwrap_or_else(|| panic!("ErrorResponse expected: {seen:?}"));
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("08P01"),
        "{fields:?}"
    );
    f.assert_nothing_issued().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_dropped_after_login_timeout() {
    let mut row = row("protocol-4-login-timeout");
    let f = Fixture::start_with("compat-proto-silent", |mut cfg| {
        cfg.login_timeout = Some("1s".into());
        cfg
    })
    .await;

    row.step("silent clients dropped after login_timeout");
    let opened = Instant::now();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", f.proxy.port))
        .await
        .expect("connect");
    let mut silent_tcp = Wire::new(tcp);
    // A second silent client completes TLS, then never sends its StartupMessage.
    let mut silent_tls = tls_wire(&f).await;
    let tls_opened = Instant::now();

    row.phase("a good client logs in meanwhile");
    f.assert_good_client_works().await;
    let good_done = opened.elapsed();

    let tcp_closed = silent_tcp.closed_within(Duration::from_secs(10)).await;
    let tcp_after = opened.elapsed();
    let tls_closed = silent_tls.closed_within(Duration::from_secs(10)).await;
    let tls_after = tls_opened.elapsed();
    eprintln!(
        "good client done after {good_done:?}; silent TCP closed after {tcp_after:?}, \
         silent TLS after {tls_after:?}"
    );
    assert!(
        tcp_closed.is_ok(),
        "silent TCP client still connected after 10 s"
    );
    assert!(
        tls_closed.is_ok(),
        "silent TLS client still connected after 10 s"
    );
    assert!(
        tcp_after >= Duration::from_millis(900) && tcp_after < Duration::from_secs(4),
        "silent TCP client dropped after ~1 s, not {tcp_after:?}"
    );
    assert!(
        tls_after < Duration::from_secs(4),
        "silent TLS client dropped after ~1 s, not {tls_after:?}"
    );
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_inside_tls_cancels_and_closes_with_close_notify() {
    let mut row = row("protocol-5-tls-cancel");
    let f = Fixture::start("compat-proto-tls-cancel").await;
    let mut w = tls_wire(&f).await;
    let login = w
        .startup(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")])
        .await
        .expect("startup");
    let (pid, secret) = login.key.clone().expect("BackendKeyData");
    w.send(&crate::harness::wire::query_message("select pg_sleep(30)"))
        .await
        .expect("send query");
    let prefix = f.mount.prefix.clone();
    crate::harness::pg::wait_one_active(&prefix, "pg_sleep").await;

    row.step("CancelRequest inside TLS → 57014");
    let close = crate::harness::wire::send_tls_cancel(
        f.proxy.port,
        tls_config(&f.pki, Some(&f.good)),
        pid,
        &secret,
    )
    .await
    .expect("send the cancel inside TLS");
    let msgs = w
        .recv_until_ready(Duration::from_secs(5))
        .await
        .expect("the query ends");
    let code = msgs.iter().find_map(Msg::sqlstate);
    assert_eq!(code.as_deref(), Some("57014"), "{msgs:?}");

    row.step("cancel connection closed with close_notify");
    // PostgreSQL answers an encrypted CancelRequest by closing with SSL_shutdown; libpq 17+
    // (PQcancelBlocking, psycopg's cancel_safe) reports "SSL error: unexpected eof while
    // reading" when the close_notify is missing.
    assert_eq!(
        close,
        crate::harness::wire::TlsClose::CloseNotify,
        "leasegate must close an encrypted cancel connection with close_notify"
    );
    w.terminate().await;
}

/// The notifying backend's pid in a NotificationResponse.
fn notification_pid(msgs: &[Msg]) -> Option<i32> {
    msgs.iter()
        .find(|m| m.tag == b'A')
        .and_then(|m| m.body.get(..4))
        .and_then(|b| b.try_into().ok())
        .map(i32::from_be_bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_notifications_carry_the_pid_of_leasegates_key_others_their_backends() {
    let mut row = row("protocol-6-notify-pid");
    let f = Fixture::start("compat-proto-notify-pid").await;
    let mut listener = tls_wire(&f).await;
    let login = listener
        .startup(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")])
        .await
        .expect("startup");
    let (shown, _) = login.key.clone().expect("BackendKeyData");
    let real: i32 = listener.query_column("select pg_backend_pid()").await[0]
        .as_deref()
        .and_then(|p| p.parse().ok())
        .expect("pg_backend_pid");
    assert_ne!(shown, real, "leasegate's key is its own");

    row.step("own NOTIFY → NotificationResponse with the pid of BackendKeyData");
    let msgs = listener
        .simple_query("listen lg_chan; notify lg_chan, 'self'")
        .await
        .expect("listen and notify");
    assert_eq!(notification_pid(&msgs), Some(shown), "{msgs:?}");

    row.step("another session's NOTIFY → that backend's pid");
    let mut other = f.raw_session("readonly").await;
    let other_pid = other.query_column("select pg_backend_pid()").await[0].clone();
    other
        .simple_query("notify lg_chan, 'other'")
        .await
        .expect("notify from the other session");
    let msg = listener
        .recv_within(Duration::from_secs(5))
        .await
        .expect("read")
        .expect("the other session's notification");
    assert_eq!(
        notification_pid(std::slice::from_ref(&msg)).map(|p| p.to_string()),
        other_pid,
        "{msg:?}"
    );
    other.terminate().await;
    listener.terminate().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}
