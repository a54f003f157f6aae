//! One request: checked, classified, judged, then refused or forwarded.

use std::{convert::Infallible, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;

use super::{
    body::{AuditedBody, BodyStats, BoxError, Cut, GuardedBody},
    upstream::UpstreamBody,
    Conn, Policy,
};
use crate::{
    audit::Record,
    auth::{self, Credential, NtlmStage},
    config::{Action, AuthKind, OtherPaths, TokenKind},
    paths,
    policy::{self, LocalTime, Subject},
    soap,
    strict::HeadCheck,
};

pub(crate) type RespBody = BoxBody<Bytes, BoxError>;

/// The user an NTLM or Negotiate handshake authenticated on a connection.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    kind: AuthKind,
    user: String,
}

/// A refusal: the status sent, the reason audited, and whether it counts as a failure.
pub(super) struct Refusal {
    pub(super) status: StatusCode,
    pub(super) reason: String,
    pub(super) fail: bool,
    /// The request was read whole: the connection may carry the next one.
    pub(super) keep_alive: bool,
}

/// A refusal that does not count against the source (Exchange unreachable, say).
pub(super) fn not_the_clients_fault(status: StatusCode, reason: &str) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
        fail: false,
        keep_alive: false,
    }
}

pub(super) fn refusal(status: StatusCode, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
        fail: true,
        keep_alive: false,
    }
}

/// What a request that passed becomes.
pub(super) struct Plan {
    pub(super) uri: Uri,
    pub(super) body_cap: u64,
    /// Set on the connection once Exchange accepts this handshake leg.
    pub(super) pending_session: Option<Session>,
    pub(super) rule: Option<String>,
    /// `POST /EWS/Exchange.asmx`: the SOAP body is judged before anything is forwarded.
    pub(super) ews: bool,
    pub(super) who: Identity,
}

pub(crate) async fn handle(
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let started = Instant::now();
    let policy = conn.shared.policy.load_full();
    refetch_for_unknown_key(&policy, &req).await;
    let mut rec = conn.record(&req);
    Ok(match judge(&conn, &policy, &req, &mut rec) {
        Ok(plan) if plan.ews => super::ews::exchange(&conn, &policy, req, rec, plan, started).await,
        Ok(plan) => {
            let (parts, body) = req.into_parts();
            let stats = Arc::new(BodyStats::default());
            let limits = &policy.settings.limits;
            let body = GuardedBody::new(
                body,
                plan.body_cap,
                limits.body_min_rate,
                limits.body_grace,
                stats.clone(),
            );
            let sent = Sent {
                parts,
                body: body.boxed_unsync(),
                stats,
            };
            match forward(&conn, &policy, sent, &mut rec, plan).await {
                Ok((resp, stats)) => {
                    let resp = resp.map(|b| b.map_err(BoxError::from).boxed());
                    conn.pass(resp, rec, stats, started)
                }
                Err(r) => conn.refuse(rec, r, started),
            }
        }
        Err(r) => conn.refuse(rec, r, started),
    })
}

/// A bearer token signed by a key ewsgate has not seen: fetch the allow-listed metadata
/// again first (rate limited), as Exchange's auth certificate may just have rotated.
async fn refetch_for_unknown_key(policy: &Policy, req: &Request<Incoming>) {
    let Some(tokens) = &policy.tokens else {
        return;
    };
    let value = req.headers().get(header::AUTHORIZATION);
    if let Some(token) = value.and_then(|v| crate::auth::bearer_token(v.as_bytes())) {
        tokens.refetch_unknown(token).await;
    }
}

/// A request on its way to Exchange.
pub(super) struct Sent {
    pub(super) parts: http::request::Parts,
    pub(super) body: UpstreamBody,
    pub(super) stats: Arc<BodyStats>,
}

impl Conn {
    fn record(&self, req: &Request<Incoming>) -> Record {
        Record {
            source: Some(self.peer.ip()),
            source_port: self.peer.port(),
            source_group: self.group.clone(),
            auth: "none",
            method: req.method().to_string(),
            path: req.uri().path().chars().take(512).collect(),
            user_agent: req
                .headers()
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.chars().take(256).collect()),
            connection: self.id,
            ..Default::default()
        }
    }

    pub(super) fn refuse(
        &self,
        mut rec: Record,
        r: Refusal,
        started: Instant,
    ) -> Response<RespBody> {
        rec.decision = "deny";
        rec.status = r.status.as_u16();
        rec.reason = r.reason;
        rec.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        if r.fail {
            self.shared.fail(self.peer.ip(), &rec.reason);
        }
        // EWS clients read SOAP faults: they raise the named error and show its text.
        let resp = if rec.method == "POST" && rec.path == paths::EWS {
            let text = soap::fault(
                fault_code(r.status),
                &format!("request refused: {}", rec.reason),
            );
            local_response(r.status, "text/xml; charset=utf-8", text)
        } else {
            let text = format!("ewsgate: request refused ({})\n", rec.reason);
            local_response(r.status, "text/plain; charset=utf-8", text)
        };
        let mut resp = resp;
        if r.keep_alive {
            resp.headers_mut().remove(header::CONNECTION);
        }
        self.shared.audit.log(rec);
        resp
    }

    /// A response from Exchange on its way to the client; its end writes the audit line.
    pub(super) fn pass(
        &self,
        resp: Response<RespBody>,
        rec: Record,
        stats: Arc<BodyStats>,
        started: Instant,
    ) -> Response<RespBody> {
        let (parts, body) = resp.into_parts();
        let audit = self.shared.audit.clone();
        let body = AuditedBody::new(body, rec, audit, started, stats);
        Response::from_parts(parts, body.boxed())
    }

    /// Audits a request hyper refused before ewsgate saw it.
    pub(crate) fn refuse_unparsed(&self, reason: &'static str) {
        let rec = Record {
            source: Some(self.peer.ip()),
            source_port: self.peer.port(),
            source_group: self.group.clone(),
            auth: "none",
            decision: "deny",
            reason: reason.into(),
            status: 400,
            connection: self.id,
            ..Default::default()
        };
        self.shared.audit.log(rec);
        self.shared.fail(self.peer.ip(), reason);
    }

    fn session(&self) -> Option<Session> {
        self.session.lock().ok().and_then(|s| s.clone())
    }
}

/// The EWS error code a refusal is reported as.
fn fault_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "ErrorInvalidRequest",
        408 => "ErrorTimeoutExpired",
        413 => "ErrorRequestTooLarge",
        502..=504 => "ErrorInternalServerTransientError",
        _ => "ErrorAccessDenied",
    }
}

pub(super) fn local_response(
    status: StatusCode,
    content_type: &'static str,
    text: String,
) -> Response<RespBody> {
    let mut resp = Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // A refused request's body may be unread: the connection cannot be trusted to continue.
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn judge(
    conn: &Conn,
    policy: &Policy,
    req: &Request<Incoming>,
    rec: &mut Record,
) -> Result<Plan, Refusal> {
    let framing = conn.checks.lock().ok().and_then(|mut q| q.pop_front());
    match framing {
        Some(HeadCheck::Ok) => {}
        Some(HeadCheck::Refused(r)) => return Err(refusal(StatusCode::BAD_REQUEST, r)),
        // The tracker and hyper disagree on where requests begin: fail closed.
        None => return Err(refusal(StatusCode::BAD_REQUEST, "framing_desync")),
    }
    if req.method() == Method::CONNECT {
        return Err(refusal(StatusCode::METHOD_NOT_ALLOWED, "connect_method"));
    }
    if req.headers().contains_key(header::UPGRADE) {
        return Err(refusal(StatusCode::BAD_REQUEST, "upgrade"));
    }
    let path = paths::normalise(req.uri().path())
        .map_err(|e| refusal(StatusCode::BAD_REQUEST, format!("path: {e}")))?;
    rec.path = path.clone();
    let who = identify(conn, policy, req, rec)?;
    let limits = &policy.settings.limits;
    let body_cap = limits.body_cap(&path);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > body_cap) {
        return Err(refusal(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"));
    }
    let ews = req.method() == Method::POST && path == paths::EWS;
    let rule = if !ews
        && !paths::under_ews(&path)
        && policy.settings.other_paths == OtherPaths::Pass
    {
        Some("(other_paths = pass)".to_string())
    } else {
        let subject = who.subject(conn, policy, &path, ews);
        let decision = policy::decide(&policy.rules, &subject);
        rec.rule = decision.rule.clone();
        // The body decides EWS requests; here only whether any rule could allow one.
        let refused = match ews {
            true => !policy::may_allow(&policy.rules, &subject),
            false => decision.action == Action::Deny,
        };
        if refused {
            let reason = match &decision.rule {
                Some(name) => format!("denied by rule {name}"),
                None if !ews && paths::under_ews(&path) => "ews_path_not_named_by_a_rule".into(),
                None => "no_rule_matched".into(),
            };
            return Err(refusal(StatusCode::FORBIDDEN, reason));
        }
        decision.rule
    };
    let target = if ews {
        paths::EWS_CANONICAL
    } else {
        path.as_str()
    };
    let uri = match req.uri().query() {
        Some(q) => format!("{target}?{q}"),
        None => target.to_string(),
    };
    Ok(Plan {
        uri: uri
            .parse()
            .map_err(|_| refusal(StatusCode::BAD_REQUEST, "path: not a valid URI"))?,
        body_cap,
        pending_session: who.pending.clone(),
        rule,
        ews,
        who,
    })
}

/// Who a request is from, as far as ewsgate can tell.
pub(super) struct Identity {
    pub(super) kind: AuthKind,
    pub(super) user: Option<String>,
    pub(super) token: Option<TokenKind>,
    /// The item a verified callback token names.
    pub(super) token_item: Option<String>,
    pub(super) handshake: bool,
    pending: Option<Session>,
}

impl Identity {
    pub(super) fn subject<'a>(
        &'a self,
        conn: &'a Conn,
        policy: &Policy,
        path: &'a str,
        ews: bool,
    ) -> Subject<'a> {
        Subject {
            group: conn.group.as_deref(),
            auth: self.kind,
            token: self.token,
            path,
            ews,
            user: self.user.as_deref(),
            handshake: self.handshake,
            when: LocalTime::now(policy.settings.utc_offset_minutes),
            content: None,
        }
    }
}

fn identify(
    conn: &Conn,
    policy: &Policy,
    req: &Request<Incoming>,
    rec: &mut Record,
) -> Result<Identity, Refusal> {
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(refusal(StatusCode::BAD_REQUEST, "duplicate_authorization"));
    }
    let credential = auth::classify(first.map(HeaderValue::as_bytes));
    let mut who = Identity {
        kind: credential.kind(),
        user: None,
        token: None,
        token_item: None,
        handshake: false,
        pending: None,
    };
    match credential {
        Credential::Invalid(reason) => return Err(refusal(StatusCode::BAD_REQUEST, reason)),
        Credential::None => {
            if let Some(s) = conn.session() {
                who.kind = s.kind;
                who.user = Some(s.user);
            } else if let Some(cert) = &conn.client_cert {
                who.kind = AuthKind::ClientCert;
                who.user = Some(cert.clone());
            }
        }
        Credential::Basic { user } => who.user = Some(user),
        Credential::Ntlm { stage, .. } => match stage {
            NtlmStage::Authenticate { user } => {
                who.pending = Some(Session {
                    kind: who.kind,
                    user: user.clone(),
                });
                who.user = Some(user);
            }
            NtlmStage::Negotiate | NtlmStage::Other => who.handshake = true,
        },
        Credential::Kerberos => {}
        Credential::Bearer { token } => {
            let verified = verify(policy, &token)?;
            // `verify_for_ews` accepts callback and Entra tokens only.
            let (kind, family) = match verified.family {
                crate::tokens::Family::Entra => (TokenKind::Entra, "entra"),
                _ => (TokenKind::Callback, "callback"),
            };
            who.token = Some(kind);
            rec.token_family = Some(family);
            rec.token_item = verified.item.clone();
            who.token_item = verified.item;
            who.user = verified.user;
        }
    }
    rec.auth = who.kind.name();
    rec.user = who.user.clone();
    Ok(who)
}

fn verify(policy: &Policy, token: &str) -> Result<crate::tokens::Verified, Refusal> {
    let Some(cache) = &policy.tokens else {
        return Err(refusal(StatusCode::UNAUTHORIZED, "token_no_pinned_keys"));
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    cache
        .verify_for_ews(token, now)
        .map_err(|e| refusal(StatusCode::UNAUTHORIZED, e.reason()))
}

/// Sends a request to Exchange on the connection's own upstream connection.
pub(super) async fn forward(
    conn: &Arc<Conn>,
    policy: &Policy,
    sent: Sent,
    rec: &mut Record,
    plan: Plan,
) -> Result<(Response<Incoming>, Arc<BodyStats>), Refusal> {
    let limits = &policy.settings.limits;
    let Sent {
        mut parts,
        body,
        stats,
    } = sent;
    clean_request_headers(&mut parts.headers, conn);
    parts.uri = plan.uri;
    parts.version = Version::HTTP_11;
    rec.rule = plan.rule;
    let mut upstream = conn.upstream.lock().await;
    if upstream.as_ref().is_none_or(|s| s.is_closed()) {
        *upstream = match conn.shared.upstream.connect(conn.id).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "upstream");
                None
            }
        };
    }
    let Some(sender) = upstream.as_mut() else {
        return Err(not_the_clients_fault(
            StatusCode::BAD_GATEWAY,
            "upstream_unreachable",
        ));
    };
    let request = async {
        sender.ready().await?;
        sender.send_request(Request::from_parts(parts, body)).await
    };
    let result = tokio::time::timeout(limits.idle_timeout, request).await;
    let resp = match result {
        Ok(Ok(resp)) => resp,
        failed => {
            // Part of a body may have gone upstream: that connection is done.
            *upstream = None;
            return Err(match (stats.cut(), failed.is_err()) {
                (Cut::TooLarge, _) => refusal(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
                (Cut::TooSlow, _) => refusal(StatusCode::REQUEST_TIMEOUT, "body_too_slow"),
                (Cut::BulkContent, _) => refusal(StatusCode::BAD_REQUEST, "soap_bulk_content"),
                (Cut::None, true) => {
                    not_the_clients_fault(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
                }
                (Cut::None, false) => {
                    not_the_clients_fault(StatusCode::BAD_GATEWAY, "upstream_error")
                }
            });
        }
    };
    drop(upstream);
    let status = resp.status();
    if let Some(s) = plan.pending_session {
        if status != StatusCode::UNAUTHORIZED {
            if let Ok(mut slot) = conn.session.lock() {
                *slot = Some(s);
            }
        }
    }
    rec.decision = "allow";
    rec.reason = "forwarded".into();
    rec.status = status.as_u16();
    rec.upstream_status = Some(status.as_u16());
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok((Response::from_parts(parts, body), stats))
}

/// Headers that belong to one hop only (RFC 9110 §7.6.1), and those `Connection` names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        // Never let `Connection` remove what the proxy itself relies on.
        if name != header::HOST && name != header::AUTHORIZATION && name != header::CONTENT_LENGTH {
            h.remove(name);
        }
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(name);
    }
}

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

fn clean_request_headers(h: &mut HeaderMap, conn: &Conn) {
    strip_hop_by_hop(h);
    for name in FORWARDING {
        h.remove(name);
    }
    for name in ["proxy-authorization", "expect", "content-length"] {
        h.remove(name);
    }
    if let Ok(v) = HeaderValue::from_str(&conn.peer.ip().to_string()) {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
}
