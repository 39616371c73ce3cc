//! The local Unix-socket listener (`listen.unix_socket_dir`), its clients: psql, psycopg,
//! SQLAlchemy, node-postgres, pgx, asyncpg, Ruby `pg` and PHP pgsql connect with `host=<dir>`
//! and no certificate, as a granted OS
//! user and as an ungranted one (run as another OS user: FATAL 28000 naming `unix:user=…`, no
//! Vault call); a `unix:group=` grant; the socket file's mode keeps out users outside its
//! group; an SSLRequest is answered `N`; a CancelRequest over the socket cancels a query;
//! session limits count a Unix session under the `unix:` identity it matched.
//! The listener's operation (SIGHUP, stale sockets, refused directories) is `unix_socket_ops`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::harness::compat::{CompatRow, repo, require_node_pg, require_psycopg, run_script};
use crate::harness::fixture::Fixture;
use crate::harness::metrics::value_or_zero;
use crate::harness::pg::dynamic_roles;
use crate::harness::proxy::set;
use crate::harness::root;
use crate::harness::security::wait_auth_failures;
use crate::harness::unix::{
    OUTSIDER, audit_events, psql_as, run, socket_dir, socket_path, start, text,
};
use crate::harness::wire::{Login, PROTOCOL_3_0, Wire};

/// psycopg over the socket (as `as_uid` when given: the script drops to it after the import).
async fn psycopg_over(dir: &Path, port: u16, as_uid: Option<(u32, u32)>) -> Value {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(repo().join("tests/clients/python/psycopg_unix.py"))
        .env("LG_SOCKET_DIR", dir)
        .env("LG_PORT", port.to_string())
        .env("LG_DBNAME", "myapp")
        .env("LG_USER", "readonly");
    match as_uid {
        Some((uid, gid)) => {
            cmd.env("LG_AS_UID", uid.to_string())
                .env("LG_AS_GID", gid.to_string());
        }
        None => {
            cmd.env("LG_SQLALCHEMY", "1");
        }
    }
    let run = run_script(cmd, "psycopg_unix.py", Duration::from_secs(60)).await;
    run.assert_ok();
    run.result
}

/// current_user through node-postgres over the socket (`host` is the directory).
async fn node_over(dir: &Path, port: u16) -> String {
    let script = "const pg = require('pg'); \
        const c = new pg.Client({host: process.env.LG_SOCKET_DIR, port: +process.env.LG_PORT, \
          database: 'myapp', user: 'readonly'}); \
        c.connect().then(() => c.query('select current_user as u')) \
          .then(r => { console.log(JSON.stringify({user: r.rows[0].u})); return c.end(); }) \
          .catch(e => { console.log(JSON.stringify({error: String(e)})); process.exit(1); });";
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("-e")
        .arg(script)
        .current_dir(repo().join("tests/clients/node"))
        .env("LG_SOCKET_DIR", dir)
        .env("LG_PORT", port.to_string());
    let run = run_script(cmd, "node pg over the socket", Duration::from_secs(60)).await;
    run.assert_ok();
    run.result["user"].as_str().unwrap_or("").to_string()
}

/// current_user through a one-line client program (`program -e|-r|-c code`) over the socket:
/// the code reads the directory and port from `LG_SOCKET_DIR` and `LG_PORT` and prints
/// `{"user": …}`.
async fn one_liner_over(dir: &Path, port: u16, program: &str, flag: &str, code: &str) -> String {
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg(flag)
        .arg(code)
        .env("LG_SOCKET_DIR", dir)
        .env("LG_PORT", port.to_string());
    let run = run_script(cmd, program, Duration::from_secs(60)).await;
    run.assert_ok();
    run.result["user"].as_str().unwrap_or("").to_string()
}

/// Ruby `pg`, PHP pgsql and asyncpg: host is the directory, no certificate.
const RUBY_OVER_SOCKET: &str = "require 'pg'; require 'json'; \
    c = PG.connect(host: ENV['LG_SOCKET_DIR'], port: ENV['LG_PORT'].to_i, dbname: 'myapp', user: 'readonly'); \
    puts({user: c.exec('select current_user').getvalue(0, 0)}.to_json); c.close";
const PHP_OVER_SOCKET: &str = "$c = pg_connect('host=' . getenv('LG_SOCKET_DIR') . ' port=' . getenv('LG_PORT') \
    . ' dbname=myapp user=readonly'); \
    echo json_encode(['user' => pg_fetch_result(pg_query($c, 'select current_user'), 0, 0)]), \"\\n\";";
const ASYNCPG_OVER_SOCKET: &str = "import asyncio, json, os, asyncpg
async def main():
    c = await asyncpg.connect(host=os.environ['LG_SOCKET_DIR'], port=int(os.environ['LG_PORT']),
                              database='myapp', user='readonly')
    print(json.dumps({'user': await c.fetchval('select current_user')}))
    await c.close()
asyncio.run(main())
";

/// current_user through pgx (tests/clients/go, its Unix-socket mode) over the socket.
async fn pgx_over(dir: &Path, port: u16) -> String {
    let build = root().tempdir("pgx-unix-");
    let program = crate::compat_pgx::build_client(build.path()).await;
    let mut cmd = tokio::process::Command::new(program);
    cmd.env("LG_SOCKET_DIR", dir)
        .env("LG_PORT", port.to_string());
    let run = run_script(cmd, "pgx over the socket", Duration::from_secs(60)).await;
    run.assert_ok();
    run.result["user"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_psycopg_over_the_socket_as_a_granted_and_an_ungranted_os_user() {
    let mut row = CompatRow::new("psql-unix", 10, "psql (libpq)", "");
    row.phase("psycopg not installed");
    require_psycopg();
    let dir = socket_dir();
    // 0666: everyone may connect, so the grants alone decide.
    let (f, audit) = start("unix-grants", dir.path(), Some("0666"), &["unix:user=root"]).await;
    let port = f.proxy.port;

    row.phase("ungranted OS user refused");
    let out = run(psql_as(Some(OUTSIDER), dir.path(), port, "select 1")).await;
    let (_, err) = text(&out);
    assert!(!out.status.success(), "nobody must be refused: {err}");
    // psql prints no SQLSTATE for a failed connection: the audit line below has it.
    assert!(
        err.contains("FATAL:  local user \"unix:user=nobody\" (uid 65534) has no grant"),
        "psql as nobody: {err}"
    );
    let refused = psycopg_over(dir.path(), port, Some((65534, 65534))).await;
    eprintln!("psycopg as nobody: {refused}");
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["uid"], 65534, "{refused}");
    let message = refused["message"].as_str().unwrap_or("");
    assert!(
        message.contains("\"unix:user=nobody\" (uid 65534) has no grant"),
        "{refused}"
    );
    f.assert_nothing_issued().await;
    assert_eq!(wait_auth_failures(&f.proxy, "no_grant", 2.0).await, 2.0);

    row.step("Unix socket: host=<dir>, no certificate (grant unix:user=root)");
    let sql = "select current_user, (select count(*) from pg_roles where rolname = current_user)";
    let out = run(psql_as(None, dir.path(), port, sql)).await;
    let (stdout, err) = text(&out);
    assert!(out.status.success(), "psql as root over the socket: {err}");
    let (user, in_roles) = stdout.split_once('|').expect("user|count");
    assert!(
        user.starts_with(&f.mount.prefix),
        "a dynamic role of this mount: {stdout}"
    );
    assert_eq!(in_roles, "1", "the role is in pg_roles during the session");

    let mut py_row = CompatRow::new("psycopg-unix", 40, "psycopg 3 (Python, libpq)", "");
    py_row.step("Unix socket: host=<dir>, no certificate; transaction (grant unix:user=root)");
    let ok = psycopg_over(dir.path(), port, None).await;
    assert_eq!(ok["ok"], true, "{ok}");
    assert_eq!(ok["in_pg_roles"], 1, "{ok}");
    assert_eq!(ok["sum"], 3, "{ok}");
    assert!(
        ok["session_user"]
            .as_str()
            .is_some_and(|u| u.starts_with(&f.mount.prefix))
    );
    let mut sa_row = CompatRow::new("sqlalchemy-unix", 42, "SQLAlchemy 2 (psycopg 3 pool)", "");
    sa_row.step("Unix socket: postgresql+psycopg://readonly@/myapp?host=<dir>&port=<port>");
    let sa_user = ok["sqlalchemy_user"].as_str().unwrap_or("");
    assert!(
        sa_user.starts_with(&f.mount.prefix),
        "SQLAlchemy over the socket: {ok}"
    );
    drop(sa_row);
    {
        require_node_pg();
        let mut node_row = CompatRow::new("node-pg-unix", 50, "node-postgres `pg` (pure JS)", "");
        node_row.step("Unix socket: host=<dir>, no certificate");
        let user = node_over(dir.path(), port).await;
        assert!(
            user.starts_with(&f.mount.prefix),
            "node pg over the socket: {user}"
        );
    }
    for (slug, order, client, program, flag, code) in [
        (
            "ruby-unix",
            55,
            "Ruby `pg` (libpq)",
            "ruby",
            "-e",
            RUBY_OVER_SOCKET,
        ),
        (
            "php-unix",
            56,
            "PHP pgsql + PDO_pgsql (libpq)",
            "php",
            "-r",
            PHP_OVER_SOCKET,
        ),
        (
            "asyncpg-unix",
            42,
            "asyncpg (Python, pure protocol)",
            "python3",
            "-c",
            ASYNCPG_OVER_SOCKET,
        ),
    ] {
        let mut row = CompatRow::new(slug, order, client, "");
        row.step("Unix socket: host=<dir>, no certificate");
        let user = one_liner_over(dir.path(), port, program, flag, code).await;
        assert!(
            user.starts_with(&f.mount.prefix),
            "{program} over the socket: {user}"
        );
    }
    {
        let mut pgx_row = CompatRow::new("pgx-unix", 47, "pgx (Go, pure protocol)", "");
        pgx_row.step("Unix socket: host=<dir> sslmode=disable, no certificate");
        let user = pgx_over(dir.path(), port).await;
        assert!(
            user.starts_with(&f.mount.prefix),
            "pgx over the socket: {user}"
        );
    }
    f.wait_all_revoked(Duration::from_secs(15)).await;
    assert!(
        dynamic_roles(&f.mount.prefix).await.is_empty(),
        "roles gone after the sessions"
    );

    let events = audit_events(&audit);
    let start = events
        .iter()
        .find(|e| e["event"] == "session_start" && e["lease_id"].is_string())
        .unwrap_or_else(|| panic!("a session_start with a lease: {events:?}"));
    assert_eq!(start["transport"], "unix", "{start}");
    assert_eq!(start["unix_uid"], 0, "{start}");
    assert_eq!(start["unix_gid"], 0, "{start}");
    assert_eq!(start["unix_user"], "root", "{start}");
    assert!(start["cert_serial"].is_null(), "no certificate: {start}");
    let ids = start["identities"].as_array().expect("identities");
    assert_eq!(ids[0], "unix:user=root", "{start}");
    let refusal = events
        .iter()
        .find(|e| e["event"] == "refused")
        .expect("the refusal is audited");
    assert_eq!(refusal["unix_uid"], 65534, "{refusal}");
    assert_eq!(refusal["sqlstate"], "28000", "{refusal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_mode_keeps_out_users_outside_its_group() {
    let dir = socket_dir();
    let (f, _) = start("unix-mode", dir.path(), None, &["unix:user=nobody"]).await;
    let path = socket_path(dir.path(), f.proxy.port);
    let meta = std::fs::metadata(&path).expect("the socket exists");
    assert_eq!(meta.mode() & 0o7777, 0o660, "default mode 0660");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (0, 0),
        "owned by leasegate's user and group"
    );
    let out = run(psql_as(
        Some(OUTSIDER),
        dir.path(),
        f.proxy.port,
        "select 1",
    ))
    .await;
    let (_, err) = text(&out);
    assert!(!out.status.success(), "nobody is outside the group: {err}");
    assert!(err.contains("Permission denied"), "{err}");
    // root passes the file mode but has no grant: FATAL 28000 naming it, read off the wire.
    let stream = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect as root");
    let mut wire = Wire::new(stream);
    let login = wire
        .startup(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")])
        .await
        .expect("startup");
    let error = login.messages.last().expect("an answer");
    assert_eq!(error.tag, b'E', "{:?}", login.messages);
    let fields = error.fields();
    assert_eq!(
        (fields[&'S'].as_str(), fields[&'C'].as_str()),
        ("FATAL", "28000")
    );
    assert_eq!(
        fields[&'M'],
        "local user \"unix:user=root\" (uid 0) has no grant (asked for role \"readonly\" on database \"myapp\")"
    );
    // nobody is granted, but the file mode stopped it before leasegate saw it; root was refused.
    f.assert_nothing_issued().await;
    let refused = wait_auth_failures(&f.proxy, "no_grant", 1.0).await;
    assert_eq!(refused, 1.0, "root only: nobody never reached leasegate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_request_on_the_socket_gets_n_and_the_session_runs_in_plaintext() {
    let dir = socket_dir();
    let (f, _) = start("unix-ssl", dir.path(), None, &["unix:uid=0"]).await;
    let stream = tokio::net::UnixStream::connect(socket_path(dir.path(), f.proxy.port))
        .await
        .expect("connect");
    let mut wire = Wire::new(stream);
    wire.send(&[0, 0, 0, 8, 4, 210, 22, 47])
        .await
        .expect("SSLRequest");
    let mut answer = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut wire.stream, &mut answer)
        .await
        .expect("answer");
    assert_eq!(&answer, b"N");
    let login = wire
        .startup(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")])
        .await
        .expect("startup");
    assert_eq!(
        login.messages.last().map(|m| m.tag),
        Some(b'Z'),
        "{:?}",
        login.messages
    );
    assert!(login.key.is_some(), "leasegate's BackendKeyData");
    drop(wire);
    f.wait_all_revoked(Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_over_the_socket_cancels_pg_sleep() {
    let dir = socket_dir();
    let (f, _) = start("unix-cancel", dir.path(), None, &["unix:user=root"]).await;
    let child = psql_as(None, dir.path(), f.proxy.port, "select pg_sleep(30)")
        .spawn()
        .expect("spawn psql");
    let pid = child.id().expect("psql pid");
    let prefix = f.mount.prefix.clone();
    crate::harness::pg::wait_one_active(&prefix, "pg_sleep").await;
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output())
        .await
        .expect("psql returns within 5 s of SIGINT")
        .expect("psql output");
    let (_, err) = text(&out);
    assert!(err.contains("57014"), "the query was cancelled: {err}");
    let m = f.proxy.metrics().await;
    let forwarded = value_or_zero(
        &m,
        "leasegate_cancel_requests_total",
        &[("result", "forwarded")],
    );
    assert_eq!(forwarded, 1.0, "the socket's CancelRequest was forwarded");
    f.wait_all_revoked(Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_group_grant_admits_members_from_the_group_database_only() {
    // A supplementary group of postgres (Debian: ssl-cert) from the group database, else its
    // primary group.
    let id = |flag: &str| {
        let out = std::process::Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("id");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let primary = id("-gn");
    let group = id("-Gn")
        .split_whitespace()
        .find(|g| *g != primary)
        .unwrap_or(&primary)
        .to_string();
    let grant = format!("unix:group={group}");
    let dir = socket_dir();
    let (f, audit) = start("unix-group", dir.path(), Some("0666"), &[&grant]).await;
    let sql = "select current_user";
    let out = run(psql_as(Some(OUTSIDER), dir.path(), f.proxy.port, sql)).await;
    let (_, err) = text(&out);
    assert!(
        err.contains("local user \"unix:user=nobody\" (uid 65534) has no grant"),
        "{err}"
    );
    f.assert_nothing_issued().await;
    let out = run(psql_as(Some("postgres"), dir.path(), f.proxy.port, sql)).await;
    let (stdout, err) = text(&out);
    assert!(out.status.success(), "postgres is in {group}: {err}");
    assert!(stdout.starts_with(&f.mount.prefix), "{stdout}");
    f.wait_all_revoked(Duration::from_secs(15)).await;
    let events = audit_events(&audit);
    let start = events
        .iter()
        .find(|e| e["event"] == "session_start" && e["lease_id"].is_string())
        .expect("the session is audited");
    assert_eq!(start["unix_user"], "postgres", "{start}");
    let ids: Vec<&str> = start["identities"]
        .as_array()
        .expect("identities")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(ids.contains(&grant.as_str()), "{ids:?}");
    assert!(
        ids.contains(&format!("unix:group={primary}").as_str()),
        "{ids:?}"
    );
}

/// A fixture on a fresh socket directory with `unix:user=root` granted `readonly`, and
/// `key = value` set: the fixture, the directory (removed when dropped) and the socket path.
async fn granted_root_on_socket(
    name: &str,
    key: &str,
    value: i64,
) -> (Fixture, tempfile::TempDir, std::path::PathBuf) {
    let dir = socket_dir();
    let dir_text = dir.path().display().to_string();
    let f = Fixture::start_edited(
        name,
        |cfg| cfg.grant("unix:user=root", &["myapp"], &["readonly"]),
        |t| {
            set(t, "listen.unix_socket_dir", dir_text);
            set(t, key, value);
        },
    )
    .await;
    let path = socket_path(dir.path(), f.proxy.port);
    (f, dir, path)
}

/// Logs in over the socket as `readonly` to `myapp`: the connection and what it answered.
async fn socket_login(path: &Path) -> (Wire<tokio::net::UnixStream>, Login) {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect");
    let mut wire = Wire::new(stream);
    let login = wire
        .startup(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")])
        .await
        .expect("startup");
    (wire, login)
}

/// [`socket_login`], which must reach ReadyForQuery.
async fn socket_session(path: &Path) -> Wire<tokio::net::UnixStream> {
    let (wire, login) = socket_login(path).await;
    assert_eq!(
        login.messages.last().map(|m| m.tag),
        Some(b'Z'),
        "{:?}",
        login.messages
    );
    wire
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_count_a_unix_session_under_the_unix_identity_it_matched() {
    let (f, _dir, path) =
        granted_root_on_socket("unix-limits", "limits.max_sessions_per_identity", 1).await;
    let first = socket_session(&path).await;
    let before = f.issued().await;
    let (_second, refused) = socket_login(&path).await;
    let error = refused.messages.last().expect("an answer");
    let fields = error.fields();
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("53300"),
        "{:?}",
        refused.messages
    );
    assert!(
        fields[&'M'].contains("\"unix:user=root\" (limit 1)"),
        "{}",
        fields[&'M']
    );
    let after = f.issued().await;
    assert_eq!(
        after.creds_requests, before.creds_requests,
        "the refusal made no Vault call"
    );
    drop(first);
    f.wait_all_revoked(Duration::from_secs(15)).await;
}

/// With the socket's one slot taken (`listen.max_connections = 1`), a client that sends its
/// StartupMessage waits unanswered; when it closes meanwhile it causes no Vault call, and the
/// freed slot goes to the next session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_client_that_leaves_while_it_waits_for_a_slot_asks_vault_for_nothing() {
    use crate::harness::security::creds_requests;
    use crate::harness::wire::startup_packet;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (f, _dir, path) = granted_root_on_socket("unix-full", "listen.max_connections", 1).await;
    let held = socket_session(&path).await;

    let asked = creds_requests(&f.proxy).await;
    let mut gone = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect while full");
    let startup = startup_packet(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")]);
    gone.write_all(&startup).await.expect("startup");
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_secs(1), gone.read(&mut buf))
            .await
            .is_err(),
        "waits for the slot, unanswered"
    );
    drop(gone);
    drop(held);
    let next = socket_session(&path).await;
    assert_eq!(
        creds_requests(&f.proxy).await,
        asked + 1.0,
        "only the session that stayed asked Vault"
    );
    drop(next);
    f.wait_all_revoked(Duration::from_secs(20)).await;
}
