//! Go's pgx v4 (its own protocol implementation: no libpq; the extended protocol with named
//! statements from its statement cache and binary formats) through leasegate with the
//! connection string a Go user writes (`postgres://readonly@host:port/myapp?sslmode=verify-full
//! &sslrootcert=…&sslcert=…&sslkey=…`): another CA refused, simple and parameterised queries,
//! `Prepare`, transactions with savepoints, `*pgconn.PgError` codes, binary `CopyFrom` and
//! `CopyTo`, a CancelRequest and context deadlines (pgconn sends a plaintext CancelRequest on
//! a new connection), runtime parameters in the URL, `SendBatch`, LISTEN/NOTIFY and a
//! `pgxpool`. The program is `tests/clients/go/` (`pgx_compat.go`, `pgx_session.go`), built
//! offline in GOPATH mode against Debian's packaged Go sources (`golang-go`,
//! `golang-github-jackc-pgx-v4-dev`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::compat::{CompatRow, assert_dynamic_role, client_env, repo, run_script};
use crate::harness::fixture::Fixture;
use crate::harness::pki::Pki;
use crate::harness::root;
use crate::harness::security::wait_counter;

/// Where Debian installs Go library sources (`/usr/share/gocode/src/github.com/jackc/…`).
pub(crate) const GOPATH: &str = "/usr/share/gocode";
/// The Debian packages the program needs.
const PACKAGES: &str = "golang-go golang-github-jackc-pgx-v4-dev";
/// The program (package main: every `.go` file of the directory), relative to the repository.
const PROGRAM: &str = "tests/clients/go";

/// Check name in the program's JSON → feature named in the compatibility table.
const FEATURES: &[(&str, &str)] = &[
    (
        "verify_full_tls",
        "postgres:// URL, sslmode=verify-full (other CA refused)",
    ),
    ("simple_query", "simple query (multi-statement)"),
    (
        "extended_binary",
        "QueryRow with parameters: cached named statements, binary int/text/timestamptz/numeric/bytea/arrays",
    ),
    ("prepare", "explicit Prepare, Deallocate"),
    (
        "transactions",
        "transaction, nested Begin (savepoint), rollback, commit",
    ),
    (
        "errors_then_usable",
        "*pgconn.PgError 23505/22012, connection usable after",
    ),
    (
        "copy",
        "CopyFrom (binary COPY), CopyTo, failed COPY recovered",
    ),
    (
        "cancel_request",
        "CancelRequest (plaintext, new connection) → 57014, connection usable",
    ),
    (
        "context_deadline",
        "context deadline → cancel + close, new connection",
    ),
    (
        "settings",
        "runtime params in the URL (application_name, search_path)",
    ),
    (
        "batch",
        "SendBatch (52 pipelined queries, error in the batch)",
    ),
    (
        "listen_notify",
        "LISTEN/NOTIFY (WaitForNotification): own notification with the key's pid",
    ),
    (
        "pool",
        "pgxpool (pool_max_conns=4): connection closed by a deadline replaced, 16 concurrent queries on ≤ 4 connections",
    ),
];

/// Panics unless `go` runs and Debian's pgx v4 sources are installed, naming the packages.
fn require_go_pgx() {
    let go = std::process::Command::new("go")
        .arg("version")
        .stdin(Stdio::null())
        .output();
    let pgx = Path::new(GOPATH).join("src/github.com/jackc/pgx/v4/pgxpool");
    assert!(
        go.as_ref().is_ok_and(|o| o.status.success()) && pgx.is_dir(),
        "Go and pgx v4 are needed (`go version`: {go:?}; {} present: {}): \
         apt-get install --no-install-recommends {PACKAGES}",
        pgx.display(),
        pgx.is_dir()
    );
}

/// The Debian version of `package`, or "?".
pub(crate) fn debian_version(package: &str) -> String {
    std::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", package])
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "?".into())
}

/// Builds the program into `dir` offline (GOPATH mode, no module proxy). The build cache is
/// kept under cargo's target directory so later runs only link.
pub(crate) async fn build_client(dir: &Path) -> PathBuf {
    build_go(PROGRAM, &dir.join("pgx_compat"), PACKAGES).await
}

/// Builds every `.go` file of `program` (a directory of the repository, package main) into
/// `out` offline against Debian's Go sources (`packages` named if it fails).
pub(crate) async fn build_go(program: &str, out: &Path, packages: &str) -> PathBuf {
    let mut sources: Vec<PathBuf> = std::fs::read_dir(repo().join(program))
        .unwrap_or_else(|e| panic!("read {program}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "go"))
        .collect();
    sources.sort();
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("go-build-cache");
    let mut cmd = tokio::process::Command::new("go");
    cmd.arg("build")
        .arg("-o")
        .arg(out)
        .args(&sources)
        .current_dir(out.parent().unwrap_or(Path::new(".")))
        .env("GO111MODULE", "off")
        .env("GOPATH", GOPATH)
        .env("GOCACHE", &cache)
        .env("GOFLAGS", "")
        .env("GOENV", "off")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local");
    let started = Instant::now();
    let what = format!("go build {program}");
    let run = run_script(cmd, &what, Duration::from_secs(300)).await;
    assert!(
        run.success,
        "{what} ({}): {}\n{}\n(needs {packages})",
        run.status, run.stdout, run.stderr
    );
    eprintln!("{what}: {:?}", started.elapsed());
    out.to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgx_url_binary_statements_copy_cancel_batch_notify_and_pool() {
    let mut row = CompatRow::new("pgx", 47, "pgx (Go, pure protocol)", "?");
    row.phase("go or golang-github-jackc-pgx-v4-dev not installed");
    require_go_pgx();
    let build = root().tempdir("pgx-build-");
    row.phase("go build tests/clients/go");
    let program = build_client(build.path()).await;
    let f = Fixture::start("compat-pgx").await;
    let other_ca = Pki::new();

    row.phase(PROGRAM);
    let mut cmd = tokio::process::Command::new(&program);
    for (k, v) in client_env(f.proxy.port, &f.pki, &f.good, "readonly", "myapp") {
        cmd.env(k, v);
    }
    cmd.env("LG_WRONG_CA", other_ca.ca_pem());
    let run = run_script(cmd, "pgx_compat.go", Duration::from_secs(120)).await;
    row.set_version(&format!(
        "pgx {}, pgconn {} (Debian), Go {}",
        debian_version("golang-github-jackc-pgx-v4-dev"),
        debian_version("golang-github-jackc-pgconn-dev"),
        run.result["go"]
            .as_str()
            .map_or("?", |v| v.trim_start_matches("go")),
    ));
    let checks = run.report(&mut row, FEATURES);
    assert_dynamic_role(checks, "verify_full_tls", &f);
    // Every cancel (explicit, and pgconn's on a context deadline: in context_deadline and in
    // the pool) reached leasegate as a plaintext CancelRequest and went upstream.
    let sent = checks["cancel_request"]["cancels_sent"]
        .as_f64()
        .unwrap_or(0.0)
        + checks["pool"]["cancels_sent"].as_f64().unwrap_or(0.0);
    let labels = [("result", "forwarded")];
    wait_counter(
        &f.proxy,
        "leasegate_cancel_requests_total",
        &labels,
        sent + 1.0,
    )
    .await;
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
