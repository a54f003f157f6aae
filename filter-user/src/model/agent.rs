//! The settings of the agent's outside sources: live range feeds (`feed_url` groups and
//! `[feeds]`) with the copy each group holds, and the CrowdSec Local API (`[crowdsec]`).

use std::{fmt, path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/ewsgate/feeds";

/// Which entries of a feed to keep. An empty list keeps every value; a non-empty one keeps
/// only entries that carry one of its values (an entry without the field is dropped).
/// Values compare without regard to ASCII case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedFilter {
    pub regions: Vec<String>,
    pub providers: Vec<String>,
    pub directions: Vec<String>,
}

/// `[feeds]`: how live feeds are fetched and guarded.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedSettings {
    /// Last good copies, one `<group>.json` each.
    pub state_dir: PathBuf,
    pub refresh: Duration,
    pub timeout: Duration,
    pub max_bytes: usize,
    /// A fetched feed with fewer prefixes than `(1 - max_shrink)` of the copy in force is
    /// refused.
    pub max_shrink: f64,
    /// The groups with a `feed_url`, in group order.
    pub live: Vec<LiveFeed>,
}

impl Default for FeedSettings {
    fn default() -> Self {
        FeedSettings {
            state_dir: DEFAULT_STATE_DIR.into(),
            refresh: Duration::from_secs(3600),
            timeout: Duration::from_secs(10),
            max_bytes: 4 << 20,
            max_shrink: 0.2,
            live: Vec::new(),
        }
    }
}

/// A source group fed from a URL.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveFeed {
    pub group: String,
    pub url: String,
    /// CA for the feed's certificate; the system's roots when `None`.
    pub ca: Option<PathBuf>,
    pub filter: FeedFilter,
    /// The group's own `cidrs` and `files`, kept beside the feed.
    pub base: Vec<IpNet>,
    pub copy: Copy,
}

/// The copy of a live feed the group holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Copy {
    /// Nothing fetched yet: the group holds its `base` only.
    None,
    /// A last good copy exists but cannot be read; the group holds its `base` only.
    Unreadable(String),
    Held(Held),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    /// The feed's prefixes under the group's filters, sorted.
    pub nets: Vec<IpNet>,
    pub meta: CopyMeta,
}

/// Where and when a copy was fetched, and the validators for a conditional request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyMeta {
    pub url: String,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// Unix seconds when this copy was fetched and accepted.
    pub fetched: u64,
}

impl LiveFeed {
    pub fn nets(&self) -> &[IpNet] {
        match &self.copy {
            Copy::Held(h) => &h.nets,
            _ => &[],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CrowdSecSettings {
    /// `http://` (loopback only) or `https://`, without a trailing `/v1/...`.
    pub lapi_url: String,
    pub api_key: Secret,
    /// CA for an `https` LAPI; the system's roots when `None`.
    pub lapi_ca: Option<PathBuf>,
    pub poll: Duration,
    pub timeout: Duration,
    pub max_bytes: usize,
    /// Decision scopes asked for: `ip`, `range`.
    pub scopes: Vec<String>,
    /// Decision origins kept (all when empty): `crowdsec`, `cscli`, `CAPI`, `lists`, ...
    pub origins: Vec<String>,
    pub scenarios_containing: Vec<String>,
    pub scenarios_not_containing: Vec<String>,
}

/// The bouncer's API key: compared, sent, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"(secret)\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_not_printed() {
        assert_eq!(format!("{:?}", Secret("abc".into())), "\"(secret)\"");
    }
}
