//! Durations that come from Vault (lease TTLs, token TTLs, renewal grants) and the instants
//! computed from them. Vault is trusted, but not to send sane numbers: a `lease_duration` of
//! `u64::MAX` seconds must not panic `Instant + Duration`. Every Vault duration is clamped at
//! parse time ([`from_vault_secs`]) and every deadline is computed with [`later`], which
//! saturates instead of overflowing.

use std::time::Duration;

use tokio::time::Instant;

/// The longest duration leasegate takes from Vault: ten years. Anything longer is treated
/// as this (no credential or token lives that long in practice).
pub const MAX_VAULT_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// A duration Vault gave in seconds, clamped to [`MAX_VAULT_DURATION`].
pub fn from_vault_secs(secs: u64) -> Duration {
    Duration::from_secs(secs).min(MAX_VAULT_DURATION)
}

/// How far "never" is for deadlines that overflow: a hundred years.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `at + d`, or a far-future instant when that does not fit (never panics).
pub fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(FAR_FUTURE))
        .unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_vault_durations_are_clamped() {
        assert_eq!(from_vault_secs(u64::MAX), MAX_VAULT_DURATION);
        assert_eq!(from_vault_secs(300), Duration::from_secs(300));
        assert_eq!(from_vault_secs(0), Duration::ZERO);
    }

    #[test]
    fn later_saturates() {
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now + Duration::from_secs(365 * 86_400));
        assert_eq!(
            later(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
    }
}
