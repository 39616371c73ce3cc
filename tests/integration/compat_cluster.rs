//! Cancel across replicas: two leasegate instances on loopback, each naming the other in
//! `[cluster]` (peer client certificate with DNS SAN `leasegate-peer`, clientAuth, from the test
//! CA; peers named 127.0.0.1, which their server certificate carries). A plaintext CancelRequest for a session on instance A sent to instance B cancels the
//! query (57014); a CancelRequest with a wrong secret is ignored by both.

use std::time::{Duration, Instant};

use crate::harness::bao::fresh_mount;
use crate::harness::client::tls_config;
use crate::harness::compat::CompatRow;
use crate::harness::fixture::{GOOD_URI, wait_all_revoked};
use crate::harness::free_port;
use crate::harness::pg::active_queries;
use crate::harness::pki::{Identity, Pki};
use crate::harness::poll_until;
use crate::harness::proxy::{Proxy, ProxyConfig, StartOptions, cluster_section};
use crate::harness::wire::{
    PROTOCOL_3_0, Tls, Wire, query_message, send_plain_cancel, tls_connect,
};

const PEER_IDENTITY: &str = "dns:leasegate-peer";

async fn wait_sleeping(prefix: &str, want: i64) {
    poll_until(
        Duration::from_secs(15),
        &format!("{want} pg_sleep backends"),
        || async move {
            match active_queries(prefix, "pg_sleep").await {
                n if n == want => Ok(()),
                n => Err(format!("{n} active pg_sleep backends")),
            }
        },
    )
    .await;
}

/// Reads the session's answer to a cancelled query: ErrorResponse 57014, then ReadyForQuery.
async fn expect_cancelled(w: &mut Wire<Tls>, within: Duration) {
    let msgs = w
        .recv_until_ready(within)
        .await
        .unwrap_or_else(|e| panic!("query not ended within {within:?}: {e}"));
    let err = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("ErrorResponse expected, got {msgs:?}"));
    assert_eq!(err.sqlstate().as_deref(), Some("57014"), "{msgs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_sent_to_a_peer_instance_cancels_the_query() {
    let mut row = CompatRow::new(
        "cluster-cancel",
        70,
        "CancelRequest across 2 leasegate replicas",
        "plaintext CancelRequest (protocol 3.0 key)",
    );
    let mount = fresh_mount("compat-cluster").await;
    let pki = Pki::new();
    let good = pki.client("good", Identity::Uri(GOOD_URI.into()));
    let peer = pki.client("leasegate-peer", Identity::Dns("leasegate-peer".into()));
    let cfg =
        ProxyConfig::new(&pki, &mount).grant(&format!("uri:{GOOD_URI}"), &["myapp"], &["readonly"]);
    let (port_a, port_b) = (free_port(), free_port());
    // Field by field: StartOptions is shared and may grow fields.
    #[allow(clippy::field_reassign_with_default)]
    let options = |port: u16, peer_port: u16| {
        let mut opts = StartOptions::default();
        opts.port = Some(port);
        opts.extra_toml = cluster_section(&[peer_port], PEER_IDENTITY, &peer, pki.ca_pem());
        opts
    };
    let a = Proxy::start_with_options(cfg.clone(), options(port_a, port_b)).await;
    let b = Proxy::start_with_options(cfg, options(port_b, port_a)).await;

    // A session on instance A, with its cancel key.
    let tls = tls_connect(a.port, tls_config(&pki, Some(&good)))
        .await
        .expect("TLS to instance A");
    let mut w = Wire::new(tls);
    let login = w
        .startup(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")])
        .await
        .expect("startup on A");
    let (pid, secret) = login
        .key
        .clone()
        .unwrap_or_else(|| panic!("BackendKeyData expected: {:?}", login.messages));

    row.step("wrong secret ignored by A and its peer");
    w.send(&query_message("select pg_sleep(20)"))
        .await
        .expect("send query");
    wait_sleeping(&mount.prefix, 1).await;
    let mut wrong = secret.clone();
    wrong[3] ^= 0x5a;
    send_plain_cancel(a.port, pid, &wrong)
        .await
        .expect("send wrong cancel to A");
    send_plain_cancel(b.port, pid, &wrong)
        .await
        .expect("send wrong cancel to B");
    // A negative observation needs a window: the forwards take milliseconds.
    let early = w
        .recv_within(Duration::from_millis(1500))
        .await
        .expect("session still open");
    assert!(early.is_none(), "query must keep running, got {early:?}");
    assert_eq!(
        active_queries(&mount.prefix, "pg_sleep").await,
        1,
        "still sleeping"
    );

    row.step("cancel via owning instance → 57014");
    let sent = Instant::now();
    send_plain_cancel(a.port, pid, &secret)
        .await
        .expect("cancel via A");
    expect_cancelled(&mut w, Duration::from_secs(5)).await;
    eprintln!("cancel via the owning instance took {:?}", sent.elapsed());

    row.step("cancel via peer instance → 57014 < 2 s");
    w.send(&query_message("select pg_sleep(20)"))
        .await
        .expect("send query");
    wait_sleeping(&mount.prefix, 1).await;
    let sent = Instant::now();
    send_plain_cancel(b.port, pid, &secret)
        .await
        .expect("cancel via B");
    expect_cancelled(&mut w, Duration::from_secs(5)).await;
    let took = sent.elapsed();
    eprintln!("cancel via the peer instance took {took:?}");
    assert!(
        took < Duration::from_secs(2),
        "cross-replica cancel took {took:?}"
    );

    row.phase("session usable after both cancels");
    assert_eq!(
        w.query_column("select 'still here'").await,
        vec![Some("still here".into())]
    );
    w.terminate().await;
    wait_all_revoked(&mount, Duration::from_secs(10)).await;
    let log_b = b.log_text();
    assert!(
        !log_b.contains("panicked"),
        "instance B log shows no panic:\n{log_b}"
    );
    drop(a);
    drop(b);
}
