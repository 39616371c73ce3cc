//! Many sessions at once: each gets its own dynamic role, and all of them are cleaned up.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::harness::bao::leases;
use crate::harness::client::{current_user, pg_connect};
use crate::harness::dynamic_roles;
use crate::harness::fixture::Fixture;

const SESSIONS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_sessions_get_distinct_users_and_are_all_revoked() {
    // Upstream logins share two cores with other tests; this test is about correctness
    // under concurrency, not login latency, so the upstream deadline is generous.
    let f = Fixture::start_with("concurrency", |mut cfg| {
        cfg.databases[0].connect_timeout = Some("30s".into());
        cfg
    })
    .await;

    let started = std::time::Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..SESSIONS {
        let (port, pki, cert) = (f.proxy.port, f.pki.clone(), f.good.clone());
        tasks.spawn(async move {
            let s = pg_connect(port, &pki, Some(&cert), "readonly", "myapp")
                .await
                .unwrap_or_else(|e| panic!("session {i} connects: {e:?}"));
            let user = current_user(&s).await;
            (user, s)
        });
    }
    let mut sessions = Vec::new();
    let mut users = BTreeSet::new();
    let all = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(joined) = tasks.join_next().await {
            let (user, s) = joined.expect("session task");
            users.insert(user);
            sessions.push(s);
        }
    });
    all.await.expect("50 sessions open within 90 s");
    eprintln!("{SESSIONS} sessions open after {:?}", started.elapsed());

    assert_eq!(users.len(), SESSIONS, "distinct session users: {users:?}");
    for u in &users {
        assert!(
            u.starts_with(&f.mount.prefix),
            "user {u} has the mount prefix"
        );
    }
    // While all are open: one role and one lease per session.
    let roles: BTreeSet<String> = dynamic_roles(&f.mount.prefix).await.into_iter().collect();
    assert_eq!(roles, users, "pg_roles holds exactly the session users");
    assert_eq!(leases(&f.mount, "readonly").await.len(), SESSIONS);

    for s in sessions {
        drop(s.client);
        let _ = s.driver.await;
    }
    f.wait_all_revoked(Duration::from_secs(30)).await;
}
