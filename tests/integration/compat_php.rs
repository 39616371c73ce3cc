//! PHP's `pgsql` extension and PDO_pgsql (Debian `php-cli php-pgsql`, both on the system
//! libpq) through leasegate with `sslmode=verify-full` and a client certificate (a CA that did
//! not sign leasegate's certificate is refused), `pg_connection_reset` (a new login),
//! `pg_query` (multi-statement), `pg_query_params`, `pg_prepare`/`pg_execute` (a server-side
//! statement), a transaction with an error inside a savepoint rolled back to, SQLSTATEs from
//! `pg_result_error_field` (23505, 22012 simple and extended, 42601), `pg_copy_from` and
//! `pg_copy_to`, `pg_cancel_query` of a `pg_sleep` (libpq's PQrequestCancel),
//! `application_name` and `options=-c …`, LISTEN/`pg_get_notify`; and PDO with
//! `ERRMODE_EXCEPTION`: native prepares (server-side statements through the proxy) and
//! emulated ones, `PDOException::getCode()` 23505 and 22012, a transaction rolled back and one
//! committed, COPY and LISTEN through PDO's pgsql methods. No password anywhere on the
//! client. The script is `tests/clients/php/pg_compat.php`.

use std::process::Stdio;
use std::time::Duration;

use crate::harness::compat::{CompatRow, assert_dynamic_role, client_fixture, run_client};

/// Check name in the script's JSON → feature named in the compatibility table.
const FEATURES: &[(&str, &str)] = &[
    (
        "verify_full_tls",
        "pg_connect verify-full (untrusted CA refused), no password; pg_connection_reset → new role",
    ),
    (
        "queries",
        "pg_query (multi-statement), pg_query_params, pg_prepare/pg_execute",
    ),
    (
        "transactions",
        "transaction, 23505 in a savepoint → rollback to savepoint",
    ),
    (
        "errors",
        "pg_result_error_field SQLSTATEs 23505/22012/42601, session usable after",
    ),
    ("copy", "pg_copy_from/pg_copy_to, failed COPY recovered"),
    (
        "cancel",
        "pg_cancel_query (libpq PQrequestCancel) of pg_sleep",
    ),
    (
        "startup_settings_and_notify",
        "application_name, options=-c search_path=…; LISTEN/pg_get_notify, own pid = pg_get_pid()",
    ),
    (
        "pdo",
        "PDO verify-full: native (server-side) and emulated prepares, getCode() 23505/22012, rollBack/commit",
    ),
    (
        "pdo_copy_and_notify",
        "PDO pgsqlCopyFromArray/pgsqlCopyToArray, LISTEN/pgsqlGetNotify",
    ),
];

/// Panics unless the PHP CLI has the pgsql and pdo_pgsql extensions, naming the packages.
fn require_php_pgsql() {
    let out = std::process::Command::new("php")
        .args([
            "-r",
            "exit(function_exists('pg_connect') && extension_loaded('pdo_pgsql') ? 0 : 1);",
        ])
        .stdin(Stdio::null())
        .output();
    assert!(
        out.as_ref().is_ok_and(|o| o.status.success()),
        "PHP with pgsql and PDO_pgsql is needed: apt-get install php-cli php-pgsql ({out:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_pgsql_and_pdo_queries_copy_cancel_notify_and_errors() {
    let mut row = CompatRow::new("php", 56, "PHP pgsql + PDO_pgsql (libpq)", "?");
    row.phase("php-cli or php-pgsql not installed");
    require_php_pgsql();
    let f = client_fixture("compat-php").await;
    row.phase("tests/clients/php/pg_compat.php");
    let run = run_client(
        &f,
        "php",
        "tests/clients/php/pg_compat.php",
        Duration::from_secs(120),
    )
    .await;
    let r = &run.result;
    row.set_version(&format!(
        "PHP {}, libpq {}",
        r["php"].as_str().unwrap_or("?"),
        r["checks"]["verify_full_tls"]["libpq"]
            .as_str()
            .unwrap_or("?"),
    ));
    let checks = run.report(&mut row, FEATURES);
    assert_eq!(checks["errors"]["unique_violation"], "23505");
    assert_eq!(checks["errors"]["division_by_zero"], "22012");
    assert_eq!(checks["pdo"]["native_code"], "23505");
    assert!(
        checks["pdo"]["native_server_statements"]
            .as_i64()
            .is_some_and(|n| n >= 1),
        "PDO native prepares made a server-side statement: {:#}",
        checks["pdo"]
    );
    for name in ["verify_full_tls", "pdo"] {
        assert_dynamic_role(checks, name, &f);
    }
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
