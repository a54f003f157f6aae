//! The connection to Exchange. Each client connection gets its own upstream connection,
//! opened on its first forwarded request and closed with it: NTLM and Negotiate
//! authenticate the TCP connection, so a shared or pooled upstream socket could let one
//! user's authentication serve another.

use std::{sync::Arc, time::Duration};

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::body::BoxError;
use crate::model::settings::Upstream;

/// A request body as it goes upstream: streamed from the client, or read and judged first.
pub type UpstreamBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;
pub type Sender = SendRequest<UpstreamBody>;

pub struct Connector {
    pub settings: Upstream,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("connecting to {0}: timed out")]
    Timeout(String),
    #[error("TLS to {0}: {1}")]
    Tls(String, std::io::Error),
    #[error("HTTP to {0}: {1}")]
    Http(String, hyper::Error),
}

impl Connector {
    pub fn new(settings: &Upstream, timeout: Duration) -> anyhow::Result<Connector> {
        let tls = match (&settings.ca, settings.tls) {
            (Some(ca), true) => {
                let config = crate::net::tls::upstream_config(ca)?;
                let name = ServerName::try_from(settings.server_name.clone())
                    .map_err(|e| anyhow::anyhow!("upstream server name: {e}"))?;
                Some((TlsConnector::from(Arc::new(config)), name))
            }
            _ => None,
        };
        Ok(Connector {
            settings: settings.clone(),
            tls,
            timeout,
        })
    }

    pub async fn connect(&self, conn_id: u64) -> Result<Sender, UpstreamError> {
        let to = &self.settings.authority;
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect(to))
            .await
            .map_err(|_| UpstreamError::Timeout(to.clone()))?
            .map_err(|e| UpstreamError::Connect(to.clone(), e))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some((connector, name)) => {
                let tls = tokio::time::timeout(self.timeout, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| UpstreamError::Timeout(to.clone()))?
                    .map_err(|e| UpstreamError::Tls(to.clone(), e))?;
                handshake(TokioIo::new(tls), to, conn_id).await
            }
            None => handshake(TokioIo::new(tcp), to, conn_id).await,
        }
    }
}

async fn handshake<IO>(io: IO, to: &str, conn_id: u64) -> Result<Sender, UpstreamError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| UpstreamError::Http(to.to_string(), e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(connection = conn_id, error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}
