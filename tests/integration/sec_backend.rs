//! Upstream work does not outlive its session. PostgreSQL notices a vanished client only at its
//! next read, so a backend in a long statement would keep its slot, its CPU and its locks with
//! its role already dropped. leasegate cancels a busy backend's statement with the upstream
//! key, closes, and revokes only once the backend is gone; meanwhile the session still counts
//! against its limits. Backends are found by PID (a dropped role's `usename` reads NULL).
//!
//! The tests that show leasegate's own close use roles whose revocation only drops the role
//! (`set_role_without_terminate`): there nothing but leasegate ends the backend. The shipped
//! revocation statements, which also end the role's backends, are tested on their own.

use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::harness::bao::{Mount, Target, leases, read_creds, revoke};
use crate::harness::fixture::{Fixture, messages_until_closed};
use crate::harness::pg::pg_bin;
use crate::harness::proxy::set;
use crate::harness::security::{assert_fatal, counter, tls_startup, wait_counter};
use crate::harness::wire::{Tls, Wire, query_message};
use crate::harness::{dynamic_roles, env, next_id, poll_until};

/// How soon after its client vanished a busy backend must be gone.
const BACKEND_GONE_WITHIN: Duration = Duration::from_secs(5);

/// The backend's PID and session user, asked through leasegate.
async fn backend_of(w: &mut Wire<Tls>) -> (i32, String) {
    let row = w
        .query_column("select pg_backend_pid()::text || ' ' || current_user")
        .await;
    let text = row
        .first()
        .cloned()
        .flatten()
        .unwrap_or_else(|| panic!("one row: {row:?}"));
    let (pid, user) = text.split_once(' ').expect("pid and user");
    (pid.parse().expect("pid"), user.to_string())
}

/// `pg_stat_activity` of one backend: (state, query, application_name), if it exists.
async fn activity(pid: i32) -> Option<(String, String, String)> {
    let su = env().pg.superuser().await;
    let row = su
        .query_opt(
            "select coalesce(state, ''), coalesce(query, ''), coalesce(application_name, '') \
             from pg_stat_activity where pid = $1",
            &[&pid],
        )
        .await
        .expect("query pg_stat_activity");
    row.map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Polls until backend `pid` runs a statement containing `fragment`.
async fn wait_running(pid: i32, fragment: &str) {
    poll_until(
        Duration::from_secs(10),
        &format!("backend {pid} running {fragment}"),
        || async move {
            match activity(pid).await {
                Some((state, query, _)) if state == "active" && query.contains(fragment) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

/// Polls until no backend with `pid` exists, at most `within`.
async fn wait_backend_gone(pid: i32, within: Duration, since: Instant) {
    poll_until(within, &format!("backend {pid} gone"), || async move {
        match activity(pid).await {
            None => Ok(()),
            Some(a) => Err(format!("still there: {a:?}")),
        }
    })
    .await;
    eprintln!(
        "backend {pid} gone {:?} after the session ended",
        since.elapsed()
    );
}

/// Sends a query without waiting for its answer.
async fn start_query(w: &mut Wire<Tls>, sql: &str) {
    w.send(&query_message(sql)).await.expect("send query");
}

/// The client's connection closes without Terminate (TCP FIN, no TLS close_notify).
fn vanish(w: Wire<Tls>) -> Instant {
    drop(w);
    Instant::now()
}

/// `leasegate_upstream_closes_total{how}` right now.
async fn closes(f: &Fixture, how: &str) -> f64 {
    counter(&f.proxy, "leasegate_upstream_closes_total", &[("how", how)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_backend_mid_query_is_gone_soon_after_the_client_vanished() {
    let f = Fixture::start("sec-backend-ro").await;
    Target::shared()
        .set_role_without_terminate(&f.mount, "readonly")
        .await;
    let mut w = f.raw_session("readonly").await;
    let (pid, user) = backend_of(&mut w).await;
    start_query(&mut w, "select pg_sleep(300)").await;
    wait_running(pid, "pg_sleep").await;
    assert_eq!(dynamic_roles(&f.mount.prefix).await, vec![user]);

    let vanished = vanish(w);
    wait_backend_gone(pid, BACKEND_GONE_WITHIN, vanished).await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    assert_eq!(
        closes(&f, "busy").await,
        1.0,
        "closed as busy, after a cancel"
    );
    assert_eq!(closes(&f, "timeout").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_pipelined_behind_a_running_query_leaves_no_backend() {
    let f = Fixture::start("sec-backend-pipelined-x").await;
    Target::shared()
        .set_role_without_terminate(&f.mount, "readonly")
        .await;
    let mut w = f.raw_session("readonly").await;
    let (pid, _) = backend_of(&mut w).await;
    // The query and Terminate in one write: PostgreSQL reads the Terminate only after the
    // query, so the relay ends (client_terminate) with the backend busy.
    let mut both = query_message("select pg_sleep(300)");
    both.extend_from_slice(b"X\0\0\0\x04");
    w.send(&both).await.expect("send");
    wait_running(pid, "pg_sleep").await;
    let ended = vanish(w);
    wait_backend_gone(pid, BACKEND_GONE_WITHIN, ended).await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    assert_eq!(closes(&f, "busy").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_fools_the_idle_bookkeeping_still_has_its_statement_cancelled() {
    let f = Fixture::start("sec-backend-fooled").await;
    Target::shared()
        .set_role_without_terminate(&f.mount, "readonly")
        .await;
    let mut w = f.raw_session("readonly").await;
    let (pid, _) = backend_of(&mut w).await;
    // A Sync and then a CopyData outside COPY: leasegate uncounts the Sync as if the server
    // had ignored it (as it does in copy-in mode), but the server answers it, so the counts
    // say idle while the long query runs.
    let mut fool = query_message("select 1");
    fool.extend_from_slice(b"S\0\0\0\x04d\0\0\0\x04");
    fool.extend_from_slice(&query_message("select pg_sleep(300)"));
    w.send(&fool).await.expect("send");
    wait_running(pid, "pg_sleep").await;
    let vanished = vanish(w);
    wait_backend_gone(pid, BACKEND_GONE_WITHIN, vanished).await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    assert_eq!(closes(&f, "timeout").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readwrite_backend_holding_a_lock_is_gone_and_the_lock_free_after_the_client_vanished() {
    let f = Fixture::start_with("sec-backend-rw", |mut cfg| {
        cfg.grants[0].roles.push("readwrite".into());
        cfg
    })
    .await;
    Target::shared()
        .set_role_without_terminate(&f.mount, "readwrite")
        .await;
    let table = format!("{}locked", f.mount.prefix);
    let su = env().pg.superuser().await;
    su.batch_execute(&format!(
        "create table {table} (id int); grant all on {table} to leasegate_readwrite"
    ))
    .await
    .expect("create the table");

    let mut w = f.raw_session("readwrite").await;
    let (pid, _) = backend_of(&mut w).await;
    let locked = w
        .simple_query(&format!(
            "begin; lock table {table} in access exclusive mode"
        ))
        .await
        .expect("lock");
    assert_eq!(locked.last().map(|m| m.body.clone()), Some(b"T".to_vec()));
    let held: i64 = su
        .query_one(
            "select count(*) from pg_locks l join pg_class c on c.oid = l.relation \
             where l.pid = $1 and c.relname = $2 and l.mode = 'AccessExclusiveLock' and l.granted",
            &[&pid, &table],
        )
        .await
        .expect("pg_locks")
        .get(0);
    assert_eq!(held, 1, "the session holds the lock");
    start_query(&mut w, "select pg_sleep(300)").await;
    wait_running(pid, "pg_sleep").await;

    let vanished = vanish(w);
    wait_backend_gone(pid, BACKEND_GONE_WITHIN, vanished).await;
    su.batch_execute(&format!(
        "begin; lock table {table} in access exclusive mode nowait; rollback"
    ))
    .await
    .expect("the lock is free once the backend is gone");
    // The readwrite revocation's DROP OWNED no longer waits on the lock.
    f.wait_all_revoked(Duration::from_secs(10)).await;
    assert_eq!(closes(&f, "busy").await, 1.0);
    su.batch_execute(&format!("drop table {table}"))
        .await
        .expect("clean up the table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ended_at_max_session_duration_mid_query_leaves_no_backend() {
    let f = Fixture::start_edited(
        "sec-backend-maxdur",
        |cfg| cfg,
        |t| {
            set(t, "databases.0.max_session_duration", "3s");
            set(t, "databases.0.expiry_warning", "1s");
        },
    )
    .await;
    Target::shared()
        .set_role_without_terminate(&f.mount, "readonly")
        .await;
    let started = Instant::now();
    let mut w = f.raw_session("readonly").await;
    let (pid, _) = backend_of(&mut w).await;
    start_query(&mut w, "select pg_sleep(300)").await;
    wait_running(pid, "pg_sleep").await;

    let seen = messages_until_closed(&mut w, started, Duration::from_secs(10))
        .await
        .unwrap_or_else(|seen| panic!("session still open after 10 s: {seen:?}"));
    let ended = Instant::now();
    let fatal = seen
        .iter()
        .map(|(_, m)| m)
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("a FATAL before the close: {seen:?}"));
    assert_eq!(fatal.sqlstate().as_deref(), Some("57P01"), "{fatal:?}");
    assert!(
        fatal.fields()[&'M'].contains("max_session_duration"),
        "{fatal:?}"
    );
    wait_backend_gone(pid, BACKEND_GONE_WITHIN, ended).await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    assert_eq!(closes(&f, "busy").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_after_the_grace_period_mid_query_leaves_no_backend() {
    let mut f = Fixture::start_edited(
        "sec-backend-sigterm",
        |cfg| cfg,
        |t| set(t, "listen.shutdown_grace", "1s"),
    )
    .await;
    Target::shared()
        .set_role_without_terminate(&f.mount, "readonly")
        .await;
    let started = Instant::now();
    let mut w = f.raw_session("readonly").await;
    let (pid, _) = backend_of(&mut w).await;
    start_query(&mut w, "select pg_sleep(300)").await;
    wait_running(pid, "pg_sleep").await;

    f.proxy.signal("TERM");
    let seen = messages_until_closed(&mut w, started, Duration::from_secs(10))
        .await
        .unwrap_or_else(|seen| panic!("session still open 10 s after SIGTERM: {seen:?}"));
    let ended = Instant::now();
    assert!(
        seen.iter()
            .any(|(_, m)| m.sqlstate().as_deref() == Some("57P01")),
        "FATAL 57P01 before the close: {seen:?}"
    );
    wait_backend_gone(pid, BACKEND_GONE_WITHIN, ended).await;
    let status = f
        .proxy
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("leasegate exits after the drain");
    assert!(status.success(), "clean exit: {status:?}");
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

/// A statement that swallows cancels (and marks each one in `application_name`).
const IGNORES_CANCEL: &str = "do $$ begin loop begin perform pg_sleep(300); \
     exception when query_canceled then \
     perform set_config('application_name', 'cancel ignored', false); end; end loop; end $$";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_ignores_the_cancel_holds_the_identity_slot_until_the_close_gives_up() {
    // The contract's statements here: after the close gave up, revocation ends the backend.
    let f = Fixture::start_edited(
        "sec-backend-stuck",
        |cfg| cfg,
        |t| set(t, "limits.max_sessions_per_identity", 1i64),
    )
    .await;
    let mut w = f.raw_session("readonly").await;
    let (pid, user) = backend_of(&mut w).await;
    start_query(&mut w, IGNORES_CANCEL).await;
    wait_running(pid, "pg_sleep").await;

    let vanished = vanish(w);
    // leasegate cancels with the upstream key; the statement catches it.
    poll_until(
        BACKEND_GONE_WITHIN,
        "the cancel reached the backend",
        || async move {
            match activity(pid).await {
                Some((_, _, app)) if app == "cancel ignored" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    eprintln!(
        "cancel arrived {:?} after the client vanished",
        vanished.elapsed()
    );
    // The close still waits for the backend: the identity's only slot is taken, the role
    // and the lease are still there.
    let answer = tls_startup(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp").await;
    assert_fatal(&answer, "53300", &["too many sessions for identity"]);
    assert_eq!(dynamic_roles(&f.mount.prefix).await, vec![user]);
    assert_eq!(leases(&f.mount, "readonly").await.len(), 1);

    // The close gives up, says so, and the lease is revoked anyway; its statements end the
    // backend, and the slot is free again.
    let timeouts = wait_counter(
        &f.proxy,
        "leasegate_upstream_closes_total",
        &[("how", "timeout")],
        1.0,
    )
    .await;
    assert_eq!(timeouts, 1.0);
    eprintln!(
        "close gave up {:?} after the client vanished",
        vanished.elapsed()
    );
    let log = f.proxy.log_text();
    let warned = log
        .lines()
        .find(|l| l.contains(" WARN ") && l.contains("did not close its connection in time"))
        .unwrap_or_else(|| panic!("a WARN line about the close:\n{log}"));
    assert!(warned.contains("myapp"), "names the database: {warned}");
    f.wait_all_revoked(Duration::from_secs(10)).await;
    wait_backend_gone(pid, BACKEND_GONE_WITHIN, vanished).await;

    let idle_before = closes(&f, "idle").await;
    let w = f.raw_session("readonly").await;
    w.terminate().await;
    wait_counter(
        &f.proxy,
        "leasegate_upstream_closes_total",
        &[("how", "idle")],
        idle_before + 1.0,
    )
    .await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

/// Runs deploy/openbao-setup.sh for a new mount (psql from the test cluster's PGBIN).
async fn mount_by_setup_script() -> Mount {
    let n = next_id();
    let mount = Mount {
        name: format!("t{n}-sec-backend-script"),
        prefix: format!("lgt{n}_"),
    };
    let env = env();
    let pg_dir = pg_bin("psql").parent().expect("PGBIN").to_path_buf();
    let path = std::env::join_paths(std::iter::once(pg_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/openbao-setup.sh"
        ))
        .env("PATH", path)
        .env("VAULT_ADDR", &env.bao.addr)
        .env("VAULT_TOKEN", crate::harness::bao::ROOT_TOKEN)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", env.pg.port.to_string())
        .env("PGUSER", "postgres")
        .env("PGPASSWORD", &env.pg.password)
        .env("PGDATABASE", "myapp")
        .env("MOUNT", &mount.name)
        .env("USERNAME_PREFIX", &mount.prefix)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run deploy/openbao-setup.sh");
    assert!(
        out.status.success(),
        "openbao-setup.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    mount
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_revocation_statements_end_the_roles_backends_and_free_their_locks() {
    let mount = mount_by_setup_script().await;
    let table = format!("{}stuck", mount.prefix);
    let su = env().pg.superuser().await;
    su.batch_execute(&format!(
        "create table {table} (id int); grant all on {table} to leasegate_readwrite"
    ))
    .await
    .expect("create the table");
    // A session straight to PostgreSQL (no leasegate to cancel it) holds a lock and sleeps.
    let creds = read_creds(&mount, "readwrite").await;
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(env().pg.port)
        .user(&creds.username)
        .password(&creds.password)
        .dbname("myapp")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("log in with the dynamic credential");
    let driver = tokio::spawn(conn);
    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let sleeper = tokio::spawn(async move {
        let sql =
            format!("begin; lock table {table} in access exclusive mode; select pg_sleep(300)");
        let r = client.batch_execute(&sql).await;
        (client, r)
    });
    wait_running(pid, "pg_sleep").await;

    let revoked = Instant::now();
    revoke(&creds.lease_id).await;
    wait_backend_gone(pid, BACKEND_GONE_WITHIN, revoked).await;
    let (_client, result) = sleeper.await.expect("join");
    let err = result.expect_err("the statement ends with the backend");
    eprintln!("the direct session's statement: {err}");
    let _ = driver.await;
    let table = format!("{}stuck", mount.prefix);
    su.batch_execute(&format!(
        "begin; lock table {table} in access exclusive mode nowait; rollback; drop table {table}"
    ))
    .await
    .expect("the lock is free");
    assert!(
        dynamic_roles(&mount.prefix).await.is_empty(),
        "role dropped"
    );
    assert!(
        leases(&mount, "readwrite").await.is_empty(),
        "lease revoked"
    );
}
