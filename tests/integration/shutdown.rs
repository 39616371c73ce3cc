//! How leasegate ends: SIGTERM drains (not ready, no new connections, open sessions may
//! finish within `shutdown_grace`, then get FATAL 57P01, every lease is revoked, exit 0); a
//! second signal exits at once; after a crash (SIGKILL) Vault's TTLs clean up.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::harness::bao::{Target, leases};
use crate::harness::dynamic_roles;
use crate::harness::fixture::{Fixture, messages_until_closed};
use crate::harness::poll_until;
use crate::harness::proxy::{Proxy, set};

const ADMIN_COMMAND: &str = "terminating connection due to administrator command";

/// Polls until /readyz answers `status`.
async fn wait_readyz(proxy: &Proxy, status: u16, within: Duration) {
    poll_until(within, &format!("/readyz {status}"), || async move {
        match proxy.get("/readyz").await {
            Ok((s, _)) if s == status => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Polls until TCP connections to leasegate's client port are refused (listener closed).
async fn wait_refused(port: u16) {
    poll_until(
        Duration::from_secs(2),
        "listener closed after SIGTERM",
        || async move {
            match TcpStream::connect(("127.0.0.1", port)).await {
                Err(_) => Ok(()),
                Ok(_) => Err("connection accepted".into()),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_sessions_after_the_grace_and_revokes_every_lease() {
    let mut f = Fixture::start_edited(
        "sigterm",
        |cfg| cfg,
        |t| set(t, "listen.shutdown_grace", "1s"),
    )
    .await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let mut w = f.raw_session("readonly").await;
        w.query_column("select 1").await;
        sessions.push(w);
    }
    assert_eq!(dynamic_roles(&f.mount.prefix).await.len(), 3);
    assert_eq!(leases(&f.mount, "readonly").await.len(), 3);

    let term = Instant::now();
    f.proxy.signal("TERM");
    let mut clients = JoinSet::new();
    for mut w in sessions {
        clients.spawn(
            async move { messages_until_closed(&mut w, term, Duration::from_secs(15)).await },
        );
    }
    wait_refused(f.proxy.port).await;

    let status = f
        .proxy
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("leasegate exits within 15 s of SIGTERM");
    let exited = term.elapsed();
    assert!(status.success(), "exit status {status:?}");
    while let Some(joined) = clients.join_next().await {
        let events = joined
            .expect("client task")
            .unwrap_or_else(|seen| panic!("client still connected; got {seen:?}"));
        let (at, last) = events
            .last()
            .unwrap_or_else(|| panic!("an ErrorResponse before the close"));
        let fields = last.fields();
        assert_eq!(
            last.tag, b'E',
            "last message is an ErrorResponse: {events:?}"
        );
        assert_eq!(fields.get(&'S').map(String::as_str), Some("FATAL"));
        assert_eq!(fields.get(&'C').map(String::as_str), Some("57P01"));
        assert_eq!(fields.get(&'M').map(String::as_str), Some(ADMIN_COMMAND));
        assert!(
            *at >= Duration::from_millis(900),
            "ended {at:?} after SIGTERM, before the 1 s grace was over"
        );
    }
    eprintln!("sigterm: exit 0 after {exited:?}");
    // Revoked before exiting, not eventually.
    f.assert_nothing_outstanding().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_is_not_ready_and_ends_when_the_last_session_does() {
    let mut f = Fixture::start_edited(
        "drain",
        |cfg| cfg,
        |t| set(t, "listen.shutdown_grace", "20s"),
    )
    .await;
    wait_readyz(&f.proxy, 200, Duration::from_secs(10)).await;
    let mut w = f.raw_session("readonly").await;

    let term = Instant::now();
    f.proxy.signal("TERM");
    wait_readyz(&f.proxy, 503, Duration::from_secs(2)).await;
    let (health, _) = f.proxy.get("/healthz").await.expect("/healthz answers");
    assert_eq!(health, 200, "/healthz stays 200 while draining");
    wait_refused(f.proxy.port).await;
    // The open session keeps working within the grace.
    let one = w.query_column("select 1").await;
    assert_eq!(one, vec![Some("1".to_string())]);
    assert!(
        f.proxy.try_wait().is_none(),
        "still running during the grace"
    );

    let closed = Instant::now();
    w.terminate().await;
    let status = f
        .proxy
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("leasegate exits once its last session ended");
    assert!(status.success(), "exit status {status:?}");
    eprintln!(
        "drain: exit {:?} after the last session closed ({:?} after SIGTERM, grace 20 s)",
        closed.elapsed(),
        term.elapsed()
    );
    assert!(
        term.elapsed() < Duration::from_secs(15),
        "exit did not wait for the grace"
    );
    f.assert_nothing_outstanding().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_during_the_drain_exits_at_once() {
    let mut f = Fixture::start_edited(
        "second-signal",
        |cfg| cfg,
        |t| set(t, "listen.shutdown_grace", "30s"),
    )
    .await;
    let _w = f.raw_session("readonly").await;
    f.proxy.signal("TERM");
    // Draining has begun once /readyz turns 503.
    wait_readyz(&f.proxy, 503, Duration::from_secs(2)).await;
    assert!(
        f.proxy.try_wait().is_none(),
        "draining, waiting for the session"
    );

    let second = Instant::now();
    f.proxy.signal("INT");
    let status = f
        .proxy
        .wait_exit(Duration::from_secs(1))
        .await
        .unwrap_or_else(|| panic!("leasegate still running 1 s after the second signal"));
    eprintln!(
        "second signal: exit {status:?} after {:?}",
        second.elapsed()
    );
    assert!(
        !status.success(),
        "an interrupted drain is not a clean exit"
    );
    assert_eq!(status.code(), Some(130), "documented exit code 130");

    // leasegate left the lease behind; clean up through Vault.
    Target::shared().revoke_mount_leases(&f.mount).await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_vault_expires_the_leases_and_drops_the_roles() {
    let mut f = Fixture::start("crash").await;
    Target::shared()
        .set_role_ttl(&f.mount, "readonly", "20s", "1h")
        .await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(f.raw_session("readonly").await);
    }
    assert_eq!(dynamic_roles(&f.mount.prefix).await.len(), 3);
    assert_eq!(leases(&f.mount, "readonly").await.len(), 3);

    eprintln!("crash: SIGKILL to leasegate (pid {})", f.proxy.pid());
    f.proxy.kill();
    let killed = Instant::now();
    for w in &mut sessions {
        let closed = w.closed_within(Duration::from_secs(5)).await;
        assert!(closed.is_ok(), "client connections close with the process");
    }
    // Nothing revokes the leases now but their TTL (20 s).
    f.wait_all_revoked(Duration::from_secs(35)).await;
    eprintln!(
        "crash: roles and leases gone {:?} after SIGKILL",
        killed.elapsed()
    );
}
