//! The OpenBao server itself failing behind leasegate: sealed and unsealed, a dev server
//! restarted empty (its leases forgotten), and not up yet when leasegate starts. New sessions
//! get 08006 at once, never a wait; open sessions go on; `/readyz` says 503 meanwhile; once
//! OpenBao serves again leasegate does too, and the revocations it could not make are made
//! (or, for leases the server forgot, finish instead of retrying forever).

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::faults_vault::{attempt, wait_no_revocation_pending, wait_readyz};
use crate::harness::bao::{Mount, OwnBao, Target};
use crate::harness::fixture::{Fixture, wait_all_revoked_on};
use crate::harness::pg::{Pg, dynamic_roles};
use crate::harness::pki::Pki;
use crate::harness::security::{assert_fatal, counter};
use crate::harness::{env, poll_until};

/// Sets `mount` up on `bao` (a server that lost it) as `Target::fresh_mount` did.
async fn configure_mount(bao: &Target, pg: &Pg, mount: &Mount) {
    bao.write(
        Method::POST,
        &format!("sys/mounts/{}", mount.name),
        &json!({"type": "database"}),
    )
    .await;
    let config = devenv::contract::connection_config(&pg.conn(), &mount.prefix);
    bao.write(Method::POST, &format!("{}/config/pg", mount.name), &config)
        .await;
    for role in devenv::contract::ROLES {
        bao.set_role_ttl(mount, role, "5m", "1h").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_openbao_restarted_empty_blocks_nothing_and_serves_once_set_up_again() {
    let mut own = OwnBao::dev().await;
    let pg = &env().pg;
    let mount = own.target.fresh_mount(pg, "bao-dev-restart").await;
    let addr = own.target.addr.clone();
    let f = Fixture::with_mount(
        mount,
        Pki::new(),
        |mut cfg| {
            cfg.vault_address = addr;
            cfg.vault_timeout = Some("2s".into());
            cfg
        },
        |_| {},
    )
    .await;
    let mut open = f.raw_session("readonly").await;
    let lost = open.query_column("select current_user").await[0]
        .clone()
        .expect("current_user");

    own.restart().await;
    // The open session does not need Vault; when it ends, its lease is unknown to the server.
    assert_eq!(open.query_column("select 1").await, vec![Some("1".into())]);
    open.terminate().await;
    // The mount is gone: 08006 at once, not a wait behind the revocation.
    let asked = Instant::now();
    let answer = attempt(&f).await;
    assert_fatal(&answer, "08006", &["could not obtain credentials"]);
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    let (ok, error) = wait_no_revocation_pending(&f.proxy, Duration::from_secs(30)).await;
    eprintln!("bao-dev-restart: revocations ok {ok}, error {error}");
    assert_eq!(ok + error, 1.0, "the lost lease's revocation finished");

    // Set up again, the server serves at once.
    configure_mount(&own.target, pg, &f.mount).await;
    f.assert_good_client_works().await;
    poll_until(Duration::from_secs(10), "the new lease revoked", || async {
        let leases = own.target.all_leases(&f.mount).await;
        let roles = dynamic_roles(&f.mount.prefix).await;
        if leases.is_empty() && roles == [lost.clone()] {
            Ok(())
        } else {
            Err(format!("leases {leases:?}, roles {roles:?}"))
        }
    })
    .await;
    // The role of the lease the restart lost stays (its VALID UNTIL ends its logins); only
    // the database's superuser can drop it now.
    env()
        .pg
        .superuser()
        .await
        .batch_execute(&format!("drop role \"{lost}\""))
        .await
        .expect("drop the lost role");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_openbao_refuses_new_sessions_fast_and_catches_up_once_unsealed() {
    let mut own = OwnBao::persistent().await;
    let pg = &env().pg;
    let mount = own.target.fresh_mount(pg, "bao-sealed").await;
    let f = Fixture::on_own_bao(&own.target, mount, "2s", |_| {}).await;
    let mut open = f.raw_session("readonly").await;
    let closing = f.raw_session("readonly").await;

    own.seal().await;
    // Open sessions go on; a new one gets 08006 at once; /readyz turns 503.
    assert_eq!(open.query_column("select 1").await, vec![Some("1".into())]);
    let asked = Instant::now();
    let answer = attempt(&f).await;
    assert_fatal(
        &answer,
        "08006",
        &["could not obtain credentials", "HTTP 503"],
    );
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    wait_readyz(&f.proxy, 503, Duration::from_secs(25)).await;
    // Closed while sealed (late in the outage, so that the unseal comes within the
    // revocation's retries).
    closing.terminate().await;
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(10),
        "revocation refused while sealed",
        || async move {
            let refused = counter(
                proxy,
                "leasegate_vault_requests_total",
                &[("op", "revoke"), ("status", "5xx")],
            )
            .await;
            if refused >= 1.0 {
                Ok(())
            } else {
                Err(format!("{refused} refused revoke calls"))
            }
        },
    )
    .await;

    own.unseal().await;
    wait_readyz(&f.proxy, 200, Duration::from_secs(25)).await;
    let (ok, error) = wait_no_revocation_pending(&f.proxy, Duration::from_secs(30)).await;
    assert_eq!(
        (ok, error),
        (1.0, 0.0),
        "the revocation went through once unsealed"
    );
    assert_eq!(open.query_column("select 1").await, vec![Some("1".into())]);
    open.terminate().await;
    wait_all_revoked_on(&own.target, pg, &f.mount, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leasegate_started_before_openbao_serves_once_openbao_is_up() {
    let mut own = OwnBao::persistent().await;
    let pg = &env().pg;
    let mount = own.target.fresh_mount(pg, "bao-late").await;
    own.kill();
    // Started while OpenBao is down (a deploy where leasegate comes up first).
    let f = Fixture::on_own_bao(&own.target, mount, "2s", |_| {}).await;
    assert_eq!(f.proxy.get("/readyz").await.map(|(s, _)| s), Ok(503));
    let answer = attempt(&f).await;
    assert_fatal(&answer, "08006", &["could not obtain credentials"]);

    own.restart().await;
    let back = Instant::now();
    wait_readyz(&f.proxy, 200, Duration::from_secs(40)).await;
    eprintln!(
        "bao-late: ready {:?} after OpenBao was back",
        back.elapsed()
    );
    f.assert_good_client_works().await;
    wait_all_revoked_on(&own.target, pg, &f.mount, Duration::from_secs(15)).await;
}
