//! libpq's own tools through leasegate with `sslmode=verify-full` and a client certificate:
//! psql running a script file (several statements, `\copy` in and out, transactions with a
//! savepoint and a rollback) and pgbench (select-only and TPC-B-like, 4 clients, 2 threads).
//! psql's Ctrl-C cancel is covered by `cancel::psql_sigint_cancels_the_query`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::client::conninfo;
use crate::harness::compat::{CompatRow, tool_version};
use crate::harness::env;
use crate::harness::fixture::{Fixture, GOOD_URI};
use crate::harness::pg::pg_bin;
use crate::harness::pki::{ClientCert, Pki};

/// The standard fixture, with the good client also granted `readwrite`.
async fn fixture(name: &str) -> Fixture {
    Fixture::start_with(name, |cfg| {
        cfg.grant(&format!("uri:{GOOD_URI}"), &["myapp"], &["readwrite"])
    })
    .await
}

const INPUT_CSV: &str = "1,alpha,\n2,\"beta, with comma\",x\n3,\"quote \"\"q\"\"\",\n";
const EXPECTED_OUT_CSV: &str =
    "1,alpha,updated\n2,\"beta, with comma\",x\n3,\"quote \"\"q\"\"\",\n100,from transaction,\n";

#[tokio::test]
async fn psql_script_with_copy_and_transactions() {
    let psql = pg_bin("psql");
    let mut row = CompatRow::new("psql-script", 10, "psql (libpq)", &tool_version(&psql));
    let f = fixture("compat-psql").await;
    let work = crate::harness::root().tempdir("psql-script-");
    let table = format!("compat_psql_{}", f.mount.prefix.trim_end_matches('_'));
    let input = work.path().join("in.csv");
    let output = work.path().join("out.csv");
    std::fs::write(&input, INPUT_CSV).expect("write in.csv");
    let script = work.path().join("script.sql");
    std::fs::write(
        &script,
        format!(
            r#"\conninfo
\echo server :SERVER_VERSION_NUM
CREATE TABLE {table} (id int PRIMARY KEY, name text, note text);
\copy {table} FROM '{input}' WITH (FORMAT csv)
SELECT 'loaded ' || count(*) FROM {table};
BEGIN;
INSERT INTO {table} VALUES (100, 'from transaction', NULL);
UPDATE {table} SET note = 'updated' WHERE id = 1;
SAVEPOINT before_delete;
DELETE FROM {table} WHERE id = 2;
ROLLBACK TO SAVEPOINT before_delete;
COMMIT;
BEGIN;
DELETE FROM {table};
INSERT INTO {table} VALUES (999, 'rolled back', NULL);
ROLLBACK;
\copy (SELECT id, name, note FROM {table} ORDER BY id) TO '{output}' WITH (FORMAT csv)
SELECT 'ids ' || string_agg(id::text, ',' ORDER BY id) FROM {table};
SELECT 'user ' || current_user;
"#,
            input = input.display(),
            output = output.display(),
        ),
    )
    .expect("write script.sql");

    row.step("script file (-f)");
    row.features(&["\\copy in/out", "transactions (savepoint, rollback)"]);
    let info = conninfo(f.proxy.port, &f.pki, Some(&f.good), "readwrite", "myapp");
    let started = Instant::now();
    let out = tokio::process::Command::new(&psql)
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            "VERBOSITY=verbose",
        ])
        .arg("-f")
        .arg(&script)
        .arg(&info)
        .env("PGCONNECT_TIMEOUT", "15")
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("psql finishes within 60 s")
        .expect("run psql");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "psql -f failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    eprintln!("psql script ran in {:?}", started.elapsed());
    assert!(
        stdout.contains("SSL connection (protocol: TLSv1.3"),
        "\\conninfo reports TLS 1.3: {stdout}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines.contains(&"loaded 3"),
        "\\copy FROM loaded 3 rows: {stdout}"
    );
    assert!(
        lines.contains(&"ids 1,2,3,100"),
        "committed transaction kept, rolled back one discarded: {stdout}"
    );
    let server = lines
        .iter()
        .find_map(|l| l.strip_prefix("server "))
        .unwrap_or_else(|| panic!("server version line in {stdout}"));
    assert!(
        server.starts_with("15"),
        "server_version ParameterStatus reached psql: {server}"
    );
    let user = lines
        .iter()
        .find_map(|l| l.strip_prefix("user "))
        .expect("user line");
    assert!(user.starts_with(&f.mount.prefix), "dynamic user {user}");
    let copied = std::fs::read_to_string(&output).expect("\\copy TO wrote out.csv");
    assert_eq!(copied, EXPECTED_OUT_CSV, "\\copy TO file content");

    row.phase("committed data visible to another session");
    let su = env().pg.superuser().await;
    let rows = su
        .query(&format!("select id, note from {table} order by id"), &[])
        .await
        .expect("read table as superuser");
    let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![1, 2, 3, 100]);
    assert_eq!(
        rows[0].get::<_, Option<String>>(1).as_deref(),
        Some("updated")
    );
    su.batch_execute(&format!("drop table {table}"))
        .await
        .expect("drop table");

    row.step("wrong host name refused");
    let wrong = info.replace("host=localhost", "host=wrong-name.invalid");
    let out = crate::harness::client::psql(&wrong, "select 1").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("does not match host name"),
        "psql with a wrong host name must fail the certificate name check: {stderr}"
    );
    row.features(&["Ctrl-C cancel → 57014 (cancel.rs)"]);
    f.wait_all_revoked(Duration::from_secs(15)).await;
}

/// pgbench's environment for a leasegate connection as `role`.
fn pgbench_env(port: u16, pki: &Pki, cert: &ClientCert, role: &str) -> Vec<(String, String)> {
    let p = |x: &std::path::Path| x.display().to_string();
    vec![
        ("PGHOST".into(), "localhost".into()),
        ("PGHOSTADDR".into(), "127.0.0.1".into()),
        ("PGPORT".into(), port.to_string()),
        ("PGDATABASE".into(), "myapp".into()),
        ("PGUSER".into(), role.into()),
        ("PGSSLMODE".into(), "verify-full".into()),
        ("PGSSLROOTCERT".into(), p(pki.ca_pem())),
        ("PGSSLCERT".into(), p(&cert.cert)),
        ("PGSSLKEY".into(), p(&cert.key)),
        ("PGCONNECT_TIMEOUT".into(), "30".into()),
    ]
}

/// What a pgbench run reported.
#[derive(Debug)]
struct Bench {
    processed: u64,
    failed: u64,
    tps: f64,
}

async fn run_pgbench(args: &[&str], envs: &[(String, String)], what: &str) -> Bench {
    let mut cmd = tokio::process::Command::new(pg_bin("pgbench"));
    cmd.args(args)
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what}: pgbench did not finish within 120 s"))
        .expect("run pgbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what}: pgbench failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let field = |prefix: &str| -> Option<String> {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(|v| v.trim().to_string())
    };
    let first_number =
        |s: String| -> String { s.split_whitespace().next().unwrap_or_default().to_string() };
    let processed = field("number of transactions actually processed:")
        .map(first_number)
        .and_then(|v| v.split('/').next().map(String::from))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no processed count in:\n{stdout}"));
    let failed = field("number of failed transactions:")
        .map(first_number)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no failed-transactions line in:\n{stdout}"));
    let tps = field("tps =")
        .map(first_number)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    eprintln!("{what}: {processed} transactions, {failed} failed, {tps} tps\n{stdout}");
    Bench {
        processed,
        failed,
        tps,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_select_only_and_tpcb_through_leasegate() {
    let pgbench = pg_bin("pgbench");
    let mut row = CompatRow::new("pgbench", 20, "pgbench (libpq)", &tool_version(&pgbench));
    let f = fixture("compat-pgbench").await;
    let pg = &env().pg;

    row.phase("pgbench -i as superuser directly against PostgreSQL");
    let init = tokio::process::Command::new(&pgbench)
        .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(pg.port.to_string())
        .arg("myapp")
        .env("PGPASSWORD", &pg.password)
        .env("PGSSLMODE", "disable")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run pgbench -i");
    assert!(
        init.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let tables = "pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history";
    pg.psql(
        "myapp",
        &format!(
            "GRANT SELECT ON {tables} TO leasegate_readonly; \
             GRANT SELECT, INSERT, UPDATE ON {tables} TO leasegate_readwrite;"
        ),
    )
    .expect("grant the pgbench tables to the leasegate group roles");

    // -n: the tables belong to postgres, so the dynamic roles may not vacuum them.
    let common = ["-n", "-c", "4", "-j", "2", "-T", "3"];

    row.step("-S select-only");
    let envs = pgbench_env(f.proxy.port, &f.pki, &f.good, "readonly");
    let mut args = vec!["-S"];
    args.extend(common);
    let select = run_pgbench(&args, &envs, "pgbench -S").await;
    assert_eq!(select.failed, 0, "select-only: no failed transactions");
    assert!(select.processed > 0, "select-only processed transactions");

    row.step("-S -M prepared");
    let mut args = vec!["-S", "-M", "prepared"];
    args.extend(common);
    let prepared = run_pgbench(&args, &envs, "pgbench -S -M prepared").await;
    assert_eq!(
        prepared.failed, 0,
        "select-only prepared: no failed transactions"
    );
    assert!(
        prepared.processed > 0,
        "select-only prepared processed transactions"
    );

    row.step("TPC-B-like (readwrite)");
    row.features(&["-c 4 -j 2 -T 3, 0 failed"]);
    let envs = pgbench_env(f.proxy.port, &f.pki, &f.good, "readwrite");
    let tpcb = run_pgbench(&common, &envs, "pgbench TPC-B").await;
    assert_eq!(tpcb.failed, 0, "TPC-B-like: no failed transactions");
    assert!(tpcb.processed > 0, "TPC-B-like processed transactions");
    let history: i64 = pg
        .psql("myapp", "select count(*) from pgbench_history")
        .expect("count pgbench_history")
        .trim()
        .parse()
        .expect("a count");
    assert_eq!(
        history as u64, tpcb.processed,
        "every TPC-B transaction inserted one history row"
    );
    eprintln!(
        "pgbench through leasegate: select-only {:.0} tps, select-only prepared {:.0} tps, \
         TPC-B {:.0} tps",
        select.tps, prepared.tps, tpcb.tps
    );
    f.wait_all_revoked(Duration::from_secs(20)).await;
    pg.psql(
        "myapp",
        "DROP TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history",
    )
    .expect("drop pgbench tables");
}
