//! Test PKI made with rcgen: a CA, a server certificate for `localhost`/127.0.0.1, and client
//! certificates with a chosen identity (URI SAN, DNS SAN or subject CN), including an expired
//! one and one signed by a CA leasegate does not trust. Everything is written as PEM into a
//! per-test directory (key files mode 0600, as libpq insists).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, date_time_ymd,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{root, set_mode};

/// The identity a client certificate carries.
#[derive(Clone, Debug)]
pub enum Identity {
    /// URI SAN, e.g. `spiffe://leasegate.test/app/billing` (grant `uri:...`).
    Uri(String),
    /// DNS SAN (grant `dns:...`).
    Dns(String),
    /// Subject CN only, no SAN (grant `cn:...`).
    Cn(String),
}

/// A client certificate and key, as files (for psql) and DER (for rustls).
#[derive(Clone)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl ClientCert {
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
}

struct Inner {
    dir: tempfile::TempDir,
    ca: Ca,
    /// A second CA that leasegate is never told about.
    rogue: Ca,
    ca_pem: PathBuf,
    ca_der: CertificateDer<'static>,
    server_cert: PathBuf,
    server_key: PathBuf,
}

/// A per-test PKI; cheap to clone (shared), files removed when the last clone drops.
#[derive(Clone)]
pub struct Pki(Arc<Inner>);

impl Pki {
    pub fn new() -> Pki {
        let dir = root().tempdir("pki-");
        let ca = new_ca("leasegate test CA");
        let rogue = new_ca("untrusted test CA");
        let ca_cert = ca.params.self_signed(&ca.key).expect("self-sign CA");
        let ca_pem = write(dir.path(), "ca.pem", &ca_cert.pem());

        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, false);
        let key = KeyPair::generate().expect("server key");
        let issuer = Issuer::from_params(&ca.params, &ca.key);
        let cert = params.signed_by(&key, &issuer).expect("sign server cert");
        let server_cert = write(dir.path(), "server.pem", &cert.pem());
        let server_key = write(dir.path(), "server-key.pem", &key.serialize_pem());
        set_mode(&server_key, 0o600).expect("chmod server key");
        Pki(Arc::new(Inner {
            dir,
            ca,
            rogue,
            ca_pem,
            ca_der: ca_cert.der().clone(),
            server_cert,
            server_key,
        }))
    }

    pub fn dir(&self) -> &Path {
        self.0.dir.path()
    }
    pub fn ca_pem(&self) -> &Path {
        &self.0.ca_pem
    }
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.0.ca_der.clone()
    }
    pub fn server_cert(&self) -> &Path {
        &self.0.server_cert
    }
    pub fn server_key(&self) -> &Path {
        &self.0.server_key
    }

    /// A valid client certificate signed by the trusted CA.
    pub fn client(&self, name: &str, id: Identity) -> ClientCert {
        self.issue(name, id, &self.0.ca, false)
    }

    /// Signed by the trusted CA but expired since 2021.
    pub fn expired_client(&self, name: &str, id: Identity) -> ClientCert {
        self.issue(name, id, &self.0.ca, true)
    }

    /// Valid, but signed by a CA leasegate does not trust.
    pub fn untrusted_client(&self, name: &str, id: Identity) -> ClientCert {
        self.issue(name, id, &self.0.rogue, false)
    }

    fn issue(&self, name: &str, id: Identity, ca: &Ca, expired: bool) -> ClientCert {
        let mut params = CertificateParams::default();
        match &id {
            Identity::Uri(uri) => {
                let san = uri.clone().try_into().expect("URI SAN is IA5");
                params.subject_alt_names.push(SanType::URI(san));
                params.distinguished_name.push(DnType::CommonName, name);
            }
            Identity::Dns(dns) => {
                let san = dns.clone().try_into().expect("DNS SAN is IA5");
                params.subject_alt_names.push(SanType::DnsName(san));
                params.distinguished_name.push(DnType::CommonName, name);
            }
            Identity::Cn(cn) => params
                .distinguished_name
                .push(DnType::CommonName, cn.as_str()),
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, expired);
        let key = KeyPair::generate().expect("client key");
        let issuer = Issuer::from_params(&ca.params, &ca.key);
        let cert = params.signed_by(&key, &issuer).expect("sign client cert");
        let cert_path = write(self.dir(), &format!("{name}.pem"), &cert.pem());
        let key_path = write(self.dir(), &format!("{name}-key.pem"), &key.serialize_pem());
        set_mode(&key_path, 0o600).expect("chmod client key");
        ClientCert {
            cert: cert_path,
            key: key_path,
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

fn new_ca(cn: &str) -> Ca {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, false);
    Ca {
        params,
        key: KeyPair::generate().expect("CA key"),
    }
}

fn set_validity(params: &mut CertificateParams, expired: bool) {
    if expired {
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2021, 1, 1);
    } else {
        params.not_before = date_time_ymd(2024, 1, 1);
        params.not_after = date_time_ymd(2099, 1, 1);
    }
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}
