//! Ruby's `pg` gem (Debian `ruby-pg`, on the system libpq) through leasegate with
//! `sslmode=verify-full` and a client certificate (a CA that did not sign leasegate's
//! certificate is refused): `exec`, `exec_params` (extended protocol, binary results),
//! `prepare`/`exec_prepared`, a transaction with a savepoint rolled back to, errors with their
//! SQLSTATEs (23505, 22012, 42601) and the session usable after, COPY FROM STDIN and TO STDOUT,
//! `Connection#cancel` (pg's own plaintext CancelRequest) and `#sync_cancel` (libpq's
//! PQcancel) of a `pg_sleep` and with nothing running, `application_name` and
//! `options=-c search_path=…`, `target_session_attrs`, the async API (`send_query` and
//! `get_result`), LISTEN/NOTIFY (`wait_for_notify`), libpq's pipeline mode and `reset` (a new
//! login); the session runs as a dynamic role and the client never sends or is asked for a
//! password. The script is `tests/clients/ruby/pg_compat.rb`.

use std::process::Stdio;
use std::time::Duration;

use crate::harness::compat::{CompatRow, assert_dynamic_role, client_fixture, run_client};

/// Check name in the script's JSON → feature named in the compatibility table.
const FEATURES: &[(&str, &str)] = &[
    (
        "verify_full_tls",
        "verify-full (untrusted CA refused), no password asked",
    ),
    (
        "queries",
        "exec (multi-statement), exec_params (text and binary results), prepare/exec_prepared",
    ),
    (
        "transactions",
        "transaction, savepoint + rollback to savepoint",
    ),
    (
        "errors",
        "23505/22012/42601 SQLSTATEs (simple and extended), session usable after",
    ),
    (
        "copy",
        "COPY FROM STDIN (copy_data), COPY TO STDOUT, failed COPY recovered",
    ),
    (
        "cancel",
        "cancel (pg's CancelRequest) and sync_cancel (libpq PQcancel) of pg_sleep → 57014",
    ),
    (
        "startup_settings",
        "application_name, options=-c search_path=… -c statement_timeout=…",
    ),
    (
        "target_session_attrs",
        "target_session_attrs=read-write, primary",
    ),
    (
        "async_and_notify",
        "send_query/get_result; LISTEN/NOTIFY (wait_for_notify), own pid = backend_pid",
    ),
    (
        "pipeline_and_reset",
        "pipeline mode (error mid-pipeline, PIPELINE_ABORTED), reset → new dynamic role",
    ),
];

/// Panics unless Ruby can load the `pg` gem, naming the Debian package.
fn require_ruby_pg() {
    let out = std::process::Command::new("ruby")
        .args(["-e", "require 'pg'"])
        .stdin(Stdio::null())
        .output();
    assert!(
        out.as_ref().is_ok_and(|o| o.status.success()),
        "Ruby with the pg gem is needed: apt-get install ruby-pg ({out:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ruby_pg_queries_copy_cancel_notify_and_errors() {
    let mut row = CompatRow::new("ruby-pg", 55, "Ruby `pg` (libpq)", "?");
    row.phase("ruby or ruby-pg not installed");
    require_ruby_pg();
    let f = client_fixture("compat-ruby").await;
    row.phase("tests/clients/ruby/pg_compat.rb");
    let run = run_client(
        &f,
        "ruby",
        "tests/clients/ruby/pg_compat.rb",
        Duration::from_secs(120),
    )
    .await;
    let r = &run.result;
    let libpq = r["libpq"].as_u64().unwrap_or(0);
    row.set_version(&format!(
        "pg {}, libpq {}.{}, Ruby {}",
        r["pg"].as_str().unwrap_or("?"),
        libpq / 10000,
        libpq % 10000,
        r["ruby"].as_str().unwrap_or("?"),
    ));
    let checks = run.report(&mut row, FEATURES);
    assert_eq!(checks["errors"]["unique_violation"], "23505");
    assert_eq!(checks["errors"]["division_by_zero"], "22012");
    for how in ["cancel", "sync_cancel"] {
        assert_eq!(checks["cancel"][how]["sqlstate"], "57014", "{how}");
    }
    assert_dynamic_role(checks, "verify_full_tls", &f);
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
