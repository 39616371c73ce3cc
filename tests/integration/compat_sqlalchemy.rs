//! SQLAlchemy 2 with a pooled engine on psycopg 3 through leasegate (TLS verify-full with a
//! client certificate): a transaction, `pool_recycle`, and pooled connections leasegate ends
//! at the database's `max_session_duration` (FATAL 57P01 while idle in the pool): with
//! `pool_pre_ping` the next checkout replaces it unseen; without, the first use fails with
//! 57P01 and the next checkout works. The script is `tests/clients/python/sqlalchemy_pool.py`.

use std::time::Duration;

use crate::harness::compat::{CompatRow, client_env, repo, run_script};
use crate::harness::fixture::Fixture;
use crate::harness::proxy::set;

/// Check name in the script's JSON → feature named in the compatibility table.
const FEATURES: &[(&str, &str)] = &[
    ("transaction", "engine.begin(), commit, rollback"),
    ("pool_recycle", "pool_recycle replaces an old connection"),
    (
        "max_lifetime_pre_ping",
        "pool_pre_ping replaces a connection leasegate ended (57P01)",
    ),
    (
        "max_lifetime_no_pre_ping",
        "without pre-ping: 57P01 on first use, next checkout works",
    ),
];

/// Panics unless python3 can import SQLAlchemy 2 and psycopg, naming the install command.
fn require_sqlalchemy() {
    let ok = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlalchemy, psycopg; assert sqlalchemy.__version__ >= '2'",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "SQLAlchemy 2 and psycopg 3 are needed: pip install -r tests/clients/python/requirements.txt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlalchemy_pool_survives_leasegate_ending_pooled_connections() {
    let mut row = CompatRow::new("sqlalchemy", 42, "SQLAlchemy 2 (psycopg 3 pool)", "?");
    row.phase("SQLAlchemy not installed");
    require_sqlalchemy();
    let f = Fixture::start_edited(
        "compat-sqlalchemy",
        |cfg| cfg,
        |t| {
            set(t, "databases.0.max_session_duration", "4s");
            set(t, "databases.0.expiry_warning", "1s");
        },
    )
    .await;
    row.phase("tests/clients/python/sqlalchemy_pool.py");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(repo().join("tests/clients/python/sqlalchemy_pool.py"))
        .env("PYTHONUNBUFFERED", "1")
        .env(
            "LG_METRICS_URL",
            format!("http://127.0.0.1:{}/metrics", f.proxy.metrics_port),
        );
    for (k, v) in client_env(f.proxy.port, &f.pki, &f.good, "readonly", "myapp") {
        cmd.env(k, v);
    }
    let run = run_script(cmd, "sqlalchemy_pool.py", Duration::from_secs(120)).await;
    let r = &run.result;
    row.set_version(&format!(
        "SQLAlchemy {}, psycopg {}, Python {}",
        r["sqlalchemy"].as_str().unwrap_or("?"),
        r["psycopg"].as_str().unwrap_or("?"),
        r["python"].as_str().unwrap_or("?")
    ));
    run.report(&mut row, FEATURES);
    let no_ping = &r["checks"]["max_lifetime_no_pre_ping"];
    let message = no_ping["first_use_message"].as_str().unwrap_or("");
    assert!(message.contains("max_session_duration"), "{no_ping}");
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
