//! The configuration file as written: one serde struct per TOML table, unknown keys refused,
//! defaults filled in. Every key of the file is here, documented; `validate` checks
//! these structs and [`super::model`] turns them into the types the rest of leasegate reads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `[listen]`: client-facing listener and its TLS material.
    pub listen: Listen,
    /// `[vault]`: where credentials come from.
    pub vault: Vault,
    /// `[metrics]`: admin HTTP endpoint; absent means no metrics server.
    pub metrics: Option<MetricsConfig>,
    /// `[[databases]]`: upstream databases clients may ask for, by name.
    #[serde(default)]
    pub databases: Vec<Database>,
    /// `[[grants]]`: which identities may use which roles on which databases.
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// `[audit]`: audit log destination; absent: stderr.
    #[serde(default)]
    pub audit: AuditConfig,
    /// `[limits]`: abuse limits.
    #[serde(default)]
    pub limits: Limits,
    /// `[cluster]`: other leasegate instances behind the same load balancer (cancel
    /// forwarding).
    pub cluster: Option<Cluster>,
    /// `[runtime]`: process settings.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// `[admin]`: the local admin socket; absent means none.
    pub admin: Option<AdminConfig>,
}

/// `[admin]` (the same struct serves the typed configuration).
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Unix socket of the operator's console (`leasegate sessions …`, `leases check`),
    /// created 0600 and served to leasegate's own uid and root only.
    pub socket: PathBuf,
}

/// `[runtime]` (the same struct serves the typed configuration).
#[derive(Debug, Deserialize, Serialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Session threads (one current-thread runtime each, a session pinned to one); default:
    /// one per CPU. The control plane has one more thread of its own.
    pub worker_threads: Option<usize>,
}

/// `[cluster]`
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Every other instance's client listener: `"host:port"` (a DNS name stands for all the
    /// addresses it resolves to, a Kubernetes headless service, say), or
    /// `{ id = 1, address = "host:port" }` naming the replica id it runs with, so that a
    /// cancel for its sessions goes to it alone.
    pub peers: Vec<Peer>,
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
    /// This replica's id (0 to 127), encoded in the cancel keys it hands out so that any
    /// replica forwards a cancel to the owner only: a number, or `"hostname"` for the
    /// ordinal the host name ends with (a StatefulSet pod `leasegate-2`: 2).
    pub id: Option<ReplicaId>,
}

/// One `[cluster] peers` entry.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(untagged)]
pub enum Peer {
    /// `"host:port"`: a peer (or all the addresses of a name) whose ids are not known here;
    /// cancels with keys no named peer owns are sent to all of these.
    Address(String),
    /// `{ id, address }`: the replica that owns the cancel keys carrying `id`.
    WithId(PeerWithId),
}

/// `{ id = 1, address = "host:port" }`.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeerWithId {
    /// The peer's `[cluster] id`.
    pub id: u8,
    /// `host:port` of its client listener.
    pub address: String,
}

impl Peer {
    /// The `host:port` part.
    pub fn address(&self) -> &str {
        match self {
            Peer::Address(a) => a,
            Peer::WithId(p) => &p.address,
        }
    }

    /// The id, when given.
    pub fn id(&self) -> Option<u8> {
        match self {
            Peer::Address(_) => None,
            Peer::WithId(p) => Some(p.id),
        }
    }
}

/// `[cluster] id`: a number, or `"hostname"`.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(untagged)]
pub enum ReplicaId {
    /// The id itself.
    Number(i64),
    /// `"hostname"`: the host name's trailing ordinal.
    From(String),
}

/// `[limits]`
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
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

impl Default for Limits {
    fn default() -> Self {
        Limits {
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

/// `[audit]` (the same struct serves the typed configuration).
#[derive(Debug, Deserialize, Serialize, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// File the JSON lines are appended to; absent or `-`: stderr.
    pub path: Option<PathBuf>,
}

/// `[listen]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
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
    /// After a reload, end the open sessions whose grant (or database, or role) it removed,
    /// as `leasegate sessions end` does; off: open sessions keep what they started with.
    #[serde(default)]
    pub end_sessions_on_revoke: bool,
    /// When set, leasegate also listens on the Unix socket `<dir>/.s.PGSQL.<port of
    /// address>` (libpq's name), identifying clients by their uid and gid.
    pub unix_socket_dir: Option<PathBuf>,
    /// Mode of the socket file, octal (default "0660": owner and group may connect).
    pub unix_socket_mode: Option<String>,
    /// After SIGTERM/SIGINT, `/readyz` answers 503 at once but the listener keeps accepting
    /// this long, so that a load balancer sees the replica leave before it stops taking
    /// connections (the Kubernetes preStop pattern, built in); then the drain starts.
    #[serde(default = "default_drain_delay", with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Networks (CIDRs) whose connections must start with a PROXY protocol header (v1 or
    /// v2), the load balancers: the header's source address becomes the client address.
    /// Empty: no PROXY protocol.
    #[serde(default)]
    pub proxy_protocol_from: Vec<String>,
}

/// `[vault]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vault {
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
    pub auth: VaultAuth,
}

/// `[vault.auth]`: one table for every method, so that the keys stay where they always were;
/// which ones a method needs is checked when the typed [`super::model::AuthMethod`] is built
/// from it. Keys of another method are accepted (and their files checked like the others).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct VaultAuth {
    /// How leasegate logs in: token, approle, cert or kubernetes.
    pub method: Method,
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

impl VaultAuth {
    /// Mount path of the auth method.
    pub fn mount(&self) -> &str {
        self.mount.as_deref().unwrap_or(self.method.name())
    }
}

fn default_jwt_file() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}

/// `vault.auth.method`
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// A Vault token from config, file or `VAULT_TOKEN`.
    Token,
    /// AppRole: role_id and secret_id.
    Approle,
    /// TLS certificate auth with leasegate's own client certificate.
    Cert,
    /// Kubernetes service-account JWT.
    Kubernetes,
}

impl Method {
    /// The name as written in the file, also the default mount.
    pub fn name(self) -> &'static str {
        match self {
            Method::Token => "token",
            Method::Approle => "approle",
            Method::Cert => "cert",
            Method::Kubernetes => "kubernetes",
        }
    }
}

/// `[metrics]` (the same struct serves the typed configuration).
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the admin HTTP server (`/metrics`, `/healthz`, `/readyz`).
    pub address: SocketAddr,
}

/// One `[[databases]]` entry.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// The database name clients ask for.
    pub name: String,
    /// Upstream host name or address, or (starting with `/`) the directory of the server's
    /// Unix socket.
    pub host: String,
    /// Upstream port.
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Database name on the upstream server; default: `name`.
    pub upstream_database: Option<String>,
    /// TLS to the upstream server.
    #[serde(default)]
    pub tls: TlsMode,
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
    pub prefetch: BTreeMap<String, usize>,
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
    /// Upstream sessions to keep logged in ahead of demand, per role (`{ readonly = 4 }`),
    /// for each startup-parameter set clients used recently.
    #[serde(default)]
    pub warm: BTreeMap<String, usize>,
    /// A warm session unused this long is closed and its lease revoked.
    #[serde(default = "default_prefetch_max_idle", with = "humantime_serde")]
    pub warm_max_idle: Duration,
}

/// `databases.tls`, with libpq's `sslmode` meanings.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
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
pub struct Grant {
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
fn default_drain_delay() -> Duration {
    Duration::from_secs(5)
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

impl File {
    /// Resolves relative paths against `base`, the directory of the file.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.listen.cert);
        fix(&mut self.listen.key);
        fix(&mut self.listen.client_ca);
        self.listen.crl.iter_mut().for_each(fix);
        self.listen.unix_socket_dir.iter_mut().for_each(fix);
        self.vault.ca_cert.iter_mut().for_each(fix);
        if let Some(admin) = &mut self.admin {
            fix(&mut admin.socket);
        }
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
}
