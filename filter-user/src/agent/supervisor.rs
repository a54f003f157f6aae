//! The agent's side of the proxy: it binds the listening sockets (the proxy needs no
//! capability), starts `ewsgate proxy` under an unprivileged user with no capabilities and
//! no way to gain any (`no_new_privs`), hands it the sockets and the audit file over the
//! proxy socket, and restarts it when it dies. A proxy that outlived an agent reconnects on
//! its own and is adopted, sockets and all.
//!
//! Every message from the proxy is untrusted: frames are size-capped and parsed strictly;
//! anything else is refused, logged, and ends the session (a spawned proxy that misbehaves
//! is stopped and started afresh).

use std::{
    fs::{File, OpenOptions},
    net::{SocketAddr, TcpListener},
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::{OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    process::Stdio,
    sync::{mpsc as std_mpsc, Arc},
    time::Duration,
};

use anyhow::Context;
use tokio::{
    net::{UnixListener, UnixStream},
    process::{Child, Command},
    sync::mpsc,
    time::{sleep, timeout, Instant},
};
use tracing::{error, info, warn};

use crate::{
    ipc::{
        wire::{Receiver, WireError, Writer},
        Init, PolicyState, ToAgent, ToProxy, MAX_TO_AGENT,
    },
    model::Config,
};

/// How long a spawned proxy has to connect before it is restarted.
const CONNECT_GRACE: Duration = Duration::from_secs(10);
/// How long an agent that starts waits for a proxy that outlived its predecessor.
const ADOPT_GRACE: Duration = Duration::from_secs(3);
const RESTART_MIN: Duration = Duration::from_millis(500);
const RESTART_MAX: Duration = Duration::from_secs(30);
/// Scrapes the agent answers per second at most: each reads every counter from the maps,
/// and a proxy that asks without end must not keep the worker from reloads.
const METRICS_PER_SEC: u32 = 20;

/// Who the proxy runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyUser {
    pub uid: u32,
    pub gid: u32,
}

impl ProxyUser {
    pub fn lookup(name: &str) -> anyhow::Result<ProxyUser> {
        let cname = std::ffi::CString::new(name)?;
        // SAFETY: getpwnam returns a pointer into static storage or null; read at once.
        let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
        if pw.is_null() {
            anyhow::bail!(
                "the proxy's user '{name}' does not exist: create it (for example `adduser --system --group --no-create-home {name}`) or name another in [proxy] user"
            );
        }
        // SAFETY: non-null, fields copied out immediately.
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        anyhow::ensure!(uid != 0, "the proxy's user '{name}' is root");
        Ok(ProxyUser { uid, gid })
    }
}

/// What the worker asks of the proxy.
pub enum Out {
    Send(ToProxy),
    /// Checks a policy; the answer comes back on the channel (`Ok(false)`: no proxy is
    /// connected, so there was nothing to check; it gets the policy when it connects).
    Prepare(Box<PolicyState>, std_mpsc::Sender<Result<bool, String>>),
    AuditFile(File),
}

/// What the supervisor asks of the worker.
pub enum Ask {
    /// The state a proxy starts a session from.
    Init(tokio::sync::oneshot::Sender<Init>),
    Failures(Vec<crate::ipc::Failure>),
    Detected(Vec<crate::ipc::Detected>),
    /// The packet layer's part of a scrape, answered to the proxy as `ToProxy::Metrics`.
    Metrics(u64),
    /// Sightings for the fleet.
    Seen(Vec<crate::ipc::Seen>),
}

/// The worker's handle on the proxy.
#[derive(Clone)]
pub struct ProxyLink {
    tx: mpsc::UnboundedSender<Out>,
}

impl ProxyLink {
    pub fn send(&self, msg: ToProxy) {
        let _ = self.tx.send(Out::Send(msg));
    }

    /// Asks the proxy to check a policy and waits for its answer (bounded).
    pub fn prepare(&self, policy: PolicyState) -> Result<bool, String> {
        let (tx, rx) = std_mpsc::channel();
        if self.tx.send(Out::Prepare(Box::new(policy), tx)).is_err() {
            return Ok(false);
        }
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| Err("the proxy did not answer within 30 s".into()))
    }

    pub fn audit_file(&self, file: File) {
        let _ = self.tx.send(Out::AuditFile(file));
    }
}

pub struct Settings {
    pub socket: PathBuf,
    pub user: ProxyUser,
    pub listen: Vec<SocketAddr>,
    pub audit_log: Option<PathBuf>,
    /// `[metrics] listen`: bound here, served by the proxy.
    pub metrics: Option<SocketAddr>,
    pub threads: usize,
    /// Start the proxy ourselves (rather than wait for one started elsewhere).
    pub spawn: bool,
}

impl Settings {
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Settings>> {
        let Some(p) = &config.proxy else {
            return Ok(None);
        };
        Ok(Some(Settings {
            socket: proxy_socket(&config.xdp.control_socket),
            user: ProxyUser::lookup(&p.user)?,
            listen: p.listen.clone(),
            audit_log: config.ops.audit.file().map(Into::into),
            metrics: config.metrics.as_ref().map(|m| m.listen),
            threads: p.threads,
            spawn: p.spawn,
        }))
    }
}

/// The proxy socket lives beside the control socket.
pub fn proxy_socket(control: &Path) -> PathBuf {
    control.with_file_name("proxy.sock")
}

/// Binds the proxy socket; only the proxy's user may connect (mode 0600, its owner).
pub fn bind(settings: &Settings) -> anyhow::Result<UnixListener> {
    let path = &settings.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::os::unix::fs::chown(path, Some(settings.user.uid), Some(settings.user.gid))?;
    listener.set_nonblocking(true)?;
    Ok(UnixListener::from_std(listener)?)
}

/// Binds the listening sockets, unless a proxy that outlived the last agent holds them.
pub fn bind_listeners(addrs: &[SocketAddr]) -> anyhow::Result<Option<Vec<OwnedFd>>> {
    let mut fds = Vec::new();
    for addr in addrs {
        match TcpListener::bind(addr) {
            Ok(l) => fds.push(OwnedFd::from(l)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("binding {addr}")),
        }
    }
    Ok(Some(fds))
}

pub fn open_audit(path: &Path) -> anyhow::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .with_context(|| format!("opening the audit log {}", path.display()))
}

pub fn channel() -> (ProxyLink, mpsc::UnboundedReceiver<Out>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (ProxyLink { tx }, rx)
}

/// A proxy that said hello: its stream, pid, the sockets it holds, and its receiver.
type Hello = (Arc<UnixStream>, Option<i32>, Vec<SocketAddr>, Receiver);

/// Where the supervisor's questions for the worker go.
pub type Asks = Arc<dyn Fn(Ask) -> bool + Send + Sync>;

struct Supervisor {
    settings: Settings,
    listeners: Option<Vec<OwnedFd>>,
    metrics: Option<OwnedFd>,
    audit: Option<File>,
    child: Option<Child>,
    asks: Asks,
    restart_after: Duration,
    /// The current second's scrape questions: when it began, how many.
    metrics_asked: (Instant, u32),
}

/// Runs for the agent's life.
/// What the agent opened for the proxy before it started: the listening sockets (`None`
/// when a proxy that outlived the last agent holds them) and the audit file.
pub struct Opened {
    pub listeners: Option<Vec<OwnedFd>>,
    pub audit: Option<File>,
    /// The `[metrics]` socket (`None` when not configured or held by a surviving proxy).
    pub metrics: Option<OwnedFd>,
}

impl Opened {
    pub fn open(settings: &Settings) -> anyhow::Result<Opened> {
        let listeners = bind_listeners(&settings.listen)?;
        Ok(Opened {
            metrics: match listeners {
                Some(_) => bind_metrics(settings.metrics)?,
                None => None,
            },
            listeners,
            audit: settings.audit_log.as_deref().map(open_audit).transpose()?,
        })
    }
}

/// Binds the `[metrics]` socket; `None` when there is none to bind or a proxy that
/// outlived the last agent holds it.
fn bind_metrics(addr: Option<SocketAddr>) -> anyhow::Result<Option<OwnedFd>> {
    Ok(bind_listeners(addr.as_slice())?.and_then(|mut fds| fds.pop()))
}

pub async fn run(
    settings: Settings,
    opened: Opened,
    socket: UnixListener,
    mut outs: mpsc::UnboundedReceiver<Out>,
    asks: Asks,
) {
    let Opened {
        listeners,
        audit,
        metrics,
    } = opened;
    let mut sup = Supervisor {
        settings,
        listeners,
        metrics,
        audit,
        child: None,
        asks,
        restart_after: RESTART_MIN,
        metrics_asked: (Instant::now(), 0),
    };
    if sup.listeners.is_none() {
        info!("the listening sockets are held: waiting for the proxy that holds them");
    }
    let mut waiting_since = Instant::now();
    let mut grace = if sup.listeners.is_none() {
        ADOPT_GRACE
    } else {
        Duration::ZERO
    };
    loop {
        if sup.child.is_none() && waiting_since.elapsed() >= grace {
            sup.start().await;
            waiting_since = Instant::now();
            grace = CONNECT_GRACE;
        }
        tokio::select! {
            conn = socket.accept() => {
                if let Ok((stream, _)) = conn {
                    if sup.session(stream, &socket, &mut outs).await {
                        sup.restart_after = RESTART_MIN;
                    }
                    waiting_since = Instant::now();
                    grace = RESTART_MIN;
                }
            }
            _ = sup.exited() => {
                waiting_since = Instant::now();
                grace = sup.restart_after;
                sup.restart_after = (sup.restart_after * 2).min(RESTART_MAX);
            }
            out = outs.recv() => match out {
                Some(out) => sup.without_session(out),
                None => return,
            },
            _ = sleep(Duration::from_millis(250)) => {
                if sup.child.is_some() && waiting_since.elapsed() > CONNECT_GRACE {
                    warn!("the proxy never connected: restarting it");
                    sup.kill().await;
                }
            }
        }
    }
}

impl Supervisor {
    /// Starts the proxy process, binding the sockets first when nobody holds them.
    async fn start(&mut self) {
        if !self.settings.spawn {
            return;
        }
        if self.listeners.is_none() {
            match bind_listeners(&self.settings.listen) {
                Ok(Some(l)) => {
                    self.listeners = Some(l);
                    self.metrics = bind_metrics(self.settings.metrics).unwrap_or_else(|e| {
                        error!(error = %format!("{e:#}"), "binding the metrics socket");
                        None
                    });
                }
                Ok(None) => {
                    warn!("the proxy's addresses are in use by another process");
                    return;
                }
                Err(e) => {
                    error!(error = %format!("{e:#}"), "binding the proxy's sockets");
                    return;
                }
            }
        }
        match spawn(&self.settings) {
            Ok(child) => {
                info!(
                    pid = child.id(),
                    uid = self.settings.user.uid,
                    "proxy started"
                );
                self.child = Some(child);
            }
            Err(e) => error!(error = %format!("{e:#}"), "starting the proxy"),
        }
    }

    /// Resolves when the spawned proxy exits (never when there is none).
    async fn exited(&mut self) {
        let Some(child) = &mut self.child else {
            return std::future::pending().await;
        };
        let status = child.wait().await;
        self.child = None;
        match status {
            Ok(s) => warn!(status = %s, "the proxy exited; XDP protection is unaffected"),
            Err(e) => warn!(error = %e, "the proxy exited"),
        }
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Messages that arrive while no proxy is connected: prepares are vacuous, the rest
    /// waits for the next session's init.
    fn without_session(&mut self, out: Out) {
        match out {
            Out::Prepare(_, reply) => {
                let _ = reply.send(Ok(false));
            }
            Out::AuditFile(file) => self.audit = Some(file),
            Out::Send(_) => {}
        }
    }

    /// One proxy session, until it ends. Returns whether the proxy was accepted.
    async fn session(
        &mut self,
        stream: UnixStream,
        socket: &UnixListener,
        outs: &mut mpsc::UnboundedReceiver<Out>,
    ) -> bool {
        let Some((stream, pid, listening, mut rx)) = self.hello(stream).await else {
            return false;
        };
        if !listening.is_empty() && listening != self.settings.listen {
            return self
                .refuse(pid, "it listens on other addresses than the config names")
                .await;
        }
        let writer = Writer::new(stream.clone());
        let Some(init) = self.ask_init().await else {
            return false;
        };
        if let Err(e) = self.send_init(&writer, init, listening.is_empty()).await {
            warn!(error = %e, "proxy init");
            return false;
        }
        if !listening.is_empty() {
            info!(pid, "adopted a running proxy");
            // It holds the sockets; ours (if any) would only keep the ports busy.
            self.listeners = None;
            self.metrics = None;
        }
        info!(pid, "proxy session open");
        self.serve(&stream, socket, &writer, &mut rx, outs, pid)
            .await;
        info!("proxy session closed");
        true
    }

    /// Checks who connected and reads its hello. Anything but the proxy's user saying
    /// hello is refused and logged.
    async fn hello(&mut self, stream: UnixStream) -> Option<Hello> {
        let peer = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "proxy socket: no peer credentials");
                return None;
            }
        };
        if peer.uid() != self.settings.user.uid {
            error!(
                uid = peer.uid(),
                "proxy socket: refused a peer that is not the proxy's user"
            );
            return None;
        }
        let stream = Arc::new(stream);
        let mut rx = Receiver::new(MAX_TO_AGENT);
        let hello = timeout(Duration::from_secs(5), rx.recv::<ToAgent>(&stream)).await;
        let why = match hello {
            Ok(Ok((ToAgent::Hello { listening, .. }, _))) => {
                return Some((stream, peer.pid(), listening, rx))
            }
            Ok(Ok((other, _))) => format!("began with {other:?}"),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no hello within 5 s".into(),
        };
        self.refuse(peer.pid(), &why).await;
        None
    }

    /// A second connection while a session is open: heard out, then refused.
    async fn intruder(&mut self, stream: UnixStream) {
        if let Some((_, pid, _, _)) = self.hello(stream).await {
            error!(
                pid,
                "refused a second proxy: a proxy session is already open"
            );
        }
    }

    async fn refuse(&mut self, pid: Option<i32>, why: &str) -> bool {
        error!(pid, why, "refused the proxy's message; closing its session");
        if self.child.as_ref().and_then(Child::id).map(|p| p as i32) == pid {
            self.kill().await;
        }
        false
    }

    async fn ask_init(&self) -> Option<Init> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !(self.asks)(Ask::Init(tx)) {
            return None;
        }
        rx.await.ok()
    }

    async fn send_init(
        &self,
        writer: &Writer,
        mut init: Init,
        sockets: bool,
    ) -> Result<(), WireError> {
        let mut fds = Vec::new();
        init.listeners = Vec::new();
        if sockets {
            if let Some(l) = &self.listeners {
                init.listeners = self.settings.listen.clone();
                fds.extend(l.iter().map(|fd| fd.as_fd()));
            }
        }
        init.audit_file = self.audit.is_some();
        if let Some(f) = &self.audit {
            fds.push(f.as_fd());
        }
        init.metrics = None;
        if let (true, Some(fd), Some(addr)) = (sockets, &self.metrics, self.settings.metrics) {
            init.metrics = Some(addr);
            fds.push(fd.as_fd());
        }
        writer.send(&ToProxy::Init(Box::new(init)), &fds).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &mut self,
        stream: &UnixStream,
        socket: &UnixListener,
        writer: &Writer,
        rx: &mut Receiver,
        outs: &mut mpsc::UnboundedReceiver<Out>,
        pid: Option<i32>,
    ) {
        let mut waiting: Option<(u64, std_mpsc::Sender<Result<bool, String>>)> = None;
        loop {
            tokio::select! {
                msg = rx.recv::<ToAgent>(stream) => match msg {
                    Ok((m, _)) => {
                        if let Err(why) = self.heard(m, &mut waiting) {
                            self.refuse(pid, &why).await;
                            break;
                        }
                    }
                    Err(WireError::Closed) => break,
                    Err(e) => {
                        self.refuse(pid, &e.to_string()).await;
                        break;
                    }
                },
                out = outs.recv() => {
                    let Some(out) = out else { break };
                    if self.tell(writer, out, &mut waiting).await.is_err() {
                        break;
                    }
                }
                _ = self.exited() => break,
                conn = socket.accept() => {
                    if let Ok((other, _)) = conn {
                        self.intruder(other).await;
                    }
                }
            }
        }
        if let Some((_, reply)) = waiting {
            let _ = reply.send(Ok(false));
        }
    }

    fn heard(
        &mut self,
        msg: ToAgent,
        waiting: &mut Option<(u64, std_mpsc::Sender<Result<bool, String>>)>,
    ) -> Result<(), String> {
        match msg {
            ToAgent::Failures { items } => {
                if items.len() > 1000 {
                    return Err(format!("{} failures in one message", items.len()));
                }
                for f in &items {
                    f.check()?;
                }
                (self.asks)(Ask::Failures(items));
                Ok(())
            }
            ToAgent::Detected { items } => {
                if items.len() > 1000 {
                    return Err(format!("{} detections in one message", items.len()));
                }
                for d in &items {
                    d.check()?;
                }
                (self.asks)(Ask::Detected(items));
                Ok(())
            }
            ToAgent::Metrics { id } => {
                // Past the budget the question goes unanswered: that scrape shows the agent
                // as down, which is what a flood of them should look like.
                if self.metrics_budget() {
                    (self.asks)(Ask::Metrics(id));
                }
                Ok(())
            }
            ToAgent::Seen { items } => {
                if items.len() > 1000 {
                    return Err(format!("{} sightings in one message", items.len()));
                }
                for s in &items {
                    s.check()?;
                }
                (self.asks)(Ask::Seen(items));
                Ok(())
            }
            ToAgent::Prepared { id } | ToAgent::Refused { id, .. }
                if waiting.as_ref().is_some_and(|(w, _)| *w == id) =>
            {
                let answer = match msg {
                    ToAgent::Refused { reason, .. } => Err(reason),
                    _ => Ok(true),
                };
                if let Some((_, reply)) = waiting.take() {
                    let _ = reply.send(answer);
                }
                Ok(())
            }
            other => Err(format!("unexpected {other:?}")),
        }
    }

    fn metrics_budget(&mut self) -> bool {
        let (since, asked) = &mut self.metrics_asked;
        if since.elapsed() >= Duration::from_secs(1) {
            *since = Instant::now();
            *asked = 0;
        }
        *asked += 1;
        *asked <= METRICS_PER_SEC
    }

    async fn tell(
        &mut self,
        writer: &Writer,
        out: Out,
        waiting: &mut Option<(u64, std_mpsc::Sender<Result<bool, String>>)>,
    ) -> Result<(), WireError> {
        match out {
            Out::Send(msg) => writer.send(&msg, &[]).await,
            Out::Prepare(policy, reply) => {
                let id = policy.id;
                let sent = writer.send(&ToProxy::Prepare { policy }, &[]).await;
                match sent {
                    Ok(()) => *waiting = Some((id, reply)),
                    Err(_) => {
                        let _ = reply.send(Ok(false));
                    }
                }
                sent
            }
            Out::AuditFile(file) => {
                let sent = writer.send(&ToProxy::AuditFile, &[file.as_fd()]).await;
                self.audit = Some(file);
                sent
            }
        }
    }
}

/// Starts `ewsgate proxy` as the proxy's user: no supplementary groups, no capabilities
/// (a setuid away from root clears them all), and `no_new_privs`, so nothing it executes
/// can gain any back.
fn spawn(settings: &Settings) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding the ewsgate binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("proxy")
        .arg("--agent")
        .arg(&settings.socket)
        .arg("--threads")
        .arg(settings.threads.to_string())
        .stdin(Stdio::null())
        .uid(settings.user.uid)
        .gid(settings.user.gid)
        .kill_on_drop(false);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}
