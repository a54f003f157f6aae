//! `ewsgate run`: owns the loaded program and its maps on one worker thread, and feeds it
//! commands from the control socket, SIGHUP, a config-file watch and the expiry sweeper.
//!
//! The daemon exiting (SIGTERM, a crash, `kill -9`) leaves the pinned program attached and
//! enforcing; only `ewsgate detach` removes it.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{mpsc, Arc},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use ipnet::IpNet;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::oneshot,
};
use tracing::{error, info, warn};

use crate::{
    agent::{
        control::{Listed, Request, Response, Status},
        feedback::Block,
    },
    model::Config,
    packet::{maps::List, xdp::Gate},
    proxy::{self, ProxyHandle},
};

const SWEEP_EVERY: Duration = Duration::from_secs(1);
const WATCH_EVERY: Duration = Duration::from_secs(1);
const MAX_REQUEST: usize = 64 * 1024;

enum Command {
    Request(Request, oneshot::Sender<Response>),
    /// From the proxy: a source that kept failing.
    Block(Block),
    Reload(&'static str),
    Sweep,
}

/// State owned by the worker thread.
struct Worker {
    gate: Gate,
    config: Config,
    /// Free-text reasons for dynamic entries (the kernel keeps only the entry).
    notes: BTreeMap<(List, IpNet), String>,
    notes_path: PathBuf,
    last_reload: String,
    proxy: Option<Arc<ProxyHandle>>,
}

pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    if config.xdp.interfaces.is_empty() {
        warn!("xdp.interfaces is empty: nothing is filtered until the config names one");
    }
    let socket = config.xdp.control_socket.clone();
    refuse_second_daemon(&socket)?;
    let gate = Gate::open(&config).context("setting up XDP")?;
    raise_fd_limit();
    let rt = runtime(&config)?;
    let (tx, rx) = mpsc::channel::<Command>();
    let proxy = match &config.proxy {
        Some(_) => {
            let _inside = rt.enter();
            let blocks = tx.clone();
            let sink: proxy::BlockSink = Box::new(move |b| {
                let _ = blocks.send(Command::Block(b));
            });
            Some(Arc::new(
                proxy::start(&config, sink).context("starting the proxy")?,
            ))
        }
        None => None,
    };
    // The socket appears only once the filter is attached and filled: callers may take its
    // presence as "ewsgate is enforcing".
    let listener = bind_control(&socket)?;
    info!(start = ?gate.start, interfaces = ?gate.attached, prefixes = config.prefix_count(), proxy = proxy.is_some(), "ewsgate running");
    let notes_path = socket.with_extension("notes.json");
    let notes = load_notes(&notes_path);
    let mut worker = Worker {
        gate,
        config,
        notes,
        notes_path,
        last_reload: "at start: ok".into(),
        proxy: proxy.clone(),
    };
    let (done_tx, done_rx) = oneshot::channel::<()>();
    thread::Builder::new()
        .name("ewsgate-maps".into())
        .spawn(move || {
            while let Ok(cmd) = rx.recv() {
                if worker.handle(cmd) {
                    break;
                }
            }
            let _ = done_tx.send(());
        })
        .context("starting the worker thread")?;
    let result = rt.block_on(serve(listener, tx, config_path.to_path_buf(), done_rx));
    let _ = fs::remove_file(&socket);
    if let Some(p) = &proxy {
        p.flush_audit();
    }
    result
}

/// Each client connection holds two descriptors (client and Exchange): lift the soft limit
/// to the hard one, as nginx and HAProxy do.
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

/// One thread per CPU for the proxy (or `[proxy] threads`); one is enough without it.
fn runtime(config: &Config) -> anyhow::Result<tokio::runtime::Runtime> {
    let threads = match &config.proxy {
        None => 1,
        Some(p) if p.threads > 0 => p.threads,
        Some(_) => thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // One thread: everything runs on the thread that drives the runtime, with no
    // cross-thread wake-ups.
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    Ok(builder.thread_name("ewsgate-io").enable_all().build()?)
}

fn refuse_second_daemon(socket: &Path) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        anyhow::bail!("another ewsgate daemon answers on {}", socket.display());
    }
    Ok(())
}

fn bind_control(socket: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = socket.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = fs::remove_file(socket); // stale: refuse_second_daemon found nobody answering
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

async fn serve(
    listener: std::os::unix::net::UnixListener,
    tx: mpsc::Sender<Command>,
    config_path: PathBuf,
    mut done: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let listener = UnixListener::from_std(listener)?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut watch = tokio::time::interval(WATCH_EVERY);
    let mut seen = file_stamp(&config_path);
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => { tokio::spawn(client(stream, tx.clone())); }
                Err(e) => warn!(error = %e, "control socket accept"),
            },
            _ = hup.recv() => send(&tx, Command::Reload("SIGHUP"))?,
            _ = sweep.tick() => send(&tx, Command::Sweep)?,
            _ = watch.tick() => {
                let now = file_stamp(&config_path);
                if now != seen {
                    seen = now;
                    send(&tx, Command::Reload("config file changed"))?;
                }
            }
            _ = term.recv() => { info!("SIGTERM: exiting, XDP stays attached"); return Ok(()); }
            _ = int.recv() => { info!("SIGINT: exiting, XDP stays attached"); return Ok(()); }
            _ = &mut done => { info!("shutdown requested"); return Ok(()); }
        }
    }
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
            message: "the daemon is shutting down".into(),
        };
    }
    answer.await.unwrap_or(Response::Error {
        message: "no answer from the worker".into(),
    })
}

impl Worker {
    /// Returns true when the daemon should stop.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Sweep => {
                if let Err(e) = self.gate.maps.sweep() {
                    warn!(error = %e, "sweeping expired entries");
                }
                false
            }
            Command::Block(b) => {
                let net = IpNet::from(b.source);
                let reason = format!("ewsgate feedback: {}", b.reason);
                if let Err(e) = self.add(List::Block, net, Some(b.ttl_secs), Some(reason)) {
                    error!(error = %e, source = %b.source, "feedback block failed");
                }
                false
            }
            Command::Reload(why) => {
                let _ = self.reload(why);
                false
            }
            Command::Request(Request::Shutdown, reply) => {
                let _ = reply.send(Response::Ok {
                    message: "daemon stopping; XDP stays attached".into(),
                });
                true
            }
            Command::Request(req, reply) => {
                let _ = reply.send(self.request(req));
                false
            }
        }
    }

    fn reload(&mut self, why: &str) -> Result<String, String> {
        let started = Instant::now();
        let result = Config::load(&self.config.path)
            .map_err(|e| e.to_string())
            .and_then(|new| self.apply(new).map_err(|e| e.to_string()));
        let took = started.elapsed();
        self.last_reload = match &result {
            Ok(()) => {
                info!(
                    why,
                    seconds = took.as_secs_f64(),
                    prefixes = self.config.prefix_count(),
                    "reloaded"
                );
                format!("{why}: ok in {:.3} s", took.as_secs_f64())
            }
            Err(e) => {
                error!(why, error = %e, "reload rejected, running state kept");
                format!("{why}: rejected: {e}")
            }
        };
        result.map(|()| {
            format!(
                "reloaded {} prefixes in {:.3} s",
                self.config.prefix_count(),
                took.as_secs_f64()
            )
        })
    }

    fn apply(&mut self, new: Config) -> anyhow::Result<()> {
        if new.xdp.pin_dir != self.config.xdp.pin_dir
            || new.xdp.control_socket != self.config.xdp.control_socket
        {
            anyhow::bail!("pin_dir and control_socket change only with a restart");
        }
        let names = |c: &Config| c.groups.iter().map(|g| g.name.clone()).collect::<Vec<_>>();
        let regrouped = names(&new) != names(&self.config);
        if new.proxy.is_some() != self.proxy.is_some() {
            anyhow::bail!("adding or removing [proxy] needs a restart");
        }
        // Everything is checked before anything changes.
        let policy = self.proxy.as_ref().map(|p| p.prepare(&new)).transpose()?;
        self.gate.apply(&new)?;
        if regrouped {
            self.gate.maps.reset_group_hits()?;
        }
        if let (Some(proxy), Some(policy)) = (&self.proxy, policy) {
            proxy.commit(policy, &new);
        }
        self.config = new;
        Ok(())
    }

    fn request(&mut self, req: Request) -> Response {
        let result = match req {
            Request::Status => {
                return self.status().unwrap_or_else(|e| Response::Error {
                    message: e.to_string(),
                })
            }
            Request::Reload => self.reload("control request").map_err(anyhow::Error::msg),
            Request::Add {
                list,
                net,
                ttl_secs,
                reason,
            } => self.add(list, net, ttl_secs, reason),
            Request::Del { list, net } => self.del(list, net),
            Request::List { list } => return self.list(list),
            Request::Shutdown => Ok(String::new()),
        };
        match result {
            Ok(message) => Response::Ok { message },
            Err(e) => Response::Error {
                message: format!("{e:#}"),
            },
        }
    }

    fn add(
        &mut self,
        list: List,
        net: IpNet,
        ttl: Option<u64>,
        reason: Option<String>,
    ) -> anyhow::Result<String> {
        if net.trunc() != net {
            anyhow::bail!("{net} has host bits set; did you mean {}?", net.trunc());
        }
        if ttl == Some(0) {
            anyhow::bail!("--ttl must be at least 1 second");
        }
        self.gate
            .maps
            .add(list, net, ttl.map(Duration::from_secs))?;
        match reason {
            Some(r) => self.notes.insert((list, net), r),
            None => self.notes.remove(&(list, net)),
        };
        self.save_notes();
        info!(?list, %net, ttl, "entry added");
        Ok(format!("{net} added to the {} list", name(list)))
    }

    fn del(&mut self, list: List, net: IpNet) -> anyhow::Result<String> {
        if !self.gate.maps.remove(list, net)? {
            anyhow::bail!("{net} is not in the {} list", name(list));
        }
        self.notes.remove(&(list, net));
        self.save_notes();
        info!(?list, %net, "entry removed");
        Ok(format!("{net} removed from the {} list", name(list)))
    }

    fn list(&self, list: List) -> Response {
        let entries = self
            .gate
            .maps
            .list(list)
            .into_iter()
            .map(|e| Listed {
                reason: self.notes.get(&(list, e.net)).cloned(),
                net: e.net,
                ttl_left: e.ttl_left,
            })
            .collect();
        Response::Entries { entries }
    }

    fn status(&self) -> anyhow::Result<Response> {
        let maps = &self.gate.maps;
        let settings = maps.settings()?;
        let hits = maps.group_hits()?;
        let c = &self.config;
        Ok(Response::Status(Box::new(Status {
            config: c.path.display().to_string(),
            pin_dir: self.gate.pins().root().display().to_string(),
            start: format!("{:?}", self.gate.start).to_lowercase(),
            monitor: settings.monitor != 0,
            generation: settings.generation,
            interfaces: self
                .gate
                .attached
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            protected: c.protect.iter().map(describe_protected).collect(),
            prefixes_v4: c.groups.iter().map(|g| g.v4.len()).sum(),
            prefixes_v6: c.groups.iter().map(|g| g.v6.len()).sum(),
            block_entries: maps.list(List::Block).len(),
            allow_entries: maps.list(List::Allow).len(),
            counters: maps
                .counters()?
                .into_iter()
                .map(|(r, n)| (r.name().to_string(), n))
                .collect(),
            groups: c
                .groups
                .iter()
                .enumerate()
                .map(|(i, g)| (g.name.clone(), hits[i + 1]))
                .collect(),
            last_reload: self.last_reload.clone(),
        })))
    }

    fn save_notes(&self) {
        let list: Vec<(&(List, IpNet), &String)> = self.notes.iter().collect();
        if let Ok(text) = serde_json::to_string(&list) {
            if let Err(e) = fs::write(&self.notes_path, text) {
                warn!(error = %e, path = %self.notes_path.display(), "saving entry reasons");
            }
        }
    }
}

fn load_notes(path: &Path) -> BTreeMap<(List, IpNet), String> {
    let Ok(text) = fs::read_to_string(path) else {
        return BTreeMap::new();
    };
    let list: Vec<((List, IpNet), String)> = serde_json::from_str(&text).unwrap_or_default();
    list.into_iter().collect()
}

fn name(list: List) -> &'static str {
    match list {
        List::Block => "block",
        List::Allow => "allow",
    }
}

fn describe_protected(p: &crate::model::packet::Protected) -> String {
    if p.ports.is_empty() {
        return format!("{} (all ports)", p.addr);
    }
    let ports: Vec<String> = p
        .ports
        .iter()
        .map(|(proto, port)| format!("{}/{port}", if *proto == 6 { "tcp" } else { "udp" }))
        .collect();
    format!("{} {}", p.addr, ports.join(","))
}
