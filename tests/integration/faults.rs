//! Failures behind leasegate: Vault unreachable from the start (leasegate never gets a token,
//! so it asks for no credential), a Vault that accepted leasegate's token but hangs or answers
//! 503 to the creds call, the upstream database unreachable or refusing the login. The client
//! must get FATAL 08006 quickly (or the upstream's own error), without Vault-internal text,
//! and a lease that was already issued must be revoked.
//!
//! For a Vault that is down, leasegate is pointed away from the real OpenBao, so "nothing
//! issued" is asserted where it can fail: on what the stand-in saw (the fake Vault's
//! requests: one creds request, no lease call; a closed port held closed for the whole test)
//! and on leasegate's own counters (each Vault call counted with its outcome, no lease).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpSocket;

use crate::harness::bao;
use crate::harness::client::{Raw, Transport, raw_startup, tls_config};
use crate::harness::closed_port;
use crate::harness::fake_vault::{FakeVault, Reply, Request, lookup_self_ok};
use crate::harness::fixture::{Fixture, Issued};
use crate::harness::metrics::value_or_zero;
use crate::harness::poll_until;

/// Text the fake Vault puts in its error body; it must never reach a client.
const VAULT_INTERNAL: &str = "SECRET-INTERNAL-DETAIL backend 10.9.8.7 exploded";
/// Where leasegate checks its static token (answered by the fakes, so that it holds one).
const LOOKUP_SELF: &str = "/v1/auth/token/lookup-self";

/// A fake Vault that accepts leasegate's token (`lookup-self`), then reads every other
/// request and never answers it.
async fn hanging_vault() -> FakeVault {
    FakeVault::start(|req: Request| async move {
        if req.path == LOOKUP_SELF {
            return lookup_self_ok();
        }
        Reply::After(
            Duration::from_secs(3600),
            Box::new(Reply::Json(500, "{}".into())),
        )
    })
    .await
}

/// A fake Vault that accepts leasegate's token (`lookup-self`), then answers every other
/// request with 503 and an error body naming internals.
async fn unavailable_vault() -> FakeVault {
    FakeVault::start(|req: Request| async move {
        if req.path == LOOKUP_SELF {
            return lookup_self_ok();
        }
        Reply::Json(503, format!("{{\"errors\":[\"{VAULT_INTERNAL}\"]}}"))
    })
    .await
}

/// Polls until /readyz answers 200: leasegate holds a usable token from the fake, so that a
/// session's failure is the creds call's and not "no usable Vault token".
async fn wait_ready(f: &Fixture) {
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(10),
        "/readyz 200 (a token from the fake Vault)",
        || async move {
            match proxy.get("/readyz").await {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

/// A loopback port held bound but not listening for as long as the guard lives: every
/// connection to it is refused, and nothing else can start listening there meanwhile.
struct HeldClosed {
    port: u16,
    _socket: TcpSocket,
}

impl HeldClosed {
    fn new() -> HeldClosed {
        let socket = TcpSocket::new_v4().expect("TCP socket");
        let addr = SocketAddr::from(([127, 0, 0, 1], closed_port()));
        socket.bind(addr).expect("bind the closed port");
        let port = socket.local_addr().expect("bound address").port();
        HeldClosed {
            port,
            _socket: socket,
        }
    }

    /// Panics unless a connection to the port is refused right now.
    async fn assert_refuses(&self) {
        let e = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect_err("the held port accepted a connection");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    }
}

/// `leasegate_vault_requests_total{op="creds",status}`.
async fn creds_with_status(f: &Fixture, status: &str) -> f64 {
    let m = f.proxy.metrics().await;
    value_or_zero(
        &m,
        "leasegate_vault_requests_total",
        &[("op", "creds"), ("status", status)],
    )
}

/// leasegate asked Vault for one credential, counted it with `status`, and issued no lease
/// and holds none.
async fn assert_one_creds_attempt_nothing_issued(f: &Fixture, status: &str) {
    assert_eq!(
        f.issued().await,
        Issued {
            leases: 0.0,
            creds_requests: 1.0
        },
        "one creds request, no lease issued"
    );
    assert_eq!(
        creds_with_status(f, status).await,
        1.0,
        "the creds request counted as status=\"{status}\""
    );
    let m = f.proxy.metrics().await;
    assert_eq!(value_or_zero(&m, "leasegate_leases_active", &[]), 0.0);
}

/// The fake received exactly one creds request for the good client's role and no lease
/// revocation.
#[track_caller]
fn assert_fake_saw_one_creds_request(fake: &FakeVault, f: &Fixture) {
    let requests: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    let creds = format!("GET /v1/{}/creds/readonly", f.mount.name);
    assert_eq!(
        requests.iter().filter(|r| **r == creds).count(),
        1,
        "exactly one {creds:?}; the fake saw {requests:?}"
    );
    assert!(
        !requests.iter().any(|r| r.contains("/v1/sys/leases/")),
        "no lease renewed or revoked; the fake saw {requests:?}"
    );
}

/// Starts a session and asserts FATAL 08006 within `within`; returns the message.
pub async fn expect_08006(f: &Fixture, within: Duration) -> String {
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
    let closed = HeldClosed::new();
    let port = closed.port;
    let f = Fixture::start_with("vault-closed", |mut cfg| {
        cfg.vault_address = format!("http://127.0.0.1:{port}");
        cfg.vault_timeout = Some("1s".into());
        cfg
    })
    .await;
    let message = expect_08006(&f, Duration::from_secs(5)).await;
    assert_no_vault_internals(&message, port);
    // The port refused every connection for the whole test: leasegate never got a token, so
    // it asked for no credential, and each Vault call it tried failed to connect.
    closed.assert_refuses().await;
    assert_eq!(
        f.issued().await,
        Issued::AT_START,
        "no creds request, no lease"
    );
    let m = f.proxy.metrics().await;
    let calls = value_or_zero(&m, "leasegate_vault_requests_total", &[]);
    let unreachable = value_or_zero(
        &m,
        "leasegate_vault_requests_total",
        &[("status", "unreachable")],
    );
    assert!(
        calls >= 1.0 && unreachable == calls,
        "every Vault call unreachable: {calls} calls, {unreachable} unreachable"
    );
    assert_eq!(value_or_zero(&m, "leasegate_leases_active", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_that_never_answers_gives_08006_after_timeout() {
    let fake = hanging_vault().await;
    let f = Fixture::start_with("vault-hang", |mut cfg| {
        cfg.vault_address = fake.addr();
        cfg.vault_timeout = Some("1s".into());
        cfg
    })
    .await;
    wait_ready(&f).await;
    let message = expect_08006(&f, Duration::from_secs(6)).await;
    assert_no_vault_internals(&message, fake.port);
    assert_fake_saw_one_creds_request(&fake, &f);
    assert_one_creds_attempt_nothing_issued(&f, "timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_answering_503_gives_08006_without_vault_text() {
    let fake = unavailable_vault().await;
    let f = Fixture::start_with("vault-503", |mut cfg| {
        cfg.vault_address = fake.addr();
        cfg.vault_timeout = Some("1s".into());
        cfg
    })
    .await;
    wait_ready(&f).await;
    let message = expect_08006(&f, Duration::from_secs(6)).await;
    assert_no_vault_internals(&message, fake.port);
    assert_fake_saw_one_creds_request(&fake, &f);
    assert_one_creds_attempt_nothing_issued(&f, "5xx").await;
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
