//! Cancel requests across replicas. Behind a load balancer a client's CancelRequest often
//! reaches another leasegate instance than the one holding its session. A cancel whose key is
//! not known here is forwarded to every peer over mutual TLS (leasegate's own client
//! certificate, peers verified against the cluster CA); a peer that receives a forwarded
//! cancel (its sender's certificate matches `peer_identity`) only looks it up locally, so a
//! cancel crosses at most one hop. The secret key itself is the proof that the requester owns
//! the session, as in PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::ClusterConfig;
use crate::policy::IdentityPattern;
use crate::protocol::startup::CancelKey;
use crate::tls::identity::Principal;
use crate::tls::{self, TlsError, load_certs, load_key, load_roots, provider};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// Limit for forwarding to one peer.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// The peers of this instance and how to reach them.
pub struct Cluster {
    peers: Vec<String>,
    identity: IdentityPattern,
    connector: TlsConnector,
}

impl Cluster {
    /// Builds the peer connector from `[cluster]`.
    pub fn new(config: &ClusterConfig, default_ca: &std::path::Path) -> Result<Cluster, TlsError> {
        let identity = IdentityPattern::parse(&config.peer_identity).map_err(TlsError::Invalid)?;
        let roots = load_roots(config.ca_cert.as_deref().unwrap_or(default_ca))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Invalid(format!("cluster CA: {e}")))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(tls::VERSIONS)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(tls::upstream::ChainOnly(verifier)))
            .with_client_auth_cert(load_certs(&config.cert)?, load_key(&config.key)?)?;
        Ok(Cluster {
            peers: config.peers.clone(),
            identity,
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// Whether a cancel came from a peer (and must not be forwarded again).
    pub fn is_peer(&self, principal: Option<&Principal>) -> bool {
        principal.is_some_and(|p| self.identity.matches(p))
    }

    /// Forwards a cancel to every peer address (DNS names resolve to all their addresses).
    pub async fn forward(&self, key: &CancelKey) {
        let mut sends = tokio::task::JoinSet::new();
        for peer in &self.peers {
            let addrs =
                match tokio::time::timeout(PEER_TIMEOUT, tokio::net::lookup_host(peer)).await {
                    Ok(Ok(a)) => a.collect::<Vec<_>>(),
                    _ => {
                        tracing::warn!(peer, "cannot resolve cluster peer");
                        continue;
                    }
                };
            for addr in addrs {
                let connector = self.connector.clone();
                let key = key.clone();
                sends.spawn(async move {
                    let r = tokio::time::timeout(PEER_TIMEOUT, send(connector, addr, key)).await;
                    if !matches!(r, Ok(Ok(()))) {
                        tracing::debug!(%addr, "cancel forward to peer failed");
                    }
                });
            }
        }
        while sends.join_next().await.is_some() {}
    }
}

async fn send(
    connector: TlsConnector,
    addr: std::net::SocketAddr,
    key: CancelKey,
) -> std::io::Result<()> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(&SSL_REQUEST).await?;
    if tcp.read_u8().await? != b'S' {
        return Err(std::io::ErrorKind::ConnectionRefused.into());
    }
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = connector.connect(name, tcp).await?;
    let mut packet = Vec::with_capacity(12 + key.secret.len());
    packet.extend_from_slice(&((12 + key.secret.len()) as u32).to_be_bytes());
    packet.extend_from_slice(&80_877_102u32.to_be_bytes());
    packet.extend_from_slice(&key.pid.to_be_bytes());
    packet.extend_from_slice(&key.secret);
    tls.write_all(&packet).await?;
    tls.shutdown().await
}
