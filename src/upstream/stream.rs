//! The connection to an upstream database, plain or TLS, as one stream type.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A connection to the upstream, plain or TLS.
pub(crate) enum UpstreamStream {
    /// `tls = "disable"`.
    Plain(TcpStream),
    /// Any TLS mode.
    Tls(Box<TlsStream<TcpStream>>),
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
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
