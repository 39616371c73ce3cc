//! Query cancellation through leasegate: the client's CancelRequest carries leasegate's
//! BackendKeyData and must reach the upstream backend, both inside TLS (tokio-postgres) and
//! as plaintext (libpq 15, i.e. psql on Ctrl-C).

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;

use crate::harness::client::{conninfo, pg_connect, psql_command};
use crate::harness::fixture::Fixture;
use crate::harness::pg::active_queries;
use crate::harness::poll_until;

const SLEEP: &str = "select pg_sleep(30)";

/// Waits until a backend of this test's dynamic roles runs pg_sleep.
pub async fn wait_sleep_running(prefix: &str) {
    wait_sleeps_running(prefix, 1).await;
}

/// Waits until `want` backends of this test's dynamic roles run pg_sleep.
async fn wait_sleeps_running(prefix: &str, want: i64) {
    poll_until(
        Duration::from_secs(15),
        "pg_sleep running upstream",
        || async move {
            match active_queries(prefix, "pg_sleep").await {
                n if n == want => Ok(()),
                n => Err(format!("{n} active pg_sleep backends, want {want}")),
            }
        },
    )
    .await;
}

/// Sends psql SIGINT (its Ctrl-C: libpq 15 sends a plaintext CancelRequest) and checks that
/// it reports its statement cancelled (57014) within 5 s.
async fn sigint_cancels(child: tokio::process::Child) {
    let pid = child.id().expect("psql pid");
    let sent = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "SIGINT delivered to psql");
    let out = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output())
        .await
        .expect("psql returns within 5 s of SIGINT")
        .expect("psql output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "psql reports the cancelled query as an error"
    );
    assert!(
        stderr.contains("57014") && stderr.contains("canceling statement due to user request"),
        "psql says: {stderr}"
    );
    eprintln!("psql cancelled after {:?}", sent.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_cancel_request_over_tls_cancels_the_query() {
    let f = Fixture::start("cancel-tls").await;
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("connect through leasegate");
    let token = s.client.cancel_token();
    let client = s.client;
    let query = tokio::spawn(async move { client.simple_query(SLEEP).await.map(drop) });
    wait_sleep_running(&f.mount.prefix).await;

    let sent = Instant::now();
    token
        .cancel_query(s.tls.clone())
        .await
        .expect("send CancelRequest through leasegate");
    let result = tokio::time::timeout(Duration::from_secs(5), query)
        .await
        .expect("cancelled query returns within 5 s")
        .expect("query task");
    let err = result.expect_err("the query is cancelled, not completed");
    assert_eq!(
        err.code(),
        Some(&SqlState::QUERY_CANCELED),
        "SQLSTATE 57014 expected, got {err:?}"
    );
    eprintln!("cancelled after {:?}", sent.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_sigint_cancels_the_query() {
    let f = Fixture::start("cancel-psql").await;
    let info = conninfo(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp");
    let child = psql_command(&info, SLEEP).spawn().expect("spawn psql");
    wait_sleep_running(&f.mount.prefix).await;
    sigint_cancels(child).await;
}

/// With every connection slot taken (`listen.max_connections = 2`: psql and tokio-postgres
/// each running a statement), cancels are still served at once, as PostgreSQL serves cancels
/// past its own limit: tokio-postgres's inside TLS (as libpq 17 sends them), then psql's Ctrl-C
/// in plaintext (libpq ≤ 16). A further session waits, and gets the slot psql frees; one whose
/// client leaves while it waits asks Vault for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_are_served_while_every_connection_slot_is_taken() {
    use crate::harness::client::{current_user, tls_config};
    use crate::harness::proxy::set;
    use crate::harness::security::{counter, creds_requests};
    use crate::harness::wire::{PROTOCOL_3_0, startup_packet, tls_connect};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start_edited(
        "cancel-full",
        |cfg| cfg,
        |t| set(t, "listen.max_connections", 2),
    )
    .await;
    let info = conninfo(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp");
    let child = psql_command(&info, SLEEP).spawn().expect("spawn psql");
    wait_sleep_running(&f.mount.prefix).await;
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("second session");
    let (token, tls, client) = (s.client.cancel_token(), s.tls.clone(), s.client);
    let query = tokio::spawn(async move {
        let r = client.simple_query(SLEEP).await.map(drop);
        (r, client)
    });
    wait_sleeps_running(&f.mount.prefix, 2).await;

    let (port, pki, good) = (f.proxy.port, f.pki.clone(), f.good.clone());
    let mut third =
        tokio::spawn(async move { pg_connect(port, &pki, Some(&good), "readonly", "myapp").await });
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut third)
            .await
            .is_err(),
        "a third session while both slots are taken"
    );

    tokio::time::timeout(Duration::from_secs(5), token.cancel_query(tls))
        .await
        .expect("the cancel inside TLS is served within 5 s")
        .expect("send CancelRequest inside TLS");
    let (result, _client) = tokio::time::timeout(Duration::from_secs(5), query)
        .await
        .expect("the cancelled query returns within 5 s")
        .expect("query task");
    let err = result.expect_err("the query is cancelled, not completed");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");

    sigint_cancels(child).await;
    let forwarded = counter(
        &f.proxy,
        "leasegate_cancel_requests_total",
        &[("result", "forwarded")],
    )
    .await;
    assert_eq!(forwarded, 2.0);

    // psql's session has ended, so the waiting one takes its slot.
    let third = tokio::time::timeout(Duration::from_secs(20), third)
        .await
        .expect("the waiting session gets through once a slot frees")
        .expect("task")
        .expect("third session");
    assert!(current_user(&third).await.starts_with(&f.mount.prefix));

    // Full again: a client that gives up while it waits for a slot costs no Vault call.
    let asked = creds_requests(&f.proxy).await;
    let mut gone = tls_connect(f.proxy.port, tls_config(&f.pki, Some(&f.good)))
        .await
        .expect("TLS while full");
    let startup = startup_packet(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")]);
    gone.write_all(&startup).await.expect("startup");
    gone.flush().await.expect("flush");
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_secs(1), gone.read(&mut buf))
            .await
            .is_err(),
        "waits for a slot, unanswered"
    );
    drop(gone);
    drop(third);
    let next = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("a session once the slot is free");
    assert!(current_user(&next).await.starts_with(&f.mount.prefix));
    assert_eq!(
        creds_requests(&f.proxy).await,
        asked + 1.0,
        "only the session that stayed asked Vault"
    );
    drop((next, _client));
    f.wait_all_revoked(Duration::from_secs(20)).await;
}
