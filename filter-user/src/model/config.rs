//! A whole validated configuration. `config` reads it from a file; nothing here does I/O.

use std::path::PathBuf;

use ipnet::IpNet;

use super::{
    agent::{Copy, CopyMeta, CrowdSecSettings, FeedSettings, Held, LiveFeed},
    metrics::MetricsSettings,
    ops::OpsSettings,
    packet::{Protected, SourceGroup, XdpSettings},
    rules::Rule,
    settings::{ContentSettings, FeedbackSettings, ProxySettings, TokenSettings},
};

/// A validated configuration; group ids are the position in `groups` plus one.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub xdp: XdpSettings,
    pub protect: Vec<Protected>,
    pub groups: Vec<SourceGroup>,
    /// The request layer; absent when the daemon runs the packet filter only.
    pub proxy: Option<ProxySettings>,
    pub tokens: TokenSettings,
    pub feedback: FeedbackSettings,
    pub content: ContentSettings,
    /// Ordered, first match wins, default deny.
    pub rules: Vec<Rule>,
    /// Live range feeds (`feed_url` groups) and how they are fetched.
    pub feeds: FeedSettings,
    /// The CrowdSec Local API followed as a bouncer.
    pub crowdsec: Option<CrowdSecSettings>,
    /// `[detections]` and `[audit]`.
    pub ops: OpsSettings,
    /// `[metrics]`: where `GET /metrics` is served.
    pub metrics: Option<MetricsSettings>,
    /// The etcd fleet this gate belongs to; `None`: a standalone gate.
    pub fleet: Option<super::fleet::FleetSettings>,
}

impl Config {
    pub fn prefix_count(&self) -> usize {
        self.groups.iter().map(|g| g.v4.len() + g.v6.len()).sum()
    }

    /// The live feed of `group`, if it has one.
    pub fn live_feed(&self, group: &str) -> Option<&LiveFeed> {
        self.feeds.live.iter().find(|l| l.group == group)
    }

    /// Replaces the fetched part of a live feed's group: its `base` plus `nets`. Returns
    /// whether the group's prefixes changed (the copy's metadata is replaced either way).
    pub fn set_feed(
        &mut self,
        group: &str,
        nets: Vec<IpNet>,
        meta: CopyMeta,
    ) -> Result<bool, String> {
        let live = self
            .feeds
            .live
            .iter_mut()
            .find(|l| l.group == group)
            .ok_or_else(|| format!("source group '{group}' no longer has a feed_url"))?;
        let changed = live.nets() != nets.as_slice();
        let all: Vec<IpNet> = live.base.iter().chain(&nets).copied().collect();
        live.copy = Copy::Held(Held { nets, meta });
        if let Some(g) = self.groups.iter_mut().find(|g| g.name == group) {
            let fresh = SourceGroup::from_nets(group.to_string(), all);
            g.v4 = fresh.v4;
            g.v6 = fresh.v6;
        }
        Ok(changed)
    }
}
