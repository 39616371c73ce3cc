//! A live session's clock: renews the lease ahead of expiry (at two thirds of the remaining
//! time, with jitter), and when the credential cannot live on (Vault's max_ttl reached,
//! renewals failing, `max_session_duration`, shutdown) warns the client and then ends the
//! session with FATAL 57P01 before the credential expires. Dropping the role does not end a
//! live backend, so this is what keeps a session from outliving its credential. What is due
//! when is decided by [`SessionClock`]; this module renews and sends.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::relay::{Control, ControlSender};
use crate::error::{EndReason, SessionError, SessionNotice};
use crate::lease_clock::{Due, Ending, Jitter, SessionClock, SessionTerms};
use crate::metrics::Metrics;
use crate::metrics::labels::LeaseResult;
use crate::registry::Tracked;
use crate::vault::VaultClient;
use crate::vault::lease::LeaseApi;

/// The lease and limits one session lives under.
pub(crate) struct Lifetime {
    /// Vault lease id.
    pub lease_id: String,
    /// TTL Vault granted at issue, also the increment asked for on renewal.
    pub ttl: Duration,
    /// Time left on the credential when the session got it (less than `ttl` for a
    /// prefetched credential).
    pub remaining: Duration,
    /// Whether Vault allows renewing.
    pub renewable: bool,
    /// `max_session_duration` of the database entry.
    pub max_session: Option<Duration>,
    /// `expiry_warning` of the database entry.
    pub warning: Duration,
    /// The role, for messages.
    pub role: String,
    /// The session's registry entry: its stop reason, and the renewals `sessions list` shows.
    pub tracked: Option<Arc<Tracked>>,
}

impl Lifetime {
    fn terms(&self) -> SessionTerms {
        SessionTerms {
            ttl: self.ttl,
            remaining: self.remaining,
            renewable: self.renewable,
            max_session: self.max_session,
            warning: self.warning,
        }
    }

    /// The WARNING that announces the end `left` from now.
    fn warning(&self, ending: Ending, left: Duration) -> SessionNotice {
        match ending {
            Ending::Credential => SessionNotice::CredentialEnding {
                role: self.role.clone(),
                left,
            },
            Ending::MaxSession => SessionNotice::MaxSessionEnding { left },
        }
    }

    /// What the client is told when the session's stop token was cancelled: the reason that
    /// came with it (an operator's end, a reload), else shutdown.
    fn stopped(&self) -> SessionError {
        self.tracked
            .as_ref()
            .map_or(SessionError::Shutdown, |t| t.stopped())
    }

    /// Why leasegate ends the session, as the client is told (FATAL 57P01); `failing`: the
    /// credential ends because its renewals failed, not at Vault's cap.
    fn ended(&self, ending: Ending, failing: bool) -> SessionError {
        if let Some(t) = &self.tracked {
            t.ending(EndReason::MaxLifetime);
        }
        match ending {
            Ending::Credential if failing => SessionError::CredentialUnrenewed {
                role: self.role.clone(),
            },
            Ending::Credential => SessionError::CredentialLifetime {
                role: self.role.clone(),
            },
            Ending::MaxSession => {
                SessionError::MaxSessionDuration(self.max_session.unwrap_or_default())
            }
        }
    }
}

/// The FATAL 57P01 that ends the session.
fn fatal(end: &SessionError) -> BytesMut {
    let mut buf = BytesMut::new();
    end.encode(&mut buf);
    buf
}

/// The WARNING's bytes.
fn notice(notice: &SessionNotice) -> BytesMut {
    let mut buf = BytesMut::new();
    notice.encode(&mut buf);
    buf
}

/// How the watcher's own work ended.
enum Watched {
    /// `End` was sent to the relay.
    EndSent,
    /// The relay is gone (the session ended by itself).
    RelayGone,
}

/// How long the relay has to deliver `End` before the session is cut regardless.
pub(crate) const FORCE_AFTER: Duration = Duration::from_secs(4);

/// Watches the session until it must end and sends `Control` messages to the relay. Run it in
/// a `select!` beside the relay: it completes only when the relay failed to end the session
/// within [`FORCE_AFTER`] of an `End` (the caller then cuts the connection).
pub(crate) async fn watch(
    vault: &VaultClient,
    metrics: &Metrics,
    life: &Lifetime,
    stop: &CancellationToken,
    control: ControlSender,
) {
    watch_with(vault, metrics, life, stop, control, Jitter::random).await;
}

/// [`watch`] with the lease calls and the jitter given (scripted in the tests).
async fn watch_with(
    vault: &dyn LeaseApi,
    metrics: &Metrics,
    life: &Lifetime,
    stop: &CancellationToken,
    control: ControlSender,
    jitter: fn() -> Jitter,
) {
    let mut clock = SessionClock::new(Instant::now(), life.terms(), jitter);
    let watched = watch_inner(vault, metrics, life, &mut clock, stop, &control).await;
    if let Watched::EndSent = watched {
        tokio::select! {
            _ = tokio::time::sleep(FORCE_AFTER) => return,
            _ = control.closed() => {}
        }
    }
    // The relay decides when the session ends.
    std::future::pending::<()>().await
}

/// Does what the clock says is due, then sleeps until the next thing is, until the session
/// must end (or the relay is gone).
async fn watch_inner(
    vault: &dyn LeaseApi,
    metrics: &Metrics,
    life: &Lifetime,
    clock: &mut SessionClock,
    stop: &CancellationToken,
    control: &ControlSender,
) -> Watched {
    loop {
        while let Some(due) = clock.poll(Instant::now()) {
            match due {
                Due::Warn { ending, left } => {
                    let warning = life.warning(ending, left);
                    let _ = control.send(Control::Notice(notice(&warning))).await;
                }
                Due::End(ending) => {
                    let end = life.ended(ending, clock.renewals_failing());
                    let _ = control.send(Control::End(fatal(&end))).await;
                    return Watched::EndSent;
                }
                // Boxed: the renewal's Vault call is the largest state of the watcher, and
                // only exists while it runs (an idle session keeps the watcher small).
                Due::Renew => Box::pin(renew(vault, metrics, life, clock)).await,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(clock.next_wake()) => {}
            _ = stop.cancelled() => {
                let _ = control.send(Control::End(fatal(&life.stopped()))).await;
                return Watched::EndSent;
            }
            _ = control.closed() => return Watched::RelayGone,
        }
    }
}

/// One renewal, its result told to the clock.
async fn renew(vault: &dyn LeaseApi, metrics: &Metrics, life: &Lifetime, clock: &mut SessionClock) {
    // Boxed by `LeaseApi`: the HTTP future is large and only lives during the call.
    match vault.renew(&life.lease_id, clock.increment()).await {
        Ok(r) => {
            metrics.lease_renewal(LeaseResult::Ok);
            if let Some(t) = &life.tracked {
                t.renewed(r.duration);
            }
            if clock.renewed(Instant::now(), r.duration, r.renewable) {
                tracing::info!(lease_id = %life.lease_id, ttl = ?r.duration,
                    "lease reached its maximum lifetime");
            }
        }
        Err(e) => {
            metrics.lease_renewal(LeaseResult::Error);
            tracing::warn!(lease_id = %life.lease_id, error = %e, "lease renewal failed, will retry");
            clock.renew_failed(Instant::now());
        }
    }
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
