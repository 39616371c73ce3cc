//! psycopg2 (Debian `python3-psycopg2`, on the system libpq; run with Debian's
//! `/usr/bin/python3`) through leasegate with `sslmode=verify-full` and a client certificate (a
//! wrong host name refused): a query, client-side interpolated parameters and SQL
//! PREPARE/EXECUTE, SQLSTATEs 23505/22012 (`pgcode`) with the session usable after, COPY in and
//! out (`copy_expert`), `conn.cancel()` (libpq's PQcancel: a plaintext CancelRequest) → 57014,
//! LISTEN/NOTIFY with the own pid = `conn.info.backend_pid`, and a dynamic role. The script is
//! `tests/clients/python/psycopg2_compat.py`.

use std::time::Duration;

use crate::harness::compat::{
    CompatRow, assert_cancels_forwarded_and_clean_end, assert_dynamic_role, client_available,
    client_fixture, run_client,
};

/// Debian's Python, the one `python3-psycopg2` installs into.
const PYTHON: &str = "/usr/bin/python3";

/// Check name in the script's JSON → feature named in the compatibility table.
const FEATURES: &[(&str, &str)] = &[
    ("verify_full_tls", "verify-full (wrong host name refused)"),
    (
        "queries",
        "parameterised queries (%s, %(name)s), PREPARE/EXECUTE; pgcode 23505/22012, usable after",
    ),
    (
        "copy",
        "copy_expert COPY FROM STDIN (20000 rows) and TO STDOUT",
    ),
    ("cancel", "conn.cancel() (PQcancel) of pg_sleep → 57014"),
    (
        "large_object",
        "lobject write/read 1 MiB, unlink (libpq lo_*: FunctionCall messages)",
    ),
    (
        "listen_notify",
        "LISTEN/NOTIFY: own pid = conn.info.backend_pid",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg2_query_copy_cancel_and_errors() {
    let probe = std::process::Command::new(PYTHON)
        .args(["-c", "import psycopg2"])
        .stdin(std::process::Stdio::null())
        .output();
    if !client_available(
        "psycopg2 for /usr/bin/python3",
        probe,
        "apt-get install --no-install-recommends python3-psycopg2",
    ) {
        return;
    }
    let mut row = CompatRow::new("psycopg2", 41, "psycopg2 (Python, libpq)", "?");
    let f = client_fixture("compat-psycopg2").await;
    row.phase("tests/clients/python/psycopg2_compat.py");
    let run = run_client(
        &f,
        PYTHON,
        "tests/clients/python/psycopg2_compat.py",
        Duration::from_secs(120),
    )
    .await;
    let r = &run.result;
    let libpq = r["libpq"].as_u64().unwrap_or(0);
    row.set_version(&format!(
        "psycopg2 {}, libpq {}.{}, Python {}",
        r["psycopg2"].as_str().unwrap_or("?"),
        libpq / 10000,
        libpq % 10000,
        r["python"].as_str().unwrap_or("?"),
    ));
    let checks = run.report(&mut row, FEATURES);
    assert_eq!(checks["cancel"]["sqlstate"], "57014");
    assert_eq!(checks["queries"]["sqlstates"]["unique_violation"], "23505");
    assert_dynamic_role(checks, "verify_full_tls", &f);
    assert_cancels_forwarded_and_clean_end(&f, 1.0).await;
}
