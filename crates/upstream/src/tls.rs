use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A rustls client config: ring provider, webpki roots plus `extra_pem`,
/// no ALPN (the connector builder adds it).
pub(crate) fn client_config(extra_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_pem {
        add_roots(&mut roots, pem)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // ALPN (h2, http/1.1) is set by hyper-rustls's connector builder.
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Add the certificates of `pem` to `roots`; an error for PEM that is
/// broken, holds no certificate, or one rustls cannot use as a root.
fn add_roots(roots: &mut rustls::RootCertStore, pem: &[u8]) -> Result<(), String> {
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("bad PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("bad certificate: {e}"))?;
        added += 1;
    }
    if added == 0 {
        return Err("no certificate found in the PEM data".into());
    }
    Ok(())
}

/// Check PEM given as extra roots (an upstream's `tls_ca_file`) as the
/// upstream will read it, so that a config loader can say which file is
/// wrong before anything starts.
pub fn check_roots_pem(pem: &[u8]) -> Result<(), String> {
    add_roots(&mut rustls::RootCertStore::empty(), pem)
}
