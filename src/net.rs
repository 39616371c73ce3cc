//! Socket tuning shared by the client listener and the upstream connections, and how a client
//! reached leasegate ([`Transport`], [`ClientAddr`]).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
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

/// Where a client connection came from: a TCP address, or a process on the local Unix socket
/// (known by the kernel's `SO_PEERCRED`, never by what it sends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientAddr {
    /// The TCP listener's client (TLS sessions, plaintext cancel requests).
    Tcp(SocketAddr),
    /// A process on the Unix socket.
    Unix {
        /// The peer's user id, which keys its cancel rate limit.
        uid: u32,
        /// The peer's process id when the kernel gave one, for logs and audit lines.
        pid: Option<i32>,
    },
}

impl ClientAddr {
    /// The listener a connection came through (the TCP listener's is TLS).
    pub(crate) fn transport(&self) -> Transport {
        match self {
            ClientAddr::Tcp(_) => Transport::Tls,
            ClientAddr::Unix { .. } => Transport::Unix,
        }
    }

    /// The key of the per-address cancel rate limit: the IP address for TCP, the user id for
    /// the Unix socket (mapped into `100::/16`, a reserved range no TCP client comes from,
    /// with the uid in the /64 prefix the limiter groups IPv6 addresses by).
    pub(crate) fn rate_key(&self) -> IpAddr {
        match self {
            ClientAddr::Tcp(addr) => addr.ip(),
            ClientAddr::Unix { uid, .. } => {
                let (hi, lo) = ((uid >> 16) as u16, (uid & 0xffff) as u16);
                IpAddr::V6(Ipv6Addr::new(0x0100, 0, hi, lo, 0, 0, 0, 0))
            }
        }
    }
}

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientAddr::Tcp(addr) => addr.fmt(f),
            ClientAddr::Unix {
                uid,
                pid: Some(pid),
            } => write!(f, "unix:uid={uid},pid={pid}"),
            ClientAddr::Unix { uid, pid: None } => write!(f, "unix:uid={uid}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_peers_are_rate_limited_per_uid_apart_from_tcp_clients() {
        let unix = |uid| ClientAddr::Unix { uid, pid: Some(7) };
        assert_ne!(unix(0).rate_key(), unix(1).rate_key());
        assert_ne!(unix(0x1_0000).rate_key(), unix(0).rate_key());
        assert_eq!(
            unix(5).rate_key(),
            ClientAddr::Unix { uid: 5, pid: None }.rate_key()
        );
        let tcp = ClientAddr::Tcp("127.0.0.1:5432".parse().expect("addr"));
        assert_eq!(tcp.rate_key().to_string(), "127.0.0.1");
        assert_eq!(unix(1000).to_string(), "unix:uid=1000,pid=7");
        assert_eq!(unix(1000).transport().as_str(), "unix");
        assert_eq!(tcp.transport(), Transport::Tls);
    }
}
