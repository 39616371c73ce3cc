//! Sessions that succeed: psql and tokio-postgres run queries as a dynamic user, the
//! identity kinds of the contract are matched, and a session's role and lease exist exactly
//! as long as the session.

use std::time::{Duration, Instant};

use crate::harness::bao::leases;
use crate::harness::client::{conninfo, current_user, pg_connect, psql};
use crate::harness::dynamic_roles;
use crate::harness::fixture::{Fixture, wait_all_revoked};
use crate::harness::pki::Identity;

/// How quickly a finished session's role and lease must be gone.
const REVOKE_WITHIN: Duration = Duration::from_secs(2);

#[tokio::test]
async fn psql_and_tokio_postgres_run_queries_as_dynamic_user() {
    let f = Fixture::start("queries").await;

    let info = conninfo(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp");
    let out = psql(&info, "select current_user, 1+1").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "psql failed ({}): {stderr}",
        out.status
    );
    let (user, sum) = stdout
        .trim()
        .split_once('|')
        .unwrap_or_else(|| panic!("psql output {stdout:?} is `user|2`"));
    assert!(
        user.starts_with(&f.mount.prefix),
        "psql session user {user} has prefix {}",
        f.mount.prefix
    );
    assert_eq!(sum, "2");

    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("tokio-postgres connects through leasegate");
    let row = s
        .client
        .query_one("select current_user::text, 1+1", &[])
        .await
        .expect("query through leasegate");
    let user: String = row.get(0);
    assert!(
        user.starts_with(&f.mount.prefix),
        "tokio-postgres user {user}"
    );
    assert_eq!(row.get::<_, i32>(1), 2);
    // Extended protocol with parameters and several round trips also relays.
    for i in 0..20i32 {
        let row = s
            .client
            .query_one("select $1::int * 2", &[&i])
            .await
            .expect("parameterised query");
        assert_eq!(row.get::<_, i32>(0), i * 2);
    }
    drop(s);
    wait_all_revoked(&f.mount, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn dns_san_cn_and_glob_identities_are_granted() {
    let f = Fixture::start_with("identities", |cfg| {
        cfg.grant("dns:*.jobs.leasegate.test", &["myapp"], &["readonly"])
            .grant("cn:nightly-report", &["myapp"], &["readwrite"])
    })
    .await;
    let dns = f
        .pki
        .client("dns", Identity::Dns("billing.jobs.leasegate.test".into()));
    let cn = f.pki.client("cn", Identity::Cn("nightly-report".into()));

    for (cert, role, label) in [(&dns, "readonly", "dns SAN"), (&cn, "readwrite", "CN")] {
        let s = pg_connect(f.proxy.port, &f.pki, Some(cert), role, "myapp")
            .await
            .unwrap_or_else(|e| panic!("{label} client connects as {role}: {e:?}"));
        let row = s
            .client
            .query_one(
                "select current_user::text, pg_has_role(current_user, $1, 'member')",
                &[&format!("leasegate_{role}")],
            )
            .await
            .expect("query");
        let user: String = row.get(0);
        assert!(user.starts_with(&f.mount.prefix), "{label}: user {user}");
        assert!(
            row.get::<_, bool>(1),
            "{label}: {user} is in leasegate_{role}"
        );
    }
}

/// How a test ends its session.
enum Close {
    /// tokio-postgres sends Terminate and closes.
    Terminate,
    /// The client's socket is dropped without Terminate (driver task aborted).
    DropSocket,
}

async fn role_and_lease_live_exactly_as_long_as_the_session(name: &str, close: Close) {
    let f = Fixture::start(name).await;
    f.assert_nothing_issued().await;

    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("connect through leasegate");
    let user = current_user(&s).await;
    assert_eq!(dynamic_roles(&f.mount.prefix).await, vec![user.clone()]);
    let held = leases(&f.mount, "readonly").await;
    assert_eq!(
        held.len(),
        1,
        "one lease while the session is open: {held:?}"
    );

    let ended = Instant::now();
    let kept_client = match close {
        Close::Terminate => {
            drop(s.client);
            let _ = s.driver.await;
            None
        }
        Close::DropSocket => {
            s.driver.abort();
            let _ = s.driver.await;
            // The Client handle stays alive: only the socket went away.
            Some(s.client)
        }
    };
    wait_all_revoked(&f.mount, REVOKE_WITHIN).await;
    drop(kept_client);
    eprintln!(
        "{name}: role and lease gone {:?} after close",
        ended.elapsed()
    );
}

#[tokio::test]
async fn role_and_lease_removed_after_terminate() {
    role_and_lease_live_exactly_as_long_as_the_session("close-terminate", Close::Terminate).await;
}

#[tokio::test]
async fn role_and_lease_removed_after_client_drops_socket() {
    role_and_lease_live_exactly_as_long_as_the_session("close-drop", Close::DropSocket).await;
}
