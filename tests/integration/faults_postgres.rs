//! PostgreSQL failing behind leasegate the way an operator meets it, in one database: the
//! session's backend killed with `pg_terminate_backend` (idle or mid-statement), its database
//! closed to connections (`ALLOW_CONNECTIONS false`) and then dropped `WITH (FORCE)`, a Vault
//! role whose creation statements fail. The client gets PostgreSQL's own error (or 08006 without Vault internals),
//! every lease issued is revoked and no role is left, and leasegate keeps serving. Faults of
//! the whole server are in `faults_postgres_server`.

use std::time::{Duration, Instant};

use crate::harness::bao;
use crate::harness::client::{Raw, Transport, raw_startup, tls_config};
use crate::harness::fixture::{Fixture, Issued, messages_until_closed};
use crate::harness::metrics::value_or_zero;
use crate::harness::pg::{dynamic_roles, wait_one_active};
use crate::harness::security::{assert_fatal, counter};
use crate::harness::wire::{Msg, Tls, Wire, query_message};
use crate::harness::{env, next_id};

/// The good client's startup as `role` on `myapp`.
pub(crate) async fn attempt(f: &Fixture, role: &str) -> Raw {
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
pub(crate) async fn relayed_errors(w: &mut Wire<Tls>) -> Vec<Msg> {
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
pub(crate) fn assert_one_fatal(errors: &[Msg], code: &str, needle: &str) {
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

/// `pg_terminate_backend` on the session's backend, idle or in the middle of a statement:
/// PostgreSQL's FATAL 57P01 reaches the client, the lease is revoked, the role dropped.
async fn terminated_backend(name: &str, busy: bool) {
    let f = Fixture::start(name).await;
    let mut w = f.raw_session("readonly").await;
    let pid = backend_pid(&mut w).await;
    assert_eq!(dynamic_roles(&f.mount.prefix).await.len(), 1);
    if busy {
        w.send(&query_message("select pg_sleep(30)"))
            .await
            .expect("send the statement");
        wait_one_active(&f.mount.prefix, "pg_sleep").await;
    }

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
    f.wait_revocations_ok(1.0, None, Duration::from_secs(15))
        .await;
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
async fn terminated_backend_relays_57p01_and_the_lease_is_revoked() {
    terminated_backend("pg-terminate", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_terminated_mid_statement_relays_57p01_and_the_lease_is_revoked() {
    terminated_backend("pg-terminate-busy", true).await;
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
    f.wait_revocations_ok(1.0, None, Duration::from_secs(15))
        .await;
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
    f.wait_revocations_ok(3.0, None, Duration::from_secs(15))
        .await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    let m = f.proxy.metrics().await;
    let rejected = value_or_zero(
        &m,
        "leasegate_upstream_errors_total",
        &[("database", "myapp"), ("kind", "rejected")],
    );
    assert_eq!(rejected, 2.0, "both refused logins counted:\n{m}");
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
