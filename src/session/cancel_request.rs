//! The cancel branch of a connection: admission (rate limits, in-flight cap), the route
//! (upstream, the peers, or nowhere), the work under one time limit, the metric, and the close.
//! Nothing is ever answered, as PostgreSQL answers no cancel request.

use std::time::Duration;

use super::handshake::CancelRequest;
use crate::cancel::{self, CancelKind, Route};
use crate::cluster::{Cluster, Owner};
use crate::metrics::labels::CancelResult;
use crate::net::ClientAddr;
use crate::state::{AppState, Live};

/// Limit for all the work one cancel causes (each step has its own, shorter limit).
const CANCEL_WORK_LIMIT: Duration = Duration::from_secs(10);

/// Handles one cancel request from `peer` and closes its connection. The per-address rate
/// limit counts a TCP client by its IP address, a Unix-socket one by its uid.
pub(super) async fn handle(
    state: &AppState,
    live: &Live,
    request: CancelRequest,
    peer: &ClientAddr,
) {
    let from_peer = live
        .cluster
        .as_ref()
        .is_some_and(|c| c.is_peer(request.sender.as_ref()));
    // A verified peer's PeerCancelRequest was rate-limited where the client sent it.
    let forwarded_by_peer = request.kind == CancelKind::Peer && from_peer;
    let result = match state.cancel_gate.admit(peer.rate_key(), !forwarded_by_peer) {
        Err(refusal) => refusal.label(),
        Ok(_slot) => {
            let work = dispatch(state, live, &request, from_peer);
            tokio::time::timeout(CANCEL_WORK_LIMIT, work)
                .await
                .unwrap_or(CancelResult::TimedOut)
        }
    };
    state.metrics.cancel_request(result);
    let transport = request.conn.transport().as_str();
    tracing::debug!(%peer, transport, kind = ?request.kind, result = result.as_str(), "cancel request");
    request.conn.close().await;
}

/// Does what [`cancel::route`] decides; returns the metric label.
async fn dispatch(
    state: &AppState,
    live: &Live,
    request: &CancelRequest,
    from_peer: bool,
) -> CancelResult {
    let cluster = live.cluster.as_ref();
    if forwarded_to_wrong_replica(request, from_peer, cluster) {
        state.metrics.cluster_id_mismatch();
    }
    let route = cancel::route(request.kind, from_peer, cluster.is_some(), || {
        state.cancels.lookup(&request.key)
    });
    match (route, cluster) {
        (Route::Upstream(target), _) => {
            cancel::forward(target).await;
            CancelResult::Forwarded
        }
        // Our own id and no such session: it ended; no other replica has it either.
        (Route::Peers, Some(cluster)) if cluster.owner(&request.key) == Owner::This => {
            CancelResult::UnknownKey
        }
        (Route::Peers, Some(cluster)) => {
            let done = cluster.forward(&request.key).await;
            state.metrics.cancel_peer_forwards(done.sent, done.failed);
            CancelResult::ToPeers
        }
        (Route::Peers, None) => CancelResult::UnknownKey,
        (Route::Drop(label), _) => label,
    }
}

/// A peer forwarded a cancel whose key carries another replica's id: the peer's `peers` list
/// maps that id to this instance's address, or two replicas run with one id. Logged (the
/// counter says how often).
fn forwarded_to_wrong_replica(
    request: &CancelRequest,
    from_peer: bool,
    cluster: Option<&Cluster>,
) -> bool {
    let Some(cluster) = cluster else { return false };
    let (CancelKind::Peer, true, Some(own)) = (request.kind, from_peer, cluster.id()) else {
        return false;
    };
    let Owner::Peer(id) = cluster.owner(&request.key) else {
        return false;
    };
    tracing::warn!(
        own_id = own,
        key_id = id,
        "a peer forwarded a cancel for replica id {id} to this replica (id {own}): \
         check [cluster] id and the ids in peers on every replica"
    );
    true
}
