//! Connections to Exchange. Requests that authenticate themselves (Basic, Bearer, none)
//! share a pool of kept-alive connections. NTLM and Negotiate authenticate the TCP
//! connection itself, so such a client gets an upstream connection of its own for its whole
//! life, and a connection that ever carried such a session never returns to the pool:
//! otherwise one user's authentication could serve another's requests.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use rustix::net::RecvFlags;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{client::TlsStream, TlsConnector};

use crate::{
    config::Bundle,
    model::settings::ProxySettings,
    net::{sock::Sock, tls::client_config},
    proxy::{buffers, context::Session},
};

/// Idle pooled connections kept at most.
const MAX_IDLE: usize = 256;
/// A pooled connection idle longer than this is closed rather than reused: Exchange (IIS)
/// closes idle connections after two minutes, and a request must not race that.
const IDLE_FOR: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {0}: {1}")]
    Connect(String, io::Error),
    #[error("connecting to {0}: timed out")]
    Timeout(String),
    #[error("TLS to {0}: {1}")]
    Tls(String, io::Error),
}

/// A connection to Exchange, plain or TLS.
pub enum Io {
    Plain(Sock),
    Tls(Box<TlsStream<Sock>>),
}

impl Io {
    fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(t) => t.tcp(),
            Io::Tls(t) => t.get_ref().0.tcp(),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(t) => Pin::new(t).poll_read(cx, buf),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(t) => Pin::new(t).poll_write(cx, b),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(t) => Pin::new(t).poll_flush(cx),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(t) => Pin::new(t).poll_shutdown(cx),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One connection to Exchange and the bytes read from it but not yet used.
pub struct Conn {
    pub io: Io,
    pub buf: BytesMut,
    /// Opened for the request at hand (not taken from the pool): a failure on it is not a
    /// stale connection's.
    pub fresh: bool,
    /// Carried an NTLM, Negotiate or Kerberos leg: never pooled.
    pub bound: bool,
    /// What Exchange authenticated on this connection (NTLM, Negotiate, Kerberos). It is
    /// kept here rather than on the client's connection because it lasts exactly as long as
    /// this connection: when Exchange closes it, the session is gone with it.
    pub session: Option<Session>,
    idle_since: Instant,
}

impl Conn {
    /// Whether the peer is still there and has sent nothing unasked. A pooled connection
    /// with bytes waiting (a close, a stray response) is not reused.
    ///
    /// The runtime's record of the socket answers first, without a system call: it marks
    /// the socket readable when the kernel reports bytes or a close, and clears the mark
    /// when a read leaves the socket empty, as the last response's did. Only a socket
    /// marked readable is asked, with a non-blocking peek. A close that arrived since the
    /// runtime last polled the kernel is missed, as the peek misses one in flight; a
    /// request whose body is held whole is then sent again on a fresh connection.
    fn alive(&self) -> bool {
        if !self.buf.is_empty() || self.idle_since.elapsed() > IDLE_FOR {
            return false;
        }
        let tcp = self.io.tcp();
        let mut cx = Context::from_waker(Waker::noop());
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                let peek = || {
                    rustix::net::recv(tcp, &mut probe, RecvFlags::PEEK | RecvFlags::DONTWAIT)
                        .map_err(io::Error::from)
                };
                // A peek that finds nothing clears the mark, so the next check is free.
                matches!(tcp.try_io(Interest::READABLE, peek), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Writes all of `bufs`, in as few writes as the stream takes.
    pub async fn write_all_vectored(&mut self, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        write_all_vectored(&mut self.io, bufs).await
    }
}

/// Writes every slice whole.
pub async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Where Exchange is, and the connections kept open to it.
pub struct Upstream {
    pub authority: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    idle: Mutex<Vec<Conn>>,
}

impl Upstream {
    pub fn new(settings: &ProxySettings, bundle: &Bundle) -> anyhow::Result<Upstream> {
        let u = &settings.upstream;
        let tls = match (&u.ca, u.tls) {
            (Some(ca), true) => {
                let config = client_config(ca, bundle.file(ca)?)?;
                let name = ServerName::try_from(u.server_name.clone())
                    .map_err(|e| anyhow::anyhow!("upstream server name: {e}"))?;
                Some((TlsConnector::from(Arc::new(config)), name))
            }
            _ => None,
        };
        Ok(Upstream {
            authority: u.authority.clone(),
            tls,
            connect_timeout: settings.limits.handshake_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// A kept-alive connection from the pool, if one is still good.
    pub fn pooled(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(mut c) = idle.pop() {
            if c.alive() {
                c.fresh = false;
                return Some(c);
            }
        }
        None
    }

    /// Returns a connection whose last response was read whole and which Exchange keeps
    /// open. Connections that carried a connection-bound session are closed instead.
    pub fn give_back(&self, mut c: Conn) {
        if c.bound || !c.buf.is_empty() {
            return;
        }
        c.idle_since = Instant::now();
        // Its emptied buffer serves the next read, whichever connection's (see `buffers`).
        buffers::give(std::mem::take(&mut c.buf));
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE {
                idle.push(c);
            }
        }
    }

    pub async fn connect(&self) -> Result<Conn, UpstreamError> {
        let to = &self.authority;
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(to))
            .await
            .map_err(|_| UpstreamError::Timeout(to.clone()))?
            .map_err(|e| UpstreamError::Connect(to.clone(), e))?;
        let _ = tcp.set_nodelay(true);
        let io = match &self.tls {
            Some((connector, name)) => {
                let tls = tokio::time::timeout(
                    self.connect_timeout,
                    connector.connect(name.clone(), Sock::new(tcp)),
                )
                .await
                .map_err(|_| UpstreamError::Timeout(to.clone()))?
                .map_err(|e| UpstreamError::Tls(to.clone(), e))?;
                Io::Tls(Box::new(tls))
            }
            None => Io::Plain(Sock::new(tcp)),
        };
        Ok(Conn {
            io,
            buf: BytesMut::new(),
            fresh: true,
            bound: false,
            session: None,
            idle_since: Instant::now(),
        })
    }

    /// Closes every pooled connection (a new policy brings its own pool).
    pub async fn close_idle(&self) {
        let idle = match self.idle.lock() {
            Ok(mut i) => std::mem::take(&mut *i),
            Err(_) => return,
        };
        for mut c in idle {
            let _ = c.io.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::{Conn, Io};
    use crate::net::sock::Sock;

    /// A kept-alive connection to a stand-in for Exchange on loopback, and Exchange's end.
    async fn pair() -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (theirs, _) = listener.accept().await.unwrap();
        let conn = Conn {
            io: Io::Plain(Sock::new(ours)),
            buf: Default::default(),
            fresh: false,
            bound: false,
            session: None,
            idle_since: std::time::Instant::now(),
        };
        (conn, theirs)
    }

    /// Exchange answers; the answer is read as a response is, into a buffer larger than it.
    async fn answered(conn: &mut Conn, exchange: &mut TcpStream) {
        exchange
            .write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = conn.io.read(&mut buf).await.unwrap();
        assert_eq!(n, 19);
    }

    /// Lets the runtime poll the kernel for what happened on its sockets meanwhile.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_quiet_connection_after_its_answer_is_reused() {
        runtime().block_on(async {
            let (mut conn, mut exchange) = pair().await;
            answered(&mut conn, &mut exchange).await;
            settle().await;
            assert!(conn.alive());
            assert!(conn.alive(), "asking twice changes nothing");
        });
    }

    #[test]
    fn a_connection_exchange_closed_while_idle_is_not_reused() {
        runtime().block_on(async {
            let (mut conn, mut exchange) = pair().await;
            answered(&mut conn, &mut exchange).await;
            drop(exchange);
            settle().await;
            assert!(!conn.alive());
        });
    }

    #[test]
    fn a_connection_with_bytes_nobody_asked_for_is_not_reused() {
        runtime().block_on(async {
            let (mut conn, mut exchange) = pair().await;
            answered(&mut conn, &mut exchange).await;
            // A stray second response would be taken for the next request's answer.
            exchange
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            settle().await;
            assert!(!conn.alive());
        });
    }

    #[test]
    fn a_read_that_filled_its_buffer_is_checked_with_the_kernel() {
        // A read that fills its buffer leaves the socket marked readable, whatever is left:
        // the check asks the kernel, finds nothing, and reuses the connection.
        runtime().block_on(async {
            let (mut conn, mut exchange) = pair().await;
            exchange
                .write_all(b"HTTP/1.1 200 OK\r\n\r\n")
                .await
                .unwrap();
            settle().await;
            let mut exact = [0u8; 19];
            conn.io.read_exact(&mut exact).await.unwrap();
            assert!(conn.alive());
            exchange.write_all(b"x").await.unwrap();
            settle().await;
            assert!(!conn.alive(), "a byte after the check is still seen");
        });
    }

    #[test]
    fn a_connection_idle_too_long_or_with_bytes_kept_is_not_reused() {
        runtime().block_on(async {
            let (mut conn, mut exchange) = pair().await;
            answered(&mut conn, &mut exchange).await;
            conn.buf.extend_from_slice(b"H");
            assert!(!conn.alive());
            conn.buf.clear();
            conn.idle_since = std::time::Instant::now() - super::IDLE_FOR * 2;
            assert!(!conn.alive());
        });
    }
}
