//! TLS towards upstream databases, with libpq's `sslmode` meanings: `require` encrypts without
//! checking the certificate, `verify-ca` checks the chain, `verify-full` also the host name.
//! Also computes the `tls-server-end-point` channel-binding data for SCRAM-SHA-256-PLUS.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256, Sha384, Sha512};
use tokio_rustls::TlsConnector;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::signature_algorithm::SignatureAlgorithm;

use super::{TlsError, load_roots, provider};
use crate::config::{DatabaseConfig, UpstreamTls};

/// Builds the connector for a database entry; `None` for `tls = "disable"`.
pub fn connector(db: &DatabaseConfig) -> Result<Option<TlsConnector>, TlsError> {
    let verifier: Arc<dyn ServerCertVerifier> = match &db.tls {
        UpstreamTls::Disable => return Ok(None),
        UpstreamTls::Require => Arc::new(NoVerify),
        UpstreamTls::VerifyCa(ca) => Arc::new(ChainOnly(chain_verifier(ca)?)),
        UpstreamTls::VerifyFull(ca) => chain_verifier(ca)?,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(super::VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(TlsConnector::from(Arc::new(config))))
}

/// rustls' verifier of chains to the CA bundle at `path` (and of the host name).
fn chain_verifier(path: &Path) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    let roots = load_roots(path)?;
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))
}

/// The server name to present (SNI) and, for `verify-full`, to check. Loading refuses
/// `verify-full` with a host that is not a valid name or address, so the `localhost` stand-in
/// only ever serves as the SNI of `require` and `verify-ca`, which do not check the name.
pub fn server_name(host: &str) -> ServerName<'static> {
    ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| ServerName::try_from("localhost").expect("static name is valid"))
}

/// `tls-server-end-point` channel-binding data (RFC 5929): the server certificate hashed with
/// its signature's hash (for RSASSA-PSS, the hash named in its parameters), SHA-256 for
/// MD5/SHA-1 and unknown algorithms, as PostgreSQL computes it.
pub fn server_end_point(cert: &CertificateDer<'_>) -> Vec<u8> {
    match signature_hash(cert.as_ref()) {
        Hash::Sha384 => Sha384::digest(cert).to_vec(),
        Hash::Sha512 => Sha512::digest(cert).to_vec(),
        Hash::Sha256 => Sha256::digest(cert).to_vec(),
    }
}

/// The hash a certificate's signature uses, for channel binding.
#[derive(Debug, PartialEq, Eq)]
enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

fn signature_hash(der: &[u8]) -> Hash {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Hash::Sha256;
    };
    let algorithm = &cert.signature_algorithm;
    let oid = match SignatureAlgorithm::try_from(algorithm) {
        Ok(SignatureAlgorithm::RSASSA_PSS(params)) => params.hash_algorithm_oid().to_id_string(),
        _ => algorithm.algorithm.to_id_string(),
    };
    match oid.as_str() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384, id-sha384 (RSASSA-PSS)
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" | "2.16.840.1.101.3.4.2.2" => Hash::Sha384,
        // sha512WithRSAEncryption, ecdsa-with-SHA512, id-sha512 (RSASSA-PSS)
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" | "2.16.840.1.101.3.4.2.3" => Hash::Sha512,
        _ => Hash::Sha256,
    }
}

/// `verify-ca`: the chain must verify, the name need not match.
#[derive(Debug)]
pub(crate) struct ChainOnly(pub(crate) Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require`: encryption without authentication of the server, as libpq's `sslmode=require`.
#[derive(Debug)]
struct NoVerify;

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RSASSA-PSS certificates made with `openssl req -x509 -sigopt rsa_padding_mode:pss
    /// -<hash>`: the binding hash is the one in the PSS parameters.
    #[test]
    fn rsa_pss_uses_the_hash_in_its_parameters() {
        let cases: [(&[u8], Hash, usize); 3] = [
            (
                include_bytes!("testdata/rsa-pss-sha256.der"),
                Hash::Sha256,
                32,
            ),
            (
                include_bytes!("testdata/rsa-pss-sha384.der"),
                Hash::Sha384,
                48,
            ),
            (
                include_bytes!("testdata/rsa-pss-sha512.der"),
                Hash::Sha512,
                64,
            ),
        ];
        for (der, hash, len) in cases {
            assert_eq!(signature_hash(der), hash);
            assert_eq!(
                server_end_point(&CertificateDer::from(der.to_vec())).len(),
                len
            );
        }
    }

    #[test]
    fn ecdsa_and_garbage() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["db".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert_eq!(signature_hash(cert.der()), Hash::Sha384);
        assert_eq!(signature_hash(&[1, 2, 3]), Hash::Sha256);
    }
}
