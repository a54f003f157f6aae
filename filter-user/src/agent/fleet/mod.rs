//! The fleet: this gate's share of an etcd-backed fleet (`[fleet]`, key layout in
//! `model::fleet`).
//!
//! - What the gate does itself (blocks and allows from the CLI, feedback and detections,
//!   failure counts) goes into an **outbox**, keyed by etcd key, so a change made while etcd
//!   is away waits there (only the last change per key) and is published when it returns.
//! - What other gates did arrives by a **watch** and enters the maps through the worker's
//!   claims as the `fleet` source, beside local, CrowdSec and feedback claims.
//! - On every (re)connection the gate **lists and diffs**: the whole fleet set is handed
//!   over as one full batch, which releases fleet claims on anything no longer listed
//!   (Cilium's re-list with synthesized deletes), then the watch starts at the listed
//!   revision. A watch that fails (a compacted revision, a lost member) ends the session and
//!   the next one lists again.
//! - Nothing on the packet or request path waits on this task: the worker hands it changes
//!   through an unbounded channel and never awaits it.

pub mod admin;
pub mod session;

/// The etcd client, for the benchmark's load generator.
pub use etcd_client;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::tasks::{Sink, View};
use crate::model::fleet::{Entry, FailCount, Keys, Set};

/// A change this gate made, for the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// An entry set here (`until_ms`: Unix ms, `None` permanent).
    Put {
        set: Set,
        net: IpNet,
        until_ms: Option<u64>,
        reason: String,
    },
    /// An entry lifted here by an administrator.
    Delete { set: Set, net: IpNet },
    /// This gate's failure count against a source, valid until `until_ms`.
    Failures {
        source: IpAddr,
        count: u32,
        until_ms: u64,
    },
    /// The entries in this gate's maps now, for its report.
    Counts { blocks: usize, allows: usize },
    /// A verified user seen here, for the other gates' `two-places`.
    Seen(crate::ipc::Seen),
}

/// One write waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// `lease`: `Some(secs)` attaches a lease of its own of that TTL; `session` the gate's
    /// session lease.
    Put {
        value: Vec<u8>,
        lease: Lease,
    },
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lease {
    None,
    Own(i64),
    Session,
}

/// What `status` shows about the fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub gate: String,
    pub endpoints: Vec<String>,
    /// `connected`, `connecting` or `partitioned`.
    pub state: String,
    /// Unix seconds since when etcd could not be reached.
    pub partitioned_since: Option<u64>,
    pub why: Option<String>,
    /// Changes made here that wait for etcd.
    pub outbox: usize,
    /// The fleet config revision this gate runs, and the last it refused.
    pub revision: Option<i64>,
    pub refused: Option<(i64, String)>,
    /// Entries the fleet holds, as last listed and watched.
    pub fleet_blocks: usize,
    pub fleet_allows: usize,
    /// Full list-and-diff resyncs since start.
    pub resyncs: u64,
}

/// The worker's side: hand changes over, read the status.
#[derive(Clone)]
pub struct Fleet {
    tx: mpsc::UnboundedSender<Local>,
    status: Arc<Mutex<Option<FleetStatus>>>,
}

impl Fleet {
    /// Starts the fleet task on `runtime`; it idles while the config has no `[fleet]`.
    pub fn start(
        view: watch::Receiver<Arc<View>>,
        sink: Sink,
        runtime: &tokio::runtime::Handle,
    ) -> Fleet {
        let (tx, rx) = mpsc::unbounded_channel();
        let status: Arc<Mutex<Option<FleetStatus>>> = Default::default();
        runtime.spawn(run(view, rx, status.clone(), sink));
        Fleet { tx, status }
    }

    /// Never blocks; a change made without `[fleet]` is dropped by the task.
    pub fn tell(&self, change: Local) {
        let _ = self.tx.send(change);
    }

    pub fn status(&self) -> Option<FleetStatus> {
        self.status.lock().ok().and_then(|s| s.clone())
    }
}

/// The outbox: the last change per key, in key order.
#[derive(Default)]
pub(crate) struct Outbox {
    pub ops: BTreeMap<String, Op>,
    pub counts: (usize, usize),
}

impl Outbox {
    /// Most keys kept while etcd is away; past it the oldest failure counts go first (they
    /// lapse anyway), then nothing more is queued and the log says so.
    const MAX: usize = 200_000;

    pub fn push(&mut self, keys: &Keys, gate: &str, change: Local, now_ms: u64) {
        let (key, op) = match change {
            Local::Counts { blocks, allows } => {
                self.counts = (blocks, allows);
                return;
            }
            Local::Put {
                set,
                net,
                until_ms,
                reason,
            } => {
                let entry = Entry {
                    until_ms,
                    reason,
                    gate: gate.to_string(),
                };
                let lease = match until_ms {
                    // A lease a little longer than the entry: the gates lapse it on time
                    // themselves, etcd only tidies up.
                    Some(u) => Lease::Own((u.saturating_sub(now_ms) / 1000 + 2) as i64),
                    None => Lease::None,
                };
                let value = serde_json::to_vec(&entry).unwrap_or_default();
                (keys.entry(set, net), Op::Put { value, lease })
            }
            Local::Delete { set, net } => (keys.entry(set, net), Op::Delete),
            Local::Seen(s) => {
                let value = serde_json::to_vec(&s).unwrap_or_default();
                (
                    keys.seen(&s.user, gate),
                    Op::Put {
                        value,
                        lease: Lease::Session,
                    },
                )
            }
            Local::Failures {
                source,
                count,
                until_ms,
            } => {
                let key = keys.fail(source, gate);
                if count == 0 {
                    (key, Op::Delete)
                } else {
                    let value =
                        serde_json::to_vec(&FailCount { count, until_ms }).unwrap_or_default();
                    (
                        key,
                        Op::Put {
                            value,
                            lease: Lease::Session,
                        },
                    )
                }
            }
        };
        if self.ops.len() >= Self::MAX && !self.ops.contains_key(&key) {
            let (fails, seen) = (keys.fails(), keys.seens());
            self.ops
                .retain(|k, _| !k.starts_with(&fails) && !k.starts_with(&seen));
            if self.ops.len() >= Self::MAX {
                warn!(key, "fleet: the outbox is full; this change stays local");
                return;
            }
        }
        self.ops.insert(key, op);
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Follows `[fleet]` in the running config: one session at a time, a new one after any
/// failure (with a back-off) or a change of settings.
async fn run(
    mut view: watch::Receiver<Arc<View>>,
    mut rx: mpsc::UnboundedReceiver<Local>,
    status: Arc<Mutex<Option<FleetStatus>>>,
    sink: Sink,
) {
    let mut outbox = Outbox::default();
    let mut shared = session::Shared::default();
    let mut backoff = Duration::from_millis(200);
    loop {
        let settings = view.borrow_and_update().fleet.clone();
        let Some(settings) = settings else {
            set_status(&status, None);
            outbox.ops.clear();
            tokio::select! {
                changed = view.changed() => if changed.is_err() { return },
                // Without [fleet], changes stay local.
                got = rx.recv() => if got.is_none() { return },
            }
            continue;
        };
        let keys = Keys::new(&settings.prefix);
        let result = session::Session::run(
            &settings,
            &keys,
            &mut outbox,
            &mut shared,
            &mut rx,
            &mut view,
            &sink,
            &status,
        )
        .await;
        match result {
            Ok(session::End::Reconfigured) => {
                backoff = Duration::from_millis(200);
                continue;
            }
            Ok(session::End::Stopped) => return,
            Ok(session::End::Resync(why)) => {
                info!(why, "fleet: listing again");
                backoff = Duration::from_millis(200);
                continue;
            }
            Err(e) => {
                let now = unix_ms() / 1000;
                if shared.partitioned_since.is_none() {
                    warn!(error = %e, "fleet: etcd cannot be reached; enforcing what is held, queueing local changes");
                    shared.partitioned_since = Some(now);
                    shared.partition_start_ms = Some(unix_ms());
                }
                shared.why = Some(e.to_string());
                shared.state = "partitioned";
                publish_status(&status, &settings, &outbox, &shared);
            }
        }
        // Wait out the back-off, still taking local changes into the outbox.
        let deadline = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                got = rx.recv() => match got {
                    Some(c) => {
                        outbox.push(&keys, &settings.gate, c, unix_ms());
                        publish_status(&status, &settings, &outbox, &shared);
                    }
                    None => return,
                },
                changed = view.changed() => { if changed.is_err() { return } break }
            }
        }
        publish_status(&status, &settings, &outbox, &shared);
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn set_status(status: &Mutex<Option<FleetStatus>>, s: Option<FleetStatus>) {
    if let Ok(mut held) = status.lock() {
        *held = s;
    }
}

pub(crate) fn publish_status(
    status: &Mutex<Option<FleetStatus>>,
    settings: &crate::model::fleet::FleetSettings,
    outbox: &Outbox,
    shared: &session::Shared,
) {
    set_status(
        status,
        Some(FleetStatus {
            gate: settings.gate.clone(),
            endpoints: settings.endpoints.clone(),
            state: shared.state.to_string(),
            partitioned_since: shared.partitioned_since,
            why: shared.why.clone(),
            outbox: outbox.ops.len(),
            revision: shared.report.revision,
            refused: shared.report.refused.clone(),
            fleet_blocks: shared.fleet_blocks,
            fleet_allows: shared.fleet_allows,
            resyncs: shared.resyncs,
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbox_keeps_the_last_change_per_key() {
        let keys = Keys::new("/f");
        let mut o = Outbox::default();
        let net: IpNet = "203.0.113.9/32".parse().unwrap();
        o.push(
            &keys,
            "g1",
            Local::Put {
                set: Set::Block,
                net,
                until_ms: Some(61_000),
                reason: "r".into(),
            },
            1_000,
        );
        assert!(matches!(
            o.ops.get("/f/block/203.0.113.9_32"),
            Some(Op::Put {
                lease: Lease::Own(62),
                ..
            })
        ));
        o.push(
            &keys,
            "g1",
            Local::Delete {
                set: Set::Block,
                net,
            },
            2_000,
        );
        assert_eq!(o.ops.len(), 1);
        assert_eq!(o.ops.get("/f/block/203.0.113.9_32"), Some(&Op::Delete));
        let source: IpAddr = "198.51.100.10".parse().unwrap();
        o.push(
            &keys,
            "g1",
            Local::Failures {
                source,
                count: 3,
                until_ms: 9,
            },
            0,
        );
        assert!(matches!(
            o.ops.get("/f/fail/198.51.100.10/g1"),
            Some(Op::Put {
                lease: Lease::Session,
                ..
            })
        ));
    }
}
