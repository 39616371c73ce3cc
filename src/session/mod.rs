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
mod direction;
mod greeting;
pub(crate) mod handshake;
pub(crate) mod lifecycle;
pub(crate) mod relay;
mod relaying;
pub(crate) mod unix;
mod warm;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::audit::AuditEvent;
use crate::error::SessionError;
use crate::limits::slots::{Admission, Held};
use crate::metrics::labels::SetupPhase;
use crate::net::ClientAddr;
use crate::policy::Denial;
use crate::registry::{NewSession, Registered, Tracked};
use crate::state::{AppState, Live};
use crate::upstream::{self, Database, LoggedIn, UpstreamError};
use crate::vault::Lease;
use handshake::{Accepted, ClientHello, ClientStream, report};
use lifecycle::Lifetime;
use relaying::{CLIENT_CLOSE_WAIT, Ready, Relay, Scope};

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
    admission: Admission,
) {
    let live = state.live.load_full();
    let started = Instant::now();
    let mut peer = peer;
    let accepted = setup(&live, &stop, Box::pin(accept(tcp, &mut peer, &live))).await;
    let Some(_slot) = settle(admission, &accepted, &stop).await else {
        return;
    };
    let peer = ClientAddr::Tcp(peer);
    let ready = Box::pin(finish(&state, &live, accepted, peer, started, &stop)).await;
    if let Some(relay) = ready {
        relay.run().await;
    }
}

/// The connection's slot once its first packet is known: a session accepted on an overflow
/// slot waits here for a session permit, before any Vault call (see
/// [`crate::limits::slots`]). `None`: leasegate is stopping.
async fn settle(
    admission: Admission,
    accepted: &Result<Accepted, SessionError>,
    stop: &CancellationToken,
) -> Option<Held> {
    let Ok(Accepted::Session(hello)) = accepted else {
        return admission.settle(false, std::future::pending(), stop).await;
    };
    admission.settle(true, hello.stream.hung_up(), stop).await
}

/// The pre-authentication phase under `login_timeout`, given up at shutdown. Callers pass the
/// handshake boxed: it is the largest state of a session's setup, and inline it would size the
/// whole session task (an idle session would carry it to its end).
async fn setup(
    live: &Live,
    stop: &CancellationToken,
    handshake: impl Future<Output = Result<Accepted, SessionError>>,
) -> Result<Accepted, SessionError> {
    tokio::select! {
        r = tokio::time::timeout(live.login_timeout, handshake) => {
            r.unwrap_or(Err(SessionError::LoginTimeout))
        }
        _ = stop.cancelled() => Err(SessionError::Shutdown),
    }
}

/// A connection after its handshake (TLS or Unix socket): the cancel path, or the session's
/// setup; metrics, logs and audit lines of a refusal. A session ready to relay is handed back
/// (the caller runs [`Relay::run`] outside this future, so the session task does not keep the
/// setup's state).
async fn finish<'a>(
    state: &'a Arc<AppState>,
    live: &'a Live,
    accepted: Result<Accepted, SessionError>,
    peer: ClientAddr,
    started: Instant,
    stop: &'a CancellationToken,
) -> Option<Box<Relay<'a>>> {
    let e = match accepted {
        Ok(Accepted::Cancel(request)) => {
            cancel_request::handle(state, live, request, &peer).await;
            return None;
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
            match session.serve(*hello).await {
                Ok(ready) => return Some(Box::new(Relay::new(ready))),
                Err(e) => e,
            }
        }
        Err(e) => {
            if let Some(reason) = e.tls_failure_reason() {
                state.metrics.tls_failure(reason);
            }
            state
                .audit
                .record(AuditEvent::client("refused", &peer).error(&e));
            e
        }
    };
    if let Some(reason) = e.auth_failure_reason() {
        state.metrics.auth_failure(reason);
        tracing::info!(%peer, reason = reason.as_str(), error = %e, "client refused");
    } else {
        tracing::warn!(%peer, error = %e, "session failed");
    }
    state.metrics.session_finished(e.outcome());
    None
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

impl<'a> Session<'a> {
    /// Tells the client, writes the audit line (`refused` for the client's fault, `failed`
    /// otherwise), and returns the error.
    async fn fail<T>(
        &self,
        stream: &mut ClientStream,
        err: SessionError,
    ) -> Result<T, SessionError> {
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

    /// What the relay phase refers to; `warm`: the upstream session was logged in ahead.
    fn scope(&self, warm: bool) -> Scope<'a> {
        Scope {
            state: self.state,
            live: self.live,
            stop: self.stop,
            peer: self.peer,
            warm,
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

    /// Setup after the handshake: the grant, the limits, the credential and the upstream login
    /// (or a warm session); what the relay phase needs, or the refusal (told to the client).
    async fn serve(mut self, mut hello: ClientHello) -> Result<Ready<'a>, SessionError> {
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
            return Box::pin(self.serve_warm(hello, w, &database, permit, tracked)).await;
        }
        let vault_started = Instant::now();
        let credential = Box::pin(self.credential(&database, &hello.role, &tracked)).await;
        let issued = match credential {
            Ok(c) => c,
            Err(e) => return self.fail(&mut hello.stream, e).await,
        };
        let metrics = &self.state.metrics;
        metrics.setup_phase(SetupPhase::Vault, vault_started.elapsed().as_secs_f64());
        let login = self.log_in_with(issued, &hello, &database, &settings, &tracked);
        let (issued, logged_in) = match Box::pin(login).await {
            Ok(l) => l,
            Err(e) => return self.report_login(&mut hello.stream, e).await,
        };
        let life = lifetime(
            &issued.lease,
            issued.remaining,
            &database,
            &hello.role,
            &tracked,
        );
        let guard = issued.guard;
        drop((issued.lease, settings));
        Ok(Ready {
            scope: self.scope(false),
            hello,
            logged_in,
            database,
            life,
            guard,
            permit,
            tracked,
        })
    }

    /// Connects and logs in upstream, given up when the session is stopped; the failure is
    /// counted, not yet told to the client.
    async fn attempt_login(
        &self,
        database: &Database,
        lease: &Lease,
        settings: &[(String, String)],
        tracked: &Tracked,
    ) -> Result<LoggedIn, SessionError> {
        let login_started = Instant::now();
        let logged_in = tokio::select! {
            r = Box::pin(login_upstream(database, lease, settings)) => r,
            _ = self.stop.cancelled() => Err(tracked.stopped()),
        };
        let metrics = &self.state.metrics;
        match &logged_in {
            Ok(_) => {
                let login = login_started.elapsed().as_secs_f64();
                metrics.setup_phase(SetupPhase::UpstreamLogin, login);
                metrics.setup_phase(SetupPhase::Total, self.started.elapsed().as_secs_f64());
            }
            Err(SessionError::Upstream(e)) => {
                metrics.upstream_error(&database.config.name, e.kind())
            }
            Err(_) => {}
        }
        logged_in
    }

    /// Tells the client why the credential or the login failed (the upstream's own
    /// ErrorResponse when it sent one) and audits it.
    async fn report_login<T>(
        &self,
        stream: &mut ClientStream,
        err: SessionError,
    ) -> Result<T, SessionError> {
        match err {
            SessionError::Upstream(e) if e.raw_error().is_some() => {
                forward_raw(stream, e.raw_error()).await;
                let e = SessionError::Upstream(e);
                self.state
                    .audit
                    .record(self.audit.again("failed").error(&e));
                Err(e)
            }
            e => self.fail(stream, e).await,
        }
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

#[cfg(test)]
#[path = "size_tests.rs"]
mod size_tests;
