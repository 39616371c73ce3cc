//! Abuse limits: concurrent sessions per identity, new sessions per second per identity, the
//! global session cap, and a flood of half-open connections. A refused client gets FATAL
//! 53300 before leasegate asks Vault for anything (creds requests unchanged, no lease, no
//! role), the refusal is counted in `leasegate_auth_failures_total{reason}`, and other
//! identities are not affected.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::harness::bao::leases;
use crate::harness::client::{PgSession, Raw, current_user, pg_connect};
use crate::harness::fixture::{Fixture, GOOD_URI};
use crate::harness::pki::{ClientCert, Identity};
use crate::harness::poll_until;
use crate::harness::proxy::{ProcessOptions, ProxyConfig, set};
use crate::harness::security::{
    assert_fatal, counter, creds_requests, fixture_edited, tls_startup, wait_auth_failures,
};

const OTHER_URI: &str = "spiffe://leasegate.test/app/other";
const THIRD_URI: &str = "spiffe://leasegate.test/app/third";

/// The standard fixture plus grants for two more identities, with `[limits]` set.
async fn limited(name: &str, limits: &[(&str, toml::Value)]) -> Fixture {
    let limits = limits.to_vec();
    fixture_edited(
        name,
        |cfg: ProxyConfig| {
            cfg.grant(&format!("uri:{OTHER_URI}"), &["myapp"], &["readonly"])
                .grant(&format!("uri:{THIRD_URI}"), &["myapp"], &["readonly"])
        },
        ProcessOptions::default(),
        move |config, _| {
            for (key, value) in limits {
                set(config, &format!("limits.{key}"), value);
            }
        },
    )
    .await
}

async fn open(f: &Fixture, cert: &ClientCert) -> PgSession {
    let s = pg_connect(f.proxy.port, &f.pki, Some(cert), "readonly", "myapp")
        .await
        .expect("session within the limits connects");
    let user = current_user(&s).await;
    assert!(user.starts_with(&f.mount.prefix), "session user {user}");
    s
}

async fn close(s: PgSession) {
    drop(s.client);
    let _ = s.driver.await;
}

async fn startup(f: &Fixture, cert: &ClientCert) -> Raw {
    tls_startup(f.proxy.port, &f.pki, Some(cert), "readonly", "myapp").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_concurrent_session_of_an_identity_gets_53300() {
    let f = limited(
        "sec-limit-ident",
        &[("max_sessions_per_identity", 2i64.into())],
    )
    .await;
    let other = f.pki.client("other", Identity::Uri(OTHER_URI.into()));
    let first = open(&f, &f.good).await;
    let second = open(&f, &f.good).await;
    assert_eq!(creds_requests(&f.proxy).await, 2.0);

    let answer = startup(&f, &f.good).await;
    eprintln!("third session: {answer:?}");
    assert_fatal(
        &answer,
        "53300",
        &[&format!(
            "too many sessions for identity \"uri:{GOOD_URI}\" (limit 2)"
        )],
    );
    wait_auth_failures(&f.proxy, "identity_session_limit", 1.0).await;
    assert_eq!(
        creds_requests(&f.proxy).await,
        2.0,
        "the refused session must not ask Vault"
    );
    assert_eq!(
        leases(&f.mount, "readonly").await.len(),
        2,
        "only the two open sessions hold leases"
    );

    // Another identity is not limited by the good client's sessions.
    let third = open(&f, &other).await;
    close(third).await;

    // A freed slot can be used again.
    close(first).await;
    let (proxy, pki, good) = (&f.proxy, &f.pki, &f.good);
    poll_until(
        Duration::from_secs(10),
        "a slot after closing one session",
        || async move {
            match tls_startup(proxy.port, pki, Some(good), "readonly", "myapp").await {
                Raw::Ready => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    close(second).await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fourth_immediate_session_over_the_rate_limit_gets_53300() {
    let f = limited(
        "sec-limit-rate",
        &[
            ("new_sessions_per_second_per_identity", 1.0f64.into()),
            ("burst_per_identity", 3i64.into()),
        ],
    )
    .await;
    // Four sessions at the same instant: the bucket holds three.
    let mut tasks = JoinSet::new();
    for _ in 0..4 {
        let (port, pki, good) = (f.proxy.port, f.pki.clone(), f.good.clone());
        tasks.spawn(async move { tls_startup(port, &pki, Some(&good), "readonly", "myapp").await });
    }
    let answers = tasks.join_all().await;
    eprintln!("answers: {answers:?}");
    let ready = answers.iter().filter(|a| matches!(a, Raw::Ready)).count();
    assert_eq!(ready, 3, "the burst admits three sessions: {answers:?}");
    let refused = answers
        .iter()
        .find(|a| !matches!(a, Raw::Ready))
        .expect("one session refused");
    assert_fatal(
        refused,
        "53300",
        &[&format!(
            "too many new sessions per second for identity \"uri:{GOOD_URI}\" (limit 1/s)"
        )],
    );
    wait_auth_failures(&f.proxy, "identity_rate_limit", 1.0).await;
    assert_eq!(
        creds_requests(&f.proxy).await,
        3.0,
        "the refused session must not ask Vault"
    );

    // Other identities have their own bucket.
    let other = f.pki.client("other", Identity::Uri(OTHER_URI.into()));
    let answer = startup(&f, &other).await;
    assert!(matches!(answer, Raw::Ready), "other identity: {answer:?}");

    // The bucket refills at 1/s.
    let (proxy, pki, good) = (&f.proxy, &f.pki, &f.good);
    poll_until(
        Duration::from_secs(5),
        "a token after the refill",
        || async move {
            match tls_startup(proxy.port, pki, Some(good), "readonly", "myapp").await {
                Raw::Ready => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_over_the_global_limit_gets_53300() {
    let f = limited("sec-limit-global", &[("max_sessions", 2i64.into())]).await;
    let other = f.pki.client("other", Identity::Uri(OTHER_URI.into()));
    let third = f.pki.client("third", Identity::Uri(THIRD_URI.into()));
    let a = open(&f, &f.good).await;
    let b = open(&f, &other).await;

    let answer = startup(&f, &third).await;
    eprintln!("third identity: {answer:?}");
    assert_fatal(
        &answer,
        "53300",
        &["too many sessions through leasegate (limit 2)"],
    );
    wait_auth_failures(&f.proxy, "global_session_limit", 1.0).await;
    assert_eq!(
        creds_requests(&f.proxy).await,
        2.0,
        "the refused session must not ask Vault"
    );
    assert_eq!(leases(&f.mount, "readonly").await.len(), 2);

    close(a).await;
    let (proxy, pki, third) = (&f.proxy, &f.pki, &third);
    poll_until(
        Duration::from_secs(10),
        "a slot after closing one session",
        || async move {
            match tls_startup(proxy.port, pki, Some(third), "readonly", "myapp").await {
                Raw::Ready => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    close(b).await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

/// With every one of `listen.max_connections` taken, leasegate's accept loop holds an overflow
/// slot while it waits for the next client; a session that then ends frees its permit. The
/// next client must get it. It used to stay in the accept loop's hand (taken when that client
/// was accepted, before it asked for it), so that client waited until yet another one came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_freed_while_the_listener_was_full_goes_to_the_next_client() {
    let f = Fixture::start_edited(
        "sec-limit-maxconn-freed",
        |cfg| cfg,
        |t| set(t, "listen.max_connections", 1),
    )
    .await;
    let first = open(&f, &f.good).await;
    close(first).await;
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(10),
        "the first session ended",
        || async move {
            match counter(proxy, "leasegate_sessions_active", &[]).await {
                0.0 => Ok(()),
                n => Err(format!("{n} sessions active")),
            }
        },
    )
    .await;
    let next = tokio::time::timeout(Duration::from_secs(20), open(&f, &f.good))
        .await
        .expect("the next client gets the freed slot");
    close(next).await;
    assert_eq!(creds_requests(&f.proxy).await, 2.0);
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

/// Silent connections and connections stalled inside the TLS handshake.
const SILENT: usize = 500;
const STALLED_TLS: usize = 50;
const LOGIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens one flood connection (silent, or stalled inside the TLS handshake) and returns it
/// with the moment it was fully open.
async fn flood_connection(port: u16, stall_in_tls: bool) -> (TcpStream, Instant) {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    if stall_in_tls {
        s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .expect("SSLRequest");
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.expect("SSLRequest answer");
        assert_eq!(answer[0], b'S');
        // The first bytes of a TLS record announcing a 512-byte ClientHello, then silence.
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
            .await
            .expect("partial ClientHello");
    }
    (s, Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_flood_neither_blocks_clients_nor_lingers() {
    let f = Fixture::start_with("sec-flood", |mut cfg| {
        cfg.login_timeout = Some("5s".into());
        cfg
    })
    .await;
    let port = f.proxy.port;
    let flood_started = Instant::now();
    // A few at a time: a burst of hundreds of SYNs makes the kernel answer with SYN cookies,
    // and a cookie connection whose ACK meets a full accept queue is lost on the server side
    // while the client believes it open (it would never read EOF).
    let mut idle = Vec::with_capacity(SILENT + STALLED_TLS);
    for batch in (0..SILENT + STALLED_TLS).collect::<Vec<_>>().chunks(25) {
        let mut opening = JoinSet::new();
        for &i in batch {
            opening.spawn(flood_connection(port, i >= SILENT));
        }
        idle.extend(opening.join_all().await);
    }
    let first_open = idle.iter().map(|(_, at)| *at).min().expect("flood");
    eprintln!(
        "{} idle connections opened in {:?}",
        idle.len(),
        flood_started.elapsed()
    );

    // A good client is served at once, while every flood connection is still held open.
    let started = Instant::now();
    let answer = startup(&f, &f.good).await;
    let took = started.elapsed();
    assert!(
        matches!(answer, Raw::Ready),
        "good client during the flood: {answer:?}"
    );
    assert!(
        took < Duration::from_secs(1),
        "good session took {took:?} during the flood, want < 1 s"
    );
    assert!(
        first_open.elapsed() < LOGIN_TIMEOUT,
        "the good session must finish while the flood is still open ({:?} after the first \
         flood connection)",
        first_open.elapsed()
    );

    // leasegate closes every idle connection at login_timeout after it opened: each reads EOF.
    let mut readers = JoinSet::new();
    for (mut s, opened) in idle {
        readers.spawn(async move {
            let mut buf = [0u8; 64];
            let r = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await;
            (r.map(|r| r.map_err(|e| e.kind())), opened.elapsed())
        });
    }
    let results = readers.join_all().await;
    let mut earliest = Duration::MAX;
    let mut latest = Duration::ZERO;
    for (r, after) in &results {
        match r {
            Ok(Ok(0)) => {}
            other => panic!("idle connection: want EOF, got {other:?}"),
        }
        earliest = earliest.min(*after);
        latest = latest.max(*after);
    }
    eprintln!("idle connections closed between {earliest:?} and {latest:?} after they opened");
    assert!(
        earliest >= LOGIN_TIMEOUT - Duration::from_millis(300),
        "closed before login_timeout: {earliest:?}"
    );
    // On a loaded 2-core machine 550 timers firing at once, each writing a log and an audit
    // line, take a few seconds to work through: the bound is "closed", not "closed at once".
    assert!(
        latest <= LOGIN_TIMEOUT + Duration::from_secs(10),
        "closed long after login_timeout: {latest:?}"
    );
    wait_auth_failures(&f.proxy, "login_timeout", (SILENT + STALLED_TLS) as f64).await;
    assert_eq!(
        creds_requests(&f.proxy).await,
        1.0,
        "only the good session asked Vault"
    );
    f.wait_all_revoked(Duration::from_secs(10)).await;
    f.assert_good_client_works().await;
}
