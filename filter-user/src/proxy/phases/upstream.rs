//! Upstream: the request goes to Exchange on a pooled connection, or, for NTLM and
//! Negotiate (Kerberos included), on the connection bound to this client for its life.
//! Hop-by-hop headers and whatever the client said about forwarding are dropped; ewsgate
//! sets `X-Forwarded-For` and `X-Forwarded-Proto`. A request whose body ewsgate holds whole
//! is sent again once on a fresh connection when a pooled one turns out to have been closed
//! under it.

use std::{cell::Cell, io::IoSlice, time::Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::{
    proxy::{
        context::{Ctx, Refusal},
        h1::{self, put_chunk_size, put_header, put_number, Framing, ResponseHead},
        phases::{body_filter::BodyOut, request_filter::Req},
        session::Conn,
        state::State,
        upstream::{self, UpstreamError},
    },
    soap::Tail,
};

/// Headers about the client are ewsgate's to set; whatever the client sent is dropped.
const FORWARDING: [&str; 9] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-real-ip",
    "x-client-ip",
    // IIS URL Rewrite honours these over the request line: a second, unchecked path.
    "x-original-url",
    "x-rewrite-url",
];

/// The largest head buffer kept for the next request.
const SPARE_HEAD_MAX: usize = 64 * 1024;

thread_local! {
    /// The buffer the last request head on this thread was written into, emptied. A head
    /// with a bearer token is over a kilobyte, past the allocator's per-thread cache, so a
    /// fresh buffer per request cost about a thousand instructions to allocate and free.
    static SPARE_HEAD: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Exchange's answer, with the connection it came on.
pub struct Answer {
    pub head: ResponseHead,
    pub framing: Framing,
    pub up: upstream::Conn,
}

pub async fn run(
    state: &State,
    conn: &mut Conn,
    req: &Req,
    body: BodyOut,
    ctx: &mut Ctx,
) -> Result<Answer, Refusal> {
    let started = Instant::now();
    let mut head = SPARE_HEAD.take();
    request_head(&mut head, req, ctx, &body);
    let bound = connection_bound(conn, ctx);
    let result = match body {
        BodyOut::Whole(bytes) => send_whole(state, conn, bound, &head, &bytes, ctx).await,
        BodyOut::Stream { prefix, body, tail } => {
            let mut up = take(state, conn, bound).await?;
            let streamed = Stream {
                prefix,
                body,
                tail,
                chunked: req.framing == Framing::Chunked,
            };
            let sent = stream(&mut up, conn, &head, streamed, ctx).await;
            match sent {
                Ok(()) => answer(state, up, ctx).await.map_err(|(_, r)| r),
                Err(r) => Err(r),
            }
        }
    };
    ctx.upstream_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
    if head.capacity() <= SPARE_HEAD_MAX {
        head.clear();
        SPARE_HEAD.set(head);
    }
    result
}

/// NTLM and Negotiate (NTLM or Kerberos inside) authenticate the TCP connection: such a
/// client keeps one upstream connection of its own, never pooled, for as long as it stays
/// connected.
fn connection_bound(conn: &Conn, ctx: &Ctx) -> bool {
    conn.bound.is_some() || ctx.auth.binds_connection()
}

async fn take(state: &State, conn: &mut Conn, bound: bool) -> Result<upstream::Conn, Refusal> {
    if let Some(up) = conn.bound.take() {
        return Ok(up);
    }
    let pooled = if bound { None } else { state.upstream.pooled() };
    let mut up = match pooled {
        Some(up) => up,
        None => connect(state).await?,
    };
    up.bound = bound;
    Ok(up)
}

/// A new connection to Exchange. Its future (TCP, then TLS) is kilobytes, and every
/// request's future would carry that room though most take a pooled connection: boxed, it
/// is allocated only when a connection is made.
async fn connect(state: &State) -> Result<upstream::Conn, Refusal> {
    Box::pin(state.upstream.connect())
        .await
        .map_err(unreachable)
}

fn unreachable(e: UpstreamError) -> Refusal {
    tracing::warn!(error = %e, "upstream");
    match e {
        UpstreamError::Timeout(_) => Refusal::service(504, "upstream_timeout"),
        _ => Refusal::service(502, "upstream_unreachable"),
    }
}

/// A whole body: sent, and sent again on a fresh connection if a pooled one had closed.
async fn send_whole(
    state: &State,
    conn: &mut Conn,
    bound: bool,
    head: &[u8],
    body: &[u8],
    ctx: &mut Ctx,
) -> Result<Answer, Refusal> {
    let mut up = take(state, conn, bound).await?;
    for attempt in 0..2 {
        let written = up
            .write_all_vectored(&mut [IoSlice::new(head), IoSlice::new(body)])
            .await
            .and(up.io.flush().await);
        let stale = !up.fresh && attempt == 0;
        let result = match written {
            Ok(()) => answer(state, up, ctx).await,
            Err(_) => Err((true, Refusal::service(502, "upstream_error"))),
        };
        match result {
            Err((untouched, _)) if stale && untouched => {
                up = connect(state).await?;
                up.bound = bound;
            }
            other => return other.map_err(|(_, r)| r),
        }
    }
    Err(Refusal::service(502, "upstream_error"))
}

/// Reads Exchange's response head, skipping interim (1xx) responses. The error says
/// whether Exchange had sent nothing at all (so a whole request may be sent again).
async fn answer(
    state: &State,
    mut up: upstream::Conn,
    ctx: &Ctx,
) -> Result<Answer, (bool, Refusal)> {
    let limits = &state.settings.limits;
    let head_request = ctx.method == "HEAD";
    loop {
        let read = tokio::time::timeout(
            limits.idle_timeout,
            h1::read_head(&mut up.io, &mut up.buf, limits.header_bytes),
        )
        .await;
        let raw = match read {
            Err(_) => return Err((false, Refusal::service(504, "upstream_timeout"))),
            Ok(Ok(Some(raw))) => raw,
            Ok(Ok(None)) => return Err((true, Refusal::service(502, "upstream_closed"))),
            Ok(Err(_)) => return Err((false, Refusal::service(502, "upstream_error"))),
        };
        let head = ResponseHead::parse(raw, limits.header_count)
            .map_err(|e| (false, Refusal::service(502, e.0)))?;
        if head.status == 101 {
            return Err((false, Refusal::service(502, "upstream_switched_protocols")));
        }
        if (100..200).contains(&head.status) {
            continue;
        }
        let framing = head
            .framing(head_request)
            .map_err(|e| (false, Refusal::service(502, e.0)))?;
        return Ok(Answer { head, framing, up });
    }
}

/// A body streamed from the client as it arrives.
struct Stream {
    prefix: Bytes,
    body: crate::proxy::body::BodyIn,
    tail: Option<Tail>,
    chunked: bool,
}

async fn stream(
    up: &mut upstream::Conn,
    conn: &mut Conn,
    head: &[u8],
    mut s: Stream,
    ctx: &mut Ctx,
) -> Result<(), Refusal> {
    let io_err = |_| Refusal::service(502, "upstream_error");
    let mut frame = Vec::with_capacity(32);
    let mut piece = s.prefix.clone();
    up.io.write_all(head).await.map_err(io_err)?;
    loop {
        if !piece.is_empty() {
            frame.clear();
            if s.chunked {
                put_chunk_size(&mut frame, piece.len());
            }
            let end: &[u8] = if s.chunked { b"\r\n" } else { b"" };
            up.write_all_vectored(&mut [
                IoSlice::new(&frame),
                IoSlice::new(&piece),
                IoSlice::new(end),
            ])
            .await
            .map_err(io_err)?;
        }
        let next = s.body.next(conn).await;
        ctx.bytes_in = s.body.bytes;
        piece = match next? {
            Some(data) => data,
            None => break,
        };
        if let Some(tail) = &mut s.tail {
            tail.feed(&piece)
                .map_err(|_| Refusal::protocol(400, "soap_bulk_content"))?;
        }
    }
    if let Some(tail) = &s.tail {
        tail.finish()
            .map_err(|_| Refusal::protocol(400, "soap_bulk_content"))?;
    }
    if s.chunked {
        up.io.write_all(b"0\r\n\r\n").await.map_err(io_err)?;
    }
    up.io.flush().await.map_err(io_err)
}

/// Writes the request head as Exchange receives it into `out` (empty).
fn request_head(out: &mut Vec<u8>, req: &Req, ctx: &Ctx, body: &BodyOut) {
    let fields = &req.head.fields;
    out.reserve(fields.head_bytes() + 128);
    out.extend_from_slice(ctx.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(ctx.forwarded.as_deref().unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let named = fields.connection_named();
    for (name, value) in fields.iter() {
        if h1::is_hop_by_hop(name, &named)
            || FORWARDING.iter().any(|f| name.eq_ignore_ascii_case(f.as_bytes()))
            || name.eq_ignore_ascii_case(b"proxy-authorization")
            || name.eq_ignore_ascii_case(b"expect")
            // A response ewsgate must read has to arrive in a form it can read.
            || (ctx.inspect.is_some() && name.eq_ignore_ascii_case(b"accept-encoding"))
        {
            continue;
        }
        put_header(out, name, value);
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    h1::put_ip(out, ctx.conn.peer.ip());
    out.extend_from_slice(b"\r\nX-Forwarded-Proto: https\r\n");
    match body {
        BodyOut::Whole(b) if b.is_empty() && req.framing == Framing::Empty => {}
        BodyOut::Whole(b) => {
            out.extend_from_slice(b"Content-Length: ");
            put_number(out, b.len() as u64);
            out.extend_from_slice(b"\r\n");
        }
        BodyOut::Stream { .. } => match req.framing {
            Framing::Length(n) => {
                out.extend_from_slice(b"Content-Length: ");
                put_number(out, n);
                out.extend_from_slice(b"\r\n");
            }
            _ => put_header(out, b"Transfer-Encoding", b"chunked"),
        },
    }
    out.extend_from_slice(b"\r\n");
}
