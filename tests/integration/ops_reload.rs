//! What a reload (SIGHUP or the file watch) applies, and what it only names: a lowered
//! `limits.max_sessions_per_identity` refuses the next concurrent session (the open one
//! stays counted); a changed `runtime.worker_threads` or `listen.address` is named in a
//! warning and left as it was; after a reload that enables `watch_interval` and points
//! `listen.cert` at another file, changing that file reloads, and the old path no longer
//! matters. (Certificate rotation, grant removal and a broken config: `ops.rs`.)

use std::time::Duration;

use crate::harness::client::{Raw, current_user, pg_connect};
use crate::harness::fixture::Fixture;
use crate::harness::free_port;
use crate::harness::metrics::value_or_zero;
use crate::harness::proxy::set;
use crate::harness::security::{assert_fatal, creds_requests, tls_startup, wait_auth_failures};
use crate::ops::{
    log_count, presented_cert, read_config, reload, server_cert, wait_log, write_config_text,
};

/// Edits the running leasegate's config file with `edit` (atomically replaced).
fn edit_config(f: &Fixture, edit: impl FnOnce(&mut toml::Table)) {
    let mut config = read_config(&f.proxy);
    edit(&mut config);
    write_config_text(
        &f.proxy,
        &toml::to_string(&config).expect("serialise config"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_lowered_limits_to_new_sessions() {
    let f = Fixture::start("ops-reload-limits").await;
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("first session");
    let user = current_user(&s).await;
    assert_eq!(creds_requests(&f.proxy).await, 1.0);

    edit_config(&f, |t| {
        set(t, "limits.max_sessions_per_identity", 1);
        set(t, "limits.max_sessions", 50);
    });
    reload(&f.proxy, "configuration reloaded").await;
    let m = f.proxy.metrics().await;
    assert_eq!(value_or_zero(&m, "leasegate_sessions_limit", &[]), 50.0);

    // The open session still counts: a second one of the same identity is refused.
    let second = tls_startup(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp").await;
    assert_fatal(
        &second,
        "53300",
        &["too many sessions for identity", "(limit 1)"],
    );
    wait_auth_failures(&f.proxy, "identity_session_limit", 1.0).await;
    assert_eq!(
        creds_requests(&f.proxy).await,
        1.0,
        "the refused session made no Vault request"
    );
    assert_eq!(current_user(&s).await, user, "the open session goes on");

    // Once it ends, the identity has its one slot again.
    drop(s.client);
    let _ = s.driver.await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    let again = tls_startup(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp").await;
    assert!(
        matches!(again, Raw::Ready),
        "after the first ended: {again:?}"
    );
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_names_each_setting_that_needs_a_restart() {
    let f = Fixture::start("ops-reload-restart").await;
    let other_port = free_port();
    edit_config(&f, |t| {
        set(t, "runtime.worker_threads", 1);
        set(t, "listen.address", format!("127.0.0.1:{other_port}"));
        set(t, "listen.login_timeout", "7s");
    });
    let warning = "runtime.worker_threads changed: takes effect after a restart";
    let before = log_count(&f.proxy, warning);
    reload(&f.proxy, "configuration reloaded").await;
    assert_eq!(log_count(&f.proxy, warning), before + 1, "named once");
    assert_eq!(
        log_count(
            &f.proxy,
            "listen.address changed: takes effect after a restart"
        ),
        1
    );
    assert_eq!(
        log_count(&f.proxy, "listen.login_timeout changed"),
        0,
        "an applied key is not reported as needing a restart"
    );
    // Still served on the old address; nothing listens on the new one.
    f.assert_good_client_works().await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", other_port)).is_err(),
        "listen.address is not applied by a reload"
    );
    // The running values were kept, so the next reload says so again.
    reload(&f.proxy, "configuration reloaded").await;
    assert_eq!(log_count(&f.proxy, warning), before + 2);
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_watch_follows_the_reloaded_certificate_path() {
    let f = Fixture::start("ops-reload-watch").await;
    // SIGHUP: watch every 200 ms, and serve a certificate from other files.
    let two = server_cert(&f.pki, "server-two", 0x2, false);
    edit_config(&f, |t| {
        set(t, "listen.watch_interval", "200ms");
        set(t, "listen.cert", two.cert.display().to_string());
        set(t, "listen.key", two.key.display().to_string());
    });
    reload(&f.proxy, "configuration reloaded").await;
    assert_eq!(
        presented_cert(&f).await,
        two.cert_der,
        "the new path is served"
    );

    // The old files change: they are no longer watched. (A negative: wait five intervals.)
    let reloads = log_count(&f.proxy, "configuration reloaded");
    let three = server_cert(&f.pki, "server-three", 0x3, false);
    std::fs::rename(&three.key, f.pki.server_key()).expect("replace the old key");
    std::fs::rename(&three.cert, f.pki.server_cert()).expect("replace the old cert");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        log_count(&f.proxy, "configuration reloaded"),
        reloads,
        "a change to the old path reloads nothing"
    );
    assert_eq!(presented_cert(&f).await, two.cert_der);

    // The new files change: the watch reloads them.
    let four = server_cert(&f.pki, "server-four", 0x4, false);
    std::fs::rename(&four.key, &two.key).expect("replace the new key");
    std::fs::rename(&four.cert, &two.cert).expect("replace the new cert");
    wait_log(&f.proxy, "configuration reloaded", reloads).await;
    let (fixture, want) = (&f, &four.cert_der);
    crate::harness::poll_until(
        Duration::from_secs(10),
        "the rotated certificate at the new path is served",
        || async move {
            if presented_cert(fixture).await == *want {
                Ok(())
            } else {
                Err("still the previous certificate".into())
            }
        },
    )
    .await;
    assert!(
        log_count(&f.proxy, "configuration or TLS files changed: reloading") >= 1,
        "reloaded by the watch, not a signal"
    );
    f.assert_good_client_works().await;
}
