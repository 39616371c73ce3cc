//! PostgreSQL failing behind leasegate the way an operator meets it: the session's backend
//! killed with `pg_terminate_backend`, its database closed to connections (`ALLOW_CONNECTIONS
//! false`) and then dropped `WITH (FORCE)`, the server out of connection slots, a Vault role whose
//! creation statements fail, and the server stopped while sessions are open and new ones
//! arrive. The client gets PostgreSQL's own error (or 08006 without Vault internals), every
//! lease issued is revoked and no role is left, and leasegate keeps serving.

use std::time::{Duration, Instant};

use crate::harness::bao::{self, Target};
use crate::harness::client::{Raw, Transport, raw_startup, tls_config};
use crate::harness::fixture::{Fixture, Issued, messages_until_closed, wait_all_revoked_on};
use crate::harness::metrics::value_or_zero;
use crate::harness::pg::{Cluster, Pg, dynamic_roles, dynamic_roles_on};
use crate::harness::pki::Pki;
use crate::harness::security::{assert_fatal, counter};
use crate::harness::wire::{Msg, Tls, Wire};
use crate::harness::{env, next_id, poll_until};

/// The good client's startup as `role` on `myapp`.
async fn attempt(f: &Fixture, role: &str) -> Raw {
    raw_startup(
        f.proxy.port,
        Transport::Tls(tls_config(&f.pki, Some(&f.good))),
        role,
        "myapp",
    )
    .await
}

/// `select pg_backend_pid()` through a raw session.
async fn backend_pid(w: &mut Wire<Tls>) -> i32 {
    let pid = w.query_column("select pg_backend_pid()").await;
    pid[0]
        .as_deref()
        .and_then(|p| p.parse().ok())
        .expect("pg_backend_pid() is a number")
}

/// Waits until the server closed the session and returns the ErrorResponses it relayed.
async fn relayed_errors(w: &mut Wire<Tls>) -> Vec<Msg> {
    let seen = messages_until_closed(w, Instant::now(), Duration::from_secs(10))
        .await
        .unwrap_or_else(|seen| panic!("session still open after 10 s; saw {seen:?}"));
    seen.into_iter()
        .map(|(_, m)| m)
        .filter(|m| m.tag == b'E')
        .collect()
}

/// Panics unless `errors` is exactly one FATAL ErrorResponse with `code` whose message
/// contains `needle`.
#[track_caller]
fn assert_one_fatal(errors: &[Msg], code: &str, needle: &str) {
    assert_eq!(errors.len(), 1, "one relayed ErrorResponse: {errors:?}");
    let fields = errors[0].fields();
    assert_eq!(fields.get(&'S').map(String::as_str), Some("FATAL"));
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some(code),
        "{fields:?}"
    );
    let message = fields.get(&'M').cloned().unwrap_or_default();
    assert!(message.contains(needle), "{message:?} contains {needle:?}");
}

/// Polls until `leasegate_lease_revocations_total{result="ok"}` is `n` and no lease is held
/// or being revoked.
async fn wait_revocations_ok(f: &Fixture, n: f64) {
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(15),
        "revocations finished",
        || async move {
            let m = proxy.metrics().await;
            let ok = value_or_zero(&m, "leasegate_lease_revocations_total", &[("result", "ok")]);
            let active = value_or_zero(&m, "leasegate_leases_active", &[]);
            let pending = value_or_zero(&m, "leasegate_revocations_pending", &[]);
            if ok == n && pending == 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "revocations ok {ok}, leases active {active}, pending {pending}"
                ))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backend_relays_57p01_and_the_lease_is_revoked() {
    let f = Fixture::start("pg-terminate").await;
    let mut w = f.raw_session("readonly").await;
    let pid = backend_pid(&mut w).await;
    assert_eq!(dynamic_roles(&f.mount.prefix).await.len(), 1);

    let su = env().pg.superuser().await;
    let row = su
        .query_one("select pg_terminate_backend($1)", &[&pid])
        .await
        .expect("pg_terminate_backend");
    assert!(row.get::<_, bool>(0), "backend {pid} was signalled");

    let errors = relayed_errors(&mut w).await;
    assert_one_fatal(
        &errors,
        "57P01",
        "terminating connection due to administrator",
    );
    f.wait_all_revoked(Duration::from_secs(10)).await;
    wait_revocations_ok(&f, 1.0).await;
    let ended = counter(
        &f.proxy,
        "leasegate_sessions_ended_total",
        &[("reason", "upstream")],
    )
    .await;
    assert_eq!(ended, 1.0, "the session counted as ended by the upstream");
    f.assert_good_client_works().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_closed_then_dropped_is_relayed_and_every_lease_revoked() {
    let db = format!("lgf_closed_{}", next_id());
    let su = env().pg.superuser().await;
    su.batch_execute(&format!("create database {db}"))
        .await
        .expect("create the test database");
    let upstream = db.clone();
    let f = Fixture::start_with("pg-db-closed", move |mut cfg| {
        cfg.databases[0].upstream_database = Some(upstream);
        cfg
    })
    .await;
    let mut open = f.raw_session("readonly").await;
    let user = open.query_column("select current_user").await[0].clone();

    // Closed to new connections: the open session goes on, a new one gets PostgreSQL's 55000.
    su.batch_execute(&format!("alter database {db} allow_connections false"))
        .await
        .expect("close the database");
    let answer = attempt(&f, "readonly").await;
    assert_fatal(
        &answer,
        "55000",
        &[&db, "not currently accepting connections"],
    );
    wait_revocations_ok(&f, 1.0).await;
    assert_eq!(
        dynamic_roles(&f.mount.prefix).await,
        vec![user.clone().expect("current_user")],
        "only the open session's role is left"
    );
    assert_eq!(
        open.query_column("select 1").await,
        vec![Some("1".into())],
        "the open session is untouched"
    );

    // Dropped with its sessions: the open one gets 57P01, a new one 3D000; nothing is left.
    su.batch_execute(&format!("drop database {db} with (force)"))
        .await
        .expect("drop the test database");
    let errors = relayed_errors(&mut open).await;
    assert_one_fatal(
        &errors,
        "57P01",
        "terminating connection due to administrator",
    );
    let answer = attempt(&f, "readonly").await;
    assert_fatal(&answer, "3D000", &[&db, "does not exist"]);
    wait_revocations_ok(&f, 3.0).await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    let m = f.proxy.metrics().await;
    let rejected = value_or_zero(
        &m,
        "leasegate_upstream_errors_total",
        &[("database", "myapp"), ("kind", "rejected")],
    );
    assert_eq!(rejected, 2.0, "both refused logins counted:\n{m}");
}

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
async fn failing_creation_statements_give_08006_and_issue_nothing() {
    let f = Fixture::start_with("pg-bad-create", |mut cfg| {
        cfg.databases[0].roles.push("broken".into());
        cfg.grants[0].roles.push("broken".into());
        cfg
    })
    .await;
    let body = serde_json::json!({
        "db_name": "pg",
        "default_ttl": "5m",
        "max_ttl": "1h",
        "creation_statements": [
            "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
            "GRANT USAGE ON SCHEMA lgf_no_such_schema TO \"{{name}}\";"
        ],
        "revocation_statements": ["DROP ROLE IF EXISTS \"{{name}}\";"],
    });
    let path = format!("{}/roles/broken", f.mount.name);
    bao::write(reqwest::Method::POST, &path, &body).await;

    let answer = attempt(&f, "broken").await;
    let message = assert_fatal(
        &answer,
        "08006",
        &["could not obtain credentials", "broken"],
    );
    for leak in [
        "lgf_no_such_schema",
        "schema",
        "pq:",
        "GRANT",
        &f.mount.prefix,
    ] {
        assert!(!message.contains(leak), "{message:?} leaks {leak:?}");
    }
    assert_eq!(
        f.issued().await,
        Issued {
            leases: 0.0,
            creds_requests: 1.0
        },
        "one creds request, nothing issued"
    );
    let status_5xx = counter(
        &f.proxy,
        "leasegate_vault_requests_total",
        &[("op", "creds"), ("status", "5xx")],
    )
    .await;
    assert_eq!(status_5xx, 1.0, "OpenBao's answer counted as 5xx");
    assert!(
        bao::leases(&f.mount, "broken").await.is_empty(),
        "no lease of the broken role"
    );
    f.assert_nothing_outstanding().await;
    f.assert_good_client_works().await;
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
