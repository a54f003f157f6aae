//! `POST /EWS/Exchange.asmx`: the SOAP body is read and judged before Exchange sees a byte
//! of it, and a response the rules must see is read whole and filtered before the client
//! sees a byte of it.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::{Bytes, BytesMut};
use http::{header, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use super::{
    body::{BodyStats, BoxError, Cut, GuardedBody},
    request::{forward, not_the_clients_fault, refusal, Plan, Refusal, RespBody, Sent},
    Conn, Policy,
};
use crate::{
    model::{
        ews::{self, Shape},
        rules::{Action, Inspect},
        settings::ContentSettings,
    },
    ops::audit::Record,
    policy::{
        content::{self, Touch},
        rules::{self as policy, Content},
    },
    soap::{self, Tail},
};

/// What the request showed, kept for the response and the audit line.
struct Judged {
    mailbox: String,
    inspect: Option<Inspect>,
    rule: Option<String>,
}

pub(super) async fn exchange(
    conn: &Arc<Conn>,
    policy: &Policy,
    req: Request<Incoming>,
    mut rec: Record,
    plan: Plan,
    started: Instant,
) -> Response<RespBody> {
    let (mut parts, body) = req.into_parts();
    let limits = &policy.settings.limits;
    let stats = Arc::new(BodyStats::default());
    let mut body = GuardedBody::new(
        body,
        plan.body_cap,
        limits.body_min_rate,
        limits.body_grace,
        stats.clone(),
    );
    let settings = &policy.content;
    let (head, ended) = match read_head(&mut body, settings.request_buffer).await {
        Ok(x) => x,
        Err(()) => return conn.refuse(rec, body_failure(&stats), started),
    };
    // An NTLM or Negotiate Type 1 leg with no body: Exchange answers it with a challenge.
    let judged = if plan.who.handshake && head.is_empty() && ended {
        Judged {
            mailbox: String::new(),
            inspect: None,
            rule: plan.rule.clone(),
        }
    } else {
        match judge(conn, policy, &parts.headers, &head, ended, &plan, &mut rec) {
            Ok((j, tail)) => {
                if let Some(t) = tail {
                    let rest = TailBody {
                        rest: body,
                        tail: t,
                        stats: stats.clone(),
                    };
                    return send(
                        conn,
                        policy,
                        parts,
                        rest.boxed_unsync(),
                        head,
                        stats,
                        rec,
                        plan,
                        j,
                        started,
                    )
                    .await;
                }
                j
            }
            Err(r) => return conn.refuse(rec, r, started),
        }
    };
    // Read whole: hyper sends it with its length.
    parts.headers.remove(header::TRANSFER_ENCODING);
    let whole = Full::new(head.clone()).map_err(|e| match e {});
    send(
        conn,
        policy,
        parts,
        whole.boxed_unsync(),
        Bytes::new(),
        stats,
        rec,
        plan,
        judged,
        started,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn send(
    conn: &Arc<Conn>,
    policy: &Policy,
    mut parts: http::request::Parts,
    body: super::upstream::UpstreamBody,
    prefix: Bytes,
    stats: Arc<BodyStats>,
    mut rec: Record,
    mut plan: Plan,
    judged: Judged,
    started: Instant,
) -> Response<RespBody> {
    plan.rule = judged.rule.clone();
    // A response ewsgate must read has to arrive in a form it can read.
    if judged.inspect.is_some() {
        parts.headers.remove(header::ACCEPT_ENCODING);
    }
    let body = if prefix.is_empty() {
        body
    } else {
        Prefixed {
            prefix: Some(prefix),
            rest: body,
        }
        .boxed_unsync()
    };
    let sent = Sent { parts, body, stats };
    let (resp, stats) = match forward(conn, policy, sent, &mut rec, plan).await {
        Ok(x) => x,
        Err(r) => return conn.refuse(rec, r, started),
    };
    let Some(inspect) = judged.inspect else {
        let resp = resp.map(|b| b.map_err(BoxError::from).boxed());
        return conn.pass(resp, rec, stats, started);
    };
    match inspected(conn, policy, resp, &inspect, &judged.mailbox, &mut rec).await {
        Ok(resp) => conn.pass(resp, rec, stats, started),
        Err(r) => conn.refuse(rec, r, started),
    }
}

fn body_failure(stats: &BodyStats) -> Refusal {
    match stats.cut() {
        Cut::TooLarge => refusal(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
        Cut::TooSlow => refusal(StatusCode::REQUEST_TIMEOUT, "body_too_slow"),
        _ => refusal(StatusCode::BAD_REQUEST, "body_unreadable"),
    }
}

/// Reads the body up to `limit` bytes; says whether that was all of it.
async fn read_head(body: &mut GuardedBody<Incoming>, limit: usize) -> Result<(Bytes, bool), ()> {
    let mut buf = BytesMut::new();
    while buf.len() < limit {
        match body.frame().await {
            None => return Ok((buf.freeze(), true)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(_)) => return Err(()),
        }
    }
    let ended = body.is_end_stream();
    Ok((buf.freeze(), ended))
}

fn judge(
    conn: &Conn,
    policy: &Policy,
    headers: &http::HeaderMap,
    head: &[u8],
    ended: bool,
    plan: &Plan,
    rec: &mut Record,
) -> Result<(Judged, Option<Tail>), Refusal> {
    let settings = &policy.content;
    let mut request = soap::parse_request(head, ended, settings.limits)
        .map_err(|e| refusal(StatusCode::BAD_REQUEST, format!("{}: {e}", e.reason())))?;
    let tail = request.tail.take();
    // A `CreateItem` that sends mail is a send, whatever `write` allows.
    let info = ews::operation(&request.operation).map(|mut i| {
        if request.sends {
            i.class = ews::OpClass::Send;
        }
        i
    });
    rec.operation = Some(request.operation.clone());
    rec.items = Some(request.item_count());
    let anchor = headers
        .get("x-anchormailbox")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let who = &plan.who;
    let access = content::access(&request, anchor, who.user.as_deref());
    let mailbox = access.mailbox(who.user.as_deref());
    rec.mailbox = Some(mailbox.clone()).filter(|m| !m.is_empty());
    let (touch, roots) = {
        let cache = conn.shared.ids.lock().map_err(|_| poisoned())?;
        let touch = match info {
            Some(i) => content::touched(&request, &i, &cache, &mailbox, settings.meetings),
            None => Touch {
                data: ews::DataSet::ALL,
                unresolved: true,
            },
        };
        let roots: Vec<Option<String>> = request
            .attachments
            .iter()
            .map(|a| cache.attachment(&mailbox, a).and_then(|k| k.root.clone()))
            .collect();
        (touch, roots)
    };
    rec.data = Some(data_label(&touch));
    let c = Content {
        request: &request,
        info,
        touch,
        access: &access,
        token_item: who.token_item.as_deref(),
        roots: roots.iter().map(Option::as_deref).collect(),
    };
    let mut subject = who.subject(conn, policy, crate::model::paths::EWS, true);
    subject.content = Some(c.clone());
    let decision = policy::decide(&policy.rules, &subject);
    rec.rule = decision.rule.clone();
    if decision.action == Action::Deny {
        let reason = match &decision.rule {
            Some(name) => format!("denied by rule {name}"),
            None => policy::default_deny_reason(&c),
        };
        let mut r = refusal(StatusCode::INTERNAL_SERVER_ERROR, reason);
        // Read whole, the request leaves the connection in a known state (and an NTLM
        // session on it intact).
        r.keep_alive = tail.is_none();
        return Err(r);
    }
    if info.is_some_and(|i| i.shape == Shape::Changes) {
        // Moved, copied, deleted or changed items get new IDs or classes: forget them.
        if let Ok(mut cache) = conn.shared.ids.lock() {
            cache.forget(&mailbox, &request.items);
        }
    }
    Ok((
        Judged {
            mailbox,
            inspect: decision.inspect,
            rule: decision.rule,
        },
        tail,
    ))
}

fn poisoned() -> Refusal {
    not_the_clients_fault(StatusCode::INTERNAL_SERVER_ERROR, "id_cache_poisoned")
}

fn data_label(t: &Touch) -> String {
    if t.unresolved {
        "unresolved".into()
    } else {
        t.data.to_string()
    }
}

/// Reads Exchange's answer whole, replaces what the rule does not allow, and learns the
/// types of the IDs it shows.
async fn inspected(
    conn: &Conn,
    policy: &Policy,
    resp: Response<Incoming>,
    inspect: &Inspect,
    mailbox: &str,
    rec: &mut Record,
) -> Result<Response<RespBody>, Refusal> {
    let settings: &ContentSettings = &policy.content;
    let (mut parts, body) = resp.into_parts();
    if parts.headers.contains_key(header::CONTENT_ENCODING) {
        return Err(not_the_clients_fault(
            StatusCode::BAD_GATEWAY,
            "response_encoded",
        ));
    }
    let read = Limited::new(body, settings.response_bytes).collect();
    let bytes = match tokio::time::timeout(policy.settings.limits.idle_timeout, read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return Err(not_the_clients_fault(
                StatusCode::BAD_GATEWAY,
                "response_too_large_to_inspect",
            ))
        }
        Err(_) => {
            return Err(not_the_clients_fault(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
            ))
        }
    };
    let out = if bytes.is_empty() || parts.status == StatusCode::UNAUTHORIZED {
        bytes
    } else {
        let response = soap::parse_response(&bytes, settings.limits).map_err(|e| {
            not_the_clients_fault(StatusCode::BAD_GATEWAY, format!("response: {e}").as_str())
        })?;
        let mut cache = conn.shared.ids.lock().map_err(|_| poisoned())?;
        let denied =
            content::judge_response(&response, inspect, &cache, mailbox, settings.meetings);
        cache.learn(mailbox, &response, settings.meetings);
        drop(cache);
        let withheld = denied.iter().filter(|d| d.is_some()).count();
        if withheld > 0 {
            rec.withheld = Some(withheld);
            rec.reason = format!(
                "forwarded; {withheld} response message(s) withheld: {}",
                denied.iter().flatten().next().map_or("", String::as_str)
            );
            Bytes::from(soap::rewrite(&bytes, &response, &denied))
        } else {
            bytes
        }
    };
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, out.len().into());
    let body = Full::new(out).map_err(|e| match e {}).boxed();
    Ok(Response::from_parts(parts, body))
}

/// Bytes already read, then the rest of the body.
struct Prefixed<B> {
    prefix: Option<Bytes>,
    rest: B,
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

/// The body past the classification buffer: every byte goes through [`Tail`]; anything
/// but bulk content and the closing tags cuts the request off before Exchange has it all.
struct TailBody {
    rest: GuardedBody<Incoming>,
    tail: Tail,
    stats: Arc<BodyStats>,
}

impl Body for TailBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.rest).poll_frame(cx);
        let this = &mut *self;
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    if this.tail.feed(d).is_err() {
                        this.stats.mark(Cut::BulkContent);
                        return Poll::Ready(Some(Err("SOAP tail is not bulk content".into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) if this.tail.finish().is_err() => {
                this.stats.mark(Cut::BulkContent);
                Poll::Ready(Some(Err("SOAP request ends inside bulk content".into())))
            }
            other => other,
        }
    }
}
