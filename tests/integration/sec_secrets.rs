//! Secret hygiene: with the most verbose logging (`RUST_LOG=trace`), in JSON and in text
//! format, with an audit file, a session that runs a query must leave neither the Vault token
//! nor the issued database password in leasegate's stderr, its audit log or /metrics.
//!
//! The token is a fresh one with a distinctive value created for the test. The password is
//! not retrievable from OpenBao after issue, so leasegate talks to OpenBao through a small
//! recording TCP relay (a fault-injection helper) that keeps every byte OpenBao answered;
//! the password is read from the creds response in that recording.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::bao::{fresh_mount, write};
use crate::harness::client::{current_user, pg_connect};
use crate::harness::fixture::{GOOD_URI, wait_all_revoked};
use crate::harness::pki::{Identity, Pki};
use crate::harness::proxy::{ProcessOptions, Proxy, ProxyConfig, set};
use crate::harness::security::creds_requests;
use crate::harness::{env, next_id, poll_until, root};

/// A TCP relay in front of OpenBao that records what OpenBao sends back.
struct RecordingRelay {
    addr: String,
    from_vault: Arc<Mutex<Vec<u8>>>,
}

impl RecordingRelay {
    async fn start(target: String) -> RecordingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = format!("http://{}", listener.local_addr().expect("relay addr"));
        let from_vault = Arc::new(Mutex::new(Vec::new()));
        let recording = from_vault.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let recording = recording.clone();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            recording
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .extend_from_slice(&buf[..n]);
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        RecordingRelay { addr, from_vault }
    }

    /// Every `"password":"…"` value OpenBao sent.
    fn passwords(&self) -> Vec<String> {
        let bytes = self
            .from_vault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let text = String::from_utf8_lossy(&bytes);
        let needle = "\"password\":\"";
        text.match_indices(needle)
            .filter_map(|(i, _)| {
                let rest = &text[i + needle.len()..];
                rest.find('"').map(|end| rest[..end].to_string())
            })
            .collect()
    }
}

/// A token for leasegate whose value cannot occur by accident in any log.
async fn canary_token() -> String {
    let token = format!("lgcanarytoken{}x{}", std::process::id(), next_id());
    write(
        reqwest::Method::POST,
        "auth/token/create",
        &json!({ "id": token, "policies": ["root"], "ttl": "1h", "renewable": true }),
    )
    .await;
    token
}

/// Runs one session with a query through leasegate started with `--log-format <format>` and
/// `RUST_LOG=trace`, then checks stderr, the audit log and /metrics for the secrets.
async fn no_secret_in_logs_audit_or_metrics(format: &str) {
    let mount = fresh_mount(&format!("sec-secrets-{format}")).await;
    let relay =
        RecordingRelay::start(env().bao.addr.trim_start_matches("http://").to_string()).await;
    let token = canary_token().await;
    let pki = Pki::new();
    let good = pki.client("good", Identity::Uri(GOOD_URI.into()));
    let mut cfg =
        ProxyConfig::new(&pki, &mount).grant(&format!("uri:{GOOD_URI}"), &["myapp"], &["readonly"]);
    cfg.vault_address = relay.addr.clone();
    cfg.vault_token = token.clone();
    let audit_dir = root().tempdir("audit-");
    let audit = audit_dir.path().join("audit.log");
    let audit_path = audit.display().to_string();
    let proxy = Proxy::start_process(
        cfg,
        ProcessOptions {
            env: vec![("RUST_LOG".into(), "trace".into())],
            args: vec!["--log-format".into(), format.into()],
            ..ProcessOptions::default()
        },
        |config| set(config, "audit.path", audit_path),
    )
    .await;

    let session = pg_connect(proxy.port, &pki, Some(&good), "readonly", "myapp")
        .await
        .expect("session through leasegate");
    let user = current_user(&session).await;
    assert!(user.starts_with(&mount.prefix), "session user {user}");
    let rows = session
        .client
        .simple_query("select count(*) from pg_roles")
        .await
        .expect("query");
    assert!(!rows.is_empty());
    drop(session.client);
    let _ = session.driver.await;
    wait_all_revoked(&mount, Duration::from_secs(10)).await;

    let passwords = relay.passwords();
    assert_eq!(
        passwords.len(),
        1,
        "the relay saw exactly one creds response (passwords {passwords:?})"
    );
    assert_eq!(creds_requests(&proxy).await, 1.0);
    let password = &passwords[0];
    assert!(
        password.len() >= 16,
        "a real password was captured: {password:?}"
    );
    let audit_path = audit.clone();
    poll_until(
        Duration::from_secs(5),
        "session_end in the audit log",
        || {
            let audit_path = audit_path.clone();
            async move {
                let text = std::fs::read_to_string(&audit_path).unwrap_or_default();
                if text.contains("\"session_end\"") {
                    Ok(())
                } else {
                    Err(text)
                }
            }
        },
    )
    .await;

    let stderr = proxy.log_text();
    let audit_text = std::fs::read_to_string(&audit).expect("read audit log");
    let metrics = proxy.metrics().await;
    // The logs are really as verbose as they get, and really in the asked format.
    let trace_marker = if format == "json" {
        "\"level\":\"TRACE\""
    } else {
        " TRACE "
    };
    assert!(
        stderr.contains(trace_marker),
        "RUST_LOG=trace produced trace lines in {format} format"
    );
    assert!(
        audit_text.contains(&user),
        "the audit log names the upstream user"
    );
    for (what, text) in [
        ("stderr", &stderr),
        ("audit log", &audit_text),
        ("/metrics", &metrics),
    ] {
        assert!(
            !text.contains(token.as_str()),
            "the Vault token appears in the {what} ({format} format)"
        );
        assert!(
            !text.contains(password.as_str()),
            "the issued password appears in the {what} ({format} format)"
        );
    }
    eprintln!(
        "{format}: {} bytes of stderr, {} bytes of audit log, {} bytes of metrics: no secret",
        stderr.len(),
        audit_text.len(),
        metrics.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_json_logs_audit_or_metrics() {
    no_secret_in_logs_audit_or_metrics("json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_text_logs_audit_or_metrics() {
    no_secret_in_logs_audit_or_metrics("text").await;
}
