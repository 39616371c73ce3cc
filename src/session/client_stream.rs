//! The client connection of a session, TLS over TCP or the local Unix socket, as one stream
//! type. Each call forwards to the one stream inside (vectored writes included, so the TLS
//! path writes exactly as it would without the enum): a branch per call, no allocation and no
//! indirection.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::server::TlsStream;

/// A client connection.
// The TLS variant is the large, common one: boxing it would add an allocation per session and
// a pointer chase per call on the hot path to save bytes on the rare Unix one.
#[allow(clippy::large_enum_variant)]
pub(crate) enum ClientStream {
    /// TLS over TCP, the client certificate verified.
    Tls(TlsStream<TcpStream>),
    /// The local Unix socket (plaintext; the kernel vouches for the peer).
    Unix(UnixStream),
}

impl ClientStream {
    /// Resolves once the client has closed its connection, or sent a TLS alert (before its
    /// authentication only a closing client does), without taking any of its bytes; never
    /// while other bytes wait unread.
    pub(crate) async fn hung_up(&self) {
        match self {
            ClientStream::Tls(tls) => {
                const ALERT: u8 = 21;
                let mut first = [0u8; 1];
                match tls.get_ref().0.peek(&mut first).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) if first[0] == ALERT => return,
                    Ok(_) => {}
                }
            }
            ClientStream::Unix(unix) => {
                if unix_closed(unix).await {
                    return;
                }
            }
        }
        std::future::pending().await
    }
}

/// Whether the peer of `unix` closed (`true`) or sent bytes (`false`, left unread): tokio has
/// no peek for Unix sockets, so the socket's readiness is awaited and `MSG_PEEK` asked of it.
async fn unix_closed(unix: &UnixStream) -> bool {
    let mut first = [MaybeUninit::<u8>::uninit(); 1];
    loop {
        if unix.readable().await.is_err() {
            return true;
        }
        match unix.try_io(Interest::READABLE, || SockRef::from(unix).peek(&mut first)) {
            Ok(n) => return n == 0,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
    }
}

macro_rules! forward {
    ($self:ident, $s:ident => $call:expr) => {
        match $self.get_mut() {
            ClientStream::Tls($s) => {
                let $s = Pin::new($s);
                $call
            }
            ClientStream::Unix($s) => {
                let $s = Pin::new($s);
                $call
            }
        }
    };
}

impl AsyncRead for ClientStream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        forward!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for ClientStream {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        forward!(self, s => s.poll_write(cx, buf))
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        forward!(self, s => s.poll_write_vectored(cx, bufs))
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Tls(s) => s.is_write_vectored(),
            ClientStream::Unix(s) => s.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        forward!(self, s => s.poll_flush(cx))
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        forward!(self, s => s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_unix_variant_carries_bytes_both_ways() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let mut client = ClientStream::Unix(a);
        client.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
        b.write_all(b"pong").await.expect("write back");
        client.read_exact(&mut got).await.expect("read back");
        assert_eq!(&got, b"pong");
        client.shutdown().await.expect("shutdown");
        assert_eq!(b.read(&mut got).await.expect("eof"), 0);
    }

    #[tokio::test]
    async fn a_unix_client_that_closes_has_hung_up() {
        let (a, b) = UnixStream::pair().expect("pair");
        let client = ClientStream::Unix(a);
        let waiting = client.hung_up();
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the close is seen");
    }

    #[tokio::test]
    async fn a_unix_client_with_bytes_waiting_has_not_hung_up_and_keeps_its_bytes() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let mut client = ClientStream::Unix(a);
        b.write_all(b"Q").await.expect("write");
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(200), client.hung_up()).await;
        assert!(waited.is_err(), "bytes are not a hang-up");
        let mut got = [0u8; 1];
        client.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"Q", "the peeked byte is still there");
    }
}
