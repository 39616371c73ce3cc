//! The identity a verified client certificate carries: its URI SANs, DNS SANs and subject CN,
//! plus the serial and SHA-256 fingerprint for audit lines. The leaf's validity period is
//! checked again here, where the identity is taken (defence in depth: the TLS verifier checks
//! it on every full handshake, and resumption is off).

use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{ASN1Time, FromDer, X509Certificate};

use crate::policy::IdentityKind;

/// Who a client is, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Principal {
    /// URI subject alternative names (SPIFFE IDs among them).
    pub uris: Vec<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// Subject common name, if any.
    pub common_name: Option<String>,
    /// Certificate serial number, hex.
    pub serial: String,
    /// SHA-256 of the certificate DER, hex.
    pub fingerprint: String,
}

impl Principal {
    /// A principal from its identity parts (serial and fingerprint empty).
    pub fn new(uris: Vec<String>, dns_names: Vec<String>, common_name: Option<String>) -> Self {
        Principal {
            uris,
            dns_names,
            common_name,
            ..Principal::default()
        }
    }

    /// Parses the end-entity certificate of a verified chain; refuses one that is not valid
    /// now (expired or not yet valid).
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Result<Principal, String> {
        let (_, x509) = X509Certificate::from_der(cert.as_ref())
            .map_err(|e| format!("client certificate does not parse: {e}"))?;
        let validity = x509.validity();
        let now = ASN1Time::now();
        if now > validity.not_after {
            return Err(format!(
                "client certificate has expired (valid until {})",
                validity.not_after
            ));
        }
        if now < validity.not_before {
            return Err(format!(
                "client certificate is not yet valid (valid from {})",
                validity.not_before
            ));
        }
        let mut principal = Principal {
            serial: x509.raw_serial_as_string().replace(':', ""),
            fingerprint: hex(&Sha256::digest(cert.as_ref())),
            ..Principal::default()
        };
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => principal.uris.push((*u).to_owned()),
                    GeneralName::DNSName(d) => principal.dns_names.push((*d).to_owned()),
                    _ => {}
                }
            }
        }
        principal.common_name = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Ok(principal)
    }

    /// Every identity as (kind, value): URIs, then DNS names, then the CN.
    pub fn identities(&self) -> impl Iterator<Item = (IdentityKind, &str)> {
        self.uris
            .iter()
            .map(|u| (IdentityKind::Uri, u.as_str()))
            .chain(
                self.dns_names
                    .iter()
                    .map(|d| (IdentityKind::Dns, d.as_str())),
            )
            .chain(
                self.common_name
                    .iter()
                    .map(|c| (IdentityKind::Cn, c.as_str())),
            )
    }

    /// The identity used in messages: the first URI SAN, else DNS SAN, else CN.
    pub fn display_name(&self) -> String {
        self.identities()
            .next()
            .map(|(k, v)| format!("{}:{}", k.prefix(), v))
            .unwrap_or_else(|| "(certificate without identity)".to_owned())
    }

    /// Every identity, `kind:value`, for audit lines.
    pub fn all_identities(&self) -> Vec<String> {
        self.identities()
            .map(|(k, v)| format!("{}:{}", k.prefix(), v))
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_sans_and_cn() {
        let mut params =
            rcgen::CertificateParams::new(vec!["db.example.org".to_string()]).expect("params");
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example.org/app/billing".try_into().expect("uri"),
        ));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "billing");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let p = Principal::from_certificate(cert.der()).expect("parses");
        assert_eq!(p.uris, vec!["spiffe://example.org/app/billing"]);
        assert_eq!(p.dns_names, vec!["db.example.org"]);
        assert_eq!(p.common_name.as_deref(), Some("billing"));
        assert_eq!(p.display_name(), "uri:spiffe://example.org/app/billing");
        assert_eq!(p.fingerprint.len(), 64);
        assert!(!p.serial.is_empty());
    }

    #[test]
    fn certificates_outside_their_validity_are_refused() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut expired = rcgen::CertificateParams::new(vec!["a.example".into()]).expect("params");
        expired.not_before = rcgen::date_time_ymd(2020, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let cert = expired.self_signed(&key).expect("cert");
        let err = Principal::from_certificate(cert.der()).expect_err("expired");
        assert!(err.contains("has expired"), "{err}");
        let mut future = rcgen::CertificateParams::new(vec!["a.example".into()]).expect("params");
        future.not_before = rcgen::date_time_ymd(2098, 1, 1);
        future.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let cert = future.self_signed(&key).expect("cert");
        let err = Principal::from_certificate(cert.der()).expect_err("not yet valid");
        assert!(err.contains("not yet valid"), "{err}");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Principal::from_certificate(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }
}
