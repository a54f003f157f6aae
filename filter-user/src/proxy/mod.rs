//! The request layer: the flows XDP lets through end here. Each connection is TLS from the
//! client, strict HTTP/1.1 with streamed bodies, and its own upstream connection to
//! Exchange. Each request is classified (path, authentication, token), judged by the rules,
//! audited, and either forwarded or refused; sources that keep failing are handed to the
//! daemon for the XDP block set.

mod body;
mod ews;
mod request;
mod upstream;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use arc_swap::ArcSwap;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::{
    audit::{Audit, Record},
    config::{Config, ContentSettings, ProxySettings, Rule},
    content::IdCache,
    feedback::{self, Block, Failures},
    policy::SourceIndex,
    strict::{Checks, Framing, HeadCheck, Tracker},
    tls::CertResolver,
    token_cache::{KeyMaterial, TokenCache},
};

/// Sources whose failures are tracked at most.
const TRACKED_SOURCES: usize = 100_000;

/// What a reload replaces at once: rules, groups, token trust, limits.
pub struct Policy {
    pub rules: Vec<Rule>,
    pub sources: SourceIndex,
    /// `None` when no token is trusted at all: every bearer token is refused.
    pub tokens: Option<TokenCache>,
    pub settings: ProxySettings,
    pub content: ContentSettings,
}

impl Policy {
    /// `previous` is the running policy: its fetched signing keys carry over.
    pub fn build(config: &Config, previous: Option<&Policy>) -> anyhow::Result<Policy> {
        let settings = config.proxy.clone().context("no [proxy] section")?;
        let material = KeyMaterial::read(&config.tokens)?;
        let previous = previous.and_then(|p| p.tokens.as_ref());
        let tokens = TokenCache::build(&config.tokens, &material, previous)?;
        Ok(Policy {
            rules: config.rules.clone(),
            sources: SourceIndex::new(config),
            tokens,
            settings,
            content: config.content,
        })
    }
}

/// Hands a block to whoever owns the XDP maps.
pub type BlockSink = Box<dyn Fn(Block) + Send + Sync>;

struct Shared {
    policy: ArcSwap<Policy>,
    certs: Arc<CertResolver>,
    acceptor: TlsAcceptor,
    upstream: upstream::Connector,
    audit: Audit,
    failures: Mutex<Failures>,
    blocks: BlockSink,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    next_connection: AtomicU64,
    /// What Exchange's responses showed of opaque IDs; kept across reloads.
    ids: Mutex<IdCache>,
    runtime: tokio::runtime::Handle,
}

/// The running proxy, as the daemon sees it.
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

impl ProxyHandle {
    /// Checks a new configuration whole; nothing changes unless it is good.
    pub fn prepare(&self, config: &Config) -> anyhow::Result<Policy> {
        let old = self.shared.policy.load();
        let policy = Policy::build(config, Some(&old))?;
        let (a, b) = (&old.settings, &policy.settings);
        if a.listen != b.listen || a.upstream != b.upstream || a.client_ca != b.client_ca {
            anyhow::bail!("[proxy] listen, upstream and client_ca change only with a restart");
        }
        // Loaded now so a bad certificate rejects the reload; swapped in by `commit`.
        CertResolver::load(&b.certificate, &b.private_key)?;
        Ok(policy)
    }

    pub fn commit(&self, policy: Policy, config: &Config) {
        let s = &policy.settings;
        if let Err(e) = self.shared.certs.reload(&s.certificate, &s.private_key) {
            warn!(error = %e, "certificate reload failed; the previous one is kept");
        }
        if let Ok(mut f) = self.shared.failures.lock() {
            if f.settings() != feedback_settings(config) {
                *f = Failures::new(feedback_settings(config));
            }
        }
        if let Some(tokens) = &policy.tokens {
            tokens.keep_fresh(&self.shared.runtime);
        }
        self.shared.policy.store(Arc::new(policy));
    }

    pub fn flush_audit(&self) {
        self.shared.audit.flush();
    }
}

fn feedback_settings(config: &Config) -> feedback::Settings {
    let f = &config.feedback;
    feedback::Settings {
        window_ms: f.window.as_millis() as u64,
        threshold: f.failures,
        block_ttl_secs: f.block.as_secs(),
        max_sources: TRACKED_SOURCES,
    }
}

/// Binds the listeners and starts serving on the current tokio runtime.
pub fn start(config: &Config, blocks: BlockSink) -> anyhow::Result<ProxyHandle> {
    let policy = Policy::build(config, None)?;
    let s = policy.settings.clone();
    let certs = Arc::new(CertResolver::load(&s.certificate, &s.private_key)?);
    let tls = crate::tls::server_config(&s, certs.clone())?;
    let audit = Audit::open(s.audit_log.as_deref()).context("opening the audit log")?;
    let shared = Arc::new(Shared {
        acceptor: TlsAcceptor::from(Arc::new(tls)),
        certs,
        upstream: upstream::Connector::new(&s.upstream, s.limits.handshake_timeout)?,
        audit,
        failures: Mutex::new(Failures::new(feedback_settings(config))),
        blocks,
        per_source: Mutex::new(HashMap::new()),
        next_connection: AtomicU64::new(1),
        ids: Mutex::new(IdCache::new(config.content.cache_entries)),
        runtime: tokio::runtime::Handle::current(),
        policy: ArcSwap::from_pointee(policy),
    });
    if let Some(tokens) = &shared.policy.load().tokens {
        tokens.keep_fresh(&shared.runtime);
    }
    for addr in &s.listen {
        let std = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        std.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std)?;
        tokio::spawn(accept_loop(listener, shared.clone()));
        info!(%addr, upstream = %s.upstream.authority, "proxy listening");
    }
    Ok(ProxyHandle { shared })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                warn!(error = %e, "accept");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer = SocketAddr::new(canonical(peer.ip()), peer.port());
        match Slot::take(&shared, peer.ip()) {
            Some(slot) => {
                tokio::spawn(connection(shared.clone(), tcp, peer, slot));
            }
            None => {
                shared.refuse_connection(peer, "too_many_connections");
            }
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One of a source's connection slots, given back on drop.
struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Slot {
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<Slot> {
        let cap = shared.policy.load().settings.limits.connections_per_source;
        let mut map = shared.per_source.lock().ok()?;
        let n = map.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Slot {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.shared.per_source.lock() {
            if let Some(n) = map.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.ip);
                }
            }
        }
    }
}

impl Shared {
    /// Counts a failure against a source; past the threshold, hands out a block.
    fn fail(&self, source: IpAddr, reason: &str) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let block = match self.failures.lock() {
            Ok(mut f) => f.record(source, reason, now),
            Err(_) => None,
        };
        if let Some(b) = block {
            warn!(source = %b.source, ttl = b.ttl_secs, reason = %b.reason, "source blocked in XDP");
            (self.blocks)(b);
        }
    }

    /// A connection refused before any request: audited and counted.
    fn refuse_connection(&self, peer: SocketAddr, reason: &'static str) {
        self.audit.log(Record {
            source: Some(peer.ip()),
            source_port: peer.port(),
            source_group: self
                .policy
                .load()
                .sources
                .group(peer.ip())
                .map(str::to_string),
            auth: "none",
            decision: "deny",
            reason: reason.into(),
            ..Default::default()
        });
        self.fail(peer.ip(), reason);
    }
}

/// What every request of one client connection shares.
pub(crate) struct Conn {
    id: u64,
    peer: SocketAddr,
    group: Option<String>,
    client_cert: Option<String>,
    checks: Checks,
    upstream: tokio::sync::Mutex<Option<upstream::Sender>>,
    /// The user an NTLM or Negotiate handshake on this connection authenticated.
    session: Mutex<Option<request::Session>>,
    shared: Arc<Shared>,
}

async fn connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, slot: Slot) {
    let _slot = slot;
    let policy = shared.policy.load_full();
    let limits = &policy.settings.limits;
    let _ = tcp.set_nodelay(true);
    let tls =
        match tokio::time::timeout(limits.handshake_timeout, shared.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(_)) => return shared.refuse_connection(peer, "tls_handshake_failed"),
            Err(_) => return shared.refuse_connection(peer, "tls_handshake_timeout"),
        };
    let client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(crate::tls::client_identity);
    let checks: Checks = Default::default();
    let tracker = Tracker::new(limits.header_bytes, limits.header_count, checks.clone());
    let io = Framing::new(tls, tracker, limits.idle_timeout, limits.head_timeout);
    let conn = Arc::new(Conn {
        id: shared.next_connection.fetch_add(1, Ordering::Relaxed),
        peer,
        group: policy.sources.group(peer.ip()).map(str::to_string),
        client_cert,
        checks: checks.clone(),
        upstream: tokio::sync::Mutex::new(None),
        session: Mutex::new(None),
        shared: shared.clone(),
    });
    let service = {
        let conn = conn.clone();
        service_fn(move |req| request::handle(conn.clone(), req))
    };
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        // `Framing` times heads; hyper's timer would also run on idle keep-alive connections.
        .header_read_timeout(None)
        .max_headers(limits.header_count)
        .max_buf_size(limits.header_bytes.max(8192))
        .keep_alive(true)
        // One buffer per write: one TLS record for a response head and a small body.
        .writev(false)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = result {
        // hyper refused the request itself (malformed or oversized head, head timeout):
        // the tracker's reason is more precise when it has one.
        let tracked = checks.lock().ok().and_then(|mut q| q.pop_front());
        let reason = match tracked {
            Some(HeadCheck::Refused(r)) => Some(r),
            _ if e.is_parse_too_large() => Some("head_too_large"),
            _ if e.is_parse() => Some("malformed_head"),
            _ if e.is_timeout() => Some("head_timeout"),
            _ => None,
        };
        if let Some(reason) = reason {
            conn.refuse_unparsed(reason);
        }
    }
}
