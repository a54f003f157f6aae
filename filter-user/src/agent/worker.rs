//! The agent's worker: one thread owns the loaded program, its maps, the running config and
//! everything derived from them. Control requests, reloads, the expiry sweep, the proxy's
//! failure reports and its questions all arrive as commands, one at a time.
//!
//! A reload is all or nothing. The new config is read and checked whole (its proxy policy
//! is built here as the proxy would build it), the proxy is asked to prepare it, the XDP
//! tables are applied, and only then is the proxy told to commit. Any refusal on the way
//! leaves everything as it was, and `status` says why.

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use tracing::{error, info, warn};

use crate::{
    agent::{
        claims::{self, BlockSet, Claim, Ledger, Source},
        control::{Listed, Request, Response, Status},
        feedback::{Action, Feedback},
        feeds::Update,
        fleet::Local,
        supervisor::{Ask, ProxyLink},
        tasks::{self, Agent},
    },
    config::{self, copy_bytes, copy_path, save_copy, Bundle},
    ipc::{Detected, EntryChange, Failure, Init, PolicyState, ToProxy},
    model::{
        fleet::{Revision, Set},
        packet::Protected,
        Config,
    },
    packet::{
        maps::{List, Maps},
        xdp::Gate,
    },
    proxy::{admission::monotonic_ns, state::State},
};

pub enum Command {
    Request(Request, tokio::sync::oneshot::Sender<Response>),
    Reload(&'static str),
    Sweep,
    Proxy(Ask),
    /// From the feed and CrowdSec tasks.
    Agent(tasks::Ask),
    /// The audit log was rotated: reopen it and hand it to the proxy.
    ReopenAudit,
}

/// State owned by the worker thread.
pub struct Worker {
    pub gate: Gate,
    pub config: Config,
    bundle: Bundle,
    policy_id: u64,
    /// Free-text reasons for dynamic entries (the kernel keeps only the entry).
    notes: BTreeMap<(List, IpNet), String>,
    notes_path: PathBuf,
    last_reload: String,
    /// Reload counts and the last one's duration and result, for `/metrics`.
    reloads: crate::agent::metrics::ReloadStats,
    proxy: Option<ProxyLink>,
    feedback: Feedback,
    /// Identities refused at the request layer: until, reason.
    refused: BTreeMap<String, (Instant, String)>,
    /// Who holds each block entry (administrator, feedback, CrowdSec).
    ledger: Ledger,
    ledger_path: PathBuf,
    /// The feed and CrowdSec tasks.
    agent: Agent,
    runtime: tokio::runtime::Handle,
    /// The last sighting published per user: a user's place goes to the fleet when it
    /// changes, or once a minute, not on every request.
    seen_sent: std::collections::HashMap<String, (Option<std::net::IpAddr>, Option<String>, u64)>,
    /// Dynamic allows the fleet holds here (so a full list can drop the rest).
    fleet_allows: std::collections::BTreeSet<IpNet>,
}

impl Worker {
    pub fn new(
        gate: Gate,
        config: Config,
        bundle: Bundle,
        proxy: Option<ProxyLink>,
        agent: Agent,
        runtime: tokio::runtime::Handle,
    ) -> Worker {
        let socket = &config.xdp.control_socket;
        let notes_path = socket.with_extension("notes.json");
        let notes = load_notes(&notes_path);
        let ledger_path = socket.with_extension("claims.json");
        let ledger = load_ledger(&ledger_path, &gate.maps, &notes);
        Worker {
            notes,
            notes_path,
            ledger,
            ledger_path,
            agent,
            runtime,
            fleet_allows: Default::default(),
            seen_sent: Default::default(),
            feedback: Feedback::new(&config),
            gate,
            config,
            bundle,
            policy_id: 1,
            last_reload: "at start: ok".into(),
            reloads: Default::default(),
            proxy,
            refused: BTreeMap::new(),
        }
    }

    /// Serves commands until asked to stop.
    pub fn run(mut self, rx: mpsc::Receiver<Command>) {
        self.save_ledger();
        while let Ok(cmd) = rx.recv() {
            if self.handle(cmd) {
                break;
            }
        }
    }

    /// Returns true when the agent should stop.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Sweep => self.sweep(),
            Command::Reload(why) => {
                let _ = self.reload(why);
            }
            Command::Proxy(Ask::Init(reply)) => {
                let _ = reply.send(self.init());
            }
            Command::Proxy(Ask::Failures(items)) => self.failures(&items),
            Command::Proxy(Ask::Detected(items)) => self.detected(items),
            Command::Proxy(Ask::Metrics(id)) => self.metrics(id),
            Command::Proxy(Ask::Seen(items)) => self.seen(items),
            Command::Agent(tasks::Ask::RemoteSeen(items)) => {
                self.send(ToProxy::Seen { items });
            }
            Command::Agent(tasks::Ask::Feed(update, reply)) => {
                let _ = reply.send(self.feed(update));
            }
            Command::Agent(tasks::Ask::Claims(batch, reply)) => {
                let mut blocks = Blocks::new(&mut self.gate.maps, &mut self.notes);
                let outcome = claims::apply(&mut self.ledger, batch, monotonic_ns(), &mut blocks);
                let changes = blocks.changes;
                self.push(changes);
                self.save_notes();
                self.save_ledger();
                let _ = reply.send(outcome);
            }
            Command::Agent(tasks::Ask::FleetAllows { full, set, release }) => {
                self.fleet_allows_changed(full, set, release)
            }
            Command::Agent(tasks::Ask::RemoteFailures { full, counts }) => {
                if full {
                    self.feedback.clear_remote();
                }
                for (source, gate, count) in counts {
                    self.feedback.set_remote(source, gate, count);
                }
            }
            Command::Agent(tasks::Ask::FleetConfig(revision, rev, reply)) => {
                let _ = reply.send(self.fleet_config(*revision, rev));
            }
            Command::Request(Request::FeedRefresh { group }, reply) => self.refresh(group, reply),
            Command::ReopenAudit => self.reopen_audit(),
            Command::Request(Request::Shutdown, reply) => {
                let _ = reply.send(Response::Ok {
                    message: "agent stopping; XDP stays attached".into(),
                });
                return true;
            }
            Command::Request(req, reply) => {
                let _ = reply.send(self.request(req));
            }
        }
        false
    }

    fn send(&self, msg: ToProxy) {
        if let Some(p) = &self.proxy {
            p.send(msg);
        }
    }

    /// Changes to the dynamic sets, for the proxy's copy.
    fn push(&self, changes: Vec<EntryChange>) {
        if !changes.is_empty() {
            self.send(ToProxy::Entries {
                changes,
                reset: false,
            });
        }
    }

    fn refresh(&self, group: Option<String>, reply: tokio::sync::oneshot::Sender<Response>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
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
    }

    /// A live feed's accepted document. The copy joins the config's bundle, the config is
    /// read again from it (so the proxy reads exactly the same), and a change in the group's
    /// prefixes goes through the normal all-or-nothing apply; only then is the copy saved
    /// as the last good one.
    fn feed(&mut self, u: Update) -> Result<String, String> {
        let started = Instant::now();
        let dir = self.config.feeds.state_dir.clone();
        let bytes = copy_bytes(&u.meta, &u.document).map_err(|e| e.to_string())?;
        let mut bundle = self.bundle.clone();
        bundle.files.insert(copy_path(&dir, &u.group), bytes);
        let new = Config::from_bundle(&bundle).map_err(|e| e.to_string())?;
        let prefixes = |c: &Config| {
            c.groups
                .iter()
                .find(|g| g.name == u.group)
                .map(|g| (g.v4.clone(), g.v6.clone()))
        };
        let changed = prefixes(&new) != prefixes(&self.config);
        if changed {
            self.apply(new, bundle).map_err(|e| format!("{e:#}"))?;
            self.last_reload = format!(
                "feed {}: ok in {:.3} s",
                u.group,
                started.elapsed().as_secs_f64()
            );
            info!(group = %u.group, seconds = started.elapsed().as_secs_f64(), prefixes = self.config.prefix_count(), "reloaded for a feed");
        } else {
            self.config = new;
            self.bundle = bundle;
            self.agent.publish(&self.config);
        }
        if let Err(e) = save_copy(&dir, &u.group, &u.meta, &u.document) {
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
        let mut blocks = Blocks::new(&mut self.gate.maps, &mut self.notes);
        claims::enact(
            &mut self.ledger,
            net,
            Some(before),
            effect,
            &mut blocks,
            &mut out,
        );
        let changes = blocks.changes;
        self.push(changes);
        self.save_notes();
        self.save_ledger();
        if out.failed.is_empty() {
            self.agent.fleet.tell(Local::Put {
                set: Set::Block,
                net,
                until_ms: ttl.map(|t| fleet_until(Duration::from_secs(t))),
                reason: self
                    .notes
                    .get(&(List::Block, net))
                    .cloned()
                    .unwrap_or_default(),
            });
        }
        match out.failed.first() {
            Some(f) => anyhow::bail!("{f}"),
            None => Ok(()),
        }
    }

    fn save_ledger(&self) {
        if let Ok(text) = serde_json::to_string(&self.ledger) {
            if let Err(e) = fs::write(&self.ledger_path, text) {
                warn!(error = %e, path = %self.ledger_path.display(), "saving block claims");
            }
        }
    }

    fn sweep(&mut self) {
        if self.ledger.sweep(monotonic_ns()) > 0 {
            self.save_ledger();
        }
        self.agent.fleet.tell(Local::Counts {
            blocks: self.gate.maps.list(List::Block).len(),
            allows: self.gate.maps.list(List::Allow).len(),
        });
        match self.gate.maps.sweep() {
            Ok(0) => {}
            Ok(_) => {
                self.prune_notes();
                self.send(ToProxy::Entries {
                    changes: self.entries(),
                    reset: true,
                });
            }
            Err(e) => warn!(error = %e, "sweeping expired entries"),
        }
        let now = Instant::now();
        self.refused.retain(|_, (until, _)| *until > now);
    }

    /// Notes of entries that are no longer in the maps go with them.
    fn prune_notes(&mut self) {
        let live: std::collections::BTreeSet<(List, IpNet)> = [List::Block, List::Allow]
            .into_iter()
            .flat_map(|l| self.gate.maps.list(l).into_iter().map(move |e| (l, e.net)))
            .collect();
        let before = self.notes.len();
        self.notes.retain(|k, _| live.contains(k));
        if self.notes.len() != before {
            self.save_notes();
        }
    }

    /// The dynamic sets as they stand, as the proxy holds them.
    fn entries(&self) -> Vec<EntryChange> {
        let now = monotonic_ns();
        [List::Block, List::Allow]
            .into_iter()
            .flat_map(|list| {
                self.gate
                    .maps
                    .list(list)
                    .into_iter()
                    .map(move |e| EntryChange {
                        list,
                        net: e.net,
                        expires_ns: e.ttl_left.map_or(0, |s| now + s * 1_000_000_000),
                        add: true,
                    })
            })
            .collect()
    }

    fn init(&self) -> Init {
        let now = Instant::now();
        Init {
            listeners: Vec::new(),
            audit_file: false,
            policy: PolicyState {
                id: self.policy_id,
                bundle: self.bundle.clone(),
                generation: self.generation(),
            },
            entries: self.entries(),
            metrics: None,
            refused: self
                .refused
                .iter()
                .filter(|(_, (until, _))| *until > now)
                .map(|(k, (until, why))| (k.clone(), (*until - now).as_secs().max(1), why.clone()))
                .collect(),
        }
    }

    /// Answers a scrape with the packet layer's part (an error is logged and answered with
    /// nothing, so the scrape shows the agent as down rather than wrong numbers).
    fn metrics(&self, id: u64) {
        match crate::agent::metrics::render(&self.gate.maps, &self.config, &self.reloads) {
            Ok(text) => self.send(ToProxy::Metrics { id, text }),
            Err(e) => warn!(error = %e, "reading the maps for /metrics"),
        }
    }

    fn generation(&self) -> u32 {
        self.gate.maps.settings().map_or(0, |s| s.generation)
    }

    fn failures(&mut self, items: &[Failure]) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for f in items {
            for action in self.feedback.record(f, now) {
                self.act(action);
            }
            if f.class != crate::model::outcome::FailureClass::Policy {
                // This gate's count, for the fleet-wide threshold at the other gates.
                self.agent.fleet.tell(Local::Failures {
                    source: f.source,
                    count: self.feedback.count(f.source, now),
                    until_ms: now + self.config.feedback.window.as_millis() as u64,
                });
            }
        }
    }

    /// A detection's action, within the agent's own policy: a source is blocked only when it
    /// is in no group or in a group `[detections] block_groups` names, whatever the proxy
    /// said.
    fn detected(&mut self, items: Vec<Detected>) {
        for d in items {
            match d {
                Detected::RefuseIdentity {
                    detection,
                    identity,
                    secs,
                } => self.act(Action::RefuseIdentity {
                    identity,
                    secs: u64::from(secs),
                    reason: format!("detection {detection}"),
                }),
                Detected::BlockSource {
                    detection,
                    source,
                    secs,
                } => {
                    let group = self.feedback.group_of(source);
                    let blockable = &self.config.ops.detections.block_groups;
                    if !group.is_none_or(|g| blockable.iter().any(|b| b == g)) {
                        warn!(%source, ?group, detection, "a detection asked to block a source its group protects; not blocked");
                        continue;
                    }
                    let note = format!("ewsgate detection: {detection}");
                    warn!(%source, secs, detection, "source blocked in XDP by a detection");
                    let net = IpNet::from(source);
                    if let Err(e) = self.block(net, Source::Detection, Some(u64::from(secs)), note)
                    {
                        error!(error = %e, %source, "detection block failed");
                    }
                }
            }
        }
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::BlockSource {
                source,
                ttl_secs,
                reason,
            } => {
                warn!(%source, ttl = ttl_secs, %reason, "source blocked in XDP");
                let note = format!("ewsgate feedback: {reason}");
                let net = IpNet::from(source);
                if let Err(e) = self.block(net, Source::Feedback, Some(ttl_secs), note) {
                    error!(error = %e, %source, "feedback block failed");
                }
            }
            Action::RefuseIdentity {
                identity,
                secs,
                reason,
            } => {
                warn!(%identity, secs, %reason, "identity refused at the request layer");
                let until = Instant::now() + Duration::from_secs(secs);
                self.refused
                    .insert(identity.clone(), (until, reason.clone()));
                self.send(ToProxy::RefuseIdentity {
                    identity,
                    secs,
                    reason,
                });
            }
        }
    }

    fn reopen_audit(&self) {
        let (Some(p), Some(path)) = (
            &self.proxy,
            self.config.proxy.as_ref().and(self.config.ops.audit.file()),
        ) else {
            return;
        };
        match crate::agent::supervisor::open_audit(path) {
            Ok(f) => {
                info!(path = %path.display(), "audit log reopened");
                p.audit_file(f);
            }
            Err(e) => error!(error = %format!("{e:#}"), "reopening the audit log"),
        }
    }

    fn reload(&mut self, why: &str) -> Result<String, String> {
        let started = Instant::now();
        let result = config::load_bundle(&self.config.path)
            .map_err(|e| e.to_string())
            .and_then(|(new, bundle)| self.apply(new, bundle).map_err(|e| format!("{e:#}")));
        let took = started.elapsed();
        self.reloads.record(result.is_ok(), took);
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
                error!(why, error = %e, "reload refused, running state kept");
                format!("{why}: refused: {e}")
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

    /// Applies a new config whole, or nothing of it.
    fn apply(&mut self, new: Config, bundle: Bundle) -> anyhow::Result<()> {
        restart_only(&self.config, &new)?;
        let id = self.policy_id + 1;
        if new.proxy.is_some() {
            // Built here exactly as the proxy will build it: a certificate, key or token
            // setting the proxy would refuse refuses the reload, proxy running or not.
            State::build(id, self.generation(), &bundle, None)?;
        }
        let policy = PolicyState {
            id,
            bundle: bundle.clone(),
            generation: self.generation(),
        };
        if let Some(p) = &self.proxy {
            p.prepare(policy)
                .map_err(|reason| anyhow::anyhow!("the proxy refused the policy: {reason}"))?;
        }
        let regrouped = group_names(&new) != group_names(&self.config);
        if let Err(e) = self.gate.apply(&new) {
            self.send(ToProxy::Abort { id });
            return Err(e.into());
        }
        if regrouped {
            self.gate.maps.reset_group_hits()?;
        }
        self.send(ToProxy::Commit {
            id,
            generation: self.generation(),
        });
        self.feedback.reconfigure(&new);
        self.policy_id = id;
        self.config = new;
        self.bundle = bundle;
        self.agent.publish(&self.config);
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
            Request::Explain { query } => return self.explain(&query),
            // Answered by `handle`, never here.
            Request::Shutdown | Request::FeedRefresh { .. } => Ok(String::new()),
        };
        match result {
            Ok(message) => Response::Ok { message },
            Err(e) => Response::Error {
                message: format!("{e:#}"),
            },
        }
    }

    /// `ewsgate explain`: the running config, the live program's verdict for the source
    /// (BPF_PROG_TEST_RUN), the identities refused now.
    fn explain(&mut self, query: &crate::ops::explain::Query) -> Response {
        use crate::{ops::explain, packet::probe};
        let error = |message: String| Response::Error { message };
        let source = match query.check() {
            Ok((_, source)) => source,
            Err(e) => return error(e.to_string()),
        };
        let packet = match explain::destination(&self.config, source) {
            Some((dest, port)) => match probe::probe(&mut self.gate, source, dest, port) {
                Ok(v) => v,
                Err(e) => return error(format!("packet probe: {e}")),
            },
            None => probe::PacketVerdict {
                action: "pass".into(),
                reason: "not_bound".into(),
                monitor: false,
                by: "the config (no protected address of the source's family)".into(),
                also_moved: Vec::new(),
            },
        };
        let now = Instant::now();
        let refused = |identity: &str| {
            self.refused
                .get(identity)
                .filter(|(until, _)| *until > now)
                .map(|(_, why)| why.clone())
        };
        let inputs = explain::Inputs {
            config: &self.config,
            bundle: &self.bundle,
            packet,
            refused: &refused,
            against: format!("the running gate ({})", self.config.path.display()),
        };
        match explain::explain(&inputs, query) {
            Ok(e) => Response::Explained(Box::new(e)),
            Err(e) => error(e.to_string()),
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
            let reason = reason.unwrap_or_else(|| "manual".into());
            self.block(net, Source::Manual, ttl, reason)?;
            info!(?list, %net, ttl, "entry added");
            return Ok(format!("{net} added to the block list"));
        }
        let expires_ns = ttl.map_or(0, |s| monotonic_ns() + s * 1_000_000_000);
        self.gate
            .maps
            .add(list, net, ttl.map(Duration::from_secs))?;
        self.send(ToProxy::Entries {
            changes: vec![EntryChange {
                list,
                net,
                expires_ns,
                add: true,
            }],
            reset: false,
        });
        self.agent.fleet.tell(Local::Put {
            set: Set::Allow,
            net,
            until_ms: ttl.map(|t| fleet_until(Duration::from_secs(t))),
            reason: reason.clone().unwrap_or_else(|| "manual".into()),
        });
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
        // Lifted for the whole fleet, also when this gate held no entry for it.
        let set = match list {
            List::Block => Set::Block,
            List::Allow => Set::Allow,
        };
        self.agent.fleet.tell(Local::Delete { set, net });
        if list == List::Allow {
            self.fleet_allows.remove(&net);
        }
        if !self.gate.maps.remove(list, net)? {
            anyhow::bail!("{net} is not in the {} list", name(list));
        }
        self.send(ToProxy::Entries {
            changes: vec![EntryChange {
                list,
                net,
                expires_ns: 0,
                add: false,
            }],
            reset: false,
        });
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
            policy: self.policy_id,
            refused_identities: self.refused.len(),
            feeds: self.agent.feeds_status(),
            crowdsec: self.agent.crowdsec_status(),
            fleet: self.agent.fleet.status(),
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

impl Worker {
    /// The proxy's sightings, for the fleet (only with `[fleet]`).
    fn seen(&mut self, items: Vec<crate::ipc::Seen>) {
        if self.config.fleet.is_none() {
            return;
        }
        if self.seen_sent.len() > 100_000 {
            self.seen_sent.clear();
        }
        for s in items {
            let place = (s.source, s.group.clone());
            let fresh = match self.seen_sent.get(&s.user) {
                Some((src, grp, at)) => {
                    (src, grp) != (&place.0, &place.1) || s.time_ms.saturating_sub(*at) >= 60_000
                }
                None => true,
            };
            if fresh {
                self.seen_sent
                    .insert(s.user.clone(), (place.0, place.1, s.time_ms));
                self.agent.fleet.tell(Local::Seen(s));
            }
        }
    }

    /// The fleet's allows: written into the allow set, lapsing on their own expiry.
    fn fleet_allows_changed(
        &mut self,
        full: bool,
        set: Vec<(IpNet, Option<Duration>)>,
        release: Vec<IpNet>,
    ) {
        let now = monotonic_ns();
        let mut changes = Vec::new();
        let keep: std::collections::BTreeSet<IpNet> = set.iter().map(|(n, _)| *n).collect();
        let mut gone = release;
        if full {
            gone.extend(self.fleet_allows.iter().filter(|n| !keep.contains(n)));
        }
        for net in gone {
            if self.fleet_allows.remove(&net) {
                if let Err(e) = self.gate.maps.remove(List::Allow, net) {
                    warn!(%net, error = %e, "fleet: removing an allow");
                }
                changes.push(EntryChange {
                    list: List::Allow,
                    net,
                    expires_ns: 0,
                    add: false,
                });
            }
        }
        for (net, ttl) in set {
            match self.gate.maps.add(List::Allow, net, ttl) {
                Ok(()) => {
                    self.fleet_allows.insert(net);
                    changes.push(EntryChange {
                        list: List::Allow,
                        net,
                        expires_ns: ttl.map_or(0, |t| now + t.as_nanos() as u64),
                        add: true,
                    });
                }
                Err(e) => warn!(%net, error = %e, "fleet: writing an allow"),
            }
        }
        self.push(changes);
    }

    /// A fleet config revision: this gate's own `[xdp]` and `[fleet]` joined to it, checked
    /// and applied through the same all-or-nothing path as a reload.
    fn fleet_config(&mut self, revision: Revision, rev: i64) -> Result<String, String> {
        let started = Instant::now();
        let bundle = compose(&self.bundle, &self.config, revision)?;
        // Its path is the local file's: a local reload (SIGHUP) reads that file again.
        let new = Config::from_bundle(&bundle).map_err(|e| e.to_string())?;
        let result = self.apply(new, bundle).map_err(|e| format!("{e:#}"));
        self.last_reload = match &result {
            Ok(()) => format!(
                "fleet revision {rev}: ok in {:.3} s",
                started.elapsed().as_secs_f64()
            ),
            Err(e) => format!("fleet revision {rev}: refused: {e}"),
        };
        result.map(|()| format!("revision {rev} in force"))
    }
}

/// A fleet revision with this gate's `[xdp]` and `[fleet]` appended (the revision carries
/// neither), read as if it were this gate's config file: relative names resolve against
/// this gate's config directory.
fn compose(current: &Bundle, config: &Config, r: Revision) -> Result<Bundle, String> {
    let local: toml::Table = toml::from_str(&current.text)
        .map_err(|e| format!("the running config does not parse again: {e}"))?;
    let mut own = toml::Table::new();
    for key in ["xdp", "fleet"] {
        if let Some(v) = local.get(key) {
            own.insert(key.into(), v.clone());
        }
    }
    // Relative names resolve against this gate's config directory (an audit log, a state
    // directory), so the files the revision carries move there with them.
    let (from, to) = (
        r.path.parent().unwrap_or(std::path::Path::new("/")),
        config.path.parent().unwrap_or(std::path::Path::new("/")),
    );
    let mut files: BTreeMap<PathBuf, Vec<u8>> = r
        .files
        .into_iter()
        .map(|(p, bytes)| match p.strip_prefix(from) {
            Ok(rel) => (to.join(rel), bytes),
            Err(_) => (p, bytes),
        })
        .collect();
    if let (Some(toml::Value::Table(f)), Some(tls)) = (
        own.get_mut("fleet"),
        config.fleet.as_ref().and_then(|f| f.tls.as_ref()),
    ) {
        for (key, path) in [
            ("ca", &tls.ca),
            ("certificate", &tls.certificate),
            ("private_key", &tls.private_key),
        ] {
            f.insert(key.into(), path.display().to_string().into());
            if let Some(bytes) = current.files.get(path) {
                files.insert(path.clone(), bytes.clone());
            }
        }
    }
    let own = toml::to_string(&own).map_err(|e| format!("writing [xdp] and [fleet]: {e}"))?;
    Ok(Bundle {
        path: config.path.clone(),
        text: format!("{}\n\n{own}", r.text.trim_end()),
        files,
    })
}

/// Unix ms `left` from now: the fleet's clock for expiries (each gate turns it back into
/// its own monotonic clock).
fn fleet_until(left: Duration) -> u64 {
    crate::agent::fleet::unix_ms().saturating_add(left.as_millis() as u64)
}

/// What a reload cannot change while the agent runs.
fn restart_only(old: &Config, new: &Config) -> anyhow::Result<()> {
    if new.xdp.pin_dir != old.xdp.pin_dir || new.xdp.control_socket != old.xdp.control_socket {
        anyhow::bail!("pin_dir and control_socket change only with a restart");
    }
    match (&old.proxy, &new.proxy) {
        (None, None) => Ok(()),
        _ if old.metrics != new.metrics => {
            anyhow::bail!("[metrics] changes only with a restart")
        }
        (Some(a), Some(b))
            if a.listen == b.listen && a.user == b.user && a.threads == b.threads =>
        {
            Ok(())
        }
        (Some(_), Some(_)) => {
            anyhow::bail!("[proxy] listen, user and threads change only with a restart")
        }
        _ => anyhow::bail!("adding or removing [proxy] needs a restart"),
    }
}

fn group_names(c: &Config) -> Vec<&str> {
    c.groups.iter().map(|g| g.name.as_str()).collect()
}

fn load_notes(path: &std::path::Path) -> BTreeMap<(List, IpNet), String> {
    let Ok(text) = fs::read_to_string(path) else {
        return BTreeMap::new();
    };
    let list: Vec<((List, IpNet), String)> = serde_json::from_str(&text).unwrap_or_default();
    list.into_iter().collect()
}

/// The claims saved by the last agent, checked against the maps it left: claims on entries
/// that are gone are dropped, entries nobody claims are the administrator's.
fn load_ledger(
    path: &std::path::Path,
    maps: &Maps,
    notes: &BTreeMap<(List, IpNet), String>,
) -> Ledger {
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

/// The block set as the ledger writes it: the maps, the entries' reasons, and the changes
/// the proxy's copy needs.
struct Blocks<'a> {
    maps: &'a mut Maps,
    notes: &'a mut BTreeMap<(List, IpNet), String>,
    changes: Vec<EntryChange>,
}

impl<'a> Blocks<'a> {
    fn new(maps: &'a mut Maps, notes: &'a mut BTreeMap<(List, IpNet), String>) -> Blocks<'a> {
        Blocks {
            maps,
            notes,
            changes: Vec::new(),
        }
    }
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
        self.changes.push(EntryChange {
            list: List::Block,
            net,
            expires_ns: until.unwrap_or(0),
            add: true,
        });
        Ok(())
    }

    fn remove(&mut self, net: IpNet) -> Result<(), String> {
        self.maps
            .remove(List::Block, net)
            .map_err(|e| e.to_string())?;
        self.notes.remove(&(List::Block, net));
        self.changes.push(EntryChange {
            list: List::Block,
            net,
            expires_ns: 0,
            add: false,
        });
        Ok(())
    }
}

fn name(list: List) -> &'static str {
    match list {
        List::Block => "block",
        List::Allow => "allow",
    }
}

fn describe_protected(p: &Protected) -> String {
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
