//! `ewsgate explain`: how the gate would judge a request that nobody sent. The packet
//! layer's verdict comes from whoever can give it (the agent runs the live program through
//! BPF_PROG_TEST_RUN; for a config that is not running, its source groups are looked up);
//! then the request layer's phases in the proxy's order, with the same rule walk, token
//! validators, SOAP parser and reason strings the proxy uses, so what explain says is what
//! the audit line of the real request would carry.

use std::{
    fmt::Write as _,
    net::IpAddr,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::Bundle,
    identity::{
        token_cache::{KeyMaterial, TokenCache},
        tokens::Family,
    },
    model::{
        auth::{AuthKind, TokenKind},
        ews::{self, DataSet, OpClass, OpInfo},
        paths,
        rules::{Action, OpMatch, Rule, Scope},
        settings::OtherPaths,
        Config,
    },
    packet::probe::PacketVerdict,
    policy::{
        content::{self, IdCache, Touch},
        rules::{self, Content, LocalTime, Miss, Pass, Step, Subject, Trace},
    },
    soap,
};

/// Largest SOAP body explain takes: the proxy reads no more than this whole either.
pub const MAX_SOAP: usize = 1 << 20;
/// Largest token explain takes (the proxy refuses longer ones anyway).
pub const MAX_TOKEN: usize = 64 << 10;

const SOAP_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
const TYPES_NS: &str = "http://schemas.microsoft.com/exchange/services/2006/types";
const MESSAGES_NS: &str = "http://schemas.microsoft.com/exchange/services/2006/messages";

/// A hypothetical request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    pub source: Option<IpAddr>,
    /// `none`, `basic`, `ntlm`, `negotiate`, `kerberos`, `bearer`, `client-cert`.
    pub auth: String,
    pub user: Option<String>,
    /// The bearer token itself.
    pub token: Option<String>,
    /// A SOAP request body.
    pub soap: Option<String>,
    /// Instead of `soap`: an operation, with a folder or an item it names.
    pub operation: Option<String>,
    pub folder: Option<String>,
    pub item: Option<String>,
    /// The request path; `/EWS/Exchange.asmx` by default.
    pub path: Option<String>,
    /// Unix seconds to judge hours and days at; now by default.
    pub time: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The question itself is wrong: the CLI exits with 2.
    #[error("{0}")]
    BadInput(String),
}

fn bad(text: impl Into<String>) -> ExplainError {
    ExplainError::BadInput(text.into())
}

impl Query {
    /// Checks everything that does not need the config.
    pub fn check(&self) -> Result<(AuthKind, IpAddr), ExplainError> {
        let source = self
            .source
            .ok_or_else(|| bad("--source ADDRESS is required"))?;
        let auth = AuthKind::parse(&self.auth).ok_or_else(|| {
            bad(format!(
                "unknown --auth {:?}: one of none, basic, ntlm, negotiate, kerberos, bearer, client-cert",
                self.auth
            ))
        })?;
        if self.soap.is_some() && self.operation.is_some() {
            return Err(bad("--soap and --operation exclude each other"));
        }
        if self.operation.is_none() && (self.folder.is_some() || self.item.is_some()) {
            return Err(bad("--folder and --item need --operation"));
        }
        if let Some(op) = &self.operation {
            if op.is_empty() || op.len() > 64 || !op.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(bad(format!(
                    "--operation {op:?}: an EWS operation name such as FindItem"
                )));
            }
        }
        if self.soap.as_ref().is_some_and(|s| s.len() > MAX_SOAP) {
            return Err(bad(format!(
                "the SOAP body is larger than {MAX_SOAP} bytes"
            )));
        }
        if self.token.as_ref().is_some_and(|t| t.len() > MAX_TOKEN) {
            return Err(bad(format!("the token is larger than {MAX_TOKEN} bytes")));
        }
        if self.token.is_some() && auth != AuthKind::Bearer {
            return Err(bad("--token goes with --auth bearer"));
        }
        Ok((auth, source))
    }
}

/// What the caller knows besides the config: the packet verdict and the identities the
/// agent refuses.
pub struct Inputs<'a> {
    pub config: &'a Config,
    pub bundle: &'a Bundle,
    pub packet: PacketVerdict,
    /// Why an identity (`user:...`, `token-item:...`) is refused now, if it is.
    pub refused: &'a dyn Fn(&str) -> Option<String>,
    /// Which config was explained: the running one, or a file under review.
    pub against: String,
}

/// The answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Explanation {
    pub against: String,
    pub source: String,
    pub group: Option<String>,
    pub destination: String,
    pub packet: Option<PacketVerdict>,
    /// Local time the rules were judged at (`mon 23:00`).
    pub time: String,
    pub path: String,
    pub ews: bool,
    pub auth: String,
    pub user: Option<String>,
    pub token: Option<TokenAnswer>,
    pub content: Option<ContentAnswer>,
    /// Every rule in order, with what it did.
    pub rules: Vec<RuleLine>,
    /// The report judgment, when report-only rules exist and it differs.
    pub report: Option<Verdict>,
    pub verdict: Verdict,
    /// What the audit log would get: `request`, `connection`, or nothing.
    pub audit: String,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TokenAnswer {
    /// `valid` or `refused`.
    pub verdict: String,
    pub reason: Option<String>,
    pub family: Option<String>,
    pub item: Option<String>,
    pub user: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContentAnswer {
    pub operation: String,
    pub class: Option<String>,
    pub data: String,
    pub mailbox: Option<String>,
    pub items: usize,
    pub impersonation: bool,
    pub delegate: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RuleLine {
    pub name: String,
    pub line: usize,
    pub action: String,
    pub report_only: bool,
    /// `matched`, `failed`, `candidate`, `report-only`, `needs-body`, `not-reached`.
    pub outcome: String,
    /// The condition that failed, or the one that matched.
    pub condition: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Verdict {
    /// `allow`, `deny`, `would-deny` (report mode) or `drop` (the packet layer).
    pub decision: String,
    pub rule: Option<String>,
    /// The reason the audit line carries.
    pub reason: String,
    pub status: Option<u16>,
    /// `protocol`, `credential`, `policy` or none.
    pub failure: Option<String>,
}

impl Verdict {
    fn new(decision: &str, rule: Option<Arc<str>>, reason: impl Into<String>) -> Verdict {
        Verdict {
            decision: decision.into(),
            rule: rule.map(|r| r.to_string()),
            reason: reason.into(),
            status: None,
            failure: None,
        }
    }

    fn refused(status: u16, failure: Option<&str>, reason: impl Into<String>) -> Verdict {
        Verdict {
            decision: "deny".into(),
            rule: None,
            reason: reason.into(),
            status: Some(status),
            failure: failure.map(str::to_string),
        }
    }
}

/// The protected endpoint a source's connection would go to: the first protected address
/// of its family, on tcp/443 if listed, else its first TCP port (443 for a whole address).
pub fn destination(config: &Config, source: IpAddr) -> Option<(IpAddr, u16)> {
    let p = config
        .protect
        .iter()
        .find(|p| p.addr.is_ipv4() == source.is_ipv4())?;
    let tcp: Vec<u16> = p
        .ports
        .iter()
        .filter(|(proto, _)| *proto == 6)
        .map(|(_, port)| *port)
        .collect();
    let port = if tcp.is_empty() || tcp.contains(&443) {
        443
    } else {
        tcp[0]
    };
    Some((p.addr, port))
}

/// The packet verdict for a config that is not running: its source groups, looked up as
/// the program's tables would be (longest prefix). Dynamic entries are not part of a config.
pub fn config_verdict(config: &Config, source: IpAddr) -> PacketVerdict {
    let index = rules::SourceIndex::new(config);
    let (action, reason) = match (destination(config, source), index.group(source)) {
        (None, _) => ("pass", "not_bound"),
        (Some(_), Some(_)) => ("pass", "allow_group"),
        (Some(_), None) if config.xdp.monitor => ("pass", "drop_not_allowed"),
        (Some(_), None) => ("drop", "drop_not_allowed"),
    };
    PacketVerdict {
        action: action.into(),
        reason: reason.into(),
        monitor: config.xdp.monitor && reason == "drop_not_allowed",
        by: "this config's source groups (not running: the live block and allow entries are not consulted)"
            .into(),
        also_moved: Vec::new(),
    }
}

/// Explains `q` against `inputs`.
pub fn explain(inputs: &Inputs, q: &Query) -> Result<Explanation, ExplainError> {
    let (auth, source) = q.check()?;
    let config = inputs.config;
    let index = rules::SourceIndex::new(config);
    let group = index.group(source).map(str::to_string);
    let mut out = Explanation {
        against: inputs.against.clone(),
        source: source.to_string(),
        group: group.clone(),
        destination: destination(config, source)
            .map_or("(no protected address of this family)".into(), |(a, p)| {
                std::net::SocketAddr::new(a, p).to_string()
            }),
        packet: Some(inputs.packet.clone()),
        path: q
            .path
            .clone()
            .unwrap_or_else(|| "/EWS/Exchange.asmx".into()),
        auth: auth.name().into(),
        user: q.user.clone(),
        ..Explanation::default()
    };
    if let Some(v) = packet_stage(&inputs.packet, &mut out) {
        out.verdict = v;
        return Ok(out);
    }
    let Some(settings) = config.proxy.as_ref() else {
        out.notes
            .push("the config has no [proxy]: only the packet layer runs".into());
        out.verdict = Verdict::new("allow", None, "no request layer");
        out.audit = "nothing".into();
        return Ok(out);
    };
    let unix = q.time.unwrap_or_else(unix_now);
    let when = LocalTime::at(unix, settings.utc_offset_minutes);
    out.time = local_time(when);
    out.audit = "request".into();
    let mut req = Request::new(q, auth)?;
    out.path = req.path.clone();
    out.ews = req.ews;
    if let Err(reason) = &req.path_ok {
        out.verdict = Verdict::refused(400, Some("protocol"), reason.clone());
        return Ok(out);
    }
    if let Err(v) = identity(inputs, q, &mut req, &mut out) {
        out.verdict = v;
        return Ok(out);
    }
    out.user = req.user.clone();
    let mut verdict = judge(inputs, q, &req, &group, when, &mut out)?;
    // A report-only rule that would refuse what the enforced rules allow: forwarded, and
    // audited as would-deny with the report judgment beside it.
    if verdict.decision == "allow" && out.report.as_ref().is_some_and(|r| r.decision == "deny") {
        verdict.decision = "would-deny".into();
    }
    out.verdict = if settings.report_only && verdict.decision == "deny" {
        out.notes.push(
            "[proxy] mode = \"report\": the refusal is audited and the request forwarded".into(),
        );
        Verdict {
            decision: "would-deny".into(),
            ..verdict
        }
    } else {
        verdict
    };
    Ok(out)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn local_time(t: LocalTime) -> String {
    const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    format!(
        "{} {:02}:{:02}",
        DAYS.get(usize::from(t.weekday)).unwrap_or(&"?"),
        t.minute / 60,
        t.minute % 60
    )
}

/// The packet layer, then the proxy's own copy of it (accept): a final verdict when the
/// packet never reaches the request layer.
fn packet_stage(p: &PacketVerdict, out: &mut Explanation) -> Option<Verdict> {
    let accept = match p.reason.as_str() {
        "drop_blocked" => "source_blocked",
        "drop_not_allowed" => "source_not_allowed",
        _ => "",
    };
    if p.action == "drop" {
        out.audit = "nothing: the XDP program drops the SYN and counts it".into();
        return Some(Verdict::new("drop", None, p.reason.clone()));
    }
    if p.monitor && !accept.is_empty() {
        out.notes.push(format!(
            "monitor mode: the program passes the packet; the proxy audits a `connection` line, would-deny, {accept}"
        ));
    }
    None
}

/// The request as the proxy's request filter would see it.
struct Request {
    path: String,
    path_ok: Result<(), String>,
    ews: bool,
    auth: AuthKind,
    user: Option<String>,
    token: Option<TokenKind>,
    token_item: Option<String>,
    handshake: bool,
}

impl Request {
    fn new(q: &Query, auth: AuthKind) -> Result<Request, ExplainError> {
        let raw = q.path.as_deref().unwrap_or(paths::EWS);
        let (path, path_ok) = match paths::normalise(raw) {
            Ok(p) => (p, Ok(())),
            Err(e) => (raw.to_string(), Err(format!("path: {e}"))),
        };
        let ews = path == paths::EWS;
        // An NTLM or Negotiate request without a user is the Type 1 leg.
        let handshake = matches!(auth, AuthKind::Ntlm | AuthKind::Negotiate) && q.user.is_none();
        Ok(Request {
            path,
            path_ok,
            ews,
            auth,
            user: q.user.clone(),
            token: None,
            token_item: None,
            handshake,
        })
    }

    /// The identity the agent's refusal list is keyed by, as the proxy computes it.
    fn identity(&self) -> Option<String> {
        if let Some(item) = &self.token_item {
            return Some(format!("token-item:{item}"));
        }
        self.user
            .as_ref()
            .map(|u| format!("user:{}", u.to_ascii_lowercase()))
    }
}

/// The identity phase: the token verified with the config's validators, then the agent's
/// refusal list.
fn identity(
    inputs: &Inputs,
    q: &Query,
    req: &mut Request,
    out: &mut Explanation,
) -> Result<(), Verdict> {
    if req.auth == AuthKind::Bearer {
        let Some(token) = q.token.as_deref() else {
            out.notes.push(
                "no --token: the request is judged as a bearer token that verified as nothing"
                    .into(),
            );
            return check_refused(inputs, req);
        };
        let answer = verify(inputs, token.trim());
        let refused = answer.reason.clone();
        req.token = match answer.family.as_deref() {
            Some("entra") => Some(TokenKind::Entra),
            Some(_) => Some(TokenKind::Callback),
            None => None,
        };
        req.token_item = answer.item.clone();
        if answer.verdict == "valid" {
            req.user = answer.user.clone();
        }
        out.token = Some(answer);
        if let Some(reason) = refused {
            return Err(Verdict::refused(401, Some("credential"), reason));
        }
    }
    check_refused(inputs, req)
}

fn check_refused(inputs: &Inputs, req: &Request) -> Result<(), Verdict> {
    match req.identity().and_then(|i| (inputs.refused)(&i)) {
        Some(why) => Err(Verdict::refused(
            403,
            None,
            format!("identity_refused: {why}"),
        )),
        None => Ok(()),
    }
}

/// The token against the config's validators, built from the same bytes as the proxy's.
/// Keys the proxy fetched (metadata URLs, Entra discovery) are not here: explain never
/// fetches.
fn verify(inputs: &Inputs, token: &str) -> TokenAnswer {
    let tokens = &inputs.config.tokens;
    let built = KeyMaterial::gather(tokens, |p| inputs.bundle.file(p).map(<[u8]>::to_vec))
        .map_err(|e| e.to_string())
        .and_then(|m| TokenCache::build(tokens, &m, None).map_err(|e| e.to_string()));
    let refused = |reason: String| TokenAnswer {
        verdict: "refused".into(),
        reason: Some(reason),
        ..TokenAnswer::default()
    };
    let cache = match built {
        Ok(Some(c)) => c,
        Ok(None) => return refused("token_no_pinned_keys".into()),
        Err(e) => return refused(format!("token trust: {e}")),
    };
    match cache.verify_for_ews(token, unix_now().max(0) as u64) {
        Ok(v) => TokenAnswer {
            verdict: "valid".into(),
            reason: None,
            family: Some(
                match v.family {
                    Family::Entra => "entra",
                    _ => "callback",
                }
                .into(),
            ),
            item: v.item.map(|i| i.to_string()),
            user: v.user.map(|u| u.to_string()),
        },
        Err(e) => refused(e.reason().to_string()),
    }
}

/// The policy and body phases: the rule walk the proxy makes, traced.
fn judge(
    inputs: &Inputs,
    q: &Query,
    req: &Request,
    group: &Option<String>,
    when: LocalTime,
    out: &mut Explanation,
) -> Result<Verdict, ExplainError> {
    let config = inputs.config;
    let rules_ = &config.rules;
    let settings = config.proxy.as_ref();
    if !req.ews
        && !paths::under_ews(&req.path)
        && settings.is_some_and(|s| s.other_paths == OtherPaths::Pass)
    {
        out.notes
            .push("other_paths = pass: paths outside /EWS/ are forwarded unjudged".into());
        return Ok(Verdict::new(
            "allow",
            Some("(other_paths = pass)".into()),
            "forwarded",
        ));
    }
    let subject = Subject {
        group: group.as_deref(),
        auth: req.auth,
        token: req.token,
        path: &req.path,
        ews: req.ews,
        user: req.user.as_deref(),
        handshake: req.handshake,
        when,
        content: None,
    };
    let mut trace = Recorder::new(rules_.len());
    let enforced = rules::candidates_traced(rules_, &subject, Pass::Enforced, &mut trace);
    if !req.ews {
        return Ok(other_path(rules_, req, &subject, &enforced, trace, out));
    }
    if !rules::may_allow_among(rules_, &enforced) {
        out.rules = trace.lines(rules_, &subject, None);
        return Ok(head_refusal(rules_, &enforced));
    }
    let body = match body_of(q, req, rules_, &enforced, out) {
        Ok(body) => body,
        Err(v) => {
            out.rules = trace.lines(rules_, &subject, None);
            return Ok(v);
        }
    };
    let request = match soap::parse_request(body.as_bytes(), true, config.content.limits) {
        Ok(r) => r,
        Err(e) => {
            out.rules = trace.lines(rules_, &subject, None);
            let reason = format!("{}: {e}", e.reason());
            return Ok(Verdict::refused(400, Some("protocol"), reason));
        }
    };
    Ok(judge_body(
        config, req, &subject, &enforced, &request, trace, out,
    ))
}

/// A path other than the EWS endpoint: decided on the head alone.
fn other_path(
    rules_: &[Rule],
    req: &Request,
    subject: &Subject,
    enforced: &[usize],
    mut trace: Recorder,
    out: &mut Explanation,
) -> Verdict {
    let d = rules::decide_among_traced(rules_, enforced, subject, &mut trace);
    out.rules = trace.lines(rules_, subject, None);
    if rules_.iter().any(|r| r.report) {
        let report = rules::candidates(rules_, subject, Pass::Report);
        let r = rules::decide_among(rules_, &report, subject);
        if r.action != d.action {
            out.report = Some(other_path_verdict(req, r.action, r.rule));
        }
    }
    other_path_verdict(req, d.action, d.rule)
}

/// The EWS endpoint that no candidate could allow: refused before its body is read.
fn head_refusal(rules_: &[Rule], enforced: &[usize]) -> Verdict {
    let rule = enforced
        .last()
        .and_then(|&i| rules_.get(i))
        .filter(|r| r.action == Action::Deny && !r.judges_content());
    let reason = match rule {
        Some(r) => format!("denied by rule {}", r.name),
        None => "no_rule_matched".into(),
    };
    let mut v = Verdict::refused(403, Some("policy"), reason);
    v.rule = rule.map(|r| r.name.to_string());
    v
}

/// The SOAP body asked about, or the verdict when there is none.
fn body_of(
    q: &Query,
    req: &Request,
    rules_: &[Rule],
    enforced: &[usize],
    out: &mut Explanation,
) -> Result<String, Verdict> {
    match (&q.soap, &q.operation) {
        (Some(s), _) => Ok(s.clone()),
        (None, Some(op)) => Ok(synthesize(op, q.folder.as_deref(), q.item.as_deref())),
        (None, None) if req.handshake => {
            out.notes.push(
                "an NTLM or Negotiate leg without a user and without a body: Exchange answers it with a challenge"
                    .into(),
            );
            Err(Verdict::new(
                "allow",
                first_allow(rules_, enforced),
                "forwarded",
            ))
        }
        (None, None) => {
            out.notes.push(
                "no --soap or --operation: the head could be allowed, the body decides".into(),
            );
            Err(Verdict::new(
                "allow",
                first_allow(rules_, enforced),
                "may be allowed, depending on the SOAP body",
            ))
        }
    }
}

/// The body filter: what the request touches, and the candidates judged against it.
fn judge_body(
    config: &Config,
    req: &Request,
    subject: &Subject,
    enforced: &[usize],
    request: &soap::Request,
    mut trace: Recorder,
    out: &mut Explanation,
) -> Verdict {
    let rules_ = &config.rules;
    let info = operation(request);
    let access = content::access(request, None, req.user.as_deref());
    let mailbox = access.mailbox(req.user.as_deref());
    // The proxy's ID cache holds what Exchange's answers showed; explain starts from none.
    let cache = IdCache::new(1);
    let touch = match info {
        Some(i) => content::touched(request, &i, &cache, &mailbox, config.content.meetings),
        None => Touch {
            data: DataSet::ALL,
            unresolved: true,
        },
    };
    out.content = Some(content_answer(request, info, &touch, &access, &mailbox));
    if touch.unresolved {
        out.notes.push(
            "data types unresolved: the proxy may know these IDs from earlier answers; explain does not"
                .into(),
        );
    }
    let c = Content {
        request,
        info,
        touch,
        access: &access,
        token_item: req.token_item.as_deref(),
        roots: request.attachments.iter().map(|_| None).collect(),
    };
    let mut s = subject.clone();
    s.content = Some(c.clone());
    let decision = rules::decide_among_traced(rules_, enforced, &s, &mut trace);
    out.rules = trace.lines(rules_, &s, Some(&c));
    let reason = |rule: Option<&str>| match rule {
        Some(name) => format!("denied by rule {name}"),
        None => rules::default_deny_reason(&c),
    };
    if rules_.iter().any(|r| r.report) {
        let report = rules::candidates(rules_, subject, Pass::Report);
        let r = rules::decide_among(rules_, &report, &s);
        if r.action != decision.action {
            out.report = Some(match r.action {
                Action::Allow => Verdict::new("allow", r.rule, "forwarded"),
                Action::Deny => {
                    let why = reason(r.rule.as_deref());
                    Verdict::new("deny", r.rule, why)
                }
            });
        }
    }
    if decision.action == Action::Deny {
        let mut v = Verdict::refused(500, Some("policy"), reason(decision.rule.as_deref()));
        v.rule = decision.rule.map(|r| r.to_string());
        return v;
    }
    if decision.inspect.is_some() {
        out.notes.push(
            "Exchange's answer is read under the rule: items or folders outside it are withheld"
                .into(),
        );
    }
    Verdict::new("allow", decision.rule, "forwarded")
}

fn content_answer(
    request: &soap::Request,
    info: Option<OpInfo>,
    touch: &Touch,
    access: &content::Access,
    mailbox: &str,
) -> ContentAnswer {
    ContentAnswer {
        operation: request.operation.clone(),
        class: info.map(|i| class_name(i.class).to_string()),
        data: if touch.unresolved {
            "unresolved".into()
        } else {
            touch.data.to_string()
        },
        mailbox: Some(mailbox.to_string()).filter(|m| !m.is_empty()),
        items: request.item_count(),
        impersonation: access.impersonation.is_some(),
        delegate: access.delegate.clone(),
    }
}

fn other_path_verdict(req: &Request, action: Action, rule: Option<Arc<str>>) -> Verdict {
    if action == Action::Allow {
        return Verdict::new("allow", rule, "forwarded");
    }
    let reason = match &rule {
        Some(name) => format!("denied by rule {name}"),
        None if paths::under_ews(&req.path) => "ews_path_not_named_by_a_rule".into(),
        None => "no_rule_matched".into(),
    };
    let mut v = Verdict::refused(403, Some("policy"), reason);
    v.rule = rule.map(|r| r.to_string());
    v
}

fn first_allow(rules_: &[Rule], candidates: &[usize]) -> Option<Arc<str>> {
    candidates
        .iter()
        .filter_map(|&i| rules_.get(i))
        .find(|r| r.action == Action::Allow)
        .map(|r| r.name.clone())
}

/// The operation, a sending one counted as `send`, as the body filter counts it.
fn operation(request: &soap::Request) -> Option<OpInfo> {
    ews::operation(&request.operation).map(|mut i| {
        if request.sends() {
            i.class = OpClass::Send;
        }
        i
    })
}

fn class_name(c: OpClass) -> &'static str {
    OpClass::ALL
        .iter()
        .find(|(_, k)| *k == c)
        .map_or("?", |(n, _)| n)
}

/// A SOAP request for `op` naming `folder` or `item`, parsed afterwards by the same parser
/// as a real one.
pub fn synthesize(op: &str, folder: Option<&str>, item: Option<&str>) -> String {
    let mut args = String::new();
    if let Some(f) = folder {
        let id = if content::distinguished(f).is_some() || content::is_root(f) {
            format!("<t:DistinguishedFolderId Id=\"{}\"/>", escape(f))
        } else {
            format!("<t:FolderId Id=\"{}\"/>", escape(f))
        };
        let wrapper = match op {
            "GetFolder" | "EmptyFolder" | "DeleteFolder" => "FolderIds",
            "SyncFolderItems" | "SyncFolderHierarchy" => "SyncFolderId",
            _ => "ParentFolderIds",
        };
        let _ = write!(args, "<m:{wrapper}>{id}</m:{wrapper}>");
    }
    if let Some(i) = item {
        let _ = write!(
            args,
            "<m:ItemIds><t:ItemId Id=\"{}\"/></m:ItemIds>",
            escape(i)
        );
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\
<soap:Envelope xmlns:soap=\"{SOAP_NS}\" xmlns:t=\"{TYPES_NS}\" xmlns:m=\"{MESSAGES_NS}\">\
<soap:Body><m:{op}>{args}</m:{op}></soap:Body></soap:Envelope>"
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// What the rule walk said about each rule, in order.
struct Recorder {
    steps: Vec<Vec<Step>>,
}

impl Recorder {
    fn new(n: usize) -> Recorder {
        Recorder {
            steps: vec![Vec::new(); n],
        }
    }

    fn lines(&self, rules_: &[Rule], s: &Subject, c: Option<&Content>) -> Vec<RuleLine> {
        rules_
            .iter()
            .zip(&self.steps)
            .map(|(r, steps)| {
                let (outcome, condition) = match steps.last() {
                    None => ("not-reached", "an earlier rule decided".to_string()),
                    Some(Step::ReportOnly) => (
                        "report-only",
                        "mode = \"report\": judged for the audit line's report, not enforced"
                            .into(),
                    ),
                    Some(Step::Head(m)) | Some(Step::Content(m)) => ("failed", miss(*m, r, s, c)),
                    Some(Step::Candidate) => (
                        "candidate",
                        "its head matched; an earlier candidate decided".into(),
                    ),
                    Some(Step::NeedsContent) => (
                        "needs-body",
                        "judges the SOAP body, which this request has none of".into(),
                    ),
                    Some(Step::Matched { provisional }) => ("matched", matched(r, *provisional)),
                };
                RuleLine {
                    name: r.name.to_string(),
                    line: r.line,
                    action: action_name(r.action).into(),
                    report_only: r.report,
                    outcome: outcome.into(),
                    condition,
                }
            })
            .collect()
    }
}

impl Trace for Recorder {
    fn note(&mut self, rule: usize, step: Step) {
        if let Some(s) = self.steps.get_mut(rule) {
            s.push(step);
        }
    }
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Allow => "allow",
        Action::Deny => "deny",
    }
}

fn list<T: AsRef<str>>(items: &[T]) -> String {
    let v: Vec<&str> = items.iter().map(AsRef::as_ref).collect();
    format!("[{}]", v.join(", "))
}

/// The condition that failed, with the rule's value and the request's.
fn miss(m: Miss, r: &Rule, s: &Subject, c: Option<&Content>) -> String {
    let or_none = |v: Option<&str>| v.unwrap_or("none").to_string();
    match m {
        Miss::Group => format!(
            "groups = {} (source group: {})",
            list(&r.groups),
            or_none(s.group)
        ),
        Miss::Auth => format!(
            "auth = {} (request: {})",
            list(&r.auth.iter().map(|a| a.name()).collect::<Vec<_>>()),
            s.auth.name()
        ),
        Miss::Token => format!(
            "token = {} (request: {})",
            list(&r.token.iter().map(|t| t.name()).collect::<Vec<_>>()),
            or_none(s.token.map(|t| t.name()))
        ),
        Miss::Path if r.judges_content() => {
            format!(
                "judges EWS content, so only {} (request: {})",
                paths::EWS,
                s.path
            )
        }
        Miss::Path if r.paths.is_empty() => {
            format!("no paths: only {} (request: {})", paths::EWS, s.path)
        }
        Miss::Path => format!("paths = {} (request: {})", list(&r.paths), s.path),
        Miss::User => format!("users = {} (user: {})", list(&r.users), or_none(s.user)),
        Miss::Day => format!("days = {} (day: {})", days(r.days), local_time(s.when)),
        Miss::Hours => format!(
            "hours = {} (time: {})",
            r.hours.map_or("any".into(), hours),
            local_time(s.when)
        ),
        Miss::Operation => format!(
            "operations = {} (operation: {})",
            operations(r),
            c.map_or("none".into(), |c| c.request.operation.clone())
        ),
        Miss::Impersonation => "impersonation needs access = [\"impersonation\"]".into(),
        Miss::Delegate => format!(
            "access to mailbox {} needs access = [\"delegate\"]",
            c.and_then(|c| c.access.delegate.as_deref()).unwrap_or("?")
        ),
        Miss::TokenScope => {
            "scope = \"token-item\": the request names items or folders outside the token's item"
                .into()
        }
        Miss::Data => format!(
            "data = {} (request touches: {})",
            r.data.map_or("any".into(), |d| d.to_string()),
            c.map_or("?".into(), |c| if c.touch.unresolved {
                "unresolved".into()
            } else {
                c.touch.data.to_string()
            })
        ),
    }
}

fn matched(r: &Rule, provisional: bool) -> String {
    let mut parts = Vec::new();
    if !r.groups.is_empty() {
        parts.push(format!("groups = {}", list(&r.groups)));
    }
    if !r.auth.is_empty() {
        parts.push(format!(
            "auth = {}",
            list(&r.auth.iter().map(|a| a.name()).collect::<Vec<_>>())
        ));
    }
    if !r.token.is_empty() {
        parts.push(format!(
            "token = {}",
            list(&r.token.iter().map(|t| t.name()).collect::<Vec<_>>())
        ));
    }
    if !r.users.is_empty() {
        parts.push(format!("users = {}", list(&r.users)));
    }
    if let Some(h) = r.hours {
        parts.push(format!("hours = {}", hours(h)));
    }
    if !r.operations.is_empty() {
        parts.push(format!("operations = {}", operations(r)));
    }
    if let Some(d) = r.data {
        parts.push(format!("data = {d}"));
    }
    if r.scope == Some(Scope::TokenItem) {
        parts.push("scope = token-item".into());
    }
    let mut text = if parts.is_empty() {
        "every condition (the rule names none)".into()
    } else {
        parts.join(", ")
    };
    if provisional {
        text.push_str("; provisionally: Exchange's answer shows the data types");
    }
    text
}

fn operations(r: &Rule) -> String {
    let names: Vec<String> = r
        .operations
        .iter()
        .map(|m| match m {
            OpMatch::Name(n) => n.clone(),
            OpMatch::Class(k) => class_name(*k).into(),
        })
        .collect();
    if names.is_empty() {
        "any unrestricted".into()
    } else {
        list(&names)
    }
}

fn hours((from, to): (u16, u16)) -> String {
    format!(
        "{:02}:{:02}-{:02}:{:02}",
        from / 60,
        from % 60,
        to / 60,
        to % 60
    )
}

fn days(bits: u8) -> String {
    const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let on: Vec<&str> = DAYS
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, d)| *d)
        .collect();
    list(&on)
}

/// The explanation as text, for a terminal.
pub fn text(e: &Explanation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "explained against {}", e.against);
    let _ = writeln!(
        s,
        "request      {} ({}) -> {}, POST {}, auth {}{}",
        e.source,
        e.group.as_deref().unwrap_or("no group"),
        e.destination,
        e.path,
        e.auth,
        e.user
            .as_deref()
            .map_or(String::new(), |u| format!(", user {u}"))
    );
    if let Some(p) = &e.packet {
        let _ = writeln!(
            s,
            "packet       {}{} ({}) by {}",
            p.action.to_uppercase(),
            if p.monitor {
                " (monitor: would drop)"
            } else {
                ""
            },
            p.reason,
            p.by
        );
        if !p.also_moved.is_empty() {
            let _ = writeln!(
                s,
                "             (live traffic moved {} in the same instant)",
                p.also_moved.join(", ")
            );
        }
    }
    if !e.time.is_empty() {
        let _ = writeln!(s, "time         {} (the gate's local time)", e.time);
    }
    if let Some(t) = &e.token {
        let _ = writeln!(
            s,
            "token        {}{}{}{}",
            t.verdict,
            t.reason
                .as_deref()
                .map_or(String::new(), |r| format!(": {r}")),
            t.family
                .as_deref()
                .map_or(String::new(), |f| format!(", {f}")),
            t.item
                .as_deref()
                .map_or(String::new(), |i| format!(", item {i}"))
        );
    }
    if let Some(c) = &e.content {
        let _ = writeln!(
            s,
            "content      {} ({}), data {}, mailbox {}, {} ids{}{}",
            c.operation,
            c.class.as_deref().unwrap_or("unknown operation"),
            c.data,
            c.mailbox.as_deref().unwrap_or("-"),
            c.items,
            if c.impersonation {
                ", impersonation"
            } else {
                ""
            },
            c.delegate
                .as_deref()
                .map_or(String::new(), |d| format!(", delegate access to {d}"))
        );
    }
    if !e.rules.is_empty() {
        let _ = writeln!(s, "rules");
    }
    for (i, r) in e.rules.iter().enumerate() {
        let _ = writeln!(
            s,
            "  {}. {} ({}, line {}){}: {} - {}",
            i + 1,
            r.name,
            r.action,
            r.line,
            if r.report_only { " [report]" } else { "" },
            r.outcome,
            r.condition
        );
    }
    for n in &e.notes {
        let _ = writeln!(s, "note         {n}");
    }
    if let Some(r) = &e.report {
        let _ = writeln!(
            s,
            "report       {} (rule {}): {}",
            r.decision,
            r.rule.as_deref().unwrap_or("-"),
            r.reason
        );
    }
    let v = &e.verdict;
    let _ = writeln!(
        s,
        "verdict      {} (rule {}{}{}): {}",
        v.decision.to_uppercase(),
        v.rule.as_deref().unwrap_or("-"),
        v.status.map_or(String::new(), |st| format!(", HTTP {st}")),
        v.failure
            .as_deref()
            .map_or(String::new(), |f| format!(", {f} failure")),
        v.reason
    );
    let _ = writeln!(s, "audit        {}", e.audit);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::settings::SoapLimits;

    #[test]
    fn synthesized_requests_parse_as_the_proxy_parses_them() {
        let body = synthesize("FindItem", Some("inbox"), None);
        let r = soap::parse_request(body.as_bytes(), true, SoapLimits::default()).unwrap();
        assert_eq!(r.operation, "FindItem");
        assert_eq!(
            r.folders,
            vec![soap::Folder::Distinguished {
                id: "inbox".into(),
                mailbox: None
            }]
        );
        let body = synthesize("GetItem", None, Some("AAMk\"<&>"));
        let r = soap::parse_request(body.as_bytes(), true, SoapLimits::default()).unwrap();
        assert_eq!(r.items, vec!["AAMk\"<&>".to_string()]);
        let body = synthesize("GetFolder", Some("F-opaque"), None);
        let r = soap::parse_request(body.as_bytes(), true, SoapLimits::default()).unwrap();
        assert_eq!(r.folders, vec![soap::Folder::Opaque("F-opaque".into())]);
    }

    #[test]
    fn questions_are_checked_before_anything_is_judged() {
        let q = |f: fn(&mut Query)| {
            let mut q = Query {
                source: "198.51.100.10".parse().ok(),
                auth: "basic".into(),
                ..Query::default()
            };
            f(&mut q);
            q.check().map(|_| ())
        };
        assert!(q(|_| {}).is_ok());
        assert!(q(|q| q.auth = "password".into()).is_err());
        assert!(q(|q| q.source = None).is_err());
        assert!(q(|q| q.folder = Some("inbox".into())).is_err());
        assert!(q(|q| q.operation = Some("Find Item".into())).is_err());
        assert!(q(|q| {
            q.operation = Some("FindItem".into());
            q.soap = Some(String::new());
        })
        .is_err());
        assert!(q(|q| q.token = Some("x".into())).is_err());
        assert!(q(|q| q.soap = Some("x".repeat(MAX_SOAP + 1))).is_err());
    }

    #[test]
    fn a_config_that_is_not_running_is_judged_by_its_groups() {
        let text = r#"
[[protect]]
address = "192.0.2.10"
ports = ["tcp/443"]
[sources.offices]
cidrs = ["198.51.100.0/25"]
"#;
        let c = Config::parse(std::path::Path::new("/etc/ewsgate/t.toml"), text).unwrap();
        let v = config_verdict(&c, "198.51.100.10".parse().unwrap());
        assert_eq!(
            (v.action.as_str(), v.reason.as_str()),
            ("pass", "allow_group")
        );
        let v = config_verdict(&c, "203.0.113.50".parse().unwrap());
        assert_eq!(
            (v.action.as_str(), v.reason.as_str()),
            ("drop", "drop_not_allowed")
        );
        let v = config_verdict(&c, "2001:db8::1".parse().unwrap());
        assert_eq!(v.reason, "not_bound");
        assert_eq!(
            destination(&c, "198.51.100.10".parse().unwrap()),
            Some(("192.0.2.10".parse().unwrap(), 443))
        );
    }
}
