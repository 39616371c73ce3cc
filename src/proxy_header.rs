//! The PROXY protocol header (v1 text and v2 binary, as HAProxy, NLBs and most TCP load
//! balancers send it) that a trusted load balancer puts before the client's bytes. Only
//! connections from `listen.proxy_protocol_from` carry one, and every one of those must: its
//! source address then stands for the client everywhere (audit log, logs, per-source cancel
//! limits). A connection from anywhere else is read as PostgreSQL from its first byte, so a
//! header it sends is a malformed packet (08P01), refused before any Vault call.
//!
//! The header is read with exact reads (never more than the header, so the PostgreSQL bytes
//! after it stay in the socket), inside the session task and under `login_timeout`; parsing
//! is the `ppp` crate's.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature (12 bytes).
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header's first bytes.
const V1_PREFIX: &[u8; 5] = b"PROXY";
/// The longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The most address and TLV bytes of a v2 header accepted: addresses are at most 216 bytes
/// (Unix), HAProxy's TLVs add a few hundred.
const V2_MAX_BODY: usize = 2048;

/// Why a connection from a trusted network was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyHeaderError {
    /// The connection started with something else than a PROXY header.
    #[error("a PROXY protocol header is required from this address")]
    Missing,
    /// A header that does not parse (or is too long).
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(String),
    /// The connection ended or failed while the header was read.
    #[error("reading the PROXY protocol header failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Whether connections from `ip` must start with a PROXY header.
pub(crate) fn trusted(from: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    from.iter().any(|net| net.contains(&ip))
}

/// The client address for a connection from `peer`: `peer` itself unless it is in `from`, in
/// which case the PROXY header read from `stream` says. A `LOCAL` header (a load balancer's
/// own health check) and an address family without IP addresses keep `peer`.
pub(crate) async fn client_address<S: AsyncRead + Unpin>(
    stream: &mut S,
    peer: SocketAddr,
    from: &[IpNet],
) -> Result<SocketAddr, ProxyHeaderError> {
    if !trusted(from, peer.ip()) {
        return Ok(peer);
    }
    let mut start = [0u8; 5];
    stream.read_exact(&mut start).await?;
    let source = if &start == V1_PREFIX {
        read_v1(stream, start).await?
    } else if start == V2_SIGNATURE[..5] {
        read_v2(stream, start).await?
    } else {
        return Err(ProxyHeaderError::Missing);
    };
    Ok(source.unwrap_or(peer))
}

/// The rest of a v1 header, byte by byte up to its CRLF.
async fn read_v1<S: AsyncRead + Unpin>(
    stream: &mut S,
    start: [u8; 5],
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut line = start.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(ProxyHeaderError::Invalid("v1 header without CRLF".into()));
        }
        line.push(stream.read_u8().await?);
    }
    parse_v1(&line)
}

/// A complete v1 header line.
fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use ppp::v1::{Addresses, Header};
    let text =
        std::str::from_utf8(line).map_err(|_| ProxyHeaderError::Invalid("v1: not ASCII".into()))?;
    let header = Header::try_from(text).map_err(|e| ProxyHeaderError::Invalid(e.to_string()))?;
    Ok(match header.addresses {
        Addresses::Tcp4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::Tcp6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::Unknown => None,
    })
}

/// The rest of a v2 header: its fixed 16 bytes, then exactly the length they announce.
async fn read_v2<S: AsyncRead + Unpin>(
    stream: &mut S,
    start: [u8; 5],
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut header = vec![0u8; 16];
    header[..5].copy_from_slice(&start);
    stream.read_exact(&mut header[5..]).await?;
    if header[..12] != V2_SIGNATURE {
        return Err(ProxyHeaderError::Missing);
    }
    let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
    if len > V2_MAX_BODY {
        return Err(ProxyHeaderError::Invalid(format!(
            "v2 header of {len} bytes"
        )));
    }
    header.resize(16 + len, 0);
    stream.read_exact(&mut header[16..]).await?;
    parse_v2(&header)
}

/// A complete v2 header.
fn parse_v2(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use ppp::v2::{Addresses, Command, Header};
    let header = Header::try_from(bytes).map_err(|e| ProxyHeaderError::Invalid(e.to_string()))?;
    if header.command == Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        Addresses::IPv4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::IPv6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::Unspecified | Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().expect("net")).collect()
    }

    /// Sends `header` then an SSLRequest from `peer`; returns the address read and what is
    /// left in the stream after it.
    async fn read(
        header: &[u8],
        peer: &str,
        from: &[&str],
    ) -> (Result<SocketAddr, ProxyHeaderError>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(header).await.expect("write");
        client.write_all(&SSL_REQUEST).await.expect("write");
        drop(client);
        let got = client_address(&mut server, peer.parse().expect("peer"), &nets(from)).await;
        let mut rest = Vec::new();
        let _ = server.read_to_end(&mut rest).await;
        (got, rest)
    }

    fn v2(command: u8, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        ppp::v2::Builder::with_addresses(0x20 | command, ppp::v2::Protocol::Stream, (src, dst))
            .write_tlv(ppp::v2::Type::NoOp, &[0; 3])
            .expect("tlv")
            .build()
            .expect("v2 header")
    }

    #[tokio::test]
    async fn a_trusted_v2_header_gives_the_client_address_and_leaves_the_postgres_bytes() {
        let client: SocketAddr = "203.0.113.7:51234".parse().expect("addr");
        let header = v2(1, client, "10.0.0.5:6432".parse().expect("addr"));
        let (got, rest) = read(&header, "10.1.2.3:40000", &["10.0.0.0/8"]).await;
        assert_eq!(got.expect("address"), client);
        assert_eq!(rest, SSL_REQUEST, "exactly the header was read");
        let v6: SocketAddr = "[2001:db8::7]:5000".parse().expect("addr");
        let header = v2(1, v6, "[2001:db8::1]:6432".parse().expect("addr"));
        let (got, _) = read(&header, "[::ffff:10.1.2.3]:1", &["10.0.0.0/8"]).await;
        assert_eq!(
            got.expect("address"),
            v6,
            "v4-mapped peers match v4 networks"
        );
    }

    #[tokio::test]
    async fn a_local_header_keeps_the_connection_address() {
        let any: SocketAddr = "192.0.2.1:1".parse().expect("addr");
        let header = v2(0, any, any);
        let (got, rest) = read(&header, "127.0.0.1:9999", &["127.0.0.1/32"]).await;
        assert_eq!(
            got.expect("address"),
            "127.0.0.1:9999".parse().expect("addr")
        );
        assert_eq!(rest, SSL_REQUEST);
    }

    #[tokio::test]
    async fn v1_headers_are_read_to_their_crlf() {
        let line = b"PROXY TCP4 198.51.100.2 10.0.0.5 40001 6432\r\n";
        let (got, rest) = read(line, "10.9.9.9:1", &["10.0.0.0/8"]).await;
        assert_eq!(
            got.expect("address"),
            "198.51.100.2:40001".parse().expect("addr")
        );
        assert_eq!(rest, SSL_REQUEST);
        let (got, _) = read(b"PROXY UNKNOWN\r\n", "10.9.9.9:1", &["10.0.0.0/8"]).await;
        assert_eq!(got.expect("address"), "10.9.9.9:1".parse().expect("addr"));
        let long = [b"PROXY ".as_slice(), &[b'x'; 200]].concat();
        let (got, _) = read(&long, "10.9.9.9:1", &["10.0.0.0/8"]).await;
        assert!(matches!(got, Err(ProxyHeaderError::Invalid(_))), "{got:?}");
    }

    #[tokio::test]
    async fn a_trusted_source_without_a_header_is_refused_and_others_are_not_read() {
        let (got, _) = read(b"", "10.1.2.3:1", &["10.0.0.0/8"]).await;
        assert!(matches!(got, Err(ProxyHeaderError::Missing)), "{got:?}");
        let header = v2(
            1,
            "203.0.113.7:1".parse().expect("a"),
            "10.0.0.5:2".parse().expect("a"),
        );
        let (got, rest) = read(&header, "192.0.2.1:5", &["10.0.0.0/8"]).await;
        assert_eq!(
            got.expect("untrusted: as connected"),
            "192.0.2.1:5".parse().expect("a")
        );
        assert_eq!(
            rest.len(),
            header.len() + 8,
            "nothing read from an untrusted source"
        );
        let (got, _) = read(b"", "10.1.2.3:1", &[]).await;
        assert!(got.is_ok(), "no networks: PROXY protocol off");
    }

    #[tokio::test]
    async fn garbage_after_the_v2_signature_is_invalid() {
        let mut header = v2(
            1,
            "203.0.113.7:1".parse().expect("a"),
            "10.0.0.5:2".parse().expect("a"),
        );
        header[12] = 0x31; // version 3
        let (got, _) = read(&header, "10.1.2.3:1", &["10.0.0.0/8"]).await;
        assert!(matches!(got, Err(ProxyHeaderError::Invalid(_))), "{got:?}");
        let mut huge = v2(
            1,
            "203.0.113.7:1".parse().expect("a"),
            "10.0.0.5:2".parse().expect("a"),
        );
        huge[14..16].copy_from_slice(&60000u16.to_be_bytes());
        let (got, _) = read(&huge, "10.1.2.3:1", &["10.0.0.0/8"]).await;
        assert!(matches!(got, Err(ProxyHeaderError::Invalid(_))), "{got:?}");
    }
}
