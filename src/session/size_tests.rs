//! The session task holds its largest state for its whole life, so an idle session pays for
//! whatever its future is sized by. These tests check the shape that keeps it small: the
//! setup runs boxed, and the task holds the relay phase and little else.

use std::mem::size_of;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::*;

/// The size of the future `f` returns (`f` is never called).
fn future_size<A, B, C, D, Fut>(_: impl FnOnce(A, B, C, D) -> Fut) -> usize {
    size_of::<Fut>()
}

/// The future of `relay.run()`.
fn relay_phase_size() -> usize {
    future_size(|r: Box<Relay<'static>>, (), (), ()| r.run())
}

/// The future of the handshake: TLS, certificate, startup packet.
fn handshake_size() -> usize {
    future_size(
        |t: TcpStream, a: &'static tokio_rustls::TlsAcceptor, (), ()| handshake::accept(t, a),
    )
}

#[test]
fn the_session_task_is_sized_by_its_relay_phase_not_its_setup() {
    let run = future_size(
        |s: Arc<AppState>, t: TcpStream, (p, a): (SocketAddr, Admission), c: CancellationToken| {
            super::run(s, t, p, c, a)
        },
    );
    let relay = relay_phase_size();
    println!(
        "session task {run} B, relay phase {relay} B, handshake {}",
        handshake_size()
    );
    // The task adds only its own few locals (state, configuration, token) to the relay phase.
    assert!(
        run <= relay + 512,
        "session future {run} B, relay phase {relay} B"
    );
    assert!(
        run < handshake_size(),
        "the handshake is boxed, not inline in the task"
    );
}
