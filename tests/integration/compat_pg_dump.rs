//! pg_dump (libpq) through leasegate with `sslmode=verify-full` and a client certificate, as the
//! dynamic role of `readonly`: a plain dump of one schema to stdout (schema, a view, COPY of
//! 5000 rows) and a parallel directory dump (`-Fd -j 2`: three sessions, each its own dynamic
//! role, the workers importing the leader's exported snapshot), which `pg_restore --list`
//! reads. Every lease is revoked after.

use std::time::Duration;

use crate::harness::client::conninfo;
use crate::harness::compat::{CompatRow, tool_version};
use crate::harness::fixture::Fixture;
use crate::harness::pg::pg_bin;
use crate::harness::{env, next_id, root};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_dump_plain_and_parallel_directory_dumps() {
    let pg_dump = pg_bin("pg_dump");
    let mut row = CompatRow::new("pg-dump", 21, "pg_dump (libpq)", &tool_version(&pg_dump));
    let f = Fixture::start("compat-pg-dump").await;
    let schema = format!("lgdump_{}", next_id());
    let su = env().pg.superuser().await;
    su.batch_execute(&format!(
        "create schema {schema};
         create table {schema}.t (id int primary key, v text);
         insert into {schema}.t select g, 'row ' || g from generate_series(1, 5000) g;
         create table {schema}.u (id int references {schema}.t, note text);
         insert into {schema}.u select g, 'n' from generate_series(1, 100) g;
         create view {schema}.v as select id from {schema}.t where id < 10;
         grant usage on schema {schema} to leasegate_readonly;
         grant select on all tables in schema {schema} to leasegate_readonly;"
    ))
    .await
    .expect("create the schema to dump");
    let info = conninfo(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp");

    row.step("plain dump of a schema (-n, COPY 5000 rows) to stdout");
    let out = tokio::process::Command::new(&pg_dump)
        .args(["-n", &schema, "-d", &info])
        .env_remove("PGPASSWORD")
        .output()
        .await
        .expect("run pg_dump");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("COPY {schema}.t (id, v) FROM stdin;")),
        "the dump has the table's data"
    );
    assert!(text.contains("5000\trow 5000\n"), "the last row is dumped");
    assert!(
        text.contains(&format!("CREATE VIEW {schema}.v")),
        "the view"
    );

    row.step(
        "parallel directory dump (-Fd -j 2: exported snapshot, 3 sessions), pg_restore --list",
    );
    let dir = root().tempdir("pg-dump-");
    let target = dir.path().join("dump");
    let out = tokio::process::Command::new(&pg_dump)
        .args(["-n", &schema, "-Fd", "-j", "2", "-f"])
        .arg(&target)
        .args(["-d", &info])
        .env_remove("PGPASSWORD")
        .output()
        .await
        .expect("run pg_dump -j 2");
    assert!(
        out.status.success(),
        "pg_dump -Fd -j 2: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = std::process::Command::new(pg_bin("pg_restore"))
        .arg("--list")
        .arg(&target)
        .output()
        .expect("run pg_restore --list");
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success(), "pg_restore --list: {listed}");
    for entry in [
        format!("TABLE DATA {schema} t "),
        format!("TABLE DATA {schema} u "),
    ] {
        assert!(listed.contains(&entry), "{entry} in the dump: {listed}");
    }
    f.wait_all_revoked(Duration::from_secs(15)).await;
    su.batch_execute(&format!("drop schema {schema} cascade"))
        .await
        .expect("drop the schema");
}
