//! What a reload (SIGHUP or the file watch) applies, and what it only names: SIGHUP rotates
//! the server certificate in place (open sessions go on), removes a grant for new sessions
//! only, and keeps the running configuration when the new one is broken or invalid; a lowered
//! `limits.max_sessions_per_identity` refuses the next concurrent session (the open one stays
//! counted); a changed `runtime.worker_threads` or `listen.address` is named in a warning and
//! left as it was; after a reload that enables `watch_interval` and points `listen.cert` at
//! another file, changing that file reloads, and the old path no longer matters.

use std::time::Duration;

use crate::harness::client::{Raw, Transport, current_user, pg_connect, raw_startup, tls_config};
use crate::harness::fixture::{Fixture, GOOD_URI};
use crate::harness::free_port;
use crate::harness::metrics::value_or_zero;
use crate::harness::ops::{
    assert_query_works, cert_serial, config_path, edit_config, log_count, norm_serial, pem_cert,
    presented_cert, read_config, reload, server_cert, wait_log, write_config_text,
};
use crate::harness::pki::Identity;
use crate::harness::proxy::set;
use crate::harness::security::{assert_fatal, creds_requests, tls_startup, wait_auth_failures};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_server_certificate_and_open_sessions_go_on() {
    let f = Fixture::start("ops-reload-cert").await;
    let old = pem_cert(f.pki.server_cert());
    assert_eq!(
        presented_cert(&f).await,
        old,
        "leasegate presents its configured cert"
    );
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("session before the rotation");
    let user = current_user(&s).await;

    // Rotate in place, as cert-manager or a deploy script does: new key, new serial, the
    // same paths.
    let serial = 0x5eed_2026_u64;
    let fresh = server_cert(&f.pki, "server-rotated", serial, false);
    std::fs::rename(&fresh.cert, f.pki.server_cert()).expect("replace server.pem");
    std::fs::rename(&fresh.key, f.pki.server_key()).expect("replace server-key.pem");
    assert_eq!(
        presented_cert(&f).await,
        old,
        "without SIGHUP the running certificate stays"
    );

    reload(&f.proxy, "configuration reloaded").await;
    let now = presented_cert(&f).await;
    assert_eq!(
        now, fresh.cert_der,
        "a new handshake sees the rotated certificate"
    );
    assert_eq!(cert_serial(&now), norm_serial(&format!("{serial:x}")));
    assert_ne!(cert_serial(&now), cert_serial(&old));

    assert_query_works(&s, "the session opened before the rotation").await;
    assert_eq!(current_user(&s).await, user);
    f.assert_good_client_works().await;
    assert_query_works(&s, "the old session after new ones").await;
    drop(s.client);
    let _ = s.driver.await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_removes_a_grant_for_new_sessions_only() {
    let other_uri = "spiffe://leasegate.test/app/other";
    let f = Fixture::start_with("ops-reload-grant", |cfg| {
        cfg.grant(&format!("uri:{other_uri}"), &["myapp"], &["readonly"])
    })
    .await;
    let other = f.pki.client("other", Identity::Uri(other_uri.into()));
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("session of the good client before the reload");
    let user = current_user(&s).await;

    let mut config = read_config(&f.proxy);
    let grants = config
        .get_mut("grants")
        .and_then(|g| g.as_array_mut())
        .expect("[[grants]]");
    let before = grants.len();
    grants
        .retain(|g| g.get("identity").and_then(|i| i.as_str()) != Some(&format!("uri:{GOOD_URI}")));
    assert_eq!(grants.len(), before - 1, "the good client's grant removed");
    write_config_text(
        &f.proxy,
        &toml::to_string(&config).expect("serialise config"),
    );
    reload(&f.proxy, "configuration reloaded").await;

    let refused = raw_startup(
        f.proxy.port,
        Transport::Tls(tls_config(&f.pki, Some(&f.good))),
        "readonly",
        "myapp",
    )
    .await;
    let message = refused.expect_error("28000");
    assert!(message.contains(GOOD_URI), "names the identity: {message}");

    assert_query_works(&s, "the good client's session opened before the reload").await;
    assert_eq!(current_user(&s).await, user);
    let still = raw_startup(
        f.proxy.port,
        Transport::Tls(tls_config(&f.pki, Some(&other))),
        "readonly",
        "myapp",
    )
    .await;
    assert!(
        matches!(still, Raw::Ready),
        "a kept grant still works: {still:?}"
    );
    drop(s.client);
    let _ = s.driver.await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_config_keeps_the_running_one() {
    let mut f = Fixture::start("ops-reload-broken").await;
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("session before the reload");
    let good_text = std::fs::read_to_string(config_path(&f.proxy)).expect("read config");

    write_config_text(&f.proxy, "[listen\naddress = \"this is not TOML\n");
    reload(&f.proxy, "reload refused").await;
    assert!(f.proxy.try_wait().is_none(), "leasegate still runs");
    let line = f
        .proxy
        .log_text()
        .lines()
        .find(|l| l.contains("reload refused"))
        .map(String::from)
        .unwrap_or_default();
    assert!(line.contains("keeping the running configuration"), "{line}");
    f.assert_good_client_works().await;
    assert_query_works(&s, "a session opened before the broken reload").await;

    // A config that parses but is invalid is refused too.
    let invalid = good_text.replace("roles = [\"readonly\"]", "roles = [\"nosuchrole\"]");
    assert_ne!(invalid, good_text, "the grant was rewritten");
    write_config_text(&f.proxy, &invalid);
    reload(&f.proxy, "reload refused").await;
    f.assert_good_client_works().await;

    // And SIGHUP still works afterwards.
    write_config_text(&f.proxy, &good_text);
    reload(&f.proxy, "configuration reloaded").await;
    f.assert_good_client_works().await;
    drop(s.client);
    let _ = s.driver.await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_lowered_limits_to_new_sessions() {
    let f = Fixture::start("ops-reload-limits").await;
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("first session");
    let user = current_user(&s).await;
    assert_eq!(creds_requests(&f.proxy).await, 1.0);

    edit_config(&f.proxy, |t| {
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
    edit_config(&f.proxy, |t| {
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
    edit_config(&f.proxy, |t| {
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
