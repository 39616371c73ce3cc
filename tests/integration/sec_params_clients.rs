//! Startup parameters from real clients through leasegate (see `sec_params`): what
//! tokio-postgres (`options`, `application_name`), psql (`options` in the connection string,
//! `PGOPTIONS`, `PGTZ`, `PGDATESTYLE`, the fallback application name), psycopg and node `pg`
//! send reaches the upstream (`current_setting`), and `post_auth_delay` in `options` is
//! refused with 42501 naming it.

use std::time::Duration;

use tokio_postgres::error::SqlState;

use super::sec_params::assert_no_backend;
use crate::harness::client::{MakeRustls, conninfo, psql, psql_command, tls_config};
use crate::harness::compat::{client_env, repo, require_node_pg, require_psycopg, run_script};
use crate::harness::fixture::Fixture;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_and_psql_send_allowed_parameters_and_hear_refusals() {
    let f = Fixture::start("sec-params-clients").await;
    let tls = MakeRustls(tls_config(&f.pki, Some(&f.good)));
    let base = || {
        let mut c = tokio_postgres::Config::new();
        c.host("localhost")
            .hostaddr(std::net::Ipv4Addr::LOCALHOST.into())
            .port(f.proxy.port)
            .user("readonly")
            .dbname("myapp")
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(Duration::from_secs(15));
        c
    };
    let mut cfg = base();
    cfg.application_name("tp-params")
        .options(r"-c statement_timeout=1234 -c search_path=a\,\ b");
    let (client, conn) = cfg
        .connect(tls.clone())
        .await
        .expect("tokio-postgres connects");
    let driver = tokio::spawn(conn);
    let row = client
        .query_one(
            "select current_setting('application_name'), current_setting('statement_timeout'), \
             current_setting('search_path')",
            &[],
        )
        .await
        .expect("settings");
    let got: (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(got, ("tp-params".into(), "1234ms".into(), "a, b".into()));
    drop(client);
    let _ = driver.await;
    let mut cfg = base();
    cfg.options("-c post_auth_delay=2");
    let err = cfg
        .connect(tls.clone())
        .await
        .err()
        .expect("post_auth_delay refused");
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    let message = err.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("\"post_auth_delay\"")),
        "{message:?}"
    );

    // psql: options in the connection string, PGOPTIONS, PGTZ and PGDATESTYLE (libpq sends
    // `timezone` and `datestyle`), and the fallback application name `psql`.
    let sql = "select current_setting('application_name') || '|' || current_setting('statement_timeout') \
               || '|' || current_setting('search_path')";
    let base_info = conninfo(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp");
    let info = format!(
        r"{base_info} application_name=psql-params options='-c statement_timeout=1234 -c search_path=a\\,\\ b'"
    );
    let out = psql(&info, sql).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "psql-params|1234ms|a, b");
    let sql = format!(
        "{sql} || '|' || current_setting('TimeZone') || '|' || current_setting('DateStyle')"
    );
    let mut cmd = psql_command(&base_info, &sql);
    cmd.env(
        "PGOPTIONS",
        r"-c statement_timeout=4321 -c search_path=c\,\ d",
    )
    .env("PGTZ", "Asia/Tokyo")
    .env("PGDATESTYLE", "SQL, DMY");
    let out = cmd.output().await.expect("run psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "psql|4321ms|c, d|Asia/Tokyo|SQL, DMY"
    );
    let mut cmd = psql_command(&base_info, "select 1");
    cmd.env("PGOPTIONS", "-c post_auth_delay=2");
    let out = cmd.output().await.expect("run psql");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "psql with post_auth_delay must fail");
    assert!(
        stderr.contains("\"post_auth_delay\"") && stderr.contains("not allowed"),
        "{stderr}"
    );
    f.wait_all_revoked(Duration::from_secs(15)).await;
    assert_no_backend(&f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_sends_allowed_parameters_and_hears_refusals() {
    require_psycopg();
    let f = Fixture::start("sec-params-psycopg").await;
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(repo().join("tests/clients/python/psycopg_params.py"))
        .env("PYTHONUNBUFFERED", "1");
    for (k, v) in client_env(f.proxy.port, &f.pki, &f.good, "readonly", "myapp") {
        cmd.env(k, v);
    }
    let run = run_script(cmd, "psycopg_params.py", Duration::from_secs(120)).await;
    eprintln!(
        "psycopg_params.py: {}\n{}",
        run.stdout.trim(),
        run.stderr.trim()
    );
    run.assert_ok();
    f.wait_all_revoked(Duration::from_secs(15)).await;
    assert_no_backend(&f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pg_sends_allowed_parameters_and_hears_refusals() {
    require_node_pg();
    let f = Fixture::start("sec-params-node").await;
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(repo().join("tests/clients/node/pg_params.mjs"));
    for (k, v) in client_env(f.proxy.port, &f.pki, &f.good, "readonly", "myapp") {
        cmd.env(k, v);
    }
    let run = run_script(cmd, "pg_params.mjs", Duration::from_secs(120)).await;
    eprintln!(
        "pg_params.mjs: {}\n{}",
        run.stdout.trim(),
        run.stderr.trim()
    );
    run.assert_ok();
    f.wait_all_revoked(Duration::from_secs(15)).await;
    assert_no_backend(&f);
}
