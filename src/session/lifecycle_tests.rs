//! The session watcher in paused time, against a scripted Vault: renewals at two thirds, the
//! warning and the end for max_ttl, a TTL capped at its first renewal, failing renewals,
//! `max_session_duration` and shutdown; the notice never announces less time than is left.

use std::sync::Arc;

use tokio::task::JoinHandle;

use super::*;
use crate::vault::client::Renewed;
use crate::vault::testing::{ScriptedVault, unreachable};

const S: fn(u64) -> Duration = Duration::from_secs;
const LEASE: &str = "database/creds/readonly/x";

fn life(ttl: u64, warning: Duration, max_session: Option<Duration>) -> Lifetime {
    Lifetime {
        lease_id: LEASE.into(),
        ttl: S(ttl),
        remaining: S(ttl),
        renewable: true,
        max_session,
        warning,
        role: "readonly".into(),
        tracked: None,
    }
}

/// What the watcher sent the relay, with when (from the start).
#[derive(Debug)]
struct Sent {
    at: Duration,
    end: bool,
    severity: String,
    code: String,
    message: String,
}

/// Severity, SQLSTATE and message of an ErrorResponse or NoticeResponse.
fn fields(buf: &[u8]) -> (String, String, String) {
    let (mut severity, mut code, mut message) = Default::default();
    let mut rest = &buf[5..];
    while let Some((&kind, tail)) = rest.split_first().filter(|(k, _)| **k != 0) {
        let end = tail.iter().position(|b| *b == 0).expect("terminated field");
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match kind {
            b'S' => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
        rest = &tail[end + 1..];
    }
    (severity, code, message)
}

/// A watcher running against `vault` (no jitter), and what it sent.
struct Watcher {
    start: Instant,
    stop: CancellationToken,
    rx: super::super::relay::ControlReceiver,
    task: JoinHandle<()>,
}

fn watching(vault: &Arc<ScriptedVault>, life: Lifetime) -> Watcher {
    let (tx, rx) = super::super::relay::control_channel();
    let stop = CancellationToken::new();
    let (vault, stopped) = (vault.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let metrics = Metrics::new();
        watch_with(&*vault, &metrics, &life, &stopped, tx, || Jitter::NONE).await;
    });
    Watcher {
        start: Instant::now(),
        stop,
        rx,
        task,
    }
}

impl Watcher {
    /// Everything sent until the `End` (or until `within` passed).
    async fn until_end(&mut self, within: Duration) -> Vec<Sent> {
        let mut sent = Vec::new();
        let deadline = self.start + within;
        while let Ok(Some(control)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            let (end, buf) = match control {
                Control::Notice(b) => (false, b),
                Control::End(b) => (true, b),
            };
            let (severity, code, message) = fields(&buf);
            sent.push(Sent {
                at: self.start.elapsed(),
                end,
                severity,
                code,
                message,
            });
            if end {
                break;
            }
        }
        self.task.abort();
        sent
    }
}

/// `N` of a notice ending in "will be ended in Ns".
fn announced(message: &str) -> Duration {
    let rest = message
        .split("will be ended in ")
        .nth(1)
        .expect("announces");
    S(rest
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .expect("whole seconds"))
}

/// When the renewals came, from `start`.
fn renewal_times(vault: &ScriptedVault, start: Instant) -> Vec<Duration> {
    vault
        .calls_of("renew")
        .iter()
        .map(|c| c.at - start)
        .collect()
}

fn granting(durations: &'static [u64]) -> Arc<ScriptedVault> {
    Arc::new(ScriptedVault::new(S(30)).renewing(move |_, n| {
        Ok(Renewed {
            duration: S(*durations.get(n).unwrap_or(&30)),
            renewable: true,
        })
    }))
}

#[tokio::test(start_paused = true)]
async fn a_renewed_lease_keeps_the_session_renewing_at_two_thirds() {
    let vault = granting(&[]);
    let mut w = watching(&vault, life(30, S(10), None));
    let sent = w.until_end(S(210)).await;
    assert!(sent.is_empty(), "{sent:?}");
    let expected: Vec<Duration> = (1..=10).map(|i| S(20 * i)).collect();
    assert_eq!(
        renewal_times(&vault, w.start),
        expected,
        "every 20 s of a 30 s TTL"
    );
    assert!(vault.calls_of("renew").iter().all(|c| c.increment == S(30)));
}

#[tokio::test(start_paused = true)]
async fn a_ttl_capped_at_its_first_renewal_is_warned_at_once_and_ended_before_it_expires() {
    // The first renewal (20 s) gets 5 s of the 30 s asked for: the cap. Counted as 4 s, less
    // the 3 s margin: the end is 1 s away, less than the 10 s warning, so the notice goes out
    // at once and announces that second.
    let vault = granting(&[5]);
    let mut w = watching(&vault, life(30, S(10), None));
    let sent = w.until_end(S(60)).await;
    assert_eq!(sent.len(), 2, "{sent:?}");
    let (warn, end) = (&sent[0], &sent[1]);
    assert_eq!(
        (warn.end, warn.severity.as_str(), warn.code.as_str()),
        (false, "WARNING", "01000")
    );
    assert_eq!(
        warn.message,
        "the database credential for role \"readonly\" cannot be extended; this session will be ended in 1s"
    );
    assert_eq!(warn.at, S(20));
    assert_eq!(
        (end.end, end.severity.as_str(), end.code.as_str()),
        (true, "FATAL", "57P01")
    );
    assert_eq!(
        end.message,
        "terminating connection: the database credential for role \"readonly\" reached its maximum lifetime"
    );
    assert_eq!(end.at, S(21));
    assert!(end.at < S(25), "before the credential expires");
    assert_eq!(
        renewal_times(&vault, w.start).len(),
        1,
        "not renewed past the cap"
    );
}

#[tokio::test(start_paused = true)]
async fn a_grant_one_second_short_is_the_cap() {
    // 29 s of 30 (OpenBao rounds a capped TTL): final, counted as 28 s.
    let vault = granting(&[29]);
    let mut w = watching(&vault, life(30, S(10), None));
    let sent = w.until_end(S(120)).await;
    let at: Vec<Duration> = sent.iter().map(|s| s.at).collect();
    assert_eq!(at, [S(35), S(45)], "{sent:?}");
    assert!(
        sent[0].message.ends_with("will be ended in 10s"),
        "{sent:?}"
    );
    assert_eq!(renewal_times(&vault, w.start).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_credential_reaching_max_ttl_is_warned_expiry_warning_before_the_end() {
    // Renewed in full at 20 and 40 s; the one at 60 s is capped at 12 s: the end is at
    // 60 + 11 - 3 = 68 s, warned 5 s ahead.
    let vault = granting(&[30, 30, 12]);
    let mut w = watching(&vault, life(30, S(5), None));
    let sent = w.until_end(S(120)).await;
    let at: Vec<Duration> = sent.iter().map(|s| s.at).collect();
    assert_eq!(at, [S(63), S(68)], "{sent:?}");
    assert!(sent[0].message.ends_with("will be ended in 5s"));
    assert_eq!(renewal_times(&vault, w.start), [S(20), S(40), S(60)]);
}

#[tokio::test(start_paused = true)]
async fn failing_renewals_are_retried_and_the_session_ends_before_the_credential() {
    let vault = Arc::new(ScriptedVault::new(S(30)).renewing(|_, _| Err(unreachable())));
    let mut w = watching(&vault, life(30, S(10), None));
    let sent = w.until_end(S(60)).await;
    assert_eq!(sent.len(), 2, "{sent:?}");
    // The end became final with the first failure (20 s): warned at once, 7 s ahead.
    assert_eq!(sent[0].at, S(20));
    assert!(sent[0].message.ends_with("will be ended in 7s"), "{sent:?}");
    assert_eq!(sent[1].at, S(27), "3 s before the credential expires");
    assert_eq!(
        sent[1].message,
        "terminating connection: the database credential for role \"readonly\" could not be renewed and is about to expire",
        "the end names the failing renewals, not a maximum lifetime"
    );
    let tries = renewal_times(&vault, w.start);
    assert!(tries.len() >= 4, "retried: {tries:?}");
    let gaps: Vec<Duration> = tries.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(500)),
        "{gaps:?}"
    );
    assert!(tries.iter().all(|t| *t < S(27)));
}

#[tokio::test(start_paused = true)]
async fn max_session_duration_warns_then_ends() {
    let vault = granting(&[]);
    let mut w = watching(&vault, life(3600, S(10), Some(S(30))));
    let sent = w.until_end(S(60)).await;
    let at: Vec<Duration> = sent.iter().map(|s| s.at).collect();
    assert_eq!(at, [S(20), S(30)], "{sent:?}");
    assert_eq!(
        sent[0].message,
        "this session reaches max_session_duration and will be ended in 10s"
    );
    assert_eq!(
        sent[1].message,
        "terminating connection: the session reached max_session_duration (30s)"
    );
}

#[tokio::test(start_paused = true)]
async fn the_notice_never_announces_less_time_than_is_left() {
    for (max_session, warning) in [(3500, 1700), (3000, 2000), (1200, 5000), (10_001, 9_999)] {
        let ms = Duration::from_millis;
        let vault = granting(&[]);
        let mut w = watching(&vault, life(3600, ms(warning), Some(ms(max_session))));
        let sent = w.until_end(S(60)).await;
        assert_eq!(sent.len(), 2, "{sent:?}");
        let left = sent[1].at - sent[0].at;
        let said = announced(&sent[0].message);
        assert!(
            said >= left && said < left + S(1),
            "said {said:?}, {left:?} left: {sent:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_prefetched_credential_is_renewed_at_two_thirds_of_what_it_has_left() {
    let vault = granting(&[]);
    let mut l = life(30, S(10), None);
    l.remaining = S(12);
    let mut w = watching(&vault, l);
    let sent = w.until_end(S(10)).await;
    assert!(sent.is_empty(), "{sent:?}");
    assert_eq!(renewal_times(&vault, w.start), [S(8)]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_the_session_with_the_administrator_message() {
    let vault = granting(&[]);
    let mut w = watching(&vault, life(30, S(10), None));
    tokio::time::sleep(S(5)).await;
    w.stop.cancel();
    let sent = w.until_end(S(60)).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].at, S(5));
    assert_eq!(
        (sent[0].severity.as_str(), sent[0].code.as_str()),
        ("FATAL", "57P01")
    );
    assert_eq!(
        sent[0].message,
        "terminating connection due to administrator command"
    );
}
