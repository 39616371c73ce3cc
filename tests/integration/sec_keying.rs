//! What leasegate counts and pools is keyed by what it checked: the per-identity limits by
//! the identity the grant matched (not whatever name a certificate puts first), and
//! prefetched credentials by the mount, server and database they were issued for (a reload
//! that changes them revokes what waits and never hands it to a session).

use std::time::Duration;

use rcgen::SanType;

use crate::harness::bao::all_leases;
use crate::harness::client::{current_user, pg_connect};
use crate::harness::fixture::{Fixture, wait_all_revoked};
use crate::harness::pki::Identity;
use crate::harness::proxy::{Proxy, set};
use crate::harness::security::{assert_fatal, counter, creds_requests, tls_startup};
use crate::harness::{fresh_mount, poll_until};

const SHARED_URI: &str = "spiffe://leasegate.test/app/shared";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_limits_count_the_identity_the_grant_matched() {
    let f = Fixture::start_edited(
        "sec-key-limit",
        |cfg| cfg.grant(&format!("uri:{SHARED_URI}"), &["myapp"], &["readonly"]),
        |config| set(config, "limits.max_sessions_per_identity", 1i64),
    )
    .await;
    // Two certificates whose first URI SAN differs (and matches no grant), both carrying the
    // granted identity second: one identity, one limit.
    let cert = |name: &str| {
        f.pki.client_with(
            name,
            Identity::Uri(format!("spiffe://leasegate.test/random/{name}")),
            |params| {
                params
                    .subject_alt_names
                    .push(SanType::URI(SHARED_URI.try_into().expect("uri")));
            },
        )
    };
    let (a, b) = (cert("a"), cert("b"));
    let held = pg_connect(f.proxy.port, &f.pki, Some(&a), "readonly", "myapp")
        .await
        .expect("first session of the shared identity");
    assert!(current_user(&held).await.starts_with(&f.mount.prefix));
    let before = creds_requests(&f.proxy).await;
    let answer = tls_startup(f.proxy.port, &f.pki, Some(&b), "readonly", "myapp").await;
    assert_fatal(
        &answer,
        "53300",
        &[&format!("\"uri:{SHARED_URI}\""), "limit 1"],
    );
    assert_eq!(creds_requests(&f.proxy).await, before, "no Vault call");
    // Another identity is not affected. One session only: with a limit of 1, a second one
    // right after the first can still find the first's count held while it closes.
    let good = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("another identity's session");
    assert!(current_user(&good).await.starts_with(&f.mount.prefix));
    drop(good.client);
    let _ = good.driver.await;
    drop(held.client);
    let _ = held.driver.await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

/// Polls until leasegate holds `n` prefetched credentials for myapp/readonly.
async fn wait_prefetched(proxy: &Proxy, n: f64) {
    poll_until(
        Duration::from_secs(15),
        &format!("{n} prefetched credentials"),
        || async move {
            let ready = counter(
                proxy,
                "leasegate_prefetch_ready",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_that_changes_the_mount_revokes_prefetched_credentials() {
    let f = Fixture::start_edited(
        "sec-key-pre-a",
        |cfg| cfg,
        |config| {
            let mut pools = toml::Table::new();
            pools.insert("readonly".into(), 1i64.into());
            set(config, "databases.0.prefetch", pools);
        },
    )
    .await;
    wait_prefetched(&f.proxy, 1.0).await;
    assert_eq!(
        all_leases(&f.mount).await.len(),
        1,
        "one lease waits on mount A"
    );

    // The operator moves the database entry to another mount (another Vault role set).
    let other = fresh_mount("sec-key-pre-b").await;
    let path = f.proxy.dir().join("leasegate.toml");
    let text = std::fs::read_to_string(&path).expect("read config");
    let moved = text.replace(
        &format!("mount = \"{}\"", f.mount.name),
        &format!("mount = \"{}\"", other.name),
    );
    assert_ne!(moved, text, "the config names the mount");
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, moved).expect("write config");
    std::fs::rename(&tmp, &path).expect("replace config");
    f.proxy.signal("HUP");

    // What waited for mount A is revoked; the pool refills from mount B.
    wait_all_revoked(&f.mount, Duration::from_secs(15)).await;
    poll_until(
        Duration::from_secs(15),
        "a credential prefetched from mount B",
        || async {
            match all_leases(&other).await.len() {
                1 => Ok(()),
                n => Err(format!("{n} leases on mount B")),
            }
        },
    )
    .await;
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("session after the reload");
    let user = current_user(&s).await;
    assert!(
        user.starts_with(&other.prefix),
        "the session's user {user} comes from mount B ({}), not A ({})",
        other.prefix,
        f.mount.prefix
    );
    drop(s.client);
    let _ = s.driver.await;
}
