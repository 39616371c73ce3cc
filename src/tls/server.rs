//! The client-facing TLS acceptor. Client certificates must chain to `client_ca` (and pass the
//! CRLs); a client that presents no certificate still completes the handshake so that it can be
//! told, in PostgreSQL's own error format, that a certificate is required.

use std::sync::Arc;

use rustls::pki_types::CertificateRevocationListDer;
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use super::{TlsError, load_certs, load_key, load_roots, provider};
use crate::config::ListenConfig;

/// ALPN protocol id PostgreSQL 17 clients offer.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Builds the acceptor from the `[listen]` section.
pub fn acceptor(listen: &ListenConfig) -> Result<TlsAcceptor, TlsError> {
    check_key_permissions(&listen.key)?;
    let certs = load_certs(&listen.cert)?;
    let key = load_key(&listen.key)?;
    let roots = load_roots(&listen.client_ca)?;
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

/// Refuses a server key readable by every user; warns when the group can read it.
pub fn check_key_permissions(path: &std::path::Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o004 != 0 {
        return Err(TlsError::Invalid(format!(
            "{}: the private key is readable by every user (mode {:o}); run chmod 600",
            path.display(),
            mode & 0o777
        )));
    }
    if mode & 0o040 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777),
            "the server private key is readable by its group");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn world_readable_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "x").expect("write");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = check_key_permissions(&key).expect_err("refused");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(check_key_permissions(&key).is_ok());
    }
}
