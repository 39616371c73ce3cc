//! The upstream leg over PostgreSQL's Unix socket: `host` set to the shared cluster's socket
//! directory (`unix_socket_directories`; initdb's `local` line asks for SCRAM). The session
//! logs in as a dynamic role over the socket (the backend has no client address), a cancel
//! reaches it the same way, a warm session waits on the socket and is handed out, and every
//! lease is revoked by the end of the shutdown.

use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::harness::client::{current_user, pg_connect};
use crate::harness::env;
use crate::harness::fixture::{Fixture, GOOD_URI};
use crate::harness::proxy::set;
use crate::warm::{shut_down_and_check_revoked, wait_warm_ready, warm_count};

/// `inet_client_addr()` of the session's backend: NULL over a Unix socket.
async fn over_the_socket(s: &crate::harness::client::PgSession) -> bool {
    let row = s
        .client
        .query_one("select inet_client_addr() is null", &[])
        .await
        .expect("inet_client_addr through leasegate");
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_cancels_and_warm_sessions_over_the_upstream_unix_socket() {
    let sock = env().pg.sock.display().to_string();
    let mut f = Fixture::start_edited(
        "up-unix",
        |mut cfg| {
            cfg.databases[0].connect_timeout = Some("30s".into());
            cfg.grant(&format!("uri:{GOOD_URI}"), &["myapp"], &["readwrite"])
        },
        |t| {
            set(t, "databases.0.host", sock);
            let mut warm = toml::Table::new();
            warm.insert("readonly".into(), 1.into());
            set(t, "databases.0.warm", warm);
        },
    )
    .await;
    wait_warm_ready(&f.proxy, 1.0).await;

    // A client sending only user and database: the parameter set kept warm from the start.
    let mut warm = f.raw_session("readonly").await;
    let row = warm
        .query_column("select current_user::text || ' ' || (inet_client_addr() is null)")
        .await;
    let row = row.into_iter().flatten().next().expect("a row");
    assert!(row.starts_with(&f.mount.prefix), "{row}");
    assert!(
        row.ends_with(" true"),
        "the backend is on the Unix socket: {row}"
    );
    assert_eq!(warm_count(&f.proxy, "hit").await, 1.0, "the warm one");
    warm.terminate().await;

    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("a session through leasegate");
    assert!(current_user(&s).await.starts_with(&f.mount.prefix));
    assert!(
        over_the_socket(&s).await,
        "the backend is on the Unix socket"
    );

    let (token, tls) = (s.client.cancel_token(), s.tls.clone());
    let client = s.client;
    let query = tokio::spawn(async move {
        let r = client.simple_query("select pg_sleep(30)").await.map(drop);
        (r, client)
    });
    crate::cancel::wait_sleep_running(&f.mount.prefix).await;
    token.cancel_query(tls).await.expect("send CancelRequest");
    let (result, client) = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("the cancelled query returns within 10 s")
        .expect("query task");
    let err = result.expect_err("cancelled, not completed");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    drop(client);

    let cold = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readwrite", "myapp")
        .await
        .expect("a cold session");
    assert!(current_user(&cold).await.starts_with(&f.mount.prefix));
    assert!(over_the_socket(&cold).await);
    drop(cold);
    // The warm sessions waiting for the next clients are revoked at shutdown.
    shut_down_and_check_revoked(&mut f).await;
}

/// A socket directory where no server listens: the client gets FATAL 08006 naming the failed
/// connection, and the credential issued for it is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_directory_without_a_server_gives_08006_and_revokes_the_lease() {
    let empty = crate::harness::root().tempdir("no-server-");
    let dir = empty.path().display().to_string();
    let f = Fixture::start_edited(
        "up-unix-none",
        |cfg| cfg,
        |t| set(t, "databases.0.host", dir),
    )
    .await;
    let message = crate::faults::expect_08006(&f, Duration::from_secs(8)).await;
    assert!(
        message.starts_with("could not connect to upstream"),
        "{message:?}"
    );
    assert_eq!(
        f.issued().await.creds_requests,
        1.0,
        "one credential, for the attempt"
    );
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
