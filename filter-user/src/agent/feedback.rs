//! Feedback: what repeated failures cost. The proxy reports each refusal with its class;
//! the agent counts them in sliding windows and decides.
//!
//! - Policy denials (a rule or the content policy said no) never count: one phone retrying a
//!   denied request must not block the office behind its NAT.
//! - Protocol abuse and credential failures count against the source address where the
//!   source's group allows it (`block_on`); past the group's threshold the address goes into
//!   the XDP block set. A group fed from a shared feed (Salesforce's egress serves every
//!   Salesforce tenant) blocks nothing by default.
//! - Credential failures also count against the identity that failed (a user name, a
//!   verified token's item, a certificate subject, or for a token that did not verify, that
//!   token alone); past its threshold the identity is refused at the request layer for a
//!   while, and the address is spared.
//!
//! The source group is looked up here, from the agent's own config: a proxy's claim is not
//! taken for it. Windows are split into `BUCKETS` sub-intervals, so memory per key is fixed;
//! keys tracked are bounded, the quietest evicted first.

use std::{collections::HashMap, hash::Hash, net::IpAddr};

use crate::{
    ipc::Failure,
    model::{outcome::FailureClass, settings::FeedbackSettings, Config},
    policy::rules::SourceIndex,
};

const BUCKETS: usize = 10;
/// Keys tracked at most, per kind.
const MAX_TRACKED: usize = 100_000;

/// What the agent does about a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    BlockSource {
        source: IpAddr,
        ttl_secs: u64,
        reason: String,
    },
    RefuseIdentity {
        identity: String,
        secs: u64,
        reason: String,
    },
}

struct Window {
    counts: [u32; BUCKETS],
    /// Index of the sub-interval that `counts` ends at.
    head: u64,
    last_ms: u64,
}

impl Window {
    fn advance(&mut self, tick: u64) {
        let gap = tick.saturating_sub(self.head);
        for i in 1..=gap.min(BUCKETS as u64) {
            self.counts[((self.head + i) % BUCKETS as u64) as usize] = 0;
        }
        self.head = self.head.max(tick);
    }

    fn total(&self) -> u32 {
        self.counts.iter().sum()
    }
}

/// Failures per key in a sliding window.
pub struct Counter<K> {
    window_ms: u64,
    keys: HashMap<K, Window>,
    max: usize,
}

impl<K: Hash + Eq + Clone> Counter<K> {
    pub fn new(window_ms: u64, max: usize) -> Counter<K> {
        Counter {
            window_ms: window_ms.max(BUCKETS as u64),
            keys: HashMap::new(),
            max,
        }
    }

    fn tick(&self, now_ms: u64) -> u64 {
        now_ms / (self.window_ms / BUCKETS as u64).max(1)
    }

    /// Counts one failure; returns the total in the window when it reaches `threshold`
    /// (and forgets the key: it starts afresh after whatever the total earns).
    pub fn record(&mut self, key: &K, threshold: u32, now_ms: u64) -> Option<u32> {
        self.record_with(key, threshold, now_ms, 0)
    }

    /// The same, with `elsewhere` failures counted for the key outside this window (other
    /// gates of a fleet) added before the threshold is checked.
    pub fn record_with(
        &mut self,
        key: &K,
        threshold: u32,
        now_ms: u64,
        elsewhere: u32,
    ) -> Option<u32> {
        let tick = self.tick(now_ms);
        if !self.keys.contains_key(key) {
            self.make_room(now_ms);
        }
        let w = self.keys.entry(key.clone()).or_insert(Window {
            counts: [0; BUCKETS],
            head: tick,
            last_ms: now_ms,
        });
        w.advance(tick);
        let slot = &mut w.counts[(tick % BUCKETS as u64) as usize];
        *slot = slot.saturating_add(1);
        w.last_ms = now_ms;
        let total = w.total().saturating_add(elsewhere);
        if total < threshold {
            return None;
        }
        self.keys.remove(key);
        Some(total)
    }

    /// Failures currently counted for a key.
    pub fn count(&self, key: &K, now_ms: u64) -> u32 {
        let tick = self.tick(now_ms);
        self.keys.get(key).map_or(0, |w| {
            let mut copy = Window {
                counts: w.counts,
                head: w.head,
                last_ms: w.last_ms,
            };
            copy.advance(tick);
            copy.total()
        })
    }

    pub fn tracked(&self) -> usize {
        self.keys.len()
    }

    fn make_room(&mut self, now_ms: u64) {
        if self.keys.len() < self.max {
            return;
        }
        let window = self.window_ms;
        self.keys
            .retain(|_, w| now_ms.saturating_sub(w.last_ms) < window);
        if self.keys.len() >= self.max {
            // All recent: drop the eighth seen longest ago.
            let mut seen: Vec<u64> = self.keys.values().map(|w| w.last_ms).collect();
            seen.sort_unstable();
            let cutoff = seen[(seen.len() / 8).min(seen.len() - 1)];
            self.keys.retain(|_, w| w.last_ms > cutoff);
        }
    }
}

/// How one source group's addresses may be blocked.
#[derive(Debug, Clone)]
struct GroupRule {
    block_on: Vec<FailureClass>,
    threshold: u32,
}

pub struct Feedback {
    settings: FeedbackSettings,
    sources: SourceIndex,
    /// Index by group id - 1; sources in no group use `unlisted`.
    groups: Vec<GroupRule>,
    unlisted: GroupRule,
    by_source: Counter<IpAddr>,
    by_identity: Counter<String>,
    /// Other gates' counts per source (a fleet): gate → count and until when (Unix ms).
    remote: HashMap<IpAddr, HashMap<String, FleetCount>>,
}

/// Another gate's failures against a source, and the Unix ms they lapse at.
pub type FleetCount = crate::model::fleet::FailCount;

/// Sources whose remote counts are kept at most.
const MAX_REMOTE: usize = 100_000;

impl Feedback {
    pub fn new(config: &Config) -> Feedback {
        let s = config.feedback;
        let window = s.window.as_millis() as u64;
        Feedback {
            settings: s,
            sources: SourceIndex::new(config),
            groups: config
                .groups
                .iter()
                .map(|g| GroupRule {
                    block_on: g.block_on.clone(),
                    threshold: g.block_failures.unwrap_or(s.failures),
                })
                .collect(),
            unlisted: GroupRule {
                block_on: vec![FailureClass::Protocol, FailureClass::Credential],
                threshold: s.failures,
            },
            by_source: Counter::new(window, MAX_TRACKED),
            by_identity: Counter::new(window, MAX_TRACKED),
            remote: HashMap::new(),
        }
    }

    /// Another gate's count against `source` (`None`: it has none now).
    pub fn set_remote(&mut self, source: IpAddr, gate: String, count: Option<FleetCount>) {
        match count {
            Some(c) => {
                if self.remote.len() >= MAX_REMOTE && !self.remote.contains_key(&source) {
                    let now = crate::agent::feeds::unix_now() * 1000;
                    self.remote
                        .retain(|_, g| g.values().any(|c| c.until_ms > now));
                    if self.remote.len() >= MAX_REMOTE {
                        return;
                    }
                }
                self.remote.entry(source).or_default().insert(gate, c);
            }
            None => {
                if let Some(g) = self.remote.get_mut(&source) {
                    g.remove(&gate);
                    if g.is_empty() {
                        self.remote.remove(&source);
                    }
                }
            }
        }
    }

    /// Forgets every other gate's counts (before a full list from the fleet).
    pub fn clear_remote(&mut self) {
        self.remote.clear();
    }

    /// Other gates' live failures against `source`.
    fn elsewhere(&self, source: IpAddr, now_ms: u64) -> u32 {
        self.remote.get(&source).map_or(0, |g| {
            g.values()
                .filter(|c| c.until_ms > now_ms)
                .map(|c| c.count)
                .fold(0u32, u32::saturating_add)
        })
    }

    /// Keeps the counts when a reload leaves the window as it was.
    pub fn reconfigure(&mut self, config: &Config) {
        let next = Feedback::new(config);
        if next.settings.window == self.settings.window {
            let counts_s = std::mem::replace(&mut self.by_source, Counter::new(1, 1));
            let counts_i = std::mem::replace(&mut self.by_identity, Counter::new(1, 1));
            let remote = std::mem::take(&mut self.remote);
            *self = Feedback {
                by_source: counts_s,
                by_identity: counts_i,
                remote,
                ..next
            };
        } else {
            let remote = std::mem::take(&mut self.remote);
            *self = Feedback { remote, ..next };
        }
    }

    /// The name of a source's group, from the agent's own config.
    pub fn group_of(&self, source: IpAddr) -> Option<&str> {
        self.sources.group(source)
    }

    fn rule(&self, source: IpAddr) -> &GroupRule {
        self.sources
            .id(source)
            .and_then(|id| self.groups.get(id as usize - 1))
            .unwrap_or(&self.unlisted)
    }

    /// Counts one reported failure; returns what it earns.
    pub fn record(&mut self, f: &Failure, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        if f.class == FailureClass::Policy {
            return actions;
        }
        let s = self.settings;
        let secs = s.window.as_secs().max(1);
        if f.class == FailureClass::Credential && s.identity_failures > 0 {
            if let Some(identity) = &f.identity {
                if let Some(total) = self
                    .by_identity
                    .record(identity, s.identity_failures, now_ms)
                {
                    actions.push(Action::RefuseIdentity {
                        identity: identity.clone(),
                        secs: s.identity_block.as_secs(),
                        reason: format!(
                            "{total} credential failures within {secs} s, last: {}",
                            f.reason
                        ),
                    });
                }
            }
        }
        let rule = self.rule(f.source).clone();
        if rule.threshold == 0 || !rule.block_on.contains(&f.class) {
            return actions;
        }
        let elsewhere = self.elsewhere(f.source, now_ms);
        if let Some(total) =
            self.by_source
                .record_with(&f.source, rule.threshold, now_ms, elsewhere)
        {
            actions.push(Action::BlockSource {
                source: f.source,
                ttl_secs: s.block.as_secs(),
                reason: match elsewhere {
                    0 => format!(
                        "{total} {} failures within {secs} s, last: {}",
                        f.class.name(),
                        f.reason
                    ),
                    n => format!(
                        "{total} {} failures within {secs} s ({n} at other gates of the fleet), last: {}",
                        f.class.name(),
                        f.reason
                    ),
                },
            });
        }
        actions
    }

    /// Failures counted against a source now.
    pub fn count(&self, source: IpAddr, now_ms: u64) -> u32 {
        self.by_source.count(&source, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[sources.offices]
cidrs = ["198.51.100.0/25"]
[sources.salesforce]
feed = "feed.json"
[sources.partner]
cidrs = ["203.0.113.77/32"]
block_on = ["protocol"]
block_failures = 3
[feedback]
failures = 5
window_secs = 10
identity_failures = 4
"#;

    fn feedback() -> Feedback {
        // One directory per call: tests run in parallel and would race on one feed file.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ewsgate-fb-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("feed.json"),
            r#"{"prefixes":[{"ip_prefix":"198.51.100.128/25"}]}"#,
        )
        .unwrap();
        let config = Config::parse(&dir.join("c.toml"), CONFIG).unwrap();
        let feedback = Feedback::new(&config);
        let _ = std::fs::remove_dir_all(&dir);
        feedback
    }

    fn failure(source: &str, class: FailureClass, identity: Option<&str>) -> Failure {
        Failure {
            source: source.parse().unwrap(),
            group: None,
            class,
            reason: "x".into(),
            identity: identity.map(str::to_string),
        }
    }

    #[test]
    fn policy_denials_never_count() {
        let mut f = feedback();
        for i in 0..100 {
            let got = f.record(
                &failure("198.51.100.10", FailureClass::Policy, Some("user:a")),
                i,
            );
            assert!(got.is_empty());
        }
        assert_eq!(f.count("198.51.100.10".parse().unwrap(), 100), 0);
    }

    #[test]
    fn protocol_failures_block_a_blockable_source_at_its_threshold() {
        let mut f = feedback();
        for i in 0..4 {
            assert!(f
                .record(&failure("198.51.100.10", FailureClass::Protocol, None), i)
                .is_empty());
        }
        let got = f.record(&failure("198.51.100.10", FailureClass::Protocol, None), 5);
        assert!(
            matches!(&got[..], [Action::BlockSource { ttl_secs: 900, .. }]),
            "{got:?}"
        );
        // The partner group's own threshold, and only for protocol failures.
        for i in 0..2 {
            assert!(f
                .record(&failure("203.0.113.77", FailureClass::Protocol, None), i)
                .is_empty());
        }
        assert_eq!(
            f.record(&failure("203.0.113.77", FailureClass::Protocol, None), 3)
                .len(),
            1
        );
        for i in 0..10 {
            assert!(f
                .record(&failure("203.0.113.77", FailureClass::Credential, None), i)
                .is_empty());
        }
    }

    #[test]
    fn a_shared_feed_group_refuses_the_identity_not_the_address() {
        let mut f = feedback();
        let mut got = Vec::new();
        for i in 0..20 {
            got.extend(f.record(
                &failure(
                    "198.51.100.140",
                    FailureClass::Credential,
                    Some("token:ab12"),
                ),
                i,
            ));
        }
        assert!(
            got.iter()
                .all(|a| matches!(a, Action::RefuseIdentity { .. })),
            "{got:?}"
        );
        assert_eq!(got.len(), 5, "refused at every fourth failure");
        assert!(f
            .record(&failure("198.51.100.140", FailureClass::Protocol, None), 30)
            .is_empty());
    }

    #[test]
    fn failures_at_other_gates_count_toward_the_threshold() {
        let mut f = feedback();
        let src: IpAddr = "198.51.100.10".parse().unwrap();
        let count = |count, until_ms| Some(FleetCount { count, until_ms });
        f.set_remote(src, "gate-2".into(), count(3, 10_000));
        for i in 0..1 {
            assert!(f
                .record(&failure("198.51.100.10", FailureClass::Protocol, None), i)
                .is_empty());
        }
        let got = f.record(&failure("198.51.100.10", FailureClass::Protocol, None), 2);
        assert!(
            matches!(&got[..], [Action::BlockSource { reason, .. }] if reason.contains("3 at other gates")),
            "{got:?}"
        );
        // A lapsed or withdrawn count no longer counts.
        f.set_remote(src, "gate-2".into(), count(3, 10));
        f.set_remote(src, "gate-3".into(), count(2, 10_000));
        f.set_remote(src, "gate-3".into(), None);
        for i in 0..4 {
            assert!(f
                .record(
                    &failure("198.51.100.10", FailureClass::Protocol, None),
                    100 + i
                )
                .is_empty());
        }
    }

    #[test]
    fn old_failures_slide_out_and_keys_are_bounded() {
        let mut c: Counter<IpAddr> = Counter::new(10_000, 100);
        let src: IpAddr = "2001:db8:300::9".parse().unwrap();
        for i in 0..4 {
            assert_eq!(c.record(&src, 5, i * 1000), None);
        }
        assert_eq!(c.count(&src, 3_500), 4);
        assert_eq!(c.count(&src, 11_000), 2);
        assert_eq!(c.count(&src, 30_000), 0);
        for i in 0..1000u32 {
            c.record(
                &IpAddr::from([203, 0, 113, (i % 250) as u8]),
                1000,
                u64::from(i),
            );
            c.record(
                &IpAddr::from(std::net::Ipv6Addr::from(u128::from(i))),
                1000,
                u64::from(i),
            );
        }
        assert!(c.tracked() <= 100, "{}", c.tracked());
    }
}
