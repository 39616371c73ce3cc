//! Clients leasegate must turn away before asking Vault for anything. Each test checks the
//! exact answer (SQLSTATE and message, or the TLS alert), that no lease was issued and no
//! role created, that no creds request reached Vault, and that a good client still works.

use std::time::Duration;

use crate::harness::client::{Raw, Transport, conninfo, psql, raw_startup, tls_config};
use crate::harness::fixture::{Fixture, GOOD_URI};
use crate::harness::metrics::value_or_zero;
use crate::harness::pki::{ClientCert, Identity};
use crate::harness::poll_until;

const CREDS_COUNT: &str = "leasegate_vault_request_duration_seconds_count";

/// The common tail of every rejection test.
async fn after_rejection(f: &Fixture, reason: Option<&str>) {
    f.assert_nothing_issued().await;
    if let Some(reason) = reason {
        poll_until(
            Duration::from_secs(5),
            &format!("leasegate_auth_failures_total{{reason=\"{reason}\"}} >= 1"),
            || async move {
                let m = f.proxy.metrics().await;
                let n = value_or_zero(&m, "leasegate_auth_failures_total", &[("reason", reason)]);
                if n >= 1.0 {
                    Ok(())
                } else {
                    Err(format!("value {n}"))
                }
            },
        )
        .await;
    }
    let m = f.proxy.metrics().await;
    assert_eq!(
        value_or_zero(&m, CREDS_COUNT, &[("op", "creds")]),
        0.0,
        "a rejected client must not cause a Vault creds request"
    );
    f.assert_good_client_works().await;
    let m = f.proxy.metrics().await;
    assert!(
        value_or_zero(&m, CREDS_COUNT, &[("op", "creds")]) >= 1.0,
        "the good client's creds request is counted"
    );
}

#[track_caller]
fn assert_fatal_28000(answer: &Raw, must_contain: &[&str]) {
    eprintln!("answer: {answer:?}");
    let message = answer.expect_error("28000");
    if let Raw::Error { severity, .. } = answer {
        assert_eq!(severity, "FATAL", "severity of {answer:?}");
    }
    for needle in must_contain {
        assert!(
            message.to_lowercase().contains(&needle.to_lowercase()),
            "message {message:?} should mention {needle:?}"
        );
    }
}

async fn tls_startup(f: &Fixture, cert: Option<&ClientCert>, user: &str, db: &str) -> Raw {
    raw_startup(
        f.proxy.port,
        Transport::Tls(tls_config(&f.pki, cert)),
        user,
        db,
    )
    .await
}

#[tokio::test]
async fn plaintext_startup_is_rejected() {
    let f = Fixture::start("rej-plain").await;
    let answer = raw_startup(f.proxy.port, Transport::Plain, "readonly", "myapp").await;
    assert_fatal_28000(&answer, &["SSL with a client certificate is required"]);
    after_rejection(&f, Some("plaintext")).await;
}

#[tokio::test]
async fn tls_without_client_certificate_is_rejected() {
    let f = Fixture::start("rej-nocert").await;
    let answer = tls_startup(&f, None, "readonly", "myapp").await;
    assert_fatal_28000(&answer, &["client certificate"]);

    let out = psql(
        &conninfo(f.proxy.port, &f.pki, None, "readonly", "myapp"),
        "select 1",
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "psql without a certificate must fail"
    );
    assert!(stderr.contains("client certificate"), "psql says: {stderr}");
    after_rejection(&f, Some("no_client_cert")).await;
}

/// A TLS alert whose description names a certificate problem.
#[track_caller]
fn assert_cert_alert(answer: &Raw, want: &[&str]) {
    eprintln!("answer: {answer:?}");
    match answer {
        Raw::Alert(alert) => {
            let text = format!("{alert:?}").to_lowercase();
            assert!(
                want.iter().any(|w| text.contains(w)),
                "alert {alert:?} should be one of {want:?}"
            );
        }
        other => panic!("expected a TLS alert, got {other:?}"),
    }
}

#[tokio::test]
async fn certificate_from_untrusted_ca_fails_the_handshake() {
    let f = Fixture::start("rej-untrusted").await;
    let rogue = f
        .pki
        .untrusted_client("rogue", Identity::Uri(GOOD_URI.into()));
    let answer = tls_startup(&f, Some(&rogue), "readonly", "myapp").await;
    assert_cert_alert(&answer, &["unknownca", "certificate"]);

    let info = conninfo(f.proxy.port, &f.pki, Some(&rogue), "readonly", "myapp");
    let out = psql(&info, "select 1").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "psql with an untrusted cert must fail"
    );
    assert!(
        stderr.contains("unknown ca") || stderr.contains("certificate"),
        "psql says: {stderr}"
    );
    after_rejection(&f, None).await;
}

#[tokio::test]
async fn expired_certificate_fails_the_handshake() {
    let f = Fixture::start("rej-expired").await;
    let old = f
        .pki
        .expired_client("expired", Identity::Uri(GOOD_URI.into()));
    let answer = tls_startup(&f, Some(&old), "readonly", "myapp").await;
    assert_cert_alert(&answer, &["expired", "certificate"]);

    let info = conninfo(f.proxy.port, &f.pki, Some(&old), "readonly", "myapp");
    let out = psql(&info, "select 1").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("psql: {stderr}");
    assert!(!out.status.success(), "psql with an expired cert must fail");
    assert!(stderr.contains("certificate"), "psql says: {stderr}");
    after_rejection(&f, None).await;
}

#[tokio::test]
async fn identity_without_grant_is_rejected() {
    let f = Fixture::start("rej-nogrant").await;
    let stranger_uri = "spiffe://leasegate.test/app/stranger";
    let stranger = f.pki.client("stranger", Identity::Uri(stranger_uri.into()));
    let answer = tls_startup(&f, Some(&stranger), "readonly", "myapp").await;
    assert_fatal_28000(&answer, &[stranger_uri, "readonly", "myapp"]);
    after_rejection(&f, Some("no_grant")).await;
}

#[tokio::test]
async fn role_not_granted_is_rejected() {
    let f = Fixture::start("rej-role").await;
    let answer = tls_startup(&f, Some(&f.good), "readwrite", "myapp").await;
    assert_fatal_28000(&answer, &[GOOD_URI, "readwrite", "myapp"]);
    after_rejection(&f, Some("role_not_granted")).await;
}

#[tokio::test]
async fn database_not_granted_is_rejected() {
    let f = Fixture::start_with("rej-db", |mut cfg| {
        // A second configured database that the good client has no grant for.
        let mut reports = cfg.databases[0].clone();
        reports.name = "reports".into();
        reports.upstream_database = Some("myapp".into());
        cfg.databases.push(reports);
        cfg
    })
    .await;
    let answer = tls_startup(&f, Some(&f.good), "readonly", "reports").await;
    assert_fatal_28000(&answer, &[GOOD_URI, "readonly", "reports"]);
    after_rejection(&f, Some("database_not_granted")).await;
}
