//! One client session, end to end: handshake (`handshake`), policy, Vault credential, upstream
//! login, the client's view of startup, relay (`relay`), and the close that revokes the lease.

pub mod handshake;
pub mod lifecycle;
pub mod relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, split};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::cancel::{self, CancelTarget};
use crate::error::SessionError;
use crate::policy::Denial;
use crate::protocol::messages;
use crate::upstream::{self, LoggedIn, UpstreamError};
use handshake::{Accepted, ClientHello, ClientStream, quoted, report};
use lifecycle::Lifetime;
use relay::{Control, Relayed};

/// How long the close phase waits for the upstream to close its socket.
const UPSTREAM_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Serves one accepted TCP connection to its end, recording metrics and logs.
pub async fn run(state: Arc<AppState>, tcp: TcpStream, peer: SocketAddr, stop: CancellationToken) {
    let accepted = tokio::select! {
        r = tokio::time::timeout(state.login_timeout, handshake::accept(tcp, &state.tls)) => {
            r.unwrap_or(Err(SessionError::LoginTimeout))
        }
        _ = stop.cancelled() => Err(SessionError::Shutdown),
    };
    let result = match accepted {
        Ok(Accepted::Cancel(key)) => {
            if let Some(target) = state.cancels.lookup(&key) {
                cancel::forward(target).await;
            }
            return;
        }
        Ok(Accepted::Session(hello)) => serve(&state, *hello, peer, &stop).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => state.metrics.session_finished("ok"),
        Err(e) => {
            if let Some(reason) = e.auth_failure_reason() {
                state.metrics.auth_failure(reason);
                tracing::info!(%peer, reason, error = %e, "client refused");
            } else {
                tracing::warn!(%peer, error = %e, "session failed");
            }
            state.metrics.session_finished(e.outcome());
        }
    }
}

fn denial_message(hello: &ClientHello, denial: &Denial) -> String {
    let identity = quoted(&hello.principal.display_name());
    let (role, db) = (quoted(&hello.role), quoted(&hello.database));
    match denial {
        Denial::NoGrant => {
            format!("identity {identity} has no grant (asked for role {role} on database {db})")
        }
        Denial::DatabaseNotGranted => {
            format!("identity {identity} is not granted database {db} (asked for role {role})")
        }
        Denial::RoleNotGranted => {
            format!("identity {identity} is not granted role {role} on database {db}")
        }
    }
}

async fn serve(
    state: &Arc<AppState>,
    mut hello: ClientHello,
    peer: SocketAddr,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    let database = state.databases.get(&hello.database).cloned();
    let db_roles = database.as_ref().map(|d| d.config.roles.as_slice());
    let decision = state
        .policy
        .decide(&hello.principal, &hello.database, &hello.role, db_roles);
    let database = match (decision, database) {
        (Ok(()), Some(database)) => database,
        (decision, _) => {
            // The policy never allows a database that is not configured.
            let denial = decision.err().unwrap_or(Denial::DatabaseNotGranted);
            let message = denial_message(&hello, &denial);
            return fail(&mut hello.stream, SessionError::Denied { denial, message }).await;
        }
    };
    let identity = hello.principal.display_name();
    let creds = tokio::select! {
        r = state.vault.creds(&database.config.mount, &hello.role) => r,
        _ = stop.cancelled() => return fail(&mut hello.stream, SessionError::Shutdown).await,
    };
    let lease = match creds {
        Ok(lease) => lease,
        Err(source) => {
            let role = hello.role.clone();
            return fail(&mut hello.stream, SessionError::Vault { role, source }).await;
        }
    };
    let guard = state.revoker.guard(&lease);
    tracing::info!(%peer, identity = %identity, database = %hello.database, role = %hello.role,
        username = %lease.username, lease_id = %guard.id(), "credential issued");
    let login = async {
        let stream = upstream::connect(&database.config, database.tls.as_ref()).await?;
        upstream::login(
            stream,
            &database.config,
            &lease.username,
            &lease.password,
            &hello.params,
        )
        .await
    };
    let logged_in = tokio::select! {
        r = tokio::time::timeout(database.config.connect_timeout, login) => {
            r.unwrap_or_else(|_| Err(UpstreamError::Timeout(database.config.name.clone())))
        }
        _ = stop.cancelled() => return fail(&mut hello.stream, SessionError::Shutdown).await,
    };
    let life = Lifetime {
        lease_id: lease.id.clone(),
        ttl: lease.duration,
        renewable: lease.renewable,
        max_session: database.config.max_session_duration,
        warning: database.config.expiry_warning,
        role: hello.role.clone(),
    };
    drop(lease);
    let logged_in = match logged_in {
        Ok(l) => l,
        Err(e) => {
            if let Some(raw) = e.raw_error() {
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    hello.stream.write_all(raw).await?;
                    hello.stream.shutdown().await
                })
                .await;
                return Err(e.into());
            }
            return fail(&mut hello.stream, e.into()).await;
        }
    };
    let target = CancelTarget {
        database: database.clone(),
        pid: logged_in.cancel_key.map(|k| k.0).unwrap_or(0),
        secret: logged_in.cancel_key.map(|k| k.1).unwrap_or(0),
    };
    let registration = logged_in.cancel_key.map(|_| state.cancels.register(target));
    let started = Instant::now();
    state.metrics.sessions_active.inc();
    let key = registration.as_ref().map(|r| r.key);
    let outcome = relay_session(state, hello, logged_in, key, life, stop).await;
    state.metrics.sessions_active.dec();
    drop(registration);
    drop(guard); // the upstream is closed: revoke now
    match outcome {
        Ok(r) => {
            tracing::info!(%peer, identity = %identity, end = r.end.label(),
                bytes_to_upstream = r.to_upstream.bytes, bytes_to_client = r.to_client.bytes,
                duration_ms = started.elapsed().as_millis() as u64, "session ended");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

async fn fail(stream: &mut ClientStream, err: SessionError) -> Result<(), SessionError> {
    report(stream, &err).await;
    Err(err)
}

/// Startup completion as the client sees it, then the relay, then the close.
async fn relay_session(
    state: &AppState,
    mut hello: ClientHello,
    logged_in: LoggedIn,
    key: Option<(i32, i32)>,
    life: Lifetime,
    stop: &CancellationToken,
) -> Result<Relayed, SessionError> {
    let mut out = BytesMut::with_capacity(1024);
    negotiate_protocol(&mut out, &hello);
    messages::authentication_ok(&mut out);
    out.extend_from_slice(&logged_in.to_client);
    if let Some((pid, secret)) = key {
        messages::backend_key_data(&mut out, pid, secret);
    }
    messages::ready_for_query(&mut out, logged_in.ready_status);
    out.extend_from_slice(&logged_in.leftover);
    let mut upstream = logged_in.stream;
    let write = async {
        hello.stream.write_all(&out).await?;
        hello.stream.flush().await
    };
    if let Err(e) = write.await {
        close_upstream(&mut upstream, true).await;
        return Err(SessionError::Upstream(UpstreamError::Io(e)));
    }
    let (mut cr, mut cw) = split(hello.stream);
    let (mut ur, mut uw) = split(upstream);
    let (tx, mut control) = mpsc::channel::<Control>(4);
    let relayed = tokio::select! {
        r = relay::relay(&mut cr, &mut cw, &mut ur, &mut uw, &mut control) => r,
        never = lifecycle::watch(&state.vault, &state.metrics, life, stop, tx) => match never {},
    };
    let mut client = cr.unsplit(cw);
    let mut upstream = ur.unsplit(uw);
    let _ = tokio::time::timeout(Duration::from_secs(1), client.shutdown()).await;
    let can_terminate = relayed.to_upstream.framer.at_boundary() && !relayed.to_upstream.torn;
    close_upstream(&mut upstream, can_terminate).await;
    Ok(relayed)
}

/// NegotiateProtocolVersion when the client asked for a newer minor version or `_pq_.`
/// options: leasegate speaks 3.0 and no protocol extensions.
fn negotiate_protocol(out: &mut BytesMut, hello: &ClientHello) {
    let options: Vec<&String> = hello
        .params
        .keys()
        .filter(|k| k.starts_with("_pq_."))
        .collect();
    if hello.minor == 0 && options.is_empty() {
        return;
    }
    let len = 4 + 4 + 4 + options.iter().map(|o| o.len() + 1).sum::<usize>();
    out.put_u8(b'v');
    out.put_u32(len as u32);
    out.put_u32(0);
    out.put_u32(options.len() as u32);
    for o in options {
        out.put_slice(o.as_bytes());
        out.put_u8(0);
    }
}

/// Ends the upstream connection and waits (bounded) until the server has closed its side, so
/// the revocation's DROP ROLE never races a live backend.
async fn close_upstream(upstream: &mut upstream::UpstreamStream, send_terminate: bool) {
    let close = async {
        if send_terminate {
            let _ = upstream.write_all(b"X\0\0\0\x04").await;
        }
        let _ = upstream.shutdown().await;
        let mut sink = [0u8; 1024];
        while let Ok(n) = upstream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    if tokio::time::timeout(UPSTREAM_CLOSE_WAIT, close)
        .await
        .is_err()
    {
        tracing::warn!("upstream did not close its connection in time; revoking anyway");
    }
}
