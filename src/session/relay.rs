//! The relay: bytes both ways with no per-message allocation and no parsing beyond message
//! headers ([`super::direction`]: boundaries, counts, and the pid of the session's own
//! notifications rewritten in place, its bytes held back when a read ends inside it), a
//! buffer per direction lent only while bytes are in flight ([`super::bufpool`]: an idle
//! session holds none), byte counters, and message-boundary tracking so that leasegate can
//! end a session with its own ErrorResponse without cutting a message in half.

use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Sleep;

use super::bufpool::Buf as Lent;
pub(crate) use super::control::{
    Control, ControlReceiver, ControlSender, channel as control_channel,
};
pub(crate) use super::direction::{Direction, Took, directions};
use crate::metrics::labels::SessionEndReason;
use crate::registry::Tracked;

/// How long an `End` may wait for the upstream to finish the message it is sending before the
/// session is cut without the closing ErrorResponse.
const END_WAIT: Duration = Duration::from_secs(2);

/// Why the relay stopped.
#[derive(Debug)]
pub(crate) enum RelayEnd {
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
    pub(crate) fn label(&self) -> &'static str {
        match self {
            RelayEnd::ClientTerminated => "client_terminate",
            RelayEnd::ClientGone(_) => "client_gone",
            RelayEnd::UpstreamGone(_) => "upstream_gone",
            RelayEnd::Ended { .. } => "ended_by_leasegate",
        }
    }

    /// The `leasegate_sessions_ended_total{reason}` value when the client or the upstream
    /// ended it; `None` when leasegate did (the stop's reason says why).
    pub(crate) fn end_reason(&self) -> Option<SessionEndReason> {
        match self {
            RelayEnd::ClientTerminated | RelayEnd::ClientGone(_) => Some(SessionEndReason::Client),
            RelayEnd::UpstreamGone(_) => Some(SessionEndReason::Upstream),
            RelayEnd::Ended { .. } => None,
        }
    }

    /// The audit line's `reason`: the label, and for a session leasegate ended for an
    /// operator or a reload, what the client was told.
    pub(crate) fn audit_reason(&self, tracked: Option<&Tracked>) -> String {
        match tracked.and_then(Tracked::cause) {
            Some(why) if matches!(self, RelayEnd::Ended { .. }) => {
                format!("{}: {}", self.label(), why.client_message())
            }
            _ => self.label().to_owned(),
        }
    }

    /// What the label leaves out, for the log: the socket error that ended the session, or
    /// that leasegate's closing ErrorResponse could not be delivered.
    pub(crate) fn detail(&self) -> Option<String> {
        match self {
            RelayEnd::ClientGone(Some(e)) | RelayEnd::UpstreamGone(Some(e)) => Some(e.to_string()),
            RelayEnd::Ended { delivered: false } => Some("closing message not delivered".into()),
            _ => None,
        }
    }
}

/// Result of a relay.
#[derive(Debug)]
pub(crate) struct Relayed {
    /// Why it stopped.
    pub end: RelayEnd,
    /// Client → upstream.
    pub to_upstream: Direction,
    /// Upstream → client.
    pub to_client: Direction,
}

impl Relayed {
    /// True when the upstream is idle at ReadyForQuery: both directions rest between two
    /// messages, nothing is half written, every request was answered with its ReadyForQuery,
    /// and no extended-protocol message awaits its Sync. Anything else (a statement running,
    /// COPY in either direction, a pipeline in flight, a request cut in half) is busy. A
    /// client's protocol error can only make the count look busier than it is, never idle.
    pub(crate) fn upstream_idle(&self) -> bool {
        let (up, down) = (&self.to_upstream, &self.to_client);
        up.framer.at_boundary()
            && !up.torn
            && !up.framer.pending()
            && down.framer.at_boundary()
            && up.framer.count() == down.framer.count()
    }

    /// True when Terminate can go upstream: the client → upstream stream is between two
    /// messages (and the client did not send Terminate itself).
    pub(crate) fn can_terminate(&self) -> bool {
        let up = &self.to_upstream;
        up.framer.at_boundary() && !up.torn && up.framer.last_type() != b'X'
    }
}

/// What ended one pump.
enum PumpEnd {
    /// The near side closed (`None`) or failed reading.
    Read(Option<std::io::Error>),
    /// Writing to the far side failed.
    Write(std::io::Error),
}

/// Writes `bytes` and flushes them: a TLS stream may accept bytes into its buffer while the
/// socket would block (`poll_write` returns `Ok`), and nothing sends them until the next
/// write or a flush. Without it a large result's tail could wait in leasegate for good once
/// the upstream goes quiet. (For a plain socket the flush costs nothing.)
async fn write_out<W: AsyncWrite>(writer: &mut WriteHalf<W>, bytes: &[u8]) -> std::io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}

/// Writes what [`Direction::took`] released of `chunk` (held-back bytes first) and flushes.
async fn write_took<W: AsyncWrite>(
    writer: &mut WriteHalf<W>,
    took: Took,
    chunk: &[u8],
) -> std::io::Result<()> {
    if !took.head().is_empty() {
        writer.write_all(took.head()).await?;
    }
    write_out(writer, &chunk[..took.len]).await
}

async fn pump<R, W>(
    reader: &mut ReadHalf<R>,
    writer: &mut WriteHalf<W>,
    dir: &mut Direction,
) -> PumpEnd
where
    R: AsyncRead,
    W: AsyncWrite,
{
    loop {
        let (mut buf, n) = match dir.read(reader).await {
            Ok(None) => return PumpEnd::Read(None),
            Ok(Some(read)) => read,
            Err(e) => return PumpEnd::Read(Some(e)),
        };
        let chunk = buf.get_mut(n);
        let took = dir.took(chunk);
        if let Err(e) = write_took(writer, took, chunk).await {
            return PumpEnd::Write(e);
        }
        dir.sent(took.total());
    }
}

/// What ended the upstream → client direction.
enum DownEnd {
    Pump(PumpEnd),
    Ended { delivered: bool },
}

/// Writes the queued notices, then the closing message if there is one (`Some(delivered)`).
async fn at_boundary<W: AsyncWrite>(
    writer: &mut WriteHalf<W>,
    notices: &mut Vec<BytesMut>,
    end: Option<&BytesMut>,
) -> Result<Option<bool>, std::io::Error> {
    for msg in notices.drain(..) {
        write_out(writer, &msg).await?;
    }
    Ok(match end {
        Some(msg) => Some(writer.write_all(msg).await.is_ok() && writer.flush().await.is_ok()),
        None => None,
    })
}

/// The deadline of an End waiting for a message boundary (pending while there is none).
fn end_deadline(ending: &mut Option<(BytesMut, Pin<Box<Sleep>>)>) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| match ending {
        Some((_, deadline)) => deadline.as_mut().poll(cx),
        None => Poll::Pending,
    })
}

/// Upstream → client, with injected messages written only at message boundaries.
async fn pump_down<R, W>(
    reader: &mut ReadHalf<R>,
    writer: &mut WriteHalf<W>,
    dir: &mut Direction,
    control: &mut ControlReceiver,
) -> DownEnd
where
    R: AsyncRead,
    W: AsyncWrite,
{
    let mut control_open = true;
    // The End message and its deadline, boxed: the timer exists only while ending, so an idle
    // session's future does not carry one.
    let mut ending: Option<(BytesMut, Pin<Box<Sleep>>)> = None;
    let mut notices: Vec<BytesMut> = Vec::new();
    loop {
        if dir.framer.at_boundary() {
            match at_boundary(writer, &mut notices, ending.as_ref().map(|(m, _)| m)).await {
                Err(e) => return DownEnd::Pump(PumpEnd::Write(e)),
                Ok(Some(delivered)) => return DownEnd::Ended { delivered },
                Ok(None) => {}
            }
        }
        let (mut buf, n) = if dir.unsent.is_empty() {
            tokio::select! {
                biased;
                ctl = control.recv(), if control_open && ending.is_none() => {
                    match ctl {
                        // Delivered at the next boundary (at once when idle).
                        Some(Control::Notice(msg)) => notices.push(msg),
                        Some(Control::End(msg)) => ending = Some((msg, Box::pin(tokio::time::sleep(END_WAIT)))),
                        None => control_open = false,
                    }
                    continue;
                }
                () = end_deadline(&mut ending), if ending.is_some() => {
                    return DownEnd::Ended { delivered: false };
                }
                r = dir.read(reader) => match r {
                    Ok(None) => return DownEnd::Pump(PumpEnd::Read(None)),
                    Ok(Some(read)) => read,
                    Err(e) => return DownEnd::Pump(PumpEnd::Read(Some(e))),
                },
            }
        } else {
            let mut buf = Lent::take();
            let n = dir.take_unsent(buf.bytes_mut());
            (buf, n)
        };
        let chunk = buf.get_mut(n);
        // While ending, forward only up to the next boundary; the rest waits in `unsent`
        // (counted at the end, never relayed) and the closing message goes out first.
        let cut = match ending {
            Some(_) => dir.framer.clone().advance(chunk),
            None => n,
        };
        if cut < n {
            let mut rest = BytesMut::from(&chunk[cut..]);
            rest.extend_from_slice(&dir.unsent);
            dir.unsent = rest;
        }
        let took = dir.took(&mut chunk[..cut]);
        if let Err(e) = write_took(writer, took, chunk).await {
            return DownEnd::Pump(PumpEnd::Write(e));
        }
        dir.sent(took.total());
    }
}

/// Relays until either side closes or a `Control::End` is delivered. The directions are
/// borrowed so that their counts survive when the caller cuts the relay short; `to_client`'s
/// `unsent` bytes go to the client first.
pub(crate) async fn relay<C, U>(
    client_r: &mut ReadHalf<C>,
    client_w: &mut WriteHalf<C>,
    upstream_r: &mut ReadHalf<U>,
    upstream_w: &mut WriteHalf<U>,
    control: &mut ControlReceiver,
    to_upstream: &mut Direction,
    to_client: &mut Direction,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
{
    tokio::select! {
        up = pump(client_r, upstream_w, to_upstream) => match up {
            PumpEnd::Read(None) if to_upstream.framer.at_boundary() && to_upstream.framer.last_type() == b'X' => {
                RelayEnd::ClientTerminated
            }
            PumpEnd::Read(err) => RelayEnd::ClientGone(err),
            PumpEnd::Write(e) => RelayEnd::UpstreamGone(Some(e)),
        },
        down = pump_down(upstream_r, client_w, to_client, control) => match down {
            // The server closed because the client's Terminate reached it, before the relay
            // saw the client's own close: the client ended the session.
            DownEnd::Pump(PumpEnd::Read(None)) if to_upstream.framer.at_boundary() && to_upstream.framer.last_type() == b'X' => {
                RelayEnd::ClientTerminated
            }
            DownEnd::Pump(PumpEnd::Read(err)) => RelayEnd::UpstreamGone(err),
            DownEnd::Pump(PumpEnd::Write(e)) => RelayEnd::ClientGone(Some(e)),
            DownEnd::Ended { delivered } => RelayEnd::Ended { delivered },
        },
    }
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod relay_tests;
