//! TLS for both sides of the proxy: the server side presents the configured certificate
//! (reloadable without dropping connections) and may ask for a client certificate; the
//! upstream side trusts only the configured CA for Exchange.

use std::{path::Path, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    crypto::aws_lc_rs,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    ServerConfig,
};

pub use crate::net::tls::TlsError;
use crate::{
    model::settings::ProxySettings,
    net::tls::{file_error, load_certs, roots},
};

fn load_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(cert)?;
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
    let signer = aws_lc_rs::sign::any_supported_type(&der).map_err(|e| file_error(key, e))?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|e| file_error(key, format!("does not match {}: {e}", cert.display())))?;
    Ok(certified)
}

/// The served certificate, swapped whole on reload; handshakes in flight keep the old one.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    pub fn load(cert: &Path, key: &Path) -> Result<CertResolver, TlsError> {
        Ok(CertResolver {
            current: ArcSwap::from_pointee(load_key(cert, key)?),
        })
    }

    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        self.current.store(Arc::new(load_key(cert, key)?));
        Ok(())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

pub fn server_config(
    settings: &ProxySettings,
    resolver: Arc<CertResolver>,
) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &settings.client_ca {
        Some(ca) => {
            // Asked for, verified when given, never required: rules decide what it is worth.
            let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| file_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if settings.tls_resumption {
        config.ticketer = aws_lc_rs::Ticketer::new()?;
    } else {
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(config)
}

/// The subject of a verified client certificate: its e-mail SAN, else its CN.
pub fn client_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::RFC822Name(mail) = name {
                return Some(mail.to_string());
            }
        }
    }
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    cn
}
