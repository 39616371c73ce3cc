//! The revoker: the drain at shutdown against a local HTTP server, and its retry backoff in
//! paused time against a scripted Vault.

use super::*;
use crate::vault::testing::{self, ScriptedVault, parent_token as parent};

fn spawn(vault: Arc<dyn LeaseApi>) -> Revoker {
    Revoker::spawn(vault, Arc::new(Metrics::new()), &Tasks::detached())
}

#[tokio::test]
async fn a_guard_kept_alive_past_the_drain_limit_is_reported_by_id() {
    let vault = testing::client(&testing::closed_address().await);
    let revoker = spawn(vault);
    let held = revoker.guard_id("database/creds/readonly/held".into(), parent());
    let done = revoker.guard_id("database/creds/readonly/done".into(), parent());
    drop(done);
    assert_eq!(revoker.outstanding(), 2);
    let left = revoker.drain(Duration::from_millis(300)).await;
    // Vault is unreachable, so neither revocation can finish.
    assert_eq!(
        left,
        vec![
            "database/creds/readonly/done".to_owned(),
            "database/creds/readonly/held".to_owned()
        ]
    );
    // The drain took the held lease over: its guard dropping later queues nothing more.
    let pending = revoker.pending();
    drop(held);
    assert_eq!(revoker.pending(), pending);
}

#[tokio::test]
async fn the_drain_waits_for_live_guards_and_revokes_their_leases() {
    let (address, seen) = testing::answering(204).await;
    let revoker = spawn(testing::client(&address));
    let guard = revoker.guard_id("database/creds/readonly/late".into(), parent());
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(guard);
    });
    let left = revoker.drain(Duration::from_secs(20)).await;
    assert!(left.is_empty(), "left {left:?}");
    assert_eq!(revoker.outstanding(), 0);
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].starts_with("PUT /v1/sys/leases/revoke "),
        "{}",
        seen[0]
    );
    assert!(
        seen[0].contains("database/creds/readonly/late"),
        "{}",
        seen[0]
    );
}

#[tokio::test]
async fn a_guard_still_alive_at_the_drain_is_revoked_anyway() {
    let (address, seen) = testing::answering(204).await;
    let revoker = spawn(testing::client(&address));
    let guard = revoker.guard_id("database/creds/readonly/stuck".into(), parent());
    let left = revoker.drain(Duration::from_secs(2)).await;
    assert!(left.is_empty(), "left {left:?}");
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].contains("database/creds/readonly/stuck"),
        "{}",
        seen[0]
    );
    drop(guard);
    assert_eq!(revoker.outstanding(), 0);
    assert_eq!(revoker.pending(), 0);
}

/// Waits (in paused time) until the revoker is done with every lease.
async fn settled(revoker: &Revoker) {
    while revoker.outstanding() > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn failed_revocations_back_off_growing_capped_and_give_up_after_the_last_attempt() {
    let vault = Arc::new(
        ScriptedVault::new(Duration::from_secs(30)).revoking(|_| Err(testing::unreachable())),
    );
    let metrics = Arc::new(Metrics::new());
    let revoker = Revoker::spawn(vault.clone(), metrics.clone(), &Tasks::detached());
    drop(revoker.guard_id("database/creds/readonly/x".into(), parent()));
    settled(&revoker).await;
    let at: Vec<_> = vault.calls_of("revoke").iter().map(|c| c.at).collect();
    assert_eq!(at.len(), MAX_ATTEMPTS as usize, "{at:?}");
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    let first = Duration::from_millis(200);
    assert!(gaps[0] >= first && gaps[0] <= first * 3 / 2, "{gaps:?}");
    for pair in gaps.windows(2) {
        assert!(pair[1] >= pair[0], "spacing grows: {gaps:?}");
    }
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_secs(10)),
        "capped: {gaps:?}"
    );
    assert_eq!(gaps.last(), Some(&Duration::from_secs(10)), "{gaps:?}");
    // Given up: nothing more is tried, the failure is counted once.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(vault.calls_of("revoke").len(), MAX_ATTEMPTS as usize);
    assert_eq!(revoker.pending(), 0);
    let text = metrics.render();
    assert!(
        text.contains(r#"leasegate_lease_revocations_total{result="error"} 1"#),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_revocation_that_succeeds_on_a_retry_is_not_tried_again() {
    let vault = Arc::new(
        ScriptedVault::new(Duration::from_secs(30)).revoking(|before| {
            if before < 2 {
                Err(testing::unreachable())
            } else {
                Ok(())
            }
        }),
    );
    let metrics = Arc::new(Metrics::new());
    let revoker = Revoker::spawn(vault.clone(), metrics.clone(), &Tasks::detached());
    drop(revoker.guard_id("database/creds/readonly/y".into(), parent()));
    settled(&revoker).await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(vault.calls_of("revoke").len(), 3);
    let text = metrics.render();
    assert!(
        text.contains(r#"leasegate_lease_revocations_total{result="ok"} 1"#),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_revoker_stops_retrying_when_its_token_is_cancelled() {
    let vault = Arc::new(
        ScriptedVault::new(Duration::from_secs(30)).revoking(|_| Err(testing::unreachable())),
    );
    let tracker = tokio_util::task::TaskTracker::new();
    let tasks = Tasks::new(tracker.clone(), CancellationToken::new());
    let revoker = Revoker::spawn(vault.clone(), Arc::new(Metrics::new()), &tasks);
    drop(revoker.guard_id("database/creds/readonly/z".into(), parent()));
    while vault.calls_of("revoke").len() < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tasks.stop().cancel();
    tracker.close();
    tracker.wait().await;
    assert_eq!(
        vault.calls_of("revoke").len(),
        2,
        "no attempt after the stop"
    );
}
