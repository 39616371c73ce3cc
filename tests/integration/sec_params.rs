//! Startup parameters: only allow-listed settings reach the upstream. PostgreSQL lets any role
//! set backend-start settings from the startup packet (`post_auth_delay` makes the backend
//! log in, then sleep holding a connection slot, invisible in `pg_stat_activity`), so
//! leasegate refuses every other parameter, and every `options` switch but `-c name=value` /
//! `--name=value` for an allowed name, with FATAL 42501 naming it: after the grant check,
//! before the limits and before any Vault call, so nothing is issued and no backend starts.
//! Allowed settings reach the upstream (`current_setting`; real clients in
//! `sec_params_clients`); `allow_startup_parameters` adds names per database;
//! `replication` is read as PostgreSQL reads a boolean; non-UTF-8 parameters get 08P01.

use std::time::Duration;

use crate::harness::client::tls_config;
use crate::harness::env;
use crate::harness::fixture::Fixture;
use crate::harness::pg::backend_titles;
use crate::harness::pki::{ClientCert, Identity};
use crate::harness::poll_until;
use crate::harness::proxy::{ProxyConfig, check_config, set};
use crate::harness::security::{creds_requests, startup_bytes, wait_auth_failures};
use crate::harness::wire::{Msg, PROTOCOL_3_0, Tls, Wire, startup_packet, tls_connect};

/// Sends `packet` with `cert` and returns the FATAL error's SQLSTATE and message; asserts that
/// leasegate closes the connection afterwards.
async fn refusal(f: &Fixture, cert: &ClientCert, packet: &[u8]) -> (String, String) {
    let tls = tls_connect(f.proxy.port, tls_config(&f.pki, Some(cert)))
        .await
        .expect("TLS to leasegate");
    let mut wire = Wire::new(tls);
    wire.send(packet).await.expect("send the startup packet");
    let msg = tokio::time::timeout(Duration::from_secs(10), wire.recv())
        .await
        .expect("an answer within 10 s")
        .expect("an ErrorResponse");
    let fields = msg.fields();
    assert_eq!(msg.tag, b'E', "{msg:?}");
    assert_eq!(
        fields.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{msg:?}"
    );
    assert!(
        wire.closed_within(Duration::from_secs(5)).await.is_ok(),
        "connection closed after the refusal"
    );
    let get = |k| fields.get(&k).cloned().unwrap_or_default();
    (get('C'), get('M'))
}

/// A startup as `readonly` on `myapp` with `extra` parameters.
fn packet(extra: &[(&str, &str)]) -> Vec<u8> {
    let mut params = vec![("user", "readonly"), ("database", "myapp")];
    params.extend_from_slice(extra);
    startup_packet(PROTOCOL_3_0, &params)
}

/// A logged-in raw session as `readonly` with `extra` parameters; panics unless it logs in.
async fn session(f: &Fixture, extra: &[(&str, &str)]) -> (Wire<Tls>, Vec<Msg>) {
    let tls = tls_connect(f.proxy.port, tls_config(&f.pki, Some(&f.good)))
        .await
        .expect("TLS to leasegate");
    let mut wire = Wire::new(tls);
    wire.send(&packet(extra)).await.expect("send startup");
    let messages = wire
        .recv_until_ready(Duration::from_secs(30))
        .await
        .expect("login answer");
    assert_eq!(
        messages.last().map(|m| m.tag),
        Some(b'Z'),
        "login with {extra:?} should succeed: {messages:?}"
    );
    (wire, messages)
}

/// `current_setting` of each name through a raw session, in order.
async fn settings(wire: &mut Wire<Tls>, names: &[&str]) -> Vec<String> {
    let list: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    let sql = format!(
        "select current_setting(n) from unnest(array[{}]) with ordinality as t(n, i) order by i",
        list.join(", ")
    );
    wire.query_column(&sql)
        .await
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect()
}

/// Asserts no backend of this test's mount is running or starting upstream.
#[track_caller]
pub fn assert_no_backend(f: &Fixture) {
    let titles = backend_titles(&env().pg, &f.mount.prefix);
    assert!(
        titles.is_empty(),
        "backends of {}: {titles:?}",
        f.mount.prefix
    );
}

/// Refused startup parameters: name, value, SQLSTATE, and what the message must say.
const REFUSED: &[(&str, &str, &str, &str)] = &[
    (
        "post_auth_delay",
        "2000",
        "42501",
        "startup parameter \"post_auth_delay\" is not allowed",
    ),
    ("POST_AUTH_DELAY", "2000", "42501", "\"POST_AUTH_DELAY\""),
    (
        "options",
        "-c post_auth_delay=2000",
        "42501",
        "setting \"post_auth_delay\" in startup",
    ),
    (
        "options",
        "-cpost_auth_delay=2000",
        "42501",
        "\"post_auth_delay\"",
    ),
    ("options", "-W 2", "42501", "\"-W\" (sets post_auth_delay)"),
    (
        "options",
        "--post-auth-delay=2",
        "42501",
        "\"post_auth_delay\"",
    ),
    (
        "options",
        "-c Post-Auth-Delay=2",
        "42501",
        "\"Post_Auth_Delay\"",
    ),
    (
        "options",
        r"-c statement_timeout=1\ x -B 1",
        "42501",
        "\"-B\" (sets shared_buffers)",
    ),
    ("work_mem", "1GB", "42501", "\"work_mem\""),
    ("myapp.tenant", "42", "42501", "\"myapp.tenant\""),
    ("Options", "-c statement_timeout=1", "42501", "\"Options\""),
    (
        "ignore_system_indexes",
        "on",
        "42501",
        "\"ignore_system_indexes\"",
    ),
    (
        "options",
        "-c statement_timeout",
        "42601",
        "-c \"statement_timeout\" in startup",
    ),
    (
        "options",
        "-c lock_timeout=1 myapp",
        "42601",
        "invalid command-line argument \"myapp\"",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_startup_parameters_are_refused_before_vault() {
    // A bucket of two sessions that barely refills: refusals must not take from it.
    let f = Fixture::start_edited(
        "sec-params-refused",
        |cfg| cfg,
        |t| {
            set(t, "limits.burst_per_identity", toml::Value::Integer(2));
            set(
                t,
                "limits.new_sessions_per_second_per_identity",
                toml::Value::Float(0.01),
            );
        },
    )
    .await;
    for (name, value, code, needle) in REFUSED {
        let (got, message) = refusal(&f, &f.good, &packet(&[(name, value)])).await;
        eprintln!("{name}={value:?}: {got} {message}");
        assert_eq!(&got, code, "{name}={value:?}: {message}");
        assert!(message.contains(needle), "{message:?} contains {needle:?}");
    }
    // Not UTF-8: 08P01 naming the parameter, value or `options`.
    for (name, value) in [
        (&b"application_name"[..], &b"caf\xe9"[..]),
        (b"options", b"-c search_path=\xff"),
    ] {
        let raw = startup_bytes(&[
            (b"user", b"readonly"),
            (b"database", b"myapp"),
            (name, value),
        ]);
        let (got, message) = refusal(&f, &f.good, &raw).await;
        let name = String::from_utf8_lossy(name);
        assert_eq!(got, "08P01", "{message}");
        assert!(
            message.contains(&format!("parameter \"{name}\" is not valid UTF-8")),
            "{message}"
        );
    }
    // A client without a grant hears that first.
    let stranger = f.pki.client(
        "stranger",
        Identity::Uri("spiffe://leasegate.test/app/stranger".into()),
    );
    let (got, message) = refusal(&f, &stranger, &packet(&[("post_auth_delay", "2000")])).await;
    assert_eq!(got, "28000", "{message}");
    // The attack of the issue: a burst of post_auth_delay logins from one identity.
    let burst = (0..50).map(|i| {
        let f = &f;
        async move {
            let options = format!("-c post_auth_delay={}", 100 + i);
            refusal(f, &f.good, &packet(&[("options", &options)])).await
        }
    });
    for (code, message) in futures_util::future::join_all(burst).await {
        assert_eq!(code, "42501", "{message}");
    }
    let refused = (REFUSED.len() + 2 + 50) as f64;
    wait_auth_failures(&f.proxy, "bad_startup", refused).await;
    assert_eq!(creds_requests(&f.proxy).await, 0.0, "nothing reached Vault");
    f.assert_nothing_issued().await;
    assert_no_backend(&f);
    // Two sessions: the bucket of two was not touched by the refusals.
    f.assert_good_client_works().await;
    f.wait_all_revoked(Duration::from_secs(15)).await;
    assert_no_backend(&f);
}

/// The check `assert_no_backend` relies on sees what `pg_stat_activity` does not: a backend
/// sleeping in `post_auth_delay` after a direct login (no leasegate involved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_titles_show_a_backend_sleeping_in_post_auth_delay() {
    let pg = &env().pg;
    let role = format!("lgdelay{}", crate::harness::next_id());
    let admin = pg.superuser().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'delay-pw'; GRANT CONNECT ON DATABASE myapp TO {role}"
        ))
        .await
        .expect("create role");
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(pg.port)
        .user(&role)
        .password("delay-pw")
        .dbname("myapp")
        .options("-c post_auth_delay=3")
        .connect_timeout(Duration::from_secs(15));
    let login = tokio::spawn(async move { cfg.connect(tokio_postgres::NoTls).await.map(drop) });
    let role_ref = &role;
    poll_until(
        Duration::from_secs(10),
        "a sleeping startup backend",
        || async move {
            let titles = backend_titles(pg, role_ref);
            if titles.iter().any(|t| t.ends_with("startup")) {
                Ok(())
            } else {
                Err(format!("{titles:?}"))
            }
        },
    )
    .await;
    let listed: i64 = admin
        .query_one(
            "select count(*) from pg_stat_activity where usename = $1",
            &[&role],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    assert_eq!(listed, 0, "a starting backend is not in pg_stat_activity");
    tokio::time::timeout(Duration::from_secs(15), login)
        .await
        .expect("login finishes after the delay")
        .expect("login task")
        .expect("direct login");
    poll_until(Duration::from_secs(10), "the backend gone", || async {
        let titles = backend_titles(pg, &role);
        if titles.is_empty() {
            Ok(())
        } else {
            Err(format!("{titles:?}"))
        }
    })
    .await;
    admin
        .batch_execute(&format!(
            "REVOKE CONNECT ON DATABASE myapp FROM {role}; DROP ROLE {role}"
        ))
        .await
        .expect("drop role");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_startup_parameters_reach_the_upstream() {
    let f = Fixture::start("sec-params-allowed").await;
    let options = r"-c statement_timeout=1234 -c search_path=a\,\ b --lock-timeout=4321 -c DATESTYLE=SQL,DMY -cextra_float_digits=1 --idle-in-transaction-session-timeout=5678";
    let (mut w, login) = session(
        &f,
        &[
            ("options", options),
            ("application_name", "raw-params"),
            ("timezone", "Asia/Tokyo"),
            ("IntervalStyle", "iso_8601"),
            ("client_encoding", "UTF8"),
            ("standard_conforming_strings", "on"),
            ("bytea_output", "escape"),
            ("default_transaction_isolation", "repeatable read"),
            ("default_transaction_read_only", "on"),
            ("idle_session_timeout", "600000"),
            ("geqo", "off"),
            ("replication", "FALSE"),
        ],
    )
    .await;
    let names = [
        "statement_timeout",
        "search_path",
        "lock_timeout",
        "DateStyle",
        "extra_float_digits",
        "idle_in_transaction_session_timeout",
        "application_name",
        "TimeZone",
        "IntervalStyle",
        "client_encoding",
        "standard_conforming_strings",
        "bytea_output",
        "default_transaction_isolation",
        "default_transaction_read_only",
        "idle_session_timeout",
        "geqo",
    ];
    let want = [
        "1234ms",
        "a, b",
        "4321ms",
        "SQL, DMY",
        "1",
        "5678ms",
        "raw-params",
        "Asia/Tokyo",
        "iso_8601",
        "UTF8",
        "on",
        "escape",
        "repeatable read",
        "on",
        "10min",
        "off",
    ];
    assert_eq!(settings(&mut w, &names).await, want);
    let status: Vec<(String, String)> = login.iter().filter_map(Msg::parameter_status).collect();
    for (k, v) in [
        ("application_name", "raw-params"),
        ("DateStyle", "SQL, DMY"),
        ("TimeZone", "Asia/Tokyo"),
    ] {
        assert!(
            status.contains(&(k.into(), v.into())),
            "ParameterStatus {k}={v}: {status:?}"
        );
    }
    w.terminate().await;

    // A startup parameter wins over the same setting in `options`, as upstream applies them.
    let (mut w, _) = session(
        &f,
        &[
            ("options", "-c statement_timeout=1"),
            ("statement_timeout", "2s"),
        ],
    )
    .await;
    assert_eq!(settings(&mut w, &["statement_timeout"]).await, ["2s"]);
    w.terminate().await;

    // fallback_application_name names the session unless application_name does.
    let (mut w, _) = session(&f, &[("fallback_application_name", "fallback-app")]).await;
    assert_eq!(
        settings(&mut w, &["application_name"]).await,
        ["fallback-app"]
    );
    w.terminate().await;
    let (mut w, _) = session(
        &f,
        &[
            ("fallback_application_name", "fallback-app"),
            ("application_name", "given"),
        ],
    )
    .await;
    assert_eq!(settings(&mut w, &["application_name"]).await, ["given"]);
    w.terminate().await;

    // Every spelling PostgreSQL reads as false is an ordinary session.
    for off in ["off", "n", "0", "of", "No", "f"] {
        let (w, _) = session(&f, &[("replication", off)]).await;
        w.terminate().await;
    }
    let creds_before = creds_requests(&f.proxy).await;
    for (mode, code) in [
        ("on", "0A000"),
        ("database", "0A000"),
        ("TRUE", "0A000"),
        ("maybe", "22023"),
        ("DATABASE", "22023"),
        ("", "22023"),
    ] {
        let (got, message) = refusal(&f, &f.good, &packet(&[("replication", mode)])).await;
        assert_eq!(got, code, "replication={mode:?}: {message}");
        assert!(message.contains("replication"), "{message}");
    }
    assert_eq!(
        creds_requests(&f.proxy).await,
        creds_before,
        "no Vault call for a refusal"
    );
    f.wait_all_revoked(Duration::from_secs(15)).await;
    assert_no_backend(&f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_add_startup_parameters_per_database() {
    let extra = toml::Value::Array(vec!["myapp.tenant".into(), "work_mem".into()]);
    let f = Fixture::start_edited(
        "sec-params-extra",
        |cfg| cfg,
        |t| set(t, "databases.0.allow_startup_parameters", extra),
    )
    .await;
    let (mut w, _) = session(
        &f,
        &[("myapp.tenant", "42"), ("options", "-c WORK_MEM=8MB")],
    )
    .await;
    assert_eq!(
        settings(&mut w, &["myapp.tenant", "work_mem"]).await,
        ["42", "8MB"]
    );
    w.terminate().await;
    // Names outside both lists are still refused.
    let (code, message) = refusal(&f, &f.good, &packet(&[("myapp.other", "1")])).await;
    assert_eq!(code, "42501", "{message}");
    // check-config refuses names that are not settings, or are leasegate's own.
    let cfg = ProxyConfig::new(&f.pki, &f.mount);
    let text = cfg.to_toml(1, 2, &f.proxy.token_file()).replacen(
        "roles = ",
        "allow_startup_parameters = [\"options\", \"post_auth_delay\", \"a b\", \"ok.name\"]\nroles = ",
        1,
    );
    let out = check_config(&text);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for bad in ["\"options\"", "\"post_auth_delay\"", "\"a b\""] {
        assert!(
            stderr.contains(&format!("allow_startup_parameters: {bad}")),
            "{stderr}"
        );
    }
    assert!(!stderr.contains("ok.name"), "{stderr}");
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
