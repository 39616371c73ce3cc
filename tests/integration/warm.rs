//! Warm sessions (`warm = { readonly = N }`): each client gets an upstream session logged in
//! ahead of demand with a lease of its own, never one another client had; hits and misses
//! show in the metrics, the audit line says `"warm":true`, a burst beyond the warm count is
//! served by the cold path, and shutdown closes and revokes every waiting one.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::harness::fixture::Fixture;
use crate::harness::metrics::value_or_zero;
use crate::harness::pg::dynamic_roles;
use crate::harness::poll_until;
use crate::harness::proxy::{Proxy, set};

/// A fixture whose `readonly` role keeps `n` warm sessions (per startup-parameter set).
pub async fn start_warm(name: &str, n: i64) -> Fixture {
    Fixture::start_edited(
        name,
        |mut cfg| {
            // Two cores shared with other tests: correctness, not login latency.
            cfg.databases[0].connect_timeout = Some("30s".into());
            cfg
        },
        |t| {
            let mut warm = toml::Table::new();
            warm.insert("readonly".into(), n.into());
            set(t, "databases.0.warm", warm);
            set(t, "limits.burst_per_identity", 1_000);
        },
    )
    .await
}

/// `leasegate_warm_ready{database="myapp",role="readonly"}` now.
pub async fn warm_ready(proxy: &Proxy) -> f64 {
    let m = proxy.metrics().await;
    let labels = [("database", "myapp"), ("role", "readonly")];
    value_or_zero(&m, "leasegate_warm_ready", &labels)
}

/// Polls until `n` warm sessions wait for myapp/readonly.
pub async fn wait_warm_ready(proxy: &Proxy, n: f64) {
    poll_until(
        Duration::from_secs(60),
        &format!("{n} warm sessions ready"),
        || async move {
            match warm_ready(proxy).await {
                r if r == n => Ok(()),
                r => Err(format!("leasegate_warm_ready {r}")),
            }
        },
    )
    .await;
}

/// `leasegate_warm_sessions_total{result}` now.
pub async fn warm_count(proxy: &Proxy, result: &str) -> f64 {
    let m = proxy.metrics().await;
    value_or_zero(&m, "leasegate_warm_sessions_total", &[("result", result)])
}

/// One raw session (no startup settings: the empty set) that reads its `current_user` and
/// terminates; returns the user.
async fn one_session(f: &Fixture) -> String {
    let mut wire = f.raw_session("readonly").await;
    let user = wire.query_column("select current_user::text").await;
    wire.terminate().await;
    user.into_iter().flatten().next().expect("a current_user")
}

/// Stops leasegate (SIGTERM), expects exit status 0, and polls until every lease of the
/// mount is revoked and every role dropped.
pub async fn shut_down_and_check_revoked(f: &mut Fixture) {
    let status = f.proxy.terminate(Duration::from_secs(60));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "leasegate exits 0 after its drain"
    );
    f.wait_all_revoked(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sequential_sessions_get_fifty_distinct_users_and_all_are_revoked() {
    let mut f = start_warm("warm-fifty", 4).await;
    wait_warm_ready(&f.proxy, 4.0).await;
    let started = Instant::now();
    let mut users = BTreeSet::new();
    for i in 0..50 {
        let user = one_session(&f).await;
        assert!(
            user.starts_with(&f.mount.prefix),
            "session {i}: user {user} is a dynamic role of this mount"
        );
        assert!(users.insert(user.clone()), "session {i} reused user {user}");
    }
    let (hits, misses) = (
        warm_count(&f.proxy, "hit").await,
        warm_count(&f.proxy, "miss").await,
    );
    eprintln!(
        "warm-fifty: 50 sessions in {:?}: {hits} hits, {misses} misses",
        started.elapsed()
    );
    assert_eq!(hits + misses, 50.0, "every session was a hit or a miss");
    assert!(hits >= 4.0, "at least the four ready ones were handed out");
    let log = f.proxy.log_text();
    let warm_starts = log
        .lines()
        .filter(|l| l.contains(r#""event":"session_start""#) && l.contains(r#""warm":true"#))
        .count();
    assert_eq!(
        warm_starts as f64, hits,
        "audit says which sessions were warm"
    );

    // The sessions' roles are gone; the warm ones still wait, logged in.
    wait_warm_ready(&f.proxy, 4.0).await;
    let prefix = f.mount.prefix.clone();
    let users_ref = &users;
    poll_until(
        Duration::from_secs(30),
        "the 50 sessions' roles dropped",
        || {
            let prefix = prefix.clone();
            async move {
                let left: Vec<String> = dynamic_roles(&prefix)
                    .await
                    .into_iter()
                    .filter(|r| users_ref.contains(r))
                    .collect();
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("still there: {left:?}"))
                }
            }
        },
    )
    .await;
    let waiting = dynamic_roles(&f.mount.prefix).await;
    assert_eq!(
        waiting.len(),
        4,
        "one role per waiting warm session: {waiting:?}"
    );
    // Shutdown closes the waiting ones and revokes their leases too.
    shut_down_and_check_revoked(&mut f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_four_times_the_warm_count_is_served_without_error() {
    const WARM: i64 = 3;
    const BURST: usize = 4 * WARM as usize;
    let mut f = start_warm("warm-burst", WARM).await;
    wait_warm_ready(&f.proxy, WARM as f64).await;
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for _ in 0..BURST {
        let config = crate::harness::client::tls_config(&f.pki, Some(&f.good));
        let port = f.proxy.port;
        tasks.spawn(async move {
            let stream = crate::harness::wire::tls_connect(port, config)
                .await
                .expect("TLS connection to leasegate");
            let mut wire = crate::harness::wire::Wire::new(stream);
            let login = wire
                .startup(
                    crate::harness::wire::PROTOCOL_3_0,
                    &[("user", "readonly"), ("database", "myapp")],
                )
                .await
                .expect("startup");
            assert_eq!(
                login.messages.last().map(|m| m.tag),
                Some(b'Z'),
                "{:?}",
                login.messages
            );
            let user = wire.query_column("select current_user::text").await;
            wire.terminate().await;
            user.into_iter().flatten().next().expect("a current_user")
        });
    }
    let mut users = BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        users.insert(joined.expect("burst session"));
    }
    let (hits, misses) = (
        warm_count(&f.proxy, "hit").await,
        warm_count(&f.proxy, "miss").await,
    );
    eprintln!(
        "warm-burst: {BURST} concurrent sessions in {:?}: {hits} hits, {misses} misses",
        started.elapsed()
    );
    assert_eq!(users.len(), BURST, "distinct users: {users:?}");
    assert_eq!(hits + misses, BURST as f64);
    assert!(hits >= 1.0, "warm sessions were used");
    let errors = value_or_zero(
        &f.proxy.metrics().await,
        "leasegate_sessions_total",
        &[("outcome", "error")],
    );
    assert_eq!(errors, 0.0, "no session failed");
    shut_down_and_check_revoked(&mut f).await;
}

/// Polls until the mount's dynamic roles are exactly one, other than every one in `not`;
/// returns it.
async fn wait_one_role_besides(f: &Fixture, not: &[String]) -> String {
    let prefix = f.mount.prefix.clone();
    poll_until(Duration::from_secs(30), "one new warm session role", || {
        let prefix = prefix.clone();
        async move {
            let roles = dynamic_roles(&prefix).await;
            match roles.as_slice() {
                [one] if !not.contains(one) => Ok(()),
                _ => Err(format!("roles {roles:?}, not {not:?}")),
            }
        }
    })
    .await;
    dynamic_roles(&f.mount.prefix).await.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_entry_replaces_the_warm_sessions() {
    use crate::harness::ops::{edit_config, reload};
    let mut f = start_warm("warm-reload", 1).await;
    wait_warm_ready(&f.proxy, 1.0).await;
    let first = wait_one_role_besides(&f, &[]).await;
    // The same entry again: the waiting session stays.
    reload(&f.proxy, "configuration reloaded").await;
    // A changed entry: the waiting session is closed and revoked, a new one logs in.
    edit_config(&f.proxy, |t| set(t, "databases.0.connect_timeout", "29s"));
    reload(&f.proxy, "configuration reloaded").await;
    let second = wait_one_role_besides(&f, std::slice::from_ref(&first)).await;
    wait_warm_ready(&f.proxy, 1.0).await;
    let user = one_session(&f).await;
    assert_eq!(
        user, second,
        "the client got the session logged in for the new entry"
    );
    shut_down_and_check_revoked(&mut f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_sessions_nobody_uses_are_revoked_after_warm_max_idle() {
    let f = Fixture::start_edited(
        "warm-idle",
        |cfg| cfg,
        |t| {
            let mut warm = toml::Table::new();
            warm.insert("readonly".into(), 2i64.into());
            set(t, "databases.0.warm", warm);
            set(t, "databases.0.warm_max_idle", "3s");
        },
    )
    .await;
    wait_warm_ready(&f.proxy, 2.0).await;
    // Nobody asks for the set: after warm_max_idle the sessions are closed and revoked, and
    // none replaces them.
    f.wait_all_revoked(Duration::from_secs(30)).await;
    assert_eq!(warm_ready(&f.proxy).await, 0.0);
    // The next client takes the cold path and makes the set wanted again.
    let user = one_session(&f).await;
    assert!(user.starts_with(&f.mount.prefix));
    assert_eq!(warm_count(&f.proxy, "miss").await, 1.0);
    wait_warm_ready(&f.proxy, 2.0).await;
}
