//! The close of a session's upstream connection, before its lease is revoked. PostgreSQL
//! notices a vanished client only when it next reads from it: a backend running a statement
//! keeps its connection slot, its CPU and its locks (and a readwrite revocation's `DROP OWNED`
//! waits on them). So when the upstream is not idle at ReadyForQuery the running statement is
//! cancelled first, with the upstream's own cancel key, then the connection is closed, and the
//! close waits (bounded) for the backend to close its side. The caller holds the lease guard
//! and the limiter permit until this returns, so the session counts against its limits and
//! its role lives until the backend is gone (or the wait gave up).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::relay::{RelayEnd, Relayed};
use crate::cancel::{self, CancelTarget};
use crate::metrics::Metrics;
use crate::metrics::labels::UpstreamClose;
use crate::upstream::UpstreamStream;

/// How long the close waits for the backend to close its connection (after Terminate, or
/// after the cancel) before the lease is revoked regardless.
pub(crate) const UPSTREAM_CLOSE_WAIT: Duration = Duration::from_secs(3);
/// Bound on forwarding one CancelRequest.
const CANCEL_WAIT: Duration = Duration::from_secs(2);
/// Longest [`close`] takes: the first cancel, then the wait for the backend.
pub(crate) const CLOSE_WITHIN: Duration = CANCEL_WAIT.saturating_add(UPSTREAM_CLOSE_WAIT);
/// While a busy backend has not closed, the cancel is repeated this often: PostgreSQL ignores
/// a cancel that arrives while it reads the next command, e.g. between pipelined statements.
const CANCEL_REPEAT: Duration = Duration::from_secs(1);
/// Least time between two cancels of one close. A client that pipelined thousands of short
/// statements and vanished would otherwise have one cancel sent per ReadyForQuery, each a
/// new connection (a forked process) on the server: over a thousand in the close's wait.
const CANCEL_GAP: Duration = Duration::from_millis(100);
/// The Terminate message.
const TERMINATE: &[u8] = b"X\0\0\0\x04";

/// How the upstream connection ended; the `leasegate_upstream_closes_total{how}` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// Idle at ReadyForQuery: Terminate, and the server closed.
    Idle,
    /// Busy: cancelled first, then closed, and the server closed in time.
    Busy,
    /// The server had closed the connection already.
    Gone,
    /// The server did not close within [`UPSTREAM_CLOSE_WAIT`]; the lease is revoked anyway.
    Timeout,
}

impl Closed {
    /// The metric label value.
    pub(crate) fn metric(self) -> UpstreamClose {
        match self {
            Closed::Idle => UpstreamClose::Idle,
            Closed::Busy => UpstreamClose::Busy,
            Closed::Gone => UpstreamClose::Gone,
            Closed::Timeout => UpstreamClose::Timeout,
        }
    }

    /// Short label for logs: the metric's label value.
    pub(crate) fn label(self) -> &'static str {
        self.metric().as_str()
    }
}

/// Ends the upstream connection of a relayed session: cancels first when the upstream is
/// busy (`cancel` is the upstream's own key), Terminate when the client → upstream stream is
/// between two messages (else only the write side is shut), then waits for the server to
/// close. Logs a timeout at WARN with the database name and counts every close by how.
pub(crate) async fn close(
    stream: &mut UpstreamStream,
    relayed: &mut Relayed,
    cancel: Option<&CancelTarget>,
    database: &str,
    metrics: &Metrics,
) -> Closed {
    relayed.to_client.count_unsent();
    let gone = matches!(relayed.end, RelayEnd::UpstreamGone(_));
    let busy = !gone && !relayed.upstream_idle();
    if let Some(target) = cancel.filter(|_| busy) {
        tracing::debug!(
            database,
            end = relayed.end.label(),
            "upstream busy at session end: cancelling"
        );
        send_cancel(target).await;
    }
    let terminate = !gone && relayed.can_terminate();
    let started = Instant::now();
    let closing = async {
        if terminate {
            let _ = stream.write_all(TERMINATE).await;
        }
        let _ = stream.shutdown().await;
        drain(stream, relayed, cancel).await
    };
    let (closed, cancelled_later) = match tokio::time::timeout(UPSTREAM_CLOSE_WAIT, closing).await {
        Ok(cancelled) => (true, cancelled),
        Err(_) => (false, false),
    };
    let busy = busy || cancelled_later;
    let how = match (closed, gone, busy) {
        (false, _, _) => Closed::Timeout,
        (true, true, _) => Closed::Gone,
        (true, false, true) => Closed::Busy,
        (true, false, false) => Closed::Idle,
    };
    if how == Closed::Timeout {
        tracing::warn!(database, busy, waited = ?started.elapsed(),
            "upstream backend did not close its connection in time; revoking the lease anyway");
    }
    metrics.upstream_closed(how.metric());
    how
}

/// Forwards one CancelRequest, bounded.
async fn send_cancel(target: &CancelTarget) {
    if tokio::time::timeout(CANCEL_WAIT, cancel::forward(target.clone()))
        .await
        .is_err()
    {
        tracing::warn!(database = %target.database.config.name, "cancel at session end timed out");
    }
}

/// Reads (and discards) until the server closes. What it still sends keeps counting, so a
/// pipelined statement that starts after the cancelled one is cancelled too: when its
/// predecessor's ReadyForQuery arrives (at least [`CANCEL_GAP`] after the last cancel) if the
/// counts say busy, and every [`CANCEL_REPEAT`] whatever they say. An idle backend closes at
/// once after Terminate, so one still open a second later is running something; and the
/// counts come from the client's messages, which a hostile client can make look idle (a Sync
/// followed by a CopyData outside COPY is uncounted as if the server had ignored it).
/// Returns whether it sent a cancel.
async fn drain(
    stream: &mut UpstreamStream,
    relayed: &mut Relayed,
    cancel: Option<&CancelTarget>,
) -> bool {
    let mut sink = vec![0u8; 4096];
    // `close` has just sent the first cancel (when there is one).
    let mut last_cancel = Instant::now();
    let mut next_cancel = last_cancel + CANCEL_REPEAT;
    // The next cancel was brought forward by a ReadyForQuery (sent only if the counts say busy).
    let mut early = false;
    let mut cancelled = false;
    loop {
        tokio::select! {
            r = stream.read(&mut sink) => match r {
                Ok(0) | Err(_) => return cancelled,
                Ok(n) => {
                    let answered = relayed.to_client.framer.count();
                    relayed.to_client.framer.feed(&sink[..n]);
                    let sooner = last_cancel + CANCEL_GAP;
                    if relayed.to_client.framer.count() > answered && sooner < next_cancel {
                        (next_cancel, early) = (sooner, true);
                    }
                }
            },
            _ = tokio::time::sleep_until(next_cancel), if cancel.is_some() => {
                if let Some(target) = cancel.filter(|_| !early || !relayed.upstream_idle()) {
                    send_cancel(target).await;
                    cancelled = true;
                }
                last_cancel = Instant::now();
                (next_cancel, early) = (last_cancel + CANCEL_REPEAT, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::FutureExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::session::relay::Direction;
    use crate::upstream::Database;

    /// A stand-in for PostgreSQL on a local port: the session's connection and a cancel
    /// target pointing at the same port (PostgreSQL takes cancels on its own port too).
    async fn fake_backend() -> (TcpListener, UpstreamStream, TcpStream, CancelTarget) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let ours = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let (theirs, _) = listener.accept().await.expect("accept");
        let config = toml::from_str(&format!(
            "name = \"myapp\"\nhost = \"127.0.0.1\"\nport = {port}\nmount = \"database\"\nroles = [\"readonly\"]"
        ))
        .expect("database entry");
        let target = CancelTarget {
            database: Arc::new(Database { config, tls: None }),
            pid: 4242,
            secret: 77,
        };
        (listener, UpstreamStream::Plain(ours), theirs, target)
    }

    /// A relay that saw `up` go upstream and `down` come back, and ended with `end`.
    fn relayed(end: RelayEnd, up: &[u8], down: &[u8]) -> Relayed {
        let mut r = Relayed {
            end,
            to_upstream: Direction::to_upstream(None),
            to_client: Direction::to_client(None, bytes::BytesMut::new()),
        };
        r.to_upstream.framer.feed(up);
        r.to_client.framer.feed(down);
        r
    }

    /// Everything the fake backend reads until our side shuts its write half.
    async fn read_to_end(mut s: TcpStream) -> Vec<u8> {
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.expect("read");
        all
    }

    const QUERY: &[u8] = b"Q\0\0\0\x0asleep\0";

    #[tokio::test]
    async fn busy_upstream_is_cancelled_with_its_own_key_then_terminated() {
        let (listener, mut stream, backend, target) = fake_backend().await;
        let mut r = relayed(RelayEnd::ClientGone(None), QUERY, b"");
        let metrics = Metrics::new();
        let closing = tokio::spawn(async move {
            let how = close(&mut stream, &mut r, Some(&target), "myapp", &metrics).await;
            (how, metrics.render())
        });
        // The cancel comes first, on a connection of its own, with the upstream's key.
        let (cancel, _) = listener.accept().await.expect("cancel connection");
        let request = read_to_end(cancel).await;
        let mut want = vec![0, 0, 0, 16];
        want.extend_from_slice(&80_877_102u32.to_be_bytes());
        want.extend_from_slice(&4242i32.to_be_bytes());
        want.extend_from_slice(&77i32.to_be_bytes());
        assert_eq!(request, want);
        // The backend answers the cancelled query, then reads Terminate and closes.
        let (mut backend_r, mut backend_w) = backend.into_split();
        backend_w
            .write_all(b"E\0\0\0\x04Z\0\0\0\x05I")
            .await
            .expect("answer");
        let mut got = Vec::new();
        backend_r.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, TERMINATE);
        drop((backend_r, backend_w));
        let (how, text) = closing.await.expect("join");
        assert_eq!(how, Closed::Busy);
        assert!(
            text.contains("leasegate_upstream_closes_total{how=\"busy\"} 1"),
            "{text}"
        );
        // The answered query needs no second cancel.
        assert!(listener.accept().now_or_never().is_none(), "one cancel");
    }

    #[tokio::test]
    async fn idle_upstream_gets_terminate_and_no_cancel() {
        let (listener, mut stream, backend, target) = fake_backend().await;
        let mut r = relayed(RelayEnd::ClientGone(None), QUERY, b"Z\0\0\0\x05I");
        let metrics = Metrics::new();
        let closing = tokio::spawn(async move {
            close(&mut stream, &mut r, Some(&target), "myapp", &metrics).await
        });
        assert_eq!(read_to_end(backend).await, TERMINATE);
        assert_eq!(closing.await.expect("join"), Closed::Idle);
        assert!(listener.accept().now_or_never().is_none(), "no cancel");
    }

    #[tokio::test]
    async fn a_backend_still_open_after_terminate_is_cancelled_whatever_the_counts_say() {
        // A client sent a query, a Sync and a CopyData outside COPY (uncounted as if the
        // server had ignored the Sync, which it did not), then a long query: the counts say
        // idle while the backend runs it.
        let mut up = b"Q\0\0\0\x06x\0S\0\0\0\x04d\0\0\0\x04".to_vec();
        up.extend_from_slice(QUERY);
        let down = b"Z\0\0\0\x05IZ\0\0\0\x05I";
        let (listener, mut stream, backend, target) = fake_backend().await;
        let mut r = relayed(RelayEnd::ClientGone(None), &up, down);
        assert!(r.upstream_idle(), "the counts are fooled");
        let metrics = Metrics::new();
        let closing = tokio::spawn(async move {
            close(&mut stream, &mut r, Some(&target), "myapp", &metrics).await
        });
        // The backend reads Terminate but, busy, does not close: the cancel comes anyway.
        let (mut backend_r, backend_w) = backend.into_split();
        let mut got = Vec::new();
        backend_r.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, TERMINATE);
        // Like PostgreSQL, close the cancel connection once the request is read.
        let (mut cancel, _) = listener.accept().await.expect("cancel connection");
        let mut request = [0u8; 16];
        cancel
            .read_exact(&mut request)
            .await
            .expect("cancel request");
        assert_eq!(request[4..8], 80_877_102u32.to_be_bytes());
        drop(cancel);
        drop((backend_r, backend_w));
        assert_eq!(closing.await.expect("join"), Closed::Busy);
    }

    #[tokio::test]
    async fn half_a_message_upstream_gets_no_terminate() {
        let (listener, mut stream, backend, target) = fake_backend().await;
        let mut r = relayed(RelayEnd::ClientGone(None), &QUERY[..6], b"");
        let metrics = Metrics::new();
        let closing = tokio::spawn(async move {
            close(&mut stream, &mut r, Some(&target), "myapp", &metrics).await
        });
        let (cancel, _) = listener.accept().await.expect("cancel connection");
        assert_eq!(read_to_end(cancel).await.len(), 16);
        // Only the write side is shut: a Terminate would land inside the query.
        assert_eq!(read_to_end(backend).await, b"");
        assert_eq!(closing.await.expect("join"), Closed::Busy);
    }

    #[tokio::test]
    async fn a_closed_upstream_is_not_cancelled() {
        let (listener, mut stream, backend, target) = fake_backend().await;
        drop(backend);
        let mut r = relayed(RelayEnd::UpstreamGone(None), QUERY, b"");
        let metrics = Metrics::new();
        let how = close(&mut stream, &mut r, Some(&target), "myapp", &metrics).await;
        assert_eq!(how, Closed::Gone);
        assert!(listener.accept().now_or_never().is_none(), "no cancel");
    }
}
