//! A burst of closes must not starve new sessions: a few hundred sessions close at once, and
//! while their revocations drain through OpenBao, new sessions still get credentials with no
//! error; afterwards every role and lease is gone. The setup times and the drain's duration
//! are printed for the benchmark report, never asserted.

use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::harness::bao::Target;
use crate::harness::client::{PgSession, current_user, pg_connect};
use crate::harness::fixture::{Fixture, wait_all_revoked_on};
use crate::harness::metrics::value_or_zero;
use crate::harness::pg::{Cluster, dynamic_roles_on};
use crate::harness::pki::Pki;
use crate::harness::proxy::{Proxy, set};

/// Sessions closed at once.
const BURST: usize = 300;
/// Opened at most at once while the burst is set up (two cores).
const OPENING: usize = 30;
/// New sessions opened one after another while the revocations drain.
const NEW: usize = 10;

/// `BURST` sessions, opened `OPENING` at a time.
async fn open_burst(f: &Fixture) -> Vec<PgSession> {
    let mut sessions = Vec::with_capacity(BURST);
    let mut tasks = JoinSet::new();
    for i in 0..BURST {
        if tasks.len() >= OPENING
            && let Some(joined) = tasks.join_next().await
        {
            sessions.push(joined.expect("session task"));
        }
        let (port, pki, cert) = (f.proxy.port, f.pki.clone(), f.good.clone());
        tasks.spawn(async move {
            pg_connect(port, &pki, Some(&cert), "readonly", "myapp")
                .await
                .unwrap_or_else(|e| panic!("burst session {i} connects: {e:?}"))
        });
    }
    while let Some(joined) = tasks.join_next().await {
        sessions.push(joined.expect("session task"));
    }
    sessions
}

fn gauge(m: &str, name: &str) -> f64 {
    value_or_zero(m, name, &[])
}

/// What the revoker is doing, for the log.
async fn revoker_state(proxy: &Proxy) -> String {
    let m = proxy.metrics().await;
    format!(
        "pending {}, in flight {}, window {}, cuts {}",
        gauge(&m, "leasegate_revocations_pending"),
        gauge(&m, "leasegate_revocations_in_flight"),
        gauge(&m, "leasegate_revocation_window"),
        gauge(&m, "leasegate_revocation_window_cuts_total"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_get_credentials_while_a_burst_of_closes_drains() {
    // A cluster of its own: the burst needs a few hundred backends at once.
    let mut cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("cluster task")
        .unwrap_or_else(|e| panic!("dedicated cluster: {e}"));
    let pg = cluster.pg.clone();
    let bao = Target::shared();
    let mount = bao.fresh_mount(&pg, "burst").await;
    let f = Fixture::with_mount(
        mount,
        Pki::new(),
        |mut cfg| {
            cfg.databases[0].port = pg.port;
            // Two cores shared with other tests: correctness, not login latency.
            cfg.databases[0].connect_timeout = Some("30s".into());
            cfg
        },
        |t| {
            set(t, "limits.burst_per_identity", 1_000);
            set(t, "limits.new_sessions_per_second_per_identity", 1_000.0);
        },
    )
    .await;

    let opened = Instant::now();
    let sessions = open_burst(&f).await;
    eprintln!("burst: {BURST} sessions open after {:?}", opened.elapsed());
    assert_eq!(
        dynamic_roles_on(&pg, &f.mount.prefix).await.len(),
        BURST,
        "one role per session"
    );

    // Close them all at once.
    let closed = Instant::now();
    let mut closing = JoinSet::new();
    for s in sessions {
        closing.spawn(async move {
            drop(s.client);
            let _ = s.driver.await;
        });
    }
    while closing.join_next().await.is_some() {}
    eprintln!(
        "burst: closed in {:?}; {}",
        closed.elapsed(),
        revoker_state(&f.proxy).await
    );

    // While they drain: new sessions, one after another, each with its own credential.
    let mut users = Vec::new();
    for i in 0..NEW {
        let before = revoker_state(&f.proxy).await;
        let started = Instant::now();
        let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
            .await
            .unwrap_or_else(|e| panic!("new session {i} during the drain: {e:?}"));
        let setup = started.elapsed();
        let user = current_user(&s).await;
        assert!(user.starts_with(&f.mount.prefix), "dynamic user {user}");
        eprintln!("burst: new session {i}: setup {setup:?} (revoker before: {before})");
        users.push(user);
        drop(s.client);
        let _ = s.driver.await;
    }
    users.sort();
    users.dedup();
    assert_eq!(users.len(), NEW, "each new session had its own user");

    wait_all_revoked_on(&bao, &pg, &f.mount, Duration::from_secs(180)).await;
    eprintln!(
        "burst: every role and lease gone {:?} after the close; {}",
        closed.elapsed(),
        revoker_state(&f.proxy).await
    );
    let m = f.proxy.metrics().await;
    let failed = value_or_zero(
        &m,
        "leasegate_lease_revocations_total",
        &[("result", "error")],
    );
    assert_eq!(failed, 0.0, "no revocation given up");
    let creds_errors = ["4xx", "5xx", "timeout", "unreachable"]
        .iter()
        .map(|s| {
            value_or_zero(
                &m,
                "leasegate_vault_requests_total",
                &[("op", "creds"), ("status", s)],
            )
        })
        .sum::<f64>();
    assert_eq!(creds_errors, 0.0, "every creds call answered");
    drop(f);
    tokio::task::spawn_blocking(move || cluster.stop_fast(Duration::from_secs(10)))
        .await
        .expect("stop task")
        .expect("stop the dedicated cluster");
}
