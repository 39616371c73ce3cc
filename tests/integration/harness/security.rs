//! Checks shared by the security tests (`sec_*` modules): Vault creds requests counted on
//! /metrics, counters awaited with a deadline, TLS alerts and FATAL errors asserted exactly,
//! hand-built startup packets, and a fixture variant whose config can be edited as TOML.

use std::time::Duration;

use rustls::AlertDescription;

use super::bao::fresh_mount;
use super::client::{Raw, Transport, raw_startup, tls_config};
use super::fixture::{Fixture, GOOD_URI};
use super::metrics::value_or_zero;
use super::pki::{ClientCert, Identity, Pki};
use super::poll_until;
use super::proxy::{ProcessOptions, Proxy, ProxyConfig};

/// `leasegate_vault_requests_total{op="creds"}` summed over every status.
pub async fn creds_requests(proxy: &Proxy) -> f64 {
    let m = proxy.metrics().await;
    value_or_zero(&m, "leasegate_vault_requests_total", &[("op", "creds")])
}

/// A counter (summed over the series matching `labels`) right now.
pub async fn counter(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    value_or_zero(&proxy.metrics().await, name, labels)
}

/// Polls /metrics until the counter reaches `at_least` (5 s deadline); returns its value.
pub async fn wait_counter(
    proxy: &Proxy,
    name: &str,
    labels: &[(&str, &str)],
    at_least: f64,
) -> f64 {
    let what = format!("{name}{labels:?} >= {at_least}");
    poll_until(Duration::from_secs(5), &what, || async move {
        let n = counter(proxy, name, labels).await;
        if n >= at_least {
            Ok(())
        } else {
            Err(format!("value {n}"))
        }
    })
    .await;
    counter(proxy, name, labels).await
}

/// `leasegate_auth_failures_total{reason}` reaches `at_least`.
pub async fn wait_auth_failures(proxy: &Proxy, reason: &str, at_least: f64) -> f64 {
    wait_counter(
        proxy,
        "leasegate_auth_failures_total",
        &[("reason", reason)],
        at_least,
    )
    .await
}

/// `leasegate_tls_handshake_failures_total{reason}` reaches `at_least`.
pub async fn wait_tls_failures(proxy: &Proxy, reason: &str, at_least: f64) -> f64 {
    wait_counter(
        proxy,
        "leasegate_tls_handshake_failures_total",
        &[("reason", reason)],
        at_least,
    )
    .await
}

/// SSLRequest, TLS with `cert` (trusting the test CA), StartupMessage for `user`/`db`.
pub async fn tls_startup(
    port: u16,
    pki: &Pki,
    cert: Option<&ClientCert>,
    user: &str,
    db: &str,
) -> Raw {
    raw_startup(port, Transport::Tls(tls_config(pki, cert)), user, db).await
}

/// Panics unless the server ended the handshake with exactly `want`.
#[track_caller]
pub fn assert_alert(answer: &Raw, want: AlertDescription) {
    match answer {
        Raw::Alert(alert) if *alert == want => {}
        other => panic!("expected the TLS alert {want:?}, got {other:?}"),
    }
}

/// Panics unless the answer is a FATAL ErrorResponse with `code` whose message contains
/// every needle; returns the message.
#[track_caller]
pub fn assert_fatal<'a>(answer: &'a Raw, code: &str, needles: &[&str]) -> &'a str {
    let message = answer.expect_error(code);
    if let Raw::Error { severity, .. } = answer {
        assert_eq!(severity, "FATAL", "severity of {answer:?}");
    }
    for needle in needles {
        assert!(
            message.contains(needle),
            "message {message:?} should contain {needle:?}"
        );
    }
    message
}

/// True when `text` holds a control character other than tab (raw newlines, ESC, NUL, ...).
pub fn has_raw_control(text: &str) -> bool {
    text.chars().any(|c| c.is_control() && c != '\t')
}

/// A StartupMessage (protocol 3.0) whose parameter values are arbitrary bytes.
pub fn startup_bytes(params: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k);
        body.push(0);
        body.extend_from_slice(v);
        body.push(0);
    }
    body.push(0);
    let mut msg = u32::try_from(body.len() + 4)
        .expect("startup packet length fits u32")
        .to_be_bytes()
        .to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// Like [`Fixture::start_with`], but the leasegate config may also be edited as TOML
/// (`[listen] crl`, `[limits]`, `allow_md5`, ...; see [`super::proxy::set`]) and the process
/// started with `process` (environment, arguments).
pub async fn fixture_edited(
    name: &str,
    customize: impl FnOnce(ProxyConfig) -> ProxyConfig,
    process: ProcessOptions,
    edit: impl FnOnce(&mut toml::Table, &Pki),
) -> Fixture {
    let mount = fresh_mount(name).await;
    let pki = Pki::new();
    let good = pki.client("good", Identity::Uri(GOOD_URI.into()));
    let cfg =
        ProxyConfig::new(&pki, &mount).grant(&format!("uri:{GOOD_URI}"), &["myapp"], &["readonly"]);
    let edit_pki = pki.clone();
    let proxy = Proxy::start_process(customize(cfg), process, |t| edit(t, &edit_pki)).await;
    Fixture {
        mount,
        pki,
        good,
        proxy,
    }
}

/// A stand-in for a cluster peer that leasegate forwards cancels to (a fault the real
/// leasegate cannot produce on demand): it counts the connections it accepts and either holds
/// them open without a word (a peer that hangs) or closes them at once.
pub struct FakePeer {
    pub port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FakePeer {
    pub async fn start(hang: bool) -> FakePeer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake peer");
        let port = listener.local_addr().expect("fake peer address").port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if hang {
                    held.push(tcp);
                }
            }
        });
        FakePeer {
            port,
            accepted,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
