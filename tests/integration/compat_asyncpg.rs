//! asyncpg (Python, its own protocol implementation: no libpq, binary formats, the extended
//! protocol for everything) through leasegate with certificate verification and a client
//! certificate: transactions and savepoints, SQLSTATEs of errors, prepared statements and
//! executemany, a cursor, COPY in and out, a query timeout (asyncpg cancels with a
//! CancelRequest on a new TLS connection), startup settings, LISTEN/NOTIFY and a pool that
//! resets the connections it gets back. The script is
//! `tests/clients/python/asyncpg_compat.py`.

use std::time::Duration;

use crate::harness::compat::{CompatRow, assert_dynamic_role, client_fixture, run_client};

/// Check name in the script's JSON → feature named in the compatibility table.
const FEATURES: &[(&str, &str)] = &[
    ("verify_full_tls", "TLS verified (untrusted CA refused)"),
    (
        "transactions",
        "transactions, savepoint, 23505/22012 SQLSTATEs, session usable after errors",
    ),
    (
        "prepared_statements",
        "prepared statements, executemany, binary types",
    ),
    (
        "cursor_and_copy",
        "cursor (fetch, forward); COPY records in, COPY TO",
    ),
    (
        "cancel_by_timeout",
        "query timeout → CancelRequest over TLS, session usable",
    ),
    (
        "settings_and_notify",
        "server_settings (application_name, search_path); LISTEN/NOTIFY, own pid = get_server_pid()",
    ),
    (
        "pool",
        "create_pool: 16 queries on ≤ 4 connections, reset on release",
    ),
];

/// asyncpg is importable (installed by `scripts/test.sh` from the requirements file).
fn require_asyncpg() {
    let out = std::process::Command::new("python3")
        .args(["-c", "import asyncpg"])
        .stdin(std::process::Stdio::null())
        .output();
    assert!(
        out.as_ref().is_ok_and(|o| o.status.success()),
        "asyncpg is not installed for python3: `pip install -r tests/clients/python/requirements.txt` ({out:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_transactions_copy_cancel_notify_and_pool() {
    let mut row = CompatRow::new("asyncpg", 42, "asyncpg (Python, pure protocol)", "?");
    row.phase("asyncpg not installed");
    require_asyncpg();
    let f = client_fixture("compat-asyncpg").await;
    row.phase("tests/clients/python/asyncpg_compat.py");
    let run = run_client(
        &f,
        "python3",
        "tests/clients/python/asyncpg_compat.py",
        Duration::from_secs(180),
    )
    .await;
    let r = &run.result;
    row.set_version(&format!(
        "asyncpg {}, Python {}",
        r["asyncpg"].as_str().unwrap_or("?"),
        r["python"].as_str().unwrap_or("?"),
    ));
    let checks = run.report(&mut row, FEATURES);
    assert_dynamic_role(checks, "verify_full_tls", &f);
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
