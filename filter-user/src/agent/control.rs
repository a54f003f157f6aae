//! The control socket: one JSON request per line, one JSON response per line. The socket is
//! mode 0600 and the daemon also checks the peer's uid, so only root can change the filter.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    agent::{crowdsec::CrowdSecStatus, feeds::FeedStatus, fleet::FleetStatus},
    packet::maps::List,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Add {
        list: List,
        net: IpNet,
        ttl_secs: Option<u64>,
        reason: Option<String>,
    },
    Del {
        list: List,
        net: IpNet,
    },
    List {
        list: List,
    },
    Reload,
    Shutdown,
    /// Fetch one live feed, or all, now.
    FeedRefresh {
        group: Option<String>,
    },
    /// How the gate would judge a hypothetical request (`ewsgate explain`).
    Explain {
        query: Box<crate::ops::explain::Query>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok { message: String },
    Status(Box<Status>),
    Entries { entries: Vec<Listed> },
    Explained(Box<crate::ops::explain::Explanation>),
    Error { message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listed {
    pub net: IpNet,
    pub ttl_left: Option<u64>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub config: String,
    pub pin_dir: String,
    pub start: String,
    pub monitor: bool,
    pub generation: u32,
    /// interface → attach mode
    pub interfaces: Vec<(String, String)>,
    pub protected: Vec<String>,
    pub prefixes_v4: usize,
    pub prefixes_v6: usize,
    pub block_entries: usize,
    pub allow_entries: usize,
    /// reason → packets
    pub counters: Vec<(String, u64)>,
    /// group → packets passed
    pub groups: Vec<(String, u64)>,
    pub last_reload: String,
    /// The policy the agent runs (the proxy commits the same).
    pub policy: u64,
    /// Identities refused at the request layer for repeated credential failures.
    pub refused_identities: usize,
    /// Live range feeds.
    #[serde(default)]
    pub feeds: Vec<FeedStatus>,
    /// The CrowdSec bouncer, when `[crowdsec]` is set.
    #[serde(default)]
    pub crowdsec: Option<CrowdSecStatus>,
    /// The etcd fleet, when `[fleet]` is set.
    #[serde(default)]
    pub fleet: Option<FleetStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the daemon at {path}: {source} (is `ewsgate run` running?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("control socket: bad message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Sends one request and waits for its answer.
pub fn request(socket: &Path, req: &Request) -> Result<Response, ControlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    // A reload of a large config takes a while; anything else answers at once.
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(serde_json::from_str(&answer)?)
}
