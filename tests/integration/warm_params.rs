//! Warm sessions behave as a cold login would: the client's startup parameters take effect as
//! if sent at startup (`SHOW`, ParameterStatus, `RESET ALL` back to them), compared with a
//! direct login to PostgreSQL with the same parameters; a cancel reaches the warm backend;
//! after a PostgreSQL restart under idle warm sessions, no client gets a dead one.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::harness::bao::Target;
use crate::harness::client::{pg_connect, tls_config};
use crate::harness::env;
use crate::harness::fixture::{Fixture, wait_all_revoked_on};
use crate::harness::pg::Cluster;
use crate::harness::pki::Pki;
use crate::harness::poll_until;
use crate::harness::proxy::set;
use crate::harness::wire::{PROTOCOL_3_0, Wire, tls_connect};
use crate::warm::{start_warm, wait_warm_ready, warm_count};

const APP: &str = "warm-params-app";
const ZONE: &str = "Asia/Tokyo";
const PATH: &str = "warm_schema,public";
/// What `SHOW` is asked for, before and after `SET`s and `RESET ALL`.
const SHOWN: [&str; 4] = [
    "application_name",
    "TimeZone",
    "search_path",
    "client_encoding",
];

/// The values of [`SHOWN`] now, after changing them, and after `RESET ALL`.
type Shown = Vec<Vec<String>>;

async fn show_all(mut query: impl AsyncFnMut(&str) -> String) -> Shown {
    let mut rounds = Vec::new();
    for step in [
        "",
        "set TimeZone = 'UTC'; set search_path = other; set application_name = x",
        "reset all",
    ] {
        if !step.is_empty() {
            query(step).await;
        }
        let mut round = Vec::new();
        for name in SHOWN {
            round.push(query(&format!("show {name}")).await);
        }
        rounds.push(round);
    }
    rounds
}

/// A raw session through leasegate with the test's startup parameters: its ParameterStatus
/// values, what `SHOW` says, and its user.
async fn through_leasegate(f: &Fixture) -> (BTreeMap<String, String>, Shown, String) {
    let config = tls_config(&f.pki, Some(&f.good));
    let stream = tls_connect(f.proxy.port, config)
        .await
        .expect("TLS to leasegate");
    let mut wire = Wire::new(stream);
    let options = format!("-c search_path={PATH}");
    let login = wire
        .startup(
            PROTOCOL_3_0,
            &[
                ("user", "readonly"),
                ("database", "myapp"),
                ("application_name", APP),
                ("TimeZone", ZONE),
                ("client_encoding", "UTF8"),
                ("options", &options),
            ],
        )
        .await
        .expect("startup through leasegate");
    assert_eq!(
        login.messages.last().map(|m| m.tag),
        Some(b'Z'),
        "{:?}",
        login.messages
    );
    let user = wire.query_column("select current_user::text").await;
    let user = user.into_iter().flatten().next().expect("current_user");
    let shown = show_all(async |sql: &str| {
        let col = wire.query_column(sql).await;
        col.into_iter().flatten().next().unwrap_or_default()
    })
    .await;
    wire.terminate().await;
    (login.parameters, shown, user)
}

/// The same parameters on a direct login to PostgreSQL.
async fn direct() -> Shown {
    let pg = &env().pg;
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(pg.port)
        .user("postgres")
        .password(&pg.password)
        .dbname("myapp")
        .application_name(APP)
        .options(format!("-c TimeZone={ZONE} -c search_path={PATH}"))
        .connect(tokio_postgres::NoTls)
        .await
        .expect("direct login");
    let driver = tokio::spawn(conn);
    let client = &client;
    let shown = show_all(async |sql: &str| {
        let rows = client.simple_query(sql).await.expect("direct query");
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap_or_default()
    })
    .await;
    driver.abort();
    shown
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_take_effect_on_a_warm_hit_as_on_the_cold_path() {
    let f = start_warm("warm-params", 1).await;
    wait_warm_ready(&f.proxy, 1.0).await;
    // The first client with these parameters: no warm session for its set, the cold path.
    let (cold_params, cold, cold_user) = through_leasegate(&f).await;
    assert_eq!(warm_count(&f.proxy, "miss").await, 1.0);
    assert_eq!(warm_count(&f.proxy, "hit").await, 0.0);
    // Its set is kept warm from now on: the next such client gets a warm session.
    wait_warm_ready(&f.proxy, 2.0).await;
    let (warm_params, warm, warm_user) = through_leasegate(&f).await;
    assert_eq!(warm_count(&f.proxy, "hit").await, 1.0);
    assert_ne!(cold_user, warm_user, "each session has its own user");

    let want = direct().await;
    eprintln!("warm-params: direct {want:?}");
    assert_eq!(
        want[0],
        [APP, ZONE, PATH, "UTF8"],
        "the direct login's own values"
    );
    assert_eq!(want[2], want[0], "RESET ALL returns to the startup values");
    assert_eq!(cold, want, "the cold path as a direct login");
    assert_eq!(warm, want, "a warm hit as a direct login");
    for (params, user) in [(&cold_params, &cold_user), (&warm_params, &warm_user)] {
        assert_eq!(
            params.get("application_name").map(String::as_str),
            Some(APP)
        );
        assert_eq!(params.get("TimeZone").map(String::as_str), Some(ZONE));
        assert_eq!(params.get("session_authorization"), Some(user));
    }
    let without_user = |p: &BTreeMap<String, String>| {
        let mut p = p.clone();
        p.remove("session_authorization");
        p
    };
    assert_eq!(without_user(&cold_params), without_user(&warm_params));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_a_warm_session_cancels_its_query() {
    let f = start_warm("warm-cancel", 1).await;
    // tokio-postgres sends client_encoding: its first session misses and makes the set warm.
    let first = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("first session");
    drop(first.client);
    let _ = first.driver.await;
    wait_warm_ready(&f.proxy, 2.0).await;
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("warm session");
    assert_eq!(warm_count(&f.proxy, "hit").await, 1.0, "a warm hit");
    let token = s.client.cancel_token();
    let client = s.client;
    let query =
        tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await.map(drop) });
    let prefix = f.mount.prefix.clone();
    crate::harness::pg::wait_one_active(&prefix, "pg_sleep").await;
    token
        .cancel_query(s.tls.clone())
        .await
        .expect("send CancelRequest");
    let result = tokio::time::timeout(Duration::from_secs(5), query)
        .await
        .expect("cancelled within 5 s")
        .expect("query task");
    let err = result.expect_err("the query is cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_postgres_restart_under_idle_warm_sessions_no_client_gets_a_dead_one() {
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("cluster task")
        .unwrap_or_else(|e| panic!("dedicated cluster: {e}"));
    let pg = cluster.pg.clone();
    let bao = Target::shared();
    let mount = bao.fresh_mount(&pg, "warm-restart").await;
    let mut f = Fixture::with_mount(
        mount,
        Pki::new(),
        |mut cfg| {
            cfg.databases[0].port = pg.port;
            cfg.databases[0].connect_timeout = Some("30s".into());
            cfg
        },
        |t| {
            let mut warm = toml::Table::new();
            warm.insert("readonly".into(), 2i64.into());
            set(t, "databases.0.warm", warm);
        },
    )
    .await;
    wait_warm_ready(&f.proxy, 2.0).await;
    let mut cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        cluster.restart_fast().map(|()| cluster)
    })
    .await
    .expect("restart task")
    .unwrap_or_else(|e| panic!("restart: {e}"));
    // Right after the restart: every client works (the dead warm sessions are never handed
    // out). Raw sessions send no settings: the empty set, the one kept warm.
    for i in 0..4 {
        let mut wire = f.raw_session("readonly").await;
        let user = wire.query_column("select current_user::text").await;
        let user = user.into_iter().flatten().next().unwrap_or_default();
        assert!(user.starts_with(&f.mount.prefix), "session {i}: {user}");
        wire.terminate().await;
    }
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(10),
        "both dead warm sessions found",
        || async move {
            match warm_count(proxy, "gone").await {
                n if n >= 2.0 => Ok(()),
                n => Err(format!("gone {n}")),
            }
        },
    )
    .await;
    eprintln!(
        "warm-restart: hits {}, misses {}, gone {}",
        warm_count(&f.proxy, "hit").await,
        warm_count(&f.proxy, "miss").await,
        warm_count(&f.proxy, "gone").await
    );
    let status = f.proxy.terminate(Duration::from_secs(60));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    wait_all_revoked_on(&bao, &pg, &f.mount, Duration::from_secs(40)).await;
    drop(f);
    tokio::task::spawn_blocking(move || cluster.stop_fast(Duration::from_secs(10)))
        .await
        .expect("stop task")
        .expect("stop the dedicated cluster");
}
