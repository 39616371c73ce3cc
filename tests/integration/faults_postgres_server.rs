//! A whole PostgreSQL server failing behind leasegate, on a cluster of the test's own: out of
//! connection slots for ordinary roles, a `pg_hba.conf` that rejects the dynamic roles, and
//! the server stopped while sessions are open and new ones arrive, and SIGTERM while it is
//! down. The client gets PostgreSQL's own error, or 08006 within `vault.timeout`; every lease
//! issued is revoked once the server lets OpenBao drop the role, and no role is left; a drain
//! that cannot revoke ends within its bound and names each lease it leaves.

use std::time::{Duration, Instant};

use crate::faults_postgres::{assert_one_fatal, attempt, relayed_errors};
use crate::harness::bao::Target;
use crate::harness::client::Raw;
use crate::harness::fixture::{Fixture, wait_all_revoked_on};
use crate::harness::metrics::value_or_zero;
use crate::harness::pg::{Cluster, Pg, dynamic_roles_on};
use crate::harness::pki::Pki;
use crate::harness::poll_until;
use crate::harness::security::assert_fatal;

/// A dedicated cluster (so that filling it hurts no other test) and a fixture on it.
async fn own_cluster(name: &str, setup: &[&str]) -> (Cluster, Fixture) {
    let mut cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("cluster task")
        .unwrap_or_else(|e| panic!("dedicated cluster: {e}"));
    if !setup.is_empty() {
        for sql in setup {
            cluster.pg.psql("myapp", sql).expect("cluster setup");
        }
        cluster = tokio::task::spawn_blocking(move || cluster.restart_fast().map(|()| cluster))
            .await
            .expect("restart task")
            .unwrap_or_else(|e| panic!("restart: {e}"));
    }
    let pg = cluster.pg.clone();
    let mount = Target::shared().fresh_mount(&pg, name).await;
    let f = Fixture::with_mount(
        mount,
        Pki::new(),
        |mut cfg| {
            cfg.databases[0].port = pg.port;
            cfg.databases[0].connect_timeout = Some("3s".into());
            cfg.vault_timeout = Some("3s".into());
            cfg
        },
        |_| {},
    )
    .await;
    (cluster, f)
}

/// Connections of the ordinary login role `filler` to `pg` until the server refuses one
/// with 53300; returns them.
async fn fill(pg: &Pg) -> Vec<tokio_postgres::Client> {
    let mut held = Vec::new();
    for _ in 0..20 {
        let connected = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(pg.port)
            .user("filler")
            .password("filler")
            .dbname("myapp")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await;
        match connected {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                held.push(client);
            }
            Err(e) => {
                let code = e.as_db_error().map(|d| d.code().code().to_string());
                assert_eq!(code.as_deref(), Some("53300"), "full server refuses: {e}");
                return held;
            }
        }
    }
    panic!("the server took 20 connections of ordinary roles");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_out_of_connection_slots_gives_53300_and_revokes_the_fresh_lease() {
    // The test clusters run with max_connections = 500 (a command-line setting); reserving
    // all but 4 for superusers leaves ordinary roles, the dynamic ones among them, 4 slots,
    // while OpenBao (a superuser) can still create and drop roles.
    let (cluster, f) = own_cluster(
        "pg-full",
        &[
            "alter system set superuser_reserved_connections = 496",
            "create role filler login password 'filler'",
        ],
    )
    .await;
    let shared = Target::shared();
    f.assert_good_client_works().await;
    wait_all_revoked_on(&shared, &cluster.pg, &f.mount, Duration::from_secs(10)).await;
    let held = fill(&cluster.pg).await;
    assert!(!held.is_empty(), "some slots were free before");
    let before = f.issued().await;
    let answer = attempt(&f, "readonly").await;
    eprintln!(
        "pg-full: {} connections held; answer {answer:?}",
        held.len()
    );
    assert_fatal(&answer, "53300", &["connection slots are reserved"]);
    let after = f.issued().await;
    assert_eq!(
        after.leases,
        before.leases + 1.0,
        "the credential was issued"
    );
    wait_all_revoked_on(&shared, &cluster.pg, &f.mount, Duration::from_secs(15)).await;
    let m = f.proxy.metrics().await;
    let rejected = value_or_zero(
        &m,
        "leasegate_upstream_errors_total",
        &[("database", "myapp"), ("kind", "rejected")],
    );
    assert_eq!(rejected, 1.0, "the refused login counted:\n{m}");
    drop(held);
    // Room again: the next session works.
    poll_until(
        Duration::from_secs(10),
        "a session once room is back",
        || {
            let f = &f;
            async move {
                match attempt(f, "readonly").await {
                    Raw::Ready => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    wait_all_revoked_on(&shared, &cluster.pg, &f.mount, Duration::from_secs(15)).await;
    drop(f);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_server_ends_sessions_refuses_new_ones_quickly_and_revocation_catches_up() {
    let (cluster, f) = own_cluster("pg-stopped", &[]).await;
    let pg = cluster.pg.clone();
    let mut open = vec![
        f.raw_session("readonly").await,
        f.raw_session("readonly").await,
    ];
    assert_eq!(dynamic_roles_on(&pg, &f.mount.prefix).await.len(), 2);

    let mut cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        cluster.stop_fast(Duration::from_secs(30)).map(|()| cluster)
    })
    .await
    .expect("stop task")
    .unwrap_or_else(|e| panic!("stop: {e}"));
    for w in &mut open {
        let errors = relayed_errors(w).await;
        assert_one_fatal(
            &errors,
            "57P01",
            "terminating connection due to administrator",
        );
    }
    // New sessions while the server is down: 08006 within vault.timeout (3 s), no hang.
    for _ in 0..3 {
        let asked = Instant::now();
        let answer = attempt(&f, "readonly").await;
        let took = asked.elapsed();
        assert_fatal(&answer, "08006", &["could not obtain credentials"]);
        assert!(took < Duration::from_secs(5), "08006 took {took:?}");
    }
    // The two revocations fail while the server is down and are retried.
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(10),
        "revocations retried",
        || async move {
            let m = proxy.metrics().await;
            // OpenBao answers 400 when its plugin cannot reach the server.
            let failed = value_or_zero(&m, "leasegate_vault_requests_total", &[("op", "revoke")]);
            let pending = value_or_zero(&m, "leasegate_revocations_pending", &[]);
            if failed >= 2.0 && pending == 2.0 {
                Ok(())
            } else {
                Err(format!("failed revoke calls {failed}, pending {pending}"))
            }
        },
    )
    .await;

    let mut cluster = tokio::task::spawn_blocking(move || cluster.restart_fast().map(|()| cluster))
        .await
        .expect("start task")
        .unwrap_or_else(|e| panic!("start again: {e}"));
    wait_all_revoked_on(&Target::shared(), &pg, &f.mount, Duration::from_secs(30)).await;
    let m = f.proxy.metrics().await;
    assert_eq!(
        value_or_zero(&m, "leasegate_lease_revocations_total", &[("result", "ok")]),
        2.0,
        "both revocations went through once the server was back"
    );
    f.assert_good_client_works().await;
    wait_all_revoked_on(&Target::shared(), &pg, &f.mount, Duration::from_secs(15)).await;
    drop(f);
    tokio::task::spawn_blocking(move || cluster.stop_fast(Duration::from_secs(10)))
        .await
        .expect("stop task")
        .expect("stop the dedicated cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_hba_rejecting_the_dynamic_roles_gives_28000_and_revokes_the_fresh_lease() {
    let (cluster, f) = own_cluster(
        "pg-hba",
        &["create role hba_probe login password 'probe' in role leasegate_readonly"],
    )
    .await;
    let pg = cluster.pg.clone();
    // An operator's pg_hba.conf change locks out every member of leasegate_readonly.
    let data = pg.log.parent().expect("cluster directory").join("data");
    let hba = data.join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    let locked = format!("host all +leasegate_readonly 127.0.0.1/32 reject\n{rules}");
    std::fs::write(&hba, locked).expect("write pg_hba.conf");
    pg.psql("myapp", "select pg_reload_conf()")
        .expect("reload the server configuration");
    poll_until(Duration::from_secs(10), "pg_hba.conf in force", || {
        let pg = pg.clone();
        async move {
            let connected = tokio_postgres::Config::new()
                .host("127.0.0.1")
                .port(pg.port)
                .user("hba_probe")
                .password("probe")
                .dbname("myapp")
                .connect(tokio_postgres::NoTls)
                .await;
            match connected {
                Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "28000") => Ok(()),
                Err(e) => Err(format!("{e}")),
                Ok(_) => Err("still accepted".into()),
            }
        }
    })
    .await;

    let answer = attempt(&f, "readonly").await;
    assert_fatal(&answer, "28000", &["pg_hba.conf rejects connection"]);
    wait_all_revoked_on(&Target::shared(), &pg, &f.mount, Duration::from_secs(15)).await;
    let m = f.proxy.metrics().await;
    let rejected = value_or_zero(
        &m,
        "leasegate_upstream_errors_total",
        &[("database", "myapp"), ("kind", "rejected")],
    );
    assert_eq!(rejected, 1.0, "the refused login counted:\n{m}");
    drop(f);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_server_is_down_exits_in_time_and_names_the_leases_left() {
    let (cluster, mut f) = own_cluster("pg-down-sigterm", &[]).await;
    let pg = cluster.pg.clone();
    let mut open = vec![
        f.raw_session("readonly").await,
        f.raw_session("readonly").await,
    ];
    let leases: Vec<String> = Target::shared().leases(&f.mount, "readonly").await;
    assert_eq!(leases.len(), 2);
    let mut cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        cluster.stop_fast(Duration::from_secs(30)).map(|()| cluster)
    })
    .await
    .expect("stop task")
    .unwrap_or_else(|e| panic!("stop: {e}"));
    for w in &mut open {
        let errors = relayed_errors(w).await;
        assert_one_fatal(
            &errors,
            "57P01",
            "terminating connection due to administrator",
        );
    }

    // The revocations cannot succeed while the server is down: the drain waits at most
    // 4 × vault.timeout (3 s here) for them, then exits 0 naming each lease left.
    let signalled = Instant::now();
    f.proxy.signal("TERM");
    let status = f
        .proxy
        .wait_exit(Duration::from_secs(4 * 3 + 10))
        .await
        .expect("leasegate exits within its bound");
    assert!(status.success(), "exit status {status:?}");
    eprintln!(
        "pg-down-sigterm: exited {:?} after SIGTERM",
        signalled.elapsed()
    );
    let log = f.proxy.log_text();
    for id in &leases {
        assert!(
            log.lines().any(|l| l.contains("ERROR")
                && l.contains("lease left unrevoked at exit")
                && l.contains(id.as_str())),
            "lease {id} named at ERROR"
        );
    }

    // What is left is what the log said: revoked by hand once the server is back.
    let mut cluster = tokio::task::spawn_blocking(move || cluster.restart_fast().map(|()| cluster))
        .await
        .expect("start task")
        .unwrap_or_else(|e| panic!("start again: {e}"));
    assert_eq!(Target::shared().leases(&f.mount, "readonly").await.len(), 2);
    Target::shared().revoke_mount_leases(&f.mount).await;
    wait_all_revoked_on(&Target::shared(), &pg, &f.mount, Duration::from_secs(15)).await;
    tokio::task::spawn_blocking(move || cluster.stop_fast(Duration::from_secs(10)))
        .await
        .expect("stop task")
        .expect("stop the dedicated cluster");
}
