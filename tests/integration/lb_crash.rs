//! A crashed replica leaks for one token period at most: each replica logs in with its own
//! periodic Vault token (a short period, renewed by leasegate's token upkeep), so when one is
//! SIGKILLed its token stops being renewed, dies at the end of its period, and Vault revokes
//! every lease it created (the database drops the roles), whatever the leases' TTL. The other
//! two replicas keep serving throughout.

use std::time::{Duration, Instant};

use crate::harness::bao::all_leases;
use crate::harness::client::tls_config;
use crate::harness::fixture::wait_all_revoked;
use crate::harness::fleet::{Fleet, FleetOptions};
use crate::harness::pg::dynamic_roles;
use crate::harness::wire::{PROTOCOL_3_0, Tls, Wire, tls_connect};

/// The replicas' token period.
const PERIOD: Duration = Duration::from_secs(10);
/// What the bound may exceed the period by: Vault's expiry sweep and revocations.
const MARGIN: Duration = Duration::from_secs(10);

/// A session through HAProxy: the wire, its replica (from the key) and its user name.
async fn session(fleet: &Fleet) -> (Wire<Tls>, usize, String) {
    let tls = tls_connect(fleet.lb.port, tls_config(&fleet.pki, Some(&fleet.good)))
        .await
        .expect("TLS through HAProxy");
    let mut w = Wire::new(tls);
    let login = w
        .startup(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")])
        .await
        .expect("startup");
    let (pid, _) = login.key.clone().expect("BackendKeyData");
    let user = w.query_column("select current_user").await;
    let user = user[0].clone().expect("current_user");
    (w, ((pid >> 24) & 0x7f) as usize, user)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkilled_replicas_leases_and_roles_die_with_its_periodic_token() {
    let options = FleetOptions {
        drain_delay: "0s",
        token_period: Some("10s"),
        cluster: true,
        ..FleetOptions::default()
    };
    let mut fleet = Fleet::start("lb-crash", options).await;
    // Outlive one period first: the upkeep renews the periodic tokens.
    tokio::time::sleep(PERIOD + Duration::from_secs(2)).await;
    let mut sessions = Vec::new();
    for _ in 0..6 {
        sessions.push(session(&fleet).await);
    }
    let doomed: Vec<String> = sessions
        .iter()
        .filter(|s| s.1 == 1)
        .map(|s| s.2.clone())
        .collect();
    assert!(!doomed.is_empty(), "replica 1 holds sessions");
    let survivors = sessions.len() - doomed.len();
    assert_eq!(all_leases(&fleet.mount).await.len(), sessions.len());

    let killed = Instant::now();
    fleet.replicas[1].proxy.as_mut().expect("replica 1").kill();
    fleet.replicas[1].proxy = None;
    // Until the leases are gone, the other two keep serving new sessions and old ones.
    let bound = loop {
        let roles = dynamic_roles(&fleet.mount.prefix).await;
        let leases = all_leases(&fleet.mount).await.len();
        if !roles.iter().any(|r| doomed.contains(r)) && leases == survivors {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < PERIOD + MARGIN,
            "after {:?}: roles {roles:?}, {leases} leases, want {survivors}",
            killed.elapsed()
        );
        let (mut w, replica, _) = session(&fleet).await;
        assert_ne!(replica, 1, "HAProxy sends nothing to the killed replica");
        assert_eq!(w.query_column("select 1").await, vec![Some("1".into())]);
        w.terminate().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eprintln!(
        "SIGKILLed replica: its {} leases and roles gone {bound:?} after the kill \
         (token period {PERIOD:?}; bound asserted {:?})",
        doomed.len(),
        PERIOD + MARGIN
    );
    for (w, replica, _) in &mut sessions {
        if *replica != 1 {
            assert_eq!(w.query_column("select 1").await, vec![Some("1".into())]);
        }
    }
    for (w, _, _) in sessions {
        w.terminate().await;
    }
    wait_all_revoked(&fleet.mount, Duration::from_secs(30)).await;
}
