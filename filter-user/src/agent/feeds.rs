//! Live range feeds: each source group with a `feed_url` is fetched at start and every
//! `[feeds] refresh_secs`, conditionally (ETag, If-Modified-Since), with a deadline and a
//! size cap. A document that does not parse, holds no prefix after the group's filters, or
//! shrinks the group's feed by more than `max_shrink` is refused; so is anything the worker
//! cannot apply. The last good copy stays in force, on disk too, and the daemon starts from
//! it when the network is away. An accepted change goes to the worker, which reloads the
//! group through the same all-or-nothing path as a config reload and then saves the copy.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{header, StatusCode};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tracing::{info, warn};

use super::tasks::{Ask, Sink, View};
use crate::{
    config::parse_feed,
    model::agent::{Copy, CopyMeta, FeedFilter, FeedSettings, LiveFeed},
    net::http::Client,
};

/// An accepted document for the worker: the group's new feed prefixes and the copy to save.
#[derive(Debug)]
pub struct Update {
    pub group: String,
    pub nets: Vec<IpNet>,
    pub meta: CopyMeta,
    pub document: String,
}

/// `ewsgate feed refresh [GROUP]`.
pub struct RefreshRequest {
    pub group: Option<String>,
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// One feed as `ewsgate status` shows it; times are Unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedStatus {
    pub group: String,
    pub url: String,
    /// `unchecked` (not fetched since start), `ok`, `stale` (the source cannot be reached or
    /// answers with an error), `refused` (it served something the guard refused), or `none`
    /// (no copy yet).
    pub state: String,
    pub why: Option<String>,
    /// When the current `stale` or `refused` run began.
    pub since: Option<u64>,
    /// The feed's prefixes in force (the group's own `cidrs` and `files` not counted).
    pub prefixes: usize,
    /// When the copy in force was fetched.
    pub fetched: Option<u64>,
    /// When the source last confirmed the copy in force (a 200 accepted or a 304).
    pub confirmed: Option<u64>,
    pub counters: FeedCounters,
}

/// Monotonic counts since the daemon started, ready for a metrics endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedCounters {
    pub fetches: u64,
    pub not_modified: u64,
    pub changes: u64,
    pub unchanged: u64,
    pub refused: u64,
    pub errors: u64,
    pub prefixes_added: u64,
    pub prefixes_removed: u64,
}

/// A change of a group's feed prefixes, as an audit event (`kind = "feed"`).
#[derive(Debug, Serialize)]
pub struct FeedChange<'a> {
    pub kind: &'static str,
    pub time: String,
    pub group: &'a str,
    pub url: &'a str,
    pub added: Vec<IpNet>,
    pub removed: Vec<IpNet>,
    pub prefixes: usize,
    pub etag: Option<&'a str>,
}

/// What decides a feed's fetches: a change restarts it with an immediate fetch.
#[derive(Debug, Clone, PartialEq)]
struct Key {
    url: String,
    ca: Option<std::path::PathBuf>,
    filter: FeedFilter,
    timeout: Duration,
    max_bytes: usize,
    refresh: Duration,
    max_shrink: f64,
}

struct Tracked {
    key: Key,
    client: Result<Client, String>,
    next: Instant,
    status: FeedStatus,
}

enum Failure {
    /// The source could not be reached or answered with an error.
    Stale(String),
    /// It served a document the guard refused.
    Refused(String),
}

pub async fn run(
    mut view: watch::Receiver<Arc<View>>,
    mut requests: mpsc::Receiver<RefreshRequest>,
    shared: Arc<Mutex<Vec<FeedStatus>>>,
    sink: Sink,
) {
    let mut feeds: BTreeMap<String, Tracked> = BTreeMap::new();
    loop {
        let current = view.borrow_and_update().clone();
        reconcile(&mut feeds, &current.feeds);
        publish(&feeds, &shared);
        let next = feeds.values().map(|t| t.next).min();
        let far = Instant::now() + Duration::from_secs(86400);
        tokio::select! {
            changed = view.changed() => if changed.is_err() { return },
            req = requests.recv() => {
                let Some(req) = req else { return };
                let answer = refresh_now(&mut feeds, &view, req.group.as_deref(), &sink).await;
                publish(&feeds, &shared);
                let _ = req.reply.send(answer);
            }
            _ = tokio::time::sleep_until(next.unwrap_or(far)) => {
                let due: Vec<String> = feeds
                    .iter()
                    .filter(|(_, t)| t.next <= Instant::now())
                    .map(|(g, _)| g.clone())
                    .collect();
                for group in due {
                    let _ = refresh_one(&mut feeds, &view, &group, &sink).await;
                    publish(&feeds, &shared);
                }
            }
        }
    }
}

fn publish(feeds: &BTreeMap<String, Tracked>, shared: &Mutex<Vec<FeedStatus>>) {
    if let Ok(mut s) = shared.lock() {
        *s = feeds.values().map(|t| t.status.clone()).collect();
    }
}

/// Follows the config: new and changed feeds are fetched at once, removed ones forgotten.
fn reconcile(feeds: &mut BTreeMap<String, Tracked>, settings: &FeedSettings) {
    feeds.retain(|g, _| settings.live.iter().any(|l| &l.group == g));
    for live in &settings.live {
        let key = Key {
            url: live.url.clone(),
            ca: live.ca.clone(),
            filter: live.filter.clone(),
            timeout: settings.timeout,
            max_bytes: settings.max_bytes,
            refresh: settings.refresh,
            max_shrink: settings.max_shrink,
        };
        let stale = feeds.get(&live.group).is_none_or(|t| t.key != key);
        if stale {
            let client = Client::new(live.ca.as_deref(), settings.timeout, settings.max_bytes)
                .map_err(|e| e.to_string());
            let counters = feeds
                .get(&live.group)
                .map(|t| t.status.counters)
                .unwrap_or_default();
            let status = FeedStatus {
                group: live.group.clone(),
                url: live.url.clone(),
                counters,
                ..Default::default()
            };
            feeds.insert(
                live.group.clone(),
                Tracked {
                    key,
                    client,
                    next: Instant::now(),
                    status,
                },
            );
        }
        if let Some(t) = feeds.get_mut(&live.group) {
            describe_copy(&mut t.status, live);
        }
    }
}

/// The copy in force, from the config the worker runs.
fn describe_copy(s: &mut FeedStatus, live: &LiveFeed) {
    s.prefixes = live.nets().len();
    match &live.copy {
        Copy::Held(h) => {
            s.fetched = Some(h.meta.fetched);
            if s.state.is_empty() || s.state == "none" {
                s.state = "unchecked".into();
            }
        }
        Copy::None | Copy::Unreadable(_) => {
            s.fetched = None;
            if s.state.is_empty() {
                s.state = "none".into();
                s.why = Some(match &live.copy {
                    Copy::Unreadable(e) => format!("last good copy unreadable: {e}"),
                    _ => "no copy yet".into(),
                });
            }
        }
    }
}

async fn refresh_now(
    feeds: &mut BTreeMap<String, Tracked>,
    view: &watch::Receiver<Arc<View>>,
    group: Option<&str>,
    sink: &Sink,
) -> Result<String, String> {
    let groups: Vec<String> = match group {
        Some(g) if feeds.contains_key(g) => vec![g.to_string()],
        Some(g) => return Err(format!("source group '{g}' has no feed_url")),
        None if feeds.is_empty() => return Err("no source group has a feed_url".into()),
        None => feeds.keys().cloned().collect(),
    };
    let mut lines = Vec::new();
    let mut failed = false;
    for g in groups {
        let line = refresh_one(feeds, view, &g, sink).await;
        failed |= line.is_err();
        lines.push(format!("{g}: {}", line.unwrap_or_else(|e| e)));
    }
    let text = lines.join("\n");
    if failed {
        Err(text)
    } else {
        Ok(text)
    }
}

/// Fetches one feed now; returns what happened, as a line for the CLI.
async fn refresh_one(
    feeds: &mut BTreeMap<String, Tracked>,
    view: &watch::Receiver<Arc<View>>,
    group: &str,
    sink: &Sink,
) -> Result<String, String> {
    let current = view.borrow().clone();
    let settings = &current.feeds;
    let (Some(t), Some(live)) = (
        feeds.get_mut(group),
        settings.live.iter().find(|l| l.group == group),
    ) else {
        return Err("no longer configured".into());
    };
    t.next = Instant::now() + settings.refresh;
    t.status.counters.fetches += 1;
    let now = unix_now();
    let result = fetch(t, live, settings.max_shrink, sink).await;
    // The worker publishes the config it runs before it answers: the copy in force now.
    if let Some(live) = view.borrow().feeds.live.iter().find(|l| l.group == group) {
        describe_copy(&mut t.status, live);
    }
    let s = &mut t.status;
    match result {
        Ok(line) => {
            s.state = "ok".into();
            s.why = None;
            s.since = None;
            s.confirmed = Some(now);
            Ok(line)
        }
        Err(failure) => {
            let (state, why) = match failure {
                Failure::Stale(w) => {
                    s.counters.errors += 1;
                    warn!(group, error = %w, "feed: fetch failed, the last good copy stays in force");
                    ("stale", w)
                }
                Failure::Refused(w) => {
                    s.counters.refused += 1;
                    warn!(group, why = %w, "feed: refused, the last good copy stays in force");
                    ("refused", w)
                }
            };
            if s.state != state {
                s.since = Some(now);
            }
            s.state = state.into();
            s.why = Some(why.clone());
            Err(format!("{state}: {why}"))
        }
    }
}

async fn fetch(
    t: &mut Tracked,
    live: &LiveFeed,
    max_shrink: f64,
    sink: &Sink,
) -> Result<String, Failure> {
    let client = t.client.as_ref().map_err(|e| Failure::Stale(e.clone()))?;
    let held = match &live.copy {
        Copy::Held(h) if h.meta.url == live.url => Some(h),
        _ => None,
    };
    let mut headers = Vec::new();
    if let Some(h) = held {
        if let Some(etag) = &h.meta.etag {
            headers.push((header::IF_NONE_MATCH, etag.clone()));
        }
        if let Some(date) = &h.meta.last_modified {
            headers.push((header::IF_MODIFIED_SINCE, date.clone()));
        }
    }
    let fetched = client
        .get(&live.url, &headers)
        .await
        .map_err(|e| Failure::Stale(e.to_string()))?;
    if fetched.status == StatusCode::NOT_MODIFIED {
        if headers.is_empty() {
            return Err(Failure::Stale(format!(
                "{}: answered 304 to an unconditional request",
                live.url
            )));
        }
        t.status.counters.not_modified += 1;
        return Ok(format!(
            "not modified ({} prefixes in force)",
            live.nets().len()
        ));
    }
    let text = std::str::from_utf8(&fetched.body)
        .map_err(|_| Failure::Refused(format!("{}: not UTF-8", live.url)))?;
    let nets =
        parse_feed(&live.url, text, &live.filter).map_err(|e| Failure::Refused(e.to_string()))?;
    let old = live.nets();
    guard(old.len(), nets.len(), max_shrink).map_err(Failure::Refused)?;
    let (added, removed) = diff(old, &nets);
    let meta = CopyMeta {
        url: live.url.clone(),
        etag: fetched.etag.clone(),
        last_modified: fetched.last_modified.clone(),
        fetched: unix_now(),
    };
    let count = nets.len();
    let (reply, answer) = oneshot::channel();
    let update = Update {
        group: live.group.clone(),
        nets,
        meta,
        document: text.to_string(),
    };
    if !sink(Ask::Feed(update, reply)) {
        return Err(Failure::Stale("the worker has stopped".into()));
    }
    match answer.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(Failure::Refused(format!("not applied: {e}"))),
        Err(_) => return Err(Failure::Stale("no answer from the worker".into())),
    }
    let c = &mut t.status.counters;
    if added.is_empty() && removed.is_empty() {
        c.unchanged += 1;
        return Ok(format!("unchanged ({count} prefixes)"));
    }
    c.changes += 1;
    c.prefixes_added += added.len() as u64;
    c.prefixes_removed += removed.len() as u64;
    let line = format!(
        "changed: +{} -{} ({count} prefixes)",
        added.len(),
        removed.len()
    );
    let event = FeedChange {
        kind: "feed",
        time: crate::ops::audit::rfc3339_now(),
        group: &live.group,
        url: &live.url,
        added,
        removed,
        prefixes: count,
        etag: fetched.etag.as_deref(),
    };
    info!(
        target: "ewsgate::audit",
        group = %live.group,
        added = event.added.len(),
        removed = event.removed.len(),
        prefixes = count,
        event = %serde_json::to_string(&event).unwrap_or_default(),
        "feed: prefixes changed"
    );
    Ok(line)
}

/// The sanity guard on a parsed, non-empty feed: it may not shrink the copy in force by
/// more than `max_shrink`.
pub fn guard(old: usize, new: usize, max_shrink: f64) -> Result<(), String> {
    if old > 0 && new < old && (old - new) as f64 > max_shrink * old as f64 {
        return Err(format!(
            "shrinks from {old} to {new} prefixes ({:.0}% fewer, more than max_shrink = {max_shrink})",
            100.0 * (old - new) as f64 / old as f64
        ));
    }
    Ok(())
}

/// Prefixes added and removed.
pub fn diff(old: &[IpNet], new: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    let a: BTreeSet<&IpNet> = old.iter().collect();
    let b: BTreeSet<&IpNet> = new.iter().collect();
    (
        b.difference(&a).map(|n| **n).collect(),
        a.difference(&b).map(|n| **n).collect(),
    )
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_refuses_a_shrink_past_the_share() {
        assert!(guard(0, 1, 0.2).is_ok());
        assert!(guard(100, 80, 0.2).is_ok());
        assert!(guard(100, 500, 0.2).is_ok());
        let e = guard(100, 79, 0.2).unwrap_err();
        assert!(e.contains("from 100 to 79") && e.contains("21%"), "{e}");
        assert!(guard(100, 1, 1.0).is_ok());
        assert!(guard(5, 4, 0.0).is_err());
    }

    #[test]
    fn diffs() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let (a, r) = diff(
            &[n("192.0.2.0/25"), n("198.51.100.0/24")],
            &[n("198.51.100.0/24"), n("2001:db8::/32")],
        );
        assert_eq!(a, vec![n("2001:db8::/32")]);
        assert_eq!(r, vec![n("192.0.2.0/25")]);
    }
}
