//! Building the typed configuration ([`super::model`]) from the file as written
//! ([`super::schema`]): the keys a method or mode needs must be there, identity patterns must
//! parse. Every problem is collected, none stops the others from being found.

use super::model::{
    AuthMethod, CLUSTER_CA_REQUIRED, CancelLimits, ClusterConfig, Config, DatabaseConfig,
    GrantConfig, ListenConfig, Problems, ReloadableConfig, RoleId, SessionLimits, StaticConfig,
    StaticListen, UpstreamTls, VaultAuth, VaultConfig,
};
use super::schema::{self, Method, TlsMode};
use crate::identity::IdentityPattern;

impl Default for SessionLimits {
    fn default() -> Self {
        split_limits(schema::Limits::default()).0
    }
}

impl Default for CancelLimits {
    fn default() -> Self {
        split_limits(schema::Limits::default()).1
    }
}

fn split_limits(l: schema::Limits) -> (SessionLimits, CancelLimits) {
    let session = SessionLimits {
        max_sessions: l.max_sessions,
        max_sessions_per_identity: l.max_sessions_per_identity,
        new_sessions_per_second_per_identity: l.new_sessions_per_second_per_identity,
        burst_per_identity: l.burst_per_identity,
    };
    let cancel = CancelLimits {
        cancels_per_second: l.cancels_per_second,
        cancels_per_second_per_address: l.cancels_per_second_per_address,
        max_concurrent_cancels: l.max_concurrent_cancels,
    };
    (session, cancel)
}

fn split_listen(l: schema::Listen) -> Result<(StaticListen, ListenConfig), Problems> {
    let proxy_protocol_from = proxy_networks(&l.proxy_protocol_from)?;
    // The mode was checked by validation; the default stands in for a mode it refused.
    let mode = l
        .unix_socket_mode
        .as_deref()
        .map(super::socket_dir::parse_mode);
    let fixed = StaticListen {
        address: l.address,
        max_connections: l.max_connections,
        unix_socket_dir: l.unix_socket_dir,
        unix_socket_mode: mode
            .and_then(Result::ok)
            .unwrap_or(super::socket_dir::DEFAULT_MODE),
    };
    let listen = ListenConfig {
        cert: l.cert,
        key: l.key,
        client_ca: l.client_ca,
        crl: l.crl,
        login_timeout: l.login_timeout,
        shutdown_grace: l.shutdown_grace,
        watch_interval: l.watch_interval,
        tcp_keepalive: l.tcp_keepalive,
        end_sessions_on_revoke: l.end_sessions_on_revoke,
        drain_delay: l.drain_delay,
        proxy_protocol_from,
    };
    Ok((fixed, listen))
}

/// `listen.proxy_protocol_from`: CIDRs, or single addresses (a /32 or /128).
fn proxy_networks(entries: &[String]) -> Result<Vec<ipnet::IpNet>, Problems> {
    let mut problems = Vec::new();
    let mut networks = Vec::new();
    for entry in entries {
        let parsed = entry
            .parse::<ipnet::IpNet>()
            .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(net) => networks.push(net),
            Err(_) => problems.push(format!(
                "listen.proxy_protocol_from: {entry:?} is not a network (\"10.0.0.0/8\") or an \
                 address"
            )),
        }
    }
    if problems.is_empty() {
        Ok(networks)
    } else {
        Err(Problems(problems))
    }
}

impl TryFrom<schema::Listen> for ListenConfig {
    type Error = Problems;
    fn try_from(l: schema::Listen) -> Result<Self, Problems> {
        Ok(split_listen(l)?.1)
    }
}

impl TryFrom<schema::Vault> for VaultConfig {
    type Error = Problems;
    fn try_from(v: schema::Vault) -> Result<Self, Problems> {
        Ok(VaultConfig {
            auth: VaultAuth::try_from(v.auth)?,
            address: v.address,
            ca_cert: v.ca_cert,
            namespace: v.namespace,
            timeout: v.timeout,
        })
    }
}

impl TryFrom<schema::VaultAuth> for VaultAuth {
    type Error = Problems;
    fn try_from(a: schema::VaultAuth) -> Result<Self, Problems> {
        let needs = |what: &str| {
            Problems(vec![format!(
                "vault.auth: method {:?} needs {what}",
                a.method
            )])
        };
        let method = match a.method {
            Method::Token => AuthMethod::Token {
                token: a.token,
                token_file: a.token_file,
            },
            Method::Approle => {
                let role_id = match (a.role_id, a.role_id_file) {
                    (Some(id), _) => Some(RoleId::Inline(id)),
                    (None, Some(path)) => Some(RoleId::File(path)),
                    (None, None) => None,
                };
                match (role_id, a.secret_id_file) {
                    (Some(role_id), Some(secret_id_file)) => AuthMethod::Approle {
                        role_id,
                        secret_id_file,
                    },
                    (None, secret) => {
                        let mut p = needs("role_id or role_id_file");
                        if secret.is_none() {
                            p.0.extend(needs("secret_id_file").0);
                        }
                        return Err(p);
                    }
                    (Some(_), None) => return Err(needs("secret_id_file")),
                }
            }
            Method::Cert => match (a.cert, a.key) {
                (Some(cert), Some(key)) => AuthMethod::Cert {
                    cert,
                    key,
                    role: a.role,
                },
                _ => return Err(needs("cert and key")),
            },
            Method::Kubernetes => match a.role {
                Some(role) => AuthMethod::Kubernetes {
                    role,
                    jwt_file: a.jwt_file,
                },
                None => return Err(needs("role")),
            },
        };
        Ok(VaultAuth {
            mount: a.mount,
            method,
        })
    }
}

impl TryFrom<schema::Database> for DatabaseConfig {
    type Error = Problems;
    fn try_from(d: schema::Database) -> Result<Self, Problems> {
        let tls = match (d.tls, d.ca_cert) {
            (TlsMode::Disable, _) => UpstreamTls::Disable,
            (TlsMode::Require, _) => UpstreamTls::Require,
            (TlsMode::VerifyCa, Some(ca)) => UpstreamTls::VerifyCa(ca),
            (TlsMode::VerifyFull, Some(ca)) => UpstreamTls::VerifyFull(ca),
            (TlsMode::VerifyCa | TlsMode::VerifyFull, None) => {
                return Err(Problems(vec![format!(
                    "database {:?}: tls = verify-ca/verify-full needs ca_cert",
                    d.name
                )]));
            }
        };
        Ok(DatabaseConfig {
            name: d.name,
            host: d.host,
            port: d.port,
            upstream_database: d.upstream_database,
            tls,
            connect_timeout: d.connect_timeout,
            mount: d.mount,
            roles: d.roles,
            allow_md5: d.allow_md5,
            prefetch: d.prefetch,
            prefetch_max_idle: d.prefetch_max_idle,
            tcp_keepalive: d.tcp_keepalive,
            max_session_duration: d.max_session_duration,
            expiry_warning: d.expiry_warning,
            allow_startup_parameters: d.allow_startup_parameters,
            warm: d.warm,
            warm_max_idle: d.warm_max_idle,
        })
    }
}

impl TryFrom<schema::Grant> for GrantConfig {
    type Error = Problems;
    fn try_from(g: schema::Grant) -> Result<Self, Problems> {
        Ok(GrantConfig {
            identity: IdentityPattern::parse(&g.identity).map_err(|e| Problems(vec![e]))?,
            databases: g.databases,
            roles: g.roles,
        })
    }
}

impl TryFrom<schema::Cluster> for ClusterConfig {
    type Error = Problems;
    fn try_from(c: schema::Cluster) -> Result<Self, Problems> {
        let mut problems = Vec::new();
        let identity = IdentityPattern::parse(&c.peer_identity)
            .map_err(|e| problems.push(format!("cluster.peer_identity: {e}")))
            .ok();
        if c.ca_cert.is_none() {
            problems.push(CLUSTER_CA_REQUIRED.into());
        }
        let id = replica_id(c.id.as_ref(), &c.peers)
            .map_err(|p| problems.extend(p))
            .ok();
        match (identity, c.ca_cert, id) {
            (Some(peer_identity), Some(ca_cert), Some(id)) => Ok(ClusterConfig {
                peers: c.peers,
                id,
                peer_identity,
                cert: c.cert,
                key: c.key,
                ca_cert,
            }),
            _ => Err(Problems(problems)),
        }
    }
}

/// The largest `[cluster] id`: the id takes the top 7 bits of a cancel key's 31-bit pid.
pub const MAX_REPLICA_ID: u8 = 127;

/// `[cluster] id` resolved (`"hostname"`: the host name's ordinal), checked against the ids
/// of `peers`: in range, and no id twice.
fn replica_id(
    id: Option<&schema::ReplicaId>,
    peers: &[schema::Peer],
) -> Result<Option<u8>, Vec<String>> {
    let mut problems = Vec::new();
    let own = match id {
        None => None,
        Some(schema::ReplicaId::Number(n)) => match u8::try_from(*n) {
            Ok(n) if n <= MAX_REPLICA_ID => Some(n),
            _ => {
                problems.push(format!(
                    "cluster.id {n} is out of range 0..={MAX_REPLICA_ID}"
                ));
                None
            }
        },
        Some(schema::ReplicaId::From(how)) if how == "hostname" => {
            let name = host_name();
            let id = name.as_deref().and_then(ordinal);
            if id.is_none() {
                problems.push(format!(
                    "cluster.id = \"hostname\": the host name {name:?} does not end with \
                     -<0..={MAX_REPLICA_ID}> (as a StatefulSet pod's leasegate-2 does)"
                ));
            }
            id
        }
        Some(schema::ReplicaId::From(other)) => {
            problems.push(format!(
                "cluster.id {other:?}: want a number or \"hostname\""
            ));
            None
        }
    };
    // An entry with this instance's own id is this instance (every replica may share one
    // list); any id twice is a mistake.
    let mut seen = std::collections::BTreeSet::new();
    for peer in peers {
        let Some(pid) = peer.id() else { continue };
        if pid > MAX_REPLICA_ID {
            problems.push(format!(
                "cluster.peers: id {pid} is out of range 0..={MAX_REPLICA_ID}"
            ));
        } else if !seen.insert(pid) {
            problems.push(format!(
                "cluster.peers: id {pid} is given twice (again for {:?}): replica ids must be \
                 unique",
                peer.address()
            ));
        }
    }
    if own.is_none() && id.is_none() && peers.iter().any(|p| p.id().is_some()) {
        problems
            .push("cluster.peers name replica ids: set cluster.id for this instance too".into());
    }
    if problems.is_empty() {
        Ok(own)
    } else {
        Err(problems)
    }
}

/// The host name: `$HOSTNAME` (Kubernetes sets it to the pod name; the shipped StatefulSet
/// sets it from the downward API too), else `/proc/sys/kernel/hostname`.
fn host_name() -> Option<String> {
    let clean = |n: String| Some(n.trim().to_owned()).filter(|n| !n.is_empty());
    std::env::var("HOSTNAME").ok().and_then(clean).or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .and_then(clean)
    })
}

/// The replica ordinal a host name ends with: its first label's part after the last `-`, all
/// decimal digits, 0 to [`MAX_REPLICA_ID`] (`leasegate-2`, `leasegate-2.leasegate-peers`: 2).
pub fn ordinal(host: &str) -> Option<u8> {
    let label = host.split('.').next()?;
    let (_, digits) = label.rsplit_once('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 3 {
        return None;
    }
    digits.parse::<u8>().ok().filter(|n| *n <= MAX_REPLICA_ID)
}

/// Keeps `Ok` values, collects the problems of the rest.
fn collect<T>(problems: &mut Vec<String>, result: Result<T, Problems>) -> Option<T> {
    result.map_err(|p| problems.extend(p.0)).ok()
}

impl TryFrom<schema::File> for Config {
    type Error = Problems;
    fn try_from(file: schema::File) -> Result<Self, Problems> {
        let mut problems = Vec::new();
        let vault = collect(&mut problems, VaultConfig::try_from(file.vault));
        let databases: Vec<_> = file
            .databases
            .into_iter()
            .filter_map(|d| collect(&mut problems, DatabaseConfig::try_from(d)))
            .collect();
        let mut grants = Vec::new();
        for (i, grant) in file.grants.into_iter().enumerate() {
            match GrantConfig::try_from(grant) {
                Ok(g) => grants.push(g),
                Err(p) => problems.extend(p.0.into_iter().map(|e| format!("grants[{i}]: {e}"))),
            }
        }
        // `None`: `[cluster]` did not build.
        let cluster = match file.cluster {
            None => Some(None),
            Some(c) => collect(&mut problems, ClusterConfig::try_from(c)).map(Some),
        };
        let listens = collect(&mut problems, split_listen(file.listen));
        let (Some(vault), Some(cluster), Some((fixed_listen, listen)), true) =
            (vault, cluster, listens, problems.is_empty())
        else {
            return Err(Problems(problems));
        };
        let (session, cancel) = split_limits(file.limits);
        Ok(Config {
            fixed: StaticConfig {
                listen: fixed_listen,
                metrics: file.metrics,
                vault,
                audit: file.audit,
                limits: cancel,
                runtime: file.runtime,
                admin: file.admin,
            },
            reloadable: ReloadableConfig {
                listen,
                databases,
                grants,
                limits: session,
                cluster,
            },
        })
    }
}
