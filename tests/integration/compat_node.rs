//! node-postgres (`pg`, pure JavaScript, no libpq) through leasegate: TLS with the CA, a client
//! certificate and host-name verification (`servername`), simple and parameterised queries,
//! a named prepared statement, a transaction with an error and rollback, LISTEN/NOTIFY between
//! two clients, and a syntax error (42601) after which the session is still usable. The script
//! is `tests/clients/node/pg_compat.mjs`.

use std::time::Duration;

use crate::harness::compat::{
    CompatRow, assert_dynamic_role, client_fixture, require_node_pg, run_client,
};

/// Check name in the script's JSON → feature named in the compatibility table.
const FEATURES: &[(&str, &str)] = &[
    (
        "verify_full_tls",
        "TLS with CA + servername check (wrong name refused)",
    ),
    (
        "simple_query",
        "simple query (multi-statement, 3 MiB value)",
    ),
    (
        "parameterised_query",
        "parameterised queries, named prepared statement",
    ),
    (
        "transaction",
        "transaction: commit, rollback, 23505 → 25P02 → rollback",
    ),
    (
        "listen_notify",
        "LISTEN/NOTIFY (own notification: processId = processID)",
    ),
    (
        "error_then_usable",
        "syntax error 42601, then session usable",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pg_queries_transaction_notify_and_errors() {
    let mut row = CompatRow::new("node-pg", 50, "node-postgres `pg` (pure JS)", "?");
    row.phase("node or pg not installed");
    require_node_pg();
    let f = client_fixture("compat-node").await;
    row.phase("tests/clients/node/pg_compat.mjs");
    let run = run_client(
        &f,
        "node",
        "tests/clients/node/pg_compat.mjs",
        Duration::from_secs(120),
    )
    .await;
    let r = &run.result;
    row.set_version(&format!(
        "pg {} (pg-protocol {}), Node.js {}",
        r["pg"].as_str().unwrap_or("?"),
        r["pg_protocol"].as_str().unwrap_or("?"),
        r["node"].as_str().unwrap_or("?"),
    ));
    let checks = run.report(&mut row, FEATURES);
    assert_eq!(checks["error_then_usable"]["sqlstate"], "42601");
    assert_dynamic_role(checks, "verify_full_tls", &f);
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
