//! The relay: bytes both ways with no per-message parsing or allocation, one fixed buffer per
//! direction, byte counters, and message-boundary tracking so that leasegate can end a session
//! with its own ErrorResponse without cutting a message in half.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::protocol::framing::Framer;

/// Buffer for upstream → client: one full TLS record's worth, for large results.
pub const BUFFER_SIZE: usize = 16 * 1024;
/// Buffer for client → upstream: queries are small, COPY streams in any chunk size.
pub const CLIENT_BUFFER_SIZE: usize = 8 * 1024;

/// How long an `End` may wait for the upstream to finish the message it is sending before the
/// session is cut without the closing ErrorResponse.
const END_WAIT: Duration = Duration::from_secs(2);

/// Messages leasegate injects into the upstream → client stream, between two messages.
#[derive(Debug)]
pub enum Control {
    /// A NoticeResponse (or other message) to deliver; the session continues.
    Notice(BytesMut),
    /// A final ErrorResponse to deliver; the session ends.
    End(BytesMut),
}

/// Why the relay stopped.
#[derive(Debug)]
pub enum RelayEnd {
    /// The client sent Terminate and closed.
    ClientTerminated,
    /// The client closed without Terminate, or its connection failed.
    ClientGone(Option<std::io::Error>),
    /// The upstream closed or failed.
    UpstreamGone(Option<std::io::Error>),
    /// leasegate ended the session (shutdown, expiry); `delivered` tells whether the client got
    /// the closing ErrorResponse.
    Ended {
        /// The ErrorResponse reached the client at a message boundary.
        delivered: bool,
    },
}

impl RelayEnd {
    /// Short label for logs and audit lines.
    pub fn label(&self) -> &'static str {
        match self {
            RelayEnd::ClientTerminated => "client_terminate",
            RelayEnd::ClientGone(_) => "client_gone",
            RelayEnd::UpstreamGone(_) => "upstream_gone",
            RelayEnd::Ended { .. } => "ended_by_leasegate",
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
    /// `leasegate_relayed_bytes_total` for this direction.
    pub counter: Option<prometheus_client::metrics::counter::Counter>,
}

impl Direction {
    /// A direction counting into `counter`.
    pub fn counted(counter: prometheus_client::metrics::counter::Counter) -> Direction {
        Direction {
            counter: Some(counter),
            ..Direction::default()
        }
    }

    fn wrote(&mut self, chunk: &[u8]) {
        self.torn = false;
        self.bytes += chunk.len() as u64;
        self.framer.feed(chunk);
        if let Some(c) = &self.counter {
            c.inc_by(chunk.len() as u64);
        }
    }
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
    let mut buf = vec![0u8; CLIENT_BUFFER_SIZE];
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
        dir.wrote(&buf[..n]);
    }
}

/// What ended the upstream → client direction.
enum DownEnd {
    Closed(Option<std::io::Error>),
    Ended { delivered: bool },
}

/// Upstream → client, with injected messages written only at message boundaries.
async fn pump_down<R, W>(
    reader: &mut ReadHalf<R>,
    writer: &mut WriteHalf<W>,
    dir: &mut Direction,
    control: &mut mpsc::Receiver<Control>,
) -> DownEnd
where
    R: AsyncRead,
    W: AsyncWrite,
{
    let mut buf = vec![0u8; BUFFER_SIZE];
    let mut control_open = true;
    let mut ending: Option<(BytesMut, Instant)> = None;
    let mut notices: Vec<BytesMut> = Vec::new();
    loop {
        if dir.framer.at_boundary() {
            for msg in notices.drain(..) {
                if let Err(e) = writer.write_all(&msg).await {
                    return DownEnd::Closed(Some(e));
                }
            }
        }
        if let Some((msg, _)) = ending.as_ref().filter(|_| dir.framer.at_boundary()) {
            let delivered = writer.write_all(msg).await.is_ok() && writer.flush().await.is_ok();
            return DownEnd::Ended { delivered };
        }
        let end_at = ending.as_ref().map(|(_, at)| *at);
        let n = tokio::select! {
            biased;
            ctl = control.recv(), if control_open && ending.is_none() => {
                match ctl {
                    // Delivered at the next boundary (at once when idle).
                    Some(Control::Notice(msg)) => notices.push(msg),
                    Some(Control::End(msg)) => ending = Some((msg, Instant::now() + END_WAIT)),
                    None => control_open = false,
                }
                continue;
            }
            _ = tokio::time::sleep_until(end_at.unwrap_or_else(Instant::now)), if end_at.is_some() => {
                return DownEnd::Ended { delivered: false };
            }
            r = reader.read(&mut buf) => match r {
                Ok(0) => return DownEnd::Closed(None),
                Ok(n) => n,
                Err(e) => return DownEnd::Closed(Some(e)),
            },
        };
        let mut chunk = &buf[..n];
        // While ending, forward only up to the next boundary, then deliver the ErrorResponse.
        if ending.is_some() {
            let mut probe = dir.framer.clone();
            chunk = &chunk[..probe.advance(chunk)];
        }
        dir.torn = true;
        if let Err(e) = writer.write_all(chunk).await {
            return DownEnd::Closed(Some(e));
        }
        dir.wrote(chunk);
    }
}

/// Relays until either side closes or a `Control::End` is delivered. The directions are
/// borrowed so that their counts survive when the caller cuts the relay short.
pub async fn relay<C, U>(
    client_r: &mut ReadHalf<C>,
    client_w: &mut WriteHalf<C>,
    upstream_r: &mut ReadHalf<U>,
    upstream_w: &mut WriteHalf<U>,
    control: &mut mpsc::Receiver<Control>,
    to_upstream: &mut Direction,
    to_client: &mut Direction,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
{
    tokio::select! {
        err = pump(client_r, upstream_w, to_upstream) => {
            if err.is_none() && to_upstream.framer.at_boundary() && to_upstream.framer.last_type() == b'X' {
                RelayEnd::ClientTerminated
            } else {
                RelayEnd::ClientGone(err)
            }
        }
        down = pump_down(upstream_r, client_w, to_client, control) => match down {
            DownEnd::Closed(err) => RelayEnd::UpstreamGone(err),
            DownEnd::Ended { delivered } => RelayEnd::Ended { delivered },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{DuplexStream, duplex, split};
    use tokio::task::JoinHandle;

    /// The relay task's result: its end, bytes up, bytes down.
    type Outcome = JoinHandle<(RelayEnd, u64, u64)>;

    /// A relay between two in-memory pipes: returns the client's and the database's ends,
    /// the control sender, and the relay task.
    fn relay_between() -> (DuplexStream, DuplexStream, mpsc::Sender<Control>, Outcome) {
        let (client_app, client_proxy) = duplex(1024);
        let (upstream_proxy, upstream_db) = duplex(1024);
        let (tx, mut control) = mpsc::channel(4);
        let task = tokio::spawn(async move {
            let (mut cr, mut cw) = split(client_proxy);
            let (mut ur, mut uw) = split(upstream_proxy);
            let (mut up, mut down) = (Direction::default(), Direction::default());
            let end = relay(
                &mut cr,
                &mut cw,
                &mut ur,
                &mut uw,
                &mut control,
                &mut up,
                &mut down,
            )
            .await;
            (end, up.bytes, down.bytes)
        });
        (client_app, upstream_db, tx, task)
    }

    #[tokio::test]
    async fn relays_both_ways_and_sees_terminate() {
        let (client_app, upstream_db, _tx, task) = relay_between();
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
        assert_eq!((end.label(), up, down), ("client_terminate", 15, 6));
    }

    #[tokio::test]
    async fn end_waits_for_a_message_boundary() {
        let (client_app, upstream_db, tx, task) = relay_between();
        let (mut app_r, _app_w) = split(client_app);
        let (_db_r, mut db_w) = split(upstream_db);
        // Half a DataRow, then leasegate decides to end the session.
        db_w.write_all(b"D\0\0\0\x0aab").await.expect("write");
        let mut first = [0u8; 7];
        app_r.read_exact(&mut first).await.expect("read");
        tx.send(Control::Notice(BytesMut::from(&b"N\0\0\0\x04"[..])))
            .await
            .expect("send");
        tx.send(Control::End(BytesMut::from(&b"E\0\0\0\x04"[..])))
            .await
            .expect("send");
        // The rest of the row and a second message arrive in one chunk.
        db_w.write_all(b"cdefZ\0\0\0\x05I").await.expect("write");
        let mut rest = [0u8; 14];
        app_r.read_exact(&mut rest).await.expect("read");
        assert_eq!(&rest, b"cdefN\0\0\0\x04E\0\0\0\x04");
        let (end, _, _) = task.await.expect("join");
        assert!(matches!(end, RelayEnd::Ended { delivered: true }));
    }
}
