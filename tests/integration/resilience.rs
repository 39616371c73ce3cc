//! leasegate under churn and when its neighbours fail: many short sessions leave nothing
//! behind, a PostgreSQL restart ends sessions and their leases are still revoked, an OpenBao
//! outage leaves open sessions alone and the revoker catches up once OpenBao is back, and a
//! client that vanished without a FIN is detected by TCP keepalive.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::harness::bao::{OwnBao, Target};
use crate::harness::client::{Transport, current_user, pg_connect, raw_startup, tls_config};
use crate::harness::fixture::{Fixture, wait_all_revoked_on};
use crate::harness::metrics::value_or_zero;
use crate::harness::pg::{Cluster, dynamic_roles_on};
use crate::harness::pki::Pki;
use crate::harness::proxy::{Proxy, set};
use crate::harness::{dynamic_roles, env, poll_until};

/// Polls until leasegate's gauges say nothing is issued or pending.
async fn wait_gauges_zero(proxy: &Proxy, within: Duration) {
    poll_until(
        within,
        "leases_active and revocations_pending 0",
        || async move {
            let m = proxy.metrics().await;
            let active = value_or_zero(&m, "leasegate_leases_active", &[]);
            let pending = value_or_zero(&m, "leasegate_revocations_pending", &[]);
            if active == 0.0 && pending == 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "leases_active {active}, revocations_pending {pending}"
                ))
            }
        },
    )
    .await;
}

/// Revoke requests by status, for the log.
async fn revoke_attempts(proxy: &Proxy) -> String {
    let m = proxy.metrics().await;
    let by = |status: &str| {
        value_or_zero(
            &m,
            "leasegate_vault_requests_total",
            &[("op", "revoke"), ("status", status)],
        )
    };
    format!(
        "revoke requests: 2xx {}, 4xx {}, 5xx {}, unreachable {}, timeout {}",
        by("2xx"),
        by("4xx"),
        by("5xx"),
        by("unreachable"),
        by("timeout")
    )
}

const WAVES: usize = 8;
const PER_WAVE: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sessions_in_waves_leave_nothing_behind() {
    let f = Fixture::start_with("waves", |mut cfg| {
        // Two cores shared with other tests: correctness, not login latency.
        cfg.databases[0].connect_timeout = Some("30s".into());
        cfg
    })
    .await;
    let started = Instant::now();
    let mut users = BTreeSet::new();
    for wave in 0..WAVES {
        let mut tasks = JoinSet::new();
        for i in 0..PER_WAVE {
            let (port, pki, cert) = (f.proxy.port, f.pki.clone(), f.good.clone());
            tasks.spawn(async move {
                let s = pg_connect(port, &pki, Some(&cert), "readonly", "myapp")
                    .await
                    .unwrap_or_else(|e| panic!("wave {wave} session {i}: {e:?}"));
                let user = current_user(&s).await;
                drop(s.client);
                let _ = s.driver.await;
                user
            });
        }
        let wave_done = async {
            while let Some(user) = tasks.join_next().await {
                users.insert(user.expect("session task"));
            }
        };
        tokio::time::timeout(Duration::from_secs(90), wave_done)
            .await
            .unwrap_or_else(|_| panic!("wave {wave} done within 90 s"));
    }
    let total = WAVES * PER_WAVE;
    eprintln!("waves: {total} sessions in {:?}", started.elapsed());
    assert_eq!(users.len(), total, "every session had its own role");

    f.wait_all_revoked(Duration::from_secs(60)).await;
    wait_gauges_zero(&f.proxy, Duration::from_secs(10)).await;
    // Sessions are counted when their task ends, which may be just after the revocation.
    let proxy = &f.proxy;
    poll_until(Duration::from_secs(10), "final counters", || async move {
        let m = proxy.metrics().await;
        let counters = [
            value_or_zero(&m, "leasegate_sessions_total", &[("outcome", "ok")]),
            value_or_zero(&m, "leasegate_leases_issued_total", &[]),
            value_or_zero(&m, "leasegate_lease_revocations_total", &[("result", "ok")]),
            value_or_zero(&m, "leasegate_sessions_active", &[]),
        ];
        let n = total as f64;
        if counters == [n, n, n, 0.0] {
            Ok(())
        } else {
            Err(format!(
                "sessions ok, leases issued, revocations ok, sessions active: {counters:?}"
            ))
        }
    })
    .await;
    eprintln!("waves: all revoked after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_ends_the_session_and_its_lease_is_still_revoked() {
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("cluster task")
        .unwrap_or_else(|e| panic!("dedicated cluster: {e}"));
    let pg = cluster.pg.clone();
    let bao = Target::shared();
    let mount = bao.fresh_mount(&pg, "pg-restart").await;
    let f = Fixture::with_mount(
        mount,
        Pki::new(),
        |mut cfg| {
            cfg.databases[0].port = pg.port;
            cfg
        },
        |_| {},
    )
    .await;

    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("session before the restart");
    let user = current_user(&s).await;
    assert_eq!(dynamic_roles_on(&pg, &f.mount.prefix).await, vec![user]);

    let restart = Instant::now();
    let mut cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        cluster.restart_fast().map(|()| cluster)
    })
    .await
    .expect("restart task")
    .unwrap_or_else(|e| panic!("restart: {e}"));
    let restarted = restart.elapsed();

    let err = s
        .client
        .query_one("select 1", &[])
        .await
        .expect_err("the session died with the server");
    eprintln!("pg-restart: restart took {restarted:?}; client error: {err:?}");
    assert!(s.client.is_closed(), "the client's connection is closed");
    if let Some(db) = err.as_db_error() {
        assert_eq!(db.code().code(), "57P01", "relayed shutdown error: {db:?}");
    }

    wait_all_revoked_on(&bao, &pg, &f.mount, Duration::from_secs(40)).await;
    eprintln!(
        "pg-restart: lease revoked and role gone {:?} after the restart began",
        restart.elapsed()
    );
    wait_gauges_zero(&f.proxy, Duration::from_secs(5)).await;
    eprintln!("pg-restart: {}", revoke_attempts(&f.proxy).await);

    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("new session after the restart");
    let user = current_user(&s).await;
    assert!(user.starts_with(&f.mount.prefix));
    drop(s.client);
    let _ = s.driver.await;
    wait_all_revoked_on(&bao, &pg, &f.mount, Duration::from_secs(10)).await;
    drop(f);
    tokio::task::spawn_blocking(move || cluster.stop_fast(Duration::from_secs(10)))
        .await
        .expect("stop task")
        .expect("stop the dedicated cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_outage_spares_open_sessions_and_revocation_catches_up() {
    let mut own = OwnBao::persistent().await;
    let pg = &env().pg;
    let mount = own.target.fresh_mount(pg, "bao-down").await;
    let f = Fixture::on_own_bao(&own.target, mount, "2s", |_| {}).await;
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("session while OpenBao is up");
    let user = current_user(&s).await;
    assert_eq!(own.target.leases(&f.mount, "readonly").await.len(), 1);

    own.kill();
    // The open session does not need Vault.
    for _ in 0..5 {
        assert_eq!(current_user(&s).await, user);
    }
    // A new one cannot get a credential: 08006, promptly.
    let asked = Instant::now();
    let answer = raw_startup(
        f.proxy.port,
        Transport::Tls(tls_config(&f.pki, Some(&f.good))),
        "readonly",
        "myapp",
    )
    .await;
    let message = answer.expect_error("08006");
    assert!(
        message.starts_with("could not obtain credentials"),
        "{message:?}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "08006 took {:?}",
        asked.elapsed()
    );

    // Close while OpenBao is down: the revoker retries.
    let closed = Instant::now();
    drop(s.client);
    let _ = s.driver.await;
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(10),
        "revocation retried while OpenBao is down",
        || async move {
            let m = proxy.metrics().await;
            let failed = value_or_zero(
                &m,
                "leasegate_vault_requests_total",
                &[("op", "revoke"), ("status", "unreachable")],
            );
            if failed >= 2.0 {
                Ok(())
            } else {
                Err(format!("unreachable revoke attempts {failed}"))
            }
        },
    )
    .await;
    assert_eq!(
        dynamic_roles(&f.mount.prefix).await,
        vec![user],
        "the role lives on while OpenBao is down"
    );

    own.restart().await;
    let back = closed.elapsed();
    wait_all_revoked_on(&own.target, pg, &f.mount, Duration::from_secs(40)).await;
    eprintln!(
        "bao-down: OpenBao back {back:?} after the close; lease revoked and role gone {:?} \
         after the close",
        closed.elapsed()
    );
    wait_gauges_zero(&f.proxy, Duration::from_secs(5)).await;
    eprintln!("bao-down: {}", revoke_attempts(&f.proxy).await);
    let m = f.proxy.metrics().await;
    assert_eq!(
        value_or_zero(&m, "leasegate_lease_revocations_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(
        value_or_zero(
            &m,
            "leasegate_lease_revocations_total",
            &[("result", "error")]
        ),
        0.0
    );
}

unsafe extern "C" {
    fn setsockopt(fd: i32, level: i32, name: i32, value: *const u8, len: u32) -> i32;
    fn getsockopt(fd: i32, level: i32, name: i32, value: *mut u8, len: *mut u32) -> i32;
}
const IPPROTO_TCP: i32 = 6;
const TCP_INFO: i32 = 11;
const TCP_REPAIR: i32 = 19;

/// Segments this socket sent that the peer has not acknowledged (`tcpi_unacked`).
fn unacked(fd: RawFd) -> std::io::Result<u32> {
    let mut info = [0u8; 104];
    let mut len = info.len() as u32;
    // SAFETY: valid fd, buffer and length describe `info`.
    let rc = unsafe { getsockopt(fd, IPPROTO_TCP, TCP_INFO, info.as_mut_ptr(), &mut len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // struct tcp_info: 8 bytes of u8 fields, then u32 rto, ato, snd_mss, rcv_mss, unacked.
    Ok(u32::from_ne_bytes([info[24], info[25], info[26], info[27]]))
}

/// Closes a connected socket without a FIN or RST (TCP_REPAIR mode, needs CAP_NET_ADMIN):
/// to the peer the connection looks open, but this host no longer knows it; the next
/// segment the peer sends is answered with RST.
fn vanish(fd: RawFd) -> std::io::Result<()> {
    let on = 1i32.to_ne_bytes();
    // SAFETY: valid fd, pointer to a live i32 and its size.
    let rc = unsafe { setsockopt(fd, IPPROTO_TCP, TCP_REPAIR, on.as_ptr(), 4) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_client_is_detected_by_keepalive_and_its_lease_revoked() {
    let f = Fixture::start_edited(
        "half-open",
        |cfg| cfg,
        |t| set(t, "listen.tcp_keepalive", "2s"),
    )
    .await;
    let mut w = f.raw_session("readonly").await;
    w.query_column("select 1").await;
    assert_eq!(dynamic_roles(&f.mount.prefix).await.len(), 1);

    // Leave nothing in flight, or a retransmission (not keepalive) would meet the RST: a
    // Flush (no answer when nothing is pending) acknowledges everything received, then
    // wait until leasegate acknowledged the Flush.
    w.send(&[b'H', 0, 0, 0, 4]).await.expect("send Flush");
    let fd = w.stream.get_ref().0.as_raw_fd();
    poll_until(
        Duration::from_secs(5),
        "client socket has nothing unacknowledged",
        || async move {
            match unacked(fd) {
                Ok(0) => Ok(()),
                other => Err(format!("unacked {other:?}")),
            }
        },
    )
    .await;
    if let Err(e) = vanish(fd) {
        eprintln!("SKIPPED: TCP_REPAIR unavailable ({e}); cannot make a half-open connection");
        return;
    }
    let gone = Instant::now();
    drop(w);
    // Idle 2 s, then leasegate's keepalive probe meets the RST.
    f.wait_all_revoked(Duration::from_secs(15)).await;
    let detected = gone.elapsed();
    eprintln!("half-open: lease revoked {detected:?} after the client vanished");
    assert!(
        detected >= Duration::from_millis(1500),
        "detected after {detected:?}: before the 2 s keepalive idle time, so not by keepalive"
    );
}
