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
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
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

/// `text/plain` exposition, OpenMetrics flavour (what prometheus-client writes).
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

/// Label values seen so far, each leaked once as a `&'static str` (at most `MAX_NAMES`).
#[derive(Default)]
struct Names {
    known: RwLock<HashMap<Box<str>, &'static str>>,
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
        let request_seconds =
            Family::<VerdictLabel, Histogram>::new_with_constructor(|| {
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
        for rule in detections.rules.iter().filter(|r| detections.enabled && r.enabled) {
            let _ = self.detections.get_or_create(&DetectionLabel {
                detection: rule.kind.name(),
            });
        }
    }

    /// The label values of one request, all bounded (see the module's comment).
    pub fn request_labels(&self, ctx: &Ctx) -> RequestLabels {
        RequestLabels {
            rule: ctx.rule.as_deref().map_or(NONE, |r| self.names.get(r)),
            group: ctx.conn.group.as_deref().map_or(NONE, |g| self.names.get(g)),
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

    /// Records one request, from the logging phase.
    pub fn record(&self, ctx: &Ctx) {
        let labels = self.request_labels(ctx);
        self.requests.get_or_create(&labels).inc();
        self.request_seconds
            .get_or_create(&VerdictLabel {
                verdict: labels.verdict,
            })
            .observe(ctx.started.elapsed().as_secs_f64());
        if let Some(ms) = ctx.upstream_ms {
            self.upstream_seconds.observe(ms / 1000.0);
        }
        if ctx.inspected_request > 0 {
            self.inspected("request", ctx.inspected_request);
        }
        if ctx.inspected_response > 0 {
            self.inspected("response", ctx.inspected_response);
        }
        if ctx.decision == Decision::Deny {
            self.refusal(&ctx.reason, ctx.failure);
        }
    }

    fn inspected(&self, direction: &'static str, bytes: u64) {
        self.inspected
            .get_or_create(&DirectionLabel { direction })
            .inc_by(bytes);
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
    /// at scrape time (token cache, key fetches, audit backlog).
    pub fn encode(&self, audit_backlog: usize, audit_limit: usize) -> String {
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
            gauge(audit_backlog),
        );
        now.register(
            "ewsgate_audit_backlog_limit_bytes",
            "The audit backlog past which new requests are refused (audit_backlog_bytes)",
            gauge(audit_limit),
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

/// Keeps `ewsgate_connections_open` up while a connection lives.
pub struct ConnectionGuard(Arc<ProxyMetrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.dec();
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
    let state = shared.state.load();
    let mut out = shared
        .metrics
        .encode(shared.audit.backlog(), state.settings.limits.audit_backlog);
    drop(state);
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
        r.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(kind));
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
