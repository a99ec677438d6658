//! The rustls client configuration shared by `rediss://` connections and the Rust client's
//! `wss://` (cargo feature `tls`): the system's root certificates, plus a private CA when
//! one is given; the ring crypto provider; TLS 1.2 and 1.3.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// A client configuration trusting the system's roots and the certificates in `ca_pem`.
pub(crate) fn client_config(ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot read is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if let Some(pem) = ca_pem {
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("the CA file: {e}"))?;
            roots.add(cert).map_err(|e| format!("the CA file: {e}"))?;
            found += 1;
        }
        if found == 0 {
            return Err("the CA file holds no PEM certificate".into());
        }
    }
    if roots.is_empty() {
        return Err("no trusted root certificate (none on the system, no CA file given)".into());
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}
