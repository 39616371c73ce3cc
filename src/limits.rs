//! Abuse limits, checked after the certificate is known and before any Vault call: a global
//! cap on sessions, and per identity a cap on concurrent sessions and a token bucket for new
//! sessions per second. A refused client gets FATAL 53300 (`SessionError::Limited`). The
//! listeners' connection slots (`max_connections`, and the overflow that serves cancels past
//! it) are in [`slots`].

pub(crate) mod slots;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::SessionLimits;
use crate::metrics::labels::AuthFailureReason;

/// Which limit refused a session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum LimitHit {
    /// `limits.max_sessions`.
    Global(u32),
    /// `limits.max_sessions_per_identity`.
    IdentitySessions(u32),
    /// `limits.new_sessions_per_second_per_identity`.
    IdentityRate(f64),
}

impl LimitHit {
    /// Metric label for `leasegate_auth_failures_total{reason}`.
    pub(crate) fn label(&self) -> AuthFailureReason {
        match self {
            LimitHit::Global(_) => AuthFailureReason::GlobalSessionLimit,
            LimitHit::IdentitySessions(_) => AuthFailureReason::IdentitySessionLimit,
            LimitHit::IdentityRate(_) => AuthFailureReason::IdentityRateLimit,
        }
    }
}

struct Bucket {
    active: u32,
    tokens: f64,
    refilled: Instant,
}

struct Counts {
    /// The limits in force; a reload replaces them and keeps the counts.
    config: SessionLimits,
    total: u32,
    identities: HashMap<String, Bucket>,
}

/// Session counters shared by every session.
#[derive(Clone)]
pub(crate) struct Limiter {
    counts: Arc<Mutex<Counts>>,
}

/// Held while a session lives; releases its counts on drop.
pub(crate) struct Permit {
    counts: Arc<Mutex<Counts>>,
    identity: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(b) = counts.identities.get_mut(&self.identity) {
            b.active = b.active.saturating_sub(1);
        }
    }
}

/// Identities tracked before idle ones with full buckets are swept.
const SWEEP_ABOVE: usize = 10_000;

impl Limiter {
    /// A limiter for `config`.
    pub(crate) fn new(config: SessionLimits) -> Limiter {
        Limiter {
            counts: Arc::new(Mutex::new(Counts {
                config,
                total: 0,
                identities: HashMap::new(),
            })),
        }
    }

    /// Puts new limits in force (SIGHUP). Sessions already counted stay counted, so a lowered
    /// limit refuses new sessions until enough of the open ones have ended.
    pub(crate) fn set_limits(&self, config: SessionLimits) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.config = config;
    }

    /// Takes a session slot for `identity`, or says which limit refused it.
    pub(crate) fn acquire(&self, identity: &str) -> Result<Permit, LimitHit> {
        self.acquire_at(identity, Instant::now())
    }

    fn acquire_at(&self, identity: &str, now: Instant) -> Result<Permit, LimitHit> {
        let mut guard = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let counts = &mut *guard;
        let c = &counts.config;
        if counts.total >= c.max_sessions {
            return Err(LimitHit::Global(c.max_sessions));
        }
        let burst = c.burst_per_identity.max(1) as f64;
        if counts.identities.len() > SWEEP_ABOVE {
            let rate = c.new_sessions_per_second_per_identity;
            counts.identities.retain(|_, b| {
                b.active > 0
                    || b.tokens + now.duration_since(b.refilled).as_secs_f64() * rate < burst
            });
        }
        let bucket = counts
            .identities
            .entry(identity.to_owned())
            .or_insert(Bucket {
                active: 0,
                tokens: burst,
                refilled: now,
            });
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens =
            (bucket.tokens + elapsed * c.new_sessions_per_second_per_identity).min(burst);
        bucket.refilled = now;
        if bucket.active >= c.max_sessions_per_identity {
            return Err(LimitHit::IdentitySessions(c.max_sessions_per_identity));
        }
        if bucket.tokens < 1.0 {
            return Err(LimitHit::IdentityRate(
                c.new_sessions_per_second_per_identity,
            ));
        }
        bucket.tokens -= 1.0;
        bucket.active += 1;
        counts.total += 1;
        Ok(Permit {
            counts: self.counts.clone(),
            identity: identity.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limiter(max: u32, per_id: u32, rate: f64, burst: u32) -> Limiter {
        Limiter::new(SessionLimits {
            max_sessions: max,
            max_sessions_per_identity: per_id,
            new_sessions_per_second_per_identity: rate,
            burst_per_identity: burst,
        })
    }

    #[test]
    fn concurrent_limits_release_on_drop() {
        let l = limiter(3, 2, 1000.0, 1000);
        let a1 = l.acquire("a").expect("first");
        let _a2 = l.acquire("a").expect("second");
        assert_eq!(l.acquire("a").err(), Some(LimitHit::IdentitySessions(2)));
        let _b = l.acquire("b").expect("other identity");
        assert_eq!(l.acquire("c").err(), Some(LimitHit::Global(3)));
        drop(a1);
        assert!(l.acquire("a").is_ok());
    }

    #[test]
    fn token_bucket_refills_over_time() {
        let l = limiter(100, 100, 2.0, 2);
        let t0 = Instant::now();
        let _p1 = l.acquire_at("a", t0).expect("1");
        let _p2 = l.acquire_at("a", t0).expect("2");
        assert_eq!(
            l.acquire_at("a", t0).err(),
            Some(LimitHit::IdentityRate(2.0))
        );
        let _p3 = l
            .acquire_at("a", t0 + Duration::from_millis(500))
            .expect("refilled");
        assert!(l.acquire_at("b", t0).is_ok(), "buckets are per identity");
    }

    #[test]
    fn new_limits_apply_to_new_sessions_and_keep_the_counts() {
        let l = limiter(100, 5, 1000.0, 1000);
        let _a1 = l.acquire("a").expect("first");
        let _a2 = l.acquire("a").expect("second");
        l.set_limits(SessionLimits {
            max_sessions_per_identity: 2,
            ..SessionLimits::default()
        });
        assert_eq!(l.acquire("a").err(), Some(LimitHit::IdentitySessions(2)));
        assert!(l.acquire("b").is_ok(), "other identities are not affected");
    }
}
