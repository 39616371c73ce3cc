//! The fleet topology: three leasegate replicas behind one HAProxy ([`super::haproxy`]),
//! sharing the one PostgreSQL and OpenBao and one Vault mount, each replica with its own
//! Vault token (optionally a periodic one) and its own audit log, trusting HAProxy's source
//! address for PROXY headers, and peered as a `[cluster]` with replica ids 0, 1, 2. A replica
//! is stopped and started again on the same ports ([`Fleet::restart`]), like a rolling
//! update does.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use super::bao::{Mount, fresh_mount, write};
use super::fixture::GOOD_URI;
use super::haproxy::{HaProxy, LB_SOURCE, Server};
use super::pki::{ClientCert, Identity, Pki};
use super::proxy::{Proxy, ProxyConfig, StartOptions, merge_toml, set};
use super::{free_port, root};

/// How many replicas.
pub const REPLICAS: usize = 3;
/// The cluster certificate's identity.
pub const PEER_IDENTITY: &str = "dns:leasegate-peer";

/// What a fleet test may vary.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// `[listen] drain_delay` of every replica.
    pub drain_delay: &'static str,
    /// `[listen] shutdown_grace` of every replica.
    pub shutdown_grace: &'static str,
    /// Each replica's Vault token is periodic with this period (renewed by leasegate);
    /// `None`: an ordinary child token of the root token.
    pub token_period: Option<&'static str>,
    /// Peer the replicas as a `[cluster]` with ids (cancel routing).
    pub cluster: bool,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            drain_delay: "5s",
            shutdown_grace: "2s",
            token_period: None,
            cluster: false,
        }
    }
}

/// One replica: its fixed ports and token, and the process while it runs.
pub struct Replica {
    /// Its `[cluster] id`, and its index.
    pub id: usize,
    /// Client port (HAProxy's server line points here).
    pub port: u16,
    /// Admin port (HAProxy checks `/readyz` here).
    pub metrics_port: u16,
    /// Its own Vault token.
    pub token: String,
    /// Its audit log (kept across restarts).
    pub audit: PathBuf,
    /// The running process, if any.
    pub proxy: Option<Proxy>,
}

impl Replica {
    /// HAProxy's name for it.
    pub fn name(&self) -> String {
        format!("leasegate-{}", self.id)
    }

    /// The running process (panics if stopped).
    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("replica running")
    }
}

/// Three replicas and the load balancer in front of them.
pub struct Fleet {
    pub mount: Mount,
    pub pki: Pki,
    /// Granted `readonly` on `myapp`.
    pub good: ClientCert,
    /// The replicas' cluster certificate.
    pub peer: ClientCert,
    pub options: FleetOptions,
    pub replicas: Vec<Replica>,
    pub lb: HaProxy,
    _dir: tempfile::TempDir,
}

/// A token for one replica, child of the root token (periodic if `period` is set).
async fn replica_token(period: Option<&str>, id: usize) -> String {
    let mut body = json!({ "display_name": format!("leasegate-{id}") });
    if let Some(period) = period {
        body["period"] = json!(period);
    }
    let answer = write(reqwest::Method::POST, "auth/token/create", &body).await;
    answer["auth"]["client_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no client_token in {answer}"))
        .to_string()
}

impl Fleet {
    /// A fresh mount and PKI, three replicas started, HAProxy in front with all three UP.
    pub async fn start(name: &str, options: FleetOptions) -> Fleet {
        let mount = fresh_mount(name).await;
        let pki = Pki::new();
        let good = pki.client("good", Identity::Uri(GOOD_URI.into()));
        let peer = pki.client("leasegate-peer", Identity::Dns("leasegate-peer".into()));
        let dir = root().tempdir("fleet-");
        let mut replicas = Vec::new();
        for id in 0..REPLICAS {
            replicas.push(Replica {
                id,
                port: free_port(),
                metrics_port: free_port(),
                token: replica_token(options.token_period, id).await,
                audit: dir.path().join(format!("audit-{id}.log")),
                proxy: None,
            });
        }
        let servers: Vec<Server> = replicas
            .iter()
            .map(|r| Server {
                name: r.name(),
                port: r.port,
                metrics_port: r.metrics_port,
            })
            .collect();
        let mut started = Vec::new();
        for r in &replicas {
            started.push(launch(r, &replicas, &pki, &mount, &peer, &options).await);
        }
        for (r, proxy) in replicas.iter_mut().zip(started) {
            r.proxy = Some(proxy);
        }
        let lb = HaProxy::start(&servers).await;
        Fleet {
            mount,
            pki,
            good,
            peer,
            options,
            replicas,
            lb,
            _dir: dir,
        }
    }

    /// Starts replica `i` on its ports (it must not be running).
    pub async fn launch(&mut self, i: usize) {
        let r = &self.replicas[i];
        let proxy = launch(
            r,
            &self.replicas,
            &self.pki,
            &self.mount,
            &self.peer,
            &self.options,
        );
        let proxy = proxy.await;
        self.replicas[i].proxy = Some(proxy);
    }
}

/// Starts replica `r` (its peers are the other `replicas`).
async fn launch(
    r: &Replica,
    replicas: &[Replica],
    pki: &Pki,
    mount: &Mount,
    peer: &ClientCert,
    options: &FleetOptions,
) -> Proxy {
    let cfg = ProxyConfig {
        vault_token: r.token.clone(),
        ..ProxyConfig::new(pki, mount)
    }
    .grant(&format!("uri:{GOOD_URI}"), &["myapp"], &["readonly"]);
    let peers: Vec<(usize, u16)> = replicas
        .iter()
        .filter(|p| p.id != r.id)
        .map(|p| (p.id, p.port))
        .collect();
    let cluster = options
        .cluster
        .then(|| cluster_with_ids(r.id, &peers, peer, pki));
    let audit = r.audit.display().to_string();
    let opts = StartOptions {
        port: Some(r.port),
        metrics_port: Some(r.metrics_port),
        extra_toml: String::new(),
    };
    Proxy::start_options_edited(cfg, opts, |t| {
        set(t, "listen.drain_delay", options.drain_delay);
        set(t, "listen.shutdown_grace", options.shutdown_grace);
        let from = toml::Value::Array(vec![format!("{LB_SOURCE}/32").into()]);
        set(t, "listen.proxy_protocol_from", from);
        set(t, "audit.path", audit);
        if let Some(cluster) = &cluster {
            merge_toml(t, cluster);
        }
    })
    .await
}

impl Fleet {
    /// SIGTERM
    /// SIGTERM to replica `i` at the returned instant; waits for its exit (within `within`).
    pub async fn stop(&mut self, i: usize, within: Duration) -> Instant {
        let proxy = self.replicas[i].proxy.as_mut().expect("replica running");
        let at = Instant::now();
        proxy.signal("TERM");
        let status = proxy.wait_exit(within).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "replica {i} should exit 0 within {within:?} of SIGTERM: {status:?}"
        );
        self.replicas[i].proxy = None;
        at
    }

    /// A rolling-update step for replica `i`: SIGTERM, exit, start again on the same ports,
    /// UP in HAProxy. Returns when SIGTERM was sent.
    pub async fn restart(&mut self, i: usize) -> Instant {
        let at = self.stop(i, Duration::from_secs(60)).await;
        self.launch(i).await;
        let name = self.replicas[i].name();
        self.lb
            .wait_status(&name, "UP", Duration::from_secs(20))
            .await;
        at
    }
}

/// A `[cluster]` section for replica `id` with `peers` as (id, port), each with its id.
pub fn cluster_with_ids(id: usize, peers: &[(usize, u16)], cert: &ClientCert, pki: &Pki) -> String {
    let entries: Vec<String> = peers
        .iter()
        .map(|(id, port)| format!("{{ id = {id}, address = \"127.0.0.1:{port}\" }}"))
        .collect();
    format!(
        "\n[cluster]\nid = {id}\npeers = [{}]\npeer_identity = {:?}\ncert = {:?}\nkey = {:?}\n\
         ca_cert = {:?}\n",
        entries.join(", "),
        PEER_IDENTITY,
        cert.cert.display().to_string(),
        cert.key.display().to_string(),
        pki.ca_pem().display().to_string()
    )
}
