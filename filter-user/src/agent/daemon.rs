//! `ewsgate run`: the agent. It loads (or adopts) the XDP program and its maps, starts the
//! proxy as an unprivileged process and supervises it, and serves the control socket,
//! SIGHUP, a config-file watch and the expiry sweep. Everything that touches the maps runs
//! on one worker thread.
//!
//! The agent exiting (SIGTERM, a crash, `kill -9`) leaves the pinned program attached and
//! enforcing, and the proxy serving on its last policy; only `ewsgate detach` removes the
//! program.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{mpsc, Arc},
    thread,
    time::{Duration, SystemTime},
};

use anyhow::Context;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::oneshot,
};
use tracing::{info, warn};

use crate::{
    agent::{
        control::{Request, Response},
        supervisor::{self, Ask},
        tasks,
        worker::{Command, Worker},
    },
    config,
    packet::xdp::Gate,
};

const SWEEP_EVERY: Duration = Duration::from_secs(1);
const WATCH_EVERY: Duration = Duration::from_secs(1);
// An explain request carries a SOAP body of up to 1 MiB, JSON-escaped.
const MAX_REQUEST: usize = 8 << 20;

pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let (config, bundle) = config::load_bundle(config_path)?;
    if config.xdp.interfaces.is_empty() {
        warn!("xdp.interfaces is empty: nothing is filtered until the config names one");
    }
    let socket = config.xdp.control_socket.clone();
    refuse_second_agent(&socket)?;
    // Checked before anything is attached: a missing proxy user is a config error.
    let proxy = supervisor::Settings::from_config(&config)?;
    let gate = Gate::open(&config).context("setting up XDP")?;
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .thread_name("ewsgate-agent")
        .enable_all()
        .build()?;
    let (tx, rx) = mpsc::channel::<Command>();
    let (link, outs) = supervisor::channel();
    let proxy_socket = {
        let _inside = rt.enter();
        proxy
            .as_ref()
            .map(supervisor::bind)
            .transpose()
            .context("the proxy socket")?
    };
    // Bound before the control socket appears, so a client that sees the agent can connect.
    let opened = proxy.as_ref().map(supervisor::Opened::open).transpose()?;
    // The control socket appears only once the filter is attached and filled: callers may
    // take its presence as "ewsgate is enforcing".
    let listener = bind_control(&socket)?;
    // Under systemd (Type=notify) the unit is started from here on; elsewhere a no-op.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!(error = %e, "telling systemd the agent is ready");
    }
    info!(start = ?gate.start, interfaces = ?gate.attached, prefixes = config.prefix_count(), proxy = proxy.is_some(), "ewsgate agent running");
    let audit_path = config
        .proxy
        .as_ref()
        .and(config.ops.audit.file().map(PathBuf::from));
    let tasks_tx = tx.clone();
    let sink: tasks::Sink = Arc::new(move |a| tasks_tx.send(Command::Agent(a)).is_ok());
    let agent = tasks::Agent::start(&config, sink, rt.handle());
    let worker = Worker::new(
        gate,
        config,
        bundle,
        proxy.is_some().then(|| link.clone()),
        agent,
        rt.handle().clone(),
    );
    let (done_tx, done_rx) = oneshot::channel::<()>();
    thread::Builder::new()
        .name("ewsgate-maps".into())
        .spawn(move || {
            worker.run(rx);
            let _ = done_tx.send(());
        })
        .context("starting the worker thread")?;
    // A proxy started elsewhere (`spawn = false`: its own service unit) outlives this agent
    // by design: a restart or an upgrade of the agent must not take it down.
    let spawned = proxy.as_ref().is_some_and(|p| p.spawn);
    if let (Some(settings), Some(opened), Some(socket)) = (proxy, opened, proxy_socket) {
        let asks = tx.clone();
        let asks: supervisor::Asks = Arc::new(move |a: Ask| asks.send(Command::Proxy(a)).is_ok());
        rt.spawn(supervisor::run(settings, opened, socket, outs, asks));
    }
    let watch = Watched {
        config: config_path.to_path_buf(),
        audit: audit_path,
    };
    let result = rt.block_on(serve(listener, tx, watch, done_rx));
    let _ = fs::remove_file(&socket);
    // A clean stop stops the proxy it spawned; the XDP program stays attached and enforcing.
    // (An agent that dies leaves its proxy serving, to be adopted by the next agent.)
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    if spawned {
        rt.block_on(async {
            link.send(crate::ipc::ToProxy::Shutdown);
            tokio::time::sleep(Duration::from_millis(300)).await;
        });
    }
    result
}

/// Each client connection holds two descriptors (client and Exchange): lift the soft limit
/// to the hard one, as nginx and HAProxy do. The proxy inherits it.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                warn!("could not raise the open-file limit");
            }
        }
    }
}

fn refuse_second_agent(socket: &Path) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        anyhow::bail!("another ewsgate agent answers on {}", socket.display());
    }
    Ok(())
}

fn bind_control(socket: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = socket.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = fs::remove_file(socket); // stale: refuse_second_agent found nobody answering
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Files the agent watches: the config (a change reloads it) and the audit log (a rename
/// under it, as logrotate does, reopens it).
struct Watched {
    config: PathBuf,
    audit: Option<PathBuf>,
}

async fn serve(
    listener: std::os::unix::net::UnixListener,
    tx: mpsc::Sender<Command>,
    watch: Watched,
    mut done: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let listener = UnixListener::from_std(listener)?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut tick = tokio::time::interval(WATCH_EVERY);
    let mut seen = file_stamp(&watch.config);
    let mut audit_inode = watch.audit.as_deref().and_then(inode);
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => { tokio::spawn(client(stream, tx.clone())); }
                Err(e) => warn!(error = %e, "control socket accept"),
            },
            _ = hup.recv() => {
                send(&tx, Command::ReopenAudit)?;
                send(&tx, Command::Reload("SIGHUP"))?;
            }
            _ = sweep.tick() => send(&tx, Command::Sweep)?,
            _ = tick.tick() => {
                let now = file_stamp(&watch.config);
                if now != seen {
                    seen = now;
                    send(&tx, Command::Reload("config file changed"))?;
                }
                let current = watch.audit.as_deref().and_then(inode);
                if current != audit_inode {
                    audit_inode = current;
                    send(&tx, Command::ReopenAudit)?;
                }
            }
            _ = term.recv() => { info!("SIGTERM: exiting, XDP stays attached"); return Ok(()); }
            _ = int.recv() => { info!("SIGINT: exiting, XDP stays attached"); return Ok(()); }
            _ = &mut done => { info!("shutdown requested"); return Ok(()); }
        }
    }
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).ok().map(|m| m.ino())
}

fn send(tx: &mpsc::Sender<Command>, cmd: Command) -> anyhow::Result<()> {
    tx.send(cmd)
        .map_err(|_| anyhow::anyhow!("the worker thread stopped"))
}

/// Modification time, length and content: an editor that keeps the mtime still triggers.
fn file_stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    let meta = fs::metadata(path).ok()?;
    let text = fs::read(path).ok()?;
    let hash = text.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    });
    Some((meta.modified().ok()?, meta.len(), hash))
}

async fn client(stream: UnixStream, tx: mpsc::Sender<Command>) {
    let response = match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 => None,
        Ok(cred) => Some(Response::Error {
            message: format!("uid {} may not control ewsgate", cred.uid()),
        }),
        Err(e) => Some(Response::Error {
            message: format!("peer credentials: {e}"),
        }),
    };
    let (read, mut write) = stream.into_split();
    let response = match response {
        Some(r) => r,
        None => {
            let mut line = String::new();
            let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
            match reader.read_line(&mut line).await {
                Ok(_) => dispatch(&line, tx).await,
                Err(e) => Response::Error {
                    message: format!("read: {e}"),
                },
            }
        }
    };
    let mut out = serde_json::to_string(&response)
        .unwrap_or_else(|e| format!("{{\"result\":\"error\",\"message\":\"{e}\"}}"));
    out.push('\n');
    let _ = write.write_all(out.as_bytes()).await;
}

async fn dispatch(line: &str, tx: mpsc::Sender<Command>) -> Response {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            return Response::Error {
                message: format!("bad request: {e}"),
            }
        }
    };
    let (reply, answer) = oneshot::channel();
    if tx.send(Command::Request(req, reply)).is_err() {
        return Response::Error {
            message: "the agent is shutting down".into(),
        };
    }
    answer.await.unwrap_or(Response::Error {
        message: "no answer from the worker".into(),
    })
}
