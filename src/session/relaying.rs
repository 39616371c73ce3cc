//! The relay phase of a session, as a future of its own. Setup (handshake, grant, Vault,
//! upstream login) runs boxed and ends by handing over a [`Relay`]: what the relay, the
//! watcher, the close and the end audit line need, and nothing setup used. The session task
//! then holds only this phase's state for the rest of its life, so an idle session costs what
//! relaying needs, not the largest state of its setup. The phase's own steps borrow the
//! [`Relay`] instead of taking its parts by value, so no part is stored twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncWriteExt, split};
use tokio_util::sync::CancellationToken;

use super::close;
use super::greeting::{startup_head, startup_tail};
use super::handshake::{ClientHello, ClientStream};
use super::lifecycle::{self, Lifetime};
use super::relay::{self, Direction, RelayEnd, Relayed};
use crate::audit::AuditEvent;
use crate::cancel::CancelTarget;
use crate::limits::Permit;
use crate::metrics::labels::SessionOutcome;
use crate::net::ClientAddr;
use crate::registry::{Registered, Tracked};
use crate::state::{AppState, Live};
use crate::upstream::{Database, LoggedIn, UpstreamStream};
use crate::vault::LeaseGuard;

/// What a session refers to outside itself.
#[derive(Clone, Copy)]
pub(super) struct Scope<'a> {
    /// The proxy's shared state.
    pub state: &'a AppState,
    /// The configuration the session started under.
    pub live: &'a Live,
    /// The session's stop token (shutdown, `sessions end`, reload).
    pub stop: &'a CancellationToken,
    /// Where the client connected from.
    pub peer: ClientAddr,
    /// The upstream session was logged in ahead of demand (the audit's `warm`).
    pub warm: bool,
}

impl Scope<'_> {
    /// An audit line of `kind` with the session's facts, stamped now.
    fn audit(&self, kind: &'static str, tracked: &Tracked) -> AuditEvent {
        let facts = &tracked.facts;
        let mut event = AuditEvent::client(kind, &self.peer)
            .principal(&facts.principal)
            .request(&facts.database, &facts.role);
        (event.upstream_user, event.lease_id) = tracked.lease_ids();
        event.warm = self.warm.then_some(true);
        event
    }

    /// The end audit line and log line of a session that relayed for `elapsed`.
    fn ended(
        &self,
        relayed: &Relayed,
        closed: close::Closed,
        elapsed: Duration,
        tracked: &Tracked,
    ) {
        let mut end = self.audit("session_end", tracked);
        end.duration_ms = Some(elapsed.as_millis() as u64);
        end.bytes_to_upstream = Some(relayed.to_upstream.bytes);
        end.bytes_to_client = Some(relayed.to_client.bytes);
        end.reason = Some(relayed.end.audit_reason(Some(tracked)));
        let peer = &self.peer;
        tracing::info!(%peer, transport = peer.transport().as_str(), end = relayed.end.label(), detail = relayed.end.detail(),
            upstream_close = closed.label(),
            bytes_to_upstream = relayed.to_upstream.bytes, bytes_to_client = relayed.to_client.bytes,
            duration_ms = elapsed.as_millis() as u64, "session ended");
        self.state.audit.record(end);
    }
}

/// How long the close phase waits for the client's socket to shut down.
pub(super) const CLIENT_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// A session logged in upstream, as setup hands it over ([`Relay::new`] keeps what the relay
/// phase needs of it).
pub(super) struct Ready<'a> {
    /// The proxy, the session's stop token and where the client came from.
    pub scope: Scope<'a>,
    /// The client's stream and startup request (the startup reply reads it).
    pub hello: ClientHello,
    /// The upstream connection after its login.
    pub logged_in: LoggedIn,
    /// The database entry: the cancel target and the close's metric label.
    pub database: Arc<Database>,
    /// What the watcher needs of the lease and the database entry.
    pub life: Lifetime,
    /// Revokes the lease when dropped, once the upstream is closed.
    pub guard: LeaseGuard,
    /// The session's place under its limits, held until the upstream is closed.
    pub permit: Permit,
    /// The registry entry, deregistered last.
    pub tracked: Registered,
}

/// A session ready to relay: only what the relay, the watcher, the close and the end audit
/// line need (the startup request and the login's buffers are freed before). Its audit lines
/// are built from the registry entry (identities, request, upstream user, lease) when they are
/// written, so the relay phase keeps no copy of those facts beside the one `sessions list`
/// reads.
pub(super) struct Relay<'a> {
    /// The proxy, the session's stop token and where the client came from.
    scope: Scope<'a>,
    /// The client's startup reply up to leasegate's cancel key ([`startup_head`]).
    head: BytesMut,
    /// The client's and the upstream's connections.
    streams: Streams,
    /// Bytes the upstream sent after its ReadyForQuery (normally none).
    leftover: BytesMut,
    /// Transaction status of the upstream's first ReadyForQuery.
    status: u8,
    /// The upstream backend's cancel key.
    cancel_key: Option<(i32, i32)>,
    /// The database entry: the cancel target and the close's metric label.
    database: Arc<Database>,
    /// What the watcher needs of the lease and the database entry.
    life: Lifetime,
    /// Revokes the lease when dropped, once the upstream is closed.
    guard: LeaseGuard,
    /// The session's place under its limits, held until the upstream is closed.
    permit: Permit,
    /// The registry entry, deregistered last.
    tracked: Registered,
}

impl<'a> Relay<'a> {
    /// Keeps what relaying needs of `ready`; frees the rest (startup parameters, identities,
    /// the upstream's ParameterStatus once copied into the reply).
    pub(super) fn new(ready: Ready<'a>) -> Relay<'a> {
        let Ready {
            scope,
            hello,
            logged_in,
            database,
            life,
            guard,
            permit,
            tracked,
        } = ready;
        Relay {
            scope,
            head: startup_head(&hello, &logged_in),
            streams: Streams {
                client: hello.stream,
                upstream: logged_in.stream,
            },
            leftover: logged_in.leftover,
            status: logged_in.ready_status,
            cancel_key: logged_in.cancel_key,
            database,
            life,
            guard,
            permit,
            tracked,
        }
    }

    /// Startup completion as the client sees it, the relay, the close of the upstream
    /// (cancelling first when it is busy), the end audit line; then the lease is revoked and
    /// the session deregistered.
    pub(super) async fn run(mut self: Box<Self>) {
        // The fields are used in place (moved out one by one where needed): destructuring
        // would copy them into this future beside the box.
        let scope = &self.scope;
        let tracked: &Tracked = &self.tracked;
        let (state, live) = (scope.state, scope.live);
        let registration = cancel_target(&self.database, self.cancel_key).map(|t| {
            let id = live.cluster.as_ref().and_then(crate::cluster::Cluster::id);
            state.cancels.register(t, id)
        });
        state.audit.record(scope.audit("session_start", tracked));
        let started = Instant::now();
        state.metrics.sessions_active.inc();
        let key = registration.as_ref().map(|r| r.key);
        startup_tail(&mut self.head, key, self.status);
        let leftover = std::mem::take(&mut self.leftover);
        let (to_upstream, mut to_client) = relay::directions(
            &state.metrics,
            leftover,
            self.status,
            Some(&self.tracked.handle()),
        );
        // The client knows its backend by the pid of leasegate's key: so do its notifications.
        if let (Some((upstream, _)), Some((shown, _))) = (self.cancel_key, key) {
            to_client = to_client.showing_pid(upstream, shown);
        }
        // Built before the relay and filled in after, so the directions are stored once.
        let mut relayed = Relayed {
            end: RelayEnd::Ended { delivered: false },
            to_upstream,
            to_client,
        };
        let dirs = (&mut relayed.to_upstream, &mut relayed.to_client);
        let head = std::mem::take(&mut self.head);
        let (end, mut upstream) = self.streams.relay(scope, head, dirs, &self.life).await;
        if let Some(how) = end.end_reason() {
            tracked.ended(how);
        }
        relayed.end = end;
        let upstream_key = cancel_target(&self.database, self.cancel_key);
        let (db, metrics) = (&self.database.config.name, &state.metrics);
        let key = upstream_key.as_ref();
        let closed = Box::pin(close::close(&mut upstream, &mut relayed, key, db, metrics)).await;
        state.metrics.sessions_active.dec();
        let elapsed = started.elapsed();
        state
            .metrics
            .session_duration
            .observe(elapsed.as_secs_f64());
        drop(registration);
        scope.ended(&relayed, closed, elapsed, tracked);
        drop(self.guard); // the upstream is closed: revoke now
        drop(self.permit);
        drop(self.tracked); // deregistered once the lease is on its way out
        state.metrics.session_finished(SessionOutcome::Ok);
    }
}

/// The two connections of a relaying session.
pub(super) struct Streams {
    /// The client's (TLS or Unix socket).
    client: Box<ClientStream>,
    /// The upstream's, logged in.
    upstream: UpstreamStream,
}

impl Streams {
    /// Writes the startup reply `out`, then relays with the watcher beside it until either
    /// side ends; closes the client's side and gives back how it ended and the upstream.
    pub(super) async fn relay(
        mut self,
        session: &Scope<'_>,
        out: BytesMut,
        (to_upstream, to_client): (&mut Direction, &mut Direction),
        life: &Lifetime,
    ) -> (RelayEnd, UpstreamStream) {
        // The fields are moved out where needed, not destructured: no second copy of them.
        let write = async {
            self.client.write_all(&out).await?;
            self.client.flush().await
        };
        let written = write.await;
        drop(out);
        if let Err(e) = written {
            return (RelayEnd::ClientGone(Some(e)), self.upstream);
        }
        if let Some(t) = &life.tracked {
            t.relaying();
        }
        let state = session.state;
        let (mut cr, mut cw) = split(self.client);
        let (mut ur, mut uw) = split(self.upstream);
        let (tx, mut control) = relay::control_channel();
        let end = tokio::select! {
            end = relay::relay(
                &mut cr, &mut cw, &mut ur, &mut uw, &mut control, to_upstream, to_client,
            ) => end,
            // The watcher asked the relay to end the session and the relay could not (a
            // client that stopped reading): cut it.
            () = lifecycle::watch(&state.vault, &state.metrics, life, session.stop, tx) => {
                RelayEnd::Ended { delivered: false }
            }
        };
        let mut client = cr.unsplit(cw);
        let _ = tokio::time::timeout(CLIENT_CLOSE_WAIT, client.shutdown()).await;
        (end, ur.unsplit(uw))
    }
}

/// Where a cancel for the upstream backend goes: its own key on its database entry.
pub(super) fn cancel_target(
    database: &Arc<Database>,
    key: Option<(i32, i32)>,
) -> Option<CancelTarget> {
    key.map(|(pid, secret)| CancelTarget {
        database: database.clone(),
        pid,
        secret,
    })
}
