//! /metrics, /healthz and /readyz as an operator sees them after a few sessions.

use std::time::Duration;

use crate::harness::client::{Transport, current_user, pg_connect, raw_startup};
use crate::harness::fixture::Fixture;
use crate::harness::metrics::{value, value_or_zero};
use crate::harness::poll_until;
use crate::harness::proxy::Proxy;

const SESSIONS: f64 = 3.0;

/// Reads the metrics that describe session and lease state.
struct Snapshot {
    ok: f64,
    rejected: f64,
    active: Option<f64>,
    leases_active: Option<f64>,
    revoked_ok: f64,
    creds: f64,
}

async fn snapshot(proxy: &Proxy) -> (Snapshot, String) {
    let m = proxy.metrics().await;
    let s = Snapshot {
        ok: value_or_zero(&m, "leasegate_sessions_total", &[("outcome", "ok")]),
        rejected: value_or_zero(&m, "leasegate_sessions_total", &[("outcome", "rejected")]),
        active: value(&m, "leasegate_sessions_active", &[]),
        leases_active: value(&m, "leasegate_leases_active", &[]),
        revoked_ok: value_or_zero(&m, "leasegate_lease_revocations_total", &[("result", "ok")]),
        creds: value_or_zero(
            &m,
            "leasegate_vault_request_duration_seconds_count",
            &[("op", "creds")],
        ),
    };
    (s, m)
}

#[tokio::test]
async fn metrics_follow_sessions_leases_and_rejections() {
    let f = Fixture::start("metrics").await;
    let proxy = &f.proxy;

    let (status, body) = proxy.get("/healthz").await.expect("GET /healthz");
    assert_eq!((status, body.trim()), (200, "ok"), "/healthz");
    let (status, _) = proxy.get("/readyz").await.expect("GET /readyz");
    assert_eq!(status, 200, "/readyz once listening");

    // While one session is open, the gauges show it.
    let open = pg_connect(proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("connect");
    current_user(&open).await;
    let (s, text) = snapshot(proxy).await;
    assert_eq!(
        s.active,
        Some(1.0),
        "sessions_active during a session:\n{text}"
    );
    assert_eq!(
        s.leases_active,
        Some(1.0),
        "leases_active during a session:\n{text}"
    );
    drop(open.client);
    let _ = open.driver.await;

    for _ in 1..SESSIONS as usize {
        let s = pg_connect(proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
            .await
            .expect("connect");
        current_user(&s).await;
        drop(s.client);
        let _ = s.driver.await;
    }

    poll_until(
        Duration::from_secs(10),
        "metrics after 3 closed sessions",
        || async move {
            let (s, text) = snapshot(proxy).await;
            let settled = s.ok == SESSIONS
                && s.active == Some(0.0)
                && s.leases_active == Some(0.0)
                && s.revoked_ok == SESSIONS;
            if settled { Ok(()) } else { Err(text) }
        },
    )
    .await;
    let (s, text) = snapshot(proxy).await;
    assert_eq!(s.creds, SESSIONS, "one creds request per session:\n{text}");
    assert_eq!(s.rejected, 0.0, "no rejection yet:\n{text}");
    f.wait_all_revoked(Duration::from_secs(5)).await;

    // One rejection shows up in auth failures and sessions_total{outcome="rejected"}.
    let answer = raw_startup(proxy.port, Transport::Plain, "readonly", "myapp").await;
    answer.expect_error("28000");
    poll_until(
        Duration::from_secs(5),
        "auth failure counted",
        || async move {
            let (s, text) = snapshot(proxy).await;
            let failures = value(
                &text,
                "leasegate_auth_failures_total",
                &[("reason", "plaintext")],
            );
            if failures == Some(1.0) && s.rejected == 1.0 && s.ok == SESSIONS {
                Ok(())
            } else {
                Err(text)
            }
        },
    )
    .await;
}
