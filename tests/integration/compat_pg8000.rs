//! pg8000 (pure Python: it builds every protocol message itself, no libpq) through leasegate
//! with an `ssl.SSLContext` holding the CA and the client certificate (host name checked: an
//! untrusted CA refused): simple queries, the extended protocol with its native `:name`
//! parameters (text-encoded values of many types, typed parameters, a 3 MiB value), DB-API
//! `%s` parameters and `executemany`, named prepared statements, SQLSTATEs 23505/22012/42601
//! with the session usable after, a transaction with a savepoint, COPY in and out through
//! `stream=` (a failed COPY recovered), LISTEN/NOTIFY (own notification with the key's pid,
//! another session's with its backend's) and startup parameters. pg8000 frames the extended
//! protocol its own way (Parse+Sync, Describe+Sync, Bind+Flush before reading the second
//! ReadyForQuery, Execute+Flush+Sync). The script is `tests/clients/python/pg8000_compat.py`.

use std::time::Duration;

use crate::harness::compat::{
    CompatRow, assert_dynamic_role, client_fixture, python_module, run_client, upstream_closes,
};

/// Check name in the script's JSON → feature named in the compatibility table.
const FEATURES: &[(&str, &str)] = &[
    (
        "verify_full_tls",
        "ssl_context: CA + host name + client certificate, TLS 1.3 and 1.2 (untrusted CA refused)",
    ),
    (
        "queries",
        "simple query (multi-statement); extended protocol with :name parameters (int, text, bytea, numeric, timestamptz, uuid, int[], jsonb, bool, NULL, 3 MiB value, typed OIDs); DB-API %s paramstyle, executemany",
    ),
    (
        "prepared_statements",
        "prepare/run (named statement ×10), close; failed prepare 42601, session usable",
    ),
    (
        "errors_and_transactions",
        "DatabaseError SQLSTATEs 23505/22012 (simple and extended), transaction, savepoint + rollback to savepoint, DB-API rollback",
    ),
    (
        "copy",
        "COPY FROM STDIN (stream=, text file and iterable, 20000 rows), COPY TO STDOUT (text, csv, binary), failed COPY 22P02 recovered",
    ),
    (
        "listen_notify",
        "LISTEN/NOTIFY: own notification's pid = BackendKeyData pid, another session's = its backend",
    ),
    (
        "notify_burst",
        "20000 own notifications at one commit, every one with the BackendKeyData pid",
    ),
    (
        "startup_settings",
        "application_name (non-ASCII too), startup_params (search_path, a quoted name with space and comma; TimeZone), ParameterStatus after SET",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg8000_queries_prepared_copy_errors_and_notify() {
    let Some(version) = python_module(
        "pg8000",
        "pip install -r tests/clients/python/requirements.txt",
    ) else {
        return;
    };
    let mut row = CompatRow::new("pg8000", 43, "pg8000 (Python, pure protocol)", &version);
    let f = client_fixture("compat-pg8000").await;
    row.phase("tests/clients/python/pg8000_compat.py");
    let run = run_client(
        &f,
        "python3",
        "tests/clients/python/pg8000_compat.py",
        Duration::from_secs(180),
    )
    .await;
    let r = &run.result;
    row.set_version(&format!(
        "pg8000 {}, Python {}",
        r["pg8000"].as_str().unwrap_or("?"),
        r["python"].as_str().unwrap_or("?"),
    ));
    let checks = run.report(&mut row, FEATURES);
    let codes = &checks["errors_and_transactions"]["sqlstates"];
    assert_eq!(codes["unique_violation"], "23505");
    assert_eq!(codes["division_by_zero_extended"], "22012");
    let notify = &checks["listen_notify"];
    assert_eq!(notify["own_pid"], notify["key_pid"]);
    assert_dynamic_role(checks, "verify_full_tls", &f);
    f.wait_all_revoked(Duration::from_secs(15)).await;
    // pg8000 closed every connection at ReadyForQuery: leasegate saw each upstream idle, so
    // none was cancelled on the way out (its COPY sends a Sync in copy-in mode, which the
    // server ignores: one ReadyForQuery fewer than the Syncs).
    let (busy, idle) = upstream_closes(&f).await;
    assert_eq!(busy, 0.0, "upstream closes while busy ({idle} idle)");
    assert!(idle >= 10.0, "{idle} idle upstream closes");
}
