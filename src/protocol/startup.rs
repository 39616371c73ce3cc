//! Reading the packets a client sends before it is authenticated: SSLRequest, GSSENCRequest,
//! CancelRequest and StartupMessage, and leasegate's own PeerCancelRequest (a cancel one
//! instance forwards to another). Reads are exact (never past the packet), so bytes a client
//! pipelines after an SSLRequest are left on the socket for the TLS layer to reject instead of
//! being mistaken for post-TLS input (the bug class of CVE-2021-23214).

use std::collections::BTreeMap;

use bytes::{Buf, BytesMut};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::Startup;
use pgwire::messages::{DecodeContext, Message, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest pre-authentication packet accepted, as PostgreSQL's own `MAX_STARTUP_PACKET_LENGTH`.
pub const MAX_STARTUP_PACKET: usize = 10_000;

const SSL_REQUEST_CODE: u32 = 80_877_103;
const GSSENC_REQUEST_CODE: u32 = 80_877_104;
const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Request code of a cancel forwarded by a leasegate peer: leasegate's own (major version
/// 0x4c47, "LG", which no PostgreSQL client sends), laid out as a CancelRequest. Only a peer
/// sends it, only inside TLS, and it is never forwarded again, so forwarding cannot loop.
pub const PEER_CANCEL_REQUEST_CODE: u32 = 0x4c47_0001;

/// One packet of the pre-authentication phase.
#[derive(Debug)]
pub enum InitialPacket {
    /// The client asks to switch to TLS.
    SslRequest,
    /// The client asks for GSSAPI encryption, which leasegate does not offer.
    GssEncRequest,
    /// A query cancellation for the session the key belongs to.
    Cancel(CancelKey),
    /// A client's cancellation that a leasegate peer forwarded.
    PeerCancel(CancelKey),
    /// The start of a session.
    Startup(StartupRequest),
}

/// A cancel key as it appears on the wire (protocol 3.0 keys are 4 bytes, 3.2 up to 256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelKey {
    /// Process id part of the key.
    pub pid: i32,
    /// Secret part of the key.
    pub secret: Vec<u8>,
}

/// A decoded StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupRequest {
    /// Protocol major version (3 for every current client).
    pub major: u16,
    /// Protocol minor version.
    pub minor: u16,
    /// Startup parameters (user, database, application_name, options, ...).
    pub params: BTreeMap<String, String>,
}

/// Why a pre-authentication packet was refused.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The socket failed or closed mid-packet.
    #[error("connection lost during startup: {0}")]
    Io(std::io::Error),
    /// Length field below the minimum or above [`MAX_STARTUP_PACKET`].
    #[error("invalid startup packet length {0}")]
    BadLength(u32),
    /// A protocol version leasegate does not speak.
    #[error("unsupported frontend protocol {0}.{1}: server supports 3.0 to 3.0")]
    UnsupportedVersion(u16, u16),
    /// The packet could not be decoded.
    #[error("invalid startup packet layout: {0}")]
    Malformed(String),
    /// A parameter name or value is not UTF-8 (which leasegate would otherwise pass on
    /// altered). Holds the name, shown safely.
    #[error("invalid startup packet: parameter {0} is not valid UTF-8")]
    NotUtf8(String),
}

impl From<std::io::Error> for PacketError {
    fn from(e: std::io::Error) -> Self {
        PacketError::Io(e)
    }
}

/// Reads exactly one pre-authentication packet from `stream`.
pub async fn read_initial_packet<S>(stream: &mut S) -> Result<InitialPacket, PacketError>
where
    S: AsyncRead + Unpin,
{
    let len = stream.read_u32().await?;
    if !(8..=MAX_STARTUP_PACKET as u32).contains(&len) {
        return Err(PacketError::BadLength(len));
    }
    let mut buf = BytesMut::zeroed(len as usize);
    buf[..4].copy_from_slice(&len.to_be_bytes());
    stream.read_exact(&mut buf[4..]).await?;
    parse_initial_packet(buf)
}

/// Decodes a complete pre-authentication packet (length prefix included).
pub fn parse_initial_packet(mut buf: BytesMut) -> Result<InitialPacket, PacketError> {
    if buf.len() < 8 {
        return Err(PacketError::BadLength(buf.len() as u32));
    }
    let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    match code {
        SSL_REQUEST_CODE if buf.len() == 8 => Ok(InitialPacket::SslRequest),
        GSSENC_REQUEST_CODE if buf.len() == 8 => Ok(InitialPacket::GssEncRequest),
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => Err(PacketError::Malformed(
            "encryption request with a body".into(),
        )),
        CANCEL_REQUEST_CODE => decode_cancel(buf),
        PEER_CANCEL_REQUEST_CODE => decode_peer_cancel(&buf),
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(PacketError::UnsupportedVersion(major, minor));
            }
            check_parameter_list(&buf[8..])?;
            let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
            let startup = Startup::decode(&mut buf, &ctx)
                .map_err(|e| PacketError::Malformed(e.to_string()))?
                .ok_or_else(|| PacketError::Malformed("truncated startup packet".into()))?;
            Ok(InitialPacket::Startup(StartupRequest {
                major: startup.protocol_number_major,
                minor: startup.protocol_number_minor,
                params: startup.parameters,
            }))
        }
    }
}

/// The parameter list must be name/value C strings ending with one empty name exactly at the
/// end of the packet, as PostgreSQL requires; anything else is a malformed packet. Names and
/// values must be UTF-8: decoding them lossily would send the upstream something else than
/// the client sent.
fn check_parameter_list(mut list: &[u8]) -> Result<(), PacketError> {
    let malformed = |what: &str| Err(PacketError::Malformed(what.to_owned()));
    loop {
        let Some(name_end) = list.iter().position(|b| *b == 0) else {
            return malformed("startup packet not terminated");
        };
        if name_end == 0 {
            return if list.len() == 1 {
                Ok(())
            } else {
                malformed("data after the end of the startup parameters")
            };
        }
        let rest = &list[name_end + 1..];
        let Some(value_end) = rest.iter().position(|b| *b == 0) else {
            return malformed("startup parameter without a value");
        };
        let name = &list[..name_end];
        if std::str::from_utf8(name).is_err() || std::str::from_utf8(&rest[..value_end]).is_err() {
            return Err(PacketError::NotUtf8(shown(name)));
        }
        list = &rest[value_end + 1..];
    }
}

/// A parameter name for a message: lossily decoded, quoted, escaped, at most 64 characters.
fn shown(name: &[u8]) -> String {
    let text = String::from_utf8_lossy(name);
    let mut out: String = text.chars().take(64).flat_map(char::escape_debug).collect();
    if text.chars().nth(64).is_some() {
        out.push('…');
    }
    format!("\"{out}\"")
}

fn decode_cancel(mut buf: BytesMut) -> Result<InitialPacket, PacketError> {
    if !(16..=12 + 256).contains(&buf.len()) {
        return Err(PacketError::Malformed(
            "cancel request of invalid length".into(),
        ));
    }
    let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_2);
    let req = CancelRequest::decode(&mut buf, &ctx)
        .map_err(|e| PacketError::Malformed(e.to_string()))?
        .ok_or_else(|| PacketError::Malformed("truncated cancel request".into()))?;
    let mut secret = req.secret_key.to_bytes();
    let secret = secret.copy_to_bytes(secret.remaining()).to_vec();
    Ok(InitialPacket::Cancel(CancelKey {
        pid: req.pid,
        secret,
    }))
}

/// A PeerCancelRequest: length, code, pid, secret (4 to 256 bytes), as a CancelRequest.
fn decode_peer_cancel(buf: &[u8]) -> Result<InitialPacket, PacketError> {
    if !(16..=12 + 256).contains(&buf.len()) {
        return Err(PacketError::Malformed(
            "peer cancel request of invalid length".into(),
        ));
    }
    Ok(InitialPacket::PeerCancel(CancelKey {
        pid: i32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
        secret: buf[12..].to_vec(),
    }))
}

/// The wire form of a PeerCancelRequest for `key`.
pub fn peer_cancel_packet(key: &CancelKey) -> Vec<u8> {
    let mut packet = Vec::with_capacity(12 + key.secret.len());
    packet.extend_from_slice(&((12 + key.secret.len()) as u32).to_be_bytes());
    packet.extend_from_slice(&PEER_CANCEL_REQUEST_CODE.to_be_bytes());
    packet.extend_from_slice(&key.pid.to_be_bytes());
    packet.extend_from_slice(&key.secret);
    packet
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn packet(code: u32, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32(8 + body.len() as u32);
        b.put_u32(code);
        b.put_slice(body);
        b
    }

    #[test]
    fn decodes_ssl_gss_and_cancel() {
        assert!(matches!(
            parse_initial_packet(packet(SSL_REQUEST_CODE, b"")),
            Ok(InitialPacket::SslRequest)
        ));
        assert!(matches!(
            parse_initial_packet(packet(GSSENC_REQUEST_CODE, b"")),
            Ok(InitialPacket::GssEncRequest)
        ));
        let mut body = Vec::new();
        body.extend_from_slice(&7i32.to_be_bytes());
        body.extend_from_slice(&[1, 2, 3, 4]);
        match parse_initial_packet(packet(CANCEL_REQUEST_CODE, &body)) {
            Ok(InitialPacket::Cancel(k)) => {
                assert_eq!(k.pid, 7);
                assert_eq!(k.secret, vec![1, 2, 3, 4]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn peer_cancels_are_their_own_packet() {
        let key = CancelKey {
            pid: 7,
            secret: vec![1, 2, 3, 4],
        };
        let wire = peer_cancel_packet(&key);
        match parse_initial_packet(BytesMut::from(&wire[..])) {
            Ok(InitialPacket::PeerCancel(k)) => assert_eq!(k, key),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse_initial_packet(packet(PEER_CANCEL_REQUEST_CODE, &[0, 0, 0, 7])),
            Err(PacketError::Malformed(_))
        ));
    }

    #[test]
    fn decodes_startup_parameters() {
        let body = b"user\0readonly\0database\0myapp\0\0";
        match parse_initial_packet(packet(196_608, body)) {
            Ok(InitialPacket::Startup(s)) => {
                assert_eq!((s.major, s.minor), (3, 0));
                assert_eq!(s.params.get("user").map(String::as_str), Some("readonly"));
                assert_eq!(s.params.get("database").map(String::as_str), Some("myapp"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rejects_bad_versions_and_layouts() {
        assert!(matches!(
            parse_initial_packet(packet(2 << 16, b"user\0x\0\0")),
            Err(PacketError::UnsupportedVersion(2, 0))
        ));
        assert!(matches!(
            parse_initial_packet(packet(196_608, b"user\0x")),
            Err(PacketError::Malformed(_))
        ));
        assert!(matches!(
            parse_initial_packet(packet(SSL_REQUEST_CODE, b"xx")),
            Err(PacketError::Malformed(_))
        ));
        // The last value's NUL is not the list terminator.
        assert!(matches!(
            parse_initial_packet(packet(196_608, b"user\0readonly\0database\0myapp\0")),
            Err(PacketError::Malformed(_))
        ));
        // Nothing may follow the terminator.
        assert!(matches!(
            parse_initial_packet(packet(196_608, b"user\0readonly\0\0database\0myapp\0\0")),
            Err(PacketError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_parameters_that_are_not_utf8() {
        let refused = |body: &[u8]| match parse_initial_packet(packet(196_608, body)) {
            Err(e @ PacketError::NotUtf8(_)) => e.to_string(),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(
            refused(b"user\0readonly\0application_name\0caf\xe9\0\0"),
            "invalid startup packet: parameter \"application_name\" is not valid UTF-8"
        );
        assert_eq!(
            refused(b"user\0read\xffonly\0\0"),
            "invalid startup packet: parameter \"user\" is not valid UTF-8"
        );
        assert_eq!(
            refused(b"\xff\n\xfe\0x\0\0"),
            "invalid startup packet: parameter \"\u{fffd}\\n\u{fffd}\" is not valid UTF-8"
        );
        // UTF-8 beyond ASCII is fine.
        assert!(matches!(
            parse_initial_packet(packet(196_608, "user\0r\0application_name\0café ☕\0\0".as_bytes())),
            Ok(InitialPacket::Startup(s)) if s.params["application_name"] == "café ☕"
        ));
    }

    #[tokio::test]
    async fn refuses_oversized_and_tiny_lengths() {
        let mut big: &[u8] = &[0, 1, 0, 0, 0, 3, 0, 0];
        assert!(matches!(
            read_initial_packet(&mut big).await,
            Err(PacketError::BadLength(65536))
        ));
        let mut tiny: &[u8] = &[0, 0, 0, 4];
        assert!(matches!(
            read_initial_packet(&mut tiny).await,
            Err(PacketError::BadLength(4))
        ));
    }

    #[tokio::test]
    async fn reads_exactly_one_packet_and_leaves_pipelined_bytes() {
        let mut wire = packet(SSL_REQUEST_CODE, b"").to_vec();
        wire.extend_from_slice(b"\0\0\0\x08pipelined");
        let mut reader: &[u8] = &wire;
        assert!(matches!(
            read_initial_packet(&mut reader).await,
            Ok(InitialPacket::SslRequest)
        ));
        assert_eq!(reader, b"\0\0\0\x08pipelined");
    }
}
