//! One client session, end to end: handshake (`handshake`), policy, the startup parameter
//! check, Vault credential, upstream login, the client's view of startup, relay (`relay`), and
//! the close (`close`: a busy upstream is cancelled first, and the lease is revoked only once
//! the backend is gone).

mod bufpool;
mod cancel_request;
mod client_stream;
pub(crate) mod close;
mod control;
mod credential;
mod greeting;
pub(crate) mod handshake;
pub(crate) mod lifecycle;
pub(crate) mod relay;
pub(crate) mod unix;
mod warm;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, split};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::audit::AuditEvent;
use crate::cancel::CancelTarget;
use crate::error::SessionError;
use crate::escape::logged;
use crate::metrics::labels::{SessionOutcome, SetupPhase};
use crate::net::ClientAddr;
use crate::policy::Denial;
use crate::registry::{NewSession, Registered};
use crate::state::{AppState, Live};
use crate::upstream::{self, Database, LoggedIn, UpstreamError};
use crate::vault::Lease;
use greeting::startup_reply;
use handshake::{Accepted, ClientHello, ClientStream, report};
use lifecycle::Lifetime;
use relay::{RelayEnd, Relayed};

/// How long the close phase waits for the client's socket to shut down.
const CLIENT_CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Longest a relaying session takes to end once its stop token is cancelled: the watcher's
/// FATAL, delivered or cut after [`lifecycle::FORCE_AFTER`], then the client's close and the
/// upstream's (a busy one cancelled first: [`close::CLOSE_WITHIN`]). A session still waiting
/// for its creds call takes up to `vault.timeout` instead.
pub(crate) const END_WITHIN: Duration = lifecycle::FORCE_AFTER
    .saturating_add(CLIENT_CLOSE_WAIT)
    .saturating_add(close::CLOSE_WITHIN);

/// Serves one accepted TCP connection to its end, recording metrics, logs and audit lines.
pub(crate) async fn run(
    state: Arc<AppState>,
    tcp: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let live = state.live.load_full();
    let started = Instant::now();
    let mut peer = peer;
    let accepted = setup(&live, &stop, accept(tcp, &mut peer, &live)).await;
    finish(
        &state,
        &live,
        accepted,
        ClientAddr::Tcp(peer),
        started,
        &stop,
    )
    .await;
}

/// The pre-authentication phase under `login_timeout`, given up at shutdown.
async fn setup(
    live: &Live,
    stop: &CancellationToken,
    handshake: impl Future<Output = Result<Accepted, SessionError>>,
) -> Result<Accepted, SessionError> {
    tokio::select! {
        r = tokio::time::timeout(live.login_timeout, Box::pin(handshake)) => {
            r.unwrap_or(Err(SessionError::LoginTimeout))
        }
        _ = stop.cancelled() => Err(SessionError::Shutdown),
    }
}

/// A connection after its handshake (TLS or Unix socket), to its end: the cancel path, or the
/// session; metrics, logs and audit lines.
async fn finish(
    state: &Arc<AppState>,
    live: &Live,
    accepted: Result<Accepted, SessionError>,
    peer: ClientAddr,
    started: Instant,
    stop: &CancellationToken,
) {
    let result = match accepted {
        Ok(Accepted::Cancel(request)) => {
            cancel_request::handle(state, live, request, &peer).await;
            return;
        }
        Ok(Accepted::Session(hello)) => {
            state
                .metrics
                .setup_phase(SetupPhase::Tls, started.elapsed().as_secs_f64());
            let audit = AuditEvent::client("session_start", &peer)
                .principal(&hello.principal)
                .request(&hello.database, &hello.role);
            let session = Session {
                state,
                live,
                peer,
                stop,
                audit,
                started,
            };
            session.serve(*hello).await
        }
        Err(e) => {
            if let Some(reason) = e.tls_failure_reason() {
                state.metrics.tls_failure(reason);
            }
            state
                .audit
                .record(AuditEvent::client("refused", &peer).error(&e));
            Err(e)
        }
    };
    match result {
        Ok(()) => state.metrics.session_finished(SessionOutcome::Ok),
        Err(e) => {
            if let Some(reason) = e.auth_failure_reason() {
                state.metrics.auth_failure(reason);
                tracing::info!(%peer, reason = reason.as_str(), error = %e, "client refused");
            } else {
                tracing::warn!(%peer, error = %e, "session failed");
            }
            state.metrics.session_finished(e.outcome());
        }
    }
}

/// The PROXY header of a trusted load balancer (`peer` becomes the client address it gives),
/// then the handshake.
async fn accept(
    mut tcp: TcpStream,
    peer: &mut SocketAddr,
    live: &Live,
) -> Result<Accepted, SessionError> {
    let from = &live.proxy_protocol_from;
    match crate::proxy_header::client_address(&mut tcp, *peer, from).await {
        Ok(client) => *peer = client,
        Err(e) => {
            let e = SessionError::from(e);
            report(&mut tcp, &e).await;
            return Err(e);
        }
    }
    handshake::accept(tcp, &live.tls).await
}

/// One session after the handshake: what it needs from the proxy, and its audit facts.
struct Session<'a> {
    state: &'a AppState,
    live: &'a Live,
    peer: ClientAddr,
    stop: &'a CancellationToken,
    audit: AuditEvent,
    /// When the connection was accepted, for the setup-time metric.
    started: Instant,
}

impl Session<'_> {
    /// Tells the client, writes the audit line (`refused` for the client's fault, `failed`
    /// otherwise), and returns the error.
    async fn fail(&self, stream: &mut ClientStream, err: SessionError) -> Result<(), SessionError> {
        report(stream, &err).await;
        let kind = if err.auth_failure_reason().is_some() {
            "refused"
        } else {
            "failed"
        };
        self.state.audit.record(self.audit.again(kind).error(&err));
        Err(err)
    }

    /// The grant check: the database entry the client may use and the identity the grant
    /// matched, or the denial.
    fn authorize(&self, hello: &ClientHello) -> Result<(Arc<Database>, String), SessionError> {
        let database = self.live.databases.get(&hello.database).cloned();
        let db_roles = database.as_ref().map(|d| d.config.roles.as_slice());
        let decision =
            self.live
                .policy
                .decide(&hello.principal, &hello.database, &hello.role, db_roles);
        match (decision, database) {
            (Ok(identity), Some(database)) => Ok((database, identity)),
            (decision, _) => {
                // The policy never allows a database that is not configured.
                let denial = decision.err().unwrap_or(Denial::DatabaseNotGranted);
                if let Some(unix) = &hello.principal.unix {
                    return Err(SessionError::UnixDenied {
                        denial,
                        identity: hello.principal.display_name(),
                        uid: unix.uid,
                        role: hello.role.clone(),
                        database: hello.database.clone(),
                    });
                }
                Err(SessionError::Denied {
                    denial,
                    identity: hello.principal.display_name(),
                    role: hello.role.clone(),
                    database: hello.database.clone(),
                })
            }
        }
    }

    /// Lists the session (in setup) until the guard drops; `sessions end` stops it with
    /// `stop`.
    fn register(&self, hello: &ClientHello) -> Registered {
        let facts = NewSession {
            transport: self.peer.transport(),
            client_addr: self.peer.to_string(),
            principal: hello.principal.clone(),
            database: hello.database.clone(),
            role: hello.role.clone(),
        };
        self.state.sessions.register(facts, self.stop.clone())
    }

    async fn serve(mut self, mut hello: ClientHello) -> Result<(), SessionError> {
        let (database, identity) = match self.authorize(&hello) {
            Ok(d) => d,
            Err(e) => return self.fail(&mut hello.stream, e).await,
        };
        let settings = match startup_settings(&hello, &database) {
            Ok(s) => s,
            Err(e) => return self.fail(&mut hello.stream, e).await,
        };
        // Counted under the identity the grant matched (a certificate cannot dodge its limit by
        // putting another name first), and held until the upstream connection is closed (the
        // end of this function): a session counts against its limits until its backend is
        // gone, not only while it relays.
        let permit = match self.state.limiter.acquire(&identity) {
            Ok(p) => p,
            Err(hit) => {
                let e = SessionError::Limited { hit, identity };
                return self.fail(&mut hello.stream, e).await;
            }
        };
        let tracked = self.register(&hello);
        if let Some(w) = self.warm(&database, &hello.role, &settings) {
            return self.serve_warm(hello, w, &database, permit, tracked).await;
        }
        let vault_started = Instant::now();
        let credential = Box::pin(self.credential(&database, &hello.role, &tracked)).await;
        let (lease, guard, remaining) = match credential {
            Ok(c) => c,
            Err(e) => return self.fail(&mut hello.stream, e).await,
        };
        let metrics = &self.state.metrics;
        metrics.setup_phase(SetupPhase::Vault, vault_started.elapsed().as_secs_f64());
        let login_started = Instant::now();
        self.audit.upstream_user = Some(lease.username.clone());
        self.audit.lease_id = Some(lease.id.clone());
        tracing::debug!(peer = %self.peer, identity = %logged(&hello.principal.display_name()),
            database = %logged(&hello.database), role = %logged(&hello.role), username = %lease.username,
            lease_id = %guard.id(), "credential issued");
        let life = lifetime(&lease, remaining, &database, &hello.role, &tracked);
        let logged_in = tokio::select! {
            r = Box::pin(login_upstream(&database, &lease, &settings)) => r,
            _ = self.stop.cancelled() => Err(tracked.stopped()),
        };
        drop((lease, settings));
        if let Err(SessionError::Upstream(e)) = &logged_in {
            metrics.upstream_error(&database.config.name, e.kind());
        }
        let logged_in = match logged_in {
            Ok(l) => {
                let login = login_started.elapsed().as_secs_f64();
                metrics.setup_phase(SetupPhase::UpstreamLogin, login);
                metrics.setup_phase(SetupPhase::Total, self.started.elapsed().as_secs_f64());
                l
            }
            Err(SessionError::Upstream(e)) if e.raw_error().is_some() => {
                forward_raw(&mut hello.stream, e.raw_error()).await;
                let e = SessionError::Upstream(e);
                self.state
                    .audit
                    .record(self.audit.again("failed").error(&e));
                return Err(e);
            }
            Err(e) => return self.fail(&mut hello.stream, e).await,
        };
        self.relay(hello, logged_in, &database, life).await;
        drop(guard); // the upstream is closed: revoke now
        drop(permit);
        drop(tracked); // deregistered once the lease is on its way out
        Ok(())
    }

    async fn relay(
        &self,
        hello: ClientHello,
        logged_in: LoggedIn,
        database: &Arc<Database>,
        life: Lifetime,
    ) {
        let registration = cancel_target(database, logged_in.cancel_key).map(|target| {
            let id = self
                .live
                .cluster
                .as_ref()
                .and_then(crate::cluster::Cluster::id);
            self.state.cancels.register(target, id)
        });
        self.state.audit.record(self.audit.again("session_start"));
        let started = Instant::now();
        self.state.metrics.sessions_active.inc();
        let key = registration.as_ref().map(|r| r.key);
        let tracked = life.tracked.clone();
        let (relayed, closed) =
            relay_session(self.state, hello, logged_in, key, database, life, self.stop).await;
        self.state.metrics.sessions_active.dec();
        self.state
            .metrics
            .session_duration
            .observe(started.elapsed().as_secs_f64());
        drop(registration);
        let mut end = self.audit.again("session_end");
        end.duration_ms = Some(started.elapsed().as_millis() as u64);
        end.bytes_to_upstream = Some(relayed.to_upstream.bytes);
        end.bytes_to_client = Some(relayed.to_client.bytes);
        end.reason = Some(relayed.end.audit_reason(tracked.as_deref()));
        tracing::info!(peer = %self.peer, transport = self.peer.transport().as_str(), end = relayed.end.label(), detail = relayed.end.detail(),
            upstream_close = closed.label(),
            bytes_to_upstream = relayed.to_upstream.bytes, bytes_to_client = relayed.to_client.bytes,
            duration_ms = started.elapsed().as_millis() as u64, "session ended");
        self.state.audit.record(end);
    }
}

/// The client's settings allowed upstream for this database, or the refusal (42501 naming
/// the parameter) before any limit or Vault call.
fn startup_settings(
    hello: &ClientHello,
    database: &Database,
) -> Result<Vec<(String, String)>, SessionError> {
    let extra = &database.config.allow_startup_parameters;
    upstream::params::check(&hello.params, extra).map_err(SessionError::StartupParameter)
}

/// What the session's watcher needs of its lease and database entry.
fn lifetime(
    lease: &Lease,
    remaining: Duration,
    database: &Database,
    role: &str,
    tracked: &Registered,
) -> Lifetime {
    Lifetime {
        lease_id: lease.id.clone(),
        ttl: lease.duration,
        remaining,
        renewable: lease.renewable,
        max_session: database.config.max_session_duration,
        warning: database.config.expiry_warning,
        role: role.to_owned(),
        tracked: Some(tracked.handle()),
    }
}

/// Connects and logs in upstream within the database's `connect_timeout`, sending the
/// client's checked `settings`.
async fn login_upstream(
    database: &Database,
    lease: &Lease,
    settings: &[(String, String)],
) -> Result<LoggedIn, SessionError> {
    let config = &database.config;
    let login = async {
        let stream = database.connect().await?;
        upstream::login(stream, config, &lease.username, &lease.password, settings).await
    };
    match tokio::time::timeout(config.connect_timeout, login).await {
        Ok(r) => r.map_err(SessionError::from),
        Err(_) => Err(UpstreamError::Timeout(config.name.clone()).into()),
    }
}

/// Forwards the upstream's own ErrorResponse and closes.
async fn forward_raw(stream: &mut ClientStream, raw: Option<&bytes::Bytes>) {
    let Some(raw) = raw else { return };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(raw).await?;
        stream.shutdown().await
    })
    .await;
}

/// Where a cancel for the upstream backend goes: its own key on its database entry.
fn cancel_target(database: &Arc<Database>, key: Option<(i32, i32)>) -> Option<CancelTarget> {
    key.map(|(pid, secret)| CancelTarget {
        database: database.clone(),
        pid,
        secret,
    })
}

/// Startup completion as the client sees it, then the relay, then the close of the upstream
/// connection (cancelling first when it is busy).
async fn relay_session(
    state: &AppState,
    hello: ClientHello,
    logged_in: LoggedIn,
    key: Option<(i32, i32)>,
    database: &Arc<Database>,
    life: Lifetime,
    stop: &CancellationToken,
) -> (Relayed, close::Closed) {
    let out = startup_reply(&hello, &logged_in, key);
    let upstream_key = cancel_target(database, logged_in.cancel_key);
    let tracked = life.tracked.clone();
    let status = logged_in.ready_status;
    let (mut to_upstream, mut to_client) = relay::directions(
        &state.metrics,
        logged_in.leftover,
        status,
        tracked.as_deref(),
    );
    // Only the two streams live on through the relay: every setup buffer is freed here, so an
    // idle session costs little more than its sockets, TLS state and relay buffers.
    let mut client = hello.stream;
    let upstream = logged_in.stream;
    drop((hello.params, hello.principal, logged_in.to_client));
    let write = async {
        client.write_all(&out).await?;
        client.flush().await
    };
    let written = write.await;
    drop(out);
    let (end, mut upstream) = match written {
        Err(e) => (RelayEnd::ClientGone(Some(e)), upstream),
        Ok(()) => {
            if let Some(t) = &tracked {
                t.relaying();
            }
            let (mut cr, mut cw) = split(client);
            let (mut ur, mut uw) = split(upstream);
            let (tx, mut control) = relay::control_channel();
            let end = tokio::select! {
                end = relay::relay(
                    &mut cr, &mut cw, &mut ur, &mut uw, &mut control, &mut to_upstream, &mut to_client,
                ) => end,
                // The watcher asked the relay to end the session and the relay could not (a
                // client that stopped reading): cut it.
                () = lifecycle::watch(&state.vault, &state.metrics, life, stop, tx) => {
                    RelayEnd::Ended { delivered: false }
                }
            };
            let mut client = cr.unsplit(cw);
            let _ = tokio::time::timeout(CLIENT_CLOSE_WAIT, client.shutdown()).await;
            (end, ur.unsplit(uw))
        }
    };
    if let (Some(t), Some(how)) = (&tracked, end.end_reason()) {
        t.ended(how);
    }
    let mut relayed = Relayed {
        end,
        to_upstream,
        to_client,
    };
    let (db, key, metrics) = (&database.config.name, upstream_key.as_ref(), &state.metrics);
    let closed = Box::pin(close::close(&mut upstream, &mut relayed, key, db, metrics)).await;
    (relayed, closed)
}
