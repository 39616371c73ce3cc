//! `[cluster]` checks at load and the background resolver, with certificates made by rcgen.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    SanType,
};

use rustls::pki_types::ServerName;

use super::*;
use crate::identity::IdentityPattern;

/// A client CA, another CA, and files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    other_ca: CertifiedIssuer<'static, KeyPair>,
    ca_pem: PathBuf,
}

fn new_ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca")
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = new_ca();
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, ca.pem()).expect("write ca");
        Pki {
            dir,
            ca,
            other_ca: new_ca(),
            ca_pem,
        }
    }

    /// A certificate with DNS SAN `dns` and `usage`, issued by the client CA (or the other
    /// one); returns (cert path, key path).
    fn cert(
        &self,
        file: &str,
        dns: &str,
        usage: ExtendedKeyUsagePurpose,
        trusted: bool,
    ) -> (PathBuf, PathBuf) {
        let san = SanType::DnsName(dns.try_into().expect("dns"));
        self.cert_for(file, san, usage, trusted)
    }

    /// The peer certificate most tests use: DNS SAN `leasegate-peer`, client auth, issued by
    /// the trusted CA (file `peer`).
    fn peer(&self) -> (PathBuf, PathBuf) {
        self.cert(
            "peer",
            "leasegate-peer",
            ExtendedKeyUsagePurpose::ClientAuth,
            true,
        )
    }

    /// As [`Pki::cert`], for any subject alternative name.
    fn cert_for(
        &self,
        file: &str,
        san: SanType,
        usage: ExtendedKeyUsagePurpose,
        trusted: bool,
    ) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::default();
        params.subject_alt_names.push(san);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let issuer = if trusted { &self.ca } else { &self.other_ca };
        let cert = params.signed_by(&key, issuer).expect("sign");
        let cert_path = self.dir.path().join(format!("{file}.pem"));
        let key_path = self.dir.path().join(format!("{file}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    fn listen(&self) -> ListenConfig {
        toml::from_str(&format!(
            "address = \"127.0.0.1:0\"\ncert = \"/unused\"\nkey = \"/unused\"\nclient_ca = {:?}\n",
            self.ca_pem
        ))
        .expect("[listen]")
    }
}

fn cluster_config(
    peers: &[&str],
    identity: &str,
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> ClusterConfig {
    ClusterConfig {
        peers: peers
            .iter()
            .map(|p| crate::config::schema::Peer::Address(p.to_string()))
            .collect(),
        id: None,
        peer_identity: IdentityPattern::parse(identity).expect("pattern"),
        cert: cert.to_owned(),
        key: key.to_owned(),
        ca_cert: ca.to_owned(),
    }
}

#[test]
fn a_cluster_certificate_peers_would_refuse_is_refused_at_load() {
    let pki = Pki::new();
    let listen = pki.listen();
    let ca = pki.ca_pem.as_path();
    let (good, good_key) = pki.peer();
    let ok = cluster_config(
        &["127.0.0.1:6432"],
        "dns:leasegate-peer",
        &good,
        &good_key,
        ca,
    );
    assert_eq!(problems(&ok, &listen), Vec::<String>::new());

    let mismatch = cluster_config(&["127.0.0.1:6432"], "dns:other-peer", &good, &good_key, ca);
    let found = problems(&mismatch, &listen).join("\n");
    assert!(
        found.contains("do not match cluster.peer_identity \"dns:other-peer\"")
            && found.contains("dns:leasegate-peer"),
        "{found}"
    );

    let (rogue, rogue_key) = pki.cert(
        "rogue",
        "leasegate-peer",
        ExtendedKeyUsagePurpose::ClientAuth,
        false,
    );
    let untrusted = cluster_config(
        &["127.0.0.1:6432"],
        "dns:leasegate-peer",
        &rogue,
        &rogue_key,
        ca,
    );
    let found = problems(&untrusted, &listen).join("\n");
    assert!(
        found.contains("does not verify as a client certificate against listen.client_ca"),
        "{found}"
    );

    let (server_only, server_key) = pki.cert(
        "srv",
        "leasegate-peer",
        ExtendedKeyUsagePurpose::ServerAuth,
        true,
    );
    let no_client_auth = cluster_config(
        &["127.0.0.1:6432"],
        "dns:leasegate-peer",
        &server_only,
        &server_key,
        ca,
    );
    let found = problems(&no_client_auth, &listen).join("\n");
    assert!(
        found.contains("does not verify as a client certificate"),
        "{found}"
    );

    let bad_peer = cluster_config(&["::1:6432"], "dns:leasegate-peer", &good, &good_key, ca);
    let found = problems(&bad_peer, &listen).join("\n");
    assert!(found.contains("in brackets"), "{found}");
}

#[tokio::test]
async fn peers_are_resolved_in_the_background_until_the_cluster_is_dropped() {
    let pki = Pki::new();
    let (cert, key) = pki.peer();
    let ca = pki.ca_pem.as_path();
    let config = cluster_config(
        &["127.0.0.1:7001", "localhost:7002"],
        "dns:leasegate-peer",
        &cert,
        &key,
        ca,
    );
    let cluster =
        Cluster::new(&config, &pki.listen(), &crate::tasks::Tasks::detached()).expect("cluster");
    // IP addresses need no lookup: there from the start, named by their address.
    let first = cluster.peer_addresses();
    assert!(
        first
            .iter()
            .any(|p| p.addr == "127.0.0.1:7001".parse().expect("addr")
                && matches!(p.name, ServerName::IpAddress(_))),
        "{first:?}"
    );
    // The DNS name arrives from the resolver, each address named by the configured host.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let localhost = ServerName::try_from("localhost").expect("name");
    loop {
        let peers = cluster.peer_addresses();
        if peers
            .iter()
            .any(|p| p.addr.port() == 7002 && p.name == localhost)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "localhost never resolved: {peers:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Dropping the Cluster (a reload replaced it) ends its resolver, which held the list.
    let list = Arc::downgrade(&cluster.peers);
    drop(cluster);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while list.upgrade().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "resolver still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_replica_id_rides_in_the_pid_and_names_the_owner() {
    for id in [0u8, 1, 2, 127] {
        for low in [1, 0x00ab_cdef, PID_LOW_MASK] {
            let pid = pid_with_id(id, low);
            assert!(pid > 0, "pids stay positive");
            assert_eq!(id_of_pid(pid), id);
            assert_eq!(pid & PID_LOW_MASK, low);
        }
    }
}

#[tokio::test]
async fn a_cancel_goes_to_the_owning_peer_only_and_unnamed_peers_get_the_rest() {
    let pki = Pki::new();
    let (cert, key) = pki.peer();
    let mut config = cluster_config(&[], "dns:leasegate-peer", &cert, &key, &pki.ca_pem);
    use crate::config::schema::{Peer, PeerWithId};
    let with_id = |id, address: &str| {
        Peer::WithId(PeerWithId {
            id,
            address: address.into(),
        })
    };
    config.peers = vec![
        with_id(0, "127.0.0.1:7000"),
        with_id(1, "127.0.0.1:7001"),
        with_id(2, "127.0.0.1:7002"),
        Peer::Address("127.0.0.1:7100".into()),
    ];
    config.id = Some(0);
    let tracker = tokio_util::task::TaskTracker::new();
    let tasks = crate::tasks::Tasks::new(tracker, tokio_util::sync::CancellationToken::new());
    let cluster = Cluster::new(&config, &pki.listen(), &tasks).expect("cluster");
    let key = |id| CancelKey {
        pid: pid_with_id(id, 77),
        secret: vec![1, 2, 3, 4],
    };
    assert_eq!(cluster.owner(&key(0)), Owner::This);
    let long = CancelKey {
        pid: pid_with_id(1, 77),
        secret: vec![7; 32],
    };
    assert_eq!(
        cluster.owner(&long),
        Owner::Peer(1),
        "a 3.2 key routes by its pid too"
    );
    assert_eq!(cluster.owner(&key(2)), Owner::Peer(2));
    let ports = |owner| -> Vec<u16> {
        cluster
            .targets(owner)
            .iter()
            .map(|p| p.addr.port())
            .collect()
    };
    assert_eq!(ports(Owner::Peer(2)), [7002], "the owner alone");
    assert_eq!(ports(Owner::Peer(1)), [7001]);
    assert!(
        ports(Owner::This).is_empty(),
        "never to itself, not even its own entry"
    );
    assert_eq!(
        ports(Owner::Peer(9)),
        [7100],
        "an id no entry names: the unnamed peers"
    );
    assert_eq!(
        ports(Owner::Unknown),
        [7000, 7001, 7002, 7100],
        "no ids here: everyone"
    );
}

/// A peer closes the cancel connection once it has forwarded the cancel upstream (which waits
/// for PostgreSQL's close); the client's cancel connection is closed after [`Cluster::forward`]
/// returns, so `forward` waits for the peer's close too.
#[tokio::test]
async fn a_peer_forward_returns_only_once_the_peer_closed_the_connection() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pki = Pki::new();
    let (cert, key) = pki.peer();
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    let (server, server_key) = pki.cert_for(
        "server",
        SanType::IpAddress(loopback),
        ExtendedKeyUsagePurpose::ServerAuth,
        true,
    );
    let listen: ListenConfig = toml::from_str(&format!(
        "address = \"127.0.0.1:0\"\ncert = {server:?}\nkey = {server_key:?}\nclient_ca = {:?}\n",
        pki.ca_pem
    ))
    .expect("[listen]");
    let acceptor = crate::tls::server::acceptor(&listen).expect("acceptor");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let closed = Arc::new(AtomicBool::new(false));
    let peer = tokio::spawn({
        let closed = closed.clone();
        async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let mut ssl_request = [0u8; 8];
            tcp.read_exact(&mut ssl_request).await.expect("SSLRequest");
            tcp.write_all(b"S").await.expect("S");
            let mut tls = acceptor.accept(tcp).await.expect("TLS");
            let mut packet = vec![0u8; 12 + 4];
            tls.read_exact(&mut packet)
                .await
                .expect("PeerCancelRequest");
            // Forwarding upstream takes a while; the peer closes once it is done.
            tokio::time::sleep(Duration::from_millis(300)).await;
            closed.store(true, Ordering::SeqCst);
            let _ = tls.shutdown().await;
            packet
        }
    });
    let peer_address = format!("127.0.0.1:{port}");
    let config = cluster_config(
        &[&peer_address],
        "dns:leasegate-peer",
        &cert,
        &key,
        &pki.ca_pem,
    );
    let tracker = tokio_util::task::TaskTracker::new();
    let tasks = crate::tasks::Tasks::new(tracker, tokio_util::sync::CancellationToken::new());
    let cluster = Cluster::new(&config, &pki.listen(), &tasks).expect("cluster");
    let cancel = CancelKey {
        pid: 77,
        secret: vec![1, 2, 3, 4],
    };
    let done = cluster.forward(&cancel).await;
    assert_eq!((done.sent, done.failed), (1, 0));
    assert!(
        closed.load(Ordering::SeqCst),
        "forward returned before the peer had forwarded the cancel"
    );
    let packet = tokio::time::timeout(Duration::from_secs(10), peer)
        .await
        .expect("the fake peer ends")
        .expect("fake peer");
    assert_eq!(packet, peer_cancel_packet(&cancel));
}
