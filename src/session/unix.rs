//! The client side of a session on the local Unix socket: who the peer is (the kernel's
//! `SO_PEERCRED`, then the user and group databases), then the plaintext pre-startup exchange
//! (SSLRequest and GSSENCRequest answered `N`, as PostgreSQL answers them on its own socket
//! when it has no TLS there) and the StartupMessage, or a CancelRequest. From here on the
//! session takes the same path as a TLS one ([`super::finish`]).

use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use super::handshake::{
    Accepted, CancelConn, CancelRequest, ClientHello, ClientStream, fail, report, requested,
};
use crate::cancel::CancelKind;
use crate::error::SessionError;
use crate::identity::{Principal, UnixIdentity};
use crate::limits::slots::Admission;
use crate::metrics::labels::SessionOutcome;
use crate::net::ClientAddr;
use crate::protocol::startup::{InitialPacket, PacketError, read_initial_packet};
use crate::state::AppState;

/// Serves one connection accepted on the Unix socket to its end.
pub(crate) async fn run(
    state: Arc<AppState>,
    mut stream: UnixStream,
    stop: CancellationToken,
    admission: Admission,
) {
    let live = state.live.load_full();
    let started = Instant::now();
    let cred = match stream.peer_cred() {
        Ok(cred) => cred,
        Err(e) => {
            let err = SessionError::PeerCredentials(e.to_string());
            tracing::warn!(error = %err, "unix socket client refused");
            report(&mut stream, &err).await;
            state.metrics.session_finished(SessionOutcome::Error);
            return;
        }
    };
    let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
    let peer = ClientAddr::Unix { uid, pid };
    let accepted = super::setup(&live, &stop, Box::pin(accept(stream, uid, gid, pid))).await;
    let Some(_slot) = super::settle(admission, &accepted, &stop).await else {
        return;
    };
    let ready = Box::pin(super::finish(&state, &live, accepted, peer, started, &stop)).await;
    if let Some(relay) = ready {
        relay.run().await;
    }
}

/// The peer's identity and the pre-startup exchange. The caller bounds the time.
async fn accept(
    mut stream: UnixStream,
    uid: u32,
    gid: u32,
    pid: Option<i32>,
) -> Result<Accepted, SessionError> {
    let lookup = tokio::task::spawn_blocking(move || UnixIdentity::lookup(uid, gid, pid));
    let identity = match lookup.await {
        Ok(identity) => identity,
        Err(e) => {
            let err = SessionError::PeerCredentials(format!("user database lookup: {e}"));
            return fail(&mut stream, err).await;
        }
    };
    let mut ssl_refused = false;
    let mut gss_refused = false;
    let startup = loop {
        match read_initial_packet(&mut stream).await {
            Ok(InitialPacket::Startup(s)) => break s,
            Ok(InitialPacket::SslRequest) if !ssl_refused => {
                ssl_refused = true;
                refuse_encryption(&mut stream).await?;
            }
            Ok(InitialPacket::GssEncRequest) if !gss_refused => {
                gss_refused = true;
                refuse_encryption(&mut stream).await?;
            }
            Ok(InitialPacket::Cancel(key)) => {
                return Ok(Accepted::Cancel(CancelRequest {
                    kind: CancelKind::Client,
                    key,
                    sender: None,
                    conn: CancelConn::Unix(stream),
                }));
            }
            Ok(InitialPacket::PeerCancel(_)) => {
                return fail(&mut stream, SessionError::PlaintextPeerCancel).await;
            }
            Ok(InitialPacket::SslRequest | InitialPacket::GssEncRequest) => {
                return fail(&mut stream, SessionError::NegotiationTwice).await;
            }
            Err(e) => return fail(&mut stream, e.into()).await,
        }
    };
    let (role, database) = match requested(&startup) {
        Ok(names) => names,
        Err(e) => return fail(&mut stream, e).await,
    };
    Ok(Accepted::Session(Box::new(ClientHello {
        stream: Box::new(ClientStream::Unix(stream)),
        principal: Principal::from_unix(identity),
        role,
        database,
        minor: startup.minor,
        params: startup.params,
    })))
}

/// `N`: no TLS or GSS encryption on the local socket; the client goes on in plaintext (or
/// gives up, as libpq with `sslmode=require` does).
async fn refuse_encryption(stream: &mut UnixStream) -> Result<(), SessionError> {
    stream
        .write_all(b"N")
        .await
        .map_err(|e| SessionError::Packet(PacketError::Io(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn packet(code: u32, body: &[u8]) -> Vec<u8> {
        let mut out = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn ssl_and_gss_requests_get_n_then_the_startup_is_read_in_plaintext() {
        let (server, mut client) = UnixStream::pair().expect("pair");
        let me = nix::unistd::getuid().as_raw();
        let accepted = tokio::spawn(accept(server, me, 0, None));
        client.write_all(&packet(80877103, b"")).await.expect("ssl");
        let mut answer = [0u8; 1];
        client.read_exact(&mut answer).await.expect("N");
        assert_eq!(&answer, b"N");
        client.write_all(&packet(80877104, b"")).await.expect("gss");
        client.read_exact(&mut answer).await.expect("N");
        assert_eq!(&answer, b"N");
        let body = b"user\0readonly\0database\0myapp\0\0";
        client
            .write_all(&packet(196608, body))
            .await
            .expect("startup");
        let Ok(Accepted::Session(hello)) = accepted.await.expect("task") else {
            panic!("a session expected");
        };
        assert_eq!(
            (hello.role.as_str(), hello.database.as_str()),
            ("readonly", "myapp")
        );
        let uid = format!("unix:uid={me}");
        assert!(hello.principal.all_identities().contains(&uid));
        assert!(matches!(*hello.stream, ClientStream::Unix(_)));
    }

    #[tokio::test]
    async fn a_second_ssl_request_is_a_protocol_violation() {
        let (server, mut client) = UnixStream::pair().expect("pair");
        let accepted = tokio::spawn(accept(server, 0, 0, None));
        client.write_all(&packet(80877103, b"")).await.expect("ssl");
        let mut answer = [0u8; 1];
        client.read_exact(&mut answer).await.expect("N");
        client
            .write_all(&packet(80877103, b""))
            .await
            .expect("ssl again");
        let Err(e) = accepted.await.expect("task") else {
            panic!("refusal expected");
        };
        assert_eq!(e.sqlstate().code(), "08P01");
    }
}
