//! The connection to an upstream database, plain TCP, TLS, or a Unix socket on this host, as
//! one stream type.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;

/// A connection to the upstream, plain, TLS, or local.
pub(crate) enum UpstreamStream {
    /// `tls = "disable"`.
    Plain(TcpStream),
    /// Any TLS mode.
    Tls(Box<TlsStream<TcpStream>>),
    /// A `host` that is a socket directory (always `tls = "disable"`).
    Local(UnixStream),
}

impl UpstreamStream {
    /// The same connection registered with the current runtime's I/O driver instead of the one
    /// it was opened on: a warm session logs in on the control runtime and is relayed on a
    /// session thread, where every readiness event would otherwise cross threads. Readiness
    /// is not lost: registering a socket that already has data reports it at once. A TLS
    /// connection stays where it is (tokio-rustls cannot be taken apart and put back together).
    pub(crate) fn rehome(self) -> std::io::Result<Self> {
        match self {
            UpstreamStream::Plain(tcp) => {
                Ok(UpstreamStream::Plain(TcpStream::from_std(tcp.into_std()?)?))
            }
            UpstreamStream::Local(unix) => Ok(UpstreamStream::Local(UnixStream::from_std(
                unix.into_std()?,
            )?)),
            tls @ UpstreamStream::Tls(_) => Ok(tls),
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            UpstreamStream::Local(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            UpstreamStream::Local(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            UpstreamStream::Local(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            UpstreamStream::Local(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Bytes that arrived while the socket was registered with the first runtime, and whose
    /// readiness that runtime already saw, are read on the second one without waiting.
    #[test]
    fn a_rehomed_connection_keeps_what_arrived_before_the_move() {
        let first = runtime();
        let (stream, mut peer) = first.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let connect = TcpStream::connect(listener.local_addr().unwrap());
            let (ours, accepted) = tokio::join!(connect, listener.accept());
            let (ours, (mut peer, _)) = (ours.unwrap(), accepted.unwrap());
            peer.write_all(b"hello").await.unwrap();
            ours.readable().await.unwrap();
            (UpstreamStream::Plain(ours), peer)
        });
        let second = std::thread::spawn(move || {
            runtime().block_on(async move {
                let mut stream = stream.rehome().unwrap();
                let mut got = [0u8; 5];
                tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got))
                    .await
                    .expect("the bytes that arrived before the move are readable")
                    .unwrap();
                stream.write_all(b"world").await.unwrap();
                got
            })
        })
        .join()
        .unwrap();
        assert_eq!(&second, b"hello");
        let mut back = [0u8; 5];
        first.block_on(peer.read_exact(&mut back)).unwrap();
        assert_eq!(&back, b"world");
    }
}
