//! leasegate's own process under faults an operator causes: SIGTERM while a session is in
//! setup, waiting for OpenBao (slowed down by a forwarding stand-in) or for an upstream that
//! accepted the connection and never answers the login (a stand-in too, as PostgreSQL cannot
//! be made to stall on demand); after the exit no lease is left in OpenBao and no role in
//! PostgreSQL. An upstream that never answers the login, the audit log file removed or
//! rotated away while leasegate runs, a SIGHUP with a broken configuration file, and an
//! open-file limit too low for the configured connections.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::harness::bao::{Mount, Target, fresh_mount};
use crate::harness::client::{
    PgSession, Raw, Transport, current_user, pg_connect, raw_startup, tls_config,
};
use crate::harness::fake_vault::{FakeVault, Reply, Request};
use crate::harness::fixture::{Fixture, GOOD_URI, wait_all_revoked};
use crate::harness::metrics::value_or_zero;
use crate::harness::ops::{config_path, reload, write_config_text};
use crate::harness::pg::{backend_titles, dynamic_roles};
use crate::harness::pki::{ClientCert, Identity, Pki};
use crate::harness::proxy::{ProcessOptions, Proxy, ProxyConfig, set};
use crate::harness::security::assert_fatal;
use crate::harness::{env, poll_until};

/// A stand-in upstream that accepts connections, reads what they send and never answers;
/// returns its port and how many bytes it has read.
async fn silent_upstream() -> (u16, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind silent upstream");
    let port = listener.local_addr().expect("address").port();
    let read = Arc::new(Mutex::new(0usize));
    let counted = read.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = sock.read(&mut buf).await {
                    *counted.lock().expect("count") += n;
                }
                drop::<TcpStream>(sock);
            });
        }
    });
    (port, read)
}

/// Starts the good client's session in the background.
fn start_client(f: &Fixture) -> tokio::task::JoinHandle<Raw> {
    let (port, config) = (f.proxy.port, tls_config(&f.pki, Some(&f.good)));
    tokio::spawn(
        async move { raw_startup(port, Transport::Tls(config), "readonly", "myapp").await },
    )
}

/// SIGTERM, the client's 57P01, exit 0, and then nothing left in OpenBao or PostgreSQL.
async fn terminate_and_check(f: &mut Fixture, client: tokio::task::JoinHandle<Raw>) {
    f.proxy.signal("TERM");
    let answer = client.await.expect("client task");
    assert_fatal(&answer, "57P01", &["terminating connection"]);
    let status = f
        .proxy
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("leasegate exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    // leasegate is gone: whatever it was issued must already be revoked.
    f.assert_nothing_outstanding().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_upstream_login_hangs_revokes_the_lease_before_exit() {
    let (port, read) = silent_upstream().await;
    let mut f = Fixture::start_edited(
        "sigterm-mid-login",
        |mut cfg| {
            cfg.databases[0].port = port;
            cfg.databases[0].connect_timeout = Some("60s".into());
            cfg
        },
        |t| set(t, "listen.shutdown_grace", "1s"),
    )
    .await;
    let client = start_client(&f);
    // The credential is issued and the startup packet sent: the login waits on the upstream.
    let prefix = f.mount.prefix.clone();
    poll_until(
        Duration::from_secs(10),
        "startup packet at the silent upstream",
        || {
            let (read, prefix) = (read.clone(), prefix.clone());
            async move {
                let n = *read.lock().expect("count");
                let roles = dynamic_roles(&prefix).await;
                if n > 0 && roles.len() == 1 {
                    Ok(())
                } else {
                    Err(format!("{n} bytes read, roles {roles:?}"))
                }
            }
        },
    )
    .await;
    terminate_and_check(&mut f, client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_openbao_creates_the_role_revokes_it_before_exit() {
    let bao = Target::shared();
    let fake = FakeVault::start(move |req: Request| {
        let bao = bao.clone();
        async move {
            if req.path.contains("/creds/") {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            forward(&bao, &req).await
        }
    })
    .await;
    let address = fake.addr();
    let mut f = Fixture::start_edited(
        "sigterm-mid-creds",
        |mut cfg| {
            cfg.vault_address = address;
            cfg
        },
        |t| set(t, "listen.shutdown_grace", "200ms"),
    )
    .await;
    let client = start_client(&f);
    fake.wait_request(
        "GET",
        &format!("/v1/{}/creds/readonly", f.mount.name),
        Duration::from_secs(10),
    )
    .await;
    terminate_and_check(&mut f, client).await;
    assert!(
        backend_titles(&env().pg, &f.mount.prefix).is_empty(),
        "no backend of the mount's roles is left"
    );
}

/// Forwards `req` to the shared OpenBao, as it came.
async fn forward(bao: &Target, req: &Request) -> Reply {
    let method = Method::from_bytes(req.method.as_bytes()).expect("method");
    let mut out = reqwest::Client::new().request(method, format!("{}{}", bao.addr, req.path));
    for name in ["x-vault-token", "x-vault-request", "content-type"] {
        if let Some(v) = req.header(name) {
            out = out.header(name, v);
        }
    }
    let resp = out.body(req.body.clone()).send().await.expect("forward");
    let status = resp.status().as_u16();
    Reply::Json(status, resp.text().await.unwrap_or_default())
}

/// The audit lines of `path` (none when the file is missing).
fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
        .collect()
}

/// Polls until `path` holds `n` `session_end` lines.
async fn wait_session_ends(path: &std::path::Path, n: usize) {
    poll_until(
        Duration::from_secs(10),
        &format!("{n} session_end lines in {}", path.display()),
        || async move {
            let ends = audit_lines(path)
                .iter()
                .filter(|l| l["event"] == "session_end")
                .count();
            if ends == n {
                Ok(())
            } else {
                Err(format!("{ends} session_end lines"))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_removed_or_rotated_away_is_created_anew_at_its_path() {
    use std::os::unix::fs::PermissionsExt;
    let dir = crate::harness::root().tempdir("audit-");
    let path = dir.path().join("audit.log");
    let configured = path.display().to_string();
    let f = Fixture::start_edited(
        "audit-removed",
        |cfg| cfg,
        |t| set(t, "audit.path", configured),
    )
    .await;
    let open = f.raw_session("readonly").await;
    f.assert_good_client_works().await;
    wait_session_ends(&path, 2).await;

    // Removed (as by a clean-up job): the next line creates the file again, mode 0600.
    std::fs::remove_file(&path).expect("remove the audit log");
    f.assert_good_client_works().await;
    wait_session_ends(&path, 2).await;
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "created anew with mode 0600");

    // Rotated (renamed away, as logrotate does without copytruncate): the old file keeps
    // what it had, the new one gets what follows, the open session's end among it.
    let rotated = dir.path().join("audit.log.1");
    std::fs::rename(&path, &rotated).expect("rotate the audit log");
    open.terminate().await;
    wait_session_ends(&path, 1).await;
    let ended = audit_lines(&path);
    assert_eq!(ended.len(), 1, "only the open session's end: {ended:?}");
    assert_eq!(
        audit_lines(&rotated)
            .iter()
            .filter(|l| l["event"] == "session_end")
            .count(),
        2,
        "the rotated file keeps its lines"
    );
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_never_answers_the_login_gives_08006_within_connect_timeout() {
    let (port, _read) = silent_upstream().await;
    let f = Fixture::start_with("upstream-silent", |mut cfg| {
        cfg.databases[0].port = port;
        cfg.databases[0].connect_timeout = Some("1s".into());
        cfg
    })
    .await;
    let asked = std::time::Instant::now();
    let answer = start_client(&f).await.expect("client task");
    let took = asked.elapsed();
    assert_fatal(&answer, "08006", &["did not answer in time"]);
    assert!(took < Duration::from_secs(4), "08006 after {took:?}");
    f.wait_all_revoked(Duration::from_secs(10)).await;
    let timeouts = crate::harness::security::counter(
        &f.proxy,
        "leasegate_upstream_errors_total",
        &[("database", "myapp"), ("kind", "timeout")],
    )
    .await;
    assert_eq!(timeouts, 1.0, "counted as an upstream timeout");
}

/// `leasegate_config_reloads_total{result}` and `leasegate_config_last_reload_successful`.
async fn reload_metrics(f: &Fixture) -> (f64, f64, f64) {
    let m = f.proxy.metrics().await;
    let reloads = |r| value_or_zero(&m, "leasegate_config_reloads_total", &[("result", r)]);
    let last = value_or_zero(&m, "leasegate_config_last_reload_successful", &[]);
    (reloads("ok"), reloads("error"), last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_reload_shows_in_the_metrics_and_leaves_open_sessions_alone() {
    let f = Fixture::start("reload-refused-metric").await;
    assert_eq!(reload_metrics(&f).await, (0.0, 0.0, 1.0), "fresh instance");
    let mut open = f.raw_session("readonly").await;
    let good = std::fs::read_to_string(config_path(&f.proxy)).expect("read config");

    write_config_text(&f.proxy, "[listen\naddress = \"not TOML\n");
    reload(&f.proxy, "reload refused").await;
    assert_eq!(
        reload_metrics(&f).await,
        (0.0, 1.0, 0.0),
        "refused, counted"
    );
    assert_eq!(open.query_column("select 1").await, vec![Some("1".into())]);
    f.assert_good_client_works().await;

    write_config_text(&f.proxy, &good);
    reload(&f.proxy, "configuration reloaded").await;
    assert_eq!(reload_metrics(&f).await, (1.0, 1.0, 1.0), "in force again");
    assert_eq!(open.query_column("select 1").await, vec![Some("1".into())]);
    open.terminate().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

/// The open-file limit (soft, hard) of process `pid`, from `/proc/<pid>/limits`.
fn open_file_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("/proc/PID/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// The standard grant and config for the open-file limit tests, on a fresh mount.
async fn fd_limit_setup(name: &str) -> (Mount, Pki, ClientCert, ProxyConfig) {
    let mount = fresh_mount(name).await;
    let pki = Pki::new();
    let good = pki.client("good", Identity::Uri(GOOD_URI.into()));
    let cfg =
        ProxyConfig::new(&pki, &mount).grant(&format!("uri:{GOOD_URI}"), &["myapp"], &["readonly"]);
    (mount, pki, good, cfg)
}

/// leasegate started with the open-file limit `soft`:`hard` and `max_connections`.
async fn start_with_nofile(cfg: ProxyConfig, soft: u64, hard: u64, max_connections: i64) -> Proxy {
    let process = ProcessOptions {
        nofile: Some((soft, hard)),
        ..ProcessOptions::default()
    };
    Proxy::start_process(cfg, process, |t| {
        set(t, "listen.max_connections", max_connections)
    })
    .await
}

/// A shell often hands out a soft open-file limit of 1024 or less, while every session holds
/// two descriptors: leasegate raises the soft limit at start to the hard limit. 40 sessions at
/// once then work under a starting soft limit of 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_is_raised_at_start() {
    let (mount, pki, good, cfg) = fd_limit_setup("fd-limit").await;
    let proxy = start_with_nofile(cfg, 64, 4096, 60).await;
    assert_eq!(
        open_file_limit(proxy.pid()),
        (4096, 4096),
        "soft limit raised"
    );
    assert!(
        proxy.log_text().contains("raised the open-file limit"),
        "{}",
        proxy.log_text()
    );

    let opened = futures_util::future::join_all(
        (0..40).map(|_| pg_connect(proxy.port, &pki, Some(&good), "readonly", "myapp")),
    )
    .await;
    let mut sessions = Vec::new();
    for (i, s) in opened.into_iter().enumerate() {
        let s =
            s.unwrap_or_else(|e| panic!("session {i} of 40 under a starting limit of 64: {e:?}"));
        assert!(current_user(&s).await.starts_with(&mount.prefix));
        sessions.push(s);
    }
    drop(sessions);
    wait_all_revoked(&mount, Duration::from_secs(30)).await;
}

/// A hard open-file limit too low for `max_connections` caps the sessions at what it has
/// room for (here 50: (228 - 128) / 2), with a warning at start; further clients wait in the
/// accept queue, as past `max_connections`, instead of failing halfway through their setup
/// for want of a descriptor (before, they got 08006 "Vault is unreachable" or "could not
/// connect to upstream"). When sessions close, the waiting ones get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_hard_limit_caps_the_sessions_and_the_rest_wait() {
    let (mount, pki, good, cfg) = fd_limit_setup("fd-short").await;
    let proxy = start_with_nofile(cfg, 64, 228, 60).await;
    assert_eq!(
        open_file_limit(proxy.pid()),
        (228, 228),
        "raised to the hard limit"
    );
    let log = proxy.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("room for fewer sessions than listen.max_connections"))
        .unwrap_or_else(|| panic!("no warning about the short limit; log:\n{log}"));
    assert!(
        warning.contains("WARN") && warning.contains("sessions=50"),
        "{warning}"
    );

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..60 {
        let (tx, pki, good, port) = (tx.clone(), pki.clone(), good.clone(), proxy.port);
        tokio::spawn(async move {
            let _ = tx.send((
                i,
                pg_connect(port, &pki, Some(&good), "readonly", "myapp").await,
            ));
        });
    }
    let mut sessions = Vec::new();
    for n in 0..50 {
        let s = next_session(&mut rx, Duration::from_secs(20)).await;
        sessions.push(s.unwrap_or_else(|| panic!("only {n} of the first 50 sessions")));
    }
    let extra = next_session(&mut rx, Duration::from_secs(1)).await;
    assert!(extra.is_none(), "a 51st session while 50 are open");
    sessions.truncate(40);
    for n in 0..10 {
        let s = next_session(&mut rx, Duration::from_secs(20)).await;
        let s = s.unwrap_or_else(|| panic!("only {n} of the 10 waiting sessions got through"));
        assert!(current_user(&s).await.starts_with(&mount.prefix));
        sessions.push(s);
    }
    drop(sessions);
    wait_all_revoked(&mount, Duration::from_secs(30)).await;
    let log = proxy.log_text();
    assert!(
        !log.contains("Too many open files"),
        "ran out of descriptors:\n{log}"
    );
}

/// The next session the connecting tasks report within `within` (`None`: none did); panics
/// on one that failed.
async fn next_session(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(
        usize,
        Result<PgSession, tokio_postgres::Error>,
    )>,
    within: Duration,
) -> Option<PgSession> {
    let (i, s) = tokio::time::timeout(within, rx.recv()).await.ok()??;
    Some(s.unwrap_or_else(|e| panic!("session {i} failed instead of waiting: {e:?}")))
}
