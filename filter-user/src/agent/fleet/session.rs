//! One etcd session: connect, take a lease kept alive with deadlines, publish the outbox,
//! list and diff, then watch from the listed revision until something fails.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    WatchOptions,
};
use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::{publish_status, unix_ms, FleetStatus, Lease, Local, Op, Outbox};
use crate::{
    agent::{
        claims::{Batch, Source},
        tasks::{Ask, Sink, View},
    },
    model::fleet::{Entry, FailCount, FleetSettings, GateReport, Keys, Revision, Set},
};

/// How long failure counts and sightings gather before they are written.
const GATHER: Duration = Duration::from_millis(200);

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}

/// A change the other gates should enforce at once: a block or an allow.
fn urgent_change(c: &Local) -> bool {
    matches!(c, Local::Put { .. } | Local::Delete { .. })
}

/// Keys read per page when listing (a page of entries stays far below gRPC's 4 MiB).
const PAGE: i64 = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{what}: {source}")]
    Etcd {
        what: &'static str,
        source: etcd_client::Error,
    },
    #[error("{0}: no answer within the deadline")]
    Timeout(&'static str),
    #[error("reading {path}: {source}")]
    Tls {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Lost(String),
}

/// How a session ended without an error.
pub enum End {
    /// `[fleet]` changed or went: start over with the new settings.
    Reconfigured,
    /// The agent is stopping.
    Stopped,
    /// The watch cannot go on (a compacted revision): list again at once.
    Resync(String),
}

/// What outlives one session.
#[derive(Default)]
pub struct Shared {
    pub state: &'static str,
    pub partitioned_since: Option<u64>,
    pub partition_start_ms: Option<u64>,
    pub why: Option<String>,
    pub report: GateReport,
    /// The config revision last acted on (applied or refused).
    pub acted_on: Option<i64>,
    pub fleet_blocks: usize,
    pub fleet_allows: usize,
    pub resyncs: u64,
    /// The member the next session tries first.
    pub member: usize,
}

/// Runs `what` within `limit`.
async fn deadline<T>(
    limit: Duration,
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, FleetError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(FleetError::Etcd { what, source }),
        Err(_) => Err(FleetError::Timeout(what)),
    }
}

/// A client on one member, trying them in turn from `start`; returns the member's index.
/// One member at a time: a balanced channel keeps sending calls to a member that is gone.
/// Also used by `ewsgate fleet`.
pub async fn connect(s: &FleetSettings, start: usize) -> Result<(Client, usize), FleetError> {
    let n = s.endpoints.len().max(1);
    let mut last = FleetError::Lost("no endpoints".into());
    for k in 0..n {
        let i = (start + k) % n;
        match connect_one(s, &s.endpoints[i]).await {
            Ok(c) => return Ok((c, i)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn connect_one(s: &FleetSettings, endpoint: &str) -> Result<Client, FleetError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(s.timeout)
        .with_timeout(s.timeout)
        .with_keep_alive(Duration::from_secs(2), s.timeout)
        // A member cut off from its leader refuses watches and keepalives at once.
        .with_require_leader(true);
    if let Some(t) = &s.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| FleetError::Tls {
                path: p.display().to_string(),
                source,
            })
        };
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&t.ca)?))
            .identity(Identity::from_pem(
                read(&t.certificate)?,
                read(&t.private_key)?,
            ));
        opts = opts.with_tls(tls);
    }
    let mut client = deadline(
        s.timeout,
        "connecting",
        Client::connect([endpoint], Some(opts)),
    )
    .await?;
    // A linearizable read answers only where there is a quorum.
    let probe = GetOptions::new().with_count_only();
    deadline(
        s.timeout,
        "reading",
        client.get(s.prefix.as_str(), Some(probe)),
    )
    .await?;
    Ok(client)
}

/// Every key under `prefix` at one revision, page by page: `(key, value, mod revision)`.
pub async fn list(
    client: &mut Client,
    prefix: &str,
    limit: Duration,
) -> Result<(Vec<(String, Vec<u8>, i64)>, i64), FleetError> {
    let end = prefix_end(prefix);
    let mut out = Vec::new();
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = deadline(limit, "listing", client.get(from.clone(), Some(opts))).await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        for kv in resp.kvs() {
            if let Ok(k) = kv.key_str() {
                out.push((k.to_string(), kv.value().to_vec(), kv.mod_revision()));
            }
        }
        match (resp.more(), resp.kvs().last()) {
            (true, Some(last)) => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((out, revision)),
        }
    }
}

fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Entries whose expiries fall in the same window of this many seconds share one lease: a
/// lease grant is a raft write of its own, so one per entry would double the writes.
const LEASE_WINDOW: u64 = 10;

/// The entry leases granted in this session, by the end of their window (Unix seconds).
#[derive(Default)]
struct Leases(BTreeMap<u64, i64>);

impl Leases {
    /// A lease that lasts at least `ttl` seconds from now.
    async fn at_least(
        &mut self,
        client: &mut Client,
        limit: Duration,
        ttl: i64,
    ) -> Result<i64, FleetError> {
        let now = unix_ms() / 1000;
        let end = (now + ttl.max(1) as u64).div_ceil(LEASE_WINDOW) * LEASE_WINDOW;
        // Windows that have ended take nothing new.
        self.0 = self.0.split_off(&now);
        if let Some(id) = self.0.get(&end) {
            return Ok(*id);
        }
        let grant = (end - now + 2) as i64;
        let id = deadline(limit, "granting a lease", client.lease_grant(grant, None))
            .await?
            .id();
        self.0.insert(end, id);
        Ok(id)
    }
}

/// Writes one outbox entry.
async fn write(
    client: &mut Client,
    limit: Duration,
    key: &str,
    op: &Op,
    session: i64,
    leases: &mut Leases,
) -> Result<(), FleetError> {
    match op {
        Op::Delete => {
            deadline(limit, "deleting", client.delete(key, None)).await?;
        }
        Op::Put { value, lease } => {
            let lease = match lease {
                Lease::None => None,
                Lease::Session => Some(session),
                Lease::Own(ttl) => Some(leases.at_least(client, limit, *ttl).await?),
            };
            let opts = lease.map(|l| PutOptions::new().with_lease(l));
            deadline(limit, "writing", client.put(key, value.clone(), opts)).await?;
        }
    }
    Ok(())
}

/// Fleet changes on their way to the worker.
#[derive(Default)]
struct Changes {
    blocks_set: Vec<(IpNet, Duration, String)>,
    blocks_gone: Vec<IpNet>,
    allows_set: Vec<(IpNet, Option<Duration>)>,
    allows_gone: Vec<IpNet>,
    fails: Vec<(IpAddr, String, Option<FailCount>)>,
    seen: Vec<crate::ipc::Seen>,
}

pub(crate) struct Session<'a> {
    s: &'a FleetSettings,
    keys: &'a Keys,
    client: Client,
    lease: i64,
    shared: &'a mut Shared,
    sink: &'a Sink,
    /// The fleet's entries as listed and watched.
    held: BTreeMap<(Set, IpNet), Entry>,
    leases: Leases,
}

impl Session<'_> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn run(
        s: &FleetSettings,
        keys: &Keys,
        outbox: &mut Outbox,
        shared: &mut Shared,
        rx: &mut mpsc::UnboundedReceiver<Local>,
        view: &mut watch::Receiver<Arc<View>>,
        sink: &Sink,
        status: &Mutex<Option<FleetStatus>>,
    ) -> Result<End, FleetError> {
        if shared.state.is_empty() {
            shared.state = "connecting";
        }
        publish_status(status, s, outbox, shared);
        // Connecting may take a deadline per member: local changes keep queueing meanwhile.
        let connecting = connect(s, shared.member);
        tokio::pin!(connecting);
        let (mut client, member) = loop {
            tokio::select! {
                r = &mut connecting => break r?,
                got = rx.recv() => match got {
                    Some(c) => {
                        outbox.push(keys, &s.gate, c, unix_ms());
                        publish_status(status, s, outbox, shared);
                    }
                    None => return Ok(End::Stopped),
                },
            }
        };
        // Whatever ends this session, the next one tries the next member first.
        shared.member = member + 1;
        let ttl = s.session_ttl.as_secs() as i64;
        let lease = deadline(
            s.timeout,
            "granting the session lease",
            client.lease_grant(ttl, None),
        )
        .await?
        .id();
        let (mut keeper, mut alive) = deadline(
            s.timeout,
            "keeping the lease alive",
            client.lease_keep_alive(lease),
        )
        .await?;
        let mut session = Session {
            s,
            keys,
            client,
            lease,
            shared,
            sink,
            held: BTreeMap::new(),
            leases: Leases::default(),
        };
        session.flush(outbox).await?;
        let revision = session.resync().await?;
        if let Some(since) = session.shared.partition_start_ms.take() {
            info!(
                seconds = unix_ms().saturating_sub(since) / 1000,
                "fleet: etcd is back; queued changes published, state listed again"
            );
            session.shared.report.last_partition = Some((since, unix_ms()));
        }
        session.shared.partitioned_since = None;
        session.shared.why = None;
        session.shared.state = "connected";
        session.report(outbox).await?;
        publish_status(status, s, outbox, session.shared);
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let prefix = format!("{}/", keys.prefix);
        let mut stream = deadline(
            s.timeout,
            "watching",
            session.client.watch(prefix, Some(opts)),
        )
        .await?;
        let mut flush_at: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(s.session_ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let msg = msg.map_err(|source| FleetError::Etcd { what: "watching", source })?;
                    let Some(msg) = msg else {
                        return Err(FleetError::Lost("the watch ended".into()));
                    };
                    if msg.canceled() {
                        return Ok(End::Resync(match msg.compact_revision() {
                            0 => format!("the watch was cancelled: {}", msg.cancel_reason()),
                            r => format!("revision {} was compacted (now {r})", revision + 1),
                        }));
                    }
                    session.events(msg.events()).await;
                }
                got = rx.recv() => {
                    let Some(change) = got else { return Ok(End::Stopped) };
                    let mut urgent = urgent_change(&change);
                    outbox.push(keys, &s.gate, change, unix_ms());
                    // Whatever else is waiting goes in the same flush.
                    while let Ok(c) = rx.try_recv() {
                        urgent |= urgent_change(&c);
                        outbox.push(keys, &s.gate, c, unix_ms());
                    }
                    // Blocks and allows go at once; failure counts and sightings gather for
                    // a moment, so a burst of failures costs one write per source, not one
                    // per failure.
                    if urgent {
                        session.flush(outbox).await?;
                        flush_at = None;
                    } else if flush_at.is_none() && !outbox.ops.is_empty() {
                        flush_at = Some(tokio::time::Instant::now() + GATHER);
                    }
                }
                _ = tokio::time::sleep_until(flush_at.unwrap_or_else(far)), if flush_at.is_some() => {
                    flush_at = None;
                    session.flush(outbox).await?;
                }
                _ = tick.tick() => {
                    deadline(s.timeout, "keeping the lease alive", keeper.keep_alive()).await?;
                    let answer = tokio::time::timeout(s.timeout, alive.message())
                        .await
                        .map_err(|_| FleetError::Timeout("keeping the lease alive"))?
                        .map_err(|source| FleetError::Etcd { what: "keeping the lease alive", source })?;
                    if answer.is_none_or(|a| a.ttl() <= 0) {
                        return Err(FleetError::Lost("the session lease expired".into()));
                    }
                    session.report(outbox).await?;
                    publish_status(status, s, outbox, session.shared);
                }
                changed = view.changed() => {
                    if changed.is_err() {
                        return Ok(End::Stopped);
                    }
                    if view.borrow_and_update().fleet.as_ref() != Some(s) {
                        let _ = session.client.lease_revoke(session.lease).await;
                        return Ok(End::Reconfigured);
                    }
                }
            }
        }
    }

    /// Publishes the outbox, key by key; what fails stays queued.
    async fn flush(&mut self, outbox: &mut Outbox) -> Result<(), FleetError> {
        while let Some((key, op)) = outbox.ops.pop_first() {
            let written = write(
                &mut self.client,
                self.s.timeout,
                &key,
                &op,
                self.lease,
                &mut self.leases,
            )
            .await;
            if let Err(e) = written {
                outbox.ops.insert(key, op);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Lists the fleet and hands the whole of it to the worker; returns the revision.
    async fn resync(&mut self) -> Result<i64, FleetError> {
        let prefix = format!("{}/", self.keys.prefix);
        let (kvs, revision) = list(&mut self.client, &prefix, self.s.timeout * 4).await?;
        let mut changes = Changes::default();
        let mut config = None;
        self.held.clear();
        for (key, value, mod_revision) in kvs {
            if key == self.keys.config() {
                config = Some((value, mod_revision));
                continue;
            }
            self.take(&key, Some(&value), &mut changes);
        }
        self.shared.resyncs += 1;
        self.hand_over(changes, true).await;
        if let Some((value, rev)) = config {
            self.config(&value, rev).await;
        }
        Ok(revision)
    }

    /// Watched events, handed over as one batch.
    async fn events(&mut self, events: &[etcd_client::Event]) {
        let mut changes = Changes::default();
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            let Ok(key) = kv.key_str() else { continue };
            let value = match ev.event_type() {
                EventType::Put => Some(kv.value()),
                EventType::Delete => None,
            };
            if key == self.keys.config() {
                if let Some(v) = value {
                    let (v, rev) = (v.to_vec(), kv.mod_revision());
                    self.hand_over(std::mem::take(&mut changes), false).await;
                    self.config(&v, rev).await;
                }
                continue;
            }
            self.take(key, value, &mut changes);
        }
        self.hand_over(changes, false).await;
    }

    /// Sorts one key's new value (or its deletion) into `changes`.
    fn take(&mut self, key: &str, value: Option<&[u8]>, changes: &mut Changes) {
        if let Some((set, net)) = self.keys.parse_entry(key) {
            let entry = value.and_then(|v| match serde_json::from_slice::<Entry>(v) {
                Ok(e) => Some(e),
                Err(e) => {
                    warn!(key, error = %e, "fleet: an entry that does not parse is ignored");
                    None
                }
            });
            let left = entry.as_ref().map(|e| {
                e.until_ms
                    .map(|u| Duration::from_millis(u.saturating_sub(unix_ms())))
            });
            match (set, entry, left) {
                // Lapsed already (etcd deletes late): nothing to enforce.
                (_, Some(_), Some(Some(d))) if d.is_zero() => {
                    self.held.remove(&(set, net));
                    self.gone(set, net, changes);
                }
                (Set::Block, Some(e), Some(left)) => {
                    let reason = format!("fleet {}: {}", e.gate, e.reason);
                    changes
                        .blocks_set
                        .push((net, left.unwrap_or(Duration::MAX), reason));
                    self.held.insert((set, net), e);
                }
                (Set::Allow, Some(e), Some(left)) => {
                    changes.allows_set.push((net, left));
                    self.held.insert((set, net), e);
                }
                _ => {
                    self.held.remove(&(set, net));
                    self.gone(set, net, changes);
                }
            }
            return;
        }
        if let Some(gate) = self.keys.parse_seen(key) {
            // Another gate's sighting: compared with this gate's own (`two-places`).
            if let (false, Some(v)) = (gate == self.s.gate, value) {
                match serde_json::from_slice::<crate::ipc::Seen>(v) {
                    Ok(s) if s.check().is_ok() => changes.seen.push(s),
                    _ => warn!(key, "fleet: a sighting that does not parse is ignored"),
                }
            }
            return;
        }
        if let Some((source, gate)) = self.keys.parse_fail(key) {
            if gate == self.s.gate {
                return;
            }
            let count = value.and_then(|v| serde_json::from_slice::<FailCount>(v).ok());
            changes.fails.push((source, gate, count));
        }
    }

    fn gone(&self, set: Set, net: IpNet, changes: &mut Changes) {
        match set {
            Set::Block => changes.blocks_gone.push(net),
            Set::Allow => changes.allows_gone.push(net),
        }
    }

    /// Gives `changes` to the worker; `full`: they are everything the fleet holds.
    async fn hand_over(&mut self, c: Changes, full: bool) {
        self.shared.fleet_blocks = self.held.keys().filter(|k| k.0 == Set::Block).count();
        self.shared.fleet_allows = self.held.len() - self.shared.fleet_blocks;
        if full || !c.blocks_set.is_empty() || !c.blocks_gone.is_empty() {
            let (reply, answer) = oneshot::channel();
            let batch = Batch {
                source: Source::Fleet,
                full,
                set: c.blocks_set,
                release: c.blocks_gone,
            };
            if (self.sink)(Ask::Claims(batch, reply)) {
                if let Ok(o) = answer.await {
                    for f in &o.failed {
                        warn!(failed = %f, "fleet: an entry could not be written");
                    }
                }
            }
        }
        if full || !c.allows_set.is_empty() || !c.allows_gone.is_empty() {
            (self.sink)(Ask::FleetAllows {
                full,
                set: c.allows_set,
                release: c.allows_gone,
            });
        }
        if !c.seen.is_empty() {
            (self.sink)(Ask::RemoteSeen(c.seen));
        }
        if full || !c.fails.is_empty() {
            (self.sink)(Ask::RemoteFailures {
                full,
                counts: c.fails,
            });
        }
    }

    /// A config revision: validated and applied all or nothing by the worker, the outcome
    /// reported under this gate's key.
    async fn config(&mut self, value: &[u8], rev: i64) {
        if self.shared.acted_on == Some(rev) {
            return;
        }
        self.shared.acted_on = Some(rev);
        let outcome = match serde_json::from_slice::<Revision>(value) {
            Err(e) => Err(format!("the revision does not parse: {e}")),
            Ok(r) => {
                let (reply, answer) = oneshot::channel();
                if (self.sink)(Ask::FleetConfig(Box::new(r), rev, reply)) {
                    answer
                        .await
                        .unwrap_or_else(|_| Err("the worker gave no answer".into()))
                } else {
                    Err("the worker has stopped".into())
                }
            }
        };
        match outcome {
            Ok(msg) => {
                info!(revision = rev, msg, "fleet: config revision applied");
                self.shared.report.revision = Some(rev);
            }
            Err(why) => {
                warn!(
                    revision = rev,
                    why, "fleet: config revision refused; running config kept"
                );
                self.shared.report.refused = Some((rev, why));
            }
        }
    }

    /// Writes this gate's report (also its sign of life).
    async fn report(&mut self, outbox: &Outbox) -> Result<(), FleetError> {
        let r = &mut self.shared.report;
        r.contact_ms = unix_ms();
        (r.blocks, r.allows) = outbox.counts;
        let value = serde_json::to_vec(r).unwrap_or_default();
        let key = self.keys.gate(&self.s.gate);
        deadline(
            self.s.timeout,
            "reporting",
            self.client.put(key, value, None),
        )
        .await?;
        Ok(())
    }
}
