//! The accept loop: one connection permit per client (so `max_connections` bounds memory), a
//! few more connections to find cancels among ([`crate::limits::slots`]), one task per
//! session on the shared tracker, each with a child of the sessions' stop token, run on a
//! session thread ([`crate::runtime::Shards`]).

pub(crate) mod unix;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::limits::slots::{Admission, Slots};
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
    let slots = Slots::new(max_connections);
    while let Some((admission, (tcp, peer))) =
        next_connection(&slots, &accepting, || listener.accept()).await
    {
        tune_socket(&tcp, state.live.load().tcp_keepalive);
        let state = state.clone();
        let stop = sessions.child_token();
        shards.spawn(&tracker, tcp, move |tcp| {
            crate::session::run(state, tcp, peer, stop, admission)
        });
    }
}

/// The next connection of a listener (TCP or Unix socket) with the slot it holds: the slot is
/// taken before `accept`, so past `max_connections` and the overflow slots further
/// connections wait in the kernel's queue and cost no file descriptor. A session permit taken
/// so goes to a connection that starts waiting for one meanwhile ([`Admission::hand_on`]). A
/// failed accept (EMFILE and friends) backs off briefly instead of spinning. `None` once
/// `accepting` is cancelled.
pub(crate) async fn next_connection<T, F>(
    slots: &Arc<Slots>,
    accepting: &CancellationToken,
    mut accept: impl FnMut() -> F,
) -> Option<(Admission, T)>
where
    F: Future<Output = std::io::Result<T>>,
{
    let mut admission = slots.next(accepting).await?;
    loop {
        tokio::select! {
            () = admission.waiter_came() => admission = admission.hand_on(accepting).await?,
            r = accept() => match r {
                Ok(conn) => return Some((admission, conn)),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = accepting.cancelled() => return None,
        }
    }
}
