//! Signing keys from Exchange's auth metadata documents. Only URLs on the configured exact
//! allow list are ever fetched (never the `amurl` a token names), with no redirects, a size
//! cap and a deadline. A failed fetch keeps the last good keys; an unknown `x5t` triggers a
//! refetch at most once per `refetch_min`.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use arc_swap::ArcSwap;
use base64::{engine::general_purpose::STANDARD, Engine as _};
use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::{identity::tokens::KeyRing, model::settings::FetchSettings};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}: not an http:// or https:// URL with a host")]
    Url(String),
    #[error("{0}: timed out")]
    Timeout(String),
    #[error("{0}: {1}")]
    Io(String, String),
    #[error("{0}: answered {1} (redirects are not followed)")]
    Status(String, StatusCode),
    #[error("{0}: larger than {1} bytes")]
    TooLarge(String, usize),
    #[error("{0}: not an auth metadata document: {1}")]
    Document(String, String),
}

#[derive(Deserialize)]
struct Document {
    keys: Vec<DocKey>,
}

#[derive(Deserialize)]
struct DocKey {
    usage: Option<String>,
    keyvalue: KeyValue,
}

#[derive(Deserialize)]
struct KeyValue {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: String,
}

/// The signing certificates (DER) a metadata document lists. Thumbprints are computed from
/// the certificates later; the document's own `x5t` strings are never trusted.
pub fn certificates(url: &str, json: &[u8]) -> Result<Vec<Vec<u8>>, FetchError> {
    let doc: Document = serde_json::from_slice(json)
        .map_err(|e| FetchError::Document(url.into(), e.to_string()))?;
    let mut out = Vec::new();
    for k in doc.keys {
        let signing = k.usage.as_deref().is_none_or(|u| u == "signing");
        let cert = k
            .keyvalue
            .kind
            .as_deref()
            .is_none_or(|t| t == "x509Certificate");
        if signing && cert {
            let der = STANDARD
                .decode(k.keyvalue.value.trim())
                .map_err(|e| FetchError::Document(url.into(), format!("key value: {e}")))?;
            out.push(der);
        }
    }
    if out.is_empty() {
        return Err(FetchError::Document(
            url.into(),
            "no signing certificate".into(),
        ));
    }
    Ok(out)
}

/// Fetched keys and when they were last asked for.
pub struct KeySource {
    pub settings: FetchSettings,
    pub ring: Arc<ArcSwap<KeyRing>>,
    last_attempt: Mutex<Option<Instant>>,
    tls: Option<TlsConnector>,
    /// Serialises fetches: a burst of unknown keys costs one.
    fetching: tokio::sync::Mutex<()>,
}

impl KeySource {
    pub fn new(settings: FetchSettings) -> anyhow::Result<KeySource> {
        let tls = match &settings.ca {
            Some(ca) => Some(TlsConnector::from(Arc::new(
                crate::net::tls::upstream_config(ca)?,
            ))),
            None => None,
        };
        Ok(KeySource {
            settings,
            ring: Arc::new(ArcSwap::from_pointee(KeyRing::default())),
            last_attempt: Mutex::new(None),
            tls,
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// Refetches for an unknown key, unless a fetch was tried within `refetch_min`.
    pub async fn refetch(&self) {
        let _one = self.fetching.lock().await;
        let recent = self
            .last_attempt
            .lock()
            .ok()
            .and_then(|l| *l)
            .is_some_and(|t| t.elapsed() < self.settings.refetch_min);
        if !recent {
            self.refresh().await;
        }
    }

    /// Fetches every URL; the ring is replaced only when at least one key came back, so a
    /// failure keeps the last good keys.
    pub async fn refresh(&self) {
        if let Ok(mut l) = self.last_attempt.lock() {
            *l = Some(Instant::now());
        }
        let mut ring = KeyRing::default();
        for url in &self.settings.urls {
            match self
                .fetch(url)
                .await
                .and_then(|body| certificates(url, &body))
            {
                Ok(certs) => {
                    for der in certs {
                        if let Err(e) = ring.add_der(&der) {
                            tracing::warn!(url, error = %e, "auth metadata: certificate skipped");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "auth metadata: keeping the last good keys"),
            }
        }
        if !ring.is_empty() {
            tracing::info!(keys = ring.len(), "auth metadata: signing keys loaded");
            self.ring.store(Arc::new(ring));
        }
    }

    async fn fetch(&self, url: &str) -> Result<Bytes, FetchError> {
        let deadline = self.settings.timeout;
        tokio::time::timeout(deadline, self.get(url))
            .await
            .map_err(|_| FetchError::Timeout(url.into()))?
    }

    async fn get(&self, url: &str) -> Result<Bytes, FetchError> {
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
        let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(io)?;
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
                .ok_or_else(|| FetchError::Url(url.into()))?;
            let name =
                ServerName::try_from(host.to_string()).map_err(|_| FetchError::Url(url.into()))?;
            let stream = tls.connect(name, tcp).await.map_err(io)?;
            send(TokioIo::new(stream), request).await.map_err(hyper)?
        } else {
            send(TokioIo::new(tcp), request).await.map_err(hyper)?
        };
        if response.status() != StatusCode::OK {
            return Err(FetchError::Status(url.into(), response.status()));
        }
        let max = self.settings.max_bytes;
        Limited::new(response.into_body(), max)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|_| FetchError::TooLarge(url.into(), max))
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

/// Keeps a source fresh until the policy that holds it is replaced.
pub fn keep_fresh(source: &Arc<KeySource>, runtime: &tokio::runtime::Handle) {
    let weak = Arc::downgrade(source);
    runtime.spawn(async move {
        loop {
            let Some(s) = weak.upgrade() else { return };
            s.refresh().await;
            let every = s.settings.refresh;
            drop(s);
            tokio::time::sleep(every).await;
        }
    });
}
