//! What an unauthenticated CancelRequest may cost. Cancels need no certificate, so leasegate
//! bounds them: `[limits] cancels_per_second_per_address`, `cancels_per_second` and
//! `max_concurrent_cancels`. Over a limit a cancel is dropped unanswered (as PostgreSQL drops
//! cancels it cannot act on) and counted in `leasegate_cancel_requests_total{result}`; a
//! legitimate cancel from elsewhere still works.

use std::net::IpAddr;
use std::time::Duration;

use crate::harness::client::tls_config;
use crate::harness::fixture::Fixture;
use crate::harness::pg::active_queries;
use crate::harness::pki::Identity;
use crate::harness::poll_until;
use crate::harness::proxy::{ProcessOptions, cluster_section, merge_toml, set};
use crate::harness::security::{FakePeer, counter, fixture_edited, wait_counter};
use crate::harness::wire::{
    PROTOCOL_3_0, Tls, Wire, query_message, send_plain_cancel_from, tls_connect,
};

const CANCELS: &str = "leasegate_cancel_requests_total";
const LOOPBACK: [u8; 4] = [127, 0, 0, 1];

/// A session of the good client running `pg_sleep(30)`, with its cancel key.
pub async fn sleeping_session(f: &Fixture) -> (Wire<Tls>, i32, Vec<u8>) {
    let tls = tls_connect(f.proxy.port, tls_config(&f.pki, Some(&f.good)))
        .await
        .expect("TLS to leasegate");
    let mut w = Wire::new(tls);
    let login = w
        .startup(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")])
        .await
        .expect("startup");
    let (pid, secret) = login
        .key
        .clone()
        .unwrap_or_else(|| panic!("BackendKeyData expected: {:?}", login.messages));
    w.send(&query_message("select pg_sleep(30)"))
        .await
        .expect("send query");
    let prefix = f.mount.prefix.clone();
    crate::harness::pg::wait_one_active(&prefix, "pg_sleep").await;
    (w, pid, secret)
}

/// The running query ends with ErrorResponse 57014 and the session is usable again.
pub async fn expect_cancelled(w: &mut Wire<Tls>) {
    let msgs = w
        .recv_until_ready(Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("query not cancelled within 5 s: {e}"));
    let err = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("ErrorResponse expected, got {msgs:?}"));
    assert_eq!(err.sqlstate().as_deref(), Some("57014"), "{msgs:?}");
    assert_eq!(
        w.query_column("select 'alive'").await,
        vec![Some("alive".into())]
    );
}

/// The query is still running (a negative observation needs a window).
pub async fn expect_still_running(w: &mut Wire<Tls>, prefix: &str) {
    let early = w
        .recv_within(Duration::from_millis(1000))
        .await
        .expect("session still open");
    assert!(
        early.is_none(),
        "the query must keep running, got {early:?}"
    );
    assert_eq!(
        active_queries(prefix, "pg_sleep").await,
        1,
        "still sleeping"
    );
}

fn wrong(secret: &[u8]) -> Vec<u8> {
    let mut wrong = secret.to_vec();
    wrong[0] ^= 0x5a;
    wrong
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_burst_from_one_address_is_dropped_while_another_address_still_cancels() {
    const BURST: usize = 30;
    let f = Fixture::start_edited(
        "sec-cancel-rate",
        |cfg| cfg,
        |t| {
            set(t, "limits.cancels_per_second_per_address", 2i64);
            set(t, "limits.cancels_per_second", 1000i64);
        },
    )
    .await;
    let (mut w, pid, secret) = sleeping_session(&f).await;
    let noisy = IpAddr::from(LOOPBACK);
    for _ in 0..BURST {
        let answer = send_plain_cancel_from(noisy, f.proxy.port, pid, &wrong(&secret))
            .await
            .expect("send cancel");
        assert!(answer.is_empty(), "a cancel is never answered: {answer:?}");
    }
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(5),
        "every cancel counted",
        || async move {
            let limited = counter(proxy, CANCELS, &[("result", "rate_limited")]).await;
            let unknown = counter(proxy, CANCELS, &[("result", "unknown_key")]).await;
            if limited + unknown == BURST as f64 {
                Ok(())
            } else {
                Err(format!("rate_limited {limited}, unknown_key {unknown}"))
            }
        },
    )
    .await;
    let limited = counter(proxy, CANCELS, &[("result", "rate_limited")]).await;
    // 2 per second with a burst of 2: a burst that takes well under 2 s gets 2 to 5 through.
    assert!(
        limited >= (BURST - 5) as f64,
        "rate_limited {limited} of {BURST}"
    );
    expect_still_running(&mut w, &f.mount.prefix).await;

    // Another address has its own budget: its (legitimate) cancel goes through.
    let answer = send_plain_cancel_from(IpAddr::from([127, 0, 0, 2]), f.proxy.port, pid, &secret)
        .await
        .expect("send cancel from 127.0.0.2");
    assert!(answer.is_empty(), "a cancel is never answered: {answer:?}");
    expect_cancelled(&mut w).await;
    wait_counter(proxy, CANCELS, &[("result", "forwarded")], 1.0).await;
    w.terminate().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_flood_against_a_hanging_peer_holds_at_max_concurrent_cancels() {
    const FLOOD: usize = 20;
    const CAP: usize = 3;
    let hanging = FakePeer::start(true).await;
    let hanging_port = hanging.port;
    let f = fixture_edited(
        "sec-cancel-cap",
        |cfg| cfg,
        ProcessOptions::default(),
        |t, pki| {
            set(t, "limits.max_concurrent_cancels", CAP as i64);
            set(t, "limits.cancels_per_second_per_address", 1000i64);
            set(t, "limits.cancels_per_second", 1000i64);
            let peer = pki.client("leasegate-peer", Identity::Dns("leasegate-peer".into()));
            let section =
                cluster_section(&[hanging_port], "dns:leasegate-peer", &peer, pki.ca_pem());
            merge_toml(t, &section);
        },
    )
    .await;
    let (mut w, pid, secret) = sleeping_session(&f).await;

    // Unknown keys, all at once: each admitted one is forwarded to the peer, which hangs
    // until the forward's 2 s timeout; the others find no free slot and are dropped.
    let port = f.proxy.port;
    let flood: Vec<_> = (0..FLOOD)
        .map(|i| {
            tokio::spawn(async move {
                send_plain_cancel_from(IpAddr::from(LOOPBACK), port, 1_000_000 + i as i32, &[9; 4])
                    .await
            })
        })
        .collect();
    for task in flood {
        let answer = task.await.expect("cancel task").expect("send cancel");
        assert!(answer.is_empty(), "a cancel is never answered: {answer:?}");
    }
    let proxy = &f.proxy;
    let over = wait_counter(
        proxy,
        CANCELS,
        &[("result", "over_capacity")],
        (FLOOD - CAP) as f64,
    )
    .await;
    let to_peers = counter(proxy, CANCELS, &[("result", "to_peers")]).await;
    assert_eq!(
        (over, to_peers),
        ((FLOOD - CAP) as f64, CAP as f64),
        "over_capacity, to_peers"
    );
    assert_eq!(hanging.accepted(), CAP, "connections the hanging peer saw");
    let failed = counter(
        proxy,
        "leasegate_cancel_peer_forwards_total",
        &[("result", "failed")],
    );
    assert_eq!(
        failed.await,
        CAP as f64,
        "each forward to the hanging peer timed out"
    );

    // The slots are free again: a legitimate cancel works, and so does a new session.
    expect_still_running(&mut w, &f.mount.prefix).await;
    let answer = send_plain_cancel_from(IpAddr::from(LOOPBACK), port, pid, &secret)
        .await
        .expect("send cancel");
    assert!(answer.is_empty());
    expect_cancelled(&mut w).await;
    assert_eq!(
        hanging.accepted(),
        CAP,
        "a known key is not forwarded to peers"
    );
    w.terminate().await;
    f.assert_good_client_works().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}
