//! The configuration as the rest of leasegate reads it, built from the file's
//! [`super::schema`] when it loads, so that what the types say holds: a Vault auth method
//! carries exactly the keys it uses ([`AuthMethod`]), an upstream TLS mode that verifies
//! carries its CA ([`UpstreamTls`]), identity patterns are parsed ([`IdentityPattern`]).
//! A key a method or mode needs and does not have is a load problem, reported with the
//! others.
//!
//! The configuration is split by what a reload can do: [`StaticConfig`] needs a restart (a
//! reload keeps it and names each changed key: its serialized form spells the file's keys),
//! [`ReloadableConfig`] is applied by a reload. Every section also deserializes on its own
//! through its schema struct (tests read sections that way); the conversions are in
//! `build`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};
use sha2::{Digest, Sha256};

use super::schema::{self, Method};
pub use super::schema::{AdminConfig, AuditConfig, MetricsConfig, Peer, PeerWithId, RuntimeConfig};
use crate::identity::IdentityPattern;

/// Problems found building a typed section, one line each.
#[derive(Debug, Default, PartialEq)]
pub struct Problems(pub Vec<String>);

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

/// The problem line for a `[cluster]` without `ca_cert`.
pub const CLUSTER_CA_REQUIRED: &str = "cluster.ca_cert is required: the CA that the peers' \
     server certificates chain to (it is no longer taken from listen.client_ca, a client CA)";

/// The whole configuration.
#[derive(Debug)]
pub struct Config {
    /// What only a restart changes.
    pub fixed: StaticConfig,
    /// What a reload applies.
    pub reloadable: ReloadableConfig,
}

/// The settings a reload cannot apply: the sockets leasegate listens on, the Vault client and
/// its login, the audit log, the cancel limits and the runtime. Serialized, its keys are the
/// file's (`listen.address`, `vault.auth.role_id`, …): a reload compares the two forms and
/// names every key that differs, so a field added here is covered without another list.
#[derive(Debug, Clone, Serialize)]
pub struct StaticConfig {
    /// `listen.address` and `listen.max_connections`.
    pub listen: StaticListen,
    /// `[metrics]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// `[vault]`.
    pub vault: VaultConfig,
    /// `[audit]`.
    pub audit: AuditConfig,
    /// The cancel keys of `[limits]`.
    pub limits: CancelLimits,
    /// `[runtime]`.
    pub runtime: RuntimeConfig,
    /// `[admin]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
}

/// The keys of `[listen]` that bind the listener.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StaticListen {
    /// Address clients connect to.
    pub address: SocketAddr,
    /// Most client connections open at once (the size of the listener's permit pool).
    pub max_connections: usize,
    /// Directory of the Unix socket, when there is one (its port is `address`'s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_socket_dir: Option<PathBuf>,
    /// Mode of the socket file.
    pub unix_socket_mode: u32,
}

/// The settings a reload applies (to sessions that start after it).
#[derive(Debug, Clone)]
pub struct ReloadableConfig {
    /// TLS material and timings of `[listen]`.
    pub listen: ListenConfig,
    /// `[[databases]]`.
    pub databases: Vec<DatabaseConfig>,
    /// `[[grants]]`.
    pub grants: Vec<GrantConfig>,
    /// The session keys of `[limits]`.
    pub limits: SessionLimits,
    /// `[cluster]`.
    pub cluster: Option<ClusterConfig>,
}

/// The reloadable keys of `[listen]` (see [`schema::Listen`] for each).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "schema::Listen")]
pub struct ListenConfig {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// CA bundle client certificates must chain to.
    pub client_ca: PathBuf,
    /// Revocation lists checked for client certificates.
    pub crl: Vec<PathBuf>,
    /// Limit for TLS handshake plus startup packet.
    pub login_timeout: Duration,
    /// How long sessions may run on after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// How often the files are checked for changes, if at all.
    pub watch_interval: Option<Duration>,
    /// Keepalive idle time for client sockets.
    pub tcp_keepalive: Duration,
    /// End open sessions a reload no longer allows.
    pub end_sessions_on_revoke: bool,
    /// After SIGTERM/SIGINT: how long the listener keeps accepting with `/readyz` at 503.
    pub drain_delay: Duration,
    /// Sources whose connections must start with a PROXY protocol header (empty: none).
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

/// The session limits of `[limits]`: a reload replaces them, the counts live on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionLimits {
    /// Sessions through this instance at once.
    pub max_sessions: u32,
    /// Concurrent sessions per identity.
    pub max_sessions_per_identity: u32,
    /// New sessions per second per identity (bucket refill).
    pub new_sessions_per_second_per_identity: f64,
    /// New sessions an identity may open in a burst (bucket size).
    pub burst_per_identity: u32,
}

/// The cancel limits of `[limits]`: fixed for the life of the process.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct CancelLimits {
    /// Cancels handled per second in all.
    pub cancels_per_second: u32,
    /// Cancels handled per second from one address.
    pub cancels_per_second_per_address: u32,
    /// Cancels being forwarded at once.
    pub max_concurrent_cancels: u32,
}
/// `[vault]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "schema::Vault")]
pub struct VaultConfig {
    /// Base URL of Vault or OpenBao.
    pub address: String,
    /// CA bundle for an https address; `None`: the system roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// Namespace sent as `X-Vault-Namespace`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Limit for every Vault request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How leasegate logs in.
    pub auth: VaultAuth,
}

/// `[vault.auth]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "schema::VaultAuth")]
pub struct VaultAuth {
    /// `mount` as written; [`VaultAuth::mount`] applies the default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
    /// The method, with the keys it uses.
    #[serde(flatten)]
    pub method: AuthMethod,
}

/// A Vault auth method with the keys it uses.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum AuthMethod {
    /// A Vault token: inline, from a file, or `VAULT_TOKEN` (in that order).
    Token {
        /// Inline (or the `VAULT_TOKEN` taken at startup); compared by its SHA-256.
        #[serde(serialize_with = "digest", skip_serializing_if = "Option::is_none")]
        token: Option<SecretString>,
        /// File holding the token, re-read when it changes.
        #[serde(skip_serializing_if = "Option::is_none")]
        token_file: Option<PathBuf>,
    },
    /// AppRole login.
    Approle {
        /// Where the role_id comes from.
        #[serde(flatten)]
        role_id: RoleId,
        /// File holding the secret_id, re-read at every login.
        secret_id_file: PathBuf,
    },
    /// TLS certificate login with leasegate's own client certificate.
    Cert {
        /// The certificate (PEM).
        cert: PathBuf,
        /// Its key (PEM).
        key: PathBuf,
        /// The certificate role to log in as; `None`: Vault picks.
        #[serde(skip_serializing_if = "Option::is_none")]
        role: Option<String>,
    },
    /// Kubernetes service-account login.
    Kubernetes {
        /// The Vault role to log in as.
        role: String,
        /// The service-account token file.
        jwt_file: PathBuf,
    },
}

/// The AppRole role_id: inline (`role_id`, preferred when both are set) or from a file.
#[derive(Debug, Clone, Serialize)]
pub enum RoleId {
    /// `role_id`.
    #[serde(rename = "role_id")]
    Inline(String),
    /// `role_id_file`, read at every login.
    #[serde(rename = "role_id_file")]
    File(PathBuf),
}

/// A secret serialized as its SHA-256, for comparing without holding the secret twice.
fn digest<S: Serializer>(secret: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    let hex = secret.as_ref().map(|t| {
        Sha256::digest(t.expose_secret().as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    });
    hex.serialize(s)
}

impl AuthMethod {
    /// The method's name, as `vault.auth.method` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            AuthMethod::Token { .. } => Method::Token.name(),
            AuthMethod::Approle { .. } => Method::Approle.name(),
            AuthMethod::Cert { .. } => Method::Cert.name(),
            AuthMethod::Kubernetes { .. } => Method::Kubernetes.name(),
        }
    }
}

impl VaultAuth {
    /// Mount path of the auth method; default: the method's name.
    pub fn mount(&self) -> &str {
        self.mount.as_deref().unwrap_or(self.method.name())
    }

    /// Whether leasegate is handed a token (`method = "token"`) rather than logging in.
    pub fn is_token(&self) -> bool {
        matches!(self.method, AuthMethod::Token { .. })
    }

    /// The `token_file` of `method = "token"`, if any.
    pub fn token_file(&self) -> Option<&Path> {
        match &self.method {
            AuthMethod::Token { token_file, .. } => token_file.as_deref(),
            _ => None,
        }
    }

    /// For `method = "token"` with neither `token` nor `token_file`: serve with `token` (the
    /// `VAULT_TOKEN` taken at startup), the last place the token is looked for.
    pub fn use_env_token(&mut self, env_token: Option<SecretString>) {
        if let AuthMethod::Token {
            token: token @ None,
            token_file: None,
        } = &mut self.method
        {
            *token = env_token;
        }
    }

    /// The inline token of `method = "token"`, if any.
    pub fn inline_token(&self) -> Option<&SecretString> {
        match &self.method {
            AuthMethod::Token { token, .. } => token.as_ref(),
            _ => None,
        }
    }
}

/// One `[[databases]]` entry (see [`schema::Database`] for each key).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "schema::Database")]
pub struct DatabaseConfig {
    /// The name clients ask for.
    pub name: String,
    /// Upstream host.
    pub host: String,
    /// Upstream port.
    pub port: u16,
    /// Database name upstream; `None`: `name`.
    pub upstream_database: Option<String>,
    /// TLS to the upstream, with its CA when it verifies.
    pub tls: UpstreamTls,
    /// Limit for connecting and logging in upstream.
    pub connect_timeout: Duration,
    /// Vault database secrets engine mount.
    pub mount: String,
    /// Vault roles clients may ask for.
    pub roles: Vec<String>,
    /// Accept MD5 authentication from the upstream.
    pub allow_md5: bool,
    /// Credentials kept issued ahead of demand, per role.
    pub prefetch: BTreeMap<String, usize>,
    /// A prefetched credential unused this long is replaced.
    pub prefetch_max_idle: Duration,
    /// Keepalive idle time for upstream sockets.
    pub tcp_keepalive: Duration,
    /// Sessions end after this long.
    pub max_session_duration: Option<Duration>,
    /// Notice this long before leasegate ends a session.
    pub expiry_warning: Duration,
    /// Startup settings allowed besides the built-in list.
    pub allow_startup_parameters: Vec<String>,
    /// Upstream sessions kept logged in ahead of demand, per role.
    pub warm: BTreeMap<String, usize>,
    /// A warm session unused this long is closed and its lease revoked.
    pub warm_max_idle: Duration,
}

impl DatabaseConfig {
    /// The database name sent upstream.
    pub fn upstream_database(&self) -> &str {
        self.upstream_database.as_deref().unwrap_or(&self.name)
    }
}

/// Upstream TLS, with libpq's `sslmode` meanings; the verifying modes carry their CA bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTls {
    /// Plain TCP.
    Disable,
    /// TLS without certificate verification.
    Require,
    /// TLS, the certificate must chain to this CA bundle.
    VerifyCa(PathBuf),
    /// TLS, the certificate must chain to this CA bundle and name the host.
    VerifyFull(PathBuf),
}

impl UpstreamTls {
    /// The CA bundle of a verifying mode.
    pub fn ca_cert(&self) -> Option<&Path> {
        match self {
            UpstreamTls::VerifyCa(ca) | UpstreamTls::VerifyFull(ca) => Some(ca),
            UpstreamTls::Disable | UpstreamTls::Require => None,
        }
    }
}

/// One `[[grants]]` entry, its identity pattern parsed.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "schema::Grant")]
pub struct GrantConfig {
    /// Who the grant is for.
    pub identity: IdentityPattern,
    /// Database names it covers; `*` for all.
    pub databases: Vec<String>,
    /// Vault roles it covers; `*` for all roles of the database.
    pub roles: Vec<String>,
}

/// `[cluster]`, its peer pattern parsed and its CA present.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "schema::Cluster")]
pub struct ClusterConfig {
    /// Every other instance, with its replica id when given.
    pub peers: Vec<Peer>,
    /// This replica's id, encoded in its cancel keys (`None`: keys carry no id and unknown
    /// keys go to every peer).
    pub id: Option<u8>,
    /// The pattern the peers' client certificates match.
    pub peer_identity: IdentityPattern,
    /// This instance's client certificate towards the peers.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// CA the peers' server certificates chain to.
    pub ca_cert: PathBuf,
}
