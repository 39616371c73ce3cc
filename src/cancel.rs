//! Query cancellation. Each session gets a random key of leasegate's own, mapped to the
//! upstream's key; a CancelRequest with a known key is forwarded to the upstream over a fresh
//! connection (TLS per the database entry). Unknown keys are dropped silently, or, with
//! `[cluster]`, forwarded once to the peers as a PeerCancelRequest ([`route`]). Secrets are
//! compared in constant time, and a session's key is removed when the session ends. What a
//! cancel may cost is bounded by [`gate`].

pub(crate) mod gate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster;
use crate::metrics::labels::CancelResult;
use crate::protocol::startup::CancelKey;
use crate::upstream::{Database, UpstreamError};

/// Where a cancel for one session must go.
#[derive(Clone)]
pub(crate) struct CancelTarget {
    /// The database entry the session is connected to.
    pub database: Arc<Database>,
    /// The upstream backend's pid.
    pub pid: i32,
    /// The upstream backend's secret.
    pub secret: i32,
}

struct Entry {
    secret: [u8; 4],
    target: CancelTarget,
}

/// Proxy key → upstream key.
#[derive(Default)]
pub(crate) struct CancelMap {
    entries: Mutex<HashMap<i32, Entry>>,
}

/// Removes the key from the map when the session ends.
pub(crate) struct Registration {
    map: Arc<CancelMap>,
    pid: i32,
    /// The key handed to the client: (pid, secret).
    pub key: (i32, i32),
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut entries) = self.map.entries.lock() {
            entries.remove(&self.pid);
        }
    }
}

impl CancelMap {
    /// Issues a fresh random key for `target`; with a replica `id` the pid carries it
    /// ([`crate::cluster::pid_with_id`]), so that any replica can route a cancel to this one.
    pub(crate) fn register(self: &Arc<Self>, target: CancelTarget, id: Option<u8>) -> Registration {
        let mut rng = rand::rng();
        let secret: i32 = rng.random();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let pid = loop {
            let pid = match id {
                None => rng.random_range(1..i32::MAX),
                Some(id) => cluster::pid_with_id(id, rng.random_range(1..=cluster::PID_LOW_MASK)),
            };
            if !entries.contains_key(&pid) {
                break pid;
            }
        };
        entries.insert(
            pid,
            Entry {
                secret: secret.to_be_bytes(),
                target,
            },
        );
        Registration {
            map: self.clone(),
            pid,
            key: (pid, secret),
        }
    }

    /// The target for a client's cancel key, if the key is one of ours.
    pub(crate) fn lookup(&self, key: &CancelKey) -> Option<CancelTarget> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(&key.pid)?;
        constant_time_eq(&entry.secret, &key.secret).then(|| entry.target.clone())
    }

    #[cfg(test)]
    /// Number of live keys.
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    #[cfg(test)]
    /// True when no session holds a key.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who sent a cancel request, as its packet says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelKind {
    /// A CancelRequest: a client's (libpq, drivers), plaintext or inside TLS.
    Client,
    /// A PeerCancelRequest: a client's cancel that a leasegate peer forwarded.
    Peer,
}

/// What to do with a cancel request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route<T> {
    /// The key is one of this instance's sessions: cancel upstream.
    Upstream(T),
    /// A client's cancel with a key unknown here: forward it to the peers, once.
    Peers,
    /// Nothing to do; the `leasegate_cancel_requests_total{result}` label says why.
    Drop(CancelResult),
}

/// Decides where a cancel goes. `from_peer`: the sender's certificate matches
/// `cluster.peer_identity`; `clustered`: `[cluster]` is configured; `lookup` finds the key
/// among this instance's sessions.
///
/// Loop-free by construction: only a client's CancelRequest can be routed to the peers, and
/// the peers receive it as a PeerCancelRequest, which is only ever looked up locally. A
/// PeerCancelRequest from anyone but a peer is dropped without a lookup.
pub(crate) fn route<T>(
    kind: CancelKind,
    from_peer: bool,
    clustered: bool,
    lookup: impl FnOnce() -> Option<T>,
) -> Route<T> {
    if kind == CancelKind::Peer && !from_peer {
        return Route::Drop(CancelResult::NotPeer);
    }
    match (lookup(), kind) {
        (Some(target), _) => Route::Upstream(target),
        (None, CancelKind::Client) if clustered => Route::Peers,
        (None, _) => Route::Drop(CancelResult::UnknownKey),
    }
}

/// Sends the cancel to the upstream, then waits for the upstream to close the connection, as
/// libpq does: PostgreSQL closes it once it has signalled the backend, and the caller closes
/// the client's cancel connection after this returns, which tells the client the same (libpq
/// and drivers such as Ruby's pg wait for that close before sending their next statement).
/// Failures are logged, never reported to the requester (PostgreSQL does not answer cancel
/// requests either).
pub(crate) async fn forward(target: CancelTarget) {
    let db = &target.database;
    let limit = Duration::from_secs(5).min(db.config.connect_timeout * 2);
    let attempt = async {
        let mut stream = db.connect().await?;
        let mut buf = bytes::BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(target.pid, target.secret, &mut buf);
        stream.write_all(&buf).await?;
        stream.flush().await?;
        Ok::<_, UpstreamError>(stream)
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(Ok(stream)) => match tokio::time::timeout(limit, closed(stream)).await {
            Ok(()) => tracing::debug!(database = %db.config.name, "cancel request forwarded"),
            Err(_) => tracing::debug!(database = %db.config.name,
                "cancel request forwarded; the upstream did not close the connection in time"),
        },
        Ok(Err(e)) => {
            tracing::warn!(database = %db.config.name, error = %e, "cancel forward failed")
        }
        Err(_) => tracing::warn!(database = %db.config.name, "cancel forward timed out"),
    }
}

/// Returns once the server has closed `stream` (no answer is expected; an error, e.g. a TLS
/// stream closed without close_notify, is a close too), then closes our side.
async fn closed(mut stream: crate::upstream::UpstreamStream) {
    let mut sink = [0u8; 64];
    while let Ok(1..) = stream.read(&mut sink).await {}
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> CancelTarget {
        target_at(5432)
    }

    fn target_at(port: u16) -> CancelTarget {
        let config: crate::config::DatabaseConfig = toml::from_str(&format!(
            "name = \"myapp\"\nhost = \"127.0.0.1\"\nport = {port}\nmount = \"database\"\nroles = [\"readonly\"]",
        ))
        .expect("database entry");
        CancelTarget {
            database: Arc::new(Database { config, tls: None }),
            pid: 42,
            secret: 7,
        }
    }

    #[test]
    fn keys_are_random_checked_and_removed_when_the_session_ends() {
        let map = Arc::new(CancelMap::default());
        let a = map.register(target(), None);
        let b = map.register(target(), None);
        assert_ne!(a.key, b.key, "every session gets its own key");
        let key = |(pid, secret): (i32, i32)| CancelKey {
            pid,
            secret: secret.to_be_bytes().to_vec(),
        };
        assert_eq!(map.lookup(&key(a.key)).map(|t| t.pid), Some(42));
        let wrong = CancelKey {
            pid: a.key.0,
            secret: a.key.1.wrapping_add(1).to_be_bytes().to_vec(),
        };
        assert!(
            map.lookup(&wrong).is_none(),
            "a wrong secret reaches nothing"
        );
        let (a_key, b_key) = (a.key, b.key);
        drop(a);
        assert!(
            map.lookup(&key(a_key)).is_none(),
            "key removed with its session"
        );
        assert!(map.lookup(&key(b_key)).is_some());
        drop(b);
        assert!(map.is_empty());
    }

    #[test]
    fn forwarded_cancels_are_never_forwarded_again() {
        use CancelKind::{Client, Peer};
        let known = || Some(1);
        let unknown = || None::<i32>;
        for from_peer in [false, true] {
            for clustered in [false, true] {
                // A peer's cancel is looked up here and nowhere else: never Route::Peers.
                let peer_known = route(Peer, from_peer, clustered, known);
                let peer_unknown = route(Peer, from_peer, clustered, unknown);
                if from_peer {
                    assert_eq!(peer_known, Route::Upstream(1));
                    assert_eq!(peer_unknown, Route::Drop(CancelResult::UnknownKey));
                } else {
                    assert_eq!(peer_known, Route::Drop(CancelResult::NotPeer));
                    assert_eq!(peer_unknown, Route::Drop(CancelResult::NotPeer));
                }
                // A client's cancel (even one sent with a peer's certificate) goes upstream
                // when known, to the peers once when unknown and clustered.
                assert_eq!(
                    route(Client, from_peer, clustered, known),
                    Route::Upstream(1)
                );
                let expected = if clustered {
                    Route::Peers
                } else {
                    Route::Drop(CancelResult::UnknownKey)
                };
                assert_eq!(route(Client, from_peer, clustered, unknown), expected);
            }
        }
        let looked_up = std::cell::Cell::new(false);
        let _ = route(Peer, false, true, || {
            looked_up.set(true);
            Some(1)
        });
        assert!(
            !looked_up.get(),
            "a non-peer's PeerCancel is not even looked up"
        );
    }

    /// libpq waits for the postmaster to close the cancel connection, "which indicates that
    /// it's processed the request" (else the cancel may hit the client's next statement), and
    /// so do drivers such as Ruby's pg: leasegate closes the client's cancel connection after
    /// [`forward`] returns, so `forward` must wait for the upstream's close too.
    #[tokio::test]
    async fn forward_returns_only_once_the_upstream_closed_the_cancel_connection() {
        use std::sync::atomic::{AtomicBool, Ordering};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("local address").port();
        let closed = Arc::new(AtomicBool::new(false));
        let upstream = tokio::spawn({
            let closed = closed.clone();
            async move {
                let (mut socket, _) = listener.accept().await.expect("accept");
                let mut packet = [0u8; 16];
                socket.read_exact(&mut packet).await.expect("cancel packet");
                // A postmaster slow to signal the backend closes the connection once it has.
                tokio::time::sleep(Duration::from_millis(300)).await;
                closed.store(true, Ordering::SeqCst);
                drop(socket);
                packet
            }
        });
        forward(target_at(port)).await;
        assert!(
            closed.load(Ordering::SeqCst),
            "forward returned before the upstream had processed the cancel"
        );
        let packet = tokio::time::timeout(Duration::from_secs(10), upstream)
            .await
            .expect("the fake upstream ends")
            .expect("fake upstream");
        let word = |i: usize| i32::from_be_bytes(packet[i..i + 4].try_into().expect("4 bytes"));
        assert_eq!((word(0), word(4)), (16, 80877102), "a CancelRequest");
        assert_eq!((word(8), word(12)), (42, 7), "the upstream's key");
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(&[1, 2, 3, 4], &[1, 2, 3, 4]));
        assert!(!constant_time_eq(&[1, 2, 3, 4], &[1, 2, 3, 5]));
        assert!(!constant_time_eq(&[1, 2, 3, 4], &[1, 2, 3]));
    }
}
