//! Who put each block entry in place. The XDP block set holds one entry per address or
//! range; several sources may want it (an administrator, the feedback loop, CrowdSec). Each
//! source holds its own claim, and the entry lasts as long as the longest claim. A source
//! releasing its claim removes the entry only when no other source still holds one, so a
//! CrowdSec decision deleted upstream never lifts a block an administrator set by hand.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `ewsgate block add`, or an entry found in the maps with no known owner.
    Manual,
    /// The proxy's failure feedback.
    Feedback,
    Crowdsec,
    /// A detection's `block-source` action.
    Detection,
    /// Another gate of the fleet (through etcd).
    Fleet,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Manual => "manual",
            Source::Feedback => "feedback",
            Source::Crowdsec => "crowdsec",
            Source::Detection => "detection",
            Source::Fleet => "fleet",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// CLOCK_MONOTONIC nanoseconds (the clock the program checks), or `None`: permanent.
    pub until: Option<u64>,
    pub reason: String,
}

/// What the block set should hold for an address after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Write the entry with this expiry and reason.
    Set {
        until: Option<u64>,
        reason: String,
    },
    Remove,
    /// The entry is as it was.
    Keep,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    claims: BTreeMap<IpNet, BTreeMap<Source, Claim>>,
}

impl Ledger {
    pub fn knows(&self, net: &IpNet) -> bool {
        self.claims.contains_key(net)
    }

    pub fn claims(&self, net: &IpNet) -> Option<&BTreeMap<Source, Claim>> {
        self.claims.get(net)
    }

    /// Puts back what `claims` returned before a change that could not be applied.
    pub fn restore(&mut self, net: IpNet, before: Option<BTreeMap<Source, Claim>>) {
        match before {
            Some(c) => self.claims.insert(net, c),
            None => self.claims.remove(&net),
        };
    }

    /// Sets `source`'s claim on `net` (replacing its earlier one).
    pub fn claim(&mut self, net: IpNet, source: Source, claim: Claim) -> Effect {
        let before = self.merged(&net);
        self.claims.entry(net).or_default().insert(source, claim);
        self.effect(&net, before)
    }

    /// Drops `source`'s claim on `net`; other sources' claims stay.
    pub fn release(&mut self, net: IpNet, source: Source) -> Effect {
        let before = self.merged(&net);
        if let Some(c) = self.claims.get_mut(&net) {
            c.remove(&source);
            if c.is_empty() {
                self.claims.remove(&net);
            }
        }
        self.effect(&net, before)
    }

    /// Drops every claim on `net` (an administrator's `block del`); returns who held one.
    pub fn release_all(&mut self, net: &IpNet) -> Vec<Source> {
        self.claims
            .remove(net)
            .map(|c| c.into_keys().collect())
            .unwrap_or_default()
    }

    /// Every address with a claim.
    pub fn nets(&self) -> Vec<IpNet> {
        self.claims.keys().copied().collect()
    }

    /// The addresses `source` holds a claim on.
    pub fn held_by(&self, source: Source) -> Vec<IpNet> {
        self.claims
            .iter()
            .filter(|(_, c)| c.contains_key(&source))
            .map(|(n, _)| *n)
            .collect()
    }

    /// Forgets claims that expired by `now` (the program already ignores their entries).
    pub fn sweep(&mut self, now: u64) -> usize {
        let mut dropped = 0;
        self.claims.retain(|_, c| {
            let before = c.len();
            c.retain(|_, claim| claim.until.is_none_or(|u| u > now));
            dropped += before - c.len();
            !c.is_empty()
        });
        dropped
    }

    /// The entry all claims on `net` add up to: the longest expiry, every reason.
    fn merged(&self, net: &IpNet) -> Option<(Option<u64>, String)> {
        let claims = self.claims.get(net)?;
        let until = claims
            .values()
            .map(|c| c.until)
            .reduce(|a, b| match (a, b) {
                (None, _) | (_, None) => None,
                (Some(a), Some(b)) => Some(a.max(b)),
            })
            .flatten();
        let reason = claims
            .values()
            .map(|c| c.reason.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        Some((until, reason))
    }

    fn effect(&self, net: &IpNet, before: Option<(Option<u64>, String)>) -> Effect {
        match (before, self.merged(net)) {
            (_, None) => Effect::Remove,
            (Some(b), Some(a)) if a == b => Effect::Keep,
            (_, Some((until, reason))) => Effect::Set { until, reason },
        }
    }
}

/// A source's claims, sent to the worker in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub source: Source,
    /// `set` is everything the source holds: its claims on anything else are released.
    pub full: bool,
    /// (address or range, time left, reason); `Duration::MAX` is permanent.
    pub set: Vec<(IpNet, Duration, String)>,
    pub release: Vec<IpNet>,
}

/// What a batch did to the block set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Entries written (new, or with a new expiry or reason).
    pub written: usize,
    pub removed: usize,
    /// Entries that could not be written, with the reason (the map is full, say).
    pub failed: Vec<String>,
}

/// The block set as the ledger changes it: the worker's maps, or a test's model.
pub trait BlockSet {
    fn write(&mut self, net: IpNet, until: Option<u64>, reason: &str) -> Result<(), String>;
    fn remove(&mut self, net: IpNet) -> Result<(), String>;
}

/// Applies `batch` at monotonic time `now`. A write that fails leaves the ledger as it was
/// for that address, so ledger and maps agree.
pub fn apply(ledger: &mut Ledger, batch: Batch, now: u64, set: &mut impl BlockSet) -> Outcome {
    let mut out = Outcome::default();
    if batch.full {
        let keep: BTreeSet<IpNet> = batch.set.iter().map(|(n, _, _)| *n).collect();
        for net in ledger.held_by(batch.source) {
            if !keep.contains(&net) {
                let effect = ledger.release(net, batch.source);
                enact(ledger, net, None, effect, set, &mut out);
            }
        }
    }
    for (net, left, reason) in batch.set {
        let before = ledger.claims(&net).cloned();
        let until = (left != Duration::MAX)
            .then(|| now.saturating_add(left.as_nanos().min(u64::MAX as u128) as u64));
        let effect = ledger.claim(net, batch.source, Claim { until, reason });
        enact(ledger, net, Some(before), effect, set, &mut out);
    }
    for net in batch.release {
        let effect = ledger.release(net, batch.source);
        enact(ledger, net, None, effect, set, &mut out);
    }
    out
}

/// Carries one effect into the block set; `before` restores the ledger if a write fails.
pub fn enact(
    ledger: &mut Ledger,
    net: IpNet,
    before: Option<Option<BTreeMap<Source, Claim>>>,
    effect: Effect,
    set: &mut impl BlockSet,
    out: &mut Outcome,
) {
    let result = match &effect {
        Effect::Keep => return,
        Effect::Set { until, reason } => set.write(net, *until, reason).map(|()| out.written += 1),
        Effect::Remove => set.remove(net).map(|()| out.removed += 1),
    };
    if let Err(e) = result {
        if let Some(before) = before {
            ledger.restore(net, before);
        }
        out.failed.push(format!("{net}: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn claim(until: Option<u64>, reason: &str) -> Claim {
        Claim {
            until,
            reason: reason.into(),
        }
    }

    #[test]
    fn a_release_never_lifts_another_sources_block() {
        let mut l = Ledger::default();
        let n = net("203.0.113.5/32");
        assert_eq!(
            l.claim(n, Source::Manual, claim(None, "by hand")),
            Effect::Set {
                until: None,
                reason: "by hand".into()
            }
        );
        // CrowdSec bans the same address: the entry stays permanent, both reasons shown.
        assert!(matches!(
            l.claim(n, Source::Crowdsec, claim(Some(100), "crowdsec/cscli")),
            Effect::Set { until: None, .. }
        ));
        assert_eq!(
            l.release(n, Source::Crowdsec),
            Effect::Set {
                until: None,
                reason: "by hand".into()
            }
        );
        assert_eq!(l.release(n, Source::Manual), Effect::Remove);
        // Releasing what was never claimed removes nothing another source holds.
        l.claim(n, Source::Feedback, claim(Some(50), "feedback"));
        assert_eq!(l.release(n, Source::Crowdsec), Effect::Keep);
        assert_eq!(l.held_by(Source::Feedback), vec![n]);
    }

    /// The block set as a map, refusing writes once it holds `cap` entries.
    #[derive(Default)]
    struct Model {
        entries: BTreeMap<IpNet, (Option<u64>, String)>,
        cap: usize,
    }

    impl BlockSet for Model {
        fn write(&mut self, net: IpNet, until: Option<u64>, reason: &str) -> Result<(), String> {
            if !self.entries.contains_key(&net) && self.entries.len() >= self.cap {
                return Err("full".into());
            }
            self.entries.insert(net, (until, reason.into()));
            Ok(())
        }
        fn remove(&mut self, net: IpNet) -> Result<(), String> {
            self.entries.remove(&net);
            Ok(())
        }
    }

    #[test]
    fn a_full_batch_replaces_only_its_own_claims() {
        let mut l = Ledger::default();
        let mut m = Model {
            cap: 2,
            ..Default::default()
        };
        let (a, b, c) = (
            net("203.0.113.5/32"),
            net("203.0.113.0/28"),
            net("2001:db8::/48"),
        );
        let mut out = Outcome::default();
        let effect = l.claim(a, Source::Manual, claim(None, "by hand"));
        enact(&mut l, a, None, effect, &mut m, &mut out);
        let batch = |set: Vec<IpNet>, full| Batch {
            source: Source::Crowdsec,
            full,
            set: set
                .into_iter()
                .map(|n| (n, Duration::from_secs(60), "crowdsec/cscli".to_string()))
                .collect(),
            release: vec![],
        };
        let out = apply(&mut l, batch(vec![a, b], true), 1_000, &mut m);
        assert_eq!((out.written, out.removed), (2, 0));
        assert_eq!(m.entries[&a].0, None, "the manual claim is permanent");
        assert_eq!(m.entries[&b].0, Some(1_000 + 60_000_000_000));
        // A resync without a and b: b goes, a stays (someone else holds it).
        let out = apply(&mut l, batch(vec![c], true), 2_000, &mut m);
        assert_eq!((out.written, out.removed), (2, 1), "{out:?}");
        assert!(m.entries.contains_key(&a) && !m.entries.contains_key(&b));
        assert_eq!(m.entries[&a].1, "by hand");
        // The map is full: the claim is not kept either.
        let d = net("198.51.100.0/24");
        let out = apply(&mut l, batch(vec![c, d], true), 3_000, &mut m);
        assert_eq!(out.failed.len(), 1, "{out:?}");
        assert!(!l.knows(&d));
    }

    #[test]
    fn the_longest_claim_wins_and_expired_ones_go() {
        let mut l = Ledger::default();
        let n = net("2001:db8:300::/64");
        l.claim(n, Source::Crowdsec, claim(Some(100), "a"));
        assert!(matches!(
            l.claim(n, Source::Feedback, claim(Some(50), "b")),
            Effect::Set {
                until: Some(100),
                ..
            }
        ));
        assert_eq!(l.sweep(60), 1);
        assert_eq!(l.claims(&n).map(|c| c.len()), Some(1));
        assert_eq!(l.sweep(100), 1);
        assert!(!l.knows(&n));
        l.claim(n, Source::Manual, claim(None, "m"));
        l.claim(n, Source::Crowdsec, claim(Some(9), "c"));
        assert_eq!(l.release_all(&n), vec![Source::Manual, Source::Crowdsec]);
        assert!(!l.knows(&n));
    }
}
