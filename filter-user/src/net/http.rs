//! One small HTTP/1.1 GET client for the agent's fetches (range feeds, the CrowdSec LAPI):
//! a deadline over the whole exchange, a cap on the body, TLS verified against a configured
//! CA or the system's roots, and no redirects. A 3xx is an error that names its `Location`:
//! the configured URL is the trust anchor, and a redirect (an open redirect on a CDN, a
//! captive portal) would move it somewhere nobody reviewed.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::{
    crypto::aws_lc_rs,
    pki_types::{pem::PemObject, ServerName},
    ClientConfig, RootCertStore,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}: not an http:// or https:// URL with a host")]
    Url(String),
    #[error("{0}: no answer within {1:?}")]
    Timeout(String, Duration),
    #[error("{0}: {1}")]
    Io(String, String),
    #[error("{url}: answered {status}{}", location.as_ref().map(|l| format!(" to {l} (redirects are not followed)")).unwrap_or_default())]
    Status {
        url: String,
        status: StatusCode,
        location: Option<String>,
    },
    #[error("{0}: larger than {1} bytes")]
    TooLarge(String, usize),
    #[error("TLS roots: {0}")]
    Roots(String),
}

/// A 200 or a 304.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub body: Bytes,
}

/// A client for one trust setting (a CA file, or the system's roots).
#[derive(Clone)]
pub struct Client {
    tls: TlsConnector,
    timeout: Duration,
    max_bytes: usize,
}

/// TLS trusting `ca`, or the system's roots (`/etc/ssl/certs` on Debian).
pub fn tls_config(ca: Option<&Path>) -> Result<ClientConfig, HttpError> {
    if let Some(ca) = ca {
        return super::tls::upstream_config(ca).map_err(|e| HttpError::Roots(e.to_string()));
    }
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or("none found".into(), |e| e.to_string());
        return Err(HttpError::Roots(format!(
            "no system root certificates: {why}"
        )));
    }
    with_roots(roots)
}

/// TLS trusting exactly the certificates of a PEM text handed over as bytes (one CA, or a
/// bundle such as Debian's, whose odd entries are skipped); `None` trusts nothing, which
/// leaves only http:// URLs working. Reads no file.
pub fn tls_config_pem(pem: Option<&[u8]>) -> Result<ClientConfig, HttpError> {
    let mut roots = RootCertStore::empty();
    if let Some(pem) = pem {
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| HttpError::Roots(e.to_string()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(HttpError::Roots("no usable CA certificate".into()));
        }
    }
    with_roots(roots)
}

fn with_roots(roots: RootCertStore) -> Result<ClientConfig, HttpError> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| HttpError::Roots(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl Client {
    pub fn new(
        ca: Option<&Path>,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Client, HttpError> {
        Ok(Client {
            tls: TlsConnector::from(Arc::new(tls_config(ca)?)),
            timeout,
            max_bytes,
        })
    }

    /// A client trusting the CA bytes `ca_pem` (see [`tls_config_pem`]).
    pub fn from_pem(
        ca_pem: Option<&[u8]>,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Client, HttpError> {
        Ok(Client {
            tls: TlsConnector::from(Arc::new(tls_config_pem(ca_pem)?)),
            timeout,
            max_bytes,
        })
    }

    /// GET `url` with `headers`; 200 and 304 are answers, anything else an error.
    pub async fn get(
        &self,
        url: &str,
        headers: &[(HeaderName, String)],
    ) -> Result<Fetched, HttpError> {
        tokio::time::timeout(self.timeout, self.exchange(url, headers))
            .await
            .map_err(|_| HttpError::Timeout(url.into(), self.timeout))?
    }

    async fn exchange(
        &self,
        url: &str,
        headers: &[(HeaderName, String)],
    ) -> Result<Fetched, HttpError> {
        let bad_url = || HttpError::Url(url.into());
        let uri: Uri = url.parse().map_err(|_| bad_url())?;
        let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
            return Err(bad_url());
        };
        let https = match scheme {
            "https" => true,
            "http" => false,
            _ => return Err(bad_url()),
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let io = |e: std::io::Error| HttpError::Io(url.into(), e.to_string());
        let bare = host.trim_matches(['[', ']']);
        let tcp = TcpStream::connect((bare, port)).await.map_err(io)?;
        let mut request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, uri.authority().map_or(host, |a| a.as_str()))
            .header(
                header::USER_AGENT,
                concat!("ewsgate/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::CONNECTION, "close");
        for (name, value) in headers {
            let value = HeaderValue::from_str(value)
                .map_err(|e| HttpError::Io(url.into(), e.to_string()))?;
            request = request.header(name, value);
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| HttpError::Io(url.into(), e.to_string()))?;
        let hyper = |e: hyper::Error| HttpError::Io(url.into(), e.to_string());
        // The connection task ends with this exchange, on a deadline too.
        let (response, _conn) = if https {
            let name = ServerName::try_from(bare.to_string()).map_err(|_| bad_url())?;
            let stream = self.tls.connect(name, tcp).await.map_err(io)?;
            send(TokioIo::new(stream), request).await.map_err(hyper)?
        } else {
            send(TokioIo::new(tcp), request).await.map_err(hyper)?
        };
        let status = response.status();
        let text = |name: header::HeaderName| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.chars().take(256).collect::<String>())
        };
        if status != StatusCode::OK && status != StatusCode::NOT_MODIFIED {
            return Err(HttpError::Status {
                url: url.into(),
                status,
                location: text(header::LOCATION),
            });
        }
        let etag = text(header::ETAG);
        let last_modified = text(header::LAST_MODIFIED);
        let max = self.max_bytes;
        let body = Limited::new(response.into_body(), max)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| match e.downcast::<http_body_util::LengthLimitError>() {
                Ok(_) => HttpError::TooLarge(url.into(), max),
                Err(e) => HttpError::Io(url.into(), e.to_string()),
            })?;
        Ok(Fetched {
            status,
            etag,
            last_modified,
            body,
        })
    }
}

/// Aborts the connection task when the exchange is over or abandoned.
struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn send<IO>(
    io: IO,
    request: Request<Empty<Bytes>>,
) -> Result<(http::Response<hyper::body::Incoming>, Abort), hyper::Error>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let task = Abort(tokio::spawn(async move {
        let _ = conn.await;
    }));
    Ok((sender.send_request(request).await?, task))
}
