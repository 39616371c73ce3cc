//! Hostile input after authentication, in the relay, against the real binary and the real
//! PostgreSQL: message lengths below 4, of 2^31-1 and 1 GiB announced and never sent, a body
//! cut off by the client's close, by a TLS close_notify or by a raw TLS alert, garbage after
//! Terminate, a flood of TLS KeyUpdate requests, CopyData/CopyDone/CopyFail outside COPY,
//! 100,000 Syncs in one write, a client that pipelines large results and never reads them
//! (leasegate's memory stays flat: the relay writes before it reads again), and one that
//! pipelines thousands of short statements and vanishes (a few cancels, not one per
//! statement). In each case the client gets PostgreSQL's own
//! answer (an ErrorResponse where PostgreSQL sends one), the backend is gone by PID, the
//! lease is revoked and the role dropped, and the proxy serves another client meanwhile.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::fixture::Fixture;
use crate::harness::pg::dynamic_roles;
use crate::harness::wire::{Msg, Tls, Wire, query_message};
use crate::harness::{env, poll_until};

/// The backend PID of a session, asked through leasegate.
async fn backend_pid(w: &mut Wire<Tls>) -> i32 {
    let row = w.query_column("select pg_backend_pid()::text").await;
    row.first()
        .cloned()
        .flatten()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("pid: {row:?}"))
}

/// Polls until no backend with `pid` exists (10 s).
async fn wait_backend_gone(pid: i32) {
    poll_until(
        Duration::from_secs(10),
        &format!("backend {pid} gone"),
        || async move {
            let su = env().pg.superuser().await;
            let n: i64 = su
                .query_one(
                    "select count(*) from pg_stat_activity where pid = $1",
                    &[&pid],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            if n == 0 {
                Ok(())
            } else {
                Err("still there".into())
            }
        },
    )
    .await;
}

/// Every message until leasegate closes the connection (at most `within`); `Err` with what
/// came when it is still open.
async fn until_closed(w: &mut Wire<Tls>, within: Duration) -> Result<Vec<Msg>, Vec<Msg>> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match w.recv_within(left).await {
            Ok(Some(m)) => seen.push(m),
            Ok(None) => return Err(seen),
            Err(_) => return Ok(seen),
        }
    }
}

/// After a hostile session: its backend is gone, its lease revoked, its role dropped, and a
/// second session (opened while the hostile one was live) still answers.
async fn after(f: &Fixture, what: &str, pid: i32, other: &mut Wire<Tls>) {
    wait_backend_gone(pid).await;
    let one = other.query_column("select 1::text").await;
    assert_eq!(
        one,
        vec![Some("1".into())],
        "{what}: the other session still works"
    );
    let (mount, other_user) = (
        &f.mount,
        other.query_column("select current_user::text").await,
    );
    let other_user = other_user[0].clone().expect("user");
    poll_until(
        Duration::from_secs(10),
        &format!("{what}: role dropped"),
        || {
            let other_user = other_user.clone();
            async move {
                let roles = dynamic_roles(&mount.prefix).await;
                let leases = crate::harness::bao::all_leases(mount).await;
                if roles == [other_user] && leases.len() == 1 {
                    Ok(())
                } else {
                    Err(format!("roles {roles:?}, leases {leases:?}"))
                }
            }
        },
    )
    .await;
}

/// A header announcing a body of `len - 4` bytes.
fn header(tag: u8, len: u32) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&len.to_be_bytes());
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lengths_and_cut_messages_end_the_session_and_revoke() {
    let f = Fixture::start("sec-hostile-lengths").await;
    let mut other = f.raw_session("readonly").await;
    // (what, bytes sent, how the client goes away, the SQLSTATE PostgreSQL answers with).
    let cases: Vec<(&str, Vec<u8>, &str, Option<&str>)> = vec![
        ("length 2", header(b'Q', 2), "wait", None),
        ("length 0", header(b'Q', 0), "wait", None),
        (
            "unknown type, length 2^31-1",
            header(b'z', 0x7fff_ffff),
            "wait",
            Some("08P01"),
        ),
        (
            "Query of 2^31-1 bytes",
            header(b'Q', 0x7fff_ffff),
            "wait",
            None,
        ),
        ("Query of 1 GiB", header(b'Q', 1 << 30), "wait", None),
        (
            "Query of 1 MiB cut off, client gone",
            [header(b'Q', 1 << 20), b"select".to_vec()].concat(),
            "drop",
            None,
        ),
        (
            "Query cut off by close_notify",
            [header(b'Q', 100), b"select".to_vec()].concat(),
            "close_notify",
            None,
        ),
        (
            "Query cut off by a raw TLS alert",
            [header(b'Q', 100), b"select".to_vec()].concat(),
            "alert",
            None,
        ),
        (
            "a flood of TLS KeyUpdate requests",
            Vec::new(),
            "keyupdate",
            None,
        ),
        (
            "garbage after Terminate",
            [&b"X\0\0\0\x04"[..], &[0xde, 0xad, 0xbe, 0xef, 0, 1, 2][..]].concat(),
            "wait",
            None,
        ),
    ];
    for (what, bytes, how, code) in cases {
        let mut w = f.raw_session("readonly").await;
        let pid = backend_pid(&mut w).await;
        w.send(&bytes).await.expect("send");
        let started = Instant::now();
        match how {
            "drop" => drop(w),
            "close_notify" => {
                w.stream.shutdown().await.expect("close_notify");
                let seen = until_closed(&mut w, Duration::from_secs(10)).await;
                eprintln!("{what}: {seen:?}");
                assert!(seen.is_ok(), "{what}: closed");
            }
            "keyupdate" => {
                for _ in 0..1_000 {
                    w.stream
                        .get_mut()
                        .1
                        .refresh_traffic_keys()
                        .expect("KeyUpdate");
                    if w.stream.flush().await.is_err() {
                        break;
                    }
                }
                let seen = until_closed(&mut w, Duration::from_secs(10)).await;
                eprintln!("{what}: {seen:?}");
                assert!(seen.is_ok(), "{what}: closed");
            }
            "alert" => {
                // A plaintext fatal alert (decrypt_error) on the raw socket, under TLS.
                let tcp = w.stream.get_mut().0;
                tcp.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x33])
                    .await
                    .expect("alert");
                let seen = until_closed(&mut w, Duration::from_secs(10)).await;
                eprintln!("{what}: {seen:?}");
                assert!(seen.is_ok(), "{what}: closed");
            }
            _ => {
                let seen = until_closed(&mut w, Duration::from_secs(10)).await;
                eprintln!("{what}: {seen:?} after {:?}", started.elapsed());
                let seen = seen.unwrap_or_else(|s| panic!("{what}: still open after 10 s: {s:?}"));
                let got = seen.iter().find_map(Msg::sqlstate);
                assert_eq!(got.as_deref(), code, "{what}: {seen:?}");
            }
        }
        after(&f, what, pid, &mut other).await;
        eprintln!(
            "{what}: backend gone, role dropped {:?} after",
            started.elapsed()
        );
    }
    other.terminate().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    f.assert_good_client_works().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_messages_outside_copy_and_a_sync_flood_leave_the_session_usable() {
    let f = Fixture::start("sec-hostile-flood").await;
    let mut w = f.raw_session("readonly").await;
    // CopyData, CopyDone and CopyFail outside COPY: PostgreSQL ignores them.
    let mut stray = b"d\0\0\0\x08junkc\0\0\0\x04f\0\0\0\x09oops\0".to_vec();
    stray.extend_from_slice(&query_message("select 'after stray copy messages'"));
    w.send(&stray).await.expect("send");
    let msgs = w
        .recv_until_ready(Duration::from_secs(10))
        .await
        .expect("answer");
    eprintln!("stray copy messages: {msgs:?}");
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    assert!(msgs.iter().any(|m| m.data_row().is_some()), "{msgs:?}");

    // 100,000 Syncs in one write: 100,000 ReadyForQuery.
    const SYNCS: usize = 100_000;
    let flood = b"S\0\0\0\x04".repeat(SYNCS);
    let started = Instant::now();
    let (mut r, mut wr) = tokio::io::split(w.stream);
    let writer = tokio::spawn(async move {
        wr.write_all(&flood).await.expect("send the flood");
        wr.flush().await.expect("flush");
        wr
    });
    // Each answer is `Z`, length 5, status `I`.
    let mut answers = vec![0u8; 6 * SYNCS];
    tokio::time::timeout(Duration::from_secs(60), r.read_exact(&mut answers))
        .await
        .expect("every ReadyForQuery within 60 s")
        .expect("read the answers");
    assert!(
        answers.chunks(6).all(|z| z == b"Z\0\0\0\x05I"),
        "only ReadyForQuery (idle) comes back"
    );
    let wr = writer.await.expect("writer");
    eprintln!("{SYNCS} Syncs answered in {:?}", started.elapsed());
    let mut w = Wire::new(r.unsplit(wr));
    assert_eq!(
        w.query_column("select 'still here'").await,
        vec![Some("still here".into())]
    );
    w.terminate().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    f.assert_good_client_works().await;
}

/// leasegate's resident memory now, in KiB (`VmRSS` of /proc/<pid>/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_gets_backpressure_not_buffering() {
    let f = Fixture::start("sec-hostile-slowreader").await;
    let pid = f.proxy.pid();
    let mut other = f.raw_session("readonly").await;
    let mut w = f.raw_session("readonly").await;
    let backend = backend_pid(&mut w).await;
    let before = rss_kib(pid);
    // Each query (64 KiB long, with its comment) returns 64 MiB; the client sends them for as
    // long as leasegate reads them and never reads a byte of the answers.
    let padding = "-".repeat(64 << 10);
    let query = query_message(&format!(
        "select repeat('x', 1048576) from generate_series(1, 64) --{padding}\n"
    ));
    let (r, mut wr) = tokio::io::split(w.stream);
    let writer = tokio::spawn(async move {
        let (mut sent, mut blocked) = (0usize, false);
        let started = Instant::now();
        while !blocked && started.elapsed() < Duration::from_secs(8) {
            match tokio::time::timeout(Duration::from_secs(2), wr.write_all(&query)).await {
                Ok(Ok(())) => sent += 1,
                Ok(Err(e)) => panic!("write failed after {sent} queries: {e}"),
                Err(_) => blocked = true,
            }
        }
        (sent, blocked, started.elapsed(), wr)
    });
    let mut peak = before;
    let sampling = Instant::now();
    while sampling.elapsed() < Duration::from_secs(6) {
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (sent, blocked, writing, wr) = writer.await.expect("writer");
    let after_rss = rss_kib(pid);
    eprintln!(
        "leasegate VmRSS {before} KiB before, peak {peak} KiB, {after_rss} KiB after; \
         the client got {sent} queries of 64 KiB in before its writes blocked for 2 s \
         ({writing:?} after it began)"
    );
    assert!(
        blocked && sent < 1_000,
        "the client's writes must block once the upstream stops reading ({sent} queries)"
    );
    assert!(
        peak < before + 32 * 1024,
        "leasegate buffered {} KiB for a client that does not read",
        peak - before
    );
    // Meanwhile another session is served.
    assert_eq!(
        other.query_column("select 2::text").await,
        vec![Some("2".into())]
    );
    // The client vanishes without reading: the backend, its lease and its role go.
    drop(r.unsplit(wr));
    after(&f, "slow reader", backend, &mut other).await;
    other.terminate().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

/// A TCP forwarder in front of PostgreSQL that counts the connections leasegate opens to it
/// (logins and cancels alike): how many cancels a close sends is seen where they arrive.
struct CountingForwarder {
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingForwarder {
    async fn start(to: u16) -> CountingForwarder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        CountingForwarder {
            port,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CountingForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Before the fix a client that pipelined thousands of short statements and vanished had
/// leasegate send one cancel per ReadyForQuery for the whole close wait: about 1,300 cancel
/// connections (each a process forked by the postmaster) in 3 s. The close now spaces its
/// cancels by at least 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_pipeline_of_short_statements_costs_few_cancels() {
    let forwarder = CountingForwarder::start(env().pg.port).await;
    let port = forwarder.port;
    let f = Fixture::start_with("sec-hostile-cancels", move |mut cfg| {
        cfg.databases[0].port = port;
        cfg
    })
    .await;
    let mut other = f.raw_session("readonly").await;
    let mut w = f.raw_session("readonly").await;
    let backend = backend_pid(&mut w).await;
    w.send(&query_message("select pg_sleep(0.05)").repeat(5_000))
        .await
        .expect("send the pipeline");
    let prefix = &f.mount.prefix;
    poll_until(
        Duration::from_secs(10),
        "the pipeline running",
        || async move {
            match crate::harness::pg::active_queries(prefix, "pg_sleep").await {
                1 => Ok(()),
                n => Err(format!("{n} running")),
            }
        },
    )
    .await;
    let before = forwarder.accepted();
    let vanished = Instant::now();
    drop(w);
    after(&f, "vanished pipeline", backend, &mut other).await;
    let cancels = forwarder.accepted() - before;
    eprintln!(
        "backend gone, role dropped {:?} after the client vanished; {cancels} cancels sent",
        vanished.elapsed()
    );
    // The close waits at most 3 s (plus the first cancel's 2 s): one cancel per 100 ms.
    assert!(
        cancels <= 50,
        "{cancels} cancel connections for one session's close"
    );
    assert!(cancels >= 1, "the busy backend was cancelled");
    other.terminate().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}
