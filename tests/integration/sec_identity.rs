//! Hostile text in a valid client certificate: a URI SAN and a CN holding a newline, a
//! carriage return, ESC sequences, quotes, a backslash, a bidirectional override and 300
//! characters. Wherever leasegate shows the identity (the denial and the limit messages, its
//! log lines, the audit log) it is escaped: no raw control character, no forged line, quotes
//! that cannot be closed early, and messages cut to a bounded length.

use std::time::Duration;

use serde_json::Value;

use crate::harness::client::Raw;
use crate::harness::pki::Identity;
use crate::harness::poll_until;
use crate::harness::proxy::{ProcessOptions, set};
use crate::harness::root;
use crate::harness::security::{
    assert_fatal, creds_requests, fixture_edited, has_raw_control, tls_startup, wait_auth_failures,
};

const PREFIX: &str = "spiffe://leasegate.test/evil/";

/// Text that would forge a log line, recolour a terminal and close a quote if shown raw.
fn payload() -> String {
    format!(
        "a\nFORGED line\r\u{1b}[2J\u{1b}[31m\"quoted\\\"{}",
        "x".repeat(300)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_identities_are_escaped_in_messages_logs_and_audit() {
    let dir = root().tempdir("sec-identity-");
    let audit = dir.path().join("audit.log");
    let audit_path = audit.display().to_string();
    let f = fixture_edited(
        "sec-identity",
        |cfg| cfg.grant(&format!("uri:{PREFIX}**"), &["myapp"], &["readonly"]),
        ProcessOptions::default(),
        move |t, _| {
            set(t, "audit.path", audit_path);
            // One new session per identity, then the bucket is empty for a long while.
            set(t, "limits.burst_per_identity", 1);
            set(t, "limits.new_sessions_per_second_per_identity", 0.001);
        },
    )
    .await;
    // URI SANs are IA5 (ASCII): the bidirectional override only fits the CN.
    let uri = format!("{PREFIX}{}", payload());
    let cn = format!("cn\u{202e}{}", payload());
    let evil = f.pki.client_with("evil", Identity::Uri(uri.clone()), |p| {
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, cn.as_str());
    });
    // What a message shows of the identity: escaped, cut at 64 characters.
    let shown = format!("\"uri:{PREFIX}a\\nFORGED line\\r\\u{{1b}}[2J\\u{{1b}}[31m\\\"quoted");
    let clean = |message: &str| {
        assert!(
            !has_raw_control(message),
            "raw control character: {message:?}"
        );
        assert!(message.len() < 300, "{} bytes: {message:?}", message.len());
        assert!(
            message.contains(&shown),
            "{message:?} should hold {shown:?}"
        );
        assert!(message.contains("…\""), "cut: {message:?}");
    };

    // A denial names the identity.
    let denied = tls_startup(f.proxy.port, &f.pki, Some(&evil), "readwrite", "myapp").await;
    clean(assert_fatal(&denied, "28000", &["is not granted role"]));
    wait_auth_failures(&f.proxy, "role_not_granted", 1.0).await;
    assert_eq!(creds_requests(&f.proxy).await, 0.0);

    // One session within the limits, then the rate limit names the identity.
    let first = tls_startup(f.proxy.port, &f.pki, Some(&evil), "readonly", "myapp").await;
    assert!(matches!(first, Raw::Ready), "first session: {first:?}");
    f.wait_all_revoked(Duration::from_secs(10)).await;
    let limited = tls_startup(f.proxy.port, &f.pki, Some(&evil), "readonly", "myapp").await;
    clean(assert_fatal(
        &limited,
        "53300",
        &["too many new sessions per second for identity"],
    ));
    wait_auth_failures(&f.proxy, "identity_rate_limit", 1.0).await;
    assert_eq!(
        creds_requests(&f.proxy).await,
        1.0,
        "only the first session asked Vault"
    );

    // The audit log: JSON, every identity escaped (no control character after parsing).
    let path = &audit;
    poll_until(Duration::from_secs(10), "four audit lines", || async move {
        let n = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .count();
        if n >= 4 {
            Ok(())
        } else {
            Err(format!("{n} lines"))
        }
    })
    .await;
    let text = std::fs::read_to_string(&audit).expect("audit log");
    for line in text.lines() {
        assert!(!has_raw_control(line), "raw control character in {line:?}");
        let event: Value = serde_json::from_str(line).expect("audit line is JSON");
        let ids: Vec<&str> = event["identities"]
            .as_array()
            .expect("identities")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(ids.len(), 2, "{event}");
        for id in &ids {
            assert!(!id.chars().any(char::is_control), "{id:?}");
            assert!(id.contains("a\\nFORGED line\\r\\u{1b}[2J"), "{id:?}");
            assert!(
                id.ends_with(&"x".repeat(300)),
                "the audit log keeps the whole value"
            );
        }
        assert!(
            ids[1].starts_with("cn:cn\\u{202e}a"),
            "bidi override escaped: {:?}",
            ids[1]
        );
    }

    // leasegate's own log (text format, debug): no raw control character, no forged line.
    let log = f.proxy.log_text();
    for line in log.lines() {
        assert!(
            !has_raw_control(line) && !line.starts_with("FORGED"),
            "log line with a raw control character or a forged start: {line:?}"
        );
    }
    assert!(
        log.lines().any(|l| l.contains("credential issued")
            && l.contains(&format!("identity={}", &shown))),
        "the debug line names the identity escaped:\n{log}"
    );
    // Other identities are not affected (one session: the bucket holds one).
    let good = tls_startup(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp").await;
    assert!(matches!(good, Raw::Ready), "the good client: {good:?}");
    f.wait_all_revoked(Duration::from_secs(10)).await;
}
