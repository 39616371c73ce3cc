//! Peer addresses, resolved in the background: one task per [`super::Cluster`] looks every
//! `peers` entry up every few seconds (each lookup under a timeout) and publishes the list
//! that forwarding reads, so a cancel never waits for DNS. A DNS name stands for all its
//! addresses (a Kubernetes headless Service: one per pod). A failed lookup keeps the entry's
//! last addresses. The task ends when its `Cluster` is dropped (its token is cancelled).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;

use super::check::PeerSpec;

/// One address to forward cancels to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// A resolved address of a `peers` entry.
    pub addr: SocketAddr,
    /// That entry's host (DNS name or IP address): the name sent and checked in the peer's
    /// certificate.
    pub name: ServerName<'static>,
    /// The replica id of that entry, if it names one.
    pub id: Option<u8>,
}

/// How often the peers are resolved again.
const EVERY: Duration = Duration::from_secs(5);
/// Limit for one lookup.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Most peer addresses a cancel is forwarded to: bounds what one cancel can cost.
const MAX_ADDRESSES: usize = 64;

/// The address of an entry that is an IP address already; `None` for a DNS name.
fn literal_address(spec: &PeerSpec) -> Option<PeerAddr> {
    let ServerName::IpAddress(ip) = &spec.name else {
        return None;
    };
    Some(PeerAddr {
        addr: SocketAddr::new(IpAddr::from(*ip), spec.port),
        name: spec.name.clone(),
        id: spec.id,
    })
}

/// The entries that need no lookup, available before the first resolution.
pub(super) fn literal(specs: &[PeerSpec]) -> Vec<PeerAddr> {
    specs.iter().filter_map(literal_address).collect()
}

/// Resolves `specs` into `peers` every [`EVERY`] until `stop` is cancelled.
pub(super) async fn run(
    specs: Vec<PeerSpec>,
    peers: Arc<ArcSwap<Vec<PeerAddr>>>,
    stop: CancellationToken,
) {
    let mut last: Vec<Vec<PeerAddr>> = specs
        .iter()
        .map(|s| literal_address(s).into_iter().collect())
        .collect();
    let mut failing = vec![false; specs.len()];
    loop {
        for (i, spec) in specs.iter().enumerate() {
            if literal_address(spec).is_some() {
                continue;
            }
            let lookup = tokio::time::timeout(
                LOOKUP_TIMEOUT,
                tokio::net::lookup_host((spec.host.as_str(), spec.port)),
            );
            let found = tokio::select! {
                r = lookup => r,
                () = stop.cancelled() => return,
            };
            match found {
                Ok(Ok(addrs)) => {
                    last[i] = addrs
                        .map(|addr| PeerAddr {
                            addr,
                            name: spec.name.clone(),
                            id: spec.id,
                        })
                        .collect();
                    if std::mem::take(&mut failing[i]) {
                        tracing::info!(peer = %spec.host, "cluster peer resolves again");
                    }
                }
                Ok(Err(e)) if !failing[i] => {
                    failing[i] = true;
                    tracing::warn!(peer = %spec.host, error = %e,
                        "cannot resolve cluster peer; keeping its last addresses");
                }
                Err(_) if !failing[i] => {
                    failing[i] = true;
                    tracing::warn!(peer = %spec.host, "resolving cluster peer timed out; keeping its last addresses");
                }
                _ => {}
            }
        }
        peers.store(Arc::new(merge(&last)));
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Every entry's addresses, without duplicates, at most [`MAX_ADDRESSES`].
fn merge(per_entry: &[Vec<PeerAddr>]) -> Vec<PeerAddr> {
    let mut all: Vec<PeerAddr> = Vec::new();
    for peer in per_entry.iter().flatten() {
        if !all.iter().any(|p| p.addr == peer.addr) {
            all.push(peer.clone());
        }
    }
    if all.len() > MAX_ADDRESSES {
        tracing::warn!(
            addresses = all.len(),
            max = MAX_ADDRESSES,
            "cluster peers resolve to too many addresses; forwarding to the first ones only"
        );
        all.truncate(MAX_ADDRESSES);
    }
    all
}
