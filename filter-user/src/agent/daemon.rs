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
        claims::{self, BlockSet, Claim, Ledger, Source},
        control::{Listed, Request, Response, Status},
        feedback::Block,
        feeds::Update,
        tasks::{Agent, Ask, Sink},
    },
    config::save_copy,
    model::Config,
    packet::{
        maps::{monotonic_ns, List, Maps},
        xdp::Gate,
    },
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
    /// From the feed and CrowdSec tasks.
    Agent(Ask),
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
    /// Who holds each block entry (administrator, feedback, CrowdSec).
    ledger: Ledger,
    ledger_path: PathBuf,
    agent: Agent,
    runtime: tokio::runtime::Handle,
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
    let ledger_path = socket.with_extension("claims.json");
    let ledger = load_ledger(&ledger_path, &gate.maps, &notes);
    let asks = tx.clone();
    let sink: Sink = Arc::new(move |a| asks.send(Command::Agent(a)).is_ok());
    let agent = Agent::start(&config, sink, rt.handle());
    let mut worker = Worker {
        gate,
        config,
        notes,
        notes_path,
        last_reload: "at start: ok".into(),
        proxy: proxy.clone(),
        ledger,
        ledger_path,
        agent,
        runtime: rt.handle().clone(),
    };
    worker.save_ledger();
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
                if self.ledger.sweep(monotonic_ns()) > 0 {
                    self.save_ledger();
                }
                false
            }
            Command::Block(b) => {
                let net = IpNet::from(b.source);
                let reason = format!("ewsgate feedback: {}", b.reason);
                if let Err(e) = self.block(net, Source::Feedback, Some(b.ttl_secs), reason) {
                    error!(error = %e, source = %b.source, "feedback block failed");
                }
                false
            }
            Command::Agent(Ask::Feed(update, reply)) => {
                let _ = reply.send(self.feed(update));
                false
            }
            Command::Agent(Ask::Claims(batch, reply)) => {
                let mut blocks = Blocks {
                    maps: &mut self.gate.maps,
                    notes: &mut self.notes,
                };
                let outcome = claims::apply(&mut self.ledger, batch, monotonic_ns(), &mut blocks);
                self.save_notes();
                self.save_ledger();
                let _ = reply.send(outcome);
                false
            }
            Command::Request(Request::FeedRefresh { group }, reply) => {
                let (tx, rx) = oneshot::channel();
                self.agent.refresh(group, tx);
                self.runtime.spawn(async move {
                    let response = match rx.await {
                        Ok(Ok(message)) => Response::Ok { message },
                        Ok(Err(message)) => Response::Error { message },
                        Err(_) => Response::Error {
                            message: "no answer from the feed task".into(),
                        },
                    };
                    let _ = reply.send(response);
                });
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
        self.agent.publish(&self.config);
        Ok(())
    }

    /// A live feed's accepted document: the group reloads through `apply` (all or nothing),
    /// then the copy is saved as the last good one.
    fn feed(&mut self, u: Update) -> Result<String, String> {
        let started = Instant::now();
        let mut new = self.config.clone();
        let changed = new.set_feed(&u.group, u.nets, u.meta.clone())?;
        if changed {
            self.apply(new).map_err(|e| format!("{e:#}"))?;
            self.last_reload = format!(
                "feed {}: ok in {:.3} s",
                u.group,
                started.elapsed().as_secs_f64()
            );
            info!(group = %u.group, seconds = started.elapsed().as_secs_f64(), prefixes = self.config.prefix_count(), "reloaded for a feed");
        } else {
            self.config = new;
            self.agent.publish(&self.config);
        }
        let dir = &self.config.feeds.state_dir;
        if let Err(e) = save_copy(dir, &u.group, &u.meta, &u.document) {
            error!(group = %u.group, error = %e, dir = %dir.display(), "feed: in force, but its copy could not be saved");
            return Ok(format!("in force; the copy was not saved: {e}"));
        }
        Ok(if changed { "reloaded" } else { "unchanged" }.into())
    }

    /// Sets `source`'s claim on a block entry; the entry follows all claims on it.
    fn block(
        &mut self,
        net: IpNet,
        source: Source,
        ttl: Option<u64>,
        reason: String,
    ) -> anyhow::Result<()> {
        let until = ttl.map(|t| monotonic_ns().saturating_add(t.saturating_mul(1_000_000_000)));
        let before = self.ledger.claims(&net).cloned();
        let effect = self.ledger.claim(net, source, Claim { until, reason });
        let mut out = claims::Outcome::default();
        let mut blocks = Blocks {
            maps: &mut self.gate.maps,
            notes: &mut self.notes,
        };
        claims::enact(
            &mut self.ledger,
            net,
            Some(before),
            effect,
            &mut blocks,
            &mut out,
        );
        self.save_notes();
        self.save_ledger();
        match out.failed.first() {
            Some(f) => anyhow::bail!("{f}"),
            None => Ok(()),
        }
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
            // Answered by the worker's `handle`, never here.
            Request::Shutdown | Request::FeedRefresh { .. } => Ok(String::new()),
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
        if list == List::Block {
            self.block(
                net,
                Source::Manual,
                ttl,
                reason.unwrap_or_else(|| "manual".into()),
            )?;
            info!(?list, %net, ttl, "entry added");
            return Ok(format!("{net} added to the block list"));
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
        // An administrator's removal lifts every claim on the entry.
        let holders = match list {
            List::Block => self.ledger.release_all(&net),
            List::Allow => Vec::new(),
        };
        if !holders.is_empty() {
            self.save_ledger();
        }
        if !self.gate.maps.remove(list, net)? {
            anyhow::bail!("{net} is not in the {} list", name(list));
        }
        self.notes.remove(&(list, net));
        self.save_notes();
        info!(?list, %net, ?holders, "entry removed");
        let others: Vec<&str> = holders
            .iter()
            .filter(|s| **s != Source::Manual)
            .map(|s| s.name())
            .collect();
        Ok(match others.is_empty() {
            true => format!("{net} removed from the {} list", name(list)),
            false => format!(
                "{net} removed from the {} list (also held by {}; it may block it again)",
                name(list),
                others.join(", ")
            ),
        })
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
            feeds: self.agent.feeds_status(),
            crowdsec: self.agent.crowdsec_status(),
        })))
    }

    fn save_ledger(&self) {
        if let Ok(text) = serde_json::to_string(&self.ledger) {
            if let Err(e) = fs::write(&self.ledger_path, text) {
                warn!(error = %e, path = %self.ledger_path.display(), "saving block claims");
            }
        }
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

/// The claims saved by the last daemon, checked against the maps it left: claims on entries
/// that are gone are dropped, entries nobody claims are the administrator's.
fn load_ledger(path: &Path, maps: &Maps, notes: &BTreeMap<(List, IpNet), String>) -> Ledger {
    let mut ledger: Ledger = fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let now = monotonic_ns();
    let entries = maps.list(List::Block);
    let present: std::collections::BTreeSet<IpNet> = entries.iter().map(|e| e.net).collect();
    for net in ledger.nets() {
        if !present.contains(&net) {
            ledger.release_all(&net);
        }
    }
    for e in entries {
        if !ledger.knows(&e.net) {
            let claim = Claim {
                until: e
                    .ttl_left
                    .map(|s| now.saturating_add(s.saturating_mul(1_000_000_000))),
                reason: notes
                    .get(&(List::Block, e.net))
                    .cloned()
                    .unwrap_or_else(|| "manual".into()),
            };
            ledger.claim(e.net, Source::Manual, claim);
        }
    }
    ledger
}

/// The block set as the ledger writes it: the maps and the entries' reasons.
struct Blocks<'a> {
    maps: &'a mut Maps,
    notes: &'a mut BTreeMap<(List, IpNet), String>,
}

impl BlockSet for Blocks<'_> {
    fn write(&mut self, net: IpNet, until: Option<u64>, reason: &str) -> Result<(), String> {
        let ttl = match until {
            None => None,
            Some(u) => match u.checked_sub(monotonic_ns()) {
                Some(left) if left > 0 => Some(Duration::from_nanos(left)),
                _ => return self.remove(net),
            },
        };
        self.maps
            .add(List::Block, net, ttl)
            .map_err(|e| e.to_string())?;
        self.notes.insert((List::Block, net), reason.to_string());
        Ok(())
    }

    fn remove(&mut self, net: IpNet) -> Result<(), String> {
        self.maps
            .remove(List::Block, net)
            .map_err(|e| e.to_string())?;
        self.notes.remove(&(List::Block, net));
        Ok(())
    }
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
