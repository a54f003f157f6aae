//! TLS pieces shared by every layer that opens connections: certificates and trust roots
//! from PEM bytes (the proxy reads no files: its config bundle carries them), and the client
//! configuration used toward Exchange and allow-listed key servers.

use std::{fmt, path::Path, sync::Arc};

use rustls::{
    crypto::aws_lc_rs,
    pki_types::{pem::PemObject, CertificateDer},
    ClientConfig, RootCertStore,
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
}

pub fn file_error(path: &Path, message: impl fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The certificates of a PEM file's bytes; `path` names it in errors.
pub fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

pub fn roots(path: &Path, pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(path, pem)? {
        store.add(c).map_err(|e| file_error(path, e))?;
    }
    Ok(Arc::new(store))
}

/// A client trusting only the CA in `pem`, speaking HTTP/1.1.
pub fn client_config(path: &Path, pem: &[u8]) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots(path, pem)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// [`client_config`] from a file on disk.
pub fn upstream_config(ca: &Path) -> Result<ClientConfig, TlsError> {
    let pem = std::fs::read(ca).map_err(|e| file_error(ca, e))?;
    client_config(ca, &pem)
}
