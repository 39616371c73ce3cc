//! A rolling restart behind a real load balancer loses no connection: HAProxy
//! (deploy/haproxy/haproxy.cfg) in front of three replicas, `pgbench -C` (a new connection per
//! transaction, mutual TLS, verify-full) and 20 long-lived sessions through it, while the
//! replicas are restarted one after another (SIGTERM, exit, start, UP in HAProxy). Every
//! connection attempt and every transaction succeeds (`[listen] drain_delay` keeps a replica
//! accepting until HAProxy has taken it out); a long-lived session on a stopped replica ends
//! only with FATAL 57P01 at the end of `shutdown_grace`; afterwards no role and no lease is
//! left. HAProxy's own retries would hide a refused connection, so its log is read too: no
//! connection needed a retry (with `drain_delay = "0s"` about 3 % of them do).

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::client::tls_config;
use crate::harness::fixture::wait_all_revoked;
use crate::harness::fleet::{Fleet, FleetOptions, REPLICAS};
use crate::harness::pg::pg_bin;
use crate::harness::pki::{ClientCert, Pki};
use crate::harness::root;
use crate::harness::wire::{PROTOCOL_3_0, Wire, query_message, tls_connect};

/// libpq's environment for a connection through the load balancer on `port`.
pub fn libpq_env(port: u16, pki: &Pki, cert: &ClientCert) -> Vec<(String, String)> {
    let p = |x: &Path| x.display().to_string();
    vec![
        ("PGHOST".into(), "localhost".into()),
        ("PGHOSTADDR".into(), "127.0.0.1".into()),
        ("PGPORT".into(), port.to_string()),
        ("PGDATABASE".into(), "myapp".into()),
        ("PGUSER".into(), "readonly".into()),
        ("PGSSLMODE".into(), "verify-full".into()),
        ("PGSSLROOTCERT".into(), p(pki.ca_pem())),
        ("PGSSLCERT".into(), p(&cert.cert)),
        ("PGSSLKEY".into(), p(&cert.key)),
        ("PGCONNECT_TIMEOUT".into(), "10".into()),
    ]
}

/// How one long-lived session ended.
#[derive(Debug)]
enum End {
    /// FATAL 57P01 from leasegate, at this instant.
    AdminShutdown(Instant),
    /// Anything else: what happened.
    Failed(String),
}

/// One long-lived session through the load balancer on `port`: logs in, runs `select 1`
/// every 200 ms until `stop` or its end; a session ended by 57P01 logs in again.
async fn long_session(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    stop: Arc<AtomicBool>,
    ends: Arc<Mutex<Vec<End>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        let end = match tls_connect(port, config.clone()).await {
            Err(e) => End::Failed(format!("connect: {e}")),
            Ok(tls) => {
                let mut w = Wire::new(tls);
                let login = w
                    .startup(PROTOCOL_3_0, &[("user", "readonly"), ("database", "myapp")])
                    .await;
                match login {
                    Ok(l) if l.messages.last().map(|m| m.tag) == Some(b'Z') => {
                        match query_until_end(&mut w, &stop).await {
                            None => {
                                w.terminate().await;
                                return;
                            }
                            Some(end) => end,
                        }
                    }
                    Ok(l) => End::Failed(format!("login: {:?}", l.messages)),
                    Err(e) => End::Failed(format!("login: {e}")),
                }
            }
        };
        ends.lock().expect("ends").push(end);
    }
}

/// Queries until `stop` (`None`) or the session ends (how).
async fn query_until_end(
    w: &mut Wire<crate::harness::wire::Tls>,
    stop: &AtomicBool,
) -> Option<End> {
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = w.send(&query_message("select 1")).await {
            return Some(End::Failed(format!("send: {e}")));
        }
        match w.recv_until_ready(Duration::from_secs(30)).await {
            Err(e) => return Some(End::Failed(format!("closed without 57P01: {e}"))),
            Ok(msgs) => {
                if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
                    return Some(match e.sqlstate().as_deref() {
                        Some("57P01") => End::AdminShutdown(Instant::now()),
                        _ => End::Failed(format!("error: {e:?}")),
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// pgbench's summary: (transactions processed, failed transactions).
fn pgbench_counts(stdout: &str) -> (u64, u64) {
    let number = |prefix: &str| -> Option<u64> {
        let rest = stdout.lines().find_map(|l| l.trim().strip_prefix(prefix))?;
        let first = rest.split_whitespace().next()?;
        first.split('/').next()?.parse().ok()
    };
    let processed = number("number of transactions actually processed:")
        .unwrap_or_else(|| panic!("no processed count in:\n{stdout}"));
    let failed = number("number of failed transactions:").unwrap_or(0);
    (processed, failed)
}

fn duration_s(text: &str) -> f64 {
    text.trim_end_matches('s').parse().expect("seconds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_behind_haproxy_fails_no_connection_and_no_transaction() {
    const SESSIONS: usize = 20;
    const BENCH_SECONDS: u64 = 60;
    let mut fleet = Fleet::start("lb-rolling", FleetOptions::default()).await;
    let (drain, grace) = (
        duration_s(fleet.options.drain_delay),
        duration_s(fleet.options.shutdown_grace),
    );
    let dir = root().tempdir("pgbench-");
    let script = dir.path().join("select1.sql");
    std::fs::write(&script, "select 1;\n").expect("write pgbench script");
    let mut bench = tokio::process::Command::new(pg_bin("pgbench"));
    bench
        .args(["-n", "-C", "-c", "3", "-j", "3", "-R", "30", "-P", "5"])
        .arg("-T")
        .arg(BENCH_SECONDS.to_string())
        .arg("-f")
        .arg(&script)
        .envs(libpq_env(fleet.lb.port, &fleet.pki, &fleet.good))
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let bench = bench.spawn().expect("spawn pgbench");

    let stop = Arc::new(AtomicBool::new(false));
    let ends = Arc::new(Mutex::new(Vec::new()));
    let config = tls_config(&fleet.pki, Some(&fleet.good));
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|_| {
            let task = long_session(fleet.lb.port, config.clone(), stop.clone(), ends.clone());
            tokio::spawn(task)
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    let mut terms = Vec::new();
    for i in 0..REPLICAS {
        terms.push(fleet.restart(i).await);
    }
    let restarts = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for s in sessions {
        s.await.expect("long session task");
    }
    let out = tokio::time::timeout(
        Duration::from_secs(BENCH_SECONDS + 60),
        bench.wait_with_output(),
    )
    .await
    .expect("pgbench finishes")
    .expect("pgbench output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        restarts < Duration::from_secs(BENCH_SECONDS - 5),
        "the restarts ({restarts:?}) must happen while pgbench runs"
    );
    assert!(
        out.status.success(),
        "pgbench: a failed connection aborts a -C client ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let (processed, failed) = pgbench_counts(&stdout);
    let (retried, logged) = fleet.lb.retried_connections();

    let ends = std::mem::take(&mut *ends.lock().expect("ends"));
    let failures: Vec<&str> = ends
        .iter()
        .filter_map(|e| match e {
            End::Failed(what) => Some(what.as_str()),
            End::AdminShutdown(_) => None,
        })
        .collect();
    let ended: Vec<Instant> = ends
        .iter()
        .filter_map(|e| match e {
            End::AdminShutdown(at) => Some(*at),
            End::Failed(_) => None,
        })
        .collect();
    // Each 57P01 came at the end of a stopped replica's drain: drain_delay + shutdown_grace
    // after its SIGTERM (and within the few seconds ending a session takes).
    let expected = Duration::from_secs_f64(drain + grace);
    for at in &ended {
        let after = terms
            .iter()
            .filter(|t| *t < at)
            .map(|t| at.duration_since(*t))
            .min()
            .expect("a 57P01 after a SIGTERM");
        assert!(
            after + Duration::from_millis(300) >= expected
                && after <= expected + Duration::from_secs(6),
            "57P01 {after:?} after SIGTERM, want about drain_delay + shutdown_grace = {expected:?}"
        );
    }
    eprintln!(
        "rolling restart of {REPLICAS} replicas in {restarts:?}: pgbench -C attempted {} \
         connections, failed {}, transactions {processed} (failed {failed}); {SESSIONS} \
         long-lived sessions: {} ended by FATAL 57P01, {} otherwise; HAProxy retried \
         {retried} of {logged} connections",
        processed + failed,
        failed,
        ended.len(),
        failures.len()
    );
    // drain_delay kept every replica accepting until HAProxy had taken it out: no connection
    // needed HAProxy's retries (which a load balancer without them would not have).
    assert_eq!(
        retried,
        0,
        "connections refused by a draining replica:\n{}",
        fleet.lb.log_tail()
    );
    assert!(
        failures.is_empty(),
        "long-lived sessions failed: {failures:?}"
    );
    assert_eq!(failed, 0, "no failed transaction:\n{stdout}");
    assert!(processed > 0, "pgbench ran:\n{stdout}");
    assert!(
        !ended.is_empty(),
        "sessions on the stopped replicas ended with 57P01"
    );
    wait_all_revoked(&fleet.mount, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_drain_delay_readyz_is_503_and_new_sessions_are_still_served() {
    use crate::harness::fixture::Fixture;
    use crate::harness::proxy::set;
    const DELAY: Duration = Duration::from_secs(3);
    let mut f = Fixture::start_edited(
        "lb-drain-delay",
        |cfg| cfg,
        |t| {
            set(t, "listen.drain_delay", "3s");
            set(t, "listen.shutdown_grace", "1s");
        },
    )
    .await;
    assert!(matches!(f.proxy.get("/readyz").await, Ok((200, _))));
    let term = Instant::now();
    f.proxy.signal("TERM");
    let proxy = &f.proxy;
    crate::harness::poll_until(
        Duration::from_secs(1),
        "/readyz 503 after SIGTERM",
        || async move {
            match proxy.get("/readyz").await {
                Ok((503, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let mut w = f.raw_session("readonly").await;
    assert_eq!(w.query_column("select 1").await, vec![Some("1".into())]);
    assert!(term.elapsed() < DELAY, "served within the delay");
    let port = f.proxy.port;
    crate::harness::poll_until(DELAY * 2, "the listener closed", || async move {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Err(_) => Ok(()),
            Ok(_) => Err("still accepting".into()),
        }
    })
    .await;
    let closed = term.elapsed();
    assert!(
        closed + Duration::from_millis(200) >= DELAY,
        "accepting until the delay ended: {closed:?}"
    );
    let status = f.proxy.wait_exit(Duration::from_secs(20)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    drop(w);
    eprintln!(
        "drain_delay 3s: /readyz 503 at once, a session served, listener closed after {closed:?}"
    );
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
