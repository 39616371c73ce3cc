//! Real clients on warm sessions (`warm = { readwrite = 4 }`): pg8000 (pure Python), Postgres.js
//! (pure JS) and psycopg2 (libpq) run their whole compatibility scripts with most sessions
//! handed out warm (`leasegate_warm_sessions_total{result="hit"}`): the ParameterStatus of the
//! warm login is enough for their type handling, cancels reach the warm backend, and their own
//! notifications carry the pid of leasegate's BackendKeyData. Every lease is revoked after.

use std::time::Duration;

use crate::harness::compat::{client_available, python_module, repo, run_client};
use crate::harness::fixture::Fixture;
use crate::harness::fixture::GOOD_URI;
use crate::harness::metrics::value_or_zero;
use crate::harness::proxy::set;

/// A fixture whose test client may use `readwrite` on myapp, which keeps 4 warm sessions.
async fn warm_fixture(name: &str) -> Fixture {
    Fixture::start_edited(
        name,
        |mut cfg| {
            cfg.databases[0].connect_timeout = Some("30s".into());
            cfg.grant(&format!("uri:{GOOD_URI}"), &["myapp"], &["readwrite"])
        },
        |t| {
            let mut warm = toml::Table::new();
            warm.insert("readwrite".into(), 4.into());
            set(t, "databases.0.warm", warm);
            set(t, "limits.burst_per_identity", 1_000);
        },
    )
    .await
}

async fn warm_hits(f: &Fixture) -> f64 {
    let m = f.proxy.metrics().await;
    value_or_zero(&m, "leasegate_warm_sessions_total", &[("result", "hit")])
}

/// Runs `script` with `program` on `f` and asserts it passed with at least one warm hit.
async fn run_warm(f: &Fixture, program: &str, script: &str) {
    let before = warm_hits(f).await;
    let run = run_client(f, program, script, Duration::from_secs(180)).await;
    eprintln!(
        "{script} on warm sessions: {}\n{}",
        run.stdout.trim(),
        run.stderr.trim()
    );
    run.assert_ok();
    assert!(
        run.failed_checks().is_empty(),
        "{script}: {:?}",
        run.failed_checks()
    );
    let hits = warm_hits(f).await - before;
    assert!(hits >= 1.0, "{script}: {hits} warm hits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg8000_postgres_js_and_psycopg2_on_warm_sessions() {
    let mut f = warm_fixture("compat-warm-clients").await;
    if python_module(
        "pg8000",
        "pip install -r tests/clients/python/requirements.txt",
    )
    .is_some()
    {
        run_warm(&f, "python3", "tests/clients/python/pg8000_compat.py").await;
    }
    let node = std::process::Command::new("node")
        .args(["-e", "require(process.argv[1])"])
        .arg(repo().join("tests/clients/node/node_modules/postgres/package.json"))
        .stdin(std::process::Stdio::null())
        .output();
    if client_available(
        "Node.js with `postgres`",
        node,
        "npm ci --prefix tests/clients/node",
    ) {
        run_warm(&f, "node", "tests/clients/node/postgres_compat.mjs").await;
    }
    let psycopg2 = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import psycopg2"])
        .stdin(std::process::Stdio::null())
        .output();
    if client_available("psycopg2", psycopg2, "apt-get install python3-psycopg2") {
        run_warm(
            &f,
            "/usr/bin/python3",
            "tests/clients/python/psycopg2_compat.py",
        )
        .await;
    }
    // Waiting warm sessions hold leases until leasegate stops: then every one is revoked.
    let status = f.proxy.terminate(Duration::from_secs(60));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "leasegate exits 0");
    f.wait_all_revoked(Duration::from_secs(30)).await;
}
