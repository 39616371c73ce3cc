//! deploy/ against a live leasegate: every `leasegate_*` metric name and label that
//! deploy/prometheus/alerts.yml and the Grafana dashboard select on is served by the binary,
//! checked on a /metrics scrape taken after traffic that makes every family appear
//! (`scripts/check-deploy.py --only metric-names`).
//!
//! The static checks of deploy/ (hadolint, kubernetes-validate, systemd-analyze, promtool,
//! check-config on the shipped configs...) need none of the harness's services: they are the
//! "deploy checks" step of `scripts/test.sh`, not a cargo test. A real Prometheus over a live
//! leasegate is `ops_prometheus.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::bao::Target;
use crate::harness::client::{Raw, Transport, current_user, pg_connect, raw_startup, tls_config};
use crate::harness::fixture::{Fixture, GOOD_URI};
use crate::harness::ops::{check_deploy, output_text};
use crate::harness::pki::{ClientCert, Identity};
use crate::harness::{closed_port, poll_until, root};

/// A fixture whose leasegate also knows a database `down` on a closed port (granted to the
/// good client), for upstream errors.
async fn fixture_with_a_down_database(name: &str) -> Fixture {
    Fixture::start_with(name, |mut cfg| {
        let mut down = cfg.databases[0].clone();
        down.name = "down".into();
        down.port = closed_port();
        down.upstream_database = Some("myapp".into());
        down.connect_timeout = Some("2s".into());
        cfg.databases.push(down);
        cfg.grant(&format!("uri:{GOOD_URI}"), &["down"], &["readonly"])
    })
    .await
}

/// Drives a leasegate (from [`fixture_with_a_down_database`]) through every event that makes
/// a metric family appear on /metrics (prometheus-client leaves a family out until its first
/// sample): a session whose lease is renewed (readonly TTL 3 s) and revoked, a refused client,
/// a client from an untrusted CA, and a session whose upstream is down. Writes the scrape
/// into `dir`; returns its path.
async fn scrape_after_traffic(f: &Fixture, dir: &Path) -> PathBuf {
    Target::shared()
        .set_role_ttl(&f.mount, "readonly", "3s", "1h")
        .await;
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("session through leasegate");
    current_user(&s).await;
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(15),
        "a lease renewal on /metrics",
        || async move {
            let m = proxy.metrics().await;
            if m.contains("leasegate_lease_renewals_total{") {
                Ok(())
            } else {
                Err("no lease renewal yet".into())
            }
        },
    )
    .await;
    s.client
        .query_one("select count(*) from generate_series(1, 100)", &[])
        .await
        .expect("query through leasegate");
    drop(s.client);
    let _ = s.driver.await;

    let tls = |cert: &ClientCert| Transport::Tls(tls_config(&f.pki, Some(cert)));
    let stranger = f.pki.client(
        "stranger",
        Identity::Uri("spiffe://leasegate.test/app/stranger".into()),
    );
    let refused = raw_startup(f.proxy.port, tls(&stranger), "readonly", "myapp").await;
    refused.expect_error("28000");
    let foreign = f.pki.untrusted_client(
        "foreign",
        Identity::Uri("spiffe://elsewhere.test/app".into()),
    );
    let alert = raw_startup(f.proxy.port, tls(&foreign), "readonly", "myapp").await;
    assert!(
        matches!(alert, Raw::Alert(_)),
        "untrusted client: {alert:?}"
    );
    let down = raw_startup(f.proxy.port, tls(&f.good), "readonly", "down").await;
    down.expect_error("08006");

    let families = [
        "leasegate_sessions_total{",
        "leasegate_lease_revocations_total{",
        "leasegate_lease_renewals_total{",
        "leasegate_auth_failures_total{",
        "leasegate_tls_handshake_failures_total{",
        "leasegate_upstream_errors_total{",
        "leasegate_relayed_bytes_total{",
        "leasegate_session_setup_duration_seconds_bucket{",
    ];
    poll_until(
        Duration::from_secs(10),
        "every metric family on /metrics",
        || async move {
            let m = proxy.metrics().await;
            let missing: Vec<&str> = families
                .iter()
                .copied()
                .filter(|f| !m.contains(f))
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("missing {missing:?}"))
            }
        },
    )
    .await;
    let path = dir.join("metrics.txt");
    std::fs::write(&path, f.proxy.metrics().await).expect("write metrics scrape");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_dashboard_use_only_served_metric_names() {
    let f = fixture_with_a_down_database("ops-deploy").await;
    let dir = root().tempdir("ops-deploy-");
    let metrics = scrape_after_traffic(&f, dir.path()).await;
    let out = check_deploy(&[
        "--only",
        "metric-names",
        "--metrics",
        metrics.to_str().expect("utf-8 path"),
    ]);
    let said = output_text(&out);
    eprintln!("scripts/check-deploy.py --only metric-names:\n{said}");
    assert!(
        out.status.success(),
        "deploy/ uses metric names or labels leasegate does not serve:\n{said}"
    );
    assert!(said.lines().any(|l| l == "1 passed, 0 failed"), "{said}");
    f.wait_all_revoked(Duration::from_secs(10)).await;
}
