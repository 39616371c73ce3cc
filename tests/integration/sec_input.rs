//! Hostile startup names from a client with a valid certificate: path traversal, URL
//! escapes, quotes, control characters, a 5,000-character name, a name containing
//! `/creds/` — as the requested role (`user`) and as the database. Each is refused with
//! FATAL 28000 before any Vault request (the role must be listed verbatim in the database
//! entry), and the message never carries a control character raw (no forged lines or
//! terminal escapes). Malformed packets (no terminator, bad lengths, binary garbage,
//! parameters that are not UTF-8) get 08P01.

use std::time::Duration;

use crate::harness::client::{Raw, Transport, raw_startup, tls_config};
use crate::harness::fixture::{Fixture, GOOD_URI};
use crate::harness::security::{
    assert_fatal, creds_requests, has_raw_control, startup_bytes, tls_startup, wait_auth_failures,
};
use crate::harness::wire::{Wire, tls_connect};

/// Names that must never become a Vault path or a database name.
fn hostile_names() -> Vec<String> {
    vec![
        "../readonly".into(),
        "..".into(),
        "readonly/../readwrite".into(),
        "readonly%2Fx".into(),
        "readonly%2F..%2Freadwrite".into(),
        "read'only".into(),
        "\"readonly\"".into(),
        "readonly\"; DROP ROLE postgres; --".into(),
        "READONLY".into(),
        "readonly ".into(),
        "read\nonly".into(),
        "readonly\r\nFATAL:  forged line".into(),
        "\u{1b}[31mreadonly\u{1b}[0m".into(),
        "readonly\u{7}\u{8}\u{7f}".into(),
        "readonly\u{85}next".into(),
        "x".repeat(5_000),
        "readonly/creds/readwrite".into(),
        "database/creds/readonly".into(),
        "sys/leases/revoke".into(),
    ]
}

/// What the message must show of `name`: the name itself when it is printable and short.
/// How a message shows a short, printable name: as is, with `"` and `\` escaped so that a
/// name cannot close the quotes around it.
fn shown(name: &str) -> Option<String> {
    (name.chars().count() <= 64 && !name.chars().any(char::is_control))
        .then(|| name.replace('\\', "\\\\").replace('"', "\\\""))
}

#[track_caller]
fn assert_clean_message(message: &str, name: &str) {
    assert!(
        !has_raw_control(message),
        "message echoes a control character raw: {message:?}"
    );
    assert!(
        message.len() < 400,
        "message for a {}-byte name is {} bytes long",
        name.len(),
        message.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_role_and_database_names_are_refused_before_vault() {
    let f = Fixture::start("sec-names").await;
    let names = hostile_names();
    for (i, name) in names.iter().enumerate() {
        // As the role, on a granted database.
        let answer = tls_startup(f.proxy.port, &f.pki, Some(&f.good), name, "myapp").await;
        let message = assert_fatal(
            &answer,
            "28000",
            &[
                &format!("\"uri:{GOOD_URI}\""),
                "is not granted role",
                "\"myapp\"",
            ],
        );
        assert_clean_message(message, name);
        if let Some(name) = shown(name) {
            assert!(message.contains(&name), "{message:?} names {name:?}");
        }
        wait_auth_failures(&f.proxy, "role_not_granted", (i + 1) as f64).await;

        // As the database, with a granted role.
        let answer = tls_startup(f.proxy.port, &f.pki, Some(&f.good), "readonly", name).await;
        let message = assert_fatal(
            &answer,
            "28000",
            &["is not granted database", "\"readonly\""],
        );
        assert_clean_message(message, name);
        if let Some(name) = shown(name) {
            assert!(message.contains(&name), "{message:?} names {name:?}");
        }
        wait_auth_failures(&f.proxy, "database_not_granted", (i + 1) as f64).await;
    }
    // Control characters are shown escaped.
    let answer = tls_startup(f.proxy.port, &f.pki, Some(&f.good), "read\nonly", "myapp").await;
    let message = answer.expect_error("28000");
    assert!(message.contains(r#""read\nonly""#), "escaped: {message:?}");
    // Long names are cut.
    let long = "x".repeat(5_000);
    let answer = tls_startup(f.proxy.port, &f.pki, Some(&f.good), &long, "myapp").await;
    let message = answer.expect_error("28000");
    assert!(
        message.contains(&format!("\"{}…\"", "x".repeat(64))),
        "cut at 64 characters: {message:?}"
    );

    assert_eq!(
        creds_requests(&f.proxy).await,
        0.0,
        "no hostile name may reach Vault"
    );
    f.assert_nothing_issued().await;
    // leasegate's log (stderr: log lines and, without `[audit] path`, the JSON audit lines)
    // holds no raw C0 control character (no forged lines, no terminal escapes); log lines
    // hold none at all.
    let log = f.proxy.log_text();
    for line in log.lines() {
        if line.starts_with('{') {
            let _: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("audit line is JSON ({e}): {line:?}"));
            assert!(
                !line.chars().any(|c| c < ' '),
                "audit line with a raw C0 control character: {line:?}"
            );
        } else {
            assert!(
                !has_raw_control(line) && !line.starts_with("FATAL"),
                "log line with a raw control character or forged start: {line:?}"
            );
        }
    }
    f.assert_good_client_works().await;
}

/// Sends `packet` inside TLS (good certificate) and returns the ErrorResponse fields.
async fn refusal_inside_tls(f: &Fixture, packet: &[u8]) -> (String, String) {
    let tls = tls_connect(f.proxy.port, tls_config(&f.pki, Some(&f.good)))
        .await
        .expect("TLS with the good certificate");
    let mut wire = Wire::new(tls);
    wire.send(packet).await.expect("send packet");
    let msg = tokio::time::timeout(Duration::from_secs(10), wire.recv())
        .await
        .expect("answer within 10 s")
        .expect("an ErrorResponse");
    assert_eq!(msg.tag, b'E', "{msg:?}");
    let fields = msg.fields();
    assert_eq!(
        fields.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{msg:?}"
    );
    assert!(
        wire.closed_within(Duration::from_secs(5)).await.is_ok(),
        "connection closed after the refusal"
    );
    (
        fields.get(&'C').cloned().unwrap_or_default(),
        fields.get(&'M').cloned().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_startup_packets_are_refused() {
    let f = Fixture::start("sec-packets").await;
    // A value cut off without its NUL.
    let mut cut = 0u32.to_be_bytes().to_vec();
    cut.extend_from_slice(&196_608u32.to_be_bytes());
    cut.extend_from_slice(b"user\0read");
    let n = cut.len() as u32;
    cut[..4].copy_from_slice(&n.to_be_bytes());
    // Binary garbage after a valid header.
    let mut garbage = 0u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&196_608u32.to_be_bytes());
    garbage.extend_from_slice(&[0xff, 0xfe, 0x01, 0x80, 0x1b, 0x9b, 0xc3, 0x28]);
    let n = garbage.len() as u32;
    garbage[..4].copy_from_slice(&n.to_be_bytes());

    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "value without NUL",
            cut,
            "08P01",
            "startup parameter without a value",
        ),
        (
            "binary garbage",
            garbage,
            "08P01",
            "startup packet not terminated",
        ),
        (
            "length above the maximum",
            [&10_001u32.to_be_bytes()[..], &[0u8; 16]].concat(),
            "08P01",
            "invalid startup packet length 10001",
        ),
        (
            "length below the minimum",
            [&7u32.to_be_bytes()[..], &[0u8; 16]].concat(),
            "08P01",
            "invalid startup packet length 7",
        ),
        (
            "all ones",
            vec![0xff; 16],
            "08P01",
            "invalid startup packet length 4294967295",
        ),
        (
            "a parameter name that is not UTF-8",
            startup_bytes(&[(b"\xff\xfe", b"")]),
            "08P01",
            "is not valid UTF-8",
        ),
        (
            "invalid UTF-8 in the user",
            startup_bytes(&[(b"user", b"read\xffonly"), (b"database", b"myapp")]),
            "08P01",
            "parameter \"user\" is not valid UTF-8",
        ),
    ];
    for (what, packet, code, needle) in &cases {
        let (got_code, message) = refusal_inside_tls(&f, packet).await;
        eprintln!("{what}: {got_code} {message:?}");
        assert_eq!(&got_code, code, "{what}: {message}");
        assert!(
            message.contains(needle),
            "{what}: {message:?} contains {needle:?}"
        );
        assert!(!has_raw_control(&message), "{what}: {message:?}");
    }
    wait_auth_failures(&f.proxy, "bad_startup", 7.0).await;

    // Before TLS: an absurd length is refused in plaintext, and a startup with hostile names
    // only hears that TLS is required.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", f.proxy.port))
        .await
        .expect("connect");
    let mut plain = Wire::new(&mut tcp);
    plain.send(&[0xff; 8]).await.expect("send");
    let msg = plain.recv().await.expect("ErrorResponse");
    assert_eq!(msg.sqlstate().as_deref(), Some("08P01"), "{msg:?}");
    let answer = raw_startup(f.proxy.port, Transport::Plain, "../readonly\n", "myapp").await;
    assert_fatal(
        &answer,
        "28000",
        &["SSL with a client certificate is required"],
    );
    assert!(
        !matches!(answer, Raw::Error { ref message, .. } if message.contains("readonly")),
        "a plaintext client learns nothing about names"
    );

    assert_eq!(creds_requests(&f.proxy).await, 0.0, "nothing reached Vault");
    f.assert_nothing_issued().await;
    f.assert_good_client_works().await;
}

/// PostgreSQL refuses a startup packet whose parameter list is not closed by an empty name
/// as its last byte, and one with bytes after that terminator (08P01 "invalid startup packet
/// layout: expected terminator as last byte"). leasegate's parser only checks that the
/// packet's last byte is a NUL — which the last value's own NUL satisfies — and stops at the
/// first empty name, ignoring what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_packet_must_end_with_the_list_terminator() {
    let f = Fixture::start("sec-terminator").await;
    let good = startup_bytes(&[(b"user", b"readonly"), (b"database", b"myapp")]);
    // `user\0readonly\0database\0myapp\0` with no final terminator.
    let mut unterminated = good[..good.len() - 1].to_vec();
    let n = unterminated.len() as u32;
    unterminated[..4].copy_from_slice(&n.to_be_bytes());
    // `user\0readonly\0\0database\0myapp\0\0`: parameters after the terminator.
    let mut trailing = startup_bytes(&[(b"user", b"readonly")]);
    trailing.extend_from_slice(b"database\0myapp\0\0");
    let n = trailing.len() as u32;
    trailing[..4].copy_from_slice(&n.to_be_bytes());
    let mut answers = Vec::new();
    for (what, packet) in [
        ("no terminator", unterminated),
        ("bytes after the terminator", trailing),
    ] {
        let tls = tls_connect(f.proxy.port, tls_config(&f.pki, Some(&f.good)))
            .await
            .expect("TLS with the good certificate");
        let mut wire = Wire::new(tls);
        wire.send(&packet).await.expect("send packet");
        let msgs = wire.recv_until_ready(Duration::from_secs(10)).await;
        eprintln!("{what}: {msgs:?}");
        answers.push((what, msgs.ok().and_then(|m| m.first().cloned())));
        wire.terminate().await;
    }
    for (what, first) in &answers {
        assert!(
            matches!(first, Some(m) if m.sqlstate().as_deref() == Some("08P01")),
            "{what}: want FATAL 08P01, got {first:?} (R\"\\0\\0\\0\\0\" is AuthenticationOk)"
        );
    }
    assert_eq!(creds_requests(&f.proxy).await, 0.0, "nothing reached Vault");
    f.assert_nothing_issued().await;
}
