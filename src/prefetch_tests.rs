//! Prefetch in paused time, against a scripted Vault: waiting leases renewed before they
//! expire, revoked and replaced once idle past `prefetch_max_idle`, replaced when a renewal
//! is capped, dropped before they expire when renewals fail, revoked at the stop, a
//! discarded pool revoked and filled again.

use tokio::task::JoinHandle;

use super::*;
use crate::lease_clock::MAX_VAULT_DURATION;
use crate::tasks::Tasks;
use crate::vault::client::Renewed;
use crate::vault::testing::{Called, ScriptedVault, unreachable};

const S: fn(u64) -> Duration = Duration::from_secs;

/// A configuration whose only database is `app` on 127.0.0.1 with role `readonly` (mount
/// `database`), with `extra` lines added to its entry.
pub(super) fn app_config(extra: &str) -> Config {
    let text = format!(
        r#"
[listen]
address = "127.0.0.1:6432"
cert = "/etc/lg/server.pem"
key = "/etc/lg/server-key.pem"
client_ca = "/etc/lg/ca.pem"
[vault]
address = "http://127.0.0.1:8200"
[vault.auth]
method = "token"
token = "s.one"
[[databases]]
name = "app"
host = "127.0.0.1"
mount = "database"
roles = ["readonly"]
{extra}
"#
    );
    Config::parse(&text).expect("config")
}

/// One database `app` whose role `readonly` keeps one lease waiting.
fn config(max_idle: &str) -> Config {
    app_config(&format!(
        "prefetch = {{ readonly = 1 }}\nprefetch_max_idle = \"{max_idle}\""
    ))
}

struct Running {
    prefetcher: Arc<Prefetcher>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

fn start(vault: &Arc<ScriptedVault>, max_idle: &str) -> Running {
    let metrics = Arc::new(Metrics::new());
    let revoker = Revoker::spawn(vault.clone(), metrics.clone(), &Tasks::detached());
    let prefetcher = Arc::new(Prefetcher::new(
        &config(max_idle),
        vault.clone(),
        revoker,
        metrics,
    ));
    let stop = CancellationToken::new();
    let task = tokio::spawn(prefetcher.clone().run(stop.clone()));
    Running {
        prefetcher,
        stop,
        task,
    }
}

/// The calls about one lease.
fn about<'a>(calls: &'a [Called], id: &str) -> Vec<&'a Called> {
    calls.iter().filter(|c| c.lease_id == id).collect()
}

const FIRST: &str = "database/creds/readonly/0";
const SECOND: &str = "database/creds/readonly/1";

#[tokio::test(start_paused = true)]
async fn a_waiting_lease_is_renewed_before_it_expires_and_handed_out_alive() {
    let vault = Arc::new(ScriptedVault::new(S(30)));
    let start_at = Instant::now();
    let run = start(&vault, "1h");
    tokio::time::sleep(S(200)).await;
    let calls = vault.calls();
    assert_eq!(vault.calls_of("creds").len(), 1, "{calls:?}");
    let renewals = about(&calls, FIRST);
    let renewals: Vec<_> = renewals.iter().filter(|c| c.op == "renew").collect();
    assert!(renewals.len() >= 9, "{renewals:?}");
    let mut granted = start_at;
    for r in &renewals {
        assert_eq!(r.increment, S(30), "asks for the TTL it was issued with");
        let after = r.at - granted;
        assert!(
            after >= S(17) && after <= S(20),
            "renewed {after:?} after the grant"
        );
        granted = r.at;
    }
    let db = &config("1h").reloadable.databases[0];
    let taken = run
        .prefetcher
        .take(db, "readonly")
        .expect("a waiting lease");
    assert_eq!(taken.lease.id, FIRST);
    assert!(taken.remaining >= MIN_REMAINING && taken.remaining <= S(30));
    // Taking it starts the refill.
    tokio::time::sleep(S(1)).await;
    assert_eq!(vault.calls_of("creds").len(), 2);
    run.stop.cancel();
    run.task.await.expect("prefetch task");
}

#[tokio::test(start_paused = true)]
async fn a_lease_idle_past_max_idle_is_revoked_and_replaced() {
    let vault = Arc::new(ScriptedVault::new(S(30)));
    let start_at = Instant::now();
    let _run = start(&vault, "60s");
    tokio::time::sleep(S(90)).await;
    let calls = vault.calls();
    let revoked = vault.calls_of("revoke");
    assert_eq!(revoked.len(), 1, "{calls:?}");
    assert_eq!(revoked[0].lease_id, FIRST);
    assert_eq!(
        revoked[0].at - start_at,
        S(60),
        "revoked once idle for 60 s"
    );
    let issued = vault.calls_of("creds");
    assert_eq!(issued.len(), 2, "{calls:?}");
    assert_eq!(issued[1].at, revoked[0].at, "replaced at once");
    assert!(about(&calls, SECOND).iter().all(|c| c.op != "revoke"));
}

#[tokio::test(start_paused = true)]
async fn a_renewal_one_second_short_is_the_cap_and_the_lease_is_replaced() {
    // Prefetch used to allow a second of slack and keep such a lease in the pool.
    let vault = Arc::new(ScriptedVault::new(S(30)).renewing(|_, _| {
        Ok(Renewed {
            duration: S(29),
            renewable: true,
        })
    }));
    let _run = start(&vault, "1h");
    tokio::time::sleep(S(25)).await;
    let calls = vault.calls();
    let first = about(&calls, FIRST);
    let ops: Vec<&str> = first.iter().map(|c| c.op).collect();
    assert_eq!(ops, ["creds", "renew", "revoke"], "{calls:?}");
    assert_eq!(
        first[2].at, first[1].at,
        "revoked as soon as the cap showed"
    );
    assert_eq!(vault.calls_of("creds").len(), 2, "{calls:?}");
}

#[tokio::test(start_paused = true)]
async fn failing_renewals_back_off_and_the_lease_goes_before_it_expires() {
    let vault = Arc::new(ScriptedVault::new(S(30)).renewing(|_, _| Err(unreachable())));
    let start_at = Instant::now();
    let _run = start(&vault, "1h");
    tokio::time::sleep(S(40)).await;
    let calls = vault.calls();
    let first = about(&calls, FIRST);
    let renewals: Vec<Instant> = first
        .iter()
        .filter(|c| c.op == "renew")
        .map(|c| c.at)
        .collect();
    assert!(renewals.len() >= 3, "retried: {calls:?}");
    let gaps: Vec<Duration> = renewals.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(500)),
        "backed off: {gaps:?}"
    );
    let revoked = first.iter().find(|c| c.op == "revoke").expect("revoked");
    let expires = start_at + S(30);
    assert!(
        revoked.at <= expires - MIN_REMAINING && revoked.at >= expires - MIN_REMAINING - S(3),
        "revoked {:?} before its expiry",
        expires - revoked.at
    );
    assert!(renewals.iter().all(|at| *at <= revoked.at));
    assert_eq!(vault.calls_of("creds").len(), 2, "replaced: {calls:?}");
}

#[tokio::test(start_paused = true)]
async fn the_stop_revokes_every_waiting_lease() {
    let vault = Arc::new(ScriptedVault::new(MAX_VAULT_DURATION));
    let run = start(&vault, "1h");
    tokio::time::sleep(S(1)).await;
    run.stop.cancel();
    run.task.await.expect("prefetch task");
    tokio::time::sleep(S(1)).await;
    let revoked = vault.calls_of("revoke");
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].lease_id, FIRST);
}

#[tokio::test(start_paused = true)]
async fn a_discarded_pool_is_revoked_and_filled_again() {
    let vault = Arc::new(ScriptedVault::new(S(300)));
    let run = start(&vault, "1h");
    tokio::time::sleep(S(1)).await;
    let db = &config("1h").reloadable.databases[0];
    assert_eq!(run.prefetcher.discard(db, "readonly"), 1);
    tokio::time::sleep(S(1)).await;
    let revoked = vault.calls_of("revoke");
    assert_eq!(revoked.len(), 1, "{:?}", vault.calls());
    assert_eq!(revoked[0].lease_id, FIRST);
    let taken = run.prefetcher.take(db, "readonly").expect("filled again");
    assert_eq!(taken.lease.id, SECOND);
    assert_eq!(run.prefetcher.discard(db, "other"), 0, "no such pool");
    run.stop.cancel();
    run.task.await.expect("prefetch task");
}
