//! Operations: the files in deploy/ exercised for real, and what an operator relies on at run
//! time.
//!
//! - deploy/ passes every static check of `scripts/check-deploy.py` (Containerfile, Kubernetes
//!   manifests and their invariants, the ConfigMap's and the example's config through
//!   `check-config`, the systemd unit, promtool config/rules/unit tests, the Grafana dashboard),
//!   with the metric names of the alerts and the dashboard checked against a live /metrics.
//! - A real Prometheus (Debian package) scrapes a leasegate with deploy/prometheus/prometheus.yml
//!   (discovery swapped for a static target), evaluates alerts.yml, and answers every dashboard
//!   query.
//! - deploy/openbao-setup.sh and deploy/openbao-approle.sh against the real OpenBao, then
//!   leasegate logging in with AppRole and serving a session.
//! - The audit log, SIGHUP reloads (server certificate, grants, a broken config), check-config
//!   reporting every problem at once and `--online`, and /readyz following Vault.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rcgen::{ExtendedKeyUsagePurpose, SanType, SerialNumber, date_time_ymd};
use reqwest::Method;
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::bao::{Mount, ROOT_TOKEN, Target, fresh_mount, leases};
use crate::harness::client::{Raw, Transport, current_user, pg_connect, raw_startup, tls_config};
use crate::harness::fixture::{Fixture, GOOD_URI};
use crate::harness::pg::pg_bin;
use crate::harness::pki::{ClientCert, Identity, Pki};
use crate::harness::proxy::{BIN, Proxy, ProxyConfig, check_config, set, table, write_secret};
use crate::harness::wire::tls_connect;
use crate::harness::{closed_port, dynamic_roles, env, free_port, next_id, poll_until, root, tail};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn repo(path: &str) -> PathBuf {
    Path::new(REPO).join(path)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `python3 scripts/check-deploy.py ARGS...`
fn check_deploy(args: &[&str]) -> Output {
    Command::new("python3")
        .arg(repo("scripts/check-deploy.py"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run python3 scripts/check-deploy.py")
}

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

/// Number of lines of leasegate's log containing `needle`.
pub(crate) fn log_count(proxy: &Proxy, needle: &str) -> usize {
    proxy
        .log_text()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Polls the log until more than `before` lines contain `needle`.
pub(crate) async fn wait_log(proxy: &Proxy, needle: &str, before: usize) {
    poll_until(
        Duration::from_secs(10),
        &format!("a new log line with {needle:?}"),
        || async move {
            match log_count(proxy, needle) {
                n if n > before => Ok(()),
                n => Err(format!(
                    "{n} such lines; log tail:\n{}",
                    tail(&proxy.log, 1500)
                )),
            }
        },
    )
    .await;
}

/// Sends SIGHUP and waits for the log line `needle` that answers it.
pub(crate) async fn reload(proxy: &Proxy, needle: &str) {
    let before = log_count(proxy, needle);
    proxy.signal("HUP");
    wait_log(proxy, needle, before).await;
}

pub(crate) fn config_path(proxy: &Proxy) -> PathBuf {
    proxy.dir().join("leasegate.toml")
}

pub(crate) fn read_config(proxy: &Proxy) -> toml::Table {
    std::fs::read_to_string(config_path(proxy))
        .expect("read leasegate.toml")
        .parse()
        .expect("leasegate.toml is TOML")
}

/// Replaces the config file atomically (a reload never reads half a file).
pub(crate) fn write_config_text(proxy: &Proxy, text: &str) {
    let path = config_path(proxy);
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, text).expect("write new config");
    std::fs::rename(&tmp, &path).expect("replace leasegate.toml");
}

// ------------------------------------------------------------------------------- deploy/

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
async fn deploy_files_pass_every_static_check() {
    let f = fixture_with_a_down_database("ops-deploy").await;
    let dir = root().tempdir("ops-deploy-");
    let metrics = scrape_after_traffic(&f, dir.path()).await;
    let out = check_deploy(&[
        "--leasegate",
        BIN,
        "--metrics",
        metrics.to_str().expect("utf-8 path"),
    ]);
    let said = text(&out);
    eprintln!("scripts/check-deploy.py:\n{said}");
    assert!(
        out.status.success(),
        "scripts/check-deploy.py found problems in deploy/:\n{said}"
    );
    assert!(said.lines().any(|l| l.ends_with(" 0 failed")), "{said}");
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

// ------------------------------------------------------------------------------- Prometheus

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
            text(&out)
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
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = prom.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", tail(&prom.log, 4000));
            }
            let ready = prom
                .http
                .get(format!("http://127.0.0.1:{port}/-/ready"))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                return prom;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after 30 s:\n{}",
                tail(&prom.log, 4000)
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

    // alerts.yml loads into a real Prometheus and every rule evaluates without error.
    let alerts = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).expect("alerts.yml");
    let want = alerts.matches("- alert:").count();
    assert!(want > 0, "alerts.yml has no alert");
    poll_until(
        Duration::from_secs(20),
        "every alert rule evaluated with health ok",
        || async move {
            let v = p.api("rules", None).await;
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

    // Every query of the dashboard is valid PromQL; those over metrics this traffic produced
    // return data (once every series has the two samples rate() needs).
    let must_have_data = [
        "leasegate_sessions_active",
        "leasegate_sessions_total",
        "leasegate_session_setup_duration_seconds_bucket",
        "leasegate_vault_request_duration_seconds_bucket",
        "leasegate_vault_requests_total",
        "leasegate_leases_active",
        "leasegate_relayed_bytes_total",
        "leasegate_build_info",
    ];
    let names = &must_have_data;
    poll_until(
        Duration::from_secs(20),
        "two samples of every series the dashboard needs",
        || async move {
            for name in names {
                let r = p.query(&format!("min(count_over_time({name}[1m]))")).await;
                match sample_value(&r) {
                    Some(n) if n >= 2.0 => {}
                    other => return Err(format!("{name}: fewest samples {other:?}")),
                }
            }
            Ok(())
        },
    )
    .await;
    let out = check_deploy(&["dashboard-exprs"]);
    assert!(out.status.success(), "dashboard-exprs: {}", text(&out));
    let exprs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON string per line"))
        .collect();
    assert!(exprs.len() >= 20, "dashboard queries: {exprs:?}");
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
                !must_have_data.iter().any(|m| expr.contains(m))
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
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

// ------------------------------------------------------------------------------- OpenBao scripts

/// Runs a deploy/ script with `envs`; panics with its output unless it succeeds.
fn run_script(script: &str, envs: &[(&str, String)]) -> String {
    let pg_dir = pg_bin("psql")
        .parent()
        .expect("PGBIN directory")
        .to_path_buf();
    let path = std::env::join_paths(std::iter::once(pg_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    let out = Command::new("bash")
        .arg(repo(script))
        .env("PATH", path)
        .env_remove("VAULT_TOKEN")
        .env_remove("VAULT_ADDR")
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let said = text(&out);
    assert!(out.status.success(), "{script} failed:\n{said}");
    said
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_scripts_set_up_an_approle_login_that_leasegate_uses() {
    let env = env();
    let n = next_id();
    let mount = Mount {
        name: format!("t{n}-ops-approle"),
        prefix: format!("lgt{n}_"),
    };
    let approle_mount = format!("approle-t{n}");
    let secrets = root().tempdir("ops-approle-");
    let role_id_file = secrets.path().join("role-id");
    let secret_id_file = secrets.path().join("secret-id");
    let vault = vec![
        ("VAULT_ADDR", env.bao.addr.clone()),
        ("VAULT_TOKEN", ROOT_TOKEN.to_string()),
        ("MOUNT", mount.name.clone()),
    ];

    // The database secrets engine, as an operator sets it up.
    let mut setup = vault.clone();
    setup.extend([
        ("PGHOST", "127.0.0.1".to_string()),
        ("PGPORT", env.pg.port.to_string()),
        ("PGUSER", "postgres".to_string()),
        ("PGPASSWORD", env.pg.password.clone()),
        ("PGDATABASE", "myapp".to_string()),
        ("USERNAME_PREFIX", mount.prefix.clone()),
    ]);
    let said = run_script("deploy/openbao-setup.sh", &setup);
    assert!(said.contains("verified readonly"), "{said}");

    // AppRole, twice: the second run keeps the secret_id.
    let mut approle = vault.clone();
    approle.extend([
        ("APPROLE_MOUNT", approle_mount.clone()),
        ("ROLE_ID_FILE", role_id_file.display().to_string()),
        ("SECRET_ID_FILE", secret_id_file.display().to_string()),
        ("TOKEN_PERIOD", "1h".to_string()),
    ]);
    let said = run_script("deploy/openbao-approle.sh", &approle);
    assert!(said.contains("periodic token"), "{said}");
    let secret_id = std::fs::read_to_string(&secret_id_file).expect("secret_id file");
    let said = run_script("deploy/openbao-approle.sh", &approle);
    assert!(said.contains("still valid, keeping it"), "{said}");
    assert_eq!(
        std::fs::read_to_string(&secret_id_file).expect("secret_id file"),
        secret_id,
        "a second run keeps the secret_id"
    );
    for file in [&role_id_file, &secret_id_file] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} mode {mode:o}", file.display());
    }
    let bao = Target::shared();
    let role = bao
        .read(&format!("auth/{approle_mount}/role/leasegate"))
        .await;
    assert_eq!(role["data"]["token_period"], json!(3600), "{role}");
    assert_eq!(
        role["data"]["token_policies"],
        json!([format!("leasegate-{}", mount.name)]),
        "{role}"
    );

    // leasegate logs in with those files and serves a session.
    let (rid, sid) = (
        role_id_file.display().to_string(),
        secret_id_file.display().to_string(),
    );
    let f = Fixture::with_mount(
        mount,
        Pki::new(),
        |cfg| cfg,
        |t| {
            let auth = table(&[
                ("method", "approle"),
                ("mount", &approle_mount),
                ("role_id_file", &rid),
                ("secret_id_file", &sid),
            ]);
            set(t, "vault.auth", auth);
        },
    )
    .await;
    let (ready, _) = f.proxy.get("/readyz").await.expect("/readyz");
    assert_eq!(ready, 200, "ready with the AppRole token");
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("session with an AppRole token");
    let user = current_user(&s).await;
    assert!(user.starts_with(&f.mount.prefix), "user {user}");
    assert_eq!(leases(&f.mount, "readonly").await.len(), 1);
    drop(s.client);
    let _ = s.driver.await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

// ------------------------------------------------------------------------------- audit log

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serial as hex without separators or leading zeros, lower case.
pub(crate) fn norm_serial(s: &str) -> String {
    let s: String = s
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect::<String>()
        .to_ascii_lowercase();
    s.trim_start_matches('0').to_string()
}

pub(crate) fn cert_serial(der: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, x509) = X509Certificate::from_der(der.as_ref()).expect("parse certificate");
    norm_serial(&hex(x509.raw_serial()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_sessions_and_refusals_without_the_vault_token() {
    // A token of its own, so that "the token appears nowhere" means something.
    let token = Target::shared()
        .write(
            Method::POST,
            "auth/token/create",
            &json!({"ttl": "1h", "display_name": "ops-audit"}),
        )
        .await["auth"]["client_token"]
        .as_str()
        .expect("client_token")
        .to_string();
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

    // One accepted session (with a query), one refused client.
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
    let stranger_uri = "spiffe://leasegate.test/app/stranger";
    let stranger = f.pki.client("stranger", Identity::Uri(stranger_uri.into()));
    let refused = raw_startup(
        f.proxy.port,
        Transport::Tls(tls_config(&f.pki, Some(&stranger))),
        "readonly",
        "myapp",
    )
    .await;
    refused.expect_error("28000");

    let path = &audit;
    poll_until(
        Duration::from_secs(10),
        "session_end and refused in the audit log",
        || async move {
            let t = std::fs::read_to_string(path).unwrap_or_default();
            if t.contains("\"session_end\"") && t.contains("\"refused\"") {
                Ok(())
            } else {
                Err(format!("audit log so far: {t}"))
            }
        },
    )
    .await;
    f.wait_all_revoked(Duration::from_secs(10)).await;

    let audit_text = std::fs::read_to_string(&audit).expect("read audit log");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&audit)
            .expect("stat audit log")
            .permissions(),
    );
    assert_eq!(
        mode & 0o777,
        0o600,
        "the audit log is created for leasegate only"
    );
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
    let (start, end, refusal) = (starts[0], ends[0], refusals[0]);
    assert!(
        start["time"].as_str() <= end["time"].as_str(),
        "session_start before session_end:\n{audit_text}"
    );
    for e in &events {
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
    let good_id = json!(format!("uri:{GOOD_URI}"));
    for e in [start, end] {
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
        assert_eq!(e["upstream_user"].as_str(), Some(user.as_str()), "{e}");
        let lease = e["lease_id"].as_str().unwrap_or("");
        assert!(
            lease.starts_with(&format!("{}/creds/readonly/", f.mount.name))
                && lease.ends_with(held[0].as_str()),
            "lease_id {lease:?} should be the session's lease {:?}",
            held[0]
        );
    }
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

    assert!(
        refusal["identities"]
            .as_array()
            .is_some_and(|ids| ids.contains(&json!(format!("uri:{stranger_uri}")))),
        "identities: {refusal}"
    );
    assert_eq!(refusal["sqlstate"], "28000", "{refusal}");
    let reason = refusal["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains(stranger_uri),
        "reason names the identity: {refusal}"
    );
    assert!(refusal.get("lease_id").is_none(), "{refusal}");
    assert!(refusal.get("upstream_user").is_none(), "{refusal}");

    assert!(
        !audit_text.contains(&token),
        "the Vault token appears in the audit log:\n{audit_text}"
    );
}

// ------------------------------------------------------------------------------- SIGHUP

/// The leaf certificate leasegate presents in a new handshake.
pub(crate) async fn presented_cert(f: &Fixture) -> CertificateDer<'static> {
    let tls = tls_connect(f.proxy.port, tls_config(&f.pki, Some(&f.good)))
        .await
        .expect("TLS handshake with leasegate");
    let (_, conn) = tls.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .expect("server certificate")
        .clone()
        .into_owned()
}

pub(crate) fn pem_cert(path: &Path) -> CertificateDer<'static> {
    let pem = std::fs::read(path).expect("read PEM");
    rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .expect("a certificate")
        .expect("PEM certificate")
}

/// A server certificate for localhost/127.0.0.1 from the test CA with serial `serial`.
pub(crate) fn server_cert(pki: &Pki, name: &str, serial: u64, expired: bool) -> ClientCert {
    pki.client_with(name, Identity::Dns("localhost".into()), |p| {
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.serial_number = Some(SerialNumber::from(serial));
        if expired {
            p.not_before = date_time_ymd(2020, 1, 1);
            p.not_after = date_time_ymd(2021, 1, 1);
        }
    })
}

pub(crate) async fn assert_query_works(s: &crate::harness::client::PgSession, what: &str) {
    let n: i64 = s
        .client
        .query_one("select count(*) from generate_series(1, 10)", &[])
        .await
        .unwrap_or_else(|e| panic!("{what}: query failed: {e:?}"))
        .get(0);
    assert_eq!(n, 10, "{what}");
}

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

// ------------------------------------------------------------------------------- check-config

#[test]
fn check_config_reports_every_problem_at_once() {
    let pki = Pki::new();
    let expired = server_cert(&pki, "expired-server", 0xe1, true);
    let mut cfg = ProxyConfig {
        pki: pki.clone(),
        vault_address: "http://127.0.0.1:8200".into(),
        vault_timeout: None,
        vault_token: "test-token".into(),
        login_timeout: None,
        databases: vec![crate::harness::proxy::Database {
            name: "myapp".into(),
            port: 5432,
            upstream_database: None,
            mount: "database".into(),
            roles: vec!["readonly".into()],
            connect_timeout: None,
        }],
        grants: Vec::new(),
    };
    cfg = cfg
        .grant("uri:spiffe://example.org/a", &["nosuchdb"], &["readonly"])
        .grant("uri:spiffe://example.org/b", &["myapp"], &["nosuchrole"]);
    let token_file = pki.dir().join("vault-token");
    write_secret(&token_file, "test-token\n");
    let missing_ca = pki.dir().join("missing-ca.pem");
    let toml = cfg
        .to_toml(6432, 9187, &token_file)
        .replace(
            &format!("{:?}", pki.server_cert().display().to_string()),
            &format!("{:?}", expired.cert.display().to_string()),
        )
        .replace(
            &format!("{:?}", pki.server_key().display().to_string()),
            &format!("{:?}", expired.key.display().to_string()),
        )
        .replace(
            &format!("{:?}", pki.ca_pem().display().to_string()),
            &format!("{:?}", missing_ca.display().to_string()),
        );
    assert!(
        toml.contains("expired-server.pem") && toml.contains("missing-ca.pem"),
        "{toml}"
    );

    let out = check_config(&toml);
    let said = text(&out);
    assert!(
        !out.status.success(),
        "check-config accepted:\n{toml}\nit said: {said}"
    );
    let problems = [
        ("the missing client CA file", "missing-ca.pem"),
        ("the expired server certificate", "expired-server.pem"),
        ("the grant naming an unknown database", "nosuchdb"),
        ("the grant naming an unknown role", "nosuchrole"),
    ];
    let missing: Vec<&str> = problems
        .iter()
        .filter(|(_, needle)| !said.contains(needle))
        .map(|(what, _)| *what)
        .collect();
    assert!(
        missing.is_empty(),
        "check-config should list every problem at once; it did not mention {missing:?}. \
         It said:\n{said}"
    );
    let expiry = said
        .lines()
        .find(|l| l.contains("expired-server.pem"))
        .unwrap_or_default();
    assert!(
        expiry.contains("not valid") || expiry.contains("expired"),
        "the server certificate problem should say it is expired: {expiry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_online_logs_in_to_vault_or_says_it_is_unreachable() {
    let pki = Pki::new();
    let mount = fresh_mount("ops-online").await;
    let cfg = ProxyConfig::new(&pki, &mount).grant("cn:nobody", &["myapp"], &["readonly"]);
    let dir = root().tempdir("ops-online-");
    let path = cfg.write(dir.path(), 6432, 9187);
    let run = |path: &Path| {
        Command::new(BIN)
            .args(["check-config", "--online", "--config"])
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .expect("run leasegate check-config --online")
    };
    let out = run(&path);
    assert!(
        out.status.success(),
        "--online with the real OpenBao: {}",
        text(&out)
    );

    let closed = ProxyConfig {
        vault_address: format!("http://127.0.0.1:{}", closed_port()),
        ..cfg
    };
    let path = closed.write(dir.path(), 6432, 9187);
    let out = run(&path);
    let said = text(&out);
    assert!(
        !out.status.success(),
        "--online against a closed port passed: {said}"
    );
    assert!(said.contains("Vault unreachable"), "{said}");
}

// ------------------------------------------------------------------------------- /readyz

/// Forwards every TCP connection on `listener` to `to` (a Vault that "comes back").
fn forward(listener: TcpListener, to: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_vault_is_reachable_then_200() {
    let mount = fresh_mount("ops-readyz").await;
    let pki = Pki::new();
    let good = pki.client("good", Identity::Uri(GOOD_URI.into()));
    let vault_port = free_port();
    let mut cfg =
        ProxyConfig::new(&pki, &mount).grant(&format!("uri:{GOOD_URI}"), &["myapp"], &["readonly"]);
    cfg.vault_address = format!("http://127.0.0.1:{vault_port}");
    cfg.vault_timeout = Some("1s".into());
    let proxy = Proxy::start(cfg).await;

    let started = Instant::now();
    let p = &proxy;
    for _ in 0..5 {
        let (status, body) = p.get("/readyz").await.expect("/readyz");
        assert_eq!(status, 503, "Vault unreachable: not ready ({body})");
        let (health, _) = p.get("/healthz").await.expect("/healthz");
        assert_eq!(health, 200, "alive all the same");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = raw_startup(
        proxy.port,
        Transport::Tls(tls_config(&pki, Some(&good))),
        "readonly",
        "myapp",
    )
    .await;
    let message = refused.expect_error("08006");
    assert!(
        message.starts_with("could not obtain credentials"),
        "{message}"
    );

    // Vault "comes back" on that address.
    let bao = env().bao.addr.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind(("127.0.0.1", vault_port))
        .await
        .expect("bind the Vault address");
    let relay = forward(listener, bao);
    poll_until(
        Duration::from_secs(40),
        "/readyz 200 once Vault answers",
        || async move {
            match p.get("/readyz").await {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    eprintln!("ready {:?} after start", started.elapsed());
    let s = pg_connect(proxy.port, &pki, Some(&good), "readonly", "myapp")
        .await
        .expect("session once Vault is reachable");
    let user = current_user(&s).await;
    assert!(user.starts_with(&mount.prefix), "user {user}");
    drop(s.client);
    let _ = s.driver.await;
    crate::harness::fixture::wait_all_revoked(&mount, Duration::from_secs(10)).await;
    assert!(dynamic_roles(&mount.prefix).await.is_empty());
    drop(proxy);
    relay.abort();
}
