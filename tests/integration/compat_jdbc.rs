//! pgjdbc (Java, no libpq) through leasegate with `sslmode=verify-full`: the client key as
//! PKCS#8 DER (`sslkey=….pk8`) and as PKCS#12 (`sslkey=….p12`, alias `user`, `sslpassword`),
//! one PreparedStatement run 10 times (past pgjdbc's `prepareThreshold` of 5, so it becomes a
//! named server-side statement), a transaction (rollback, then commit), SQLSTATEs, a batch, a
//! query timeout (a CancelRequest on a new connection), CopyManager, LISTEN/NOTIFY, startup
//! settings and DatabaseMetaData. The program is
//! `tests/clients/java/LgJdbc.java`, run by single-file source launch against Debian's
//! `libpostgresql-jdbc-java` (`/usr/share/java/postgresql.jar`).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::harness::compat::{CompatRow, client_env, repo, run_script};
use crate::harness::fixture::Fixture;
use crate::harness::root;

/// Debian's pgjdbc jar.
const JAR: &str = "/usr/share/java/postgresql.jar";
/// Password of the PKCS#12 file (a test value).
const P12_PASSWORD: &str = "lg-test-p12";

/// Check name in the program's JSON → feature named in the compatibility table.
const FEATURES: &[(&str, &str)] = &[
    (
        "verify_full_pk8",
        "verify-full, key as PKCS#8 DER (sslkey=….pk8)",
    ),
    (
        "verify_full_p12",
        "key as PKCS#12 (alias user, sslpassword)",
    ),
    (
        "prepare_threshold",
        "PreparedStatement ×10, server-prepared past prepareThreshold",
    ),
    ("transaction", "transaction: rollback, commit"),
    (
        "errors",
        "SQLSTATEs 23505/22012 (getSQLState), connection usable after",
    ),
    ("batch", "executeBatch of 100 inserts"),
    (
        "query_timeout",
        "setQueryTimeout → CancelRequest (new connection) → 57014, usable",
    ),
    ("copy", "CopyManager copyIn/copyOut"),
    (
        "notify",
        "LISTEN/NOTIFY: own notification's getPID() = getBackendPID()",
    ),
    (
        "settings",
        "ApplicationName, options=-c search_path=…; DatabaseMetaData.getTables",
    ),
];

/// Panics unless java and the pgjdbc jar are installed, naming the packages.
fn require_jdbc() {
    let java = std::process::Command::new("java")
        .arg("-version")
        .stdin(Stdio::null())
        .output();
    assert!(
        java.is_ok_and(|o| o.status.success()) && Path::new(JAR).exists(),
        "Java and pgjdbc are needed: apt-get install default-jdk-headless libpostgresql-jdbc-java"
    );
}

/// The PKCS#12 bundle of `cert` and `key` (PEM), alias `user`.
fn pkcs12(cert: &Path, key: &Path, out: &Path) {
    let status = std::process::Command::new("openssl")
        .args(["pkcs12", "-export", "-name", "user", "-passout"])
        .arg(format!("pass:{P12_PASSWORD}"))
        .arg("-in")
        .arg(cert)
        .arg("-inkey")
        .arg(key)
        .arg("-out")
        .arg(out)
        .stdin(Stdio::null())
        .status()
        .expect("run openssl pkcs12");
    assert!(status.success(), "openssl pkcs12 -export");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_keys_statements_errors_timeout_copy_notify_and_settings() {
    let mut row = CompatRow::new("pgjdbc", 45, "pgjdbc (Java)", "?");
    row.phase("java or libpostgresql-jdbc-java not installed");
    require_jdbc();
    let f = Fixture::start("compat-jdbc").await;
    let keys = root().tempdir("jdbc-keys-");
    let pk8 = keys.path().join("client.pk8");
    std::fs::write(&pk8, f.good.key_der().secret_der()).expect("write .pk8");
    let p12 = keys.path().join("client.p12");
    pkcs12(&f.good.cert, &f.good.key, &p12);

    row.phase("tests/clients/java/LgJdbc.java");
    let mut cmd = tokio::process::Command::new("java");
    cmd.args(["-cp", JAR])
        .arg(repo().join("tests/clients/java/LgJdbc.java"));
    for (k, v) in client_env(f.proxy.port, &f.pki, &f.good, "readonly", "myapp") {
        cmd.env(k, v);
    }
    cmd.env("LG_SSLKEY_PK8", &pk8)
        .env("LG_SSLKEY_P12", &p12)
        .env("LG_P12_PASSWORD", P12_PASSWORD);
    let run = run_script(cmd, "LgJdbc.java", Duration::from_secs(120)).await;
    let r = &run.result;
    row.set_version(&format!(
        "pgjdbc {}, Java {}",
        r["pgjdbc"].as_str().unwrap_or("?"),
        r["java"].as_str().unwrap_or("?")
    ));
    eprintln!(
        "LgJdbc.java ({:?}): {}\n{}",
        run.elapsed,
        run.stdout.trim(),
        run.stderr.trim()
    );
    for (name, feature) in FEATURES {
        if r["checks"][*name]["ok"] == true {
            row.features(&[feature]);
        }
    }
    run.assert_ok();
    for (name, _) in FEATURES {
        assert_eq!(r["checks"][*name]["ok"], true, "check {name}: {r:#}");
    }
    for name in ["verify_full_pk8", "verify_full_p12"] {
        let user = r["checks"][name]["session_user"].as_str().unwrap_or("");
        assert!(
            user.starts_with(&f.mount.prefix),
            "{name}: a dynamic role: {r:#}"
        );
    }
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
