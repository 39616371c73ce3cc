//! The process's open-file limit. Every session holds two descriptors (the client's socket
//! and the upstream's), so the soft `RLIMIT_NOFILE` a shell hands out (often 1024) would stop
//! the proxy at a few hundred sessions, far below `listen.max_connections`. At start the soft
//! limit is raised to the hard limit (headroom for cancel, Vault and peer connections on top
//! of the sessions; descriptors cost nothing until used), never lowered. When even the hard
//! limit has no room for `max_connections` sessions, the listeners hold fewer: the start logs
//! a warning that names how many and how to raise the limit.

use rustix::io::Errno;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors a session holds while it relays: the client's socket and the upstream's.
pub(crate) const PER_SESSION: u64 = 2;

/// Descriptors for everything else: standard streams, the runtimes' pollers, the listeners,
/// the admin server, Vault and peer connections, the audit file, cancel connections (the
/// listeners' overflow slots included: [`crate::limits::slots::OVERFLOW`] each, and a
/// cancel's upstream connection).
pub(crate) const RESERVE: u64 = 128;

/// The soft limit to ask for, given the current `soft` and `hard` limits (`None`: unlimited)
/// and the descriptors `needed`: the hard limit; without one (the kernel refuses an unlimited
/// soft limit for descriptors), what is needed. Never below `soft`.
pub(crate) fn target(soft: Option<u64>, hard: Option<u64>, needed: u64) -> Option<u64> {
    let soft = soft?; // unlimited already
    Some(hard.unwrap_or(needed).max(soft))
}

/// Sessions a soft limit of `limit` descriptors leaves room for: two each after the
/// reserve, and never fewer than an eighth of the limit (a small limit is a misconfiguration
/// to warn about, not a reason to serve next to nothing).
pub(crate) fn sessions_allowed(limit: u64) -> u64 {
    (limit.saturating_sub(RESERVE) / PER_SESSION).max(limit / 8)
}

/// Descriptors `max_sessions` sessions need, the reserve included.
pub(crate) fn needed(max_sessions: u64) -> u64 {
    max_sessions
        .saturating_mul(PER_SESSION)
        .saturating_add(RESERVE)
}

/// The sessions each of `pools` listeners (TCP, and the Unix socket when it is on) may hold
/// at once: `max_connections`, or less when the open-file limit `limit` (`None`: unlimited)
/// has no room for that many; at least one.
pub(crate) fn per_pool(max_connections: usize, pools: usize, limit: Option<u64>) -> usize {
    let Some(limit) = limit else {
        return max_connections;
    };
    let room = usize::try_from(sessions_allowed(limit) / pools.max(1) as u64).unwrap_or(usize::MAX);
    max_connections.min(room).max(1)
}

/// Raises the soft open-file limit for `max_connections` sessions on each of `pools`
/// listeners and returns how many each pool may then hold (see [`per_pool`]); logs what it
/// did, and a warning when the hard limit leaves room for fewer.
pub(crate) fn raise_for(max_connections: usize, pools: usize) -> usize {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let needed = needed((max_connections as u64).saturating_mul(pools as u64));
    let Some(target) = target(current, maximum, needed) else {
        return max_connections;
    };
    let mut now = current.unwrap_or(target);
    if Some(target) != current {
        let new = Rlimit {
            current: Some(target),
            maximum,
        };
        match setrlimit(Resource::Nofile, new) {
            Ok(()) => {
                tracing::info!(from = now, to = target, "raised the open-file limit");
                now = target;
            }
            Err(e) => {
                tracing::warn!(error = %e, limit = now, "could not raise the open-file limit")
            }
        }
    }
    let per_pool = per_pool(max_connections, pools, Some(now));
    if per_pool < max_connections {
        tracing::warn!(
            limit = now,
            sessions = per_pool,
            max_connections,
            "the open-file limit has room for fewer sessions than listen.max_connections: \
             at most `sessions` at once, further connections wait in the accept queue; raise \
             the hard limit (LimitNOFILE=, ulimit -Hn) or lower max_connections"
        );
    }
    per_pool
}

/// Whether `error` is the process (EMFILE) or the system (ENFILE) out of file descriptors.
pub(crate) fn exhausted(error: &std::io::Error) -> bool {
    matches!(
        Errno::from_io_error(error),
        Some(Errno::MFILE | Errno::NFILE)
    )
}

/// Whether an `std::io::Error` somewhere in `error`'s source chain is [`exhausted`].
pub(crate) fn exhausted_in_chain(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>().is_some_and(exhausted) {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error wrapping another, as HTTP clients wrap the connect error.
    #[derive(Debug, thiserror::Error)]
    #[error("client error")]
    struct Wrapped(#[source] std::io::Error);

    #[test]
    fn emfile_and_enfile_are_exhaustion_anywhere_in_the_chain() {
        let emfile = std::io::Error::from_raw_os_error(Errno::MFILE.raw_os_error());
        let enfile = std::io::Error::from_raw_os_error(Errno::NFILE.raw_os_error());
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(exhausted(&emfile) && exhausted(&enfile) && !exhausted(&refused));
        assert!(exhausted_in_chain(&Wrapped(emfile)));
        assert!(!exhausted_in_chain(&Wrapped(refused)));
    }

    #[test]
    fn a_low_soft_limit_is_raised_to_the_hard_limit() {
        assert_eq!(
            target(Some(1024), Some(1 << 20), needed(10_000)),
            Some(1 << 20)
        );
        assert_eq!(
            target(Some(1024), Some(20_000), needed(10_000)),
            Some(20_000)
        );
        assert_eq!(sessions_allowed(20_000), 9_936);
    }

    #[test]
    fn a_limit_already_high_enough_is_never_lowered() {
        assert_eq!(
            target(Some(65_536), Some(65_536), needed(100)),
            Some(65_536)
        );
        assert_eq!(target(Some(4096), None, needed(100)), Some(4096));
    }

    #[test]
    fn an_unlimited_soft_limit_is_left_alone() {
        assert_eq!(target(None, None, needed(10_000)), None);
    }

    #[test]
    fn no_hard_limit_raises_to_exactly_what_is_needed() {
        assert_eq!(target(Some(1024), None, needed(10_000)), Some(20_128));
    }

    #[test]
    fn huge_settings_do_not_overflow() {
        assert_eq!(needed(u64::MAX), u64::MAX);
        assert_eq!(per_pool(usize::MAX, 2, None), usize::MAX);
    }

    #[test]
    fn a_short_limit_caps_the_sessions_of_each_pool() {
        assert_eq!(per_pool(10_000, 1, Some(20_000)), 9_936);
        assert_eq!(per_pool(10_000, 2, Some(20_000)), 4_968);
        assert_eq!(per_pool(60, 1, Some(228)), 50);
        assert_eq!(per_pool(60, 1, Some(4096)), 60);
    }

    #[test]
    fn a_tiny_limit_still_leaves_an_eighth_of_it_and_at_least_one_session() {
        assert_eq!(sessions_allowed(100), 12);
        assert_eq!(per_pool(10_000, 1, Some(100)), 12);
        assert_eq!(per_pool(10_000, 2, Some(3)), 1);
    }
}
