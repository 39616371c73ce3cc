//! The client side of session setup: SSL negotiation with exact reads, the TLS handshake, the
//! client certificate, and the StartupMessage read inside TLS. Refusals that can still be
//! told to the client are written here, as ErrorResponse, before the error is returned.

use std::collections::BTreeMap;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::cancel::CancelKind;
use crate::error::SessionError;
use crate::identity::Principal;
use crate::net::Transport;
use crate::protocol::options::parse_bool;
use crate::protocol::startup::{CancelKey, InitialPacket, StartupRequest, read_initial_packet};
use crate::tls::server::ALPN_POSTGRESQL;

pub(crate) use super::client_stream::ClientStream;

/// What the pre-authentication phase produced.
// Lives for one handshake and is matched at once: boxing the cancel would buy nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Accepted {
    /// A cancel request (plaintext, or inside TLS as PostgreSQL 17 clients and peers send
    /// it), with the sender's certificate identity when it came over TLS with one.
    Cancel(CancelRequest),
    /// A client ready for policy checks.
    Session(Box<ClientHello>),
}

/// A cancel request and the connection it came on, which is closed only after the cancel
/// was forwarded (as PostgreSQL does; libpq 17 waits for the close, over TLS for
/// close_notify).
pub(crate) struct CancelRequest {
    /// A client's CancelRequest or a peer's PeerCancelRequest (inside TLS only).
    pub kind: CancelKind,
    /// The key the client presented.
    pub key: CancelKey,
    /// The sender's certificate identity, when it came over TLS with one (peers).
    pub sender: Option<Principal>,
    /// The connection to close afterwards.
    pub conn: CancelConn,
}

/// The connection a cancel request came on.
pub(crate) enum CancelConn {
    /// libpq ≤ 16: plaintext.
    Plain(TcpStream),
    /// PostgreSQL 17 clients and peers: inside TLS.
    Tls(Box<ClientStream>),
    /// Over the local Unix socket.
    Unix(UnixStream),
}

impl CancelConn {
    /// How the cancel request came.
    pub(crate) fn transport(&self) -> Transport {
        match self {
            CancelConn::Plain(_) => Transport::Tcp,
            CancelConn::Tls(_) => Transport::Tls,
            CancelConn::Unix(_) => Transport::Unix,
        }
    }

    /// Closes the connection (TLS with close_notify), bounded in time.
    pub(crate) async fn close(self) {
        let close = async {
            match self {
                CancelConn::Plain(mut s) => s.shutdown().await,
                CancelConn::Tls(mut s) => s.shutdown().await,
                CancelConn::Unix(mut s) => s.shutdown().await,
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), close).await;
    }
}

/// A client with a verified identity and its startup request.
pub(crate) struct ClientHello {
    /// The TLS (or Unix-socket) stream, positioned after the StartupMessage; boxed so that
    /// the session's futures, which move the hello from step to step, each carry a pointer,
    /// not the stream.
    pub stream: Box<ClientStream>,
    /// Who the certificate (or the kernel, for the Unix socket) says the client is.
    pub principal: Principal,
    /// Requested Vault role (the startup `user`).
    pub role: String,
    /// Requested database (the startup `database`, default the user).
    pub database: String,
    /// Protocol minor version the client asked for.
    pub minor: u16,
    /// Every startup parameter, for forwarding.
    pub params: BTreeMap<String, String>,
}

/// Writes `err` to the client as a FATAL ErrorResponse, best effort, and closes the write side.
pub(crate) async fn report<S: AsyncWrite + Unpin>(stream: &mut S, err: &SessionError) {
    if !err.reportable() {
        return;
    }
    let mut buf = BytesMut::new();
    err.encode(&mut buf);
    let write = async {
        stream.write_all(&buf).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), write).await;
}

/// First byte of a TLS handshake record: a PostgreSQL 17 client in `sslnegotiation=direct`
/// mode starts TLS at once instead of sending an SSLRequest.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Runs SSL negotiation (or direct TLS), TLS and the startup packet. The caller bounds the
/// time.
pub(crate) async fn accept(
    mut tcp: TcpStream,
    acceptor: &TlsAcceptor,
) -> Result<Accepted, SessionError> {
    let mut first = [0u8; 1];
    let direct = matches!(tcp.peek(&mut first).await, Ok(1) if first[0] == TLS_HANDSHAKE_RECORD);
    if !direct && let Some(key) = negotiate(&mut tcp).await? {
        return Ok(Accepted::Cancel(CancelRequest {
            kind: CancelKind::Client,
            key,
            sender: None,
            conn: CancelConn::Plain(tcp),
        }));
    }
    let mut stream = acceptor.accept(tcp).await.map_err(SessionError::Tls)?;
    if direct && stream.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
        return fail(&mut stream, SessionError::NoAlpn).await;
    }
    after_tls(stream).await
}

/// The plaintext pre-TLS exchange: GSSENCRequest → `N`, SSLRequest → `S` (then `None`: go on
/// with TLS), or a plaintext CancelRequest (its key).
async fn negotiate(tcp: &mut TcpStream) -> Result<Option<CancelKey>, SessionError> {
    let mut gss_refused = false;
    loop {
        match read_initial_packet(tcp).await {
            Ok(InitialPacket::SslRequest) => {
                tcp.write_all(b"S").await.map_err(SessionError::Tls)?;
                return Ok(None);
            }
            Ok(InitialPacket::GssEncRequest) if !gss_refused => {
                gss_refused = true;
                tcp.write_all(b"N").await.map_err(SessionError::Tls)?;
            }
            Ok(InitialPacket::Cancel(key)) => return Ok(Some(key)),
            Ok(InitialPacket::PeerCancel(_)) => {
                return fail(tcp, SessionError::PlaintextPeerCancel).await;
            }
            Ok(InitialPacket::Startup(_)) => return fail(tcp, SessionError::Plaintext).await,
            Ok(InitialPacket::GssEncRequest) => {
                return fail(tcp, SessionError::GssEncTwice).await;
            }
            Err(e) => return fail(tcp, e.into()).await,
        }
    }
}

/// Inside TLS: the client certificate and the StartupMessage (or an encrypted cancel).
async fn after_tls(stream: TlsStream<TcpStream>) -> Result<Accepted, SessionError> {
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .cloned();
    let mut stream = ClientStream::Tls(stream);
    let startup = match read_initial_packet(&mut stream).await {
        Ok(InitialPacket::Startup(s)) => s,
        Ok(InitialPacket::Cancel(key)) => {
            return Ok(tls_cancel(CancelKind::Client, key, cert, stream));
        }
        Ok(InitialPacket::PeerCancel(key)) => {
            return Ok(tls_cancel(CancelKind::Peer, key, cert, stream));
        }
        Ok(InitialPacket::SslRequest | InitialPacket::GssEncRequest) => {
            return fail(&mut stream, SessionError::NegotiationInsideTls).await;
        }
        Err(e) => return fail(&mut stream, e.into()).await,
    };
    let Some(cert) = cert else {
        return fail(&mut stream, SessionError::NoClientCert).await;
    };
    let principal = match Principal::from_certificate(&cert) {
        Ok(p) => p,
        Err(msg) => return fail(&mut stream, SessionError::BadCertificate(msg)).await,
    };
    let (role, database) = match requested(&startup) {
        Ok(names) => names,
        Err(e) => return fail(&mut stream, e).await,
    };
    Ok(Accepted::Session(Box::new(ClientHello {
        stream: Box::new(stream),
        principal,
        role,
        database,
        minor: startup.minor,
        params: startup.params,
    })))
}

/// A cancel that came inside TLS, with the sender's identity when its certificate (verified
/// by the handshake) is valid now.
fn tls_cancel(
    kind: CancelKind,
    key: CancelKey,
    cert: Option<rustls::pki_types::CertificateDer<'static>>,
    stream: ClientStream,
) -> Accepted {
    let sender = cert
        .as_ref()
        .and_then(|c| Principal::from_certificate(c).ok());
    Accepted::Cancel(CancelRequest {
        kind,
        key,
        sender,
        conn: CancelConn::Tls(Box::new(stream)),
    })
}

/// The requested role and database, or why the startup packet is refused.
pub(super) fn requested(startup: &StartupRequest) -> Result<(String, String), SessionError> {
    let params = &startup.params;
    let Some(role) = params.get("user").filter(|u| !u.is_empty()).cloned() else {
        return Err(SessionError::NoUser);
    };
    // PostgreSQL's reading: exactly `database`, else a boolean (`parse_bool`).
    if let Some(mode) = params.get("replication") {
        match parse_bool(mode) {
            Some(false) => {}
            Some(true) => return Err(SessionError::Replication),
            None if mode == "database" => return Err(SessionError::Replication),
            None => return Err(SessionError::ReplicationValue(mode.clone())),
        }
    }
    let database = params
        .get("database")
        .filter(|d| !d.is_empty())
        .cloned()
        .unwrap_or_else(|| role.clone());
    Ok((role, database))
}

pub(super) async fn fail<S: AsyncWrite + Unpin, T>(
    stream: &mut S,
    err: SessionError,
) -> Result<T, SessionError> {
    report(stream, &err).await;
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replication(mode: &str) -> Result<(String, String), SessionError> {
        let params = [("user", "readonly"), ("replication", mode)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        requested(&StartupRequest {
            major: 3,
            minor: 0,
            params,
        })
    }

    #[test]
    fn replication_is_read_as_postgres_reads_it() {
        for off in ["false", "FALSE", "f", "off", "OfF", "of", "n", "no", "0"] {
            assert!(replication(off).is_ok(), "{off}");
        }
        for on in ["true", "t", "on", "yes", "Y", "1", "database"] {
            let e = replication(on).expect_err(on);
            assert_eq!(e.sqlstate().code(), "0A000", "{on}");
        }
        for bad in ["maybe", "", "o", "DATABASE", "2", "false "] {
            let e = replication(bad).expect_err(bad);
            assert_eq!(e.sqlstate().code(), "22023", "{bad:?}");
            assert!(e.client_message().contains("\"replication\""), "{e}");
        }
    }
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod handshake_tests;
