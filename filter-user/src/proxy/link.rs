//! The proxy's end of the link to the agent. The proxy reports failures (batched, never
//! waiting on the agent) and takes policies, dynamic-set changes and identity refusals.
//! If the agent goes away, the proxy keeps serving on its last policy and keeps trying to
//! reconnect; failures reported meanwhile are kept up to a bound and sent on reconnect.

use std::{
    fs::File,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::Context;
use tokio::{net::UnixStream, sync::Notify};
use tracing::{error, info, warn};

use crate::{
    ipc::{
        wire::{Receiver, Writer},
        Detected, Failure, Init, PolicyState, Seen, ToAgent, ToProxy, MAX_TO_PROXY,
    },
    proxy::{state::State, Shared},
};

/// Failures kept while the agent is away.
const MAX_PENDING: usize = 10_000;
/// Failures sent in one message at most.
const BATCH: usize = 1000;
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Where failures and detections wait for the agent.
#[derive(Default)]
pub struct Link {
    pending: Mutex<Vec<Failure>>,
    detected: Mutex<Vec<Detected>>,
    /// Verified users' places for the fleet: one per user until sent.
    seen: Mutex<std::collections::HashMap<String, Seen>>,
    /// Failures dropped because the agent was away too long.
    pub dropped: AtomicU64,
    wake: Notify,
    /// The open session's writer, for scrapes that ask the agent.
    writer: Mutex<Option<Arc<Writer>>>,
}

impl Link {
    /// Queues a failure for the agent; never waits.
    pub fn report(&self, failure: Failure) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        if pending.len() >= MAX_PENDING {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.push(failure);
        if pending.len() == 1 {
            self.wake.notify_one();
        }
    }

    /// Queues a detection's action for the agent; never waits.
    pub fn detected(&self, d: Detected) {
        let Ok(mut pending) = self.detected.lock() else {
            return;
        };
        if pending.len() >= MAX_PENDING {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.push(d);
        self.wake.notify_one();
    }

    /// The open session's writer; `None` while the agent is away.
    pub fn writer(&self) -> Option<Arc<Writer>> {
        self.writer.lock().ok()?.clone()
    }

    fn set_writer(&self, writer: Option<Arc<Writer>>) {
        if let Ok(mut w) = self.writer.lock() {
            *w = writer;
        }
    }

    fn take_detected(&self) -> Vec<Detected> {
        let Ok(mut pending) = self.detected.lock() else {
            return Vec::new();
        };
        let n = pending.len().min(BATCH);
        pending.drain(..n).collect()
    }

    /// Queues a sighting for the fleet; a newer one for the same user replaces it.
    pub fn seen(&self, s: Seen) {
        let Ok(mut pending) = self.seen.lock() else {
            return;
        };
        if pending.len() >= MAX_PENDING && !pending.contains_key(&s.user) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.insert(s.user.clone(), s);
    }

    fn take_seen(&self) -> Vec<Seen> {
        let Ok(mut pending) = self.seen.lock() else {
            return Vec::new();
        };
        let keys: Vec<String> = pending.keys().take(BATCH).cloned().collect();
        keys.iter().filter_map(|k| pending.remove(k)).collect()
    }

    fn take(&self) -> Vec<Failure> {
        let Ok(mut pending) = self.pending.lock() else {
            return Vec::new();
        };
        let n = pending.len().min(BATCH);
        pending.drain(..n).collect()
    }
}

/// A session with the agent: the stream, its two halves.
pub struct Session {
    pub writer: Arc<Writer>,
    pub stream: Arc<UnixStream>,
    pub receiver: Receiver,
}

/// Connects to the agent and says what the proxy holds.
pub async fn connect(agent: &Path, hello: &ToAgent) -> anyhow::Result<Session> {
    let stream = UnixStream::connect(agent)
        .await
        .with_context(|| format!("connecting to the agent at {}", agent.display()))?;
    let stream = Arc::new(stream);
    let writer = Arc::new(Writer::new(stream.clone()));
    writer.send(hello, &[]).await?;
    Ok(Session {
        writer,
        stream,
        receiver: Receiver::new(MAX_TO_PROXY),
    })
}

/// The agent's first message of a session.
pub async fn init(session: &mut Session) -> anyhow::Result<(Init, Vec<OwnedFd>)> {
    match session.receiver.recv(&session.stream).await? {
        (ToProxy::Init(init), fds) => Ok((*init, fds)),
        (other, _) => anyhow::bail!("the agent began with {other:?} instead of init"),
    }
}

/// Serves the link for the proxy's life: messages in, failures out, reconnecting when the
/// agent goes away.
pub async fn run(shared: Arc<Shared>, agent: PathBuf, first: Session) {
    let mut session = Some(first);
    loop {
        if let Some(s) = session.take() {
            serve_session(&shared, s).await;
            warn!("lost the agent; serving on the last policy and reconnecting");
        }
        tokio::time::sleep(RECONNECT_EVERY).await;
        session = reconnect(&shared, &agent).await;
    }
}

async fn reconnect(shared: &Arc<Shared>, agent: &Path) -> Option<Session> {
    let state = shared.state.load();
    let hello = ToAgent::Hello {
        listening: state.settings.listen.clone(),
        policy: Some(state.id),
    };
    let mut s = connect(agent, &hello).await.ok()?;
    match init(&mut s).await {
        Ok((init, fds)) => {
            if let Err(e) = adopt(shared, init, fds) {
                error!(error = %e, "the agent's policy was refused; keeping the last one");
            }
            info!("reconnected to the agent");
            Some(s)
        }
        Err(e) => {
            warn!(error = %e, "agent handshake");
            None
        }
    }
}

/// A new agent's view of things, after a reconnect: its policy, its dynamic sets.
fn adopt(shared: &Shared, init: Init, fds: Vec<OwnedFd>) -> anyhow::Result<()> {
    let mut fds = fds.into_iter();
    if init.audit_file {
        if let Some(fd) = fds.next() {
            shared.audit.reopen(File::from(fd));
        }
    }
    // A metrics socket sent again (never, as the agent sends it only with the listeners)
    // is closed: this proxy serves the one it started with.
    drop(fds);
    shared.dynamic.reset(&init.entries);
    for (identity, secs, why) in init.refused {
        shared.refused.add(identity, secs, why);
    }
    let current = shared.state.load_full();
    if current.id != init.policy.id {
        let state = build(&init.policy, Some(&current))?;
        state.start();
        shared.ops.set_detections(&state.config.ops.detections);
        shared.ops.set_fleet(state.config.fleet.is_some());
        shared.metrics.prime(&state.config);
        shared.state.store(Arc::new(state));
    }
    Ok(())
}

pub fn build(policy: &PolicyState, previous: Option<&State>) -> anyhow::Result<State> {
    State::build(policy.id, policy.generation, &policy.bundle, previous)
}

async fn serve_session(shared: &Arc<Shared>, mut s: Session) {
    let flusher = tokio::spawn(flush_failures(shared.clone(), s.writer.clone()));
    shared.link.set_writer(Some(s.writer.clone()));
    loop {
        let (msg, fds) = match s.receiver.recv(&s.stream).await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "agent link");
                break;
            }
        };
        if let Some(reply) = handle(shared, msg, fds) {
            if s.writer.send(&reply, &[]).await.is_err() {
                break;
            }
        }
    }
    flusher.abort();
    shared.link.set_writer(None);
}

fn handle(shared: &Shared, msg: ToProxy, fds: Vec<OwnedFd>) -> Option<ToAgent> {
    match msg {
        ToProxy::Prepare { policy } => Some(prepare(shared, &policy)),
        ToProxy::Commit { id, generation } => {
            commit(shared, id, generation);
            None
        }
        ToProxy::Abort { id } => {
            if let Ok(mut p) = shared.pending.lock() {
                if p.as_ref().is_some_and(|s| s.id == id) {
                    *p = None;
                }
            }
            None
        }
        ToProxy::Entries { changes, reset } => {
            match reset {
                true => shared.dynamic.reset(&changes),
                false => shared.dynamic.apply(&changes),
            }
            None
        }
        ToProxy::RefuseIdentity {
            identity,
            secs,
            reason,
        } => {
            info!(%identity, secs, %reason, "identity refused at the request layer");
            shared.refused.add(identity, secs, reason);
            None
        }
        ToProxy::Seen { items } => {
            for s in items {
                let sighting = crate::ops::detections::Sighting {
                    site: s.site,
                    user: s.user,
                    group: s.group,
                    source: s.source,
                    time_ms: s.time_ms,
                };
                let fired = shared.ops.observe_remote(&sighting);
                crate::proxy::phases::logging::fire(shared, fired);
            }
            None
        }
        ToProxy::AuditFile => {
            if let Some(fd) = fds.into_iter().next() {
                shared.audit.reopen(File::from(fd));
                info!("audit file reopened");
            }
            None
        }
        ToProxy::Init(init) => {
            if let Err(e) = adopt(shared, *init, fds) {
                error!(error = %e, "the agent's policy was refused; keeping the last one");
            }
            None
        }
        ToProxy::Metrics { id, text } => {
            shared.metrics.agent_answered(id, text);
            None
        }
        ToProxy::Shutdown => {
            info!("the agent asked the proxy to stop");
            shared.audit.flush();
            std::process::exit(0);
        }
    }
}

fn prepare(shared: &Shared, policy: &PolicyState) -> ToAgent {
    let current = shared.state.load_full();
    let built = build(policy, Some(&current)).and_then(|state| {
        shared
            .ops
            .check(&state.config.ops)
            .map_err(anyhow::Error::msg)?;
        Ok(state)
    });
    match built {
        Ok(state) => {
            if let Ok(mut p) = shared.pending.lock() {
                *p = Some(state);
            }
            ToAgent::Prepared { id: policy.id }
        }
        Err(e) => ToAgent::Refused {
            id: policy.id,
            reason: format!("{e:#}"),
        },
    }
}

fn commit(shared: &Shared, id: u64, generation: u32) {
    let pending = shared.pending.lock().ok().and_then(|mut p| p.take());
    match pending {
        Some(state) if state.id == id => {
            info!(policy = id, generation, "policy committed");
            let mut state = state;
            state.generation = generation;
            state.start();
            shared.ops.set_detections(&state.config.ops.detections);
            shared.ops.set_fleet(state.config.fleet.is_some());
            shared.metrics.prime(&state.config);
            shared.state.store(Arc::new(state));
        }
        _ => warn!(policy = id, "commit of a policy that was not prepared"),
    }
}

async fn flush_failures(shared: Arc<Shared>, writer: Arc<Writer>) {
    loop {
        let detected = shared.link.take_detected();
        if !detected.is_empty() {
            let msg = ToAgent::Detected { items: detected };
            if writer.send(&msg, &[]).await.is_err() {
                return;
            }
        }
        let seen = shared.link.take_seen();
        if !seen.is_empty() {
            let msg = ToAgent::Seen { items: seen };
            if writer.send(&msg, &[]).await.is_err() {
                return;
            }
        }
        let batch = shared.link.take();
        if batch.is_empty() {
            tokio::select! {
                _ = shared.link.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        }
        let msg = ToAgent::Failures { items: batch };
        if writer.send(&msg, &[]).await.is_err() {
            return;
        }
    }
}
