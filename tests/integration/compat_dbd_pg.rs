//! Perl DBI with DBD::Pg (Debian `libdbd-pg-perl`, on the system libpq) through leasegate with
//! `sslmode=verify-full` and a client certificate (a wrong host name refused): a query,
//! server-side prepared statements with placeholders, SQLSTATEs 23505/22012 (`$dbh->state`), a
//! savepoint, COPY in (`pg_putcopydata`) and out (`pg_getcopydata`), `pg_cancel` of an
//! asynchronous `pg_sleep` (libpq's PQcancel: a plaintext CancelRequest) → 57014, LISTEN/NOTIFY
//! with the own pid = `$dbh->{pg_pid}`, and a dynamic role. The script is
//! `tests/clients/perl/dbd_pg_compat.pl`.

use std::time::Duration;

use crate::harness::compat::{
    CompatRow, assert_cancels_forwarded_and_clean_end, assert_dynamic_role, client_available,
    client_fixture, run_client,
};

/// Check name in the script's JSON → feature named in the compatibility table.
const FEATURES: &[(&str, &str)] = &[
    (
        "verify_full_tls",
        "dbi:Pg: DSN with sslmode=verify-full (wrong host name refused)",
    ),
    (
        "queries",
        "prepare/execute with placeholders (server-side statements); state 23505/22012, usable after; pg_savepoint/pg_rollback_to",
    ),
    (
        "copy",
        "COPY FROM STDIN (pg_putcopydata, 20000 rows), TO STDOUT (pg_getcopydata)",
    ),
    (
        "cancel",
        "pg_cancel (PQcancel) of an async pg_sleep → 57014",
    ),
    (
        "listen_notify",
        "LISTEN/NOTIFY (pg_notifies): own pid = pg_pid",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbd_pg_query_copy_cancel_and_errors() {
    let probe = std::process::Command::new("perl")
        .args(["-MDBD::Pg", "-MJSON::PP", "-e1"])
        .stdin(std::process::Stdio::null())
        .output();
    if !client_available(
        "Perl DBD::Pg",
        probe,
        "apt-get install --no-install-recommends libdbd-pg-perl",
    ) {
        return;
    }
    let mut row = CompatRow::new("dbd-pg", 57, "Perl DBD::Pg (libpq)", "?");
    let f = client_fixture("compat-dbd-pg").await;
    row.phase("tests/clients/perl/dbd_pg_compat.pl");
    let run = run_client(
        &f,
        "perl",
        "tests/clients/perl/dbd_pg_compat.pl",
        Duration::from_secs(120),
    )
    .await;
    let r = &run.result;
    row.set_version(&format!(
        "DBD::Pg {}, DBI {}, Perl {} (system libpq)",
        r["dbd_pg"].as_str().unwrap_or("?"),
        r["dbi"].as_str().unwrap_or("?"),
        r["perl"].as_str().unwrap_or("?"),
    ));
    let checks = run.report(&mut row, FEATURES);
    assert_eq!(checks["cancel"]["sqlstate"], "57014");
    assert_eq!(checks["queries"]["sqlstates"]["unique_violation"], "23505");
    let notify = &checks["listen_notify"];
    assert_eq!(notify["own_pid"], notify["key_pid"]);
    assert_dynamic_role(checks, "verify_full_tls", &f);
    assert_cancels_forwarded_and_clean_end(&f, 1.0).await;
}
