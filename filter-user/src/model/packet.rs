//! The packet layer's settings: interfaces, protected endpoints, source groups, map sizes.

use std::{fmt, net::IpAddr, path::PathBuf};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

use super::outcome::FailureClass;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ewsgate";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/ewsgate/control.sock";

#[derive(Debug, Clone, PartialEq)]
pub struct XdpSettings {
    pub interfaces: Vec<String>,
    pub mode: AttachMode,
    pub monitor: bool,
    pub pin_dir: PathBuf,
    pub control_socket: PathBuf,
    pub capacity: Capacity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic with a warning.
    Auto,
    Native,
    Generic,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Auto => "auto",
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        })
    }
}

/// Map sizes fixed when the maps are first created (changing them needs `ewsgate detach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capacity {
    /// 1 KiB blocks for IPv4 prefixes longer than /24: one per /24 that holds such a prefix.
    pub long_prefix_blocks: u32,
    pub ipv6_prefixes: u32,
    /// Each of the block and dynamic allow maps (exact and CIDR) holds this many.
    pub dynamic_entries: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            long_prefix_blocks: 8192,
            ipv6_prefixes: 65536,
            dynamic_entries: 65536,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protected {
    pub addr: IpAddr,
    /// (IP protocol number, port). Empty: the whole address is protected.
    pub ports: Vec<(u8, u16)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceGroup {
    pub name: String,
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
    /// Failure classes that may put one of this group's addresses in the block set. A group
    /// fed from a shared feed blocks nothing by default: its addresses serve every tenant.
    pub block_on: Vec<FailureClass>,
    /// This group's own threshold, instead of `[feedback] failures`.
    pub block_failures: Option<u32>,
}

impl SourceGroup {
    /// A group of `nets`, split by family, sorted, without duplicates.
    pub fn from_nets(name: String, nets: impl IntoIterator<Item = IpNet>) -> SourceGroup {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for n in nets {
            match n {
                IpNet::V4(n) => v4.push(n),
                IpNet::V6(n) => v6.push(n),
            }
        }
        v4.sort();
        v4.dedup();
        v6.sort();
        v6.dedup();
        SourceGroup {
            name,
            v4,
            v6,
            block_on: vec![FailureClass::Protocol, FailureClass::Credential],
            block_failures: None,
        }
    }
}

/// Every IPv4 prefix of the groups with its group's id (1-based, in the order the groups
/// are written), shortest first, each prefix once: a prefix that two groups list is the
/// first one's. The XDP tables and the proxy's source index are both built from this list,
/// so that they put an address in the same group.
pub fn v4_prefixes(groups: &[SourceGroup]) -> Vec<(Ipv4Net, u32)> {
    let mut all: Vec<(Ipv4Net, u32)> = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        all.extend(g.v4.iter().map(|n| (*n, i as u32 + 1)));
    }
    // Stable: of equal prefixes the first group's stays first, and dedup keeps it.
    all.sort_by_key(|(n, _)| (n.prefix_len(), n.network()));
    all.dedup_by_key(|(n, _)| *n);
    all
}

/// The same for IPv6.
pub fn v6_prefixes(groups: &[SourceGroup]) -> Vec<(Ipv6Net, u32)> {
    let mut all: Vec<(Ipv6Net, u32)> = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        all.extend(g.v6.iter().map(|n| (*n, i as u32 + 1)));
    }
    all.sort_by_key(|(n, _)| *n);
    all.dedup_by_key(|(n, _)| *n);
    all
}
