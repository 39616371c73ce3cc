//! COPY FROM STDIN over the extended protocol (libpq through Ruby pg's `exec_params`: the
//! client sends Sync after Execute, which the server ignores in copy-in mode, and another
//! after CopyDone), through leasegate: rows in, a failed COPY (22P02) recovered, COPY TO STDOUT,
//! and every session closed at ReadyForQuery is seen idle by leasegate (no cancel on the way
//! out, `leasegate_upstream_closes_total{how="idle"}`). pg8000's COPY (compat_pg8000) frames it
//! the same way. The script is `tests/clients/ruby/pg_copy_extended.rb`.

use std::time::Duration;

use crate::harness::compat::{
    CompatRow, assert_dynamic_role, client_available, client_fixture, run_client,
};
use crate::harness::security::counter;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_copy_in_leaves_the_session_idle() {
    let probe = std::process::Command::new("ruby")
        .args(["-e", "require 'pg'"])
        .stdin(std::process::Stdio::null())
        .output();
    if !client_available(
        "Ruby pg",
        probe,
        "apt-get install --no-install-recommends ruby-pg",
    ) {
        return;
    }
    let mut row = CompatRow::new("ruby-pg-copy-extended", 55, "Ruby `pg` (libpq)", "");
    let f = client_fixture("compat-extended-copy").await;
    row.phase("tests/clients/ruby/pg_copy_extended.rb");
    let run = run_client(
        &f,
        "ruby",
        "tests/clients/ruby/pg_copy_extended.rb",
        Duration::from_secs(60),
    )
    .await;
    let checks = run.report(
        &mut row,
        &[(
            "copy_extended",
            "exec_params COPY FROM STDIN / TO STDOUT (extended protocol), failed COPY 22P02 recovered, session ends idle",
        )],
    );
    assert_eq!(checks["copy_extended"]["failed_copy"], "22P02");
    assert_dynamic_role(checks, "copy_extended", &f);
    f.wait_all_revoked(Duration::from_secs(15)).await;
    let busy = counter(
        &f.proxy,
        "leasegate_upstream_closes_total",
        &[("how", "busy")],
    )
    .await;
    let idle = counter(
        &f.proxy,
        "leasegate_upstream_closes_total",
        &[("how", "idle")],
    )
    .await;
    assert_eq!(
        (busy, idle),
        (0.0, 1.0),
        "the session closed at ReadyForQuery after its COPY is closed as idle"
    );
}
