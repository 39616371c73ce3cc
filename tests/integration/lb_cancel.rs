//! Cancels routed in one hop behind HAProxy: the replicas run as a `[cluster]` with ids 0, 1,
//! 2, each cancel key carries its replica's id, and a cancel that HAProxy hands to another
//! replica is forwarded to the owner alone (over mutual TLS), never broadcast. 20 running
//! `pg_sleep(30)` are cancelled, each on a new connection (half plaintext, half inside TLS),
//! within 1 s. With one replica down, cancels for the live replicas' sessions still work and
//! those for the stopped one's keys fail silently, as PostgreSQL's do.

use std::time::{Duration, Instant};

use crate::harness::client::tls_config;
use crate::harness::fixture::wait_all_revoked;
use crate::harness::fleet::{Fleet, FleetOptions};
use crate::harness::pg::active_queries;
use crate::harness::poll_until;
use crate::harness::proxy::check_config;
use crate::harness::security::{counter, wait_counter};
use crate::harness::wire::{
    PROTOCOL_3_0, Tls, TlsClose, Wire, peer_cancel_packet, query_message, send_plain_cancel,
    send_tls_cancel, send_tls_packet, tls_connect,
};

const CANCELS: &str = "leasegate_cancel_requests_total";
const PEER_FORWARDS: &str = "leasegate_cancel_peer_forwards_total";
const MISMATCHES: &str = "leasegate_cluster_id_mismatches_total";

/// One session through HAProxy running `pg_sleep(30)`: (wire, pid, secret).
async fn sleeper(fleet: &Fleet) -> (Wire<Tls>, i32, Vec<u8>) {
    let tls = tls_connect(fleet.lb.port, tls_config(&fleet.pki, Some(&fleet.good)))
        .await
        .expect("TLS through HAProxy");
    let mut w = Wire::new(tls);
    let login = w
        .startup(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")])
        .await
        .expect("startup");
    let (pid, secret) = login.key.clone().expect("BackendKeyData");
    w.send(&query_message("select pg_sleep(30)"))
        .await
        .expect("send query");
    (w, pid, secret)
}

/// The replica id in a key's pid (the top 7 bits).
fn replica_of(pid: i32) -> usize {
    ((pid >> 24) & 0x7f) as usize
}

async fn wait_sleeping(prefix: &str, n: i64) {
    poll_until(Duration::from_secs(20), "pg_sleep running", || async move {
        match active_queries(prefix, "pg_sleep").await {
            m if m == n => Ok(()),
            m => Err(format!("{m} of {n} pg_sleep backends active")),
        }
    })
    .await;
}

/// Sends the cancel for (`pid`, `secret`) through HAProxy: plaintext or inside TLS.
async fn cancel(fleet: &Fleet, pid: i32, secret: &[u8], tls: bool) {
    if tls {
        let config = tls_config(&fleet.pki, Some(&fleet.good));
        let closed = send_tls_cancel(fleet.lb.port, config, pid, secret)
            .await
            .expect("TLS cancel");
        assert_eq!(closed, TlsClose::CloseNotify, "a cancel is never answered");
    } else {
        send_plain_cancel(fleet.lb.port, pid, secret)
            .await
            .expect("plaintext cancel");
    }
}

/// Waits (≤ `within`) for the running query to end with 57014.
async fn cancelled(w: &mut Wire<Tls>, within: Duration) -> Result<(), String> {
    let msgs = w
        .recv_until_ready(within)
        .await
        .map_err(|e| format!("not cancelled: {e}"))?;
    match msgs.iter().find(|m| m.tag == b'E') {
        Some(e) if e.sqlstate().as_deref() == Some("57014") => Ok(()),
        other => Err(format!("want 57014, got {other:?} in {msgs:?}")),
    }
}

/// Sum of a counter over every running replica.
async fn total(fleet: &Fleet, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for r in fleet.replicas.iter().filter_map(|r| r.proxy.as_ref()) {
        sum += counter(r, name, labels).await;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancels_through_haproxy_reach_the_owning_replica_in_one_hop() {
    const N: usize = 20;
    let options = FleetOptions {
        drain_delay: "0s",
        cluster: true,
        ..FleetOptions::default()
    };
    let mut fleet = Fleet::start("lb-cancel", options).await;
    let mut sessions = Vec::new();
    for _ in 0..N {
        sessions.push(sleeper(&fleet).await);
    }
    let owners: Vec<usize> = sessions.iter().map(|s| replica_of(s.1)).collect();
    for id in 0..3 {
        assert!(
            owners.contains(&id),
            "roundrobin spreads sessions over every replica: {owners:?}"
        );
    }
    wait_sleeping(&fleet.mount.prefix, N as i64).await;

    let started = Instant::now();
    let keys: Vec<(i32, Vec<u8>)> = sessions.iter().map(|s| (s.1, s.2.clone())).collect();
    let sends = keys.iter().enumerate().map(|(i, (pid, secret))| {
        let fleet = &fleet;
        async move { cancel(fleet, *pid, secret, i % 2 == 1).await }
    });
    let ends = sessions
        .iter_mut()
        .map(|(w, _, _)| cancelled(w, Duration::from_secs(1)));
    let (_, ended) = tokio::join!(
        futures_util::future::join_all(sends),
        futures_util::future::join_all(ends)
    );
    let took = started.elapsed();
    let failed: Vec<&String> = ended.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "every query cancelled within 1 s: {failed:?}"
    );
    let to_peers = total(&fleet, CANCELS, &[("result", "to_peers")]).await;
    let sent = total(&fleet, PEER_FORWARDS, &[("result", "sent")]).await;
    let direct = total(&fleet, CANCELS, &[("result", "forwarded")]).await;
    eprintln!(
        "{N} cancels through HAProxy: all cancelled in {took:?}; {to_peers} forwarded to a \
         peer ({sent} peer sends), {direct} cancelled upstream"
    );
    assert!(
        to_peers > 0.0,
        "some cancels landed on another replica than the owner"
    );
    assert_eq!(
        sent, to_peers,
        "each forward went to exactly one peer: no broadcast"
    );
    assert_eq!(direct, N as f64, "each cancel reached upstream once");
    assert_eq!(total(&fleet, MISMATCHES, &[]).await, 0.0);

    // A peer's cancel for replica 2's key sent to replica 0 (a peers list mapping id 2 to the
    // wrong address): counted as a mismatch, looked up there only, never forwarded again.
    let zero = fleet.replicas[0].proxy();
    let sent_before = counter(zero, PEER_FORWARDS, &[("result", "sent")]).await;
    let as_peer = tls_config(&fleet.pki, Some(&fleet.peer));
    let packet = peer_cancel_packet((2 << 24) | 5, &[9, 9, 9, 9]);
    let closed = send_tls_packet(fleet.replicas[0].port, as_peer, &packet)
        .await
        .expect("PeerCancelRequest");
    assert_eq!(closed, TlsClose::CloseNotify);
    wait_counter(zero, MISMATCHES, &[], 1.0).await;
    wait_counter(zero, CANCELS, &[("result", "unknown_key")], 1.0).await;
    let sent_after = counter(zero, PEER_FORWARDS, &[("result", "sent")]).await;
    assert_eq!(
        sent_after, sent_before,
        "a forwarded cancel is never forwarded again"
    );
    assert!(
        zero.log_text()
            .contains("a peer forwarded a cancel for replica id 2")
    );

    // Replica 2 down: its keys lead nowhere, the others' still work.
    let stale: Vec<(i32, Vec<u8>)> = sessions
        .iter()
        .filter(|s| replica_of(s.1) == 2)
        .map(|s| (s.1, s.2.clone()))
        .collect();
    for (w, _, _) in sessions.drain(..) {
        w.terminate().await;
    }
    fleet.stop(2, Duration::from_secs(30)).await;
    fleet
        .lb
        .wait_status("leasegate-2", "DOWN", Duration::from_secs(10))
        .await;
    let mut live = Vec::new();
    for _ in 0..6 {
        live.push(sleeper(&fleet).await);
    }
    wait_sleeping(&fleet.mount.prefix, 6).await;
    let failed_before = total(&fleet, PEER_FORWARDS, &[("result", "failed")]).await;
    for (pid, secret) in &stale {
        cancel(&fleet, *pid, secret, false).await;
    }
    for (i, (w, pid, secret)) in live.iter_mut().enumerate() {
        cancel(&fleet, *pid, secret, i % 2 == 0).await;
        cancelled(w, Duration::from_secs(1))
            .await
            .unwrap_or_else(|e| panic!("a live replica's session: {e}"));
    }
    let failed_after = total(&fleet, PEER_FORWARDS, &[("result", "failed")]).await;
    assert!(
        failed_after - failed_before >= 1.0,
        "the stopped replica's keys were forwarded to it and failed silently"
    );
    for (w, _, _) in live {
        w.terminate().await;
    }
    wait_all_revoked(&fleet.mount, Duration::from_secs(30)).await;
}

#[test]
fn check_config_refuses_a_replica_id_given_twice() {
    let pki = crate::harness::pki::Pki::new();
    let peer = pki.client(
        "leasegate-peer",
        crate::harness::pki::Identity::Dns("leasegate-peer".into()),
    );
    let base = crate::cli::good_toml(&pki);
    let cluster = |peers: &[(usize, u16)]| {
        let section = crate::harness::fleet::cluster_with_ids(0, peers, &peer, &pki);
        format!("{base}\n{section}")
    };
    let ok = check_config(&cluster(&[(1, 7001), (2, 7002)]));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let dup = check_config(&cluster(&[(1, 7001), (1, 7002)]));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&dup.stdout),
        String::from_utf8_lossy(&dup.stderr)
    );
    assert!(!dup.status.success(), "{said}");
    assert!(
        said.contains("cluster.peers: id 1 is given twice (again for \"127.0.0.1:7002\")"),
        "{said}"
    );
}
