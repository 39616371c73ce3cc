//! Configuration: the TOML file's serde structs (unknown keys are errors), defaults, and
//! `validate()`, which checks everything that can be checked without the network and reports
//! every problem at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use crate::identity::IdentityPattern;
use crate::protocol::options;
use crate::secret_files::{Finding, check_secret_file};

/// The whole configuration file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Client-facing listener and its TLS material.
    pub listen: ListenConfig,
    /// Where credentials come from.
    pub vault: VaultConfig,
    /// Admin HTTP endpoint; absent means no metrics server.
    pub metrics: Option<MetricsConfig>,
    /// Upstream databases clients may ask for, by name.
    #[serde(default)]
    pub databases: Vec<DatabaseConfig>,
    /// Which identities may use which roles on which databases.
    #[serde(default)]
    pub grants: Vec<GrantConfig>,
    /// Audit log destination; absent: stderr.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Abuse limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Other leasegate instances behind the same load balancer (cancel forwarding).
    pub cluster: Option<ClusterConfig>,
    /// Process settings.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// The file this configuration was read from (not a key): checked like a secret file
    /// when it holds `vault.auth.token` inline.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[runtime]`
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads relaying sessions; default: one per CPU. On a small machine shared with the
    /// database, fewer threads mean fewer cross-thread wake-ups per query.
    pub worker_threads: Option<usize>,
}

/// `[cluster]`
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `host:port` of every other instance's client listener; a DNS name stands for all the
    /// addresses it resolves to (a Kubernetes headless service, say).
    pub peers: Vec<String>,
    /// Identity pattern the peers' client certificates match (`uri:…`, `dns:…`, `cn:…`).
    pub peer_identity: String,
    /// Client certificate this instance presents to peers. Peers run the same configuration,
    /// so it must chain to `listen.client_ca` with the clientAuth usage and match
    /// `peer_identity`; both are checked at load.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// CA the peers' server certificates chain to. Required (an `Option` only so that a
    /// missing key is reported with the other problems): the client CA is not a server CA.
    pub ca_cert: Option<PathBuf>,
}

/// `[limits]`
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Sessions (in setup or relaying) through this instance at once.
    pub max_sessions: u32,
    /// Concurrent sessions per certificate identity.
    pub max_sessions_per_identity: u32,
    /// Sustained rate of new sessions per identity (token bucket refill per second).
    pub new_sessions_per_second_per_identity: f64,
    /// Bucket size: new sessions an identity may open in a burst.
    pub burst_per_identity: u32,
    /// Cancel requests handled per second in all (the burst is the same number); more are
    /// dropped unanswered. Cancels need no certificate, so this bounds what they cost.
    pub cancels_per_second: u32,
    /// Cancel requests handled per second from one source address (IPv6: one /64).
    pub cancels_per_second_per_address: u32,
    /// Cancel requests being forwarded at once; more are dropped unanswered.
    pub max_concurrent_cancels: u32,
}

impl LimitsConfig {
    /// Every limit must be able to let a session through: integers at least 1, the rate a
    /// finite number above 0 (`nan` would compare false everywhere and turn the bucket off).
    fn problems(&self, problems: &mut Vec<String>) {
        for (key, value) in [
            ("max_sessions", self.max_sessions),
            ("max_sessions_per_identity", self.max_sessions_per_identity),
            ("burst_per_identity", self.burst_per_identity),
            ("cancels_per_second", self.cancels_per_second),
            (
                "cancels_per_second_per_address",
                self.cancels_per_second_per_address,
            ),
            ("max_concurrent_cancels", self.max_concurrent_cancels),
        ] {
            if value == 0 {
                problems.push(format!("limits.{key} must be at least 1 (got 0)"));
            }
        }
        let rate = self.new_sessions_per_second_per_identity;
        if !(rate.is_finite() && rate > 0.0) {
            problems.push(format!(
                "limits.new_sessions_per_second_per_identity must be a finite number above 0 (got {rate})"
            ));
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sessions: 10_000,
            max_sessions_per_identity: 1_000,
            new_sessions_per_second_per_identity: 100.0,
            burst_per_identity: 200,
            cancels_per_second: 100,
            cancels_per_second_per_address: 10,
            max_concurrent_cancels: 64,
        }
    }
}

impl ClusterConfig {
    fn problems(&self, problems: &mut Vec<String>) {
        if let Err(e) = IdentityPattern::parse(&self.peer_identity) {
            problems.push(format!("cluster.peer_identity: {e}"));
        }
        if self.peers.is_empty() {
            problems.push("cluster.peers is empty: name the other instances".into());
        }
        if self.ca_cert.is_none() {
            problems.push(CLUSTER_CA_REQUIRED.into());
        }
    }
}

/// The problem line for a `[cluster]` without `ca_cert`.
pub const CLUSTER_CA_REQUIRED: &str = "cluster.ca_cert is required: the CA that the peers' \
     server certificates chain to (it is no longer taken from listen.client_ca, a client CA)";

/// `[audit]`
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// File the JSON lines are appended to; absent or `-`: stderr.
    pub path: Option<PathBuf>,
}

/// `[listen]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Address clients connect to.
    pub address: SocketAddr,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA bundle client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM or DER) checked for client certificates.
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// Limit for the whole pre-authentication phase: TLS handshake and startup packet.
    #[serde(default = "default_login_timeout", with = "humantime_serde")]
    pub login_timeout: Duration,
    /// Most client connections open at once; further connections wait in the accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How long open sessions may run on after SIGTERM/SIGINT before they are ended.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// When set, the configuration file and the TLS files are checked this often and reloaded
    /// when one changed (as on SIGHUP): certificate rotation without a signal.
    #[serde(default, with = "humantime_serde")]
    pub watch_interval: Option<Duration>,
    /// Idle time before TCP keepalive probes start on client connections; a client that
    /// vanished is detected about 1.75 × this later.
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    pub tcp_keepalive: Duration,
}

/// `[vault]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// Base URL of Vault or OpenBao.
    pub address: String,
    /// CA bundle for an https Vault address (PEM); default: the system roots.
    pub ca_cert: Option<PathBuf>,
    /// Vault Enterprise / OpenBao namespace sent as `X-Vault-Namespace`.
    pub namespace: Option<String>,
    /// Limit for every Vault HTTP request.
    #[serde(default = "default_vault_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How leasegate authenticates to Vault.
    pub auth: VaultAuthConfig,
}

/// `[vault.auth]`
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct VaultAuthConfig {
    /// How leasegate logs in: token, approle, cert or kubernetes.
    pub method: AuthMethod,
    /// `token`: the token inline (prefer `token_file`).
    pub token: Option<SecretString>,
    /// `token`: file holding the token; re-read when it changes.
    pub token_file: Option<PathBuf>,
    /// Mount path of the auth method; default: the method's name.
    pub mount: Option<String>,
    /// `approle`: the role_id.
    pub role_id: Option<String>,
    /// `approle`: file holding the role_id (instead of `role_id`).
    pub role_id_file: Option<PathBuf>,
    /// `approle`: file holding the secret_id (re-read at every login).
    pub secret_id_file: Option<PathBuf>,
    /// `kubernetes`: the Vault role to log in as; `cert`: the certificate role name (optional).
    pub role: Option<String>,
    /// `kubernetes`: service-account token file.
    #[serde(default = "default_jwt_file")]
    pub jwt_file: PathBuf,
    /// `cert`: leasegate's client certificate for Vault (PEM).
    pub cert: Option<PathBuf>,
    /// `cert`: its private key (PEM).
    pub key: Option<PathBuf>,
}

impl VaultAuthConfig {
    /// Mount path of the auth method.
    pub fn mount(&self) -> &str {
        self.mount.as_deref().unwrap_or(match self.method {
            AuthMethod::Token => "token",
            AuthMethod::Approle => "approle",
            AuthMethod::Cert => "cert",
            AuthMethod::Kubernetes => "kubernetes",
        })
    }

    fn problems(&self, problems: &mut Vec<String>) {
        let need = |ok: bool, what: &str, problems: &mut Vec<String>| {
            if !ok {
                problems.push(format!("vault.auth: method {:?} needs {what}", self.method));
            }
        };
        match self.method {
            AuthMethod::Token => {}
            AuthMethod::Approle => {
                need(
                    self.role_id.is_some() || self.role_id_file.is_some(),
                    "role_id or role_id_file",
                    problems,
                );
                need(self.secret_id_file.is_some(), "secret_id_file", problems);
            }
            AuthMethod::Cert => need(
                self.cert.is_some() && self.key.is_some(),
                "cert and key",
                problems,
            ),
            AuthMethod::Kubernetes => need(self.role.is_some(), "role", problems),
        }
        if !self.mount().split('/').all(is_safe_path_segment) {
            problems.push(format!(
                "vault.auth.mount {:?} is not a valid Vault path",
                self.mount()
            ));
        }
    }
}

fn default_jwt_file() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}

/// Supported Vault auth methods.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    /// A Vault token from config, file or `VAULT_TOKEN`.
    Token,
    /// AppRole: role_id and secret_id.
    Approle,
    /// TLS certificate auth with leasegate's own client certificate.
    Cert,
    /// Kubernetes service-account JWT.
    Kubernetes,
}

/// `[metrics]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the admin HTTP server (`/metrics`, `/healthz`, `/readyz`).
    pub address: SocketAddr,
}

/// One `[[databases]]` entry.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The database name clients ask for.
    pub name: String,
    /// Upstream host name or address.
    pub host: String,
    /// Upstream port.
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Database name on the upstream server; default: `name`.
    pub upstream_database: Option<String>,
    /// TLS to the upstream server.
    #[serde(default)]
    pub tls: UpstreamTls,
    /// CA bundle for `verify-ca` / `verify-full` (PEM).
    pub ca_cert: Option<PathBuf>,
    /// Limit for connecting and logging in upstream.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Vault database secrets engine mount.
    pub mount: String,
    /// Vault roles clients may ask for, as their user name.
    pub roles: Vec<String>,
    /// Accept MD5 password authentication from the upstream (off: SCRAM only).
    #[serde(default)]
    pub allow_md5: bool,
    /// Credentials to keep issued ahead of demand, per role (`{ readonly = 4 }`).
    #[serde(default)]
    pub prefetch: std::collections::BTreeMap<String, usize>,
    /// A prefetched credential unused this long is revoked and replaced.
    #[serde(default = "default_prefetch_max_idle", with = "humantime_serde")]
    pub prefetch_max_idle: Duration,
    /// Idle time before TCP keepalive probes start on upstream connections.
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// End sessions after this long, whatever their credential allows.
    #[serde(default, with = "humantime_serde")]
    pub max_session_duration: Option<Duration>,
    /// How long before leasegate ends a session (credential at its maximum lifetime, or
    /// `max_session_duration`) the client gets a warning NoticeResponse.
    #[serde(default = "default_expiry_warning", with = "humantime_serde")]
    pub expiry_warning: Duration,
    /// Settings clients may send at startup besides the built-in allow-list
    /// (`crate::upstream::params::DEFAULT_ALLOWED`), e.g. `["work_mem", "myapp.tenant"]`.
    #[serde(default)]
    pub allow_startup_parameters: Vec<String>,
}

impl DatabaseConfig {
    /// The database name sent upstream.
    pub fn upstream_database(&self) -> &str {
        self.upstream_database.as_deref().unwrap_or(&self.name)
    }
}

/// Upstream TLS mode, with libpq's `sslmode` meanings.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS without certificate verification.
    Require,
    /// TLS, certificate must chain to `ca_cert`.
    VerifyCa,
    /// TLS, certificate must chain to `ca_cert` and name `host`.
    VerifyFull,
}

/// One `[[grants]]` entry.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// Identity pattern: `uri:…`, `dns:…` or `cn:…`, with `*` / `**` globs.
    pub identity: String,
    /// Database names (`[[databases]].name`) this grant covers; `*` for all.
    pub databases: Vec<String>,
    /// Vault roles this grant covers; `*` for all roles of the database.
    pub roles: Vec<String>,
}

fn default_login_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_vault_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_prefetch_max_idle() -> Duration {
    Duration::from_secs(300)
}
fn default_keepalive() -> Duration {
    Duration::from_secs(60)
}
fn default_expiry_warning() -> Duration {
    Duration::from_secs(60)
}
fn default_pg_port() -> u16 {
    5432
}

/// Problems found while loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The config path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The config path.
        path: PathBuf,
        /// The TOML error, with line and column.
        message: String,
    },
    /// Semantic problems, all of them.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl Config {
    /// Reads, parses and validates the file; relative paths are resolved against the file's
    /// directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let config = Config::load_unvalidated(path)?;
        config.validate()?;
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        Ok(config)
    }

    /// Reads and parses the file and resolves relative paths, without validating, so that
    /// `check-config` can collect the validation problems together with its own.
    pub fn load_unvalidated(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        if let Some(base) = path.parent() {
            config.resolve_paths(base);
        }
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses TOML text without validating it.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.listen.cert);
        fix(&mut self.listen.key);
        fix(&mut self.listen.client_ca);
        self.listen.crl.iter_mut().for_each(fix);
        self.vault.ca_cert.iter_mut().for_each(fix);
        self.audit
            .path
            .iter_mut()
            .filter(|p| p.as_os_str() != "-")
            .for_each(fix);
        let auth = &mut self.vault.auth;
        auth.token_file.iter_mut().for_each(fix);
        auth.role_id_file.iter_mut().for_each(fix);
        auth.secret_id_file.iter_mut().for_each(fix);
        auth.cert.iter_mut().for_each(fix);
        auth.key.iter_mut().for_each(fix);
        for db in &mut self.databases {
            db.ca_cert.iter_mut().for_each(fix);
        }
        if let Some(cluster) = &mut self.cluster {
            fix(&mut cluster.cert);
            fix(&mut cluster.key);
            cluster.ca_cert.iter_mut().for_each(fix);
        }
    }

    /// Checks cross-references and values; returns every problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Every problem `validate` finds, as lines.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        self.validate_files(&mut problems);
        if !(self.vault.address.starts_with("http://")
            || self.vault.address.starts_with("https://"))
        {
            problems.push(format!(
                "vault.address {:?} must start with http:// or https://",
                self.vault.address
            ));
        }
        self.vault.auth.problems(&mut problems);
        self.limits.problems(&mut problems);
        if self.runtime.worker_threads == Some(0) {
            problems.push("runtime.worker_threads must be at least 1".into());
        }
        if self.listen.max_connections == 0 {
            problems.push("listen.max_connections must be at least 1".into());
        }
        if let Some(cluster) = &self.cluster {
            cluster.problems(&mut problems);
        }
        self.validate_databases(&mut problems);
        self.validate_grants(&mut problems);
        problems
    }

    /// Every file that holds a secret, by key, and whether every user reading it refuses the
    /// configuration (`false`: a warning). The Kubernetes service-account token (`jwt_file`) is
    /// left out: the kubelet mounts it world-readable itself.
    fn secret_files(&self) -> Vec<(&'static str, &Path, bool)> {
        let auth = &self.vault.auth;
        let mut files = vec![("listen.key", self.listen.key.as_path(), true)];
        if let Some(cluster) = &self.cluster {
            files.push(("cluster.key", &cluster.key, true));
        }
        let optional = [
            ("vault.auth.key", &auth.key, true),
            ("vault.auth.token_file", &auth.token_file, true),
            ("vault.auth.secret_id_file", &auth.secret_id_file, true),
            ("vault.auth.role_id_file", &auth.role_id_file, false),
        ];
        for (key, path, strict) in optional {
            files.extend(path.as_deref().map(|p| (key, p, strict)));
        }
        if auth.token.is_some()
            && let Some(source) = &self.source
        {
            files.push((
                "the configuration file (it holds vault.auth.token)",
                source,
                true,
            ));
        }
        files
    }

    /// What `check_secret_file` says of every secret file.
    fn secret_file_findings(&self) -> impl Iterator<Item = Finding> + '_ {
        self.secret_files()
            .into_iter()
            .map(|(key, path, strict)| check_secret_file(key, path, strict))
    }

    /// Things worth an operator's attention that do not refuse the configuration (secret
    /// files their group can read); `load` logs them, `check-config` shows them.
    pub fn warnings(&self) -> Vec<String> {
        self.secret_file_findings()
            .filter_map(|f| match f {
                Finding::Warning(w) => Some(w),
                _ => None,
            })
            .collect()
    }

    fn validate_files(&self, problems: &mut Vec<String>) {
        let mut files: Vec<(&str, &PathBuf)> = vec![
            ("listen.cert", &self.listen.cert),
            ("listen.key", &self.listen.key),
            ("listen.client_ca", &self.listen.client_ca),
        ];
        files.extend(self.listen.crl.iter().map(|p| ("listen.crl", p)));
        files.extend(self.vault.ca_cert.iter().map(|p| ("vault.ca_cert", p)));
        let auth = &self.vault.auth;
        for (key, path) in [
            ("vault.auth.token_file", &auth.token_file),
            ("vault.auth.role_id_file", &auth.role_id_file),
            ("vault.auth.secret_id_file", &auth.secret_id_file),
            ("vault.auth.cert", &auth.cert),
            ("vault.auth.key", &auth.key),
        ] {
            files.extend(path.iter().map(|p| (key, p)));
        }
        if let Some(cluster) = &self.cluster {
            files.push(("cluster.cert", &cluster.cert));
            files.push(("cluster.key", &cluster.key));
            files.extend(cluster.ca_cert.iter().map(|p| ("cluster.ca_cert", p)));
        }
        files.extend(
            self.databases
                .iter()
                .filter_map(|d| d.ca_cert.as_ref())
                .map(|p| ("databases.ca_cert", p)),
        );
        for (key, path) in files {
            if let Err(e) = std::fs::metadata(path) {
                problems.push(format!("{key}: cannot read {}: {e}", path.display()));
            }
        }
        problems.extend(self.secret_file_findings().filter_map(|f| match f {
            Finding::Problem(p) => Some(p),
            _ => None,
        }));
    }

    fn validate_databases(&self, problems: &mut Vec<String>) {
        let mut seen = std::collections::HashSet::new();
        for db in &self.databases {
            if !seen.insert(db.name.as_str()) {
                problems.push(format!("database {:?} is configured twice", db.name));
            }
            if db.roles.is_empty() {
                problems.push(format!("database {:?} lists no roles", db.name));
            }
            for role in &db.roles {
                if !is_safe_path_segment(role) {
                    problems.push(format!(
                        "database {:?}: role {role:?} may only contain letters, digits, '-', '_' and '.'",
                        db.name
                    ));
                }
            }
            if !db.mount.split('/').all(is_safe_path_segment) {
                problems.push(format!(
                    "database {:?}: mount {:?} is not a valid Vault path",
                    db.name, db.mount
                ));
            }
            for role in db.prefetch.keys().filter(|r| !db.roles.contains(r)) {
                problems.push(format!(
                    "database {:?}: prefetch names role {role:?}, which is not in its roles",
                    db.name
                ));
            }
            if db.tls == UpstreamTls::VerifyFull
                && rustls::pki_types::ServerName::try_from(db.host.as_str()).is_err()
            {
                problems.push(format!(
                    "database {:?}: tls = verify-full needs a host name or IP address to check the certificate against, and {:?} is neither",
                    db.name, db.host
                ));
            }
            for name in &db.allow_startup_parameters {
                if let Some(why) = startup_parameter_problem(name) {
                    problems.push(format!(
                        "database {:?}: allow_startup_parameters: {name:?} {why}",
                        db.name
                    ));
                }
            }
            if matches!(db.tls, UpstreamTls::VerifyCa | UpstreamTls::VerifyFull)
                && db.ca_cert.is_none()
            {
                problems.push(format!(
                    "database {:?}: tls = verify-ca/verify-full needs ca_cert",
                    db.name
                ));
            }
        }
    }

    fn validate_grants(&self, problems: &mut Vec<String>) {
        for (i, grant) in self.grants.iter().enumerate() {
            if let Err(e) = IdentityPattern::parse(&grant.identity) {
                problems.push(format!("grants[{i}]: {e}"));
            }
            for name in &grant.databases {
                if name == "*" {
                    continue;
                }
                match self.databases.iter().find(|d| &d.name == name) {
                    None => problems.push(format!(
                        "grants[{i}] ({}) names database {name:?}, which is not configured",
                        grant.identity
                    )),
                    Some(db) => {
                        for role in grant.roles.iter().filter(|r| *r != "*") {
                            if !db.roles.contains(role) {
                                problems.push(format!(
                                    "grants[{i}] ({}) names role {role:?}, which database {name:?} does not list",
                                    grant.identity
                                ));
                            }
                        }
                    }
                }
            }
        }
    }

    /// The database entry a client asks for.
    pub fn database(&self, name: &str) -> Option<&DatabaseConfig> {
        self.databases.iter().find(|d| d.name == name)
    }
}

/// Why `name` cannot be in `allow_startup_parameters`, if it cannot: it must look like a
/// setting name and not be a parameter leasegate handles itself (any case).
fn startup_parameter_problem(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    if options::is_protocol_parameter(&lower) || lower == "fallback_application_name" {
        Some("is a startup parameter leasegate handles itself, not a setting")
    } else if lower == "post_auth_delay" {
        Some("makes the server sleep after the login, holding a connection slot")
    } else if !options::is_setting_name(name) {
        Some("is not a setting name (letters, digits and '_', parts separated by '.')")
    } else {
        None
    }
}

/// True for names that can stand in a Vault URL path segment without escaping.
pub fn is_safe_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[listen]
address = "127.0.0.1:6432"
cert = "/nonexistent/server.pem"
key = "/nonexistent/server-key.pem"
client_ca = "/nonexistent/ca.pem"
[vault]
address = "http://127.0.0.1:8200"
[vault.auth]
method = "token"
token = "s.supersecret"
[[databases]]
name = "myapp"
host = "127.0.0.1"
mount = "database"
roles = ["readonly"]
[[grants]]
identity = "uri:spiffe://example.org/app/*"
databases = ["myapp", "other"]
roles = ["readonly", "readwrite"]
"#;

    #[test]
    fn reports_every_problem_at_once() {
        let cfg = Config::parse(BASE).expect("parses");
        let Err(ConfigError::Invalid(problems)) = cfg.validate() else {
            panic!("expected problems");
        };
        let all = problems.join("\n");
        assert!(all.contains("listen.cert"), "{all}");
        assert!(all.contains("\"other\", which is not configured"), "{all}");
        assert!(all.contains("role \"readwrite\""), "{all}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = BASE.replace("[vault]\n", "[vault]\nadress = 1\n");
        let err = Config::parse(&text).err().expect("unknown key refused");
        assert!(err.contains("adress"), "{err}");
    }

    #[test]
    fn defaults_and_debug_redaction() {
        let cfg = Config::parse(BASE).expect("parses");
        assert_eq!(cfg.listen.login_timeout, Duration::from_secs(10));
        assert_eq!(cfg.databases[0].port, 5432);
        assert_eq!(cfg.databases[0].tls, UpstreamTls::Disable);
        let shown = format!("{:?}", cfg.vault);
        assert!(!shown.contains("supersecret"), "{shown}");
    }

    #[test]
    fn verify_full_needs_a_checkable_host() {
        let text = BASE.replace(
            "host = \"127.0.0.1\"\nmount",
            "host = \"not a host!\"\ntls = \"verify-full\"\nca_cert = \"/nonexistent/ca.pem\"\nmount",
        );
        let cfg = Config::parse(&text).expect("parses");
        let all = cfg.problems().join("\n");
        assert!(
            all.contains("verify-full needs a host name or IP address"),
            "{all}"
        );
        for good in ["db.internal", "10.0.0.5", "::1"] {
            let text = text.replace("not a host!", good);
            let all = Config::parse(&text).expect("parses").problems().join("\n");
            assert!(!all.contains("verify-full needs a host"), "{good}: {all}");
        }
    }

    #[test]
    fn limits_must_be_finite_and_positive() {
        for (limits, key) in [
            ("max_sessions = 0", "limits.max_sessions must be at least 1"),
            (
                "max_sessions_per_identity = 0",
                "limits.max_sessions_per_identity must be at least 1",
            ),
            (
                "burst_per_identity = 0",
                "limits.burst_per_identity must be at least 1",
            ),
            ("new_sessions_per_second_per_identity = nan", "(got NaN)"),
            ("new_sessions_per_second_per_identity = inf", "(got inf)"),
            ("new_sessions_per_second_per_identity = -inf", "(got -inf)"),
            ("new_sessions_per_second_per_identity = 0.0", "(got 0)"),
            ("new_sessions_per_second_per_identity = -5.0", "(got -5)"),
        ] {
            let cfg = Config::parse(&format!("{BASE}\n[limits]\n{limits}\n")).expect("parses");
            let all = cfg.problems().join("\n");
            assert!(all.contains(key), "{limits}: {all}");
            if limits.starts_with("new_sessions") {
                assert!(
                    all.contains("limits.new_sessions_per_second_per_identity must be a finite number above 0"),
                    "{all}"
                );
            }
        }
        let fine = Config::parse(&format!(
            "{BASE}\n[limits]\nnew_sessions_per_second_per_identity = 0.5\nburst_per_identity = 1\n"
        ))
        .expect("parses");
        assert!(!fine.problems().join("\n").contains("limits."));
        let negative = format!("{BASE}\n[limits]\nmax_sessions = -1\n");
        assert!(
            Config::parse(&negative).is_err(),
            "a negative count does not parse"
        );
    }

    #[test]
    fn startup_parameter_names_are_checked() {
        let text = BASE.replace(
            "roles = [\"readonly\"]\n",
            "roles = [\"readonly\"]\nallow_startup_parameters = [\"work_mem\", \"myapp.tenant\", \"options\", \"post_auth_delay\", \"a b\"]\n",
        );
        let cfg = Config::parse(&text).expect("parses");
        assert_eq!(cfg.databases[0].allow_startup_parameters.len(), 5);
        let all = cfg.problems().join("\n");
        for bad in ["\"options\"", "\"post_auth_delay\"", "\"a b\""] {
            assert!(
                all.contains(&format!("allow_startup_parameters: {bad}")),
                "{all}"
            );
        }
        assert!(!all.contains("\"work_mem\""), "{all}");
        assert!(!all.contains("myapp.tenant"), "{all}");
        for bad in [
            "USER",
            "_pq_.x",
            "fallback_application_name",
            "Options",
            "x=1",
            "",
        ] {
            assert!(startup_parameter_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(startup_parameter_problem("DateStyle"), None);
    }

    #[test]
    fn safe_segments() {
        assert!(is_safe_path_segment("read-only_1.x"));
        for bad in ["", "..", "a/b", "a%2Fb", "a'b", "a\0b", &"x".repeat(200)] {
            assert!(!is_safe_path_segment(bad), "{bad:?}");
        }
    }
}
