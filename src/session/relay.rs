//! The relay: bytes both ways with no per-message parsing or allocation, one fixed buffer per
//! direction, byte counters, and message-boundary tracking so that leasegate can end a session
//! with its own ErrorResponse without cutting a message in half.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

use crate::protocol::framing::Framer;

/// Size of each direction's buffer.
pub const BUFFER_SIZE: usize = 16 * 1024;

/// Why the relay stopped.
#[derive(Debug)]
pub enum RelayEnd {
    /// The client sent Terminate and closed.
    ClientTerminated,
    /// The client closed without Terminate, or its connection failed.
    ClientGone(Option<std::io::Error>),
    /// The upstream closed or failed.
    UpstreamGone(Option<std::io::Error>),
    /// leasegate asked the session to stop (shutdown, expiry).
    Stopped,
}

impl RelayEnd {
    /// Short label for logs and audit lines.
    pub fn label(&self) -> &'static str {
        match self {
            RelayEnd::ClientTerminated => "client_terminate",
            RelayEnd::ClientGone(_) => "client_gone",
            RelayEnd::UpstreamGone(_) => "upstream_gone",
            RelayEnd::Stopped => "stopped",
        }
    }
}

/// What one direction has done so far.
#[derive(Debug, Default)]
pub struct Direction {
    /// Bytes written to the far side.
    pub bytes: u64,
    /// Boundary tracking over the bytes written.
    pub framer: Framer,
    /// A write was under way when the relay stopped (the stream may hold half a message).
    pub torn: bool,
}

/// Result of a relay.
#[derive(Debug)]
pub struct Relayed {
    /// Why it stopped.
    pub end: RelayEnd,
    /// Client → upstream.
    pub to_upstream: Direction,
    /// Upstream → client.
    pub to_client: Direction,
}

async fn pump<R, W>(
    reader: &mut ReadHalf<R>,
    writer: &mut WriteHalf<W>,
    dir: &mut Direction,
) -> Option<std::io::Error>
where
    R: AsyncRead,
    W: AsyncWrite,
{
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e) => return Some(e),
        };
        dir.torn = true;
        if let Err(e) = writer.write_all(&buf[..n]).await {
            return Some(e);
        }
        dir.torn = false;
        dir.bytes += n as u64;
        dir.framer.feed(&buf[..n]);
    }
}

/// Relays until either side closes or `stop` fires. Returns the halves for the close phase.
pub async fn relay<C, U>(
    client_r: &mut ReadHalf<C>,
    client_w: &mut WriteHalf<C>,
    upstream_r: &mut ReadHalf<U>,
    upstream_w: &mut WriteHalf<U>,
    stop: &CancellationToken,
) -> Relayed
where
    C: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
{
    let mut to_upstream = Direction::default();
    let mut to_client = Direction::default();
    let end = tokio::select! {
        err = pump(client_r, upstream_w, &mut to_upstream) => {
            if err.is_none() && to_upstream.framer.at_boundary() && to_upstream.framer.last_type() == b'X' {
                RelayEnd::ClientTerminated
            } else {
                RelayEnd::ClientGone(err)
            }
        }
        err = pump(upstream_r, client_w, &mut to_client) => RelayEnd::UpstreamGone(err),
        _ = stop.cancelled() => RelayEnd::Stopped,
    };
    Relayed {
        end,
        to_upstream,
        to_client,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, split};

    #[tokio::test]
    async fn relays_both_ways_and_sees_terminate() {
        let (client_app, client_proxy) = duplex(1024);
        let (upstream_proxy, upstream_db) = duplex(1024);
        let (mut cr, mut cw) = split(client_proxy);
        let (mut ur, mut uw) = split(upstream_proxy);
        let stop = CancellationToken::new();
        let task = tokio::spawn(async move {
            let r = relay(&mut cr, &mut cw, &mut ur, &mut uw, &stop).await;
            (r.end.label(), r.to_upstream.bytes, r.to_client.bytes)
        });
        let (mut app_r, mut app_w) = split(client_app);
        let (mut db_r, mut db_w) = split(upstream_db);
        app_w.write_all(b"Q\0\0\0\x09abcd\0").await.expect("write");
        let mut got = [0u8; 10];
        db_r.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"Q\0\0\0\x09abcd\0");
        db_w.write_all(b"Z\0\0\0\x05I").await.expect("write");
        let mut z = [0u8; 6];
        app_r.read_exact(&mut z).await.expect("read");
        app_w.write_all(b"X\0\0\0\x04").await.expect("write");
        drop(app_w);
        drop(app_r);
        let (end, up, down) = task.await.expect("join");
        assert_eq!((end, up, down), ("client_terminate", 15, 6));
    }
}
