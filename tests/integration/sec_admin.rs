//! The admin HTTP server (no authentication) under a flood of idle connections: leasegate
//! serves at most 64 at once and leaves the rest in the kernel's accept queue, so its open file
//! descriptors stay bounded whatever the flood; an idle connection is closed after the header
//! read timeout (5 s), so it cannot hold a slot for ever; once the flood is gone `/metrics`
//! answers again.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::harness::fixture::Fixture;
use crate::harness::poll_until;

/// leasegate's admin connection cap (src/admin.rs `MAX_CONNECTIONS`).
const CAP: usize = 64;
/// Idle connections the test opens.
const FLOOD: usize = 300;
/// File descriptors leasegate may open beyond the cap meanwhile (Vault pool, timers, ...).
const SLACK: usize = 16;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_are_capped_and_time_out() {
    let f = Fixture::start("sec-admin").await;
    let pid = f.proxy.pid();
    let baseline = open_fds(pid);
    assert!(baseline > 0, "cannot read /proc/{pid}/fd");

    // Idle connections: connect, send nothing; each task notes when the server closes it.
    // They connect all at once: past the cap and the accept queue (128) the kernel drops
    // SYNs and the clients retry, as a flood's would.
    let closed = Arc::new(AtomicUsize::new(0));
    let mut idle = JoinSet::new();
    let port = f.proxy.metrics_port;
    for _ in 0..FLOOD {
        let closed = closed.clone();
        idle.spawn(async move {
            let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)).await else {
                return;
            };
            let mut byte = [0u8; 1];
            if matches!(tcp.read(&mut byte).await, Ok(0) | Err(_)) {
                closed.fetch_add(1, Ordering::SeqCst);
            }
        });
    }

    // leasegate accepts up to the cap, and not beyond.
    let bound = baseline + CAP + SLACK;
    let most = Arc::new(AtomicUsize::new(0));
    let (seen, c) = (most.clone(), closed.clone());
    poll_until(
        Duration::from_secs(10),
        "the admin server at its cap",
        || {
            let (seen, c) = (seen.clone(), c.clone());
            async move {
                let n = open_fds(pid);
                seen.fetch_max(n, Ordering::SeqCst);
                if n >= baseline + CAP || c.load(Ordering::SeqCst) > 0 {
                    Ok(())
                } else {
                    Err(format!("{n} open fds, baseline {baseline}"))
                }
            }
        },
    )
    .await;

    // Idle connections are closed after the header read timeout, freeing slots for the
    // ones waiting in the accept queue; the fd count stays bounded all along.
    let (seen, c) = (most.clone(), closed.clone());
    poll_until(
        Duration::from_secs(30),
        "two rounds of idle admin connections timed out",
        || {
            let (seen, c) = (seen.clone(), c.clone());
            async move {
                seen.fetch_max(open_fds(pid), Ordering::SeqCst);
                match c.load(Ordering::SeqCst) {
                    n if n >= 2 * CAP => Ok(()),
                    n => Err(format!("{n} closed by leasegate")),
                }
            }
        },
    )
    .await;
    let peak = most.load(Ordering::SeqCst);
    assert!(
        peak <= bound,
        "{FLOOD} idle admin connections: leasegate held {peak} fds (baseline {baseline}, \
         cap {CAP}, allowed up to {bound})"
    );

    // The flood goes away: /metrics answers again and the fds are given back.
    idle.abort_all();
    while idle.join_next().await.is_some() {}
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(30),
        "/metrics after the flood",
        || async move {
            match proxy.get("/metrics").await {
                Ok((200, body)) if body.contains("leasegate_sessions_active") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    poll_until(
        Duration::from_secs(30),
        "fds back near the baseline",
        || async move {
            match open_fds(pid) {
                n if n <= baseline + SLACK => Ok(()),
                n => Err(format!("{n} open fds, baseline {baseline}")),
            }
        },
    )
    .await;
    f.assert_good_client_works().await;
}
