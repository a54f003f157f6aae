//! A whole validated configuration. `config` reads it from a file; nothing here does I/O.

use std::path::PathBuf;

use super::{
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
    /// `[detections]` and `[audit]`.
    pub ops: OpsSettings,
}

impl Config {
    pub fn prefix_count(&self) -> usize {
        self.groups.iter().map(|g| g.v4.len() + g.v6.len()).sum()
    }
}
