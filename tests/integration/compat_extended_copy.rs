//! COPY FROM STDIN over the extended protocol (libpq through Ruby pg's `exec_params`: the
//! client sends Sync after Execute, which the server ignores in copy-in mode, and another
//! after CopyDone), through leasegate: rows in, a failed COPY (22P02) recovered, COPY TO STDOUT,
//! and every session closed at ReadyForQuery is seen idle by leasegate (no cancel on the way
//! out, `leasegate_upstream_closes_total{how="idle"}`). pg8000's COPY (compat_pg8000) frames it
//! the same way. The script is `tests/clients/ruby/pg_copy_extended.rb`. The same framing from
//! a raw client leaves the session `idle` in `sessions list`.

use std::time::Duration;

use crate::harness::compat::{
    CompatRow, assert_dynamic_role, client_available, client_fixture, run_client, upstream_closes,
};
use crate::harness::fixture::Fixture;
use crate::harness::ops::{config_path, output_text};
use crate::harness::proxy::{BIN, set};
use crate::harness::root;
use crate::harness::security::counter;
use crate::harness::wire::{Msg, Tls, Wire};

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
    let (busy, idle) = upstream_closes(&f).await;
    assert_eq!(
        (busy, idle),
        (0.0, 1.0),
        "the session closed at ReadyForQuery after its COPY is closed as idle"
    );
}

/// A protocol message: type byte, length, body.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Reads messages until one of type `tag`, panicking on an ErrorResponse.
async fn recv_until(wire: &mut Wire<Tls>, tag: u8) -> Vec<Msg> {
    let mut seen = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(15), wire.recv())
            .await
            .unwrap_or_else(|_| panic!("no {:?} within 15 s: {seen:?}", tag as char))
            .expect("read");
        assert_ne!(m.tag, b'E', "error: {m:?}");
        let done = m.tag == tag;
        seen.push(m);
        if done {
            return seen;
        }
    }
}

/// `leasegate sessions list --json` through the admin socket of the config at `config`.
async fn sessions_list(config: &std::path::Path) -> Vec<serde_json::Value> {
    let out = tokio::process::Command::new(BIN)
        .args(["sessions", "list", "--json", "--config"])
        .arg(config)
        .output()
        .await
        .expect("run leasegate sessions list");
    assert!(out.status.success(), "{}", output_text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_extended_protocol_copy_sessions_list_shows_the_session_idle() {
    let dir = root().tempdir("admin-copy-");
    let socket = dir.path().join("admin.sock");
    let f = Fixture::start_edited(
        "copy-extended-list",
        |cfg| cfg,
        |t| set(t, "admin.socket", socket.display().to_string()),
    )
    .await;
    let mut wire = f.raw_session("readonly").await;
    wire.simple_query("create temp table cp (a int)")
        .await
        .expect("create");
    // libpq's PQexecParams framing: Parse, Bind, Describe, Execute, Sync (which the server
    // ignores in copy-in mode), the rows, CopyDone, Sync.
    let mut start = message(b'P', b"\0copy cp from stdin\0\0\0");
    start.extend(message(b'B', b"\0\0\0\0\0\0\0\0"));
    start.extend(message(b'D', b"P\0"));
    start.extend(message(b'E', b"\0\0\0\0\0"));
    start.extend(message(b'S', b""));
    wire.send(&start).await.expect("send");
    recv_until(&mut wire, b'G').await;
    let mut rows = message(b'd', b"1\n2\n3\n");
    rows.extend(message(b'c', b""));
    rows.extend(message(b'S', b""));
    wire.send(&rows).await.expect("send");
    let answer = recv_until(&mut wire, b'Z').await;
    assert!(
        answer.iter().any(|m| m.tag == b'C'),
        "CommandComplete: {answer:?}"
    );
    let count = wire.query_column("select count(*) from cp").await;
    assert_eq!(count, [Some("3".to_string())]);
    let listed = sessions_list(&config_path(&f.proxy)).await;
    let session = listed
        .iter()
        .find(|r| r["kind"] == "session")
        .unwrap_or_else(|| panic!("the session is listed: {listed:?}"));
    assert_eq!(session["state"], "idle", "{session}");
    wire.terminate().await;
    f.wait_all_revoked(Duration::from_secs(15)).await;
    let busy = counter(
        &f.proxy,
        "leasegate_upstream_closes_total",
        &[("how", "busy")],
    )
    .await;
    assert_eq!(busy, 0.0, "closed at ReadyForQuery: idle");
}
