//! The request layer, in its own unprivileged process (`ewsgate proxy`, started by the
//! agent). Everything that comes from the network is parsed here, never in the root agent:
//! TLS, HTTP, tokens, SOAP. The proxy holds no capability and no write access to the BPF
//! maps; the agent hands it its listening sockets and its policy, and hears of failures.
//!
//! A request's life is a sequence of named phases over one context (see [`phases`]).

pub mod accept;
pub mod admission;
mod body;
mod buffers;
pub mod context;
pub mod h1;
pub mod handshake;
pub mod link;
pub mod metrics;
pub mod phases;
pub mod refused;
mod respond;
pub mod session;
pub mod state;
pub mod tls;
pub mod upstream;

use std::{
    fs::File,
    net::TcpListener as StdListener,
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc, Mutex},
};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{info, warn};

use crate::{
    ipc::ToAgent,
    ops::audit::Audit,
    policy::content::IdCache,
    proxy::{accept::PerSource, admission::Dynamic, link::Link, refused::Refused, state::State},
};

/// What every connection and the agent link share.
pub struct Shared {
    pub state: ArcSwap<State>,
    /// A policy prepared and waiting for the agent's commit.
    pub pending: Mutex<Option<State>>,
    pub audit: Audit,
    /// The other audit sinks and the detections, fed by the logging phase.
    pub ops: crate::ops::Pipeline,
    /// What Exchange's answers showed of opaque IDs; kept across policies.
    pub ids: Mutex<IdCache>,
    pub dynamic: Dynamic,
    pub refused: Refused,
    pub link: Link,
    pub per_source: PerSource,
    pub next_connection: AtomicU64,
    /// Bytes (in KiB) that responses held for inspection may take at once.
    pub inspect: Semaphore,
    /// The request layer's metrics (`/metrics`).
    pub metrics: Arc<metrics::ProxyMetrics>,
}

/// `ewsgate proxy`: connects to the agent, takes its sockets and policy, and serves.
pub fn serve(agent: PathBuf, threads: usize) -> anyhow::Result<()> {
    let runtime = runtime(threads)?;
    runtime.block_on(async move {
        let hello = ToAgent::Hello {
            listening: Vec::new(),
            policy: None,
        };
        let mut session = connect_at_start(&agent, &hello).await?;
        let (init, fds) = link::init(&mut session).await?;
        let state = link::build(&init.policy, None).context("the agent's policy")?;
        state.start();
        let mut fds = fds.into_iter();
        let mut listeners = Vec::new();
        for addr in &init.listeners {
            let fd = fds
                .next()
                .context("the agent sent fewer sockets than it named")?;
            let std = StdListener::from(fd);
            std.set_nonblocking(true)?;
            listeners.push((*addr, TcpListener::from_std(std)?));
        }
        let audit_file = match init.audit_file {
            true => Some(File::from(fds.next().context("no audit file descriptor")?)),
            false => None,
        };
        let metrics_listener = match init.metrics {
            Some(_) => {
                let std = StdListener::from(fds.next().context("no metrics socket")?);
                std.set_nonblocking(true)?;
                Some(TcpListener::from_std(std)?)
            }
            None => None,
        };
        let metrics = Arc::new(metrics::ProxyMetrics::new());
        metrics.prime(&state.config);
        let ops = crate::ops::Pipeline::open(&state.config.ops).context("the audit sinks")?;
        ops.set_fleet(state.config.fleet.is_some());
        let shared = Arc::new(Shared {
            pending: Mutex::new(None),
            audit: Audit::new(audit_file).context("the audit log")?,
            ops,
            ids: Mutex::new(IdCache::new(state.content.cache_entries)),
            dynamic: Dynamic::default(),
            refused: Refused::default(),
            link: Link::default(),
            per_source: Default::default(),
            next_connection: AtomicU64::new(1),
            inspect: Semaphore::new(budget_units(state.settings.limits.inspect_budget)),
            metrics,
            state: ArcSwap::from_pointee(state),
        });
        shared.dynamic.reset(&init.entries);
        for (identity, secs, why) in init.refused {
            shared.refused.add(identity, secs, why);
        }
        seed_random();
        for (addr, listener) in listeners {
            tokio::spawn(accept::accept_loop(listener, shared.clone()));
            info!(%addr, "proxy listening");
        }
        if let Some(listener) = metrics_listener {
            tokio::spawn(metrics::serve(listener, shared.clone()));
        }
        link::run(shared, agent, session).await;
        Ok(())
    })
}

/// A proxy started on its own (its own service unit) may come up before the agent: it
/// tries for a while before giving up.
async fn connect_at_start(
    agent: &std::path::Path,
    hello: &ToAgent,
) -> anyhow::Result<link::Session> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match link::connect(agent, hello).await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
        }
    }
}

fn budget_units(bytes: u64) -> usize {
    usize::try_from(bytes / 1024)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

/// One thread per CPU (or `[proxy] threads`). With one, everything runs on the thread that
/// drives the runtime, with no cross-thread wake-ups.
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    Ok(builder.thread_name("ewsgate-proxy").enable_all().build()?)
}

/// aws-lc seeds its random generator from CPU jitter the first time it is asked, a tenth
/// of a second or more of work: done before the first client's handshake, not inside it.
fn seed_random() {
    let mut sample = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut sample).is_err() {
        warn!("the random generator could not be seeded at start");
    }
}
