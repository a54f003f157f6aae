//! One request's life, as every phase learns it. Each phase fills its part; the logging
//! phase reads the whole once for the audit line and the failure report, so there is one
//! place that says what happened to a request.

use std::{
    borrow::Cow,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::model::{
    auth::{AuthKind, TokenKind},
    ews::OpClass,
    outcome::{Decision, FailureClass},
    rules::Inspect,
};

/// What every request of one client connection shares.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: u64,
    pub peer: SocketAddr,
    /// The source group, from the same prefix list as the XDP tables (`model::packet`).
    pub group: Option<Arc<str>>,
    /// The subject of a verified client certificate.
    pub client_cert: Option<Arc<str>>,
}

/// The user an NTLM, Negotiate or Kerberos handshake authenticated on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub kind: AuthKind,
    /// Shared with each request of the connection: no copy per request. None for Kerberos,
    /// whose user is inside the encrypted ticket.
    pub user: Option<Arc<str>>,
}

/// A refusal as the client sees it and the audit line tells it.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub reason: Cow<'static, str>,
    /// `None`: not the client's fault (Exchange unreachable, a budget exhausted).
    pub failure: Option<FailureClass>,
    /// The request was read whole: the connection may carry the next one.
    pub keep_alive: bool,
}

impl Refusal {
    pub fn protocol(status: u16, reason: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal::new(status, reason, Some(FailureClass::Protocol))
    }

    pub fn credential(status: u16, reason: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal::new(status, reason, Some(FailureClass::Credential))
    }

    pub fn policy(status: u16, reason: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal::new(status, reason, Some(FailureClass::Policy))
    }

    /// Refused for a reason that does not count against the client.
    pub fn service(status: u16, reason: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal::new(status, reason, None)
    }

    fn new(
        status: u16,
        reason: impl Into<Cow<'static, str>>,
        failure: Option<FailureClass>,
    ) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
            failure,
            keep_alive: false,
        }
    }
}

/// Everything one request's phases learn.
#[derive(Debug)]
pub struct Ctx {
    pub started: Instant,
    /// The wall clock when the request began, since the Unix epoch. Every phase that needs
    /// the date (a token's life, a rule's hours, the audit line) reads it from here: one
    /// clock reading a request rather than one a phase.
    pub wall: Duration,
    pub conn: Arc<ConnInfo>,
    // request filter
    /// The common methods are constants (`Cow::Borrowed`): no allocation for them.
    pub method: Cow<'static, str>,
    /// The normalised path, or the raw target when it could not be normalised.
    pub path: String,
    /// What goes to Exchange as the request-target (and what the audit line records).
    /// The EWS endpoint's canonical spelling is a constant.
    pub forwarded: Option<Cow<'static, str>>,
    /// `POST /EWS/Exchange.asmx`: refusals are SOAP faults, the body is judged.
    pub ews: bool,
    pub user_agent: Option<String>,
    // identity
    pub auth: AuthKind,
    pub user: Option<Arc<str>>,
    pub token: Option<TokenKind>,
    /// The item a verified callback token names.
    pub token_item: Option<Arc<str>>,
    /// A tag of a bearer token that failed to verify.
    pub failed_token: Option<String>,
    /// An NTLM/Negotiate leg that carries no user yet (Type 1).
    pub handshake: bool,
    /// Set on the connection once Exchange answers this leg with anything but 401 (EWS
    /// answers an authenticated request's SOAP fault with 500).
    pub pending_session: Option<Session>,
    // policy
    pub rule: Option<Arc<str>>,
    /// What a report-only evaluation said, when it differs from the enforced one.
    pub shadow: Option<(Decision, Option<Arc<str>>, String)>,
    pub inspect: Option<Inspect>,
    // body filter
    pub operation: Option<Cow<'static, str>>,
    pub op_class: Option<OpClass>,
    /// Data types touched, or "unresolved"; a single type is its constant name.
    pub data: Option<Cow<'static, str>>,
    pub mailbox: Option<String>,
    pub items: Option<usize>,
    // upstream and response
    pub upstream_status: Option<u16>,
    pub upstream_ms: Option<f64>,
    pub withheld: Option<usize>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Bytes the content policy read: the request body, an answer read whole.
    pub inspected_request: u64,
    pub inspected_response: u64,
    // outcome
    pub status: u16,
    pub decision: Decision,
    pub reason: Cow<'static, str>,
    pub failure: Option<FailureClass>,
}

impl Ctx {
    /// The request's start on the wall clock, in whole seconds since the Unix epoch.
    pub fn unix_secs(&self) -> u64 {
        self.wall.as_secs()
    }

    pub fn new(conn: Arc<ConnInfo>) -> Ctx {
        Ctx {
            started: Instant::now(),
            wall: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
            conn,
            method: Cow::Borrowed(""),
            path: String::new(),
            forwarded: None,
            ews: false,
            user_agent: None,
            auth: AuthKind::None,
            user: None,
            token: None,
            token_item: None,
            failed_token: None,
            handshake: false,
            pending_session: None,
            rule: None,
            shadow: None,
            inspect: None,
            operation: None,
            op_class: None,
            data: None,
            mailbox: None,
            items: None,
            upstream_status: None,
            upstream_ms: None,
            withheld: None,
            bytes_in: 0,
            bytes_out: 0,
            inspected_request: 0,
            inspected_response: 0,
            status: 0,
            decision: Decision::Deny,
            reason: Cow::Borrowed(""),
            failure: None,
        }
    }

    /// Records a refusal as the request's outcome.
    pub fn refused(&mut self, r: &Refusal) {
        self.decision = Decision::Deny;
        self.status = r.status;
        self.reason = r.reason.clone();
        self.failure = r.failure;
    }

    /// The identity a failure counts against, when the request named one.
    pub fn identity(&self) -> Option<String> {
        if let Some(tag) = &self.failed_token {
            return Some(format!("token:{tag}"));
        }
        if let Some(item) = &self.token_item {
            return Some(format!("token-item:{item}"));
        }
        if let Some(user) = &self.user {
            return Some(format!("user:{}", user.to_ascii_lowercase()));
        }
        self.conn.client_cert.as_ref().map(|c| format!("cert:{c}"))
    }
}
