//! How many revocations may talk to Vault at once: issuance keeps priority. OpenBao's
//! database plugin runs creds (`CREATE ROLE`) and revocations (`DROP ROLE`) over the same few
//! connections, so a mass disconnect that sends dozens of revocations at once makes the next
//! session's creds call wait behind them. [`Pacing`] is an AIMD window over the Vault calls
//! of leases: creds calls in flight take their place in it first, revocations get what is
//! left, and at least one revocation may always run (none is starved, none is lost).
//! - It grows by one per revocation that finished while no creds call was slow: fast (one per
//!   revocation) when no credential was issued for [`QUIET`], carefully (one per window's
//!   worth of revocations) while sessions are being set up.
//! - It halves (to no less than [`MIN_WINDOW`]) when a creds call took longer than the slow
//!   mark, when one in flight has been waiting longer than that, or when a revocation failed;
//!   at most once per slow mark, so one burst of slow answers is one cut.
//! - The slow mark is twice the fastest creds call seen, and at least `vault.timeout / 20`.
//!
//! Pure decisions over instants passed in (no I/O, no clock), so the unit tests are exact;
//! [`Pacer`] wraps it for the revoker's tasks and the creds call.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The least number of revocations allowed in flight: the drain always progresses.
pub(crate) const MIN_WINDOW: usize = 1;
/// The window a fresh revoker starts with.
const START_WINDOW: usize = 2;
/// The most revocations in flight (the fixed limit before the window existed).
pub(crate) const MAX_WINDOW: usize = 32;
/// No creds call for this long: nobody is waiting for a credential, so the window may grow fast.
pub(crate) const QUIET: Duration = Duration::from_secs(10);

/// The window and what it is decided from.
#[derive(Debug)]
pub(crate) struct Pacing {
    /// Vault calls of leases allowed at once.
    window: usize,
    /// Revocations finished since the window last grew while sessions were being set up:
    /// the window grows by one once it has seen a windowful.
    acked: usize,
    /// Revocation calls in flight now.
    revoking: usize,
    /// Creds calls in flight, by ticket: when each started.
    issuing: BTreeMap<u64, Instant>,
    /// The next creds ticket.
    next_ticket: u64,
    /// The fastest creds call seen: what "fast" means on this Vault.
    fastest: Option<Duration>,
    /// `vault.timeout / 20`: the slow mark is never below it.
    slow_floor: Duration,
    /// When the window was last cut: cut at most once per slow mark.
    last_cut: Option<Instant>,
    /// When the last creds call started or finished.
    last_issue: Option<Instant>,
    /// How often the window was cut, for the metric.
    pub(crate) cuts: u64,
}

impl Pacing {
    /// A fresh window for a Vault answering within `vault_timeout`.
    pub(crate) fn new(vault_timeout: Duration) -> Pacing {
        Pacing {
            window: START_WINDOW,
            acked: 0,
            revoking: 0,
            issuing: BTreeMap::new(),
            next_ticket: 0,
            fastest: None,
            slow_floor: vault_timeout / 20,
            last_cut: None,
            last_issue: None,
            cuts: 0,
        }
    }

    /// Revocations allowed at once now (ignoring creds calls in flight).
    pub(crate) fn window(&self) -> usize {
        self.window.clamp(MIN_WINDOW, MAX_WINDOW)
    }

    /// Revocation calls in flight.
    pub(crate) fn revoking(&self) -> usize {
        self.revoking
    }

    /// A creds call taking longer than this is slow: issuance is suffering.
    pub(crate) fn slow_mark(&self) -> Duration {
        self.fastest
            .map_or(self.slow_floor, |f| (f * 2).max(self.slow_floor))
    }

    /// A creds call starts; its ticket for [`Pacing::issue_finished`].
    pub(crate) fn issue_started(&mut self, now: Instant) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.issuing.insert(ticket, now);
        self.last_issue = Some(now);
        ticket
    }

    /// A creds call ended (answered, failed or given up on).
    pub(crate) fn issue_finished(&mut self, ticket: u64, now: Instant) {
        let Some(started) = self.issuing.remove(&ticket) else {
            return;
        };
        self.last_issue = Some(now);
        let took = now.duration_since(started);
        let slow = took > self.slow_mark();
        self.fastest = Some(self.fastest.map_or(took, |f| f.min(took)));
        if slow {
            self.cut(now);
        }
    }

    /// No credential will be asked for any more (the drain at shutdown): the window grows
    /// fast from here.
    pub(crate) fn issuance_over(&mut self) {
        self.last_issue = None;
    }

    /// Whether a creds call in flight has been waiting past the slow mark.
    fn issuance_waiting(&self, now: Instant) -> bool {
        let mark = self.slow_mark();
        self.issuing
            .values()
            .any(|started| now.duration_since(*started) > mark)
    }

    /// Whether one more revocation may start now; if so it is counted as in flight until
    /// [`Pacing::revoke_finished`]. One may always start when none is in flight.
    pub(crate) fn try_start_revoke(&mut self, now: Instant) -> bool {
        let allowed = if self.issuance_waiting(now) {
            self.cut(now);
            self.revoking < MIN_WINDOW
        } else {
            self.revoking < MIN_WINDOW || self.revoking + self.issuing.len() < self.window()
        };
        self.revoking += usize::from(allowed);
        allowed
    }

    /// A revocation call ended, `ok` or not.
    pub(crate) fn revoke_finished(&mut self, ok: bool, now: Instant) {
        self.revoking = self.revoking.saturating_sub(1);
        if !ok {
            self.cut(now);
        } else if !self.issuance_waiting(now) {
            self.grow(now);
        }
    }

    fn grow(&mut self, now: Instant) {
        let quiet = self.issuing.is_empty()
            && self
                .last_issue
                .is_none_or(|at| now.duration_since(at) >= QUIET);
        if quiet {
            self.window += 1;
        } else {
            self.acked += 1;
            if self.acked >= self.window {
                self.window += 1;
                self.acked = 0;
            }
        }
        self.window = self.window.min(MAX_WINDOW);
    }

    fn cut(&mut self, now: Instant) {
        if let Some(at) = self.last_cut
            && now.duration_since(at) < self.slow_mark()
        {
            return;
        }
        self.last_cut = Some(now);
        self.window = (self.window / 2).max(MIN_WINDOW);
        self.acked = 0;
        self.cuts += 1;
    }
}

/// [`Pacing`] shared by the revoker's tasks and the creds call, with the wake-up of
/// revocations waiting for room and the gauges that show the window.
pub(crate) struct Pacer {
    /// The decisions.
    pacing: Mutex<Pacing>,
    /// Woken whenever room may have opened (a creds call or a revocation ended).
    changed: Notify,
    /// `leasegate_revocations_in_flight`, `leasegate_revocation_window`, the cuts counter.
    metrics: Arc<Metrics>,
}

impl Pacer {
    /// A pacer for a Vault answering within `vault_timeout`.
    pub(crate) fn new(vault_timeout: Duration, metrics: Arc<Metrics>) -> Pacer {
        let pacer = Pacer {
            pacing: Mutex::new(Pacing::new(vault_timeout)),
            changed: Notify::new(),
            metrics,
        };
        pacer.publish(&pacer.lock());
        pacer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pacing> {
        self.pacing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, p: &Pacing) {
        self.metrics.revocations_in_flight.set(p.revoking() as i64);
        self.metrics.revocation_window.set(p.window() as i64);
        let counted = self.metrics.revocation_window_cuts_total.get();
        if p.cuts > counted {
            self.metrics
                .revocation_window_cuts_total
                .inc_by(p.cuts - counted);
        }
    }

    /// Waits until a revocation may start (or `stop`: `None`); the slot ends it.
    pub(crate) async fn slot(self: &Arc<Self>, stop: &CancellationToken) -> Option<RevokeSlot> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut p = self.lock();
                if p.try_start_revoke(Instant::now()) {
                    self.publish(&p);
                    return Some(RevokeSlot {
                        pacer: self.clone(),
                        ok: false,
                    });
                }
                self.publish(&p);
            }
            tokio::select! {
                () = changed => {}
                // A creds call in flight may turn slow: look again then.
                () = tokio::time::sleep(self.lock().slow_mark()) => {}
                () = stop.cancelled() => return None,
            }
        }
    }

    /// Sessions no longer start (shutdown): revocations need not leave room for creds calls.
    pub(crate) fn issuance_over(&self) {
        self.lock().issuance_over();
        self.changed.notify_waiters();
    }

    /// A creds call starts: it counts in the window until the returned guard drops.
    pub(crate) fn issuing(self: &Arc<Self>) -> Issuing {
        let ticket = self.lock().issue_started(Instant::now());
        Issuing {
            pacer: self.clone(),
            ticket,
        }
    }
}

/// One revocation call in flight; dropping it frees its place.
pub(crate) struct RevokeSlot {
    pacer: Arc<Pacer>,
    /// Whether the call succeeded (set by [`RevokeSlot::succeeded`]).
    ok: bool,
}

impl RevokeSlot {
    /// The call succeeded (a slot dropped without this counts as failed).
    pub(crate) fn succeeded(mut self) {
        self.ok = true;
    }
}

impl Drop for RevokeSlot {
    fn drop(&mut self) {
        let mut p = self.pacer.lock();
        p.revoke_finished(self.ok, Instant::now());
        self.pacer.publish(&p);
        drop(p);
        self.pacer.changed.notify_waiters();
    }
}

/// A creds call in flight; dropping it records how long it took.
pub(crate) struct Issuing {
    pacer: Arc<Pacer>,
    ticket: u64,
}

impl Drop for Issuing {
    fn drop(&mut self) {
        let mut p = self.pacer.lock();
        p.issue_finished(self.ticket, Instant::now());
        self.pacer.publish(&p);
        drop(p);
        self.pacer.changed.notify_waiters();
    }
}

#[cfg(test)]
#[path = "pacing_tests.rs"]
mod tests;
