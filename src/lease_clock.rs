//! The lease clock: every timing decision about something Vault grants for a while (a
//! session's lease, a prefetched lease, leasegate's own token), in one place and without I/O.
//! The callers (the session watcher in `session::lifecycle`, `prefetch`, the token upkeep in
//! `vault::auth` and the revoker in `vault::lease`) sleep and call Vault; this module only
//! says when.
//!
//! - **Durations from Vault** are clamped ([`from_vault_secs`]) and every deadline is computed
//!   with [`later`], which saturates: a `lease_duration` of `u64::MAX` must not panic.
//! - **When to renew**: at two thirds of the time left, minus up to a tenth of it as jitter
//!   ([`renew_at`]), so leases issued together do not all renew together.
//! - **When a grant is final**: Vault caps a renewal at the lease's (or token's) max_ttl and
//!   then grants less than the increment asked for; an uncapped renewal grants exactly the
//!   whole seconds asked for. So *any grant shorter than asked for is final* (as is one Vault
//!   calls not renewable): renewing again cannot move the end ([`grant_is_final`]). No slack
//!   is allowed: OpenBao reports a capped TTL rounded to whole seconds, sometimes *up*, so a
//!   cap can read one second short of the increment (5 s of the 6 s asked for); with a second
//!   of slack that cap passes for an ordinary grant, the end is only learnt one renewal later,
//!   and a session gets less than its `expiry_warning`. Because of the same rounding, the
//!   expiry of a final grant is counted one second short ([`ROUNDING`]). (A cap that rounds to
//!   the full increment cannot be told apart; the next renewal then reveals it.)
//! - **Retries**: exponential [`Backoff`] with jitter, capped; a failed renewal is retried
//!   after the backoff but never later than a quarter of the time left ([`Term::failed`]).
//! - **A session's end** ([`SessionClock`]): the credential's expiry minus a margin
//!   ([`end_margin`]) or `max_session_duration`, whichever comes first; the warning is due
//!   `expiry_warning` before an end that is final (renewals cannot move it, or keep failing),
//!   and at the latest right before the end.
//!
//! Jitter is a value passed in ([`Jitter`]), drawn by the caller, so every decision here is a
//! pure function of its inputs and the tests can fix it.

use std::time::Duration;

use rand::RngExt;
use tokio::time::Instant;

/// The longest duration leasegate takes from Vault: ten years. Anything longer is treated
/// as this (no credential or token lives that long in practice).
pub(crate) const MAX_VAULT_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// A duration Vault gave in seconds, clamped to [`MAX_VAULT_DURATION`].
pub(crate) fn from_vault_secs(secs: u64) -> Duration {
    Duration::from_secs(secs).min(MAX_VAULT_DURATION)
}

/// How far "never" is for deadlines that overflow: a hundred years.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `at + d`, or a far-future instant when that does not fit (never panics).
pub(crate) fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(FAR_FUTURE))
        .unwrap_or(at)
}

/// How much of the largest jitter to apply: a fraction between 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Jitter(f64);

impl Jitter {
    /// No jitter: renew at exactly two thirds, wait exactly the backoff step.
    #[cfg(test)]
    pub(crate) const NONE: Jitter = Jitter(0.0);
    /// The full jitter.
    #[cfg(test)]
    pub(crate) const FULL: Jitter = Jitter(1.0);

    /// A fraction (clamped to 0..=1; NaN is 0).
    #[cfg(test)]
    pub(crate) fn new(fraction: f64) -> Jitter {
        Jitter(if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        })
    }

    /// Drawn from the thread's random generator.
    pub(crate) fn random() -> Jitter {
        Jitter(rand::rng().random_range(0.0..=1.0))
    }

    /// This fraction of `d` (at most `d`, never panics).
    fn of(self, d: Duration) -> Duration {
        Duration::try_from_secs_f64(d.as_secs_f64() * self.0)
            .unwrap_or(d)
            .min(d)
    }
}

/// When to renew something that expires at `expires`: at two thirds of the time left,
/// minus up to a tenth of it (`jitter`).
pub(crate) fn renew_at(now: Instant, expires: Instant, jitter: Jitter) -> Instant {
    let left = expires.saturating_duration_since(now);
    later(now, (left / 3 * 2).saturating_sub(jitter.of(left / 10)))
}

/// How much a final grant's expiry is counted short: Vault rounds a capped TTL to whole
/// seconds, possibly up.
pub(crate) const ROUNDING: Duration = Duration::from_secs(1);

/// Whether a renewal that asked for `asked` and got `granted` (and Vault's `renewable`) is
/// the last: see the module doc for why there is no slack.
pub(crate) fn grant_is_final(asked: Duration, granted: Duration, renewable: bool) -> bool {
    !renewable || granted < asked
}

/// Exponential backoff with jitter: each wait is the current step plus up to half of it,
/// never more than the cap; the step doubles after every wait, up to the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    /// The first step, and the step after a [`Backoff::reset`].
    first: Duration,
    /// No wait is longer.
    max: Duration,
    /// The step the next wait is based on.
    step: Duration,
}

impl Backoff {
    /// Steps from `first`, doubling, capped at `max`.
    pub(crate) const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            step: first,
        }
    }

    /// The wait before the next attempt; advances the step.
    pub(crate) fn next_wait(&mut self, jitter: Jitter) -> Duration {
        let wait = self
            .step
            .saturating_add(jitter.of(self.step / 2))
            .min(self.max);
        self.step = self.step.saturating_mul(2).min(self.max);
        wait
    }

    /// Back to the first step (after a success).
    pub(crate) fn reset(&mut self) {
        self.step = self.first;
    }
}

/// Retries of a failed renewal: from half a second, doubling, at most ten seconds apart (and
/// never later than a quarter of the time left).
const RENEW_RETRY: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));

/// One lease's or token's lifetime as last granted, and when to renew it next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Term {
    /// When it expires; `None` for something granted without TTL (it never expires).
    pub(crate) expires: Option<Instant>,
    /// When to renew next; `None` when no renewal can move the expiry (not renewable, never
    /// expiring, or the last grant was final).
    pub(crate) next_renew: Option<Instant>,
    /// The last renewal failed (cleared by the next grant): the expiry may be the end.
    pub(crate) failing: bool,
    /// Spacing of the retries while renewals fail.
    retry: Backoff,
}

impl Term {
    /// Granted at `now` until `expires` (`None`: never expires, so never renewed).
    pub(crate) fn new(
        now: Instant,
        expires: Option<Instant>,
        renewable: bool,
        jitter: Jitter,
    ) -> Term {
        Term {
            expires,
            next_renew: expires
                .filter(|_| renewable)
                .map(|e| renew_at(now, e, jitter)),
            failing: false,
            retry: RENEW_RETRY,
        }
    }

    /// Granted `ttl` at `now` (a TTL of zero never expires).
    pub(crate) fn issued(now: Instant, ttl: Duration, renewable: bool, jitter: Jitter) -> Term {
        let expires = (!ttl.is_zero()).then(|| later(now, ttl));
        Term::new(now, expires, renewable, jitter)
    }

    /// Time left at `now` (`None`: never expires).
    pub(crate) fn left(&self, now: Instant) -> Option<Duration> {
        self.expires.map(|e| e.saturating_duration_since(now))
    }

    /// Whether a renewal is due at `now`.
    pub(crate) fn renew_due(&self, now: Instant) -> bool {
        self.next_renew.is_some_and(|at| at <= now)
    }

    /// Whether renewals may still move the expiry.
    pub(crate) fn renewable(&self) -> bool {
        self.next_renew.is_some()
    }

    /// Whether the expiry is the end as far as is known now: no renewal will move it, or
    /// renewals are failing.
    pub(crate) fn end_is_final(&self) -> bool {
        !self.renewable() || self.failing
    }

    /// Whether less than a third of `ttl` is left: time to replace what cannot be renewed.
    pub(crate) fn running_out(&self, now: Instant, ttl: Duration) -> bool {
        self.left(now).is_some_and(|left| left < ttl / 3)
    }

    /// Records a renewal at `now` that asked for `asked` and was granted `granted`; returns
    /// whether the grant was final.
    pub(crate) fn granted(
        &mut self,
        now: Instant,
        asked: Duration,
        granted: Duration,
        renewable: bool,
        jitter: Jitter,
    ) -> bool {
        let last = grant_is_final(asked, granted, renewable);
        let good_for = if last {
            granted.saturating_sub(ROUNDING)
        } else {
            granted
        };
        *self = Term::new(now, Some(later(now, good_for)), !last, jitter);
        last
    }

    /// Records a failed renewal at `now`: the next attempt after the backoff, but never
    /// later than a quarter of the time left (and never sooner than the backoff's first step).
    pub(crate) fn failed(&mut self, now: Instant, jitter: Jitter) {
        self.failing = true;
        let mut wait = self.retry.next_wait(jitter);
        if let Some(left) = self.left(now) {
            wait = wait.min((left / 4).max(RENEW_RETRY.first));
        }
        self.next_renew = Some(later(now, wait));
    }
}

/// How long before the credential's expiry a session is ended: a tenth of the TTL, between
/// one and five seconds.
pub(crate) fn end_margin(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// Why leasegate ends a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The credential cannot be extended (max_ttl reached, renewals failing).
    Credential,
    /// `max_session_duration` is reached.
    MaxSession,
}

/// What a session's watcher must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// Warn the client: the session ends (for `ending`) in `left`.
    Warn {
        /// Why it ends.
        ending: Ending,
        /// Time left until the end.
        left: Duration,
    },
    /// End the session now.
    End(Ending),
    /// Renew the lease (then report [`SessionClock::renewed`] or
    /// [`SessionClock::renew_failed`]).
    Renew,
}

/// What a session's lease and limits are when the session gets its credential.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionTerms {
    /// TTL Vault granted at issue (zero: never expires), also the increment asked for on
    /// every renewal.
    pub(crate) ttl: Duration,
    /// Time left on the credential (less than `ttl` for a prefetched one).
    pub(crate) remaining: Duration,
    /// Whether Vault allows renewing it.
    pub(crate) renewable: bool,
    /// `max_session_duration`.
    pub(crate) max_session: Option<Duration>,
    /// `expiry_warning`.
    pub(crate) warning: Duration,
}

/// When the session ends (and why), and when to warn.
struct Plan {
    end_at: Instant,
    ending: Ending,
    warn_at: Option<Instant>,
}

/// One session's clock: what is due when, given what Vault granted so far.
pub(crate) struct SessionClock {
    /// The increment asked for on renewal, also the base of the end margin.
    ttl: Duration,
    /// How long before a final end the client is warned.
    warning: Duration,
    /// When the session got its credential: bounds the warning's lead.
    started: Instant,
    /// `max_session_duration` from `started`.
    session_end: Option<Instant>,
    /// The credential's lifetime.
    term: Term,
    /// The warning went out (it goes out once).
    warned: bool,
    /// Where renewal jitter comes from (fixed in tests).
    jitter: fn() -> Jitter,
}

impl SessionClock {
    /// Whether the last renewal failed: an end due now is the failures', not Vault's cap.
    pub(crate) fn renewals_failing(&self) -> bool {
        self.term.failing
    }

    /// The clock of a session that got its credential at `now`.
    pub(crate) fn new(now: Instant, terms: SessionTerms, jitter: fn() -> Jitter) -> SessionClock {
        let expires = (!terms.ttl.is_zero()).then(|| later(now, terms.remaining));
        SessionClock {
            ttl: terms.ttl,
            warning: terms.warning,
            started: now,
            session_end: terms.max_session.map(|d| later(now, d)),
            term: Term::new(now, expires, terms.renewable, jitter()),
            warned: false,
            jitter,
        }
    }

    /// The increment to ask for when renewing.
    pub(crate) fn increment(&self) -> Duration {
        self.ttl
    }

    /// The session's end as known now: the credential's end (its expiry minus
    /// [`end_margin`]) or `max_session_duration`, whichever comes first; the warning is due
    /// `expiry_warning` before an end that is final and not yet warned about.
    fn plan(&self) -> Plan {
        let margin = end_margin(self.ttl);
        let credential_end = self
            .term
            .expires
            .map(|e| e.checked_sub(margin).unwrap_or(e));
        let (end_at, ending) = match (credential_end, self.session_end) {
            (Some(c), Some(s)) if s < c => (s, Ending::MaxSession),
            (Some(c), _) => (c, Ending::Credential),
            (None, Some(s)) => (s, Ending::MaxSession),
            (None, None) => (later(self.started, Duration::MAX), Ending::MaxSession),
        };
        // A renewable credential's end moves; warn about it only once renewals stopped.
        let end_is_final = ending == Ending::MaxSession || self.term.end_is_final();
        let warn_at = (!self.warned && end_is_final).then(|| {
            let lead = self
                .warning
                .min(end_at.saturating_duration_since(self.started));
            end_at.checked_sub(lead).unwrap_or(end_at)
        });
        Plan {
            end_at,
            ending,
            warn_at,
        }
    }

    /// When something is due next.
    pub(crate) fn next_wake(&self) -> Instant {
        let plan = self.plan();
        [self.term.next_renew, plan.warn_at]
            .into_iter()
            .flatten()
            .fold(plan.end_at, Instant::min)
    }

    /// What is due at `now`, most urgent first: the warning (when due, and at the latest
    /// right before the end), the end, a renewal. Call again until `None`.
    pub(crate) fn poll(&mut self, now: Instant) -> Option<Due> {
        let plan = self.plan();
        let due_to_end = now >= plan.end_at;
        if !self.warned && (plan.warn_at.is_some_and(|w| now >= w) || due_to_end) {
            self.warned = true;
            let left = plan.end_at.saturating_duration_since(now);
            return Some(Due::Warn {
                ending: plan.ending,
                left,
            });
        }
        if due_to_end {
            return Some(Due::End(plan.ending));
        }
        self.term.renew_due(now).then_some(Due::Renew)
    }

    /// Records a renewal answered at `now`; returns whether the grant was final.
    pub(crate) fn renewed(&mut self, now: Instant, granted: Duration, renewable: bool) -> bool {
        let jitter = (self.jitter)();
        self.term.granted(now, self.ttl, granted, renewable, jitter)
    }

    /// Records a failed renewal at `now` (retried with backoff).
    pub(crate) fn renew_failed(&mut self, now: Instant) {
        let jitter = (self.jitter)();
        self.term.failed(now, jitter);
    }
}

#[cfg(test)]
#[path = "lease_clock_tests.rs"]
mod tests;
