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

/// How a client reached leasegate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    /// Plaintext TCP (cancel requests only).
    Tcp,
    /// TLS over TCP with a client certificate.
    Tls,
    /// The local Unix socket.
    Unix,
}

impl Transport {
    /// The name used in logs, audit lines and `sessions list`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Unix => "unix",
        }
    }
}
