//! Answers ewsgate gives itself. On the EWS endpoint every refusal is a SOAP fault shaped
//! like Exchange's, so EWS clients raise the named error and show its text; elsewhere a
//! short plain-text body.

use tokio::io::AsyncWriteExt;

use crate::{
    proxy::{
        context::{Ctx, Refusal},
        h1::{put_header, put_number},
        session::Conn,
    },
    soap,
};

/// Sends a refusal; says whether the connection can carry the next request.
pub async fn refusal(conn: &mut Conn, ctx: &mut Ctx, r: &Refusal, client_close: bool) -> bool {
    ctx.refused(r);
    let keep = r.keep_alive && !client_close;
    let text = format!("request refused: {}", r.reason);
    let (content_type, body): (&[u8], String) = if ctx.ews {
        let fault = soap::fault(fault_code(r.status), &text);
        (b"text/xml; charset=utf-8", fault)
    } else {
        (b"text/plain; charset=utf-8", format!("ewsgate: {text}\n"))
    };
    let mut out = Vec::with_capacity(body.len() + 160);
    out.extend_from_slice(b"HTTP/1.1 ");
    put_number(&mut out, u64::from(r.status));
    out.push(b' ');
    out.extend_from_slice(reason_phrase(r.status).as_bytes());
    out.extend_from_slice(b"\r\n");
    put_header(&mut out, b"Content-Type", content_type);
    out.extend_from_slice(b"Content-Length: ");
    put_number(&mut out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    if !keep {
        // A refused request's body may be unread: the connection cannot be trusted to go on.
        put_header(&mut out, b"Connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    ctx.bytes_out = body.len() as u64;
    let sent = conn.tls.write_all(&out).await.is_ok() && conn.tls.flush().await.is_ok();
    keep && sent
}

/// The EWS error code a refusal is reported as.
fn fault_code(status: u16) -> &'static str {
    match status {
        400 => "ErrorInvalidRequest",
        408 => "ErrorTimeoutExpired",
        413 => "ErrorRequestTooLarge",
        503 => "ErrorServerBusy",
        502 | 504 => "ErrorInternalServerTransientError",
        _ => "ErrorAccessDenied",
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Refused",
    }
}
