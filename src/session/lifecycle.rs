//! A live session's clock: renews the lease ahead of expiry (at two thirds of the remaining
//! time, with jitter), and when the credential cannot live on (Vault's max_ttl reached,
//! renewals failing, `max_session_duration`, shutdown) warns the client and then ends the
//! session with FATAL 57P01 before the credential expires. Dropping the role does not end a
//! live backend, so this is what keeps a session from outliving its credential.

use std::time::Duration;

use bytes::BytesMut;
use rand::RngExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::relay::Control;
use crate::error::{SessionError, SessionNotice};
use crate::metrics::Metrics;
use crate::metrics::labels::LeaseResult;
use crate::vault::VaultClient;
use crate::vault::duration::later;

/// The lease and limits one session lives under.
pub struct Lifetime {
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
}

/// Why leasegate ends a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Credential,
    MaxSession,
}

/// How long before the credential's expiry the session is ended: a tenth of the TTL, between
/// one and five seconds.
fn end_margin(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// When to renew: two thirds of the remaining time, minus up to a tenth of it as jitter.
fn renew_time(now: Instant, expires: Instant) -> Instant {
    let remaining = expires.saturating_duration_since(now);
    let jitter_ms = rand::rng().random_range(0..=remaining.as_millis() as u64 / 10);
    let at = remaining / 3 * 2;
    later(now, at.saturating_sub(Duration::from_millis(jitter_ms)))
}

/// When the session ends (and why), and when to warn the client.
struct Plan {
    end_at: Instant,
    ending: Ending,
    warn_at: Option<Instant>,
}

/// The session's end as known now: the credential's end (`expires` minus a margin; `None`
/// for a credential that never expires) or `session_end`, whichever comes first. The warning
/// is due `expiry_warning` before an end that is final (`credential_final`: renewals will not
/// move it) and not yet `warned` about.
fn plan(
    life: &Lifetime,
    started: Instant,
    expires: Option<Instant>,
    session_end: Option<Instant>,
    credential_final: bool,
    warned: bool,
) -> Plan {
    let credential_end = expires.map(|e| e.checked_sub(end_margin(life.ttl)).unwrap_or(e));
    let (end_at, ending) = match (credential_end, session_end) {
        (Some(c), Some(s)) if s < c => (s, Ending::MaxSession),
        (Some(c), _) => (c, Ending::Credential),
        (None, Some(s)) => (s, Ending::MaxSession),
        (None, None) => (later(started, Duration::MAX), Ending::MaxSession),
    };
    // A renewable credential's end moves; warn about it only once renewals stopped working.
    let end_is_final = ending == Ending::MaxSession || credential_final;
    let warn_at = (!warned && end_is_final).then(|| {
        let lead = life.warning.min(end_at.saturating_duration_since(started));
        end_at.checked_sub(lead).unwrap_or(end_at)
    });
    Plan {
        end_at,
        ending,
        warn_at,
    }
}

/// The FATAL 57P01 that ends the session.
fn fatal(end: &SessionError) -> BytesMut {
    let mut buf = BytesMut::new();
    end.encode(&mut buf);
    buf
}

/// The WARNING that announces the end `left` from now.
fn notice(ending: Ending, life: &Lifetime, left: Duration) -> BytesMut {
    let notice = match ending {
        Ending::Credential => SessionNotice::CredentialEnding {
            role: life.role.clone(),
            left,
        },
        Ending::MaxSession => SessionNotice::MaxSessionEnding { left },
    };
    let mut buf = BytesMut::new();
    notice.encode(&mut buf);
    buf
}

/// Why leasegate ends the session, as the client is told.
fn ended(ending: Ending, life: &Lifetime) -> SessionError {
    match ending {
        Ending::Credential => SessionError::CredentialLifetime {
            role: life.role.clone(),
        },
        Ending::MaxSession => {
            SessionError::MaxSessionDuration(life.max_session.unwrap_or_default())
        }
    }
}

/// How the watcher's own work ended.
enum Watched {
    /// `End` was sent to the relay.
    EndSent,
    /// The relay is gone (the session ended by itself).
    RelayGone,
}

/// How long the relay has to deliver `End` before the session is cut regardless.
const FORCE_AFTER: Duration = Duration::from_secs(4);

/// Watches the session until it must end and sends `Control` messages to the relay. Run it in
/// a `select!` beside the relay: it completes only when the relay failed to end the session
/// within [`FORCE_AFTER`] of an `End` (the caller then cuts the connection).
pub async fn watch(
    vault: &VaultClient,
    metrics: &Metrics,
    life: Lifetime,
    stop: &CancellationToken,
    control: mpsc::Sender<Control>,
) {
    if let Watched::EndSent = watch_inner(vault, metrics, life, stop, &control).await {
        tokio::select! {
            _ = tokio::time::sleep(FORCE_AFTER) => return,
            _ = control.closed() => {}
        }
    }
    // The relay decides when the session ends.
    std::future::pending::<()>().await
}

async fn watch_inner(
    vault: &VaultClient,
    metrics: &Metrics,
    life: Lifetime,
    stop: &CancellationToken,
    control: &mpsc::Sender<Control>,
) -> Watched {
    let started = Instant::now();
    let session_end = life.max_session.map(|d| later(started, d));
    let expiring = !life.ttl.is_zero();
    let mut expires = later(started, life.remaining);
    let mut renewable = life.renewable && expiring;
    let mut renew_failing = false;
    let mut warned = false;
    let mut next_renew = renew_time(started, expires);
    loop {
        let Plan {
            end_at,
            ending,
            warn_at,
        } = plan(
            &life,
            started,
            expiring.then_some(expires),
            session_end,
            !renewable || renew_failing,
            warned,
        );
        let mut next = end_at;
        if renewable {
            next = next.min(next_renew);
        }
        if let Some(w) = warn_at {
            next = next.min(w);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.cancelled() => {
                let _ = control.send(Control::End(fatal(&SessionError::Shutdown))).await;
                return Watched::EndSent;
            }
            _ = control.closed() => return Watched::RelayGone,
        }
        let now = Instant::now();
        let due_to_end = now >= end_at;
        // The warning goes out when due, and at the latest right before the end (when the end
        // became known too late to give the full `expiry_warning`).
        if !warned && (warn_at.is_some_and(|w| now >= w) || due_to_end) {
            warned = true;
            let left = end_at.saturating_duration_since(now);
            let _ = control
                .send(Control::Notice(notice(ending, &life, left)))
                .await;
        }
        if due_to_end {
            let _ = control
                .send(Control::End(fatal(&ended(ending, &life))))
                .await;
            return Watched::EndSent;
        }
        if renewable && now >= next_renew {
            // Boxed: the HTTP future is large and only lives during the call, not the session.
            match Box::pin(vault.renew(&life.lease_id, life.ttl)).await {
                Ok(r) => {
                    metrics.lease_renewal(LeaseResult::Ok);
                    let now = Instant::now();
                    expires = later(now, r.duration);
                    renew_failing = false;
                    // Vault caps renewals at max_ttl: a shorter grant means this is the end.
                    // Vault rounds a capped TTL to whole seconds, possibly up: count a second
                    // less so the session still ends before the credential does.
                    if !r.renewable || r.duration < life.ttl {
                        expires = later(now, r.duration.saturating_sub(Duration::from_secs(1)));
                        renewable = false;
                        tracing::info!(lease_id = %life.lease_id, ttl = ?r.duration,
                            "lease reached its maximum lifetime");
                    }
                    next_renew = renew_time(now, expires);
                }
                Err(e) => {
                    metrics.lease_renewal(LeaseResult::Error);
                    renew_failing = true;
                    tracing::warn!(lease_id = %life.lease_id, error = %e, "lease renewal failed, will retry");
                    let remaining = expires.saturating_duration_since(Instant::now());
                    next_renew = Instant::now()
                        + (remaining / 4)
                            .clamp(Duration::from_millis(500), Duration::from_secs(10));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margins_and_renew_times() {
        assert_eq!(end_margin(Duration::from_secs(5)), Duration::from_secs(1));
        assert_eq!(end_margin(Duration::from_secs(20)), Duration::from_secs(2));
        assert_eq!(
            end_margin(Duration::from_secs(3600)),
            Duration::from_secs(5)
        );
        let now = Instant::now();
        for _ in 0..100 {
            let at = renew_time(now, now + Duration::from_secs(30));
            assert!(at >= now + Duration::from_secs(17), "{:?}", at - now);
            assert!(at <= now + Duration::from_secs(20), "{:?}", at - now);
        }
    }

    fn lifetime(ttl: Duration, remaining: Duration, max_session: Option<Duration>) -> Lifetime {
        Lifetime {
            lease_id: "database/creds/readonly/x".into(),
            ttl,
            remaining,
            renewable: true,
            max_session,
            warning: Duration::MAX,
            role: "readonly".into(),
        }
    }

    #[test]
    fn absurd_durations_do_not_panic() {
        let now = Instant::now();
        let huge = crate::vault::duration::from_vault_secs(u64::MAX);
        for (ttl, remaining, max_session) in [
            (huge, huge, Some(Duration::MAX)),
            (Duration::MAX, Duration::MAX, None),
            (Duration::from_secs(1), Duration::ZERO, Some(Duration::ZERO)),
        ] {
            let life = lifetime(ttl, remaining, max_session);
            let expires = later(now, life.remaining);
            let session_end = life.max_session.map(|d| later(now, d));
            assert!(renew_time(now, expires) >= now);
            for (final_end, warned) in [(false, false), (true, false), (true, true)] {
                let p = plan(&life, now, Some(expires), session_end, final_end, warned);
                assert!(p.warn_at.is_none_or(|w| w <= p.end_at));
                let p = plan(&life, now, None, session_end, final_end, warned);
                assert!(p.end_at >= now);
            }
        }
    }

    #[test]
    fn the_earlier_end_wins_and_the_warning_precedes_it() {
        let now = Instant::now();
        let mut life = lifetime(Duration::from_secs(60), Duration::from_secs(60), None);
        life.warning = Duration::from_secs(10);
        let expires = now + Duration::from_secs(60);
        let p = plan(&life, now, Some(expires), None, false, false);
        assert_eq!(p.ending, Ending::Credential);
        assert_eq!(p.end_at, expires - Duration::from_secs(5));
        assert!(p.warn_at.is_none(), "a renewable end is not final");
        let session_end = Some(now + Duration::from_secs(20));
        let p = plan(&life, now, Some(expires), session_end, false, false);
        assert_eq!(p.ending, Ending::MaxSession);
        assert_eq!(p.warn_at, Some(now + Duration::from_secs(10)));
    }
}
