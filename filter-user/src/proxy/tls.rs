//! The client-facing TLS: the configured certificate (the same as IIS, so Extended
//! Protection keeps working), an optional client CA, ALPN `http/1.1`. A reload builds a new
//! server config; handshakes in flight keep the one they started with.

use std::sync::Arc;

use rustls::{
    crypto::aws_lc_rs,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{NoServerSessionStorage, WebPkiClientVerifier},
    ServerConfig,
};

pub use crate::net::tls::TlsError;
use crate::{
    config::Bundle,
    model::settings::ProxySettings,
    net::tls::{certs, file_error, roots},
};

/// The server config and the DNS names its certificate carries.
pub fn server_config(
    settings: &ProxySettings,
    bundle: &Bundle,
) -> Result<(ServerConfig, Vec<String>), TlsError> {
    let read = |p: &std::path::Path| bundle.file(p).map_err(|e| file_error(p, e));
    let chain = certs(&settings.certificate, read(&settings.certificate)?)?;
    let key_path = &settings.private_key;
    let key =
        PrivateKeyDer::from_pem_slice(read(key_path)?).map_err(|e| file_error(key_path, e))?;
    let names = dns_names(&chain[0]);
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &settings.client_ca {
        Some(ca) => {
            // Asked for, verified when given, never required: rules decide what it is worth.
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots(ca, read(ca)?)?, provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| file_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| file_error(key_path, format!("does not match the certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if settings.tls_resumption {
        config.ticketer = aws_lc_rs::Ticketer::new()?;
    } else {
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok((config, names))
}

/// The names of a certificate's subjectAltName, as `Host` carries them: DNS names
/// lower-cased, IPv4 addresses, IPv6 addresses in brackets.
fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    names.push(d.to_ascii_lowercase())
                }
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*ip) {
                        names.push(std::net::Ipv4Addr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*ip) {
                        names.push(format!("[{}]", std::net::Ipv6Addr::from(v6)));
                    }
                }
                _ => {}
            }
        }
    }
    names
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
