//! Test PKI made with rcgen: a CA, a server certificate for `localhost`/127.0.0.1, and client
//! certificates with a chosen identity (URI SAN, DNS SAN or subject CN), including an expired
//! one and one signed by a CA leasegate does not trust; for security tests also customised
//! certificates ([`Pki::client_with`]), CA certificates used as client certificates,
//! certificates issued through an intermediate CA, and CRLs. Everything is written as PEM into
//! a per-test directory (key files mode 0600, as libpq insists). The CA, server and client
//! certificate basics are the dev environment's (`devenv::pki`); the variants are here.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use devenv::pki::{Ca, client_params, server_params, set_validity};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber, date_time_ymd,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::root;

/// The identity a client certificate carries (URI SAN, DNS SAN or subject CN only).
pub use devenv::pki::Identity;

/// A client certificate and key, as files (for psql) and DER (for rustls).
#[derive(Clone)]
pub struct ClientCert {
    /// PEM file: the certificate, followed by `chain` (what libpq sends).
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_der: CertificateDer<'static>,
    /// Intermediate CA certificates sent after `cert_der` (normally none).
    pub chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl ClientCert {
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
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
        let ca_cert = ca.self_signed().expect("self-sign CA");
        let ca_pem = write(dir.path(), "ca.pem", &ca_cert.pem());

        let localhost = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
        let params = server_params("localhost", &["localhost"], &localhost).expect("params");
        let (cert, key) = devenv::pki::sign(&params, &ca.issuer()).expect("sign server cert");
        let server_cert = write(dir.path(), "server.pem", &cert.pem());
        let server_key = write_key(dir.path(), "server-key.pem", &key);
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

    /// A server certificate (serverAuth) for exactly `dns` and `ips`, signed by the trusted CA,
    /// written as `<file>.pem` and `<file>-key.pem` (0600); returns (cert, key).
    pub fn server_with_names(
        &self,
        file: &str,
        dns: &[&str],
        ips: &[IpAddr],
    ) -> (PathBuf, PathBuf) {
        let params = server_params(file, dns, ips).expect("params");
        let (cert, key) =
            devenv::pki::sign(&params, &self.0.ca.issuer()).expect("sign server cert");
        let cert_path = write(self.dir(), &format!("{file}.pem"), &cert.pem());
        let key_path = write_key(self.dir(), &format!("{file}-key.pem"), &key);
        (cert_path, key_path)
    }

    /// A valid client certificate signed by the trusted CA.
    pub fn client(&self, name: &str, id: Identity) -> ClientCert {
        self.issue(name, id, &self.0.ca, false)
    }

    /// Signed by the trusted CA, valid from a minute ago until `valid` from now (certificates
    /// count whole seconds); also returns the end of its validity.
    pub fn short_lived_client(
        &self,
        name: &str,
        id: Identity,
        valid: std::time::Duration,
    ) -> (ClientCert, std::time::SystemTime) {
        let now = std::time::SystemTime::now();
        let not_after = now + valid;
        let cert = self.client_with(name, id, |params| {
            params.not_before = (now - std::time::Duration::from_secs(60)).into();
            params.not_after = not_after.into();
        });
        (cert, not_after)
    }

    /// Signed by the trusted CA but expired since 2021.
    pub fn expired_client(&self, name: &str, id: Identity) -> ClientCert {
        self.issue(name, id, &self.0.ca, true)
    }

    /// Valid, but signed by a CA leasegate does not trust.
    pub fn untrusted_client(&self, name: &str, id: Identity) -> ClientCert {
        self.issue(name, id, &self.0.rogue, false)
    }

    /// Signed by the trusted CA, with `customize` applied to the parameters last (validity,
    /// key usages, serial number, extra names, ...).
    pub fn client_with(
        &self,
        name: &str,
        id: Identity,
        customize: impl FnOnce(&mut CertificateParams),
    ) -> ClientCert {
        self.issue_by(name, id, &self.0.ca.issuer(), Vec::new(), customize, None)
    }

    /// A CA certificate (basicConstraints cA=true, keyCertSign) with the identity and the
    /// clientAuth usage, signed by the trusted CA, presented as a client certificate.
    pub fn ca_as_client(&self, name: &str, id: Identity) -> ClientCert {
        self.client_with(name, id, |params| {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
        })
    }

    /// Issued by an intermediate CA that the trusted CA signed; the intermediate is in
    /// `chain` (and in the PEM file), so the client sends leaf + intermediate while
    /// leasegate's `client_ca` holds only the root.
    pub fn intermediate_client(&self, name: &str, id: Identity) -> ClientCert {
        let intermediate = new_ca(&format!("{name} intermediate CA"));
        let inter_cert = intermediate
            .params
            .signed_by(&intermediate.key, &self.0.ca.issuer())
            .expect("sign intermediate CA");
        let chain = vec![inter_cert.der().clone()];
        self.issue_by(name, id, &intermediate.issuer(), chain, |_| {}, None)
    }

    /// A CRL (PEM, written into the PKI directory) of the trusted CA revoking `revoked`.
    pub fn crl(&self, file: &str, revoked: &[&ClientCert]) -> PathBuf {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let revoked_certs = revoked
            .iter()
            .map(|c| {
                let (_, x509) =
                    X509Certificate::from_der(c.cert_der.as_ref()).expect("parse certificate");
                RevokedCertParams {
                    serial_number: SerialNumber::from_slice(x509.raw_serial()),
                    revocation_time: date_time_ymd(2024, 6, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                }
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2024, 6, 1),
            next_update: date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.0.ca.issuer()).expect("sign CRL");
        write(self.dir(), file, &crl.pem().expect("CRL to PEM"))
    }

    fn issue(&self, name: &str, id: Identity, ca: &Ca, expired: bool) -> ClientCert {
        let validity = |params: &mut CertificateParams| set_validity(params, expired);
        self.issue_by(name, id, &ca.issuer(), Vec::new(), validity, None)
    }

    /// A client certificate for `key` (RSA, ECDSA P-384, Ed25519...), signed by the trusted CA.
    pub fn client_with_key(&self, name: &str, id: Identity, key: KeyPair) -> ClientCert {
        self.issue_by(name, id, &self.0.ca.issuer(), Vec::new(), |_| {}, Some(key))
    }

    /// Signs a client certificate for `id` from `issuer` (`key`: a fresh P-256 key when `None`),
    /// `customize` applied to the parameters last; writes the certificate (with `chain`) and key.
    fn issue_by(
        &self,
        name: &str,
        id: Identity,
        issuer: &Issuer<'_, &KeyPair>,
        chain: Vec<CertificateDer<'static>>,
        customize: impl FnOnce(&mut CertificateParams),
        key: Option<KeyPair>,
    ) -> ClientCert {
        let key = key.unwrap_or_else(|| KeyPair::generate().expect("generate a key"));
        let mut params = client_params(name, &id).expect("client certificate parameters");
        customize(&mut params);
        let (cert, key) = devenv::pki::sign_key(&params, issuer, key).expect("sign client cert");
        let mut pem = cert.pem();
        for der in &chain {
            pem.push_str(&pem_certificate(der));
        }
        let cert_path = write(self.dir(), &format!("{name}.pem"), &pem);
        let key_path = write_key(self.dir(), &format!("{name}-key.pem"), &key);
        ClientCert {
            cert: cert_path,
            key: key_path,
            cert_der: cert.der().clone(),
            chain,
            key_der: key.serialize_der(),
        }
    }
}

/// PEM text of a DER certificate.
pub fn pem_certificate(der: &CertificateDer<'_>) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in der.as_ref().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                text.push('=');
            }
        }
    }
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn new_ca(cn: &str) -> Ca {
    Ca::new(cn).expect("CA")
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    devenv::pki::write_pem(dir, name, pem).unwrap_or_else(|e| panic!("{e}"))
}

fn write_key(dir: &Path, name: &str, key: &KeyPair) -> PathBuf {
    devenv::pki::write_key(dir, name, key).unwrap_or_else(|e| panic!("{e}"))
}
