//! Postgres.js (npm `postgres`, porsager: pure JavaScript, no libpq) through leasegate with the
//! CA, the client certificate and the host name in its `ssl` object (an untrusted CA and a wrong
//! name refused): multi-statement simple queries, tagged-template parameters of many types
//! (named prepared statements, its default, and `prepare: false`), 50 pipelined queries, a
//! cursor, `sql.begin` transactions with a savepoint, error codes 23505/22012/42601, COPY
//! through `.writable()`/`.readable()` (a failed COPY recovered), `.cancel()` of a pending
//! query (a CancelRequest inside TLS on a new connection) → 57014, and `sql.listen`/`notify`.
//! The script is `tests/clients/node/postgres_compat.mjs`.

use std::time::Duration;

use crate::harness::compat::{
    CompatRow, assert_cancels_forwarded_and_clean_end, assert_dynamic_role, client_available,
    client_fixture, repo, run_client,
};

/// Check name in the script's JSON → feature named in the compatibility table.
const FEATURES: &[(&str, &str)] = &[
    (
        "verify_full_tls",
        "ssl: {ca, cert, key, servername} (untrusted CA and wrong name refused)",
    ),
    (
        "queries",
        "sql.unsafe().simple() multi-statement; tagged-template parameters (int, text, bytea, timestamptz, jsonb, int[], bool, NULL, bigint, 3 MiB value), sql() insert helper; 50 pipelined queries; cursor (PortalSuspended)",
    ),
    (
        "prepared_statements",
        "named prepared statements (default, reused ×10) and prepare: false",
    ),
    (
        "transactions_and_errors",
        "sql.begin, savepoint rolled back on 23505, rollback on throw; error .code 23505/22012/42601, session usable after",
    ),
    (
        "copy",
        "COPY FROM STDIN via .writable() (20000 rows), COPY TO STDOUT via .readable()",
    ),
    (
        "cancel",
        ".cancel() of a pending pg_sleep (CancelRequest inside TLS) → 57014, session usable",
    ),
    ("listen_notify", "sql.listen / sql.notify and pg_notify"),
    (
        "direct_tls",
        "sslnegotiation: 'direct' (TLS at once, ALPN postgresql), its cancel too → 57014",
    ),
];

/// Whether `node` runs and `tests/clients/node/node_modules/postgres` is installed.
fn postgres_js_available() -> bool {
    let package = repo().join("tests/clients/node/node_modules/postgres/package.json");
    let probe = std::process::Command::new("node")
        .args(["-e", "require(process.argv[1])"])
        .arg(&package)
        .stdin(std::process::Stdio::null())
        .output();
    client_available(
        "Node.js with the `postgres` package",
        probe,
        "npm ci --prefix tests/clients/node (Node.js ≥ 18)",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_js_queries_transactions_copy_cancel_and_listen() {
    if !postgres_js_available() {
        return;
    }
    let mut row = CompatRow::new("postgres-js", 51, "Postgres.js `postgres` (pure JS)", "?");
    let f = client_fixture("compat-postgres-js").await;
    row.phase("tests/clients/node/postgres_compat.mjs");
    let run = run_client(
        &f,
        "node",
        "tests/clients/node/postgres_compat.mjs",
        Duration::from_secs(180),
    )
    .await;
    let r = &run.result;
    row.set_version(&format!(
        "postgres {}, Node.js {}",
        r["postgres"].as_str().unwrap_or("?"),
        r["node"].as_str().unwrap_or("?"),
    ));
    let checks = run.report(&mut row, FEATURES);
    assert_eq!(checks["cancel"]["sqlstate"], "57014");
    let codes = &checks["transactions_and_errors"]["sqlstates"];
    assert_eq!(codes["unique_violation"], "23505");
    assert_eq!(codes["division_by_zero"], "22012");
    assert_dynamic_role(checks, "verify_full_tls", &f);
    // Both cancels came in as CancelRequests (inside TLS).
    assert_cancels_forwarded_and_clean_end(&f, 2.0).await;
}
