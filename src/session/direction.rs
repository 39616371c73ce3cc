//! One direction of the relay: the bytes it moved (and their counters: Prometheus, and the
//! registry entry `sessions list` reads), the message-boundary tracking that tells whether the
//! upstream is idle, the bytes left over from login, and, upstream to client, the rewrite of
//! the session's own NotificationResponse pid to the pid of leasegate's key.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadHalf};

use super::bufpool::{self, Buf as Lent};
use crate::metrics::Metrics;
use crate::metrics::labels::RelayDirection;
use crate::protocol::framing::{Framer, TypeSet};
use crate::registry::{Tracked, Traffic};

/// Bytes a direction relays before it adds them to the shared byte counter even while busy;
/// otherwise it adds them whenever it waits for its reader (so session threads do not
/// contend on the counter's cache line message by message).
const COUNT_EVERY: u64 = 1 << 20;

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
    /// Upstream → client: the first bytes of a NotificationResponse's pid when a read ended
    /// inside it, held back (not yet written) until the rest arrives and the whole pid can be
    /// compared and rewritten; the count is how many of the four are there.
    pid_head: ([u8; 4], usize),
}

/// What [`Direction::took`] says to write: `head` (bytes held back from earlier reads, to go
/// out first), then the first `len` bytes of the chunk; the chunk's other bytes are held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Took {
    /// Held-back bytes released now, written before the chunk.
    head: [u8; 4],
    /// How many bytes of `head` are meant.
    head_len: usize,
    /// Bytes of the chunk to write now.
    pub len: usize,
}

impl Took {
    /// The whole chunk of `len` bytes, nothing held.
    fn all(len: usize) -> Took {
        Took {
            len,
            ..Took::default()
        }
    }

    /// The held-back bytes to write before the chunk.
    pub(crate) fn head(&self) -> &[u8] {
        &self.head[..self.head_len]
    }

    /// Bytes written in all.
    pub(crate) fn total(&self) -> usize {
        self.head_len + self.len
    }
}

impl Direction {
    /// Client → upstream, counting the client's requests.
    pub(crate) fn to_upstream(
        counter: Option<prometheus_client::metrics::counter::Counter>,
    ) -> Self {
        Direction {
            framer: Framer::counting(REQUESTS, UNSYNCED).copy_in_aware(),
            counter,
            bytes: 0,
            torn: false,
            unsent: BytesMut::new(),
            uncounted: 0,
            shared: None,
            pid_swap: None,
            pid_head: ([0; 4], 0),
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
            pid_head: ([0; 4], 0),
        }
    }

    /// Rewrites the pid of NotificationResponses that the session's own backend sent from
    /// `upstream` to `shown`, the pid of leasegate's BackendKeyData: a client tells its own
    /// notifications from others' by comparing the two (libpq's `be_pid` with
    /// `PQbackendPID`), and would otherwise take its own for another session's. The four
    /// bytes are rewritten in place; when a read ends inside them, the bytes read so far are
    /// held back until the rest arrives ([`Direction::took`]).
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
    /// [`Direction::showing_pid`] says). Returns what to write: everything, unless a
    /// notification's pid is split between reads; then its first bytes are held back and
    /// come out as the `head` of the call whose bytes complete it.
    pub(crate) fn took(&mut self, chunk: &mut [u8]) -> Took {
        self.torn = true;
        let Some((upstream, shown)) = self.pid_swap else {
            self.framer.feed(chunk);
            return Took::all(chunk.len());
        };
        let mut took = Took::all(chunk.len());
        if self.pid_head.1 > 0 {
            match self.complete_pid(chunk, upstream, shown) {
                Some(head) => (took.head, took.head_len) = head,
                None => {
                    // Still not the whole pid: all of it stays held.
                    self.framer.feed(chunk);
                    return Took::all(0);
                }
            }
        }
        let mut pos = 0;
        while pos < chunk.len() {
            let n = self.framer.advance(&chunk[pos..]);
            if let Some(at) = self.framer.take_watched_body().map(|at| pos + at) {
                match chunk.get_mut(at..at + 4) {
                    Some(pid) if *pid == upstream => pid.copy_from_slice(&shown),
                    Some(_) => {}
                    None => {
                        // The read ends inside the pid: hold its bytes back.
                        let part = &chunk[at..];
                        self.pid_head.0[..part.len()].copy_from_slice(part);
                        self.pid_head.1 = part.len();
                        took.len = at;
                    }
                }
            }
            pos += n;
        }
        took
    }

    /// Adds the first bytes of `chunk` to the held part of a pid. When that completes it,
    /// rewrites it if it is `upstream`'s (the held bytes, and the chunk's in place) and
    /// returns the held bytes to write first; `None` while the pid is still incomplete.
    fn complete_pid(
        &mut self,
        chunk: &mut [u8],
        upstream: [u8; 4],
        shown: [u8; 4],
    ) -> Option<([u8; 4], usize)> {
        let (mut pid, had) = self.pid_head;
        let take = (4 - had).min(chunk.len());
        pid[had..had + take].copy_from_slice(&chunk[..take]);
        if had + take < 4 {
            self.pid_head = (pid, had + take);
            return None;
        }
        self.pid_head = ([0; 4], 0);
        if pid == upstream {
            pid = shown;
            chunk[..take].copy_from_slice(&shown[had..]);
        }
        Some((pid, had))
    }

    /// The bytes last taken are written.
    pub(crate) fn sent(&mut self, n: usize) {
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
    pub(crate) fn count(&mut self) {
        if let Some(c) = &self.counter
            && self.uncounted > 0
        {
            c.inc_by(self.uncounted);
        }
        self.uncounted = 0;
    }

    /// One read from `reader` into a lent buffer; the byte counter is brought up to date
    /// whenever the read has to wait.
    pub(crate) async fn read<R: AsyncRead>(
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
    pub(crate) fn take_unsent(&mut self, buf: &mut [u8]) -> usize {
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
