//! The audit log: one JSON line per session start, session end and refusal, with who (every
//! certificate identity, serial, fingerprint), from where, which database and role, which
//! upstream user and lease, how long and how many bytes. Never a password or token: the
//! event types have no field that could hold one.
//!
//! Lines are queued to one writer thread. The queue is bounded ([`QUEUE_CAPACITY`]): when the
//! sink stalls (a blocked stderr pipe), further events are dropped and counted in
//! `leasegate_audit_events_dropped_total`, with a rate-limited warning, rather than growing
//! memory at the rate clients connect; a line the sink refuses (a full disk) is counted there
//! too, with a rate-limited error. The file is created with mode 0600, and again at its
//! path when it was removed or renamed away (`file`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::escape::printable;
use crate::identity::Principal;
use crate::net::ClientAddr;
use crate::tasks::Tasks;
use file::AuditFile;

mod file;

/// Audit events waiting for the writer at most; further ones are dropped (and counted).
pub(crate) const QUEUE_CAPACITY: usize = 10_000;

/// At most one "audit events dropped" warning this often.
const DROP_WARNING_EVERY: Duration = Duration::from_secs(10);

/// One audit line.
#[derive(Debug, Serialize, Default, Clone)]
pub(crate) struct AuditEvent {
    /// RFC 3339 time with milliseconds.
    pub time: String,
    /// `session_start`, `session_end` or `refused`.
    pub event: &'static str,
    /// The client's address.
    pub client_addr: String,
    /// Every identity of the certificate (`uri:…`, `dns:…`, `cn:…`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Certificate serial, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
    /// SHA-256 of the certificate, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
    /// Requested database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// Requested Vault role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Database user Vault issued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_user: Option<String>,
    /// Vault lease id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// Session duration (end events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Bytes client → upstream (end events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_to_upstream: Option<u64>,
    /// Bytes upstream → client (end events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_to_client: Option<u64>,
    /// Why the session ended, or why the client was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// SQLSTATE the client was sent (refusals and failures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
    /// `true` when the session got a warm upstream session (logged in ahead of demand).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm: Option<bool>,
    /// The uid of the admin socket's caller (`admin_request`, `admin_refused`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller_uid: Option<u32>,
    /// What the admin socket was asked (`sessions_list`, `sessions_end`, `leases_check`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<&'static str>,
    /// How the admin request ended (the `leasegate_admin_requests_total` result).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<&'static str>,
    /// How the client connected: `tls` or `unix` (lines written through
    /// [`AuditEvent::client`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<&'static str>,
    /// A Unix-socket peer's uid (`SO_PEERCRED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_uid: Option<u32>,
    /// A Unix-socket peer's gid (`SO_PEERCRED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_gid: Option<u32>,
    /// The user name of the peer's uid in the user database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_user: Option<String>,
    /// A Unix-socket peer's process id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_pid: Option<i32>,
}

impl AuditEvent {
    /// An event of `kind` for a TCP client, stamped now (sessions use [`AuditEvent::client`]).
    #[allow(dead_code)] // the form for a caller that holds only a socket address
    pub(crate) fn new(event: &'static str, peer: SocketAddr) -> AuditEvent {
        AuditEvent {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
            client_addr: peer.to_string(),
            ..AuditEvent::default()
        }
    }

    /// An admin socket request by `uid` on `socket`, stamped now.
    pub(crate) fn admin(event: &'static str, socket: &Path, uid: u32) -> AuditEvent {
        AuditEvent {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
            client_addr: format!("unix:{}", printable(&socket.display().to_string())),
            caller_uid: Some(uid),
            ..AuditEvent::default()
        }
    }

    /// Adds the certificate's identities.
    /// An event of `kind` for a client of either listener, stamped now: its address (for a
    /// Unix-socket peer `unix:uid=N,pid=P`), the transport, and a Unix peer's uid and pid.
    pub(crate) fn client(event: &'static str, peer: &ClientAddr) -> AuditEvent {
        let mut e = AuditEvent {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
            client_addr: peer.to_string(),
            transport: Some(peer.transport().as_str()),
            ..AuditEvent::default()
        };
        if let ClientAddr::Unix { uid, pid } = peer {
            e.unix_uid = Some(*uid);
            e.unix_pid = *pid;
        }
        e
    }

    /// Adds the certificate's identities (a Unix peer's, with its gid and user name).
    pub(crate) fn principal(mut self, p: &Principal) -> AuditEvent {
        self.identities = p.all_identities().iter().map(|i| printable(i)).collect();
        if let Some(unix) = &p.unix {
            self.unix_uid = Some(unix.uid);
            self.unix_gid = Some(unix.gid);
            self.unix_user = unix.user.as_deref().map(printable);
            return self;
        }
        self.cert_serial = Some(p.serial.clone());
        self.cert_sha256 = Some(p.fingerprint.clone());
        self
    }

    /// The same facts as a new event of another kind, stamped now.
    pub(crate) fn again(&self, event: &'static str) -> AuditEvent {
        AuditEvent {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
            ..self.clone()
        }
    }

    /// Adds the client-visible outcome of a refusal or failure.
    pub(crate) fn error(mut self, err: &crate::error::SessionError) -> AuditEvent {
        self.reason = Some(err.to_string());
        self.sqlstate = Some(err.sqlstate().code().to_owned());
        self
    }

    /// Adds the requested database and role.
    pub(crate) fn request(mut self, database: &str, role: &str) -> AuditEvent {
        self.database = Some(printable(database));
        self.role = Some(printable(role));
        self
    }
}

/// Where audit lines go. Cloning shares the queue and the writer.
#[derive(Clone)]
pub(crate) struct AuditLog {
    shared: Arc<Shared>,
}

struct Shared {
    /// The bounded queue to the writer thread; `None` tells it to stop.
    tx: mpsc::Sender<Option<AuditEvent>>,
    /// `leasegate_audit_events_dropped_total`: events a full queue refused (the writer counts
    /// those it could not write).
    dropped: Counter,
    /// When the last "dropped" warning was logged, for rate limiting.
    last_warning: Mutex<Option<Instant>>,
}

impl AuditLog {
    /// Starts the writer on `tasks`: `None` or `-` writes to stderr, a path appends to that
    /// file (created with mode 0600). `dropped` counts events a full queue refused.
    pub(crate) fn spawn(
        path: Option<PathBuf>,
        dropped: Counter,
        tasks: &Tasks,
    ) -> std::io::Result<AuditLog> {
        let out: Box<dyn Write + Send> = match path.as_ref().filter(|p| p.as_os_str() != "-") {
            Some(p) => Box::new(AuditFile::open(p)?),
            None => Box::new(std::io::stderr()),
        };
        Ok(AuditLog::with_writer(out, QUEUE_CAPACITY, dropped, tasks))
    }

    /// Starts a writer thread writing to `out` behind a queue of `capacity` events (must run
    /// inside a Tokio runtime). When the token of `tasks` is cancelled, the writer writes
    /// what is queued and stops.
    pub(crate) fn with_writer(
        mut out: Box<dyn Write + Send>,
        capacity: usize,
        dropped: Counter,
        tasks: &Tasks,
    ) -> AuditLog {
        let (tx, mut rx) = mpsc::channel::<Option<AuditEvent>>(capacity.max(1));
        let (closer, stop) = (tx.clone(), tasks.stop().clone());
        tasks.spawn(async move {
            stop.cancelled().await;
            let _ = closer.send(None).await;
        });
        let lost = dropped.clone();
        tasks.spawn_blocking(move || {
            let mut last_error: Option<Instant> = None;
            while let Some(Some(event)) = rx.blocking_recv() {
                let Ok(mut line) = serde_json::to_vec(&event) else {
                    continue;
                };
                line.push(b'\n');
                if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
                    // A full disk fails every line: each is counted, the error logged at most
                    // every 10 s.
                    lost.inc();
                    if last_error.is_none_or(|t| t.elapsed() >= DROP_WARNING_EVERY) {
                        last_error = Some(Instant::now());
                        tracing::error!(error = %e, dropped_total = lost.get(),
                            "cannot write the audit log: audit events dropped");
                    }
                }
            }
        });
        AuditLog {
            shared: Arc::new(Shared {
                tx,
                dropped,
                last_warning: Mutex::new(None),
            }),
        }
    }

    /// Queues one line; drops it (counted, warned about at most every 10 s) when the queue
    /// is full.
    pub(crate) fn record(&self, event: AuditEvent) {
        if self.shared.tx.try_send(Some(event)).is_ok() {
            return;
        }
        let shared = &self.shared;
        shared.dropped.inc();
        let mut last = shared
            .last_warning
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= DROP_WARNING_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                dropped_total = shared.dropped.get(),
                capacity = shared.tx.max_capacity(),
                "audit log writer is behind: queue full, audit events dropped"
            );
        }
    }

    #[cfg(test)]
    /// Events waiting for the writer now.
    pub(crate) fn queued(&self) -> usize {
        self.shared.tx.max_capacity() - self.shared.tx.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::mpsc as std_mpsc;

    #[test]
    fn control_characters_are_escaped() {
        let p = Principal::new(vec![], vec![], Some("evil\n\r\u{1b}[2J\"x".into()));
        let e = AuditEvent::new("refused", "127.0.0.1:5000".parse().expect("addr"))
            .principal(&p)
            .request("ro\u{7}\u{7f}\u{85}x", "\u{202e}ro");
        let line = serde_json::to_string(&e).expect("json");
        let v: serde_json::Value = serde_json::from_str(&line).expect("parses");
        assert_eq!(v["identities"][0], "cn:evil\\n\\r\\u{1b}[2J\"x");
        assert_eq!(v["database"], "ro\\u{7}\\u{7f}\\u{85}x");
        assert_eq!(v["role"], "\\u{202e}ro");
        for field in [&v["identities"][0], &v["database"], &v["role"]] {
            let text = field.as_str().expect("string");
            assert!(!text.chars().any(char::is_control), "{text:?}");
        }
    }

    /// A sink that blocks in its first write until told to go on, and keeps what it got.
    struct Stalled {
        blocked: Option<(std_mpsc::Sender<()>, std_mpsc::Receiver<()>)>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some((started, go)) = self.blocked.take() {
                let _ = started.send(());
                let _ = go.recv_timeout(Duration::from_secs(60));
            }
            self.written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_stalled_sink_bounds_the_queue_and_counts_what_it_drops() {
        let (started_tx, started) = std_mpsc::channel();
        let (go, go_rx) = std_mpsc::channel();
        let written = Arc::new(Mutex::new(Vec::new()));
        let sink = Stalled {
            blocked: Some((started_tx, go_rx)),
            written: written.clone(),
        };
        let dropped = Counter::default();
        let tasks = Tasks::detached();
        let log = AuditLog::with_writer(Box::new(sink), 100, dropped.clone(), &tasks);
        let event = || AuditEvent::new("refused", "127.0.0.1:5000".parse().expect("addr"));
        log.record(event());
        started
            .recv_timeout(Duration::from_secs(60))
            .expect("the writer took the first event and blocks in write");
        for _ in 0..5_000 {
            log.record(event());
        }
        assert_eq!(log.queued(), 100, "the queue holds its capacity, no more");
        assert_eq!(
            dropped.get(),
            4_900,
            "every event past the capacity is counted"
        );

        go.send(()).expect("release the writer");
        let lines = || {
            let w = written.lock().unwrap_or_else(|e| e.into_inner());
            w.iter().filter(|b| **b == b'\n').count()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while lines() < 101 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            lines(),
            101,
            "the queued events are written once the sink moves"
        );
        assert_eq!(log.queued(), 0);
        log.record(event());
        assert_eq!(dropped.get(), 4_900, "nothing dropped while there is room");
    }

    #[tokio::test]
    async fn at_the_stop_the_writer_writes_what_is_queued_and_ends() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let sink = Stalled {
            blocked: None,
            written: written.clone(),
        };
        let log = three_lines_then_stop(Box::new(sink), Counter::default()).await;
        let w = written.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(w.iter().filter(|b| **b == b'\n').count(), 3);
        drop(log);
    }

    /// Records three events into a log writing to `sink`, stops the tasks and waits for the
    /// writer to end. The log (a sender) is returned alive: the writer must end without it
    /// being dropped.
    async fn three_lines_then_stop(sink: Box<dyn Write + Send>, dropped: Counter) -> AuditLog {
        let tracker = tokio_util::task::TaskTracker::new();
        let tasks = Tasks::new(tracker.clone(), tokio_util::sync::CancellationToken::new());
        let log = AuditLog::with_writer(sink, 100, dropped, &tasks);
        for _ in 0..3 {
            log.record(AuditEvent::new(
                "refused",
                "127.0.0.1:5000".parse().expect("addr"),
            ));
        }
        tasks.stop().cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(60), tracker.wait())
            .await
            .expect("the writer ended");
        log
    }

    /// A sink that refuses every write, as a full disk does.
    struct Full;

    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(28))
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn lines_the_sink_refuses_are_counted_as_dropped() {
        let dropped = Counter::default();
        let log = three_lines_then_stop(Box::new(Full), dropped.clone()).await;
        assert_eq!(dropped.get(), 3);
        drop(log);
    }

    #[test]
    fn serializes_only_present_fields() {
        let p = Principal::new(vec!["spiffe://x/a".into()], vec![], Some("a".into()));
        let mut e = AuditEvent::new("refused", "127.0.0.1:5000".parse().expect("addr"))
            .principal(&p)
            .request("myapp", "readonly");
        e.sqlstate = Some("28000".into());
        let v: serde_json::Value = serde_json::to_value(&e).expect("json");
        assert_eq!(v["event"], "refused");
        assert_eq!(
            v["identities"],
            serde_json::json!(["uri:spiffe://x/a", "cn:a"])
        );
        assert_eq!(v["database"], "myapp");
        assert!(v.get("lease_id").is_none());
    }
}
