//! What `[cluster]` must satisfy before this instance forwards anything, checked at load, on
//! reload and by `check-config`. Peers run the same configuration, so this instance can check
//! its own cluster certificate the way its peers will: it must match `peer_identity` (or they
//! would take its forwarded cancels for a stranger's and drop them) and verify as a client
//! certificate against `listen.client_ca` and `listen.crl` (or their TLS would refuse it).
//! Each `peers` entry must name a host the peers' server certificates can be checked against
//! (`ca_cert` and `peer_identity` are there and parsed: the typed configuration says so).

use std::sync::Arc;

use rustls::pki_types::{ServerName, UnixTime};
use tokio_rustls::TlsConnector;

use crate::config::{ClusterConfig, ListenConfig};
use crate::identity::{IdentityPattern, Principal};
use crate::tls::{self, load_certs, load_key, load_roots, provider};

/// One `peers` entry, parsed.
#[derive(Debug, Clone)]
pub(super) struct PeerSpec {
    /// The host as written (DNS name or IP address), for resolution and logs.
    pub host: String,
    /// The port of the peer's client listener.
    pub port: u16,
    /// The host as the name the peer's server certificate must carry.
    pub name: ServerName<'static>,
    /// The replica id the entry names, if any.
    pub id: Option<u8>,
}

/// A `[cluster]` that passed every check.
pub(super) struct Checked {
    pub identity: IdentityPattern,
    pub connector: TlsConnector,
    pub peers: Vec<PeerSpec>,
    /// This replica's id.
    pub id: Option<u8>,
}

/// Every problem with `[cluster]` given `[listen]`, as `check-config` lines.
pub fn problems(config: &ClusterConfig, listen: &ListenConfig) -> Vec<String> {
    check(config, listen).err().unwrap_or_default()
}

/// Checks everything and builds the connector, or returns every problem found.
pub(super) fn check(config: &ClusterConfig, listen: &ListenConfig) -> Result<Checked, Vec<String>> {
    let mut problems = Vec::new();
    if config.peers.is_empty() {
        problems.push("cluster.peers is empty: name the other instances".into());
    }
    let mut peers = Vec::new();
    for entry in &config.peers {
        match parse_peer(entry.address()) {
            Ok(spec) => peers.push(PeerSpec {
                id: entry.id(),
                ..spec
            }),
            Err(e) => problems.push(format!("cluster.peers: {:?}: {e}", entry.address())),
        }
    }
    let chain = load_certs(&config.cert)
        .map_err(|e| problems.push(format!("cluster.cert: {e}")))
        .ok();
    let key = load_key(&config.key)
        .map_err(|e| problems.push(format!("cluster.key: {e}")))
        .ok();
    if let Some(chain) = &chain {
        check_own_certificate(config, listen, chain, &mut problems);
    }
    let verifier = load_roots(&config.ca_cert)
        .and_then(|roots| {
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| tls::TlsError::Invalid(e.to_string()))
        })
        .map_err(|e| problems.push(format!("cluster.ca_cert: {e}")))
        .ok();
    let (Some(chain), Some(key), Some(verifier), true) =
        (chain, key, verifier, problems.is_empty())
    else {
        return Err(problems);
    };
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(tls::VERSIONS)
        .and_then(|b| {
            b.with_webpki_verifier(verifier)
                .with_client_auth_cert(chain, key)
        })
        .map_err(|e| vec![format!("cluster.cert and cluster.key: {e}")])?;
    // Peers resume nothing either; do not keep what could never be used.
    client.resumption = rustls::client::Resumption::disabled();
    Ok(Checked {
        identity: config.peer_identity.clone(),
        connector: TlsConnector::from(Arc::new(client)),
        peers,
        id: config.id,
    })
}

/// This instance's cluster certificate as its peers will see it.
fn check_own_certificate(
    config: &ClusterConfig,
    listen: &ListenConfig,
    chain: &[rustls::pki_types::CertificateDer<'static>],
    problems: &mut Vec<String>,
) {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return;
    };
    match Principal::from_certificate(leaf) {
        Err(e) => problems.push(format!("cluster.cert: {e}")),
        Ok(principal) => {
            if !config.peer_identity.matches(&principal) {
                problems.push(format!(
                    "cluster.cert: its identities ({}) do not match cluster.peer_identity {:?}: \
                     peers would drop this instance's forwarded cancels",
                    principal.all_identities().join(", "),
                    config.peer_identity.as_str()
                ));
            }
        }
    }
    // Without a usable client CA the listener check reports the problem.
    let Ok(verifier) = tls::server::client_verifier(listen, false) else {
        return;
    };
    if let Err(e) = verifier.verify_client_cert(leaf, intermediates, UnixTime::now()) {
        problems.push(format!(
            "cluster.cert: does not verify as a client certificate against listen.client_ca \
             and listen.crl, as peers check it: {e}"
        ));
    }
}

/// `host:port`, `[v6]:port`; the host becomes the name checked in the peer's certificate.
fn parse_peer(entry: &str) -> Result<PeerSpec, String> {
    let (host, port) = entry
        .rsplit_once(':')
        .ok_or("expected host:port (for example \"leasegate-peers.ns.svc:6432\")")?;
    let port: u16 = match port.parse() {
        Ok(0) | Err(_) => return Err(format!("invalid port {port:?}")),
        Ok(p) => p,
    };
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6,
        None if host.contains(':') => {
            return Err("write an IPv6 address in brackets: [address]:port".into());
        }
        None => host,
    };
    let name = ServerName::try_from(host.to_owned())
        .map_err(|_| format!("{host:?} is neither a DNS name nor an IP address"))?;
    Ok(PeerSpec {
        host: host.to_owned(),
        port,
        name,
        id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_to_the_name_their_certificate_must_carry() {
        let spec = parse_peer("leasegate-peers.ns.svc:6432").expect("dns");
        assert_eq!(
            (spec.host.as_str(), spec.port),
            ("leasegate-peers.ns.svc", 6432)
        );
        assert!(matches!(spec.name, ServerName::DnsName(_)));
        let spec = parse_peer("127.0.0.1:6432").expect("ipv4");
        assert!(matches!(spec.name, ServerName::IpAddress(_)));
        let spec = parse_peer("[::1]:6432").expect("ipv6");
        assert_eq!(spec.host, "::1");
        assert!(matches!(spec.name, ServerName::IpAddress(_)));
        for bad in [
            "nohost",
            "host:0",
            "host:x",
            "::1:6432",
            "bad_name!:6432",
            ":6432",
        ] {
            assert!(parse_peer(bad).is_err(), "{bad}");
        }
    }
}
