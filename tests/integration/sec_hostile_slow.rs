//! Slow and stalled clients before authentication: one that sends its SSLRequest a byte a
//! second, one that completes TLS and then dribbles its StartupMessage, one that stops inside
//! its StartupMessage. Each is cut at `[listen] login_timeout` (the whole pre-authentication
//! phase, not per read) with no Vault call, while a granted client is served. When stalled
//! connections fill `listen.max_connections`, further clients wait in the accept queue (as
//! README says) and are served once `login_timeout` frees the slots.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::client::{Raw, tls_config};
use crate::harness::fixture::Fixture;
use crate::harness::proxy::set;
use crate::harness::security::{creds_requests, tls_startup, wait_auth_failures};
use crate::harness::wire::{PROTOCOL_3_0, startup_packet, tls_connect};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const LOGIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Writes `bytes` one per second until the peer stops taking them; returns when the
/// connection was found closed (EOF or an error on read or write), measured from `since`.
async fn dribble<S>(mut s: S, bytes: &[u8], since: Instant) -> Duration
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = [0u8; 256];
    for b in bytes {
        if s.write_all(&[*b]).await.is_err() || s.flush().await.is_err() {
            return since.elapsed();
        }
        // A read that ends within a second: the connection was closed.
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
            Ok(Ok(n)) => panic!("unexpected answer {:02x?}", &buf[..n]),
        }
    }
    panic!("every byte was taken: the connection was never cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dribbling_clients_are_cut_at_login_timeout_while_others_are_served() {
    let f = Fixture::start_with("sec-hostile-slow", |mut cfg| {
        cfg.login_timeout = Some("3s".into());
        cfg
    })
    .await;
    let port = f.proxy.port;
    let startup = startup_packet(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")]);

    // An SSLRequest a byte a second (8 s in all).
    let opened = Instant::now();
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let ssl = tokio::spawn(async move { dribble(tcp, &SSL_REQUEST, opened).await });
    // TLS at once, then the StartupMessage a byte a second.
    let config = tls_config(&f.pki, Some(&f.good));
    let tls_opened = Instant::now();
    let tls = tls_connect(port, config.clone()).await.expect("TLS");
    let packet = startup.clone();
    let in_tls = tokio::spawn(async move { dribble(tls, &packet, tls_opened).await });
    // TLS, then all of the StartupMessage but its last byte, then silence.
    let cut_opened = Instant::now();
    let mut cut = tls_connect(port, config).await.expect("TLS");
    cut.write_all(&startup[..startup.len() - 1])
        .await
        .expect("send");
    cut.flush().await.expect("flush");

    // Meanwhile granted clients log in (three sessions: raw, then raw and tokio-postgres).
    let answer = tls_startup(port, &f.pki, Some(&f.good), "readonly", "myapp").await;
    assert!(matches!(answer, Raw::Ready), "{answer:?}");
    f.assert_good_client_works().await;

    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), cut.read_to_end(&mut rest)).await;
    let cut_after = cut_opened.elapsed();
    assert!(read.is_ok(), "the stalled StartupMessage is cut");
    let (ssl_after, tls_after) = (ssl.await.expect("ssl"), in_tls.await.expect("tls"));
    eprintln!(
        "cut after: SSLRequest dribble {ssl_after:?}, StartupMessage dribble {tls_after:?}, \
         stalled StartupMessage {cut_after:?}"
    );
    for (what, after) in [
        ("SSLRequest dribble", ssl_after),
        ("StartupMessage dribble", tls_after),
        ("stalled StartupMessage", cut_after),
    ] {
        // The dribbles notice the close at their next one-second read.
        assert!(
            after >= LOGIN_TIMEOUT - Duration::from_millis(200)
                && after < LOGIN_TIMEOUT + Duration::from_secs(3),
            "{what} cut after {after:?}, want login_timeout ({LOGIN_TIMEOUT:?})"
        );
    }
    wait_auth_failures(&f.proxy, "login_timeout", 3.0).await;
    assert_eq!(
        creds_requests(&f.proxy).await,
        3.0,
        "only the granted sessions asked Vault"
    );
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_filling_max_connections_delay_others_until_login_timeout() {
    const MAX: usize = 20;
    let f = Fixture::start_edited(
        "sec-hostile-maxconn",
        |mut cfg| {
            cfg.login_timeout = Some("3s".into());
            cfg
        },
        |t| set(t, "listen.max_connections", MAX as i64),
    )
    .await;
    let port = f.proxy.port;
    let mut stalled = Vec::new();
    for _ in 0..MAX {
        stalled.push(
            TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    let flood = Instant::now();
    // One more client: accepted by the kernel, it waits in the queue until a slot frees.
    let answer = tls_startup(port, &f.pki, Some(&f.good), "readonly", "myapp").await;
    let served = flood.elapsed();
    eprintln!("granted client served {served:?} after {MAX} stalled connections: {answer:?}");
    assert!(matches!(answer, Raw::Ready), "{answer:?}");
    assert!(
        served >= LOGIN_TIMEOUT - Duration::from_millis(500) && served < LOGIN_TIMEOUT * 3,
        "served {served:?} after the flood, want once login_timeout freed the slots"
    );
    for mut s in stalled {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "stalled connection closed: {r:?}"
        );
    }
    wait_auth_failures(&f.proxy, "login_timeout", MAX as f64).await;
    assert_eq!(creds_requests(&f.proxy).await, 1.0);
    f.wait_all_revoked(Duration::from_secs(10)).await;
    f.assert_good_client_works().await;
}

/// A client that never reads while its session must end (`max_session_duration`): the
/// closing FATAL cannot be delivered, so leasegate cuts the session (`lifecycle`'s
/// FORCE_AFTER), closes the backend and revokes the lease; the client, once it reads, finds
/// the connection closed after what the kernel buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_must_end_is_cut_even_when_its_client_never_reads() {
    let f = Fixture::start_edited(
        "sec-hostile-end-unread",
        |cfg| cfg,
        |t| set(t, "databases.0.max_session_duration", "3s"),
    )
    .await;
    let mut w = f.raw_session("readonly").await;
    let opened = Instant::now();
    let pid: i32 = w.query_column("select pg_backend_pid()::text").await[0]
        .as_deref()
        .and_then(|p| p.parse().ok())
        .expect("pid");
    // Results of 64 MiB each, never read.
    let query = crate::harness::wire::query_message(
        "select repeat('x', 1048576) from generate_series(1, 64)",
    );
    w.send(&query.repeat(50)).await.expect("send the pipeline");
    let (mount, su) = (&f.mount, crate::harness::env().pg.superuser().await);
    let su = &su;
    crate::harness::poll_until(
        Duration::from_secs(20),
        "backend gone, lease revoked, role dropped",
        || async move {
            let n: i64 = su
                .query_one(
                    "select count(*) from pg_stat_activity where pid = $1",
                    &[&pid],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            let roles = crate::harness::pg::dynamic_roles(&mount.prefix).await;
            let leases = crate::harness::bao::all_leases(mount).await;
            if n == 0 && roles.is_empty() && leases.is_empty() {
                Ok(())
            } else {
                Err(format!("backend {n}, roles {roles:?}, leases {leases:?}"))
            }
        },
    )
    .await;
    let gone = opened.elapsed();
    eprintln!("session that never read ended, backend, role and lease gone {gone:?} after login");
    // max_session_duration, FORCE_AFTER (4 s), and the close (at most 5 s).
    assert!(
        gone < Duration::from_secs(3 + 4 + 5 + 5),
        "ended after {gone:?}"
    );
    // The client finds EOF after the buffered bytes.
    let mut sink = vec![0u8; 1 << 16];
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match w.stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the client's connection is closed");
    f.assert_good_client_works().await;
}
