//! Runs the real `leasegate` binary: writes its TOML config, starts it, waits until it is
//! listening, reads /metrics, and stops it (SIGTERM, then SIGKILL) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::bao::{Mount, ROOT_TOKEN};
use super::pki::{ClientCert, Pki};
use super::{env, free_port, root, tail};

pub const BIN: &str = env!("CARGO_BIN_EXE_leasegate");

/// One `[[databases]]` entry.
#[derive(Clone, Debug)]
pub struct Database {
    pub name: String,
    pub port: u16,
    /// `upstream_database`; `None` leaves the default (the entry's name).
    pub upstream_database: Option<String>,
    pub mount: String,
    pub roles: Vec<String>,
    pub connect_timeout: Option<String>,
}

/// One `[[grants]]` entry.
#[derive(Clone, Debug)]
pub struct Grant {
    pub identity: String,
    pub databases: Vec<String>,
    pub roles: Vec<String>,
}

/// Everything a test may vary in leasegate's config.
#[derive(Clone)]
pub struct ProxyConfig {
    pub pki: Pki,
    pub vault_address: String,
    pub vault_timeout: Option<String>,
    pub vault_token: String,
    pub login_timeout: Option<String>,
    pub databases: Vec<Database>,
    pub grants: Vec<Grant>,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

impl ProxyConfig {
    /// Real OpenBao, one database `myapp` on the shared cluster served by `mount`
    /// (roles readonly and readwrite), no grants yet.
    pub fn new(pki: &Pki, mount: &Mount) -> ProxyConfig {
        let env = env();
        ProxyConfig {
            pki: pki.clone(),
            vault_address: env.bao.addr.clone(),
            vault_timeout: None,
            vault_token: ROOT_TOKEN.to_string(),
            login_timeout: None,
            databases: vec![Database {
                name: "myapp".into(),
                port: env.pg.port,
                upstream_database: None,
                mount: mount.name.clone(),
                roles: strings(&["readonly", "readwrite"]),
                connect_timeout: None,
            }],
            grants: Vec::new(),
        }
    }

    /// For tests that start no service (`check-config`): Vault at 127.0.0.1:8200, one
    /// database `myapp` on port 5432 served by mount `database`, no grants yet.
    pub fn offline(pki: &Pki) -> ProxyConfig {
        ProxyConfig {
            pki: pki.clone(),
            vault_address: "http://127.0.0.1:8200".into(),
            vault_timeout: None,
            vault_token: "test-token".into(),
            login_timeout: None,
            databases: vec![Database {
                name: "myapp".into(),
                port: 5432,
                upstream_database: None,
                mount: "database".into(),
                roles: strings(&["readonly", "readwrite"]),
                connect_timeout: None,
            }],
            grants: Vec::new(),
        }
    }

    pub fn grant(mut self, identity: &str, databases: &[&str], roles: &[&str]) -> Self {
        self.grants.push(Grant {
            identity: identity.to_string(),
            databases: strings(databases),
            roles: strings(roles),
        });
        self
    }

    /// The config file text (`listen`/`metrics` on the given ports, token read from
    /// `token_file`).
    pub fn to_toml(&self, port: u16, metrics_port: u16, token_file: &Path) -> String {
        let mut t = String::new();
        t.push_str("[listen]\n");
        t.push_str(&format!("address = {}\n", q(&format!("127.0.0.1:{port}"))));
        t.push_str(&format!("cert = {}\n", qp(self.pki.server_cert())));
        t.push_str(&format!("key = {}\n", qp(self.pki.server_key())));
        t.push_str(&format!("client_ca = {}\n", qp(self.pki.ca_pem())));
        if let Some(v) = &self.login_timeout {
            t.push_str(&format!("login_timeout = {}\n", q(v)));
        }
        // Tests stop their proxies often: no drain delay unless a test sets one
        // (`set(t, "listen.drain_delay", "3s")`).
        t.push_str("drain_delay = \"0s\"\n");
        t.push_str("\n[vault]\n");
        t.push_str(&format!("address = {}\n", q(&self.vault_address)));
        if let Some(v) = &self.vault_timeout {
            t.push_str(&format!("timeout = {}\n", q(v)));
        }
        t.push_str("\n[vault.auth]\nmethod = \"token\"\n");
        t.push_str(&format!("token_file = {}\n", qp(token_file)));
        t.push_str("\n[metrics]\n");
        t.push_str(&format!(
            "address = {}\n",
            q(&format!("127.0.0.1:{metrics_port}"))
        ));
        for db in &self.databases {
            t.push_str("\n[[databases]]\n");
            t.push_str(&format!("name = {}\n", q(&db.name)));
            t.push_str("host = \"127.0.0.1\"\n");
            t.push_str(&format!("port = {}\n", db.port));
            if let Some(v) = &db.upstream_database {
                t.push_str(&format!("upstream_database = {}\n", q(v)));
            }
            t.push_str("tls = \"disable\"\n");
            if let Some(v) = &db.connect_timeout {
                t.push_str(&format!("connect_timeout = {}\n", q(v)));
            }
            t.push_str(&format!("mount = {}\n", q(&db.mount)));
            t.push_str(&format!("roles = {}\n", list(&db.roles)));
        }
        for g in &self.grants {
            t.push_str("\n[[grants]]\n");
            t.push_str(&format!("identity = {}\n", q(&g.identity)));
            t.push_str(&format!("databases = {}\n", list(&g.databases)));
            t.push_str(&format!("roles = {}\n", list(&g.roles)));
        }
        t
    }

    /// Writes the config (and token file) into `dir`; returns the config path.
    pub fn write(&self, dir: &Path, port: u16, metrics_port: u16) -> PathBuf {
        let token_file = dir.join("vault-token");
        write_secret(&token_file, &format!("{}\n", self.vault_token));
        let path = dir.join("leasegate.toml");
        std::fs::write(&path, self.to_toml(port, metrics_port, &token_file))
            .expect("write leasegate.toml");
        path
    }
}

/// Writes a secret file (token, secret ID) readable by its owner only, as leasegate demands.
pub fn write_secret(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    super::set_mode(path, 0o600).expect("chmod 600 secret file");
}

/// TOML basic string (JSON string syntax is valid TOML for our ASCII values).
fn q(s: &str) -> String {
    serde_json::to_string(s).expect("string to JSON")
}

fn qp(p: &Path) -> String {
    q(&p.display().to_string())
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| q(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// How to start a leasegate beyond its [`ProxyConfig`] (everything optional).
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// Client listener port; default: a free loopback port.
    pub port: Option<u16>,
    /// Admin (metrics) port; default: a free loopback port.
    pub metrics_port: Option<u16>,
    /// TOML appended verbatim to the generated config (e.g. a `[cluster]` section, see
    /// [`cluster_section`]).
    pub extra_toml: String,
}

/// How to run the leasegate process itself (see [`Proxy::start_process`]).
#[derive(Clone, Debug, Default)]
pub struct ProcessOptions {
    /// Environment variables, set after the defaults (so `RUST_LOG` here overrides the
    /// default `debug`).
    pub env: Vec<(String, String)>,
    /// Extra command-line arguments after `--config PATH` (e.g. `--log-format json`).
    pub args: Vec<String>,
    /// The open-file limit (soft, hard) the process starts with (set by `prlimit`, which
    /// then execs leasegate: the pid stays the same); default: the test's own.
    pub nofile: Option<(u64, u64)>,
}

/// A `[cluster]` section: `peers` are loopback ports of the other instances (named by the
/// address 127.0.0.1, which the harness server certificate carries), `peer_identity` the
/// pattern their client certificates match, `cert` this instance's client certificate, `ca`
/// the CA of the peers' server certificates.
pub fn cluster_section(peers: &[u16], peer_identity: &str, cert: &ClientCert, ca: &Path) -> String {
    let peers: Vec<String> = peers.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    cluster_section_hosts(&peers, peer_identity, cert, ca)
}

/// [`cluster_section`] with `peers` as written (`host:port`).
pub fn cluster_section_hosts(
    peers: &[String],
    peer_identity: &str,
    cert: &ClientCert,
    ca: &Path,
) -> String {
    format!(
        "\n[cluster]\npeers = {}\npeer_identity = {}\ncert = {}\nkey = {}\nca_cert = {}\n",
        list(peers),
        q(peer_identity),
        qp(&cert.cert),
        qp(&cert.key),
        qp(ca)
    )
}

/// Adds the TOML `section` text (e.g. from [`cluster_section`]) to a config table, for
/// [`Proxy::start_edited`].
pub fn merge_toml(config: &mut toml::Table, section: &str) {
    let extra: toml::Table = section.parse().expect("section is TOML");
    config.extend(extra);
}

/// A running leasegate process.
pub struct Proxy {
    child: Child,
    pub port: u16,
    pub metrics_port: u16,
    pub log: PathBuf,
    /// Keeps the PKI files alive as long as the process may read them.
    _pki: Pki,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts leasegate with `cfg` and waits (≤ 20 s) until it logs `listening` with its
    /// address and its /healthz answers 200. Panics with the log on failure.
    pub async fn start(cfg: ProxyConfig) -> Proxy {
        Proxy::start_with_options(cfg, StartOptions::default()).await
    }

    /// As [`Proxy::start`], with a chosen port and/or extra config text.
    pub async fn start_with_options(cfg: ProxyConfig, opts: StartOptions) -> Proxy {
        Proxy::launch(cfg, opts, |_| {}).await
    }

    /// As [`Proxy::start`], but `edit` may change the generated config (as a TOML table)
    /// first, for settings `ProxyConfig` has no field for; see [`set`] and [`table`].
    pub async fn start_edited(cfg: ProxyConfig, edit: impl FnOnce(&mut toml::Table)) -> Proxy {
        Proxy::launch(cfg, StartOptions::default(), edit).await
    }

    /// [`Proxy::start_edited`] with chosen ports and/or extra config text (`opts`).
    pub async fn start_options_edited(
        cfg: ProxyConfig,
        opts: StartOptions,
        edit: impl FnOnce(&mut toml::Table),
    ) -> Proxy {
        Proxy::launch(cfg, opts, edit).await
    }

    /// [`Proxy::start_edited`] with control over the process: environment and arguments.
    pub async fn start_process(
        cfg: ProxyConfig,
        process: ProcessOptions,
        edit: impl FnOnce(&mut toml::Table),
    ) -> Proxy {
        Proxy::launch_process(cfg, StartOptions::default(), process, edit).await
    }

    async fn launch(
        cfg: ProxyConfig,
        opts: StartOptions,
        edit: impl FnOnce(&mut toml::Table),
    ) -> Proxy {
        Proxy::launch_process(cfg, opts, ProcessOptions::default(), edit).await
    }

    async fn launch_process(
        cfg: ProxyConfig,
        opts: StartOptions,
        process: ProcessOptions,
        edit: impl FnOnce(&mut toml::Table),
    ) -> Proxy {
        let dir = root().tempdir("proxy-");
        let port = opts.port.unwrap_or_else(free_port);
        let metrics_port = opts.metrics_port.unwrap_or_else(free_port);
        let config_path = cfg.write(dir.path(), port, metrics_port);
        if !opts.extra_toml.is_empty() {
            let mut text = std::fs::read_to_string(&config_path).expect("read leasegate.toml");
            text.push_str(&opts.extra_toml);
            std::fs::write(&config_path, text).expect("append to leasegate.toml");
        }
        let mut config: toml::Table = std::fs::read_to_string(&config_path)
            .expect("read leasegate.toml")
            .parse()
            .expect("the generated config is TOML");
        let unedited = config.clone();
        edit(&mut config);
        if config != unedited {
            let text = toml::to_string(&config).expect("serialise leasegate.toml");
            std::fs::write(&config_path, text).expect("write leasegate.toml");
        }
        let log = dir.path().join("leasegate.log");
        let stderr = std::fs::File::create(&log).expect("create leasegate.log");
        let stdout = stderr.try_clone().expect("dup log fd");
        let mut command = match process.nofile {
            None => Command::new(BIN),
            Some((soft, hard)) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={soft}:{hard}")).arg("--").arg(BIN);
                c
            }
        };
        let child = command
            .arg("--config")
            .arg(&config_path)
            .args(&process.args)
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .env_remove("VAULT_TOKEN")
            .env_remove("VAULT_ADDR")
            .envs(process.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn leasegate");
        root().register("TERM", child.id(), "leasegate");
        let mut proxy = Proxy {
            child,
            port,
            metrics_port,
            log,
            _pki: cfg.pki.clone(),
            _dir: dir,
        };
        proxy.wait_ready().await;
        proxy
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let needle = format!("127.0.0.1:{}", self.port);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "leasegate exited during startup ({status}); log:\n{}",
                    self.log_text()
                );
            }
            let listening = self
                .log_text()
                .lines()
                .any(|l| l.contains("listening") && l.contains(&needle));
            if listening && matches!(self.get("/healthz").await, Ok((200, _))) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "leasegate not ready after 20 s (want a `listening` log line with {needle} \
                     and /healthz 200 on port {}); log:\n{}",
                    self.metrics_port,
                    tail(&self.log, 8000)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Process id of the leasegate process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The directory holding the config file (`leasegate.toml`) and the token file.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// The Vault token file the generated config names (`token` auth).
    pub fn token_file(&self) -> PathBuf {
        self.dir().join("vault-token")
    }

    /// Sends `signal` (a `kill` name: `TERM`, `INT`, `HUP`, `KILL`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(
            status.success(),
            "kill -{signal} {} failed",
            self.child.id()
        );
    }

    /// The exit status if the process has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for leasegate")
    }

    /// Polls until the process exits, at most `within`; `None` if it is still running.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL (leasegate gets no chance to clean up) and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `GET http://127.0.0.1:<metrics port><path>` → (status, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        let url = format!("http://127.0.0.1:{}{path}", self.metrics_port);
        let resp = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(|e| e.to_string())?;
        Ok((status, body))
    }

    /// The /metrics text (panics unless 200).
    pub async fn metrics(&self) -> String {
        match self.get("/metrics").await {
            Ok((200, body)) => body,
            other => panic!("GET /metrics: {other:?}"),
        }
    }
}

impl Proxy {
    /// Sends SIGTERM (if still running) and waits up to `within` for the exit.
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => return None,
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.terminate(Duration::from_secs(10)).is_none() {
            eprintln!(
                "leasegate (pid {}) ignored SIGTERM for 10 s; killing",
                self.child.id()
            );
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = self.log_text();
            let problems: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .take(60)
                .collect();
            eprintln!(
                "---- leasegate log ({}): warnings and errors ----\n{}\n---- tail ----\n{}\n\
                 ---- end of leasegate log ----",
                self.log.display(),
                problems.join("\n"),
                tail(&self.log, 8000)
            );
        }
    }
}

/// Sets `value` at a dotted `path` of a config table, creating tables on the way; a number
/// segment indexes an array of tables: `set(t, "listen.shutdown_grace", "1s")`,
/// `set(t, "databases.0.max_session_duration", "3s")`. A table value replaces the whole
/// table: `set(t, "vault.auth", table(&[("method", "approle"), ...]))`.
pub fn set(config: &mut toml::Table, path: &str, value: impl Into<toml::Value>) {
    let segments: Vec<&str> = path.split('.').collect();
    let (last, parents) = segments.split_last().expect("non-empty path");
    let mut here = config;
    let mut i = 0;
    while i < parents.len() {
        let seg = parents[i];
        let next = here
            .entry(seg.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        here = match next {
            toml::Value::Table(t) => {
                i += 1;
                t
            }
            toml::Value::Array(items) => {
                let index: usize = parents
                    .get(i + 1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("config path {path}: {seg} needs an index"));
                i += 2;
                match items.get_mut(index) {
                    Some(toml::Value::Table(t)) => t,
                    _ => panic!("config path {path}: no table {seg}[{index}]"),
                }
            }
            _ => panic!("config path {path}: {seg} is not a table"),
        };
    }
    here.insert(last.to_string(), value.into());
}

/// A TOML table of string values (e.g. a `[vault.auth]` section for [`set`]).
pub fn table(pairs: &[(&str, &str)]) -> toml::Table {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), toml::Value::String(v.to_string())))
        .collect()
}

/// Runs `leasegate check-config --config <file with toml>`.
pub fn check_config(toml: &str) -> Output {
    let dir = root().tempdir("check-");
    let path = dir.path().join("leasegate.toml");
    std::fs::write(&path, toml).expect("write config");
    Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run leasegate check-config")
}

/// Runs `leasegate --config <config>` expecting it to refuse to start: waits (10 s at most)
/// for it to exit and returns what it printed. Panics, naming `what`, if it keeps running.
pub fn refused_start(config: &Path, what: &str) -> Output {
    run_to_exit(&["--config".as_ref(), config.as_os_str()], what)
}

/// Runs `leasegate` with `args` to its exit (10 s at most) and returns what it printed;
/// panics, naming `what`, if it keeps running.
pub fn run_to_exit(args: &[&std::ffi::OsStr], what: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn leasegate");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait leasegate").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("leasegate {args:?} kept running with {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("leasegate output")
}
