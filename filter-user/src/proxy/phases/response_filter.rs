//! Response filter: Exchange's answer on its way to the client. An answer the rule must see
//! (its items' types, a callback token's scope) is read whole under a global budget, judged
//! message by message, learnt from, and rewritten; every other answer streams through,
//! followed by its framing. A 401 to credentials is the client's credential failure.

use std::{io::IoSlice, time::Duration};

use bytes::{Bytes, BytesMut};
use tokio::{io::AsyncWriteExt, sync::SemaphorePermit};

use crate::{
    identity::auth::{Credential, NtlmStage},
    model::{outcome::Decision, outcome::FailureClass},
    policy::content,
    proxy::{
        context::{Ctx, Refusal},
        h1::{self, fill, put_chunk_size, put_header, put_number, BodyDecoder, Framing},
        phases::{body_filter::Judged, request_filter::Req, upstream::Answer},
        session::Conn,
        state::State,
        upstream::write_all_vectored,
        Shared,
    },
    soap,
};

/// The budget is counted in these units.
const BUDGET_UNIT: usize = 1024;
/// How long a response waits for inspection budget before the client gets a 503.
const BUDGET_WAIT: Duration = Duration::from_secs(5);

/// Sends Exchange's answer to the client; says whether the client connection goes on.
pub async fn run(
    shared: &Shared,
    state: &State,
    conn: &mut Conn,
    req: &Req,
    mut answer: Answer,
    judged: &Judged,
    ctx: &mut Ctx,
) -> Result<bool, Refusal> {
    let status = answer.head.status;
    ctx.upstream_status = Some(status);
    ctx.status = status;
    if ctx.decision != Decision::WouldDeny {
        ctx.decision = Decision::Allow;
    }
    ctx.reason = "forwarded".into();
    if status == 401 && credentials_refused(req) {
        ctx.failure = Some(FailureClass::Credential);
    }
    if let Some(s) = ctx.pending_session.take() {
        if status != 401 {
            answer.up.session = Some(s);
        }
    }
    let inspect = ctx.inspect.is_some() && status != 401 && answer.framing != Framing::Empty;
    if inspect {
        inspected(shared, state, conn, req, answer, judged, ctx).await
    } else {
        streamed(state, conn, req, answer, ctx).await
    }
}

/// Exchange refused credentials the client presented (not an NTLM challenge to a Type 1).
fn credentials_refused(req: &Req) -> bool {
    match &req.credential {
        Credential::Basic { .. } | Credential::Bearer { .. } | Credential::Kerberos => true,
        Credential::Ntlm { stage, .. } => matches!(stage, NtlmStage::Authenticate { .. }),
        Credential::None | Credential::Invalid(_) => false,
    }
}

/// Whether the client connection can carry another request after this response.
fn client_keeps(req: &Req, framing: Framing) -> bool {
    !(req.close || (framing == Framing::Close && req.head.minor == 0))
}

/// The response head as the client receives it.
fn response_head(answer: &Answer, out_framing: OutFraming, keep: bool) -> Vec<u8> {
    let head = &answer.head;
    let fields = &head.fields;
    let mut out = Vec::with_capacity(fields.head_bytes() + 64);
    out.extend_from_slice(b"HTTP/1.1 ");
    put_number(&mut out, u64::from(head.status));
    out.push(b' ');
    out.extend_from_slice(head.reason().as_bytes());
    out.extend_from_slice(b"\r\n");
    let named = fields.connection_named();
    for (name, value) in fields.iter() {
        if !h1::is_hop_by_hop(name, &named) {
            put_header(&mut out, name, value);
        }
    }
    match out_framing {
        OutFraming::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            put_number(&mut out, n);
            out.extend_from_slice(b"\r\n");
        }
        OutFraming::Chunked => put_header(&mut out, b"Transfer-Encoding", b"chunked"),
        // A HEAD or 304 answer describes a body it does not carry: its length stands.
        OutFraming::None => {
            if let Some(len) = fields.get("content-length") {
                put_header(&mut out, b"Content-Length", len);
            }
        }
        OutFraming::Close => {}
    }
    if !keep {
        put_header(&mut out, b"Connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutFraming {
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, an answer of unknown length).
    Close,
}

async fn streamed(
    state: &State,
    conn: &mut Conn,
    req: &Req,
    mut answer: Answer,
    ctx: &mut Ctx,
) -> Result<bool, Refusal> {
    let keep = client_keeps(req, answer.framing);
    let out_framing = match answer.framing {
        Framing::Empty => OutFraming::None,
        Framing::Length(n) => OutFraming::Length(n),
        Framing::Chunked | Framing::Close if req.head.minor == 1 => OutFraming::Chunked,
        Framing::Chunked | Framing::Close => OutFraming::Close,
    };
    // The head goes out with the first piece of the body: one write, one TLS record, for
    // the common small answer.
    let mut head = Some(response_head(&answer, out_framing, keep));
    let client_err = |_| Refusal::service(499, "client_gone");
    let mut decoder = BodyDecoder::new(answer.framing);
    let idle = state.settings.limits.idle_timeout;
    let mut frame = Vec::with_capacity(16);
    loop {
        let piece = match decoder.decode(&mut answer.up.buf) {
            Ok(Some(p)) => p,
            Ok(None) if decoder.is_done() => break,
            Ok(None) => {
                let read = tokio::time::timeout(idle, fill(&mut answer.up.io, &mut answer.up.buf));
                match read.await {
                    Ok(Ok(0)) if decoder.finish_at_eof().is_ok() => break,
                    Ok(Ok(n)) if n > 0 => continue,
                    _ => return cut_short(ctx),
                }
            }
            Err(_) => return cut_short(ctx),
        };
        ctx.bytes_out += piece.len() as u64;
        frame.clear();
        let chunked = out_framing == OutFraming::Chunked;
        if chunked {
            put_chunk_size(&mut frame, piece.len());
        }
        let end: &[u8] = if chunked { b"\r\n" } else { b"" };
        let first = head.take().unwrap_or_default();
        let mut bufs = [
            IoSlice::new(&first),
            IoSlice::new(&frame),
            IoSlice::new(&piece),
            IoSlice::new(end),
        ];
        write_all_vectored(&mut conn.tls, &mut bufs)
            .await
            .map_err(client_err)?;
    }
    let last: &[u8] = match out_framing {
        OutFraming::Chunked => b"0\r\n\r\n",
        _ => b"",
    };
    let first = head.take().unwrap_or_default();
    if !first.is_empty() || !last.is_empty() {
        let mut bufs = [IoSlice::new(&first), IoSlice::new(last)];
        write_all_vectored(&mut conn.tls, &mut bufs)
            .await
            .map_err(client_err)?;
    }
    conn.tls.flush().await.map_err(client_err)?;
    release(state, conn, answer);
    Ok(keep && out_framing != OutFraming::Close)
}

/// Exchange stopped mid-answer: the client's response is cut at the same point, and
/// neither connection can go on.
fn cut_short(ctx: &mut Ctx) -> Result<bool, Refusal> {
    ctx.reason = "response_cut_short".into();
    Ok(false)
}

/// The upstream connection goes back to the pool, or stays with an NTLM, Negotiate or
/// Kerberos client, when its answer was read whole and Exchange keeps it open.
fn release(state: &State, conn: &mut Conn, answer: Answer) {
    if !answer.head.keeps_alive() || answer.framing == Framing::Close {
        return;
    }
    let up = answer.up;
    if up.bound {
        conn.bound = Some(up);
    } else {
        state.upstream.give_back(up);
    }
}

async fn inspected(
    shared: &Shared,
    state: &State,
    conn: &mut Conn,
    req: &Req,
    mut answer: Answer,
    judged: &Judged,
    ctx: &mut Ctx,
) -> Result<bool, Refusal> {
    if answer.head.fields.get("content-encoding").is_some() {
        return Err(Refusal::service(502, "response_encoded"));
    }
    let (bytes, _permits) = read_whole(shared, state, &mut answer).await?;
    let rewritten = judge(shared, state, &bytes, judged, ctx)?;
    let out = rewritten.as_deref().unwrap_or(&bytes);
    let keep = client_keeps(req, Framing::Length(0));
    let head = response_head(&answer, OutFraming::Length(out.len() as u64), keep);
    ctx.bytes_out = out.len() as u64;
    let mut bufs = [IoSlice::new(&head), IoSlice::new(out)];
    write_all_vectored(&mut conn.tls, &mut bufs)
        .await
        .map_err(|_| Refusal::service(499, "client_gone"))?;
    conn.tls
        .flush()
        .await
        .map_err(|_| Refusal::service(499, "client_gone"))?;
    release(state, conn, answer);
    Ok(keep)
}

/// Reads the answer whole, within `response_bytes` and the global inspection budget.
async fn read_whole<'a>(
    shared: &'a Shared,
    state: &State,
    answer: &mut Answer,
) -> Result<(Bytes, Vec<SemaphorePermit<'a>>), Refusal> {
    let max = state.content.response_bytes;
    let idle = state.settings.limits.idle_timeout;
    let mut decoder = BodyDecoder::new(answer.framing);
    // An answer that arrived in one piece (the usual small one) is used where it lies;
    // only a second piece makes a copy.
    let mut first: Option<Bytes> = None;
    let mut body = Vec::new();
    let mut len = 0usize;
    let mut permits = Vec::new();
    let mut held = 0usize;
    loop {
        match decoder.decode(&mut answer.up.buf) {
            Ok(Some(piece)) => {
                if len + piece.len() > max {
                    return Err(Refusal::service(502, "response_too_large_to_inspect"));
                }
                len += piece.len();
                let need = len.div_ceil(BUDGET_UNIT);
                if need > held {
                    permits.push(budget(shared, need - held).await?);
                    held = need;
                }
                if first.is_none() && body.is_empty() {
                    first = Some(piece);
                } else {
                    if let Some(f) = first.take() {
                        body.extend_from_slice(&f);
                    }
                    body.extend_from_slice(&piece);
                }
            }
            Ok(None) if decoder.is_done() => break,
            Ok(None) => {
                let read = tokio::time::timeout(idle, fill(&mut answer.up.io, &mut answer.up.buf));
                match read.await {
                    Ok(Ok(0)) if decoder.finish_at_eof().is_ok() => break,
                    Ok(Ok(n)) if n > 0 => {}
                    Err(_) => return Err(Refusal::service(504, "upstream_timeout")),
                    _ => return Err(Refusal::service(502, "upstream_error")),
                }
            }
            Err(_) => return Err(Refusal::service(502, "upstream_chunk_framing")),
        }
    }
    // The connection's read buffer may have grown with the answer: give it back.
    if answer.up.buf.capacity() > 64 * 1024 {
        answer.up.buf = BytesMut::new();
    }
    let body = first.unwrap_or_else(|| Bytes::from(body));
    Ok((body, permits))
}

async fn budget(shared: &Shared, units: usize) -> Result<SemaphorePermit<'_>, Refusal> {
    let units = u32::try_from(units).unwrap_or(u32::MAX);
    match tokio::time::timeout(BUDGET_WAIT, shared.inspect.acquire_many(units)).await {
        Ok(Ok(p)) => Ok(p),
        _ => Err(Refusal::service(503, "inspection_budget_exhausted")),
    }
}

/// Judges each response message, learns the IDs it shows, and rewrites what the rule does
/// not allow into an access-denied message (`None`: the answer goes out as it came).
fn judge(
    shared: &Shared,
    state: &State,
    bytes: &[u8],
    judged: &Judged,
    ctx: &mut Ctx,
) -> Result<Option<Vec<u8>>, Refusal> {
    let Some(inspect) = ctx.inspect.clone() else {
        return Ok(None);
    };
    let settings = &state.content;
    ctx.inspected_response = bytes.len() as u64;
    let response = soap::parse_response(bytes, settings.limits)
        .map_err(|e| Refusal::service(502, format!("response: {e}")))?;
    let mut cache = shared
        .ids
        .lock()
        .map_err(|_| Refusal::service(500, "id_cache_poisoned"))?;
    let verdicts = content::judge_response(
        &response,
        &inspect,
        &cache,
        &judged.mailbox,
        settings.meetings,
    );
    cache.learn(&judged.mailbox, &response, &inspect, settings.meetings);
    drop(cache);
    let filtered = content::filter(bytes, &response, &verdicts);
    if filtered.body.is_some() {
        ctx.withheld = Some(filtered.withheld);
        ctx.reason = filtered.reason.into();
    }
    Ok(filtered.body)
}
