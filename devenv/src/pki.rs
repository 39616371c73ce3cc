//! Development PKI made with rcgen: CAs, server certificates (serverAuth) and client
//! certificates (clientAuth) carrying an identity leasegate reads (URI SAN, DNS SAN or
//! subject CN), written as PEM files; keys are PKCS#8 PEM with mode 0600 (libpq insists).
//!
//! [`write_dev_pki`] writes the set the demo and the benchmark use, with the file names of
//! `certs/gen-dev-certs.sh` (which can issue more certificates from the same CA).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, date_time_ymd,
};

use crate::{Context, Result, process};

/// The identity a client certificate carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// URI SAN, e.g. `spiffe://leasegate.test/app/billing` (grant `uri:...`).
    Uri(String),
    /// DNS SAN (grant `dns:...`).
    Dns(String),
    /// Subject CN only, no SAN (grant `cn:...`).
    Cn(String),
}

/// A certificate authority: its parameters (to issue with) and its key.
pub struct Ca {
    /// What it was made from; issuing needs them again (rcgen's `Issuer`).
    pub params: CertificateParams,
    /// Signs what it issues.
    pub key: KeyPair,
}

impl Ca {
    /// A new CA (cA=true, keyCertSign, cRLSign) with subject CN `cn` and a fresh key.
    pub fn new(cn: &str) -> Result<Ca> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, false);
        let key = KeyPair::generate().context(|| "generate a CA key".into())?;
        Ok(Ca { params, key })
    }

    /// The CA's self-signed certificate.
    pub fn self_signed(&self) -> Result<Certificate> {
        self.params
            .self_signed(&self.key)
            .context(|| "self-sign the CA".into())
    }

    /// What `signed_by` takes to issue a certificate from this CA.
    pub fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }
}

/// Valid from 2024 to 2099, or (`expired`) from 2020 to 2021.
pub fn set_validity(params: &mut CertificateParams, expired: bool) {
    if expired {
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2021, 1, 1);
    } else {
        params.not_before = date_time_ymd(2024, 1, 1);
        params.not_after = date_time_ymd(2099, 1, 1);
    }
}

/// A server certificate's parameters: subject CN `cn`, SANs `dns` and `ips`, serverAuth.
pub fn server_params(cn: &str, dns: &[&str], ips: &[IpAddr]) -> Result<CertificateParams> {
    let names = dns.iter().map(|d| d.to_string()).collect::<Vec<_>>();
    let mut params = CertificateParams::new(names).context(|| format!("server names {dns:?}"))?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, false);
    Ok(params)
}

/// A client certificate's parameters: `id` as SAN with CN `name`, or as the CN alone;
/// clientAuth.
pub fn client_params(name: &str, id: &Identity) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    match id {
        Identity::Uri(uri) => {
            let san = uri
                .clone()
                .try_into()
                .context(|| format!("URI SAN {uri}"))?;
            params.subject_alt_names.push(SanType::URI(san));
            params.distinguished_name.push(DnType::CommonName, name);
        }
        Identity::Dns(dns) => {
            let san = dns
                .clone()
                .try_into()
                .context(|| format!("DNS SAN {dns}"))?;
            params.subject_alt_names.push(SanType::DnsName(san));
            params.distinguished_name.push(DnType::CommonName, name);
        }
        Identity::Cn(cn) => params
            .distinguished_name
            .push(DnType::CommonName, cn.as_str()),
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, false);
    Ok(params)
}

/// Issues `params` from `issuer` with a fresh key (ECDSA P-256).
pub fn sign(
    params: &CertificateParams,
    issuer: &Issuer<'_, &KeyPair>,
) -> Result<(Certificate, KeyPair)> {
    let key = KeyPair::generate().context(|| "generate a key".into())?;
    sign_key(params, issuer, key)
}

/// Issues `params` from `issuer` for `key` (any algorithm rcgen can generate).
pub fn sign_key(
    params: &CertificateParams,
    issuer: &Issuer<'_, &KeyPair>,
    key: KeyPair,
) -> Result<(Certificate, KeyPair)> {
    let cert = params
        .signed_by(&key, issuer)
        .context(|| "sign a certificate".into())?;
    Ok((cert, key))
}

/// Writes a certificate (or CRL) PEM as `dir/file`, world-readable.
pub fn write_pem(dir: &Path, file: &str, pem: &str) -> Result<PathBuf> {
    let path = dir.join(file);
    std::fs::write(&path, pem).context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// Writes a private key PEM as `dir/file`, mode 0600 from the start.
pub fn write_key(dir: &Path, file: &str, key: &KeyPair) -> Result<PathBuf> {
    let path = dir.join(file);
    process::write_private(&path, &key.serialize_pem())?;
    Ok(path)
}

/// The files of [`write_dev_pki`].
#[derive(Clone, Debug)]
pub struct DevPki {
    /// The CA certificate (`ca.pem`): leasegate's `client_ca`, the clients' `sslrootcert`.
    pub ca: PathBuf,
    /// Its key (`ca-key.pem`), so that `certs/gen-dev-certs.sh client NAME --dir DIR` can
    /// issue more client certificates.
    pub ca_key: PathBuf,
    /// `server.pem`: CN and SAN localhost, SANs 127.0.0.1 and ::1.
    pub server_cert: PathBuf,
    /// `server-key.pem` (0600).
    pub server_key: PathBuf,
    /// `app.pem`: the client certificate of [`DEV_CLIENT_IDENTITY`].
    pub client_cert: PathBuf,
    /// `app-key.pem` (0600).
    pub client_key: PathBuf,
}

/// The identity of the dev client certificate `app.pem` (as a grant names it).
pub const DEV_CLIENT_IDENTITY: &str = "uri:spiffe://example.org/app/demo";

/// Writes a dev CA, a server certificate for localhost and the client certificate `app`
/// ([`DEV_CLIENT_IDENTITY`]) into `dir` (created, mode 0755).
pub fn write_dev_pki(dir: &Path) -> Result<DevPki> {
    process::make_dir(dir, 0o755)?;
    let ca = Ca::new("leasegate dev CA")?;
    let ca_cert = ca.self_signed()?;
    let localhost = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    let server = server_params("localhost", &["localhost"], &localhost)?;
    let (server_cert, server_key) = sign(&server, &ca.issuer())?;
    let uri = DEV_CLIENT_IDENTITY.trim_start_matches("uri:").to_string();
    let client = client_params("app", &Identity::Uri(uri))?;
    let (client_cert, client_key) = sign(&client, &ca.issuer())?;
    Ok(DevPki {
        ca: write_pem(dir, "ca.pem", &ca_cert.pem())?,
        ca_key: write_key(dir, "ca-key.pem", &ca.key)?,
        server_cert: write_pem(dir, "server.pem", &server_cert.pem())?,
        server_key: write_key(dir, "server-key.pem", &server_key)?,
        client_cert: write_pem(dir, "app.pem", &client_cert.pem())?,
        client_key: write_key(dir, "app-key.pem", &client_key)?,
    })
}
