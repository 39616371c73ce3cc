//! Credentials kept ahead of demand when their leases die outside leasegate: an operator
//! revokes every lease of the mount (`sys/leases/revoke-prefix`, what an incident runbook
//! does), so OpenBao drops the roles of the prefetched credentials and ends the warm
//! backends. The next clients must still get a working session, never a credential whose
//! role is gone, and the pools fill again.

use std::time::Duration;

use crate::harness::bao::Target;
use crate::harness::client::{Raw, Transport, raw_startup, tls_config};
use crate::harness::fixture::Fixture;
use crate::harness::pg::dynamic_roles;
use crate::harness::poll_until;
use crate::harness::proxy::{Proxy, set};
use crate::harness::security::counter;

/// Polls until `metric{database="myapp",role="readonly"}` is `n`.
async fn wait_ready(proxy: &Proxy, metric: &str, n: f64) {
    poll_until(
        Duration::from_secs(20),
        &format!("{metric} = {n}"),
        || async move {
            let ready = counter(
                proxy,
                metric,
                &[("database", "myapp"), ("role", "readonly")],
            )
            .await;
            if ready == n {
                Ok(())
            } else {
                Err(format!("{ready} ready"))
            }
        },
    )
    .await;
}

/// Pools of `kind` (`prefetch` or `warm`) of `n` for readonly on myapp.
async fn with_pool(name: &str, kind: &'static str, n: i64) -> Fixture {
    Fixture::start_edited(
        name,
        |cfg| cfg,
        move |config| {
            let mut pools = toml::Table::new();
            pools.insert("readonly".into(), n.into());
            set(config, &format!("databases.0.{kind}"), pools);
        },
    )
    .await
}

/// Every one of `n` clients in a row logs in.
async fn clients_log_in(f: &Fixture, n: usize) {
    for i in 0..n {
        let answer = raw_startup(
            f.proxy.port,
            Transport::Tls(tls_config(&f.pki, Some(&f.good))),
            "readonly",
            "myapp",
        )
        .await;
        assert!(matches!(answer, Raw::Ready), "client {i}: {answer:?}");
    }
}

async fn pool_after_revoke_prefix(name: &str, kind: &'static str, metric: &str) {
    let f = with_pool(name, kind, 2).await;
    wait_ready(&f.proxy, metric, 2.0).await;
    assert_eq!(dynamic_roles(&f.mount.prefix).await.len(), 2);
    Target::shared().revoke_mount_leases(&f.mount).await;
    assert!(
        dynamic_roles(&f.mount.prefix).await.is_empty(),
        "OpenBao dropped the pooled roles"
    );
    clients_log_in(&f, 3).await;
    wait_ready(&f.proxy, metric, 2.0).await;
    clients_log_in(&f, 2).await;
    if kind == "prefetch" {
        // One client met a dead credential and was given a fresh one instead; the other dead
        // one was discarded with the pool, never handed out.
        let refused = counter(
            &f.proxy,
            "leasegate_upstream_errors_total",
            &[("database", "myapp"), ("kind", "rejected")],
        )
        .await;
        assert_eq!(refused, 1.0, "one dead credential met upstream");
        let log = f.proxy.log_text();
        assert!(
            log.contains("the upstream refused a prefetched credential"),
            "the discard is logged"
        );
    }
    let sessions_failed = counter(
        &f.proxy,
        "leasegate_sessions_total",
        &[("outcome", "error")],
    )
    .await;
    assert_eq!(sessions_failed, 0.0, "no session failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_credentials_revoked_by_an_operator_are_never_handed_out() {
    pool_after_revoke_prefix(
        "pool-prefetch-revoked",
        "prefetch",
        "leasegate_prefetch_ready",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_sessions_revoked_by_an_operator_are_never_handed_out() {
    pool_after_revoke_prefix("pool-warm-revoked", "warm", "leasegate_warm_ready").await;
}
