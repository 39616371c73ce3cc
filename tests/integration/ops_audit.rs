//! The audit log: one JSON line per accepted session's start and end and per refused client,
//! with the identity, the certificate's fingerprint and serial, the upstream user and the
//! session's lease, byte counts and the refusal's SQLSTATE and reason; the file is 0600, the
//! drop counter is exported, and the Vault token appears nowhere in it.

use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::harness::bao::{Target, leases};
use crate::harness::client::{Transport, current_user, pg_connect, raw_startup, tls_config};
use crate::harness::fixture::{Fixture, GOOD_URI};
use crate::harness::ops::{cert_serial, hex, norm_serial};
use crate::harness::pki::Identity;
use crate::harness::proxy::set;
use crate::harness::{poll_until, root};

/// The identity the refused client presents.
const STRANGER_URI: &str = "spiffe://leasegate.test/app/stranger";

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A Vault token of its own, so that "the token appears nowhere" means something.
async fn own_token() -> String {
    Target::shared()
        .write(
            Method::POST,
            "auth/token/create",
            &json!({"ttl": "1h", "display_name": "ops-audit"}),
        )
        .await["auth"]["client_token"]
        .as_str()
        .expect("client_token")
        .to_string()
}

/// One accepted session of the good client (with a query) and one refused client; returns
/// the session's upstream user and lease id (as OpenBao lists it, without the path).
async fn one_session_and_one_refusal(f: &Fixture) -> (String, String) {
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("session through leasegate");
    let user = current_user(&s).await;
    let held = leases(&f.mount, "readonly").await;
    assert_eq!(held.len(), 1, "one lease while the session runs");
    s.client
        .query_one("select count(*) from generate_series(1, 1000)", &[])
        .await
        .expect("query");
    drop(s.client);
    let _ = s.driver.await;
    let stranger = f.pki.client("stranger", Identity::Uri(STRANGER_URI.into()));
    let refused = raw_startup(
        f.proxy.port,
        Transport::Tls(tls_config(&f.pki, Some(&stranger))),
        "readonly",
        "myapp",
    )
    .await;
    refused.expect_error("28000");
    (user, held[0].clone())
}

/// Polls until the session's end and the refusal are logged; returns the log's text, after
/// checking that the file is 0600.
async fn wait_audit_log(audit: &Path) -> String {
    poll_until(
        Duration::from_secs(10),
        "session_end and refused in the audit log",
        || async move {
            let t = std::fs::read_to_string(audit).unwrap_or_default();
            if t.contains("\"session_end\"") && t.contains("\"refused\"") {
                Ok(())
            } else {
                Err(format!("audit log so far: {t}"))
            }
        },
    )
    .await;
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(audit)
            .expect("stat audit log")
            .permissions(),
    );
    assert_eq!(
        mode & 0o777,
        0o600,
        "the audit log is created for leasegate only"
    );
    std::fs::read_to_string(audit).expect("read audit log")
}

/// The fields every event has: time, client address, certificate fingerprint, database, role.
fn assert_common_fields(events: &[Value]) {
    for e in events {
        assert!(
            e["time"]
                .as_str()
                .is_some_and(|t| t.len() >= 20 && t.ends_with('Z')),
            "time: {e}"
        );
        assert!(
            e["client_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "client_addr: {e}"
        );
        assert!(
            is_hex(e["cert_sha256"].as_str().unwrap_or(""), 64),
            "cert_sha256: {e}"
        );
        assert_eq!(e["database"], "myapp", "{e}");
        assert_eq!(e["role"], "readonly", "{e}");
    }
}

/// A session_start or session_end of the good client: its identity, certificate, upstream
/// user and lease.
fn assert_session_event(e: &Value, f: &Fixture, user: &str, lease_id: &str) {
    let good_id = json!(format!("uri:{GOOD_URI}"));
    assert!(
        e["identities"]
            .as_array()
            .is_some_and(|ids| ids.contains(&good_id)),
        "identities: {e}"
    );
    assert_eq!(
        e["cert_sha256"].as_str(),
        Some(hex(&Sha256::digest(f.good.cert_der.as_ref())).as_str()),
        "fingerprint of the good client's certificate: {e}"
    );
    assert_eq!(
        norm_serial(e["cert_serial"].as_str().unwrap_or("")),
        cert_serial(&f.good.cert_der),
        "{e}"
    );
    assert_eq!(e["upstream_user"].as_str(), Some(user), "{e}");
    let lease = e["lease_id"].as_str().unwrap_or("");
    assert!(
        lease.starts_with(&format!("{}/creds/readonly/", f.mount.name))
            && lease.ends_with(lease_id),
        "lease_id {lease:?} should be the session's lease {lease_id:?}"
    );
}

/// The session_end's duration, byte counts and reason.
fn assert_end_fields(end: &Value) {
    assert!(end["duration_ms"].as_u64().is_some(), "duration_ms: {end}");
    assert!(
        end["bytes_to_upstream"].as_u64().is_some_and(|b| b > 0),
        "bytes_to_upstream: {end}"
    );
    assert!(
        end["bytes_to_client"].as_u64().is_some_and(|b| b > 0),
        "bytes_to_client: {end}"
    );
    assert!(
        end["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "reason: {end}"
    );
}

/// The refusal: the stranger's identity, 28000 and a reason naming it, no lease or user.
fn assert_refusal(refusal: &Value) {
    assert!(
        refusal["identities"]
            .as_array()
            .is_some_and(|ids| ids.contains(&json!(format!("uri:{STRANGER_URI}")))),
        "identities: {refusal}"
    );
    assert_eq!(refusal["sqlstate"], "28000", "{refusal}");
    let reason = refusal["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains(STRANGER_URI),
        "reason names the identity: {refusal}"
    );
    assert!(refusal.get("lease_id").is_none(), "{refusal}");
    assert!(refusal.get("upstream_user").is_none(), "{refusal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_sessions_and_refusals_without_the_vault_token() {
    let token = own_token().await;
    let dir = root().tempdir("ops-audit-");
    let audit = dir.path().join("audit.log");
    let audit_path = audit.display().to_string();
    let vault_token = token.clone();
    let f = Fixture::start_edited(
        "ops-audit",
        |mut cfg| {
            cfg.vault_token = vault_token;
            cfg
        },
        |t| set(t, "audit.path", audit_path),
    )
    .await;

    let (user, lease_id) = one_session_and_one_refusal(&f).await;
    let audit_text = wait_audit_log(&audit).await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    let scrape = f.proxy.metrics().await;
    assert!(
        scrape
            .lines()
            .any(|l| l == "leasegate_audit_events_dropped_total 0"),
        "the drop counter is exported, at 0:\n{scrape}"
    );

    let events: Vec<Value> = audit_text
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}"))
        })
        .collect();
    // Lines come in the order things happen (the session's end may be written after the
    // refusal: leasegate sees the client's Terminate asynchronously).
    let of = |kind: &str| -> Vec<&Value> { events.iter().filter(|e| e["event"] == kind).collect() };
    let (starts, ends, refusals) = (of("session_start"), of("session_end"), of("refused"));
    assert!(
        starts.len() == 1 && ends.len() == 1 && refusals.len() == 1 && events.len() == 3,
        "want one session_start, one session_end, one refused; audit log:\n{audit_text}"
    );
    let (start, end) = (starts[0], ends[0]);
    assert!(
        start["time"].as_str() <= end["time"].as_str(),
        "session_start before session_end:\n{audit_text}"
    );
    assert_common_fields(&events);
    for e in [start, end] {
        assert_session_event(e, &f, &user, &lease_id);
    }
    assert_end_fields(end);
    assert_refusal(refusals[0]);
    assert!(
        !audit_text.contains(&token),
        "the Vault token appears in the audit log:\n{audit_text}"
    );
}
