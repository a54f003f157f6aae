//! One client connection: its TLS stream, the bytes read but not yet used, an NTLM session
//! and the upstream connection bound to it. Requests are read one after another; each runs
//! through the phases in order, and the logging phase ends it.
//!
//! The connection's two clocks live here: the idle timeout while no request has begun, and
//! the head timeout from a head's first byte to its end (a slow head is `head_timeout`).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt},
    time::timeout,
};
use tokio_rustls::server::TlsStream;

use crate::proxy::{
    buffers,
    context::{ConnInfo, Ctx, Refusal},
    h1::{self, ReadError},
    phases::{body_filter, identity, logging, policy, request_filter, response_filter, upstream},
    respond,
    state::State,
    upstream as pool, Shared,
};
use crate::{identity::tokens::Verified, net::sock::Sock};

pub struct Conn {
    pub info: Arc<ConnInfo>,
    pub tls: TlsStream<Sock>,
    /// Bytes read from the client and not yet used.
    pub buf: BytesMut,
    /// The upstream connection bound to this client (NTLM, Negotiate, Kerberos), with the
    /// session Exchange holds on it.
    pub bound: Option<pool::Conn>,
    /// The last bearer token verified on this connection, under which policy: a client
    /// sends the same one on every request of its short life, and comparing it costs less
    /// than hashing it.
    pub last_token: Option<(u64, Box<str>, Verified)>,
}

/// Serves requests on a connection until either side is done.
pub async fn serve(shared: Arc<Shared>, state: Arc<State>, mut conn: Conn) {
    let limits = state.settings.limits.clone();
    loop {
        let raw = match next_head(&mut conn, &limits).await {
            Ok(Some(raw)) => raw,
            Ok(None) => return,
            Err(refusal) => {
                let mut ctx = Ctx::new(conn.info.clone());
                if refusal.status == 408 {
                    // A head that never ends gets no answer: the connection just closes.
                    ctx.refused(&refusal);
                } else {
                    respond::refusal(&mut conn, &mut ctx, &refusal, true).await;
                }
                logging::run(&shared, &ctx);
                return;
            }
        };
        // Each request runs on the policy current when it began.
        let state = shared.state.load_full();
        let keep = Box::pin(request(&shared, &state, &mut conn, raw)).await;
        if !keep {
            return;
        }
        release_idle(&mut conn.buf);
    }
}

/// The next request head: waits under the idle timeout for its first byte, then under the
/// head timeout for the rest. `None`: the client closed or went idle too long.
async fn next_head(
    conn: &mut Conn,
    limits: &crate::model::settings::Limits,
) -> Result<Option<Bytes>, Refusal> {
    if conn.buf.is_empty() {
        match timeout(
            limits.idle_timeout,
            first_bytes(&mut conn.tls, &mut conn.buf),
        )
        .await
        {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Ok(None),
        }
    }
    // The read that ended the wait brought the whole head: no timer to set.
    match h1::take_head(&mut conn.buf, 0, limits.header_bytes) {
        Ok(Some(head)) => return Ok(Some(head)),
        Ok(None) => {}
        Err(e) => return Err(Refusal::protocol(431, e.0)),
    }
    let read = h1::read_head(&mut conn.tls, &mut conn.buf, limits.header_bytes);
    match timeout(limits.head_timeout, read).await {
        Err(_) => Err(Refusal::protocol(408, "head_timeout")),
        Ok(Ok(head)) => Ok(head),
        Ok(Err(ReadError::Head(e))) => Err(Refusal::protocol(431, e.0)),
        Ok(Err(ReadError::Truncated)) | Ok(Err(ReadError::Io(_))) => Ok(None),
    }
}

/// A connection waits for its next request with no buffer of its own: the one it read this
/// request into serves the next read, whichever connection's, while it is still in the
/// CPU's cache (see `buffers`). A buffer still holding a pipelined request stays.
fn release_idle(buf: &mut BytesMut) {
    if buf.is_empty() {
        buffers::give(std::mem::take(buf));
    }
}

/// Waits for a request's first bytes in the TLS layer's own buffer, then copies them into a
/// buffer taken only now; 0 at the end of the stream.
async fn first_bytes(
    tls: &mut (impl AsyncBufRead + Unpin),
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    let data = tls.fill_buf().await?;
    let n = data.len();
    if n == 0 {
        return Ok(0);
    }
    buffers::reserve(buf, n.max(h1::READ_CHUNK));
    buf.extend_from_slice(data);
    tls.consume(n);
    Ok(n)
}

/// One request through the phases; says whether the connection carries another.
async fn request(shared: &Shared, state: &Arc<State>, conn: &mut Conn, raw: Bytes) -> bool {
    let mut ctx = Ctx::new(conn.info.clone());
    let keep = match exchange(shared, state, conn, raw, &mut ctx).await {
        Ok(keep) => keep,
        Err((refusal, close)) => respond::refusal(conn, &mut ctx, &refusal, close).await,
    };
    logging::run(shared, &ctx);
    keep
}

/// The phases in order. A refusal says whether the client asked to close.
async fn exchange(
    shared: &Shared,
    state: &State,
    conn: &mut Conn,
    raw: Bytes,
    ctx: &mut Ctx,
) -> Result<bool, (Refusal, bool)> {
    let req = request_filter::run(state, raw, ctx).map_err(|r| (r, true))?;
    let close = req.close;
    let fail = |r: Refusal| (r, close);
    // The other sinks too: a journald or syslog sink nine tenths full refuses, like the file.
    if shared.audit.backlog() > state.settings.limits.audit_backlog
        || shared.ops.lag().is_some_and(|l| l.fill > 0.9)
    {
        return Err(fail(Refusal::service(503, "audit_backlog")));
    }
    identity::run(shared, state, conn, &req, ctx)
        .await
        .map_err(fail)?;
    let plan = policy::run(state, &req, ctx).map_err(fail)?;
    let (body, judged) = body_filter::run(shared, state, conn, &req, &plan, ctx)
        .await
        .map_err(fail)?;
    let answer = upstream::run(state, conn, &req, body, ctx)
        .await
        .map_err(fail)?;
    response_filter::run(shared, state, conn, &req, answer, &judged, ctx)
        .await
        .map_err(fail)
}

#[cfg(test)]
mod tests {
    use std::{future::Future, pin::pin, task::Poll};

    use tokio::io::{AsyncWriteExt, BufReader};

    use super::*;

    /// The buffer a request was read into, emptied by its end, and where its allocation
    /// starts.
    fn after_a_request() -> (BytesMut, *const u8) {
        let mut buf = BytesMut::new();
        buffers::reserve(&mut buf, h1::READ_CHUNK);
        let start = buf.as_ptr();
        buf.extend_from_slice(b"POST /EWS/Exchange.asmx HTTP/1.1\r\n\r\n");
        drop(buf.split());
        (buf, start)
    }

    #[tokio::test]
    async fn a_connection_waiting_for_its_next_request_holds_no_buffer() {
        let (mut buf, _) = after_a_request();
        release_idle(&mut buf);
        assert_eq!(
            buf.capacity(),
            0,
            "an idle connection keeps its read buffer"
        );
        let (mut client, server) = tokio::io::duplex(1024);
        let mut tls = BufReader::new(server);
        // The wait itself, before any byte arrives, takes no buffer.
        {
            let mut wait = pin!(first_bytes(&mut tls, &mut buf));
            std::future::poll_fn(|cx| {
                assert!(wait.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
        }
        assert_eq!(buf.capacity(), 0, "waiting took a buffer");
        // The first bytes take the buffer given back last, and all the bytes that came.
        let given_back = {
            let (mut other, start) = after_a_request();
            release_idle(&mut other);
            start
        };
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let n = first_bytes(&mut tls, &mut buf).await.unwrap();
        assert_eq!(n, 16);
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");
        assert_eq!(buf.as_ptr(), given_back, "not the buffer given back last");
        assert!(buf.capacity() >= h1::READ_CHUNK);
        // A client that closes: no bytes, no buffer.
        drop(client);
        let mut closed = BytesMut::new();
        assert_eq!(first_bytes(&mut tls, &mut closed).await.unwrap(), 0);
        assert_eq!(closed.capacity(), 0);
    }

    #[test]
    fn a_pipelined_request_keeps_its_buffer() {
        let (mut buf, _) = after_a_request();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let at = buf.as_ptr();
        release_idle(&mut buf);
        assert_eq!(buf.as_ptr(), at);
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");
    }
}
