//! Go's lib/pq (the `database/sql` driver `github.com/lib/pq`: its own protocol implementation,
//! no libpq) through leasegate with the keyword string a Go user writes (`host=… sslmode=
//! verify-full sslrootcert=… sslcert=… sslkey=…`): another CA refused, a key file readable by
//! others refused by lib/pq itself, simple and parameterised queries (bytea, timestamptz, arrays,
//! a 3 MiB value), a prepared statement, `*pq.Error` codes 23505/22012/42601, a transaction
//! with a savepoint, `pq.CopyIn` (a failed COPY recovered), a context deadline (lib/pq sends a
//! CancelRequest inside TLS on a new connection) → 57014, `pq.NewListener` and a connector's
//! notification handler (own notification with the key's pid). The program is
//! `tests/clients/go-libpq/pq_compat.go`, built offline in GOPATH mode against Debian's
//! packaged sources (`golang-go`, `golang-github-lib-pq-dev`).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::compat_pgx::{GOPATH, build_go, debian_version};
use crate::harness::compat::{
    CompatRow, assert_cancels_forwarded_and_clean_end, assert_dynamic_role, client_available,
    client_env, run_script,
};
use crate::harness::fixture::Fixture;
use crate::harness::pki::Pki;
use crate::harness::root;

/// The Debian packages the program needs.
const PACKAGES: &str = "golang-go golang-github-lib-pq-dev";

/// Check name in the program's JSON → feature named in the compatibility table.
const FEATURES: &[(&str, &str)] = &[
    (
        "verify_full_tls",
        "sslmode=verify-full with sslrootcert/sslcert/sslkey (other CA refused; a 0644 key refused by lib/pq)",
    ),
    (
        "queries",
        "simple query (multi-statement); parameters: int, text, bytea, timestamptz, int8[] (pq.Array), 3 MiB value",
    ),
    ("prepared", "db.Prepare (named statement) ×10, Close"),
    (
        "errors_and_transactions",
        "*pq.Error Code 23505/22012/42601; transaction, savepoint + rollback to savepoint, rollback",
    ),
    (
        "copy_in",
        "pq.CopyIn (20000 rows), failed COPY 23502 recovered",
    ),
    (
        "context_cancel",
        "context deadline → CancelRequest (TLS, new connection) → 57014, connection usable",
    ),
    (
        "listen_notify",
        "pq.NewListener; ConnectorWithNotificationHandler: own notification's BePid = BackendKeyData pid",
    ),
    (
        "binary_parameters",
        "binary_parameters=yes: Parse/Bind/Execute/Sync in one round trip, binary bytea, error 22012",
    ),
];

/// Whether `go` runs and Debian's lib/pq sources are installed.
fn go_libpq_available() -> bool {
    let pq = Path::new(GOPATH).join("src/github.com/lib/pq/conn.go");
    let probe = std::process::Command::new("go")
        .arg("version")
        .stdin(Stdio::null())
        .output()
        .and_then(|o| {
            if pq.is_file() {
                Ok(o)
            } else {
                Err(std::io::Error::other(format!("{} missing", pq.display())))
            }
        });
    client_available(
        "Go with lib/pq",
        probe,
        &format!("apt-get install --no-install-recommends {PACKAGES}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_go_queries_copy_cancel_and_listen() {
    if !go_libpq_available() {
        return;
    }
    let mut row = CompatRow::new("lib-pq", 48, "lib/pq (Go, pure protocol)", "?");
    let build = root().tempdir("libpq-build-");
    row.phase("go build tests/clients/go-libpq");
    let program = build_go(
        "tests/clients/go-libpq",
        &build.path().join("pq_compat"),
        PACKAGES,
    )
    .await;
    let f = Fixture::start("compat-libpq-go").await;
    let other_ca = Pki::new();
    row.phase("tests/clients/go-libpq/pq_compat.go");
    let mut cmd = tokio::process::Command::new(&program);
    for (k, v) in client_env(f.proxy.port, &f.pki, &f.good, "readonly", "myapp") {
        cmd.env(k, v);
    }
    cmd.env("LG_WRONG_CA", other_ca.ca_pem());
    let run = run_script(cmd, "pq_compat.go", Duration::from_secs(120)).await;
    row.set_version(&format!(
        "lib/pq {} (Debian), Go {}",
        debian_version("golang-github-lib-pq-dev"),
        run.result["go"]
            .as_str()
            .map_or("?", |v| v.trim_start_matches("go")),
    ));
    let checks = run.report(&mut row, FEATURES);
    assert_eq!(checks["context_cancel"]["sqlstate"], "57014");
    let notify = &checks["listen_notify"];
    assert_eq!(notify["own_pid"], notify["key_pid"]);
    assert_dynamic_role(checks, "verify_full_tls", &f);
    assert_cancels_forwarded_and_clean_end(&f, 1.0).await;
}
