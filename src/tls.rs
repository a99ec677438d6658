//! The rustls client configuration shared by `rediss://` connections and the Rust client's
//! `wss://` (cargo feature `tls`): the system's root certificates, plus a private CA when
//! one is given; the ring crypto provider; TLS 1.2 and 1.3.

use std::sync::{Arc, LazyLock};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Why a TLS client configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsConfigError {
    /// The CA file is not PEM, or holds a certificate rustls cannot use.
    #[error("the CA file")]
    CaFile(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The CA file holds no certificate.
    #[error("the CA file holds no PEM certificate")]
    EmptyCaFile,
    /// Nothing to trust.
    #[error("no trusted root certificate (none on the system, no CA file given)")]
    NoRoots,
    /// rustls refused the protocol versions.
    #[error("TLS protocol versions")]
    Versions(#[source] rustls::Error),
}

/// The system's root certificates, read once per process: reading them is blocking file
/// I/O, which a client reconnecting would otherwise repeat on every attempt.
static SYSTEM_ROOTS: LazyLock<RootCertStore> = LazyLock::new(|| {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot read is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    roots
});

/// A client configuration trusting the system's roots and the certificates in `ca_pem`.
pub(crate) fn client_config(
    ca_pem: Option<&[u8]>,
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let mut roots = SYSTEM_ROOTS.clone();
    if let Some(pem) = ca_pem {
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| TlsConfigError::CaFile(Box::new(e)))?;
            roots
                .add(cert)
                .map_err(|e| TlsConfigError::CaFile(Box::new(e)))?;
            found += 1;
        }
        if found == 0 {
            return Err(TlsConfigError::EmptyCaFile);
        }
    }
    if roots.is_empty() {
        return Err(TlsConfigError::NoRoots);
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(TlsConfigError::Versions)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}
