//! The revocation window, decision by decision over instants the test chooses; then the
//! revoker under a scripted Vault in paused time: slow creds calls shrink the revocations in
//! flight, and every queued revocation still finishes.

use std::time::Duration;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(5);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Starts revocations until the window refuses one; how many started.
fn fill(p: &mut Pacing, now: Instant) -> usize {
    let mut n = 0;
    while p.try_start_revoke(now) {
        n += 1;
        assert!(n <= MAX_WINDOW, "the window never exceeds {MAX_WINDOW}");
    }
    n
}

/// One fast creds call (10 ms) at `now`.
fn fast_creds(p: &mut Pacing, now: Instant) {
    let t = p.issue_started(now);
    p.issue_finished(t, now + ms(10));
}

#[test]
fn a_fresh_window_lets_two_revocations_through_and_one_more_never_hurts() {
    let now = Instant::now();
    let mut p = Pacing::new(TIMEOUT);
    assert_eq!(p.window(), 2);
    assert_eq!(fill(&mut p, now), 2);
    assert_eq!(p.revoking(), 2);
    p.revoke_finished(true, now);
    assert_eq!(p.revoking(), 1);
}

#[test]
fn with_nobody_asking_for_credentials_the_window_grows_by_one_per_revocation_to_the_cap() {
    let now = Instant::now();
    let mut p = Pacing::new(TIMEOUT);
    for _ in 0..100 {
        assert!(p.try_start_revoke(now));
        p.revoke_finished(true, now);
    }
    assert_eq!(p.window(), MAX_WINDOW);
    assert_eq!(fill(&mut p, now), MAX_WINDOW);
}

#[test]
fn while_sessions_are_set_up_the_window_grows_by_one_per_windowful() {
    let start = Instant::now();
    let mut p = Pacing::new(TIMEOUT);
    fast_creds(&mut p, start);
    // Window 2: two revocations to reach 3, then three to reach 4.
    for _ in 0..2 {
        assert!(p.try_start_revoke(start));
        p.revoke_finished(true, start + ms(20));
    }
    assert_eq!(p.window(), 3);
    for _ in 0..3 {
        assert!(p.try_start_revoke(start));
        p.revoke_finished(true, start + ms(20));
    }
    assert_eq!(p.window(), 4);
    // At the drain nobody will ask for credentials again: growth is fast at once.
    let mut draining = Pacing::new(TIMEOUT);
    fast_creds(&mut draining, start);
    draining.issuance_over();
    assert!(draining.try_start_revoke(start));
    draining.revoke_finished(true, start + ms(20));
    assert_eq!(draining.window(), 3);
    // Ten seconds without a creds call: growth is fast again.
    let later = start + QUIET + ms(20);
    assert!(p.try_start_revoke(later));
    p.revoke_finished(true, later);
    assert_eq!(p.window(), 5);
}

#[test]
fn creds_calls_in_flight_take_their_place_in_the_window_first() {
    let now = Instant::now();
    let mut p = Pacing::new(TIMEOUT);
    for _ in 0..10 {
        assert!(p.try_start_revoke(now));
        p.revoke_finished(true, now);
    }
    assert_eq!(p.window(), 12);
    let tickets: Vec<u64> = (0..4).map(|_| p.issue_started(now)).collect();
    assert_eq!(fill(&mut p, now), 8, "12 minus the 4 creds calls");
    for t in tickets {
        p.issue_finished(t, now + ms(10));
    }
    assert_eq!(fill(&mut p, now + ms(10)), 4);
}

#[test]
fn a_slow_creds_call_halves_the_window_once_per_slow_mark() {
    let start = Instant::now();
    let mut p = Pacing::new(TIMEOUT);
    for _ in 0..14 {
        assert!(p.try_start_revoke(start));
        p.revoke_finished(true, start);
    }
    assert_eq!(p.window(), 16);
    fast_creds(&mut p, start);
    // The fastest call took 10 ms: the mark is the floor, 5 s / 20.
    assert_eq!(p.slow_mark(), ms(250));
    // Three slow answers arriving together are one cut.
    let tickets: Vec<u64> = (0..3).map(|_| p.issue_started(start)).collect();
    for t in tickets {
        p.issue_finished(t, start + ms(600));
    }
    assert_eq!(p.window(), 8);
    assert_eq!(p.cuts, 1);
    // Another slow answer after the mark has passed: another cut, down to the floor.
    for i in 1..=4 {
        let at = start + ms(600) + ms(300) * i;
        let t = p.issue_started(at - ms(400));
        p.issue_finished(t, at);
    }
    assert_eq!(p.window(), MIN_WINDOW);
    assert_eq!(p.cuts, 5);
}

#[test]
fn a_creds_call_waiting_past_the_mark_holds_revocations_to_one() {
    let start = Instant::now();
    let mut p = Pacing::new(TIMEOUT);
    for _ in 0..30 {
        assert!(p.try_start_revoke(start));
        p.revoke_finished(true, start);
    }
    assert_eq!(fill(&mut p, start), MAX_WINDOW);
    let waiting = p.issue_started(start);
    // Not yet past the mark: nothing new starts (the window is full), nothing is cut.
    assert!(!p.try_start_revoke(start + ms(100)));
    assert_eq!(p.cuts, 0);
    // Past the mark: the window is cut, and finished revocations do not grow it back.
    let late = start + ms(300);
    assert!(!p.try_start_revoke(late));
    assert_eq!(p.cuts, 1);
    assert_eq!(p.window(), 16);
    for _ in 0..MAX_WINDOW {
        p.revoke_finished(true, late);
    }
    assert_eq!(p.window(), 16, "no growth while issuance waits");
    // One revocation may always run, never two while the creds call waits.
    assert!(p.try_start_revoke(late));
    assert!(!p.try_start_revoke(late));
    // Its slow answer belongs to the episode already cut for: no second cut.
    p.issue_finished(waiting, late + ms(10));
    assert_eq!(p.window(), 16);
    assert_eq!(p.cuts, 1);
    assert_eq!(fill(&mut p, late + ms(10)), 15);
}

#[test]
fn the_slow_mark_follows_the_fastest_creds_call_above_its_floor() {
    let now = Instant::now();
    let mut p = Pacing::new(TIMEOUT);
    assert_eq!(p.slow_mark(), ms(250));
    let t = p.issue_started(now);
    p.issue_finished(t, now + ms(400));
    assert_eq!(p.slow_mark(), ms(800), "twice the fastest seen");
    let t = p.issue_started(now);
    p.issue_finished(t, now + ms(20));
    assert_eq!(p.slow_mark(), ms(250), "never below vault.timeout / 20");
}

#[test]
fn a_failed_revocation_halves_the_window() {
    let now = Instant::now();
    let mut p = Pacing::new(TIMEOUT);
    for _ in 0..6 {
        assert!(p.try_start_revoke(now));
        p.revoke_finished(true, now);
    }
    assert_eq!(p.window(), 8);
    assert!(p.try_start_revoke(now));
    p.revoke_finished(false, now);
    assert_eq!(p.window(), 4);
}

mod revoker {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::tasks::Tasks;
    use crate::vault::Revoker;
    use crate::vault::lease::LeaseApi;
    use crate::vault::testing::{ScriptedVault, parent_token};

    #[tokio::test(start_paused = true)]
    async fn a_slow_creds_call_shrinks_the_revocations_in_flight_and_all_still_finish() {
        let vault = Arc::new(ScriptedVault::new(Duration::from_secs(30)));
        let metrics = Arc::new(Metrics::new());
        let revoker = Revoker::spawn(
            vault.clone() as Arc<dyn LeaseApi>,
            metrics.clone(),
            &Tasks::detached(),
        );
        // A creds call that stays in flight: revocations must make room for it.
        let issuing = revoker.issuing();
        for i in 0..200 {
            drop(revoker.guard_id(format!("database/creds/readonly/{i}"), parent_token()));
        }
        let peak = Arc::new(AtomicUsize::new(0));
        let watch = {
            let (metrics, peak) = (metrics.clone(), peak.clone());
            tokio::spawn(async move {
                loop {
                    let n = metrics.revocations_in_flight.get() as usize;
                    peak.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(ms(1)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            peak.load(Ordering::SeqCst) <= 1,
            "one at a time while the creds call waits"
        );
        drop(issuing);
        while revoker.outstanding() > 0 {
            tokio::time::sleep(ms(10)).await;
        }
        watch.abort();
        assert_eq!(
            vault.calls_of("revoke").len(),
            200,
            "every lease revoked once"
        );
        let text = metrics.render();
        assert!(
            text.contains("leasegate_revocation_window_cuts_total 1"),
            "{text}"
        );
        assert!(text.contains("leasegate_revocations_in_flight 0"), "{text}");
    }
}
