//! The harness on its own, without leasegate: PostgreSQL and OpenBao start, a fresh mount
//! issues dynamic credentials that work, and revoking them drops the role. And its "nothing
//! issued" check can fail: a credential issued and revoked again does not pass it.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;

use crate::harness::fixture::{Fixture, Issued};
use crate::harness::{bao, dynamic_roles, env, fresh_mount, leases, poll_until};

#[tokio::test]
async fn harness_issues_and_revokes_dynamic_credentials() {
    let mount = fresh_mount("selftest").await;
    assert!(dynamic_roles(&mount.prefix).await.is_empty());
    assert!(leases(&mount, "readonly").await.is_empty());

    let creds = bao::read_creds(&mount, "readonly").await;
    assert!(
        creds.username.starts_with(&mount.prefix),
        "username {} has the mount prefix {}",
        creds.username,
        mount.prefix
    );
    assert_eq!(
        dynamic_roles(&mount.prefix).await,
        vec![creds.username.clone()]
    );
    assert_eq!(leases(&mount, "readonly").await.len(), 1);

    // The credentials log in to the cluster with SCRAM and get the group role's rights.
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(env().pg.port)
        .user(&creds.username)
        .password(&creds.password)
        .dbname("myapp")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("log in with the dynamic credentials");
    let driver = tokio::spawn(conn);
    let row = client
        .query_one(
            "select current_user::text, pg_has_role(current_user, 'leasegate_readonly', 'member')",
            &[],
        )
        .await
        .expect("query as dynamic user");
    assert_eq!(row.get::<_, String>(0), creds.username);
    assert!(
        row.get::<_, bool>(1),
        "dynamic role is in leasegate_readonly"
    );
    drop(client);
    let _ = driver.await;

    bao::revoke(&creds.lease_id).await;
    let prefix = mount.prefix.clone();
    poll_until(Duration::from_secs(10), "role dropped after revoke", || {
        let prefix = prefix.clone();
        async move {
            let roles = dynamic_roles(&prefix).await;
            if roles.is_empty() {
                Ok(())
            } else {
                Err(format!("{roles:?}"))
            }
        }
    })
    .await;
    assert!(leases(&mount, "readonly").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_issued_fails_for_a_credential_issued_and_revoked_again() {
    let f = Fixture::start("selftest-issued").await;
    f.assert_nothing_issued().await;
    let before = f.issued().await;
    f.assert_good_client_works().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    // Nothing is outstanding any more, but two credentials were issued meanwhile.
    f.assert_nothing_outstanding().await;
    assert_eq!(
        f.issued().await,
        Issued {
            leases: 2.0,
            creds_requests: 2.0
        }
    );
    for (what, check) in [
        ("since the start", f.assert_nothing_issued().boxed()),
        (
            "since the baseline",
            f.assert_nothing_issued_since(before).boxed(),
        ),
    ] {
        let outcome = AssertUnwindSafe(check).catch_unwind().await;
        let panic = outcome.expect_err(what);
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or_default();
        assert!(message.contains("counters moved"), "{what}: {message}");
    }
}
