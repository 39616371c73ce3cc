//! The accept loop: one connection permit per client (so `max_connections` bounds memory), one
//! task per session on the shared tracker, each with a child of the sessions' stop token, run
//! on a session thread ([`crate::runtime::Shards`]).

pub(crate) mod unix;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::net::tune_socket;
use crate::runtime::Shards;
use crate::state::AppState;

/// Accepts until `accepting` is cancelled.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    state: Arc<AppState>,
    max_connections: usize,
    tracker: TaskTracker,
    accepting: CancellationToken,
    sessions: CancellationToken,
    shards: Shards,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = accepting.cancelled() => return,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = accepting.cancelled() => return,
        };
        tune_socket(&tcp, state.live.load().tcp_keepalive);
        let state = state.clone();
        let stop = sessions.child_token();
        shards.spawn(&tracker, tcp, move |tcp| async move {
            crate::session::run(state, tcp, peer, stop).await;
            drop(permit);
        });
    }
}
