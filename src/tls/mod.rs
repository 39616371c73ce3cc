//! TLS: the client-facing acceptor with its client-certificate verifier (`server`) and TLS
//! towards upstream databases (`upstream`); the identity a verified certificate carries is
//! [`crate::identity`]'s. Every config is built with the aws-lc-rs provider, TLS 1.2 and 1.3 only.

pub mod server;
pub mod upstream;

use std::path::Path;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Problems loading TLS material or building a TLS config.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM/DER file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// File path.
        path: String,
        /// Why (in the message, so not also a `source()`).
        error: std::io::Error,
    },
    /// A file held nothing usable.
    #[error("{0}")]
    Invalid(String),
    /// rustls refused the material.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.display().to_string(),
        error,
    })
}

/// Reads every certificate from a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid(format!(
            "{}: no PEM certificate found",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads the first private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = read(path)?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            TlsError::Invalid(format!("{}: no PEM private key found", path.display()))
        }
        e => TlsError::Invalid(format!("{}: {e}", path.display())),
    })
}

/// A root store holding every certificate of a PEM bundle.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// The crypto provider every leasegate TLS config uses.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// TLS versions leasegate speaks.
pub const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Fails when a PEM file's certificates do not parse or are outside their validity period.
pub fn check_validity(path: &Path) -> Result<(), TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    for cert in load_certs(path)? {
        let (_, x509) = X509Certificate::from_der(cert.as_ref())
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))?;
        let validity = x509.validity();
        if !validity.is_valid() {
            return Err(TlsError::Invalid(format!(
                "{}: certificate {} is not valid now (valid {} to {})",
                path.display(),
                x509.subject(),
                validity.not_before,
                validity.not_after
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod pem_tests;
