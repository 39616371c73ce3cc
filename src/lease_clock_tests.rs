//! Pure tests of the lease clock, including the cases where the session watcher, prefetch and
//! token upkeep used to decide differently (each noted "used to").

use super::*;

const S: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn huge_vault_durations_are_clamped() {
    assert_eq!(from_vault_secs(u64::MAX), MAX_VAULT_DURATION);
    assert_eq!(from_vault_secs(300), S(300));
    assert_eq!(from_vault_secs(0), Duration::ZERO);
}

#[test]
fn later_saturates() {
    let now = Instant::now();
    assert!(later(now, Duration::MAX) > now + S(365 * 86_400));
    assert_eq!(later(now, S(5)), now + S(5));
}

#[test]
fn jitter_is_a_fraction_and_never_panics() {
    assert_eq!(Jitter::new(f64::NAN), Jitter::NONE);
    assert_eq!(Jitter::new(7.0), Jitter::FULL);
    assert_eq!(Jitter::new(-1.0), Jitter::NONE);
    assert_eq!(Jitter::FULL.of(Duration::MAX), Duration::MAX);
    assert_eq!(Jitter::new(0.5).of(S(10)), S(5));
    for _ in 0..100 {
        let j = Jitter::random();
        assert!((0.0..=1.0).contains(&j.0), "{j:?}");
    }
}

#[test]
fn renewal_is_due_at_two_thirds_of_the_time_left_minus_up_to_a_tenth() {
    let now = Instant::now();
    let expires = now + S(30);
    assert_eq!(renew_at(now, expires, Jitter::NONE), now + S(20));
    assert_eq!(renew_at(now, expires, Jitter::FULL), now + S(17));
    assert_eq!(
        renew_at(now, expires, Jitter::new(0.5)),
        now + S(18) + S(1) / 2
    );
    // Past the expiry: due now.
    assert_eq!(renew_at(expires, now, Jitter::FULL), expires);
    // Prefetch and token upkeep used to renew without jitter: all three now share it.
    let t = Term::issued(now, S(30), true, Jitter::FULL);
    assert_eq!(t.next_renew, Some(now + S(17)));
}

#[test]
fn any_grant_shorter_than_asked_for_is_final() {
    // Uncapped: Vault grants exactly the increment.
    assert!(!grant_is_final(S(30), S(30), true));
    assert!(!grant_is_final(S(30), S(31), true));
    // One second short: the watcher used to call this final, prefetch and token upkeep
    // allowed a second of slack. It is a cap (OpenBao rounds capped TTLs, here up).
    assert!(grant_is_final(S(6), S(5), true));
    assert!(grant_is_final(S(30), S(29), true));
    assert!(grant_is_final(
        S(30),
        S(30) - Duration::from_millis(1),
        true
    ));
    // Not renewable: final whatever it granted.
    assert!(grant_is_final(S(30), S(30), false));
    assert!(grant_is_final(S(30), S(3600), false));
}

#[test]
fn a_final_grant_is_counted_a_second_short_and_ends_renewal() {
    let now = Instant::now();
    let mut t = Term::issued(now, S(30), true, Jitter::NONE);
    let at = now + S(20);
    assert!(t.granted(at, S(30), S(5), true, Jitter::NONE));
    // Prefetch and token upkeep used to count the full 5 s.
    assert_eq!(t.expires, Some(at + S(4)));
    assert_eq!(t.next_renew, None);
    assert!(t.end_is_final());
    // A grant of nothing: expired now, and no panic.
    assert!(t.granted(at, S(30), Duration::ZERO, true, Jitter::NONE));
    assert_eq!(t.expires, Some(at));
}

#[test]
fn a_full_grant_schedules_the_next_renewal() {
    let now = Instant::now();
    let mut t = Term::issued(now, S(30), true, Jitter::NONE);
    let at = now + S(20);
    assert!(!t.granted(at, S(30), S(30), true, Jitter::NONE));
    assert_eq!(t.expires, Some(at + S(30)));
    assert_eq!(t.next_renew, Some(at + S(20)));
    assert!(!t.end_is_final());
}

#[test]
fn a_ttl_of_zero_never_expires_and_is_never_renewed() {
    // The watcher and token upkeep read zero as "never expires"; prefetch used to read it as
    // "expired at once".
    let now = Instant::now();
    let t = Term::issued(now, Duration::ZERO, true, Jitter::NONE);
    assert_eq!(t.expires, None);
    assert_eq!(t.left(now + S(86_400)), None);
    assert!(!t.renew_due(now + S(86_400)));
    assert!(!t.running_out(now + S(86_400), S(30)));
}

#[test]
fn not_renewable_means_no_renewal_and_a_final_end() {
    let now = Instant::now();
    let t = Term::issued(now, S(30), false, Jitter::NONE);
    assert_eq!(t.next_renew, None);
    assert!(t.end_is_final());
    assert!(!t.running_out(now + S(20), S(30)));
    assert!(t.running_out(now + S(21), S(30)));
}

#[test]
fn backoff_grows_is_capped_and_resets() {
    let mut b = Backoff::new(Duration::from_millis(200), S(10));
    let waits: Vec<Duration> = (0..10).map(|_| b.next_wait(Jitter::NONE)).collect();
    let ms = |n| Duration::from_millis(n);
    assert_eq!(
        waits,
        [
            ms(200),
            ms(400),
            ms(800),
            ms(1600),
            ms(3200),
            ms(6400),
            S(10),
            S(10),
            S(10),
            S(10)
        ]
    );
    b.reset();
    assert_eq!(b.next_wait(Jitter::NONE), ms(200));
    // Full jitter adds half a step, but never beyond the cap, and waits never shrink.
    let mut b = Backoff::new(Duration::from_millis(200), S(10));
    let mut last = Duration::ZERO;
    for _ in 0..20 {
        let wait = b.next_wait(Jitter::FULL);
        assert!(wait >= last && wait <= S(10), "{wait:?} after {last:?}");
        last = wait;
    }
    assert_eq!(
        Backoff::new(ms(200), S(10)).next_wait(Jitter::FULL),
        ms(300)
    );
    let mut huge = Backoff::new(Duration::MAX, Duration::MAX);
    assert_eq!(huge.next_wait(Jitter::FULL), Duration::MAX);
}

#[test]
fn failed_renewals_back_off_within_a_quarter_of_the_time_left() {
    // The watcher used to retry after a quarter of the time left (0.5-10 s), token upkeep
    // after a quarter (0.25-5 s), prefetch after 5 s flat: now one rule.
    let now = Instant::now();
    let mut t = Term::issued(now, S(3600), true, Jitter::NONE);
    let mut at = now + S(2400);
    let mut waits = Vec::new();
    for _ in 0..8 {
        t.failed(at, Jitter::NONE);
        let next = t.next_renew.expect("retried");
        waits.push(next - at);
        at = next;
    }
    let ms = |n| Duration::from_millis(n);
    assert_eq!(
        waits,
        [ms(500), S(1), S(2), S(4), S(8), S(10), S(10), S(10)]
    );
    assert!(t.failing && t.end_is_final());
    // Close to the expiry, a quarter of what is left (never below the first step).
    let mut t = Term::issued(now, S(30), true, Jitter::NONE);
    for _ in 0..5 {
        t.failed(now + S(20), Jitter::NONE);
    }
    t.failed(now + S(20), Jitter::NONE);
    assert_eq!(t.next_renew, Some(now + S(22) + S(1) / 2));
    t.failed(now + S(30), Jitter::NONE);
    assert_eq!(t.next_renew, Some(now + S(30) + ms(500)));
    // A grant ends the failing streak and resets the backoff.
    assert!(!t.granted(now + S(25), S(30), S(30), true, Jitter::NONE));
    assert!(!t.failing);
    t.failed(now + S(26), Jitter::NONE);
    assert_eq!(t.next_renew, Some(now + S(26) + ms(500)));
}

fn terms(ttl: u64, max_session: Option<u64>, warning: u64) -> SessionTerms {
    SessionTerms {
        ttl: S(ttl),
        remaining: S(ttl),
        renewable: true,
        max_session: max_session.map(S),
        warning: S(warning),
    }
}

fn fixed() -> Jitter {
    Jitter::NONE
}

#[test]
fn margins() {
    assert_eq!(end_margin(S(5)), S(1));
    assert_eq!(end_margin(S(20)), S(2));
    assert_eq!(end_margin(S(3600)), S(5));
    assert_eq!(end_margin(Duration::ZERO), S(1));
}

#[test]
fn the_earlier_end_wins_and_the_warning_precedes_it() {
    let now = Instant::now();
    let clock = SessionClock::new(now, terms(60, None, 10), fixed);
    let plan = clock.plan();
    assert_eq!(plan.ending, Ending::Credential);
    assert_eq!(plan.end_at, now + S(55));
    assert!(plan.warn_at.is_none(), "a renewable end is not final");
    assert_eq!(clock.next_wake(), now + S(40), "the renewal comes first");
    let clock = SessionClock::new(now, terms(60, Some(20), 10), fixed);
    let plan = clock.plan();
    assert_eq!(plan.ending, Ending::MaxSession);
    assert_eq!(plan.end_at, now + S(20));
    assert_eq!(plan.warn_at, Some(now + S(10)));
    assert_eq!(clock.next_wake(), now + S(10));
}

#[test]
fn poll_warns_then_ends_once_each() {
    let now = Instant::now();
    let mut clock = SessionClock::new(now, terms(60, Some(20), 10), fixed);
    assert_eq!(clock.poll(now + S(5)), None);
    assert_eq!(
        clock.poll(now + S(10)),
        Some(Due::Warn {
            ending: Ending::MaxSession,
            left: S(10)
        })
    );
    assert_eq!(clock.poll(now + S(10)), None);
    assert_eq!(clock.next_wake(), now + S(20));
    assert_eq!(clock.poll(now + S(20)), Some(Due::End(Ending::MaxSession)));
}

#[test]
fn an_end_learnt_late_is_warned_about_right_before_it() {
    let now = Instant::now();
    let mut clock = SessionClock::new(now, terms(30, None, 10), fixed);
    assert_eq!(clock.poll(now + S(20)), Some(Due::Renew));
    // Capped at the first renewal: 5 s granted of 30, counted as 4: the end (3 s margin)
    // is 1 s away, less than the 10 s warning: warn at once, announcing that 1 s.
    assert!(clock.renewed(now + S(20), S(5), true));
    assert_eq!(
        clock.poll(now + S(20)),
        Some(Due::Warn {
            ending: Ending::Credential,
            left: S(1)
        })
    );
    assert_eq!(clock.poll(now + S(20)), None);
    assert_eq!(clock.next_wake(), now + S(21));
    assert_eq!(clock.poll(now + S(21)), Some(Due::End(Ending::Credential)));
}

#[test]
fn failing_renewals_make_the_end_final_and_warned() {
    let now = Instant::now();
    let mut clock = SessionClock::new(now, terms(60, None, 10), fixed);
    assert_eq!(clock.poll(now + S(40)), Some(Due::Renew));
    clock.renew_failed(now + S(40));
    // The end (55 s) is now final: warned 10 s before it, retried meanwhile.
    assert_eq!(clock.next_wake(), now + S(40) + Duration::from_millis(500));
    assert_eq!(
        clock.poll(now + S(45)),
        Some(Due::Warn {
            ending: Ending::Credential,
            left: S(10)
        })
    );
    assert_eq!(clock.poll(now + S(45)), Some(Due::Renew));
    assert!(!clock.renewed(now + S(45), S(60), true));
    assert_eq!(clock.poll(now + S(60)), None, "renewed: the end moved");
}

#[test]
fn a_credential_without_ttl_ends_only_at_max_session() {
    let now = Instant::now();
    let mut t = terms(0, None, 10);
    t.remaining = Duration::ZERO;
    let clock = SessionClock::new(now, t, fixed);
    assert!(clock.next_wake() > now + S(365 * 86_400));
    t.max_session = Some(S(30));
    let mut clock = SessionClock::new(now, t, fixed);
    assert_eq!(
        clock
            .poll(now + S(30) - Duration::from_millis(1))
            .map(|_| ()),
        Some(())
    );
    assert_eq!(clock.poll(now + S(30)), Some(Due::End(Ending::MaxSession)));
}

#[test]
fn a_prefetched_credential_counts_from_the_time_left() {
    let now = Instant::now();
    let mut t = terms(60, None, 10);
    t.remaining = S(30);
    let clock = SessionClock::new(now, t, fixed);
    assert_eq!(clock.next_wake(), now + S(20));
    assert_eq!(clock.increment(), S(60));
}

#[test]
fn absurd_durations_do_not_panic() {
    let now = Instant::now();
    let huge = from_vault_secs(u64::MAX);
    for (ttl, remaining, max_session) in [
        (huge, huge, Some(Duration::MAX)),
        (Duration::MAX, Duration::MAX, None),
        (S(1), Duration::ZERO, Some(Duration::ZERO)),
    ] {
        for renewable in [true, false] {
            let terms = SessionTerms {
                ttl,
                remaining,
                renewable,
                max_session,
                warning: Duration::MAX,
            };
            let mut clock = SessionClock::new(now, terms, Jitter::random);
            let plan = clock.plan();
            assert!(plan.warn_at.is_none_or(|w| w <= plan.end_at));
            let wake = clock.next_wake().max(now);
            assert!(clock.poll(wake).is_some(), "something is due at the wake");
            while let Some(Due::Warn { .. } | Due::Renew) = clock.poll(now) {
                clock.renewed(now, Duration::MAX, true);
            }
            clock.renew_failed(now);
            let mut term = Term::issued(now, ttl, renewable, Jitter::FULL);
            term.granted(now, ttl, Duration::MAX, true, Jitter::FULL);
            term.failed(now, Jitter::FULL);
        }
    }
}
