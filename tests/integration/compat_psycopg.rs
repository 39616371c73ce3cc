//! psycopg 3 (Python, libpq-based) through leasegate with `sslmode=verify-full` and a client
//! certificate: transactions (commit, rollback, savepoints, errors), prepared statements,
//! a server-side (named) cursor read with fetchmany, COPY in (write_row and raw) and out,
//! cancel from another thread with both `conn.cancel()` (plaintext CancelRequest) and
//! `conn.cancel_safe()` (libpq ≥ 17: CancelRequest inside TLS), and `sslnegotiation=direct`
//! when the bundled libpq is ≥ 17, and protocol 3.2 requested by libpq ≥ 18 (leasegate
//! negotiates it down to 3.0). The script is `tests/clients/python/psycopg_compat.py`.

use std::time::Duration;

use crate::harness::compat::{CompatRow, client_fixture, require_psycopg, run_client};

/// Check name in the script's JSON → feature named in the compatibility table.
const FEATURES: &[(&str, &str)] = &[
    ("verify_full_tls", "verify-full (wrong host name refused)"),
    (
        "transactions",
        "transactions: commit, rollback, savepoint, error recovery",
    ),
    ("prepared_statements", "prepared statements, executemany"),
    ("server_side_cursor", "server-side cursor (fetchmany)"),
    ("copy", "COPY FROM (write_row, raw) and COPY TO"),
    (
        "cancel_from_thread",
        "cancel() from another thread → QueryCanceled",
    ),
    ("cancel_safe", "cancel_safe() (libpq 17+ cancel inside TLS)"),
    (
        "listen_notify",
        "LISTEN/NOTIFY: own Notify.pid = info.backend_pid, others' their backend's",
    ),
    ("direct_tls", "sslnegotiation=direct (ALPN postgresql)"),
    (
        "protocol_3_2_request",
        "max_protocol_version=3.2 → negotiated to 3.0",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_transactions_cursor_copy_cancel_and_direct_tls() {
    let mut row = CompatRow::new("psycopg", 40, "psycopg 3 (Python, libpq)", "?");
    row.phase("psycopg not installed");
    require_psycopg();
    let f = client_fixture("compat-psycopg").await;
    row.phase("tests/clients/python/psycopg_compat.py");
    let run = run_client(
        &f,
        "python3",
        "tests/clients/python/psycopg_compat.py",
        Duration::from_secs(180),
    )
    .await;
    let r = &run.result;
    let libpq = r["libpq"].as_u64().unwrap_or(0);
    row.set_version(&format!(
        "psycopg {} ({}), libpq {}.{}, Python {}",
        r["psycopg"].as_str().unwrap_or("?"),
        r["impl"].as_str().unwrap_or("?"),
        libpq / 10000,
        libpq % 10000,
        r["python"].as_str().unwrap_or("?"),
    ));
    let checks = run.report(&mut row, FEATURES);
    for name in ["cancel_from_thread", "cancel_safe"] {
        assert_eq!(
            checks[name]["sqlstate"], "57014",
            "{name}: {:#}",
            checks[name]
        );
    }
    assert!(
        checks["verify_full_tls"]["session_user"]
            .as_str()
            .is_some_and(|u| u.starts_with(&f.mount.prefix)),
        "the session ran as a dynamic role of this mount"
    );
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
