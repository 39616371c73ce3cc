//! The client-facing TLS acceptor. Client certificates must chain to `client_ca` (and pass the
//! CRLs); a client that presents no certificate still completes the handshake so that it can be
//! told, in PostgreSQL's own error format, that a certificate is required.

use std::sync::Arc;

use rustls::pki_types::CertificateRevocationListDer;
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use super::{TlsError, load_certs, load_key, load_roots, provider};
use crate::config::ListenConfig;
use crate::escape::logged;

/// ALPN protocol id PostgreSQL 17 clients offer.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Builds the acceptor from the `[listen]` section.
/// (The key's permissions are checked with the other secret files when the configuration
/// loads: `Config::validate`.)
pub fn acceptor(listen: &ListenConfig) -> Result<TlsAcceptor, TlsError> {
    let certs = load_certs(&listen.cert)?;
    let key = load_key(&listen.key)?;
    let roots = load_roots(&listen.client_ca)?;
    for warning in intermediate_anchors(&listen.client_ca)? {
        tracing::warn!("{warning}");
    }
    let mut crls = Vec::new();
    for path in &listen.crl {
        crls.extend(load_crls(path)?);
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Invalid(format!("client_ca: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(super::VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// One warning per certificate in `client_ca` that is not self-signed (its issuer is another
/// name, or its own key does not verify its signature). rustls makes every certificate there
/// a trust anchor: a chain through such an intermediate stops at it, so its own expiry and
/// its issuer's CRL are never checked.
pub fn intermediate_anchors(path: &std::path::Path) -> Result<Vec<String>, TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let mut warnings = Vec::new();
    for cert in load_certs(path)? {
        let (_, x509) = X509Certificate::from_der(cert.as_ref())
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))?;
        let self_issued = x509.issuer().as_raw() == x509.subject().as_raw();
        if self_issued && x509.verify_signature(None).is_ok() {
            continue;
        }
        warnings.push(format!(
            "listen.client_ca: {} holds certificate {} issued by {}, which is not self-signed: \
             it becomes a trust anchor, so its own expiry and its issuer's CRL no longer apply \
             to client certificates issued through it; put the root CA in client_ca and let \
             clients send the intermediate with their certificate",
            path.display(),
            logged(&x509.subject().to_string()),
            logged(&x509.issuer().to_string()),
        ));
    }
    Ok(warnings)
}

fn load_crls(
    path: &std::path::Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    if !data.starts_with(b"-----") {
        return Ok(vec![CertificateRevocationListDer::from(data)]);
    }
    rustls_pemfile::crls(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    fn ca_params(cn: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
    }

    #[test]
    fn only_self_signed_certificates_pass_as_trust_anchors() {
        let root_key = KeyPair::generate().expect("key");
        let root = ca_params("test root").self_signed(&root_key).expect("root");
        let root_params = ca_params("test root");
        let issuer = Issuer::from_params(&root_params, &root_key);
        let inter_key = KeyPair::generate().expect("key");
        let inter = ca_params("test intermediate")
            .signed_by(&inter_key, &issuer)
            .expect("intermediate");
        // Same name as the root, another key: self-issued but not self-signed.
        let impostor_key = KeyPair::generate().expect("key");
        let impostor = ca_params("test root")
            .signed_by(&impostor_key, &issuer)
            .expect("impostor");

        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("client-ca.pem");
        let write = |pems: &[&str]| std::fs::write(&bundle, pems.concat()).expect("write");
        write(&[&root.pem()]);
        assert!(intermediate_anchors(&bundle).expect("loads").is_empty());

        write(&[&root.pem(), &inter.pem(), &impostor.pem()]);
        let warnings = intermediate_anchors(&bundle).expect("loads");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("\"CN=test intermediate\"")
                && warnings[0].contains("issued by \"CN=test root\"")
                && warnings[0].contains("trust anchor")
                && warnings[0].contains("CRL"),
            "{}",
            warnings[0]
        );
        assert!(warnings[1].contains("\"CN=test root\""), "{}", warnings[1]);
    }
}
