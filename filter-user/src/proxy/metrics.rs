//! The request layer's metrics and the `/metrics` endpoint.
//!
//! The proxy serves `GET /metrics` on the socket the agent bound for `[metrics] listen`
//! (the agent is root and owns every socket; it parses nothing from the network, so the
//! HTTP server lives here). The packet layer's part comes from the agent over the typed
//! link (`ToAgent::Metrics`), within a deadline; without an answer the scrape still
//! succeeds, with `ewsgate_agent_up 0`. The proxy never holds a BPF map.
//!
//! Each request is recorded once, in the logging phase, from its context. Label values are
//! bounded by the config: rule and group names, auth kinds, operation classes, data types,
//! verdicts, refusal reasons (the code's own reason keys; free text becomes `other`). No
//! address and no user is ever a label. Names are interned once (when a policy comes in)
//! into `&'static str`, so recording a request formats nothing and allocates nothing once
//! its label combination has been seen.

use std::{
    collections::HashMap,
    convert::Infallible,
    fmt::Write as _,
    hash::{BuildHasherDefault, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock, RwLock,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{text::encode_registry, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tokio::{
    net::TcpListener,
    sync::{oneshot, Semaphore},
};
use tracing::{info, warn};

use crate::{
    identity::stats,
    ipc::ToAgent,
    model::{
        ews::OpClass,
        outcome::{Decision, FailureClass},
        Config,
    },
    proxy::{context::Ctx, Shared},
};

/// The OpenMetrics text exposition (what prometheus-client writes; Prometheus reads it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// How long a scrape waits for the agent's packet-layer part.
pub const AGENT_DEADLINE: Duration = Duration::from_secs(2);
/// Distinct label values kept at most, all names together; past it, `other`.
const MAX_NAMES: usize = 4096;
/// Scrapes served at once; more wait.
const MAX_SCRAPES: usize = 4;
/// A scrape connection's whole life, request and answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
const OTHER: &str = "other";
const NONE: &str = "none";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub rule: &'static str,
    pub group: &'static str,
    pub auth: &'static str,
    pub op_class: &'static str,
    pub data: &'static str,
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: &'static str,
    pub failure: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DetectionLabel {
    detection: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Hashes a word at a time by add-and-multiply (FxHash's step, as rustc-hash 2 does it):
/// a few instructions a word where the standard SipHash spends tens. Only for keys the
/// process bounds itself (label values, their addresses), never for what a client sends.
#[derive(Default, Clone, Copy)]
struct WordHasher(u64);

impl WordHasher {
    fn add(&mut self, word: u64) {
        self.0 = self
            .0
            .wrapping_add(word)
            .wrapping_mul(0xf135_7aea_2e62_a9c5);
    }
}

impl Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        let (words, rest) = bytes.as_chunks::<8>();
        for w in words {
            self.add(u64::from_ne_bytes(*w));
        }
        let mut last = [0u8; 8];
        for (to, from) in last.iter_mut().zip(rest) {
            *to = *from;
        }
        // The length too, so that trailing zero bytes still count.
        self.add(u64::from_ne_bytes(last) ^ (rest.len() as u64) << 59);
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        // The multiply leaves the low bits, which pick the bucket, the weakest.
        self.0.rotate_left(26)
    }
}

type Fast = BuildHasherDefault<WordHasher>;

/// A label value's address and length. Every label value is a `&'static str`, interned or
/// a literal, never freed or changed: the same address and length are the same text.
fn addr(s: &'static str) -> (usize, usize) {
    (s.as_ptr() as usize, s.len())
}

/// A request's label values by address.
type RequestKey = [(usize, usize); 6];

impl RequestLabels {
    fn key(&self) -> RequestKey {
        [
            addr(self.rule),
            addr(self.group),
            addr(self.auth),
            addr(self.op_class),
            addr(self.data),
            addr(self.verdict),
        ]
    }
}

/// Label values seen so far, each leaked once as a `&'static str` (at most `MAX_NAMES`).
#[derive(Default)]
struct Names {
    known: RwLock<HashMap<Box<str>, &'static str, Fast>>,
}

impl Names {
    fn get(&self, name: &str) -> &'static str {
        if let Some(v) = self.known.read().ok().and_then(|m| m.get(name).copied()) {
            return v;
        }
        let Ok(mut known) = self.known.write() else {
            return OTHER;
        };
        if let Some(v) = known.get(name) {
            return v;
        }
        if known.len() >= MAX_NAMES {
            return OTHER;
        }
        let leaked: &'static str = Box::leak(Box::from(name));
        known.insert(Box::from(name), leaked);
        leaked
    }
}

/// The request layer's metrics, shared by every connection.
pub struct ProxyMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    request_seconds: Family<VerdictLabel, Histogram>,
    upstream_seconds: Histogram,
    inspected: Family<DirectionLabel, Counter>,
    detections: Family<DetectionLabel, Counter>,
    connections: Gauge,
    /// `requests`' counters by their labels' addresses (at most `MAX_NAMES`): a request
    /// labelled like an earlier one finds its counter without the family hashing six
    /// label texts with SipHash, which was half of recording a request.
    request_counters: RwLock<HashMap<RequestKey, Counter, Fast>>,
    /// `request_seconds`' histogram for each verdict (`verdict_index`), once it has one.
    seconds_by_verdict: [OnceLock<Histogram>; 3],
    /// `inspected`'s counters for `request` and `response`, once they have one.
    inspected_request: OnceLock<Counter>,
    inspected_response: OnceLock<Counter>,
    names: Names,
    /// Scrapes waiting for the agent's part, by id.
    waiting: Mutex<HashMap<u64, oneshot::Sender<String>>>,
    next_scrape: AtomicU64,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics::new()
    }
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    // 1 ms to about 33 s.
    exponential_buckets(0.001, 2.0, 16)
}

impl ProxyMetrics {
    pub fn new() -> ProxyMetrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let refusals = Family::<RefusalLabels, Counter>::default();
        let request_seconds = Family::<VerdictLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(seconds_buckets())
        });
        let upstream_seconds = Histogram::new(seconds_buckets());
        let inspected = Family::<DirectionLabel, Counter>::default();
        let detections = Family::<DetectionLabel, Counter>::default();
        let connections = Gauge::default();
        registry.register(
            "ewsgate_requests",
            "Requests judged, by rule, source group, auth kind, operation class, data types and verdict",
            requests.clone(),
        );
        registry.register(
            "ewsgate_refusals",
            "Requests and connections refused, by reason and failure class",
            refusals.clone(),
        );
        registry.register(
            "ewsgate_request_duration_seconds",
            "Time from a request's first byte to its audit line, by verdict",
            request_seconds.clone(),
        );
        registry.register(
            "ewsgate_upstream_duration_seconds",
            "Time Exchange took to answer a forwarded request's head",
            upstream_seconds.clone(),
        );
        registry.register(
            "ewsgate_inspected_bytes",
            "Bytes the content policy read, request bodies and answers read whole",
            inspected.clone(),
        );
        registry.register(
            "ewsgate_detections",
            "Detections fired, by detection",
            detections.clone(),
        );
        registry.register(
            "ewsgate_connections_open",
            "Client connections open at the request layer",
            connections.clone(),
        );
        ProxyMetrics {
            registry,
            requests,
            refusals,
            request_seconds,
            upstream_seconds,
            inspected,
            detections,
            connections,
            request_counters: RwLock::default(),
            seconds_by_verdict: Default::default(),
            inspected_request: OnceLock::new(),
            inspected_response: OnceLock::new(),
            names: Names::default(),
            waiting: Mutex::new(HashMap::new()),
            next_scrape: AtomicU64::new(1),
        }
    }

    /// Interns the names a config can put in labels, so that requests find them ready, and
    /// shows every enabled detection at 0 (a series that appears only when it first fires
    /// would hide its first increase from `rate` and `increase`).
    pub fn prime(&self, config: &Config) {
        for r in &config.rules {
            self.names.get(&r.name);
        }
        for g in &config.groups {
            self.names.get(&g.name);
        }
        let detections = &config.ops.detections;
        for rule in detections
            .rules
            .iter()
            .filter(|r| detections.enabled && r.enabled)
        {
            let _ = self.detections.get_or_create(&DetectionLabel {
                detection: rule.kind.name(),
            });
        }
    }

    /// The label values of one request, all bounded (see the module's comment).
    pub fn request_labels(&self, ctx: &Ctx) -> RequestLabels {
        RequestLabels {
            rule: ctx.rule.as_deref().map_or(NONE, |r| self.names.get(r)),
            group: ctx
                .conn
                .group
                .as_deref()
                .map_or(NONE, |g| self.names.get(g)),
            auth: ctx.auth.name(),
            op_class: ctx.op_class.map_or(NONE, op_class_name),
            data: ctx.data.as_deref().map_or(NONE, |d| self.data_label(d)),
            verdict: ctx.decision.name(),
        }
    }

    /// Data types are names from a fixed list joined by commas, or `unresolved`.
    fn data_label(&self, data: &str) -> &'static str {
        let known = data == "unresolved"
            || data.split(',').all(|t| {
                crate::model::ews::DataSet::NAMES
                    .iter()
                    .any(|(n, _)| *n == t)
            });
        match known {
            true => self.names.get(data),
            false => OTHER,
        }
    }

    /// A refusal's reason as a label: the code's own key (`head_timeout`, `token_expired`,
    /// the part before `:` in `path: ...`), never the free text after it. A policy denial's
    /// text names operations and rules; it is counted as `policy`.
    pub fn reason_label(&self, reason: &str, failure: Option<FailureClass>) -> &'static str {
        let key = reason.split(':').next().unwrap_or("").trim();
        let is_key = !key.is_empty()
            && key.len() <= 48
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        match (is_key, failure) {
            (true, _) => self.names.get(key),
            (false, Some(FailureClass::Policy)) => "policy",
            (false, _) => OTHER,
        }
    }

    /// Records one request that took `elapsed`, from the logging phase.
    pub fn record(&self, ctx: &Ctx, elapsed: Duration) {
        let labels = self.request_labels(ctx);
        self.count_request(&labels);
        self.request_seconds(ctx.decision)
            .observe(elapsed.as_secs_f64());
        if let Some(ms) = ctx.upstream_ms {
            self.upstream_seconds.observe(ms / 1000.0);
        }
        if ctx.inspected_request > 0 {
            self.inspected(&self.inspected_request, "request")
                .inc_by(ctx.inspected_request);
        }
        if ctx.inspected_response > 0 {
            self.inspected(&self.inspected_response, "response")
                .inc_by(ctx.inspected_response);
        }
        if ctx.decision == Decision::Deny {
            self.refusal(&ctx.reason, ctx.failure);
        }
    }

    /// Counts a request in `ewsgate_requests`: from the counter kept for its labels'
    /// addresses, or from the family (which keeps every series) the first time.
    fn count_request(&self, labels: &RequestLabels) {
        let key = labels.key();
        let counted = match self.request_counters.read() {
            Ok(known) => known.get(&key).map(Counter::inc).is_some(),
            Err(_) => false,
        };
        if counted {
            return;
        }
        let counter = self.requests.get_or_create_owned(labels);
        counter.inc();
        if let Ok(mut known) = self.request_counters.write() {
            if known.len() < MAX_NAMES {
                known.insert(key, counter);
            }
        }
    }

    /// The verdict's histogram, made in the family the first time a request has it, so
    /// that the exposition shows only verdicts seen (as the family alone did).
    fn request_seconds(&self, decision: Decision) -> &Histogram {
        let slot = &self.seconds_by_verdict[verdict_index(decision)];
        slot.get_or_init(|| {
            self.request_seconds.get_or_create_owned(&VerdictLabel {
                verdict: decision.name(),
            })
        })
    }

    fn inspected<'a>(&self, slot: &'a OnceLock<Counter>, direction: &'static str) -> &'a Counter {
        slot.get_or_init(|| {
            self.inspected
                .get_or_create_owned(&DirectionLabel { direction })
        })
    }

    /// A refusal, of a request or of a connection before any request.
    pub fn refusal(&self, reason: &str, failure: Option<FailureClass>) {
        let labels = RefusalLabels {
            reason: self.reason_label(reason, failure),
            failure: failure.map_or("service", FailureClass::name),
        };
        self.refusals.get_or_create(&labels).inc();
    }

    /// A detection fired (its name is one of the daemon's fixed detections).
    pub fn detection(&self, name: &'static str) {
        self.detections
            .get_or_create(&DetectionLabel { detection: name })
            .inc();
    }

    /// Counts a client connection open until the guard drops.
    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.inc();
        ConnectionGuard(self.clone())
    }

    /// The request layer's exposition (no `# EOF`): the recorded metrics, then what is read
    /// at scrape time (token cache, key fetches, the audit's lag).
    pub fn encode(&self, audit: &AuditLag) -> String {
        let mut out = String::new();
        let _ = encode_registry(&mut out, &self.registry);
        let mut now = Registry::default();
        let counter = |n: u64| {
            let c = Counter::<u64>::default();
            c.inc_by(n);
            c
        };
        let gauge = |n: usize| {
            let g = Gauge::<i64>::default();
            g.set(i64::try_from(n).unwrap_or(i64::MAX));
            g
        };
        now.register(
            "ewsgate_token_cache_hits",
            "Bearer tokens answered from the token cache",
            counter(stats::read(&stats::TOKEN_CACHE_HITS)),
        );
        now.register(
            "ewsgate_token_cache_misses",
            "Bearer tokens checked in full (signature and claims)",
            counter(stats::read(&stats::TOKEN_CACHE_MISSES)),
        );
        let fetches = Family::<ResultLabel, Counter>::default();
        fetches
            .get_or_create(&ResultLabel { result: "ok" })
            .inc_by(stats::read(&stats::KEY_FETCHES_OK));
        fetches
            .get_or_create(&ResultLabel { result: "failed" })
            .inc_by(stats::read(&stats::KEY_FETCHES_FAILED));
        now.register(
            "ewsgate_key_fetches",
            "Signing-key documents fetched (Exchange metadata, Entra discovery), by result",
            fetches,
        );
        now.register(
            "ewsgate_audit_backlog_bytes",
            "Audit bytes written by requests and not yet on disk (the audit lag)",
            gauge(audit.backlog),
        );
        now.register(
            "ewsgate_audit_backlog_limit_bytes",
            "The audit backlog past which new requests are refused (audit_backlog_bytes)",
            gauge(audit.limit),
        );
        let ratio = |v: f64| {
            let g = Gauge::<f64, AtomicU64>::default();
            g.set(v);
            g
        };
        now.register(
            "ewsgate_audit_sink_lag_seconds",
            "Age of the oldest line queued for the slowest journald or syslog sink (0: none queued)",
            ratio(audit.sink_oldest_secs),
        );
        now.register(
            "ewsgate_audit_sink_fill_ratio",
            "Fill of the fullest journald or syslog sink queue (at 0.9 requests are refused)",
            ratio(audit.sink_fill),
        );
        let _ = encode_registry(&mut out, &now);
        out
    }

    /// Registers a scrape waiting for the agent's part.
    fn wait_agent(&self) -> (u64, oneshot::Receiver<String>) {
        let id = self.next_scrape.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(id, tx);
        }
        (id, rx)
    }

    fn forget(&self, id: u64) {
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(&id);
        }
    }

    /// The agent's answer to scrape `id` (an answer nobody waits for is dropped).
    pub fn agent_answered(&self, id: u64, text: String) {
        let waiter = self.waiting.lock().ok().and_then(|mut w| w.remove(&id));
        if let Some(tx) = waiter {
            let _ = tx.send(text);
        }
    }
}

/// The audit's state at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuditLag {
    /// Bytes of the file sink's backlog, and the limit past which requests are refused.
    pub backlog: usize,
    pub limit: usize,
    /// The other sinks' worst queue: its fill (0 to 1) and its oldest line's age.
    pub sink_fill: f64,
    pub sink_oldest_secs: f64,
}

/// Keeps `ewsgate_connections_open` up while a connection lives.
pub struct ConnectionGuard(Arc<ProxyMetrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}

fn verdict_index(decision: Decision) -> usize {
    match decision {
        Decision::Allow => 0,
        Decision::Deny => 1,
        Decision::WouldDeny => 2,
    }
}

fn op_class_name(class: OpClass) -> &'static str {
    OpClass::ALL
        .iter()
        .find(|(_, c)| *c == class)
        .map_or(OTHER, |(n, _)| n)
}

/// The whole exposition: the request layer's part, the agent's (within the deadline), and
/// `ewsgate_agent_up`.
pub async fn scrape(shared: &Shared) -> String {
    let sinks = shared.ops.lag();
    let audit = AuditLag {
        backlog: shared.audit.backlog(),
        limit: shared.state.load().settings.limits.audit_backlog,
        sink_fill: sinks.as_ref().map_or(0.0, |l| l.fill),
        sink_oldest_secs: sinks.map_or(0.0, |l| l.oldest.as_secs_f64()),
    };
    let mut out = shared.metrics.encode(&audit);
    let agent = ask_agent(shared).await;
    let up = agent.is_some();
    if let Some(text) = agent {
        // The agent's part is complete OpenMetrics without its own `# EOF`.
        out.push_str(text.trim_end_matches("# EOF\n"));
    }
    let _ = writeln!(
        out,
        "# HELP ewsgate_agent_up Whether the agent answered this scrape with the packet layer's metrics\n# TYPE ewsgate_agent_up gauge\newsgate_agent_up {}",
        u8::from(up)
    );
    out.push_str("# EOF\n");
    out
}

async fn ask_agent(shared: &Shared) -> Option<String> {
    let writer = shared.link.writer()?;
    let (id, rx) = shared.metrics.wait_agent();
    let asked = writer.send(&ToAgent::Metrics { id }, &[]).await.is_ok();
    let answer = match asked {
        true => tokio::time::timeout(AGENT_DEADLINE, rx).await.ok()?.ok(),
        false => None,
    };
    shared.metrics.forget(id);
    answer
}

/// Serves `GET /metrics` on the agent's socket for the proxy's life.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    info!(addr = ?listener.local_addr().ok(), "metrics listening");
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "metrics accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| answer(shared.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, conn).await;
        });
    }
}

async fn answer(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: String, kind: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(kind),
        );
        Ok(r)
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".into(),
            "text/plain",
        );
    }
    reply(StatusCode::OK, scrape(&shared).await, CONTENT_TYPE)
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, net::SocketAddr};

    use super::*;
    use crate::{
        model::auth::AuthKind,
        proxy::context::{ConnInfo, Ctx},
    };

    fn ctx(i: usize, reason: &str) -> Ctx {
        let peer: SocketAddr = format!("198.51.100.{}:{}", i % 250, 40000 + i)
            .parse()
            .unwrap();
        let conn = Arc::new(ConnInfo {
            id: i as u64,
            peer,
            group: Some(Arc::from(["offices", "salesforce"][i % 2])),
            client_cert: None,
        });
        let mut c = Ctx::new(conn);
        c.auth = [AuthKind::Basic, AuthKind::Bearer, AuthKind::Ntlm][i % 3];
        c.user = Some(format!("user{i}@example.org").into());
        c.rule = i.is_multiple_of(4).then(|| Arc::from("office-basic"));
        c.op_class = Some(OpClass::Read);
        c.data = Some(["calendar,contacts", "unresolved", "<script>", "email"][i % 4].into());
        c.decision = match (i / 6) % 3 {
            0 => Decision::Allow,
            _ => Decision::Deny,
        };
        c.reason = reason.to_string().into();
        c.failure = Some(FailureClass::Policy);
        c.upstream_ms = Some(1.5);
        c.inspected_request = 100;
        c
    }

    /// Every line is a comment the format knows or `name{label="value",...} number`.
    /// A sample: its name, its labels, its value.
    type Sample = (String, Vec<(String, String)>, f64);

    fn parse(text: &str) -> Vec<Sample> {
        let mut samples = Vec::new();
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in text.lines() {
            if line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let kind = parts.next().unwrap();
                assert!(["HELP", "TYPE", "UNIT"].contains(&kind), "{line}");
                assert!(parts.next().unwrap().starts_with("ewsgate_"), "{line}");
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect(line);
            let value: f64 = value.parse().expect(line);
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.strip_suffix('}').expect(line)),
                None => (series, ""),
            };
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
                "{line}"
            );
            samples.push((name.to_string(), label_pairs(labels, line), value));
        }
        samples
    }

    /// `k="v",k2="v2"`, with the format's escapes (`\\`, `\"`, `\n`) inside values.
    fn label_pairs(mut rest: &str, line: &str) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"").expect(line);
            assert!(
                key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "{line}"
            );
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next().expect(line) {
                    (_, '\\') => match chars.next().expect(line).1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            pairs.push((key.to_string(), value));
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        pairs
    }

    #[test]
    fn the_exposition_parses_and_its_labels_name_no_user_and_no_address() {
        let m = ProxyMetrics::new();
        let reasons = [
            "no_rule_matched",
            "no rule allows FindItem on email",
            "path: double escape in /ews/%252e",
            "identity_refused: detection failure-burst-user for 203.0.113.9",
            "token_expired",
            "GetItem names items outside the callback token's scope",
        ];
        for i in 0..600 {
            m.record(
                &ctx(i, reasons[i % reasons.len()]),
                Duration::from_millis(1),
            );
        }
        m.refusal("head_timeout", Some(FailureClass::Protocol));
        m.detection("password-spray");
        let mut text = m.encode(&AuditLag {
            backlog: 10,
            limit: 64 << 20,
            ..Default::default()
        });
        text.push_str("# EOF\n");
        let samples = parse(&text);
        let mut values: BTreeSet<(String, String)> = BTreeSet::new();
        for (_, labels, _) in &samples {
            for (k, v) in labels {
                assert!(!v.contains('@') && !v.contains("198.51.100."), "{k}={v}");
                assert!(!v.contains("203.0.113."), "{k}={v}");
                values.insert((k.clone(), v.clone()));
            }
        }
        let of = |key: &str| -> BTreeSet<&str> {
            values
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(
            of("reason"),
            BTreeSet::from([
                "head_timeout",
                "identity_refused",
                "no_rule_matched",
                "path",
                "policy",
                "token_expired"
            ])
        );
        assert_eq!(
            of("data"),
            BTreeSet::from(["calendar,contacts", "email", "other", "unresolved"])
        );
        assert_eq!(of("rule"), BTreeSet::from(["none", "office-basic"]));
        assert_eq!(of("group"), BTreeSet::from(["offices", "salesforce"]));
        let total: f64 = samples
            .iter()
            .filter(|(n, _, _)| n == "ewsgate_requests_total")
            .map(|(_, _, v)| v)
            .sum();
        assert_eq!(total, 600.0);
        let refused: f64 = samples
            .iter()
            .filter(|(n, _, _)| n == "ewsgate_refusals_total")
            .map(|(_, _, v)| v)
            .sum();
        let denied = (0..600).filter(|i| (i / 6) % 3 != 0).count();
        assert_eq!(refused, denied as f64 + 1.0);
        assert!(samples
            .iter()
            .any(|(n, _, v)| n == "ewsgate_upstream_duration_seconds_count" && *v == 600.0));
    }

    #[test]
    fn label_values_stay_bounded_whatever_the_reasons_say() {
        let m = ProxyMetrics::new();
        for i in 0..(MAX_NAMES + 500) {
            m.refusal(&format!("made_up_reason_{i}"), None);
        }
        let text = m.encode(&AuditLag::default());
        let reasons = text
            .lines()
            .filter(|l| l.starts_with("ewsgate_refusals_total{"))
            .count();
        assert!(reasons <= MAX_NAMES + 1, "{reasons} reason series");
        assert_eq!(m.names.get("yet_another"), OTHER);
    }
}
