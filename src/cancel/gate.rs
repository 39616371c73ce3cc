//! Admission of cancel requests. A CancelRequest needs no certificate, yet handling one costs an
//! upstream connection (known key) or one mutual-TLS connection per peer (unknown key, with
//! `[cluster]`), so every request passes, in this order, a per-source-address rate limit, a
//! global rate limit and a cap on cancels in flight. Over any of them the request is dropped
//! unanswered, as PostgreSQL drops cancels it cannot act on.
//!
//! The per-address limit comes first, so one noisy address spends its own budget only, never
//! the global one. Cancels a verified peer forwarded skip both rate limits (the peer applied
//! its own to the client that sent them) but still take a slot.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::CancelLimits;
use crate::metrics::labels::CancelResult;

/// Why a cancel request was dropped before any work; the label of
/// `leasegate_cancel_requests_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `cancels_per_second_per_address` or `cancels_per_second`.
    RateLimited,
    /// `max_concurrent_cancels` cancels are in flight.
    OverCapacity,
}

impl Refusal {
    /// Metric label.
    pub(crate) fn label(self) -> CancelResult {
        match self {
            Refusal::RateLimited => CancelResult::RateLimited,
            Refusal::OverCapacity => CancelResult::OverCapacity,
        }
    }
}

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Keyed<C> =
    RateLimiter<IpAddr, DashMapStateStore<IpAddr>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Addresses tracked before idle ones are swept from the per-address limiter.
const SWEEP_ABOVE: usize = 10_000;
/// At most one sweep this often.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Rate limits and the in-flight cap for cancel requests (shared, not reloaded).
pub(crate) struct CancelGate<C: Clock = DefaultClock> {
    /// `cancels_per_second_per_address`, keyed by source address (IPv6 by /64).
    per_address: Keyed<C>,
    /// `cancels_per_second`, over every source.
    global: Direct<C>,
    /// `max_concurrent_cancels` slots; a request holds one while it is being forwarded.
    slots: Arc<Semaphore>,
    /// When idle addresses were last swept, so that a flood from many addresses cannot grow
    /// the per-address map without bound nor make every request pay for a sweep.
    swept: Mutex<Instant>,
}

fn quota(per_second: u32) -> Quota {
    Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
}

impl CancelGate {
    /// A gate for the `[limits]` cancel settings.
    pub(crate) fn new(limits: &CancelLimits) -> CancelGate {
        CancelGate::with_clock(limits, DefaultClock::default())
    }
}

impl<C: Clock + Clone> CancelGate<C> {
    /// A gate on `clock` (tests use a fake one).
    pub(crate) fn with_clock(limits: &CancelLimits, clock: C) -> CancelGate<C> {
        CancelGate {
            per_address: RateLimiter::dashmap_with_clock(
                quota(limits.cancels_per_second_per_address),
                clock.clone(),
            ),
            global: RateLimiter::direct_with_clock(quota(limits.cancels_per_second), clock),
            slots: Arc::new(Semaphore::new(limits.max_concurrent_cancels.max(1) as usize)),
            swept: Mutex::new(Instant::now()),
        }
    }

    /// Lets a cancel from `source` in (the permit is its slot until dropped), or says why
    /// not. `rate_limited` is false only for cancels a verified peer forwarded.
    pub(crate) fn admit(
        &self,
        source: IpAddr,
        rate_limited: bool,
    ) -> Result<OwnedSemaphorePermit, Refusal> {
        if rate_limited {
            self.sweep();
            self.per_address
                .check_key(&address_key(source))
                .map_err(|_| Refusal::RateLimited)?;
            self.global.check().map_err(|_| Refusal::RateLimited)?;
        }
        self.slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::OverCapacity)
    }

    fn sweep(&self) {
        if self.per_address.len() <= SWEEP_ABOVE {
            return;
        }
        let Ok(mut swept) = self.swept.try_lock() else {
            return;
        };
        if swept.elapsed() >= SWEEP_EVERY {
            self.per_address.retain_recent();
            self.per_address.shrink_to_fit();
            *swept = Instant::now();
        }
    }
}

/// The rate-limit key of a source address: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by its
/// /64 network, the block one host usually holds.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn gate(
        global: u32,
        per_address: u32,
        slots: u32,
    ) -> (CancelGate<FakeRelativeClock>, FakeRelativeClock) {
        let limits = CancelLimits {
            cancels_per_second: global,
            cancels_per_second_per_address: per_address,
            max_concurrent_cancels: slots,
        };
        let clock = FakeRelativeClock::default();
        (CancelGate::with_clock(&limits, clock.clone()), clock)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn one_address_is_limited_and_spends_only_its_own_budget() {
        let (gate, clock) = gate(5, 2, 100);
        let noisy = ip("192.0.2.1");
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(gate.admit(noisy, true).expect("within the address's rate"));
        }
        for _ in 0..50 {
            assert_eq!(gate.admit(noisy, true).err(), Some(Refusal::RateLimited));
        }
        // The 50 refused requests took nothing from the global budget: 3 of 5 are left.
        for n in 0..3 {
            let other = ip(&format!("198.51.100.{n}"));
            held.push(gate.admit(other, true).expect("global budget left"));
        }
        assert_eq!(
            gate.admit(ip("203.0.113.9"), true).err(),
            Some(Refusal::RateLimited),
            "global limit reached"
        );
        clock.advance(Duration::from_secs(1));
        assert!(gate.admit(noisy, true).is_ok(), "refilled after a second");
    }

    #[test]
    fn ipv6_addresses_share_their_slash_64() {
        let (gate, _) = gate(100, 1, 100);
        let _a = gate.admit(ip("2001:db8:1:2::1"), true).expect("first");
        assert_eq!(
            gate.admit(ip("2001:db8:1:2:ffff::9"), true).err(),
            Some(Refusal::RateLimited),
            "same /64"
        );
        assert!(gate.admit(ip("2001:db8:1:3::1"), true).is_ok(), "other /64");
        assert_eq!(address_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn in_flight_cap_holds_and_frees_slots_on_drop() {
        let (gate, _) = gate(100, 100, 2);
        let a = gate.admit(ip("192.0.2.1"), true).expect("slot 1");
        let _b = gate.admit(ip("192.0.2.2"), false).expect("slot 2");
        assert_eq!(
            gate.admit(ip("192.0.2.3"), true).err(),
            Some(Refusal::OverCapacity)
        );
        assert_eq!(
            gate.admit(ip("192.0.2.3"), false).err(),
            Some(Refusal::OverCapacity),
            "peer-forwarded cancels take slots too"
        );
        drop(a);
        assert!(gate.admit(ip("192.0.2.3"), true).is_ok());
    }

    #[test]
    fn peer_forwarded_cancels_skip_the_rate_limits() {
        let (gate, _) = gate(1, 1, 100);
        let peer = ip("192.0.2.50");
        let _first = gate.admit(peer, true).expect("first");
        assert_eq!(gate.admit(peer, true).err(), Some(Refusal::RateLimited));
        for _ in 0..10 {
            assert!(gate.admit(peer, false).is_ok());
        }
    }
}
