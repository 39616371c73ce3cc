//! sqlx (Rust, rustls with aws-lc-rs) through leasegate with `sslmode=verify-full` and a
//! client certificate: a query, a transaction (rollback, then commit), prepared statements
//! (sqlx's per-connection statement cache and an explicit `prepare`), and a pool.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{Connection, Executor, PgConnection, Row, Statement};

use crate::harness::compat::{CompatRow, locked_crate_version};
use crate::harness::fixture::Fixture;

fn options(f: &Fixture) -> PgConnectOptions {
    PgConnectOptions::new()
        .host("localhost")
        .port(f.proxy.port)
        .database("myapp")
        .username("readonly")
        .ssl_mode(PgSslMode::VerifyFull)
        .ssl_root_cert(f.pki.ca_pem())
        .ssl_client_cert(&f.good.cert)
        .ssl_client_key(&f.good.key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_query_transaction_prepared_statements_and_pool() {
    let version = format!("sqlx {} (rustls, aws-lc-rs)", locked_crate_version("sqlx"));
    let mut row = CompatRow::new("sqlx", 35, "sqlx (Rust, rustls)", &version);
    let f = Fixture::start("compat-sqlx").await;

    row.step("verify-full with client certificate, query");
    let mut conn = PgConnection::connect_with(&options(&f))
        .await
        .expect("sqlx connects through leasegate");
    let user: String = sqlx::query_scalar("select current_user")
        .fetch_one(&mut conn)
        .await
        .expect("select current_user");
    assert!(user.starts_with(&f.mount.prefix), "a dynamic role: {user}");

    row.step("transaction: rollback, commit");
    conn.execute("create temp table t (x int4)")
        .await
        .expect("temp table");
    let mut tx = conn.begin().await.expect("begin");
    tx.execute("insert into t values (1)")
        .await
        .expect("insert");
    tx.rollback().await.expect("rollback");
    let mut tx = conn.begin().await.expect("begin");
    tx.execute("insert into t values (2), (3)")
        .await
        .expect("insert");
    tx.commit().await.expect("commit");
    let sum: i64 = sqlx::query_scalar("select sum(x) from t")
        .fetch_one(&mut conn)
        .await
        .expect("sum");
    assert_eq!(
        sum, 5,
        "the rolled-back row is gone, the committed ones stay"
    );

    row.step("prepared statements: cached (bind ×10) and explicit prepare");
    for i in 1..=10i32 {
        let doubled: i32 = sqlx::query_scalar("select $1::int4 * 2")
            .bind(i)
            .fetch_one(&mut conn)
            .await
            .expect("bound query");
        assert_eq!(doubled, 2 * i);
    }
    let statement = conn
        .prepare("select $1::int8 + 1 as n")
        .await
        .expect("prepare");
    for i in [1i64, 41] {
        let r = statement
            .query()
            .bind(i)
            .fetch_one(&mut conn)
            .await
            .expect("prepared query");
        assert_eq!(r.get::<i64, _>("n"), i + 1);
    }
    conn.close().await.expect("close");

    row.step("PgPool (2 connections)");
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(15))
        .connect_with(options(&f))
        .await
        .expect("pool");
    let mut first = pool.acquire().await.expect("first pooled connection");
    let mut second = pool.acquire().await.expect("second pooled connection");
    let pid = |c| sqlx::query_scalar::<_, i32>("select pg_backend_pid()").fetch_one(c);
    let (a, b) = (pid(&mut *first).await, pid(&mut *second).await);
    assert!(
        a.is_ok() && b.is_ok() && a.as_ref().ok() != b.as_ref().ok(),
        "{a:?} {b:?}"
    );
    drop((first, second));
    pool.close().await;
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
