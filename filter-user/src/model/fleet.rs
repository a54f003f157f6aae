//! The fleet: gates that share blocks, allows, failure counts and config revisions through
//! etcd (`[fleet]`). The settings and the key layout live here as plain data; the session
//! that speaks to etcd is `agent::fleet`.
//!
//! Key layout, under `prefix` (default `/ewsgate`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `<prefix>/block/<net>` | [`Entry`]: expiry (Unix ms), reason, gate | one per entry, its time left |
//! | `<prefix>/allow/<net>` | [`Entry`] | as for blocks |
//! | `<prefix>/fail/<address>/<gate>` | [`FailCount`]: a gate's failures in its window | the gate's session |
//! | `<prefix>/config` | [`Revision`]: a config bundle without `[xdp]`/`[fleet]` | none |
//! | `<prefix>/gate/<gate>` | [`GateReport`]: revision run or refused, contact, counts | none |
//! | `<prefix>/seen/<user, hex>/<gate>` | a verified user's last place at that gate | the gate's session |
//!
//! `<net>` is the CIDR with `/` written as `_` (`203.0.113.7_32`), so one entry is one key
//! and a prefix scan lists a set.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub const DEFAULT_PREFIX: &str = "/ewsgate";

/// `[fleet]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// `http://HOST:PORT` or `https://HOST:PORT`, each an etcd member's client URL.
    pub endpoints: Vec<String>,
    pub tls: Option<FleetTls>,
    /// Every key this fleet uses starts with it; no trailing `/`.
    pub prefix: String,
    /// This gate's name: `[A-Za-z0-9._-]`, unique in the fleet.
    pub gate: String,
    /// Deadline on every etcd call (connect, get, put, keepalive).
    pub timeout: Duration,
    /// TTL of the gate's session lease (its failure counts die with it).
    pub session_ttl: Duration,
}

/// Client certificate, its key and the CA that signed the members' certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetTls {
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

/// The two shared sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Set {
    Block,
    Allow,
}

impl Set {
    pub fn name(self) -> &'static str {
        match self {
            Set::Block => "block",
            Set::Allow => "allow",
        }
    }
}

/// A block or allow entry as the fleet stores it. The expiry rides in the value: etcd
/// deletes a leased key late (a TTL is a minimum), so each gate enforces it itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Unix milliseconds; `None` is permanent.
    pub until_ms: Option<u64>,
    pub reason: String,
    /// The gate that put it there.
    pub gate: String,
}

/// One gate's failures against one source within its feedback window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailCount {
    pub count: u32,
    /// Unix ms after which the count no longer counts (the window has passed).
    pub until_ms: u64,
}

/// A config revision: the bundle (config text and every file it names) as pushed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revision {
    /// The config text, without `[xdp]` and `[fleet]` (each gate keeps its own).
    pub text: String,
    /// Where it was read from: relative names in it resolve against this path.
    pub path: PathBuf,
    pub files: Vec<(PathBuf, Vec<u8>)>,
    pub pushed_ms: u64,
}

/// What a gate says about itself, under `<prefix>/gate/<gate>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateReport {
    /// The fleet config revision (etcd's mod revision of `<prefix>/config`) it runs.
    pub revision: Option<i64>,
    /// The last revision it refused, and why.
    pub refused: Option<(i64, String)>,
    /// Unix ms of the last write to etcd.
    pub contact_ms: u64,
    pub blocks: usize,
    pub allows: usize,
    /// Unix ms since which it was cut off from etcd the last time, and until when.
    pub last_partition: Option<(u64, u64)>,
}

/// The keys of one fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    pub fn set(&self, set: Set) -> String {
        format!("{}/{}/", self.prefix, set.name())
    }

    pub fn entry(&self, set: Set, net: IpNet) -> String {
        format!("{}{}", self.set(set), net.to_string().replace('/', "_"))
    }

    /// The set and net a key names; `None` for anything else under the prefix.
    pub fn parse_entry(&self, key: &str) -> Option<(Set, IpNet)> {
        for set in [Set::Block, Set::Allow] {
            if let Some(rest) = key.strip_prefix(&self.set(set)) {
                let net: IpNet = rest.replace('_', "/").parse().ok()?;
                return (net.trunc() == net).then_some((set, net));
            }
        }
        None
    }

    pub fn fails(&self) -> String {
        format!("{}/fail/", self.prefix)
    }

    pub fn fail(&self, source: IpAddr, gate: &str) -> String {
        format!("{}{source}/{gate}", self.fails())
    }

    /// The source and gate of a failure-count key.
    pub fn parse_fail(&self, key: &str) -> Option<(IpAddr, String)> {
        let rest = key.strip_prefix(&self.fails())?;
        let (addr, gate) = rest.rsplit_once('/')?;
        valid_gate(gate).ok()?;
        Some((addr.parse().ok()?, gate.to_string()))
    }

    pub fn seens(&self) -> String {
        format!("{}/seen/", self.prefix)
    }

    /// A user's sighting at a gate; the name in hex, so any name is one key segment.
    pub fn seen(&self, user: &str, gate: &str) -> String {
        let hex: String = user.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{}{hex}/{gate}", self.seens())
    }

    /// The gate of a sighting key.
    pub fn parse_seen(&self, key: &str) -> Option<String> {
        let rest = key.strip_prefix(&self.seens())?;
        let (_, gate) = rest.rsplit_once('/')?;
        valid_gate(gate).ok()?;
        Some(gate.to_string())
    }

    pub fn config(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn gates(&self) -> String {
        format!("{}/gate/", self.prefix)
    }

    pub fn gate(&self, name: &str) -> String {
        format!("{}{name}", self.gates())
    }
}

/// A gate name: 1 to 64 of `[A-Za-z0-9._-]`, so it is one key segment.
pub fn valid_gate(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    match ok {
        true => Ok(()),
        false => Err(format!(
            "gate name '{name}': use 1 to 64 letters, digits, '.', '_' or '-'"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_refuse_what_is_not_theirs() {
        let k = Keys::new("/ewsgate/");
        let n: IpNet = "2001:db8:300::/64".parse().unwrap();
        let key = k.entry(Set::Block, n);
        assert_eq!(key, "/ewsgate/block/2001:db8:300::_64");
        assert_eq!(k.parse_entry(&key), Some((Set::Block, n)));
        let a: IpNet = "203.0.113.7/32".parse().unwrap();
        assert_eq!(
            k.parse_entry(&k.entry(Set::Allow, a)),
            Some((Set::Allow, a))
        );
        // Host bits set, garbage, another prefix.
        assert_eq!(k.parse_entry("/ewsgate/block/203.0.113.7_24"), None);
        assert_eq!(k.parse_entry("/ewsgate/block/nonsense"), None);
        assert_eq!(k.parse_entry("/other/block/203.0.113.7_32"), None);
        let src: IpAddr = "198.51.100.10".parse().unwrap();
        assert_eq!(
            k.parse_fail(&k.fail(src, "gate-2")),
            Some((src, "gate-2".into()))
        );
        assert_eq!(k.parse_fail("/ewsgate/fail/198.51.100.10/a b"), None);
        assert_eq!(k.seen("a/b", "g1"), "/ewsgate/seen/612f62/g1");
        assert_eq!(k.parse_seen("/ewsgate/seen/612f62/g1"), Some("g1".into()));
        assert!(valid_gate("gw-1.site_a").is_ok());
        assert!(valid_gate("a/b").is_err() && valid_gate("").is_err());
    }
}
