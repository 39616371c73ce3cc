//! A slow Vault: every call answered after 1.5 to 2 s, under `vault.timeout` (a forwarding
//! stand-in in front of the real OpenBao). Sessions churning through it all succeed and every
//! lease is revoked; a client that leaves while its credential is being created has it
//! revoked and no backend left; SIGTERM with ten sessions open still ends each with 57P01,
//! revokes every lease before the process exits (nothing left in OpenBao, no role in
//! PostgreSQL) and exits 0 within its documented bound.

use std::time::{Duration, Instant};

use reqwest::Method;

use crate::faults_vault::{wait_no_revocation_pending, wait_readyz};
use crate::harness::bao::Target;
use crate::harness::client::{Raw, Transport, raw_startup, tls_config};
use crate::harness::env;
use crate::harness::fake_vault::{FakeVault, Reply, Request};
use crate::harness::fixture::{Fixture, messages_until_closed};
use crate::harness::metrics::value_or_zero;
use crate::harness::pg::{backend_titles, dynamic_roles};
use crate::harness::proxy::set;
use crate::harness::wire::{PROTOCOL_3_0, Wire, startup_packet, tls_connect};

/// Forwards `req` to the shared OpenBao after `delay`.
async fn slow_forward(bao: Target, req: Request, delay: Duration) -> Reply {
    tokio::time::sleep(delay).await;
    let method = Method::from_bytes(req.method.as_bytes()).expect("method");
    let mut out = reqwest::Client::new().request(method, format!("{}{}", bao.addr, req.path));
    for name in ["x-vault-token", "x-vault-request", "content-type"] {
        if let Some(v) = req.header(name) {
            out = out.header(name, v);
        }
    }
    let resp = out.body(req.body.clone()).send().await.expect("forward");
    let status = resp.status().as_u16();
    Reply::Json(status, resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_slow_vault_revokes_every_lease_before_exit() {
    const SESSIONS: usize = 10;
    let bao = Target::shared();
    let fake = FakeVault::start(move |req: Request| {
        slow_forward(bao.clone(), req, Duration::from_millis(1500))
    })
    .await;
    let address = fake.addr();
    let mut f = Fixture::start_edited(
        "sigterm-slow-vault",
        |mut cfg| {
            cfg.vault_address = address;
            cfg.vault_timeout = Some("5s".into());
            cfg
        },
        |t| set(t, "listen.shutdown_grace", "1s"),
    )
    .await;
    let mut open = Vec::new();
    for _ in 0..SESSIONS {
        open.push(f.raw_session("readonly").await);
    }
    assert_eq!(dynamic_roles(&f.mount.prefix).await.len(), SESSIONS);

    let signalled = Instant::now();
    f.proxy.signal("TERM");
    for w in &mut open {
        let seen = messages_until_closed(w, signalled, Duration::from_secs(15))
            .await
            .unwrap_or_else(|seen| panic!("session still open: {seen:?}"));
        let codes: Vec<_> = seen.iter().filter_map(|(_, m)| m.sqlstate()).collect();
        assert_eq!(codes, ["57P01"], "{seen:?}");
    }
    // Documented bound: drain_delay (0 s here) + shutdown_grace + 10 s + 4 × vault.timeout.
    let status = f
        .proxy
        .wait_exit(Duration::from_secs(1 + 10 + 20))
        .await
        .expect("leasegate exits within its bound");
    assert!(status.success(), "exit status {status:?}");
    eprintln!(
        "sigterm-slow-vault: exited {:?} after SIGTERM",
        signalled.elapsed()
    );
    f.assert_nothing_outstanding().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_answering_after_two_seconds_slows_sessions_but_fails_none() {
    let bao = Target::shared();
    let fake = FakeVault::start(move |req: Request| {
        let bao = bao.clone();
        async move { slow_forward(bao, req, Duration::from_secs(2)).await }
    })
    .await;
    let address = fake.addr();
    let f = Fixture::start_with("vault-slow", |mut cfg| {
        cfg.vault_address = address;
        cfg.vault_timeout = Some("5s".into());
        cfg
    })
    .await;
    wait_readyz(&f.proxy, 200, Duration::from_secs(20)).await;
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (port, pki, good) = (f.proxy.port, f.pki.clone(), f.good.clone());
        clients.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..3 {
                let config = tls_config(&pki, Some(&good));
                answers.push(raw_startup(port, Transport::Tls(config), "readonly", "myapp").await);
            }
            answers
        }));
    }
    for client in clients {
        for answer in client.await.expect("client task") {
            assert!(matches!(answer, Raw::Ready), "session failed: {answer:?}");
        }
    }
    eprintln!("vault-slow: 12 sessions in {:?}", started.elapsed());
    let (ok, error) = wait_no_revocation_pending(&f.proxy, Duration::from_secs(60)).await;
    assert_eq!((ok, error), (12.0, 0.0), "every lease revoked");
    f.wait_all_revoked(Duration::from_secs(10)).await;
    let m = f.proxy.metrics().await;
    let timeouts = value_or_zero(
        &m,
        "leasegate_vault_requests_total",
        &[("status", "timeout")],
    );
    assert_eq!(timeouts, 0.0, "no Vault call timed out:\n{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_leaves_during_a_slow_creds_call_has_its_lease_revoked() {
    let bao = Target::shared();
    let fake = FakeVault::start(move |req: Request| {
        let delay = if req.path.contains("/creds/") {
            Duration::from_millis(1500)
        } else {
            Duration::ZERO
        };
        slow_forward(bao.clone(), req, delay)
    })
    .await;
    let address = fake.addr();
    let f = Fixture::start_with("client-leaves-mid-creds", |mut cfg| {
        cfg.vault_address = address;
        cfg
    })
    .await;
    let stream = tls_connect(f.proxy.port, tls_config(&f.pki, Some(&f.good)))
        .await
        .expect("TLS connection");
    let mut wire = Wire::new(stream);
    let startup = startup_packet(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")]);
    wire.send(&startup).await.expect("startup");
    let creds = format!("/v1/{}/creds/readonly", f.mount.name);
    fake.wait_request("GET", &creds, Duration::from_secs(10))
        .await;
    drop(wire);
    // The credential arrives after the client left: revoked, and no backend is left.
    f.wait_revocations_ok(1.0, Some(0.0), Duration::from_secs(15))
        .await;
    f.assert_nothing_outstanding().await;
    assert!(
        backend_titles(&env().pg, &f.mount.prefix).is_empty(),
        "no backend left"
    );
}
