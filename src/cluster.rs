//! Cancel requests across replicas. Behind a load balancer a client's CancelRequest often
//! reaches another leasegate instance than the one holding its session. A client's cancel
//! whose key is not known here is forwarded to every peer address as a PeerCancelRequest, over
//! mutual TLS: this instance presents its cluster certificate, and each peer's server
//! certificate must chain to `cluster.ca_cert` and name the host given in `peers`. A peer
//! accepts a PeerCancelRequest only from a certificate matching `peer_identity` and only looks
//! it up among its own sessions, never forwarding it again, so a cancel crosses at most one
//! hop. The secret key itself is the proof that the requester owns the session, as in
//! PostgreSQL.
//!
//! With replica ids (`[cluster] id`, and `{ id, address }` peers), each replica puts its id in
//! the top 7 bits of the pids of the cancel keys it hands out ([`pid_with_id`]); a cancel for
//! another replica's key goes to that peer alone ([`Owner`]), one for its own unknown key
//! nowhere. Peers named without an id get the cancels no named peer owns (and, on an instance
//! without an id, every cancel), as before ids existed.
//!
//! Peer addresses are resolved in the background (`resolve`), never on the packet path; the
//! configuration is checked at load (`check`).

mod check;
mod resolve;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::DropGuard;

pub use check::problems;
pub use resolve::PeerAddr;

use crate::config::{ClusterConfig, ListenConfig};
use crate::identity::{IdentityPattern, Principal};
use crate::protocol::startup::{CancelKey, peer_cancel_packet};
use crate::tasks::Tasks;
use crate::tls::TlsError;

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// Limit for forwarding to one peer address.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// The bits of a cancel key's pid below the replica id.
const ID_SHIFT: u32 = 24;
/// The pid bits left for the random part when a replica id is encoded.
pub(crate) const PID_LOW_MASK: i32 = (1 << ID_SHIFT) - 1;

/// A cancel key pid carrying replica `id` (0 to 127) in its top 7 bits, above `low`'s 24
/// bits: positive, as PostgreSQL's pids are.
pub(crate) fn pid_with_id(id: u8, low: i32) -> i32 {
    (i32::from(id & 0x7f) << ID_SHIFT) | (low & PID_LOW_MASK)
}

/// The replica id a cancel key's pid carries.
pub(crate) fn id_of_pid(pid: i32) -> u8 {
    ((pid >> ID_SHIFT) & 0x7f) as u8
}

/// Which replica owns a cancel key, as far as this instance can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// This replica (its id is in the key).
    This,
    /// The replica with this id.
    Peer(u8),
    /// This replica has no id, so keys say nothing: every peer may own it.
    Unknown,
}

/// The peers of this instance and how to reach them.
pub struct Cluster {
    /// This replica's `[cluster] id`, in every cancel key it hands out.
    id: Option<u8>,
    /// Pattern a peer's client certificate matches: only such a sender's PeerCancelRequest is
    /// looked up.
    identity: IdentityPattern,
    /// Mutual TLS towards peers: this instance's cluster certificate; the peer's server
    /// certificate verified against `ca_cert`, with its name.
    connector: TlsConnector,
    /// Where to forward, refreshed by the resolver task.
    peers: Arc<ArcSwap<Vec<PeerAddr>>>,
    /// Stops the resolver when this `Cluster` is dropped (a reload built a new one).
    _resolver: DropGuard,
}

/// How forwarding one cancel went, per peer address.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    /// Addresses the PeerCancelRequest was sent to.
    pub sent: usize,
    /// Addresses that could not be reached, failed TLS (a certificate that does not verify
    /// or does not name the peer) or timed out.
    pub failed: usize,
}

impl Cluster {
    /// Checks `[cluster]` against `[listen]` (see [`problems`]), builds the peer connector and
    /// starts resolving the peers on `tasks` (call inside a Tokio runtime), until `tasks` are
    /// stopped or this `Cluster` is dropped.
    pub(crate) fn new(
        config: &ClusterConfig,
        listen: &ListenConfig,
        tasks: &Tasks,
    ) -> Result<Cluster, TlsError> {
        let checked = check::check(config, listen)
            .map_err(|problems| TlsError::Invalid(problems.join("; ")))?;
        let peers = Arc::new(ArcSwap::from_pointee(resolve::literal(&checked.peers)));
        let resolver = tasks.child();
        let published = peers.clone();
        resolver.run(|stop| resolve::run(checked.peers, published, stop));
        Ok(Cluster {
            id: checked.id,
            identity: checked.identity,
            connector: checked.connector,
            peers,
            _resolver: resolver.stop().clone().drop_guard(),
        })
    }

    /// Whether a sender's certificate is a peer's.
    pub fn is_peer(&self, principal: Option<&Principal>) -> bool {
        principal.is_some_and(|p| self.identity.matches(p))
    }

    /// The peer addresses as last resolved.
    pub fn peer_addresses(&self) -> Arc<Vec<PeerAddr>> {
        self.peers.load_full()
    }

    /// This replica's id.
    pub fn id(&self) -> Option<u8> {
        self.id
    }

    /// Who owns `key`, by the replica id in it.
    pub fn owner(&self, key: &CancelKey) -> Owner {
        match self.id {
            None => Owner::Unknown,
            Some(own) if id_of_pid(key.pid) == own => Owner::This,
            Some(_) => Owner::Peer(id_of_pid(key.pid)),
        }
    }

    /// The addresses a cancel for `owner` goes to: the peer with that id; without one (or
    /// without ids here), every peer entry that names no id.
    fn targets(&self, owner: Owner) -> Vec<PeerAddr> {
        let peers = self.peers.load();
        let named = |id| peers.iter().filter(move |p| p.id == Some(id));
        match owner {
            Owner::This => Vec::new(),
            Owner::Peer(id) if named(id).next().is_some() => named(id).cloned().collect(),
            Owner::Peer(_) => peers.iter().filter(|p| p.id.is_none()).cloned().collect(),
            Owner::Unknown => peers.iter().cloned().collect(),
        }
    }

    /// Sends a client's cancel as a PeerCancelRequest to the replica that owns its key (when
    /// ids are configured; otherwise to every peer address), each send bounded by a timeout;
    /// resolves nothing.
    pub async fn forward(&self, key: &CancelKey) -> Forwarded {
        let packet: Arc<[u8]> = peer_cancel_packet(key).into();
        let mut sends = tokio::task::JoinSet::new();
        for peer in self.targets(self.owner(key)) {
            let connector = self.connector.clone();
            let packet = packet.clone();
            sends.spawn(async move {
                match tokio::time::timeout(PEER_TIMEOUT, send(connector, &peer, &packet)).await {
                    Ok(Ok(tls)) => {
                        // The peer closes once it has forwarded the cancel upstream: wait
                        // for that (bounded), so the client's close means the same as
                        // PostgreSQL's.
                        if tokio::time::timeout(PEER_TIMEOUT, closed(tls)).await.is_err() {
                            tracing::debug!(addr = %peer.addr, "peer did not close the cancel connection in time");
                        }
                        true
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(addr = %peer.addr, error = %e, "cancel forward to peer failed");
                        false
                    }
                    Err(_) => {
                        tracing::debug!(addr = %peer.addr, "cancel forward to peer timed out");
                        false
                    }
                }
            });
        }
        let mut out = Forwarded::default();
        while let Some(done) = sends.join_next().await {
            if matches!(done, Ok(true)) {
                out.sent += 1;
            } else {
                out.failed += 1;
            }
        }
        out
    }
}

type PeerStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects to `peer` and sends `packet`; returns the connection, for [`closed`].
async fn send(
    connector: TlsConnector,
    peer: &PeerAddr,
    packet: &[u8],
) -> std::io::Result<PeerStream> {
    let mut tcp = TcpStream::connect(peer.addr).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(&SSL_REQUEST).await?;
    if tcp.read_u8().await? != b'S' {
        return Err(std::io::ErrorKind::ConnectionRefused.into());
    }
    let mut tls = connector.connect(peer.name.clone(), tcp).await?;
    tls.write_all(packet).await?;
    tls.flush().await?;
    Ok(tls)
}

/// Returns once the peer has closed `tls` (it answers nothing; an error is a close too), then
/// closes our side.
async fn closed(mut tls: PeerStream) {
    let mut sink = [0u8; 64];
    while let Ok(1..) = tls.read(&mut sink).await {}
    let _ = tls.shutdown().await;
}

#[cfg(test)]
mod tests;
