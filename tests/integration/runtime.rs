//! The session threads: `[runtime] worker_threads` is how many there are, sessions opened at
//! once are spread over all of them, and each session keeps working on its own thread.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::harness::client::{current_user, pg_connect};
use crate::harness::fixture::Fixture;
use crate::harness::proxy::set;

/// The session threads of process `pid` (named `lg-shard-N`) and their context switches so
/// far (voluntary + involuntary: each wake-up of the thread counts).
fn session_threads(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task");
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let name = name.trim();
        // Not their blocking pools (`lg-shard-N-blocking`, cut to 15 bytes by the kernel).
        if !name.starts_with("lg-shard-") || name.contains("-b") {
            continue;
        }
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let switches: u64 = status
            .lines()
            .filter(|l| l.contains("ctxt_switches"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum();
        out.insert(name.to_owned(), switches);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_sets_the_session_threads_and_sessions_use_all_of_them() {
    let f = Fixture::start_edited(
        "runtime-threads",
        |mut cfg| {
            cfg.databases[0].connect_timeout = Some("30s".into());
            cfg
        },
        |t| set(t, "runtime.worker_threads", 3),
    )
    .await;
    let before = session_threads(f.proxy.pid());
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        ["lg-shard-0", "lg-shard-1", "lg-shard-2"],
        "three session threads"
    );

    // Six sessions open at once: the least-loaded placement gives each thread two.
    let mut sessions = Vec::new();
    for i in 0..6 {
        let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
            .await
            .unwrap_or_else(|e| panic!("session {i} connects: {e:?}"));
        sessions.push(s);
    }
    let prefix = &f.mount.prefix;
    let work = sessions.iter().map(|s| async move {
        for _ in 0..100 {
            assert!(current_user(s).await.starts_with(prefix.as_str()));
        }
    });
    tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(work),
    )
    .await
    .expect("600 queries within 60 s");
    let after = session_threads(f.proxy.pid());
    for (name, was) in &before {
        let now = after.get(name).copied().unwrap_or_default();
        // Two sessions x 100 round trips each wake their thread at least 200 times.
        assert!(
            now >= was + 100,
            "{name} relayed too little: {was} -> {now} context switches ({after:?})"
        );
    }
    drop(sessions);
    f.wait_all_revoked(Duration::from_secs(15)).await;
    f.assert_good_client_works().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_there_is_one_session_thread_per_core() {
    let f = Fixture::start("runtime-default").await;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = session_threads(f.proxy.pid());
    assert_eq!(threads.len(), cores, "session threads: {threads:?}");
    f.assert_good_client_works().await;
}
