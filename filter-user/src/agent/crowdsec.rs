//! A CrowdSec bouncer: follows the Local API's decision stream (`/v1/decisions/stream`,
//! `startup=true` then deltas every `poll_secs`) and keeps ban decisions of the `Ip` and
//! `Range` scopes, IPv4 and IPv6, in the XDP block set, each for its own duration and with
//! its origin and scenario as the entry's reason.
//!
//! Decisions are tracked one by one (the stream is asked for with `dedup=false`): an address
//! stays blocked while any of its decisions lives, for as long as the longest. What the
//! bouncer writes is its own claim in the worker's ledger, so a deleted decision never lifts
//! a block another source set. When the LAPI cannot be reached, the entries stay until they
//! expire (the program checks expiry itself); the next successful poll is a full resync.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::HeaderName;
use ipnet::IpNet;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{oneshot, watch},
    time::Instant,
};
use tracing::{info, warn};

use super::{
    claims::{Batch, Source},
    feeds::unix_now,
    tasks::{Ask, Sink, View},
};
use crate::{model::agent::CrowdSecSettings, net::http::Client};

/// Skipped decisions logged one by one per poll; past this, only the count.
const SKIP_LINES: usize = 20;

/// The bouncer as `ewsgate status` shows it; times are Unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CrowdSecStatus {
    pub lapi: String,
    /// `starting`, `ok`, `unreachable`.
    pub state: String,
    pub why: Option<String>,
    pub since: Option<u64>,
    pub last_pull: Option<u64>,
    /// Live ban decisions followed.
    pub decisions: usize,
    /// Addresses and ranges they block.
    pub entries: usize,
    pub counters: CrowdSecCounters,
}

/// Monotonic counts since the daemon started, ready for a metrics endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrowdSecCounters {
    pub polls: u64,
    pub errors: u64,
    pub decisions_new: u64,
    pub decisions_deleted: u64,
    pub skipped: u64,
    pub entries_written: u64,
    pub entries_removed: u64,
    pub entries_failed: u64,
}

/// One decision as the stream gives it. Fields the bouncer does not use are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Decision {
    #[serde(default)]
    pub id: i64,
    #[serde(default)]
    pub origin: String,
    #[serde(default)]
    pub scenario: String,
    #[serde(default)]
    pub scope: String,
    #[serde(default)]
    pub value: String,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub duration: String,
}

#[derive(Debug, Deserialize)]
pub struct Stream {
    #[serde(default)]
    pub new: Option<Vec<Decision>>,
    #[serde(default)]
    pub deleted: Option<Vec<Decision>>,
}

/// Go's `time.Duration` text (`3h59m58.5s`, `-1m2s`, `500ms`, `0s`) in seconds.
pub fn go_duration(text: &str) -> Result<f64, String> {
    let bad = || format!("'{text}' is not a Go duration");
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest == "0" {
        return Ok(0.0);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    Ok(if negative { -total } else { total })
}

/// Why a decision is not enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    Type(String),
    Scope(String),
    Origin(String),
    Value(String),
    Duration(String),
    Expired,
}

/// The block a ban decision asks for: the address or range, the time left, the reason.
pub fn judge(d: &Decision, origins: &[String]) -> Result<(IpNet, Duration, String), Skip> {
    if !d.kind.eq_ignore_ascii_case("ban") {
        return Err(Skip::Type(d.kind.clone()));
    }
    if !origins.is_empty() && !origins.iter().any(|o| o.eq_ignore_ascii_case(&d.origin)) {
        return Err(Skip::Origin(d.origin.clone()));
    }
    let value = d.value.trim();
    let net = match d.scope.to_ascii_lowercase().as_str() {
        "ip" => value
            .parse::<IpAddr>()
            .map(|a| IpNet::from(canonical(a)))
            .map_err(|_| Skip::Value(d.value.clone()))?,
        // A range with host bits set means the range that holds them, as Go reads it.
        "range" => value
            .parse::<IpNet>()
            .map(|n| n.trunc())
            .map_err(|_| Skip::Value(d.value.clone()))?,
        _ => return Err(Skip::Scope(d.scope.clone())),
    };
    let net = match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.network().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), n.prefix_len() - 96).unwrap_or(net),
            None => net,
        },
        _ => net,
    };
    let secs = go_duration(&d.duration).map_err(Skip::Duration)?;
    if secs <= 0.0 {
        return Err(Skip::Expired);
    }
    let reason: String = format!("crowdsec/{}: {}", d.origin, d.scenario)
        .chars()
        .take(200)
        .collect();
    Ok((net, Duration::from_secs_f64(secs.min(1e9).ceil()), reason))
}

fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

struct Live {
    net: IpNet,
    until: Instant,
    reason: String,
}

/// The decisions followed, by id, and the addresses they cover.
#[derive(Default)]
pub struct Tracker {
    decisions: HashMap<i64, Live>,
    by_net: BTreeMap<IpNet, BTreeSet<i64>>,
}

/// What one stream answer changed.
pub struct Absorbed {
    pub batch: Batch,
    pub new: u64,
    pub deleted: u64,
    pub skipped: Vec<(i64, String, Skip)>,
}

impl Tracker {
    pub fn decisions(&self) -> usize {
        self.decisions.len()
    }

    pub fn entries(&self) -> usize {
        self.by_net.len()
    }

    /// Takes in one answer; `full` (a startup answer) replaces everything followed.
    pub fn absorb(&mut self, stream: Stream, full: bool, origins: &[String]) -> Absorbed {
        let now = Instant::now();
        if full {
            self.decisions.clear();
            self.by_net.clear();
        }
        let mut touched = BTreeSet::new();
        let mut out = Absorbed {
            batch: Batch {
                source: Source::Crowdsec,
                full,
                set: Vec::new(),
                release: Vec::new(),
            },
            new: 0,
            deleted: 0,
            skipped: Vec::new(),
        };
        for d in stream.deleted.unwrap_or_default() {
            out.deleted += 1;
            if let Some(live) = self.forget(d.id) {
                touched.insert(live);
            }
        }
        for d in stream.new.unwrap_or_default() {
            out.new += 1;
            match judge(&d, origins) {
                Ok((net, left, reason)) => {
                    self.forget(d.id);
                    self.decisions.insert(
                        d.id,
                        Live {
                            net,
                            until: now + left,
                            reason,
                        },
                    );
                    self.by_net.entry(net).or_default().insert(d.id);
                    touched.insert(net);
                }
                Err(Skip::Expired) => {}
                Err(skip) => out.skipped.push((d.id, d.value.clone(), skip)),
            }
        }
        self.expire(now, &mut touched);
        let nets: Vec<IpNet> = if full {
            self.by_net.keys().copied().collect()
        } else {
            touched.into_iter().collect()
        };
        for net in nets {
            match self.longest(&net, now) {
                Some((left, reason)) => out.batch.set.push((net, left, reason)),
                None => out.batch.release.push(net),
            }
        }
        out
    }

    fn forget(&mut self, id: i64) -> Option<IpNet> {
        let live = self.decisions.remove(&id)?;
        if let Some(ids) = self.by_net.get_mut(&live.net) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_net.remove(&live.net);
            }
        }
        Some(live.net)
    }

    /// Drops decisions that ran out (their entries have lapsed in the program already).
    fn expire(&mut self, now: Instant, touched: &mut BTreeSet<IpNet>) {
        let gone: Vec<i64> = self
            .decisions
            .iter()
            .filter(|(_, l)| l.until <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(net) = self.forget(id) {
                touched.insert(net);
            }
        }
    }

    /// Time left and reason of the longest live decision on `net`.
    fn longest(&self, net: &IpNet, now: Instant) -> Option<(Duration, String)> {
        self.by_net
            .get(net)?
            .iter()
            .filter_map(|id| self.decisions.get(id))
            .max_by_key(|l| l.until)
            .map(|l| (l.until.saturating_duration_since(now), l.reason.clone()))
    }
}

struct Bouncer {
    settings: CrowdSecSettings,
    client: Result<Client, String>,
    tracker: Tracker,
    /// The next poll asks for everything (at start, and after any failure).
    resync: bool,
    status: CrowdSecStatus,
}

impl Bouncer {
    fn new(settings: CrowdSecSettings, counters: CrowdSecCounters) -> Bouncer {
        let client = Client::new(
            settings.lapi_ca.as_deref(),
            settings.timeout,
            settings.max_bytes,
        )
        .map_err(|e| e.to_string());
        Bouncer {
            status: CrowdSecStatus {
                lapi: settings.lapi_url.clone(),
                state: "starting".into(),
                counters,
                ..Default::default()
            },
            settings,
            client,
            tracker: Tracker::default(),
            resync: true,
        }
    }

    fn url(&self) -> String {
        let s = &self.settings;
        let list = |v: &[String]| {
            v.iter()
                .map(|x| utf8_percent_encode(x, NON_ALPHANUMERIC).to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut url = format!(
            "{}/v1/decisions/stream?startup={}&dedup=false&scopes={}",
            s.lapi_url,
            self.resync,
            list(&s.scopes)
        );
        for (name, values) in [
            ("origins", &s.origins),
            ("scenarios_containing", &s.scenarios_containing),
            ("scenarios_not_containing", &s.scenarios_not_containing),
        ] {
            if !values.is_empty() {
                url.push_str(&format!("&{name}={}", list(values)));
            }
        }
        url
    }

    async fn poll(&mut self, sink: &Sink) {
        self.status.counters.polls += 1;
        match self.pull(sink).await {
            Ok(()) => {
                if self.status.state != "ok" {
                    info!(lapi = %self.settings.lapi_url, decisions = self.tracker.decisions(), "crowdsec: following the decision stream");
                }
                self.status.state = "ok".into();
                self.status.why = None;
                self.status.since = None;
                self.status.last_pull = Some(unix_now());
            }
            Err(why) => {
                self.status.counters.errors += 1;
                self.resync = true;
                if self.status.state != "unreachable" {
                    warn!(lapi = %self.settings.lapi_url, error = %why, "crowdsec: LAPI unreachable; current entries stay until they expire");
                    self.status.since = Some(unix_now());
                }
                self.status.state = "unreachable".into();
                self.status.why = Some(why);
            }
        }
        self.status.decisions = self.tracker.decisions();
        self.status.entries = self.tracker.entries();
    }

    async fn pull(&mut self, sink: &Sink) -> Result<(), String> {
        let client = self.client.as_ref().map_err(|e| e.clone())?;
        let key = (
            HeaderName::from_static("x-api-key"),
            self.settings.api_key.0.clone(),
        );
        let fetched = client
            .get(&self.url(), std::slice::from_ref(&key))
            .await
            .map_err(|e| e.to_string())?;
        let stream: Stream = serde_json::from_slice(&fetched.body)
            .map_err(|e| format!("the decision stream is not JSON of the expected shape: {e}"))?;
        let full = self.resync;
        let absorbed = self.tracker.absorb(stream, full, &self.settings.origins);
        let c = &mut self.status.counters;
        c.decisions_new += absorbed.new;
        c.decisions_deleted += absorbed.deleted;
        c.skipped += absorbed.skipped.len() as u64;
        log_skipped(&absorbed.skipped);
        let batch = absorbed.batch;
        if !batch.full && batch.set.is_empty() && batch.release.is_empty() {
            self.resync = false;
            return Ok(());
        }
        let (set, release) = (batch.set.len(), batch.release.len());
        let (reply, answer) = oneshot::channel();
        if !sink(Ask::Claims(batch, reply)) {
            return Err("the worker has stopped".into());
        }
        let outcome = answer
            .await
            .map_err(|_| "no answer from the worker".to_string())?;
        let c = &mut self.status.counters;
        c.entries_written += outcome.written as u64;
        c.entries_removed += outcome.removed as u64;
        c.entries_failed += outcome.failed.len() as u64;
        for f in outcome.failed.iter().take(SKIP_LINES) {
            warn!(entry = %f, "crowdsec: decision not enforced");
        }
        info!(
            full,
            set,
            release,
            written = outcome.written,
            removed = outcome.removed,
            failed = outcome.failed.len(),
            "crowdsec: decisions applied to the XDP block set"
        );
        self.resync = false;
        Ok(())
    }
}

fn log_skipped(skipped: &[(i64, String, Skip)]) {
    for (id, value, skip) in skipped.iter().take(SKIP_LINES) {
        let why = match skip {
            Skip::Type(t) => format!("type '{t}' is not a ban"),
            Skip::Scope(s) => format!("scope '{s}' is neither Ip nor Range"),
            Skip::Origin(o) => format!("origin '{o}' is not in [crowdsec] origins"),
            Skip::Value(v) => format!("'{v}' is not an address or range"),
            Skip::Duration(d) => d.clone(),
            Skip::Expired => "expired".into(),
        };
        info!(id, value = %value, why = %why, "crowdsec: decision skipped");
    }
    if skipped.len() > SKIP_LINES {
        info!(
            more = skipped.len() - SKIP_LINES,
            "crowdsec: more decisions skipped"
        );
    }
}

/// Follows `[crowdsec]` as the worker publishes it.
pub async fn run(
    mut view: watch::Receiver<Arc<View>>,
    shared: Arc<Mutex<Option<CrowdSecStatus>>>,
    sink: Sink,
) {
    let mut bouncer: Option<Bouncer> = None;
    let mut first = true;
    loop {
        let settings = view.borrow_and_update().crowdsec.clone();
        match (settings, bouncer.as_ref()) {
            (None, held) => {
                if held.is_some() || first {
                    // Without [crowdsec], nothing of CrowdSec's stays blocked.
                    release_all(&sink).await;
                }
                bouncer = None;
            }
            (Some(s), Some(b)) if b.settings == s => {}
            (Some(s), held) => {
                let counters = held.map(|b| b.status.counters).unwrap_or_default();
                bouncer = Some(Bouncer::new(s, counters));
            }
        }
        first = false;
        let wait = match bouncer.as_mut() {
            Some(b) => {
                b.poll(&sink).await;
                b.settings.poll
            }
            None => Duration::from_secs(86400),
        };
        if let Ok(mut s) = shared.lock() {
            *s = bouncer.as_ref().map(|b| b.status.clone());
        }
        tokio::select! {
            changed = view.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn release_all(sink: &Sink) {
    let (reply, answer) = oneshot::channel();
    let batch = Batch {
        source: Source::Crowdsec,
        full: true,
        set: Vec::new(),
        release: Vec::new(),
    };
    if sink(Ask::Claims(batch, reply)) {
        if let Ok(o) = answer.await {
            if o.removed > 0 {
                info!(
                    removed = o.removed,
                    "crowdsec: [crowdsec] is gone; its entries removed"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let close = |t: &str, want: f64| {
            let got = go_duration(t).unwrap();
            assert!((got - want).abs() < 1e-6, "{t}: {got}");
        };
        close("3h59m58.5s", 3.0 * 3600.0 + 59.0 * 60.0 + 58.5);
        close("1m0s", 60.0);
        close("-1m2.25s", -62.25);
        close("500ms", 0.5);
        close("1.5h", 5400.0);
        close("2µs", 2e-6);
        close("0", 0.0);
        close("0s", 0.0);
        for bad in ["", "-", "5", "3x", "h", "1h2", "1..5s", "--1s"] {
            assert!(go_duration(bad).is_err(), "{bad}");
        }
    }

    fn decision(id: i64, scope: &str, value: &str, kind: &str, duration: &str) -> Decision {
        Decision {
            id,
            origin: "cscli".into(),
            scenario: "manual 'ban' from 'test'".into(),
            scope: scope.into(),
            value: value.into(),
            kind: kind.into(),
            duration: duration.into(),
        }
    }

    #[test]
    fn bans_of_ip_and_range_scopes_only() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let ok =
            |d: Decision| judge(&d, &[]).map(|(net, left, reason)| (net, left.as_secs(), reason));
        assert_eq!(
            ok(decision(1, "Ip", "203.0.113.5", "ban", "3h59m58.5s")),
            Ok((
                n("203.0.113.5/32"),
                14399,
                "crowdsec/cscli: manual 'ban' from 'test'".into()
            ))
        );
        assert_eq!(
            ok(decision(1, "Range", "203.0.113.0/28", "ban", "1m")).map(|t| t.0),
            Ok(n("203.0.113.0/28"))
        );
        assert_eq!(
            ok(decision(1, "range", "203.0.113.7/28", "ban", "1m")).map(|t| t.0),
            Ok(n("203.0.113.0/28"))
        );
        assert_eq!(
            ok(decision(1, "ip", "2001:db8::5", "ban", "1m")).map(|t| t.0),
            Ok(n("2001:db8::5/128"))
        );
        assert_eq!(
            ok(decision(1, "Ip", "::ffff:203.0.113.5", "ban", "1m")).map(|t| t.0),
            Ok(n("203.0.113.5/32"))
        );
        assert_eq!(
            ok(decision(1, "Range", "::ffff:203.0.113.0/120", "ban", "1m")).map(|t| t.0),
            Ok(n("203.0.113.0/24"))
        );
        assert_eq!(
            ok(decision(1, "Ip", "203.0.113.5", "captcha", "1m")),
            Err(Skip::Type("captcha".into()))
        );
        assert_eq!(
            ok(decision(1, "Country", "FR", "ban", "1m")),
            Err(Skip::Scope("Country".into()))
        );
        assert_eq!(
            ok(decision(1, "Ip", "not-an-ip", "ban", "1m")),
            Err(Skip::Value("not-an-ip".into()))
        );
        assert_eq!(
            ok(decision(1, "Ip", "203.0.113.5", "ban", "-2s")),
            Err(Skip::Expired)
        );
        assert!(matches!(
            ok(decision(1, "Ip", "203.0.113.5", "ban", "soon")),
            Err(Skip::Duration(_))
        ));
        let only_capi = ["CAPI".to_string()];
        assert_eq!(
            judge(&decision(1, "Ip", "203.0.113.5", "ban", "1m"), &only_capi).map(|_| ()),
            Err(Skip::Origin("cscli".into()))
        );
    }

    fn stream(new: Vec<Decision>, deleted: Vec<Decision>) -> Stream {
        Stream {
            new: Some(new),
            deleted: Some(deleted),
        }
    }

    #[test]
    fn an_address_stays_blocked_while_any_decision_lives() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let mut t = Tracker::default();
        let a = t.absorb(
            stream(
                vec![
                    decision(1, "Ip", "203.0.113.5", "ban", "1h"),
                    decision(2, "Ip", "203.0.113.5", "ban", "4h"),
                    decision(3, "Range", "2001:db8::/64", "ban", "10m"),
                    decision(4, "Ip", "203.0.113.9", "captcha", "10m"),
                ],
                vec![],
            ),
            true,
            &[],
        );
        assert!(a.batch.full);
        assert_eq!(a.batch.set.len(), 2);
        assert!(
            a.batch.set[0].1 > Duration::from_secs(3 * 3600),
            "the longest decision counts"
        );
        assert_eq!(a.skipped.len(), 1);
        // The 4h decision is deleted: the address stays, for the 1h one.
        let a = t.absorb(
            stream(vec![], vec![decision(2, "Ip", "203.0.113.5", "ban", "-1s")]),
            false,
            &[],
        );
        assert_eq!(a.batch.set.len(), 1);
        assert!(a.batch.set[0].1 <= Duration::from_secs(3600));
        // The last one goes: the bouncer releases its claim.
        let a = t.absorb(
            stream(vec![], vec![decision(1, "Ip", "203.0.113.5", "ban", "-1s")]),
            false,
            &[],
        );
        assert_eq!(a.batch.release, vec![n("203.0.113.5/32")]);
        // A deleted decision the bouncer never followed releases nothing.
        let a = t.absorb(
            stream(
                vec![],
                vec![decision(77, "Ip", "198.51.100.7", "ban", "-1s")],
            ),
            false,
            &[],
        );
        assert!(a.batch.set.is_empty() && a.batch.release.is_empty());
        assert_eq!(t.entries(), 1);
        let s: Stream = serde_json::from_str(r#"{"new":null,"deleted":null}"#).unwrap();
        let a = t.absorb(s, false, &[]);
        assert!(a.batch.set.is_empty() && a.batch.release.is_empty());
    }
}
