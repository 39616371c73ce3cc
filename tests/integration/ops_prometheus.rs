//! A real Prometheus (Debian package) scrapes a leasegate with deploy/prometheus/prometheus.yml
//! (discovery swapped for a static target), evaluates every rule of alerts.yml with health ok
//! and none firing for a healthy leasegate, and answers every query of the Grafana dashboard
//! (those over metrics this traffic produced with data).
//!
//! A cargo test rather than part of the "deploy checks" step of `scripts/test.sh`: it needs a
//! leasegate serving real sessions, so PostgreSQL, OpenBao and the test PKI of the harness.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::client::{current_user, pg_connect};
use crate::harness::fixture::Fixture;
use crate::harness::ops::{check_deploy, output_text, repo};
use crate::harness::{free_port, poll_until, root, tail};

/// Opens a session of the good client, runs a query, closes it; returns the upstream user.
async fn one_session(f: &Fixture) -> String {
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("session through leasegate");
    let user = current_user(&s).await;
    s.client
        .query_one("select count(*) from generate_series(1, 100)", &[])
        .await
        .expect("query through leasegate");
    drop(s.client);
    let _ = s.driver.await;
    user
}

/// A Prometheus server of one test (killed when dropped).
struct Prometheus {
    child: Child,
    port: u16,
    http: reqwest::Client,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts the Debian package's `prometheus` with deploy/prometheus/prometheus.yml aimed at
    /// `target` (scrape and rule interval 1 s), and waits until it is ready.
    async fn start(target: &str) -> Prometheus {
        let bin = which("prometheus").unwrap_or_else(|| {
            panic!(
                "the `prometheus` binary is not installed. Install the Debian package: \
                 apt-get install -y --no-install-recommends prometheus"
            )
        });
        let dir = root().tempdir("prometheus-");
        let config = dir.path().join("prometheus.yml");
        let out = check_deploy(&[
            "prometheus-config",
            "--target",
            target,
            "--interval",
            "1s",
            "--out",
            config.to_str().expect("utf-8 path"),
        ]);
        assert!(
            out.status.success(),
            "check-deploy.py prometheus-config: {}",
            output_text(&out)
        );
        let port = free_port();
        let log = dir.path().join("prometheus.log");
        let stdout = std::fs::File::create(&log).expect("create prometheus.log");
        let stderr = stdout.try_clone().expect("dup log fd");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn prometheus");
        root().register("KILL", child.id(), "prometheus");
        let mut prom = Prometheus {
            child,
            port,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("HTTP client"),
            log,
            _dir: dir,
        };
        prom.wait_ready().await;
        prom
    }

    /// Polls `/-/ready` for up to 30 s; panics with the log if Prometheus exits or is not
    /// ready by then.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", tail(&self.log, 4000));
            }
            let ready = self
                .http
                .get(format!("http://127.0.0.1:{}/-/ready", self.port))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after 30 s:\n{}",
                tail(&self.log, 4000)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn api(&self, path: &str, query: Option<&str>) -> Value {
        let mut url = format!("http://127.0.0.1:{}/api/v1/{path}", self.port);
        if let Some(q) = query {
            url.push_str("?query=");
            url.push_str(&percent_encode(q));
        }
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let body = resp.text().await.expect("prometheus answer");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {body}"))
    }

    /// An instant query; panics unless Prometheus accepts it.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let v = self.api("query", Some(expr)).await;
        assert_eq!(
            v["status"], "success",
            "Prometheus rejected the query {expr}: {v}"
        );
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of a one-sample instant query result.
fn sample_value(result: &[Value]) -> Option<f64> {
    result
        .first()
        .and_then(|r| r["value"][1].as_str())
        .and_then(|v| v.parse().ok())
}

/// Metrics the dashboard shows that 3 sessions produce: its queries over them return data.
const MUST_HAVE_DATA: [&str; 8] = [
    "leasegate_sessions_active",
    "leasegate_sessions_total",
    "leasegate_session_setup_duration_seconds_bucket",
    "leasegate_vault_request_duration_seconds_bucket",
    "leasegate_vault_requests_total",
    "leasegate_leases_active",
    "leasegate_relayed_bytes_total",
    "leasegate_build_info",
];

/// alerts.yml is loaded, every rule evaluated with health ok, and none fires.
async fn assert_alerts_evaluate_and_none_fires(prom: &Prometheus) {
    let alerts = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).expect("alerts.yml");
    let want = alerts.matches("- alert:").count();
    assert!(want > 0, "alerts.yml has no alert");
    poll_until(
        Duration::from_secs(20),
        "every alert rule evaluated with health ok",
        || async move {
            let v = prom.api("rules", None).await;
            let rules: Vec<Value> = v["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let bad: Vec<String> = rules
                .iter()
                .filter(|r| {
                    r["health"] != "ok"
                        || r["lastEvaluation"]
                            .as_str()
                            .unwrap_or("")
                            .starts_with("0001")
                })
                .map(|r| format!("{} health {} {}", r["name"], r["health"], r["lastError"]))
                .collect();
            if rules.len() == want && bad.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} of {want} rules loaded; not ok: {bad:?}",
                    rules.len()
                ))
            }
        },
    )
    .await;
    let firing = prom.api("alerts", None).await;
    let firing: Vec<&Value> = firing["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["state"] == "firing")
        .collect();
    assert!(
        firing.is_empty(),
        "a healthy leasegate fires alerts: {firing:?}"
    );
}

/// The dashboard's queries (check-deploy.py dashboard-exprs), with Grafana's variables
/// replaced.
fn dashboard_exprs() -> Vec<String> {
    let out = check_deploy(&["dashboard-exprs"]);
    assert!(
        out.status.success(),
        "dashboard-exprs: {}",
        output_text(&out)
    );
    let exprs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON string per line"))
        .collect();
    assert!(exprs.len() >= 20, "dashboard queries: {exprs:?}");
    exprs
}

/// Every query of the dashboard is valid PromQL; those over [`MUST_HAVE_DATA`] return data
/// (once every series has the two samples rate() needs).
async fn assert_dashboard_queries_answer(prom: &Prometheus) {
    poll_until(
        Duration::from_secs(20),
        "two samples of every series the dashboard needs",
        || async move {
            for name in MUST_HAVE_DATA {
                let r = prom
                    .query(&format!("min(count_over_time({name}[1m]))"))
                    .await;
                match sample_value(&r) {
                    Some(n) if n >= 2.0 => {}
                    other => return Err(format!("{name}: fewest samples {other:?}")),
                }
            }
            Ok(())
        },
    )
    .await;
    let exprs = dashboard_exprs();
    let mut empty = Vec::new();
    for expr in &exprs {
        if expr.starts_with("label_values(") {
            // A Grafana function, not PromQL: check the series it lists instead.
            let inner = &expr["label_values(".len()..expr.rfind(',').expect("label_values(q, l)")];
            assert!(!prom.query(inner).await.is_empty(), "{expr}: no series");
            continue;
        }
        let result = prom.query(expr).await;
        if result.is_empty() {
            empty.push(expr.clone());
            assert!(
                !MUST_HAVE_DATA.iter().any(|m| expr.contains(m))
                    || expr.contains("status!=\"2xx\"")
                    || expr.contains("result=\"error\""),
                "dashboard query returned nothing after 3 sessions: {expr}"
            );
        }
    }
    eprintln!(
        "{} dashboard queries valid, {} without data (no such traffic): {empty:#?}",
        exprs.len(),
        empty.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_leasegate_and_answers_the_alerts_and_dashboard() {
    let f = Fixture::start("ops-prometheus").await;
    let prom = Prometheus::start(&format!("127.0.0.1:{}", f.proxy.metrics_port)).await;
    for _ in 0..3 {
        one_session(&f).await;
    }
    let p = &prom;
    poll_until(
        Duration::from_secs(30),
        "Prometheus to see 3 ok sessions",
        || async move {
            let r = p.query("leasegate_sessions_total{outcome=\"ok\"}").await;
            match sample_value(&r) {
                Some(3.0) => Ok(()),
                other => Err(format!("value {other:?} (result {r:?})")),
            }
        },
    )
    .await;
    let up = prom.query("up{job=\"leasegate\"}").await;
    assert_eq!(sample_value(&up), Some(1.0), "{up:?}");
    assert_alerts_evaluate_and_none_fires(&prom).await;
    assert_dashboard_queries_answer(&prom).await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}
