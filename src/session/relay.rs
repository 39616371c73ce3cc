//! The relay: bytes both ways with no per-message parsing or allocation, a buffer per direction
//! lent only while bytes are in flight ([`super::bufpool`]: an idle session holds none), byte
//! counters, and message-boundary tracking so that leasegate can end a session with its own
//! ErrorResponse without cutting a message in half.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Sleep;

use super::bufpool::{self, Buf as Lent};
pub(crate) use super::control::{
    Control, ControlReceiver, ControlSender, channel as control_channel,
};
use crate::metrics::Metrics;
use crate::metrics::labels::{RelayDirection, SessionEndReason};
use crate::protocol::framing::{Framer, TypeSet};
use crate::registry::{Tracked, Traffic};

/// Bytes a direction relays before it adds them to the shared byte counter even while busy;
/// otherwise it adds them whenever it waits for its reader (so session threads do not
/// contend on the counter's cache line message by message).
const COUNT_EVERY: u64 = 1 << 20;

/// How long an `End` may wait for the upstream to finish the message it is sending before the
/// session is cut without the closing ErrorResponse.
const END_WAIT: Duration = Duration::from_secs(2);

/// Client messages the server answers with exactly one ReadyForQuery each: Query, Sync,
/// FunctionCall.
const REQUESTS: TypeSet = TypeSet::of(b"QSF");
/// Extended-protocol messages the server acts on at once (Execute runs the statement) but
/// answers with ReadyForQuery only after a later Sync: Parse, Bind, Describe, Execute, Close,
/// Flush. Until that Sync the server may be busy although every request was answered.
const UNSYNCED: TypeSet = TypeSet::of(b"PBDECH");
/// ReadyForQuery.
const READY: TypeSet = TypeSet::of(b"Z");
/// NotificationResponse: its body starts with the notifying backend's pid.
const NOTIFICATION: u8 = b'A';

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

/// What one direction has done so far.
#[derive(Debug, Default)]
pub(crate) struct Direction {
    /// Bytes written to the far side.
    pub bytes: u64,
    /// Boundary tracking (and request or ReadyForQuery counting) over the bytes taken from
    /// the near side: the server's view of the conversation, which decides at the close
    /// whether the upstream is idle.
    pub framer: Framer,
    /// Bytes were taken and their write was under way when the relay stopped: the far side
    /// may have half a message.
    pub torn: bool,
    /// Bytes already read from the near side and not yet relayed (the bytes the upstream sent
    /// after the first ReadyForQuery at login); relayed first, through the same tracking.
    pub unsent: BytesMut,
    /// `leasegate_relayed_bytes_total` for this direction.
    pub counter: Option<prometheus_client::metrics::counter::Counter>,
    /// What `sessions list` reads of this direction (bytes, messages, status), stored after
    /// each chunk written.
    pub shared: Option<Shared>,
    /// Bytes written and not yet added to `counter`.
    uncounted: u64,
    /// Upstream → client: the upstream backend's pid and the one leasegate's BackendKeyData
    /// gave the client, big-endian ([`Direction::showing_pid`]).
    pid_swap: Option<([u8; 4], [u8; 4])>,
}

impl Direction {
    /// Client → upstream, counting the client's requests.
    pub(crate) fn to_upstream(
        counter: Option<prometheus_client::metrics::counter::Counter>,
    ) -> Self {
        Direction {
            framer: Framer::counting(REQUESTS, UNSYNCED),
            counter,
            bytes: 0,
            torn: false,
            unsent: BytesMut::new(),
            uncounted: 0,
            shared: None,
            pid_swap: None,
        }
    }

    /// Upstream → client, counting ReadyForQuery; `unsent` is relayed before anything else.
    pub(crate) fn to_client(
        counter: Option<prometheus_client::metrics::counter::Counter>,
        unsent: BytesMut,
    ) -> Self {
        Direction {
            framer: Framer::counting(READY, TypeSet::default()).watching(NOTIFICATION),
            // Copied out (normally it is empty): the login's read buffer stays behind.
            unsent: BytesMut::from(&unsent[..]),
            counter,
            bytes: 0,
            torn: false,
            uncounted: 0,
            shared: None,
            pid_swap: None,
        }
    }

    /// Rewrites the pid of NotificationResponses that the session's own backend sent from
    /// `upstream` to `shown`, the pid of leasegate's BackendKeyData: a client tells its own
    /// notifications from others' by comparing the two (libpq's `be_pid` with
    /// `PQbackendPID`), and would otherwise take its own for another session's. The four
    /// bytes are rewritten in place when they arrive in one read (a read boundary inside them
    /// leaves that one notification as the server sent it).
    pub(crate) fn showing_pid(mut self, upstream: i32, shown: i32) -> Self {
        self.pid_swap = Some((upstream.to_be_bytes(), shown.to_be_bytes()));
        self
    }

    /// Also stores what it does into the registry entry, for `sessions list`.
    pub(crate) fn sharing(mut self, traffic: Shared) -> Self {
        self.shared = Some(traffic);
        self
    }

    /// Bytes about to be written to the far side (rewritten in place where
    /// [`Direction::showing_pid`] says).
    fn took(&mut self, chunk: &mut [u8]) {
        self.torn = true;
        let Some((upstream, shown)) = self.pid_swap else {
            self.framer.feed(chunk);
            return;
        };
        let mut pos = 0;
        while pos < chunk.len() {
            let n = self.framer.advance(&chunk[pos..]);
            if let Some(at) = self.framer.take_watched_body().map(|at| pos + at)
                && let Some(pid) = chunk.get_mut(at..at + 4)
                && *pid == upstream
            {
                pid.copy_from_slice(&shown);
            }
            pos += n;
        }
    }

    /// The bytes last taken are written.
    fn sent(&mut self, n: usize) {
        self.torn = false;
        self.bytes += n as u64;
        self.uncounted += n as u64;
        if self.uncounted >= COUNT_EVERY {
            self.count();
        }
        if let Some(t) = &self.shared {
            let f = &self.framer;
            t.traffic()
                .store(self.bytes, f.count(), f.last_counted_byte(), f.pending());
        }
    }

    /// Adds the bytes written since the last time to the shared counter.
    fn count(&mut self) {
        if let Some(c) = &self.counter
            && self.uncounted > 0
        {
            c.inc_by(self.uncounted);
        }
        self.uncounted = 0;
    }

    /// One read from `reader` into a lent buffer; the byte counter is brought up to date
    /// whenever the read has to wait.
    async fn read<R: AsyncRead>(
        &mut self,
        reader: &mut ReadHalf<R>,
    ) -> std::io::Result<Option<(Lent, usize)>> {
        std::future::poll_fn(|cx| {
            let polled = bufpool::poll_read_lent(reader, cx);
            if polled.is_pending() {
                self.count();
            }
            polled
        })
        .await
    }

    /// The next bytes of `unsent` copied into `buf`, at most its length; frees the buffer
    /// once it is empty.
    fn take_unsent(&mut self, buf: &mut [u8]) -> usize {
        let n = self.unsent.len().min(buf.len());
        buf[..n].copy_from_slice(&self.unsent[..n]);
        self.unsent.advance(n);
        if self.unsent.is_empty() {
            self.unsent = BytesMut::new();
        }
        n
    }

    /// Feeds what is left of `unsent` to the tracking only, at the close: the server sent it,
    /// the client will never see it.
    pub(crate) fn count_unsent(&mut self) {
        let rest = std::mem::take(&mut self.unsent);
        self.framer.feed(&rest);
    }
}

/// The relay's two directions, counting into the metrics and, for a registered session, into
/// what `sessions list` reads (the upstream's status at login first); `leftover` is what the
/// upstream sent after its first ReadyForQuery, relayed through the tracking first.
pub(crate) fn directions(
    metrics: &Metrics,
    leftover: BytesMut,
    status: u8,
    tracked: Option<&Arc<Tracked>>,
) -> (Direction, Direction) {
    let up = Direction::to_upstream(Some(metrics.relayed(RelayDirection::ToUpstream)));
    let down = Direction::to_client(Some(metrics.relayed(RelayDirection::ToClient)), leftover);
    match tracked {
        None => (up, down),
        Some(t) => {
            t.to_client.store(0, 0, status, false);
            let shared = |up| Shared {
                tracked: t.clone(),
                up,
            };
            (up.sharing(shared(true)), down.sharing(shared(false)))
        }
    }
}

/// One direction's counters in a registry entry.
pub(crate) struct Shared {
    /// The entry.
    tracked: Arc<Tracked>,
    /// Client → upstream (else upstream → client).
    up: bool,
}

impl Shared {
    /// This direction's counters.
    fn traffic(&self) -> &Traffic {
        match self.up {
            true => &self.tracked.to_upstream,
            false => &self.tracked.to_client,
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("session", &self.tracked.id)
            .field("up", &self.up)
            .finish()
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        self.count();
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
        dir.took(chunk);
        if let Err(e) = write_out(writer, chunk).await {
            return PumpEnd::Write(e);
        }
        dir.sent(n);
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
        dir.took(&mut chunk[..cut]);
        if let Err(e) = write_out(writer, &chunk[..cut]).await {
            return DownEnd::Pump(PumpEnd::Write(e));
        }
        dir.sent(cut);
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
            DownEnd::Pump(PumpEnd::Read(err)) => RelayEnd::UpstreamGone(err),
            DownEnd::Pump(PumpEnd::Write(e)) => RelayEnd::ClientGone(Some(e)),
            DownEnd::Ended { delivered } => RelayEnd::Ended { delivered },
        },
    }
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod relay_tests;
