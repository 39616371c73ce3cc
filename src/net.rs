//! Socket tuning shared by the client listener and the upstream connections.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// NODELAY (the protocol is request/response) and TCP keepalive, so a peer that vanished
/// without closing is noticed and its session (and lease) ended: after `idle` without
/// traffic, probes every quarter of that (at least 1 s), three unanswered probes end it.
pub(crate) fn tune_socket(stream: &TcpStream, idle: Duration) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(idle)
        .with_interval((idle / 4).max(Duration::from_secs(1)))
        .with_retries(3);
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}
