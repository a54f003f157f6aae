//! One careful HTTP GET for key documents (Exchange auth metadata, Entra ID discovery and
//! JWKS): no redirects, nothing but a 200 accepted, a size cap on the body and one deadline
//! over connect, handshake, head and body. TLS trusts only the CA bytes it is given, so the
//! process that fetches needs no access to the file system.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::{
    crypto::aws_lc_rs,
    pki_types::{pem::PemObject, CertificateDer, ServerName},
    ClientConfig, RootCertStore,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}: not an http:// or https:// URL with a host")]
    Url(String),
    #[error("{0}: https needs a CA")]
    NoCa(String),
    #[error("{0}: timed out")]
    Timeout(String),
    #[error("{0}: {1}")]
    Io(String, String),
    #[error("{0}: answered {1} (redirects are not followed)")]
    Status(String, StatusCode),
    #[error("{0}: larger than {1} bytes")]
    TooLarge(String, usize),
    #[error("{0}: {1}")]
    Document(String, String),
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA: {0}")]
    Pem(String),
    #[error("CA: no certificate in the PEM text")]
    Empty,
    #[error("CA: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A TLS client config trusting exactly the certificates of a PEM text.
pub fn client_config(ca_pem: &[u8]) -> Result<ClientConfig, CaError> {
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| CaError::Pem(e.to_string()))?;
        // A bundle (such as Debian's) may hold a few certificates webpki cannot use.
        let _ = store.add(cert);
    }
    if store.is_empty() {
        return Err(CaError::Empty);
    }
    let provider = Arc::new(aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// GETs with the limits of one key source.
pub struct Fetcher {
    tls: Option<TlsConnector>,
    pub timeout: Duration,
    pub max_bytes: usize,
}

impl Fetcher {
    pub fn new(
        ca_pem: Option<&[u8]>,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Fetcher, CaError> {
        let tls = ca_pem
            .map(client_config)
            .transpose()?
            .map(|c| TlsConnector::from(Arc::new(c)));
        Ok(Fetcher {
            tls,
            timeout,
            max_bytes,
        })
    }

    /// The body of a 200 answer, or why not.
    pub async fn get(&self, url: &str) -> Result<Bytes, FetchError> {
        tokio::time::timeout(self.timeout, self.get_unbounded(url))
            .await
            .map_err(|_| FetchError::Timeout(url.into()))?
    }

    async fn get_unbounded(&self, url: &str) -> Result<Bytes, FetchError> {
        let uri: Uri = url.parse().map_err(|_| FetchError::Url(url.into()))?;
        let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
            return Err(FetchError::Url(url.into()));
        };
        let https = match scheme {
            "https" => true,
            "http" => false,
            _ => return Err(FetchError::Url(url.into())),
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let io = |e: std::io::Error| FetchError::Io(url.into(), e.to_string());
        let bare_host = host.trim_matches(['[', ']']);
        let tcp = TcpStream::connect((bare_host, port)).await.map_err(io)?;
        let request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, uri.authority().map_or(host, |a| a.as_str()))
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| FetchError::Io(url.into(), e.to_string()))?;
        let hyper = |e: hyper::Error| FetchError::Io(url.into(), e.to_string());
        let response = if https {
            let tls = self
                .tls
                .as_ref()
                .ok_or_else(|| FetchError::NoCa(url.into()))?;
            let name = ServerName::try_from(bare_host.to_string())
                .map_err(|_| FetchError::Url(url.into()))?;
            let stream = tls.connect(name, tcp).await.map_err(io)?;
            send(TokioIo::new(stream), request).await.map_err(hyper)?
        } else {
            send(TokioIo::new(tcp), request).await.map_err(hyper)?
        };
        if response.status() != StatusCode::OK {
            return Err(FetchError::Status(url.into(), response.status()));
        }
        let max = self.max_bytes;
        match Limited::new(response.into_body(), max).collect().await {
            Ok(body) => Ok(body.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(FetchError::TooLarge(url.into(), max))
            }
            Err(e) => Err(FetchError::Io(url.into(), e.to_string())),
        }
    }
}

async fn send<IO>(
    io: IO,
    request: Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    sender.send_request(request).await
}
