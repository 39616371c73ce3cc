//! `[cluster]` cannot be turned into a cancel amplifier or a loop. The configuration is refused
//! at load (and by `check-config`) when this instance's cluster certificate would not be
//! accepted by its peers (identity not matching `peer_identity`, not chaining to
//! `listen.client_ca` for clientAuth) or `ca_cert` is missing. A cancel is forwarded to a peer
//! only when the peer's server certificate names the host given in `peers`. A peer forwards a
//! client's cancel as a PeerCancelRequest, which is accepted only from a certificate matching
//! `peer_identity`, only looked up locally, and never forwarded again.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use crate::cli::good_toml;
use crate::harness::client::tls_config;
use crate::harness::fixture::GOOD_URI;
use crate::harness::free_port;
use crate::harness::pki::{ClientCert, Identity, Pki};
use crate::harness::proxy::{
    ProcessOptions, Proxy, ProxyConfig, StartOptions, check_config, cluster_section,
    cluster_section_hosts, merge_toml, refused_start, set,
};
use crate::harness::root;
use crate::harness::security::{FakePeer, counter, fixture_edited, wait_counter};
use crate::harness::wire::{TlsClose, peer_cancel_packet, send_plain_cancel_from, send_tls_packet};
use crate::sec_cancel::{expect_cancelled, expect_still_running, sleeping_session};

const PEER_IDENTITY: &str = "dns:leasegate-peer";
const CANCELS: &str = "leasegate_cancel_requests_total";
const PEER_FORWARDS: &str = "leasegate_cancel_peer_forwards_total";
const LOOPBACK: [u8; 4] = [127, 0, 0, 1];

fn peer_cert(pki: &Pki) -> ClientCert {
    pki.client("leasegate-peer", Identity::Dns("leasegate-peer".into()))
}

/// The offline test config plus a `[cluster]` with `cert`; without `ca_cert` when `ca` is None.
fn with_cluster(pki: &Pki, cert: &ClientCert, ca: Option<&Path>) -> String {
    let section = cluster_section(&[6433], PEER_IDENTITY, cert, ca.unwrap_or(pki.ca_pem()));
    let section: Vec<&str> = section
        .lines()
        .filter(|l| ca.is_some() || !l.starts_with("ca_cert"))
        .collect();
    format!("{}\n{}\n", good_toml(pki), section.join("\n"))
}

fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn check_config_refuses_a_cluster_certificate_peers_would_not_accept() {
    let pki = Pki::new();
    let ca = Some(pki.ca_pem());
    let good = with_cluster(&pki, &peer_cert(&pki), ca);
    let out = check_config(&good);
    assert!(
        out.status.success(),
        "a good [cluster] passes: {}",
        said(&out)
    );

    let other = pki.client("other-peer", Identity::Dns("other-peer".into()));
    let untrusted = pki.untrusted_client("rogue-peer", Identity::Dns("leasegate-peer".into()));
    let cases = [
        (
            with_cluster(&pki, &other, ca),
            "cluster.cert: its identities (dns:other-peer, cn:other-peer) do not match \
             cluster.peer_identity \"dns:leasegate-peer\"",
        ),
        (
            with_cluster(&pki, &untrusted, ca),
            "cluster.cert: does not verify as a client certificate against listen.client_ca",
        ),
        (
            with_cluster(&pki, &peer_cert(&pki), None),
            "cluster.ca_cert is required: the CA that the peers' server certificates chain to",
        ),
    ];
    for (toml, message) in cases {
        let out = check_config(&toml);
        assert!(!out.status.success(), "check-config must refuse: {message}");
        assert!(
            said(&out).contains(message),
            "want {message:?}; it said: {}",
            said(&out)
        );
    }
}

#[test]
fn leasegate_refuses_to_start_with_a_cluster_certificate_that_is_not_a_peer() {
    let pki = Pki::new();
    let other = pki.client("other-peer", Identity::Dns("other-peer".into()));
    let dir = root().tempdir("cluster-start-");
    let path = dir.path().join("leasegate.toml");
    std::fs::write(&path, with_cluster(&pki, &other, Some(pki.ca_pem()))).expect("write config");
    let out = refused_start(&path, "a cluster certificate its peers would refuse");
    assert!(!out.status.success(), "non-zero exit");
    let text = said(&out);
    assert!(
        text.contains("do not match cluster.peer_identity"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cancel_from_a_certificate_that_is_not_a_peer_is_dropped_and_never_forwarded() {
    let recorder = FakePeer::start(false).await;
    let recorder_port = recorder.port;
    let mut peer = None;
    let f = fixture_edited(
        "sec-cluster-peercancel",
        |cfg| cfg,
        ProcessOptions::default(),
        |t, pki| {
            let cert = peer_cert(pki);
            merge_toml(
                t,
                &cluster_section(&[recorder_port], PEER_IDENTITY, &cert, pki.ca_pem()),
            );
            peer = Some(cert);
        },
    )
    .await;
    let peer = peer.expect("peer certificate");
    let (mut w, pid, secret) = sleeping_session(&f).await;
    let client = tls_config(&f.pki, Some(&f.good));
    let as_peer = tls_config(&f.pki, Some(&peer));
    let port = f.proxy.port;
    let proxy = &f.proxy;

    // The good client is not a peer: its PeerCancelRequests, even with the right key, do
    // nothing here and go nowhere else.
    for key in [secret.clone(), vec![1, 2, 3, 4]] {
        let closed = send_tls_packet(port, client.clone(), &peer_cancel_packet(pid, &key))
            .await
            .expect("send PeerCancelRequest");
        assert_eq!(closed, TlsClose::CloseNotify, "dropped unanswered");
    }
    wait_counter(proxy, CANCELS, &[("result", "not_peer")], 2.0).await;
    expect_still_running(&mut w, &f.mount.prefix).await;
    // A real peer's PeerCancelRequest with an unknown key is looked up here only.
    let closed = send_tls_packet(port, as_peer.clone(), &peer_cancel_packet(pid + 1, &secret))
        .await
        .expect("send PeerCancelRequest as a peer");
    assert_eq!(closed, TlsClose::CloseNotify);
    wait_counter(proxy, CANCELS, &[("result", "unknown_key")], 1.0).await;
    assert_eq!(recorder.accepted(), 0, "no PeerCancelRequest was forwarded");
    assert_eq!(
        counter(proxy, CANCELS, &[("result", "to_peers")]).await,
        0.0
    );

    // Control: a client's CancelRequest with an unknown key is forwarded, once per peer.
    let answer = send_plain_cancel_from(IpAddr::from(LOOPBACK), port, pid, &[7; 4])
        .await
        .expect("send CancelRequest");
    assert!(answer.is_empty());
    wait_counter(proxy, CANCELS, &[("result", "to_peers")], 1.0).await;
    assert_eq!(
        recorder.accepted(),
        1,
        "the client's cancel went to the peer"
    );

    // A peer's PeerCancelRequest with the right key cancels the session's query.
    expect_still_running(&mut w, &f.mount.prefix).await;
    let closed = send_tls_packet(port, as_peer, &peer_cancel_packet(pid, &secret))
        .await
        .expect("send PeerCancelRequest as a peer");
    assert_eq!(closed, TlsClose::CloseNotify);
    expect_cancelled(&mut w).await;
    assert_eq!(
        counter(proxy, CANCELS, &[("result", "forwarded")]).await,
        1.0
    );
    assert_eq!(recorder.accepted(), 1);
    w.terminate().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_server_certificate_does_not_name_its_address_gets_no_cancel() {
    let (b_by_ip, b_by_name) = (free_port(), free_port());
    // Instance A's server certificate names `localhost` only, not 127.0.0.1.
    let f = fixture_edited(
        "sec-cluster-names",
        |cfg| cfg,
        ProcessOptions::default(),
        |t, pki| {
            let (cert, key) = pki.server_with_names("a-server", &["localhost"], &[]);
            set(t, "listen.cert", cert.display().to_string());
            set(t, "listen.key", key.display().to_string());
            let section = cluster_section(
                &[b_by_ip, b_by_name],
                PEER_IDENTITY,
                &peer_cert(pki),
                pki.ca_pem(),
            );
            merge_toml(t, &section);
        },
    )
    .await;
    let a_port = f.proxy.port;
    let peer = peer_cert(&f.pki);
    let start_b = |port: u16, host: &str| {
        let cfg = ProxyConfig::new(&f.pki, &f.mount).grant(
            &format!("uri:{GOOD_URI}"),
            &["myapp"],
            &["readonly"],
        );
        // Field by field: StartOptions is shared and may grow fields.
        #[allow(clippy::field_reassign_with_default)]
        let opts = {
            let mut opts = StartOptions::default();
            opts.port = Some(port);
            opts.extra_toml = cluster_section_hosts(
                &[format!("{host}:{a_port}")],
                PEER_IDENTITY,
                &peer,
                f.pki.ca_pem(),
            );
            opts
        };
        Proxy::start_with_options(cfg, opts)
    };
    let by_ip = start_b(b_by_ip, "127.0.0.1").await;
    let (mut w, pid, secret) = sleeping_session(&f).await;

    // B names A by its address, which A's certificate does not carry: the TLS handshake to A
    // fails on B's side and A never sees the cancel.
    let answer = send_plain_cancel_from(IpAddr::from(LOOPBACK), by_ip.port, pid, &secret)
        .await
        .expect("cancel via B");
    assert!(answer.is_empty());
    wait_counter(&by_ip, PEER_FORWARDS, &[("result", "failed")], 1.0).await;
    assert_eq!(
        counter(&by_ip, PEER_FORWARDS, &[("result", "sent")]).await,
        0.0
    );
    let log = by_ip.log_text();
    assert!(log.contains("not valid for name"), "B says why:\n{log}");
    expect_still_running(&mut w, &f.mount.prefix).await;
    assert_eq!(
        counter(&f.proxy, CANCELS, &[]).await,
        0.0,
        "A received no cancel"
    );

    // Named `localhost`, as A's certificate says, the same cancel goes through. The name is
    // resolved in the background, so a cancel sent before the first lookup finds no peer:
    // retry until the query is cancelled.
    let by_name = start_b(b_by_name, "localhost").await;
    let mut answer = None;
    for _ in 0..20 {
        send_plain_cancel_from(IpAddr::from(LOOPBACK), by_name.port, pid, &secret)
            .await
            .expect("cancel via B named localhost");
        if let Ok(Some(first)) = w.recv_within(Duration::from_millis(500)).await {
            let mut msgs = vec![first];
            msgs.extend(
                w.recv_until_ready(Duration::from_secs(5))
                    .await
                    .expect("ReadyForQuery"),
            );
            answer = Some(msgs);
            break;
        }
    }
    let msgs = answer.expect("the cancel via a correctly named peer must reach A");
    let err = msgs.iter().find(|m| m.tag == b'E');
    assert_eq!(
        err.and_then(|m| m.sqlstate()).as_deref(),
        Some("57014"),
        "{msgs:?}"
    );
    assert!(counter(&by_name, PEER_FORWARDS, &[("result", "sent")]).await >= 1.0);
    w.terminate().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    drop((by_ip, by_name));
}
