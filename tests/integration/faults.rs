//! Failures behind leasegate: Vault unreachable, hanging or answering 503, the upstream
//! database unreachable or refusing the login. The client must get FATAL 08006 quickly
//! (or the upstream's own error), without Vault-internal text, and a lease that was already
//! issued must be revoked.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::harness::bao;
use crate::harness::client::{Raw, Transport, raw_startup, tls_config};
use crate::harness::closed_port;
use crate::harness::fixture::Fixture;
use crate::harness::metrics::value_or_zero;
use crate::harness::poll_until;

/// Text the fake Vault puts in its error body; it must never reach a client.
const VAULT_INTERNAL: &str = "SECRET-INTERNAL-DETAIL backend 10.9.8.7 exploded";

#[derive(Clone, Copy)]
enum FakeVault {
    /// Accepts connections, reads the requests, never answers.
    Hang,
    /// Answers every request with 503 and an error body.
    Unavailable,
}

/// A tiny local HTTP server standing in for a broken Vault. Runs until the test's runtime
/// ends.
async fn fake_vault(mode: FakeVault) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake vault");
    let port = listener.local_addr().expect("fake vault addr").port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut seen = Vec::new();
                loop {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    let complete = seen.windows(4).any(|w| w == b"\r\n\r\n");
                    if let (FakeVault::Unavailable, true) = (mode, complete) {
                        let body = format!("{{\"errors\":[\"{VAULT_INTERNAL}\"]}}");
                        let resp = format!(
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = sock.write_all(resp.as_bytes()).await;
                        let _ = sock.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Starts a session and asserts FATAL 08006 within `within`; returns the message.
async fn expect_08006(f: &Fixture, within: Duration) -> String {
    let started = Instant::now();
    let answer = raw_startup(
        f.proxy.port,
        Transport::Tls(tls_config(&f.pki, Some(&f.good))),
        "readonly",
        "myapp",
    )
    .await;
    let took = started.elapsed();
    let message = answer.expect_error("08006").to_string();
    if let Raw::Error { severity, .. } = &answer {
        assert_eq!(severity, "FATAL");
    }
    assert!(took < within, "08006 took {took:?}, want < {within:?}");
    eprintln!("08006 after {took:?}: {message}");
    message
}

#[track_caller]
fn assert_no_vault_internals(message: &str, vault_port: u16) {
    assert!(
        message.starts_with("could not obtain credentials"),
        "message {message:?} starts with \"could not obtain credentials\""
    );
    for secret in [
        VAULT_INTERNAL,
        "10.9.8.7",
        &format!(":{vault_port}"),
        "root",
    ] {
        assert!(
            !message.contains(secret),
            "message {message:?} leaks {secret:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_unreachable_gives_08006() {
    let port = closed_port();
    let f = Fixture::start_with("vault-closed", |mut cfg| {
        cfg.vault_address = format!("http://127.0.0.1:{port}");
        cfg.vault_timeout = Some("1s".into());
        cfg
    })
    .await;
    let message = expect_08006(&f, Duration::from_secs(5)).await;
    assert_no_vault_internals(&message, port);
    f.assert_nothing_issued().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_that_never_answers_gives_08006_after_timeout() {
    let port = fake_vault(FakeVault::Hang).await;
    let f = Fixture::start_with("vault-hang", |mut cfg| {
        cfg.vault_address = format!("http://127.0.0.1:{port}");
        cfg.vault_timeout = Some("1s".into());
        cfg
    })
    .await;
    let message = expect_08006(&f, Duration::from_secs(6)).await;
    assert_no_vault_internals(&message, port);
    f.assert_nothing_issued().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_answering_503_gives_08006_without_vault_text() {
    let port = fake_vault(FakeVault::Unavailable).await;
    let f = Fixture::start_with("vault-503", |mut cfg| {
        cfg.vault_address = format!("http://127.0.0.1:{port}");
        cfg.vault_timeout = Some("1s".into());
        cfg
    })
    .await;
    let message = expect_08006(&f, Duration::from_secs(6)).await;
    assert_no_vault_internals(&message, port);
    f.assert_nothing_issued().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_unreachable_gives_08006_and_revokes_the_lease() {
    let port = closed_port();
    let f = Fixture::start_with("upstream-down", |mut cfg| {
        cfg.databases[0].port = port;
        cfg.databases[0].connect_timeout = Some("2s".into());
        cfg
    })
    .await;
    let message = expect_08006(&f, Duration::from_secs(8)).await;
    assert!(
        message.starts_with("could not connect to upstream"),
        "message {message:?} starts with \"could not connect to upstream\""
    );
    // A lease was issued (Vault was fine) and must be revoked again.
    f.wait_all_revoked(Duration::from_secs(10)).await;
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(10),
        "revocation counted",
        || async move {
            let m = proxy.metrics().await;
            let creds = value_or_zero(
                &m,
                "leasegate_vault_request_duration_seconds_count",
                &[("op", "creds")],
            );
            let revoked =
                value_or_zero(&m, "leasegate_lease_revocations_total", &[("result", "ok")]);
            let active = value_or_zero(&m, "leasegate_leases_active", &[]);
            if creds == 1.0 && revoked == 1.0 && active == 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "creds {creds}, revocations ok {revoked}, leases active {active}"
                ))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_login_error_is_relayed_and_the_lease_revoked() {
    // A Vault role whose users may not log in: the upstream refuses the login itself.
    let f = Fixture::start_with("upstream-nologin", |mut cfg| {
        cfg.databases[0].roles.push("nologin".into());
        cfg.grants[0].roles.push("nologin".into());
        cfg
    })
    .await;
    let body = serde_json::json!({
        "db_name": "pg",
        "default_ttl": "5m",
        "max_ttl": "1h",
        "creation_statements": [
            "CREATE ROLE \"{{name}}\" WITH NOLOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"
        ],
        "revocation_statements": ["DROP ROLE IF EXISTS \"{{name}}\";"],
    });
    let path = format!("{}/roles/nologin", f.mount.name);
    bao::write(reqwest::Method::POST, &path, &body).await;

    let answer = raw_startup(
        f.proxy.port,
        Transport::Tls(tls_config(&f.pki, Some(&f.good))),
        "nologin",
        "myapp",
    )
    .await;
    eprintln!("answer: {answer:?}");
    let message = answer.expect_error("28000");
    assert!(
        message.contains("is not permitted to log in") && message.contains(&f.mount.prefix),
        "upstream's own message expected, got {message:?}"
    );
    f.wait_failed_login_revoked("nologin").await;
}
