//! The typed protocol between the agent (root: XDP, maps, reloads, feedback) and the proxy
//! (unprivileged: everything that comes from the network). The proxy connects to the
//! agent's proxy socket; the agent hands it its listening sockets and its policy, pushes
//! changes to the block and allow sets, and hears of failures. Every message from the
//! proxy is untrusted input to the agent: parsed strictly, size-capped, and never able to
//! do more than the proxy's role allows (report failures, answer a policy).

pub mod wire;

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{config::Bundle, model::outcome::FailureClass, packet::maps::List};

/// Largest frame the proxy accepts from the agent (a policy carries the config's files).
pub const MAX_TO_PROXY: usize = 256 << 20;
/// Largest frame the agent accepts from the proxy.
pub const MAX_TO_AGENT: usize = 1 << 20;

/// Agent → proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToProxy {
    /// The first message of a session. Descriptors, in order: one listening socket per
    /// `listeners` entry (none when the proxy already holds them), then the audit file when
    /// `audit_file` is set.
    Init(Box<Init>),
    /// A policy to check whole; the proxy answers `Prepared` or `Refused` and applies it only
    /// on `Commit`.
    Prepare {
        policy: Box<PolicyState>,
    },
    /// The prepared policy is in force; the XDP tables it goes with are `generation`.
    Commit {
        id: u64,
        generation: u32,
    },
    Abort {
        id: u64,
    },
    /// Changes to the block and dynamic allow sets, in order; with `reset`, the sets as
    /// they now stand, replacing what the proxy held.
    Entries {
        changes: Vec<EntryChange>,
        reset: bool,
    },
    /// Refuse requests from an identity at the request layer for a while.
    RefuseIdentity {
        identity: String,
        secs: u64,
        reason: String,
    },
    /// A reopened audit file (descriptor attached), after rotation.
    AuditFile,
    /// Other gates of the fleet saw these users (for `two-places`).
    Seen {
        items: Vec<Seen>,
    },
    /// Stop serving: finish what is in flight and exit.
    Shutdown,
    /// The packet layer's part of scrape `id`: OpenMetrics text without `# EOF`.
    Metrics {
        id: u64,
        text: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Init {
    /// Listening sockets handed over with this message; empty when the proxy already has
    /// them (it outlived an agent and reconnected).
    pub listeners: Vec<SocketAddr>,
    pub audit_file: bool,
    pub policy: PolicyState,
    /// The block and dynamic allow sets as they stand.
    pub entries: Vec<EntryChange>,
    /// Identities refused at the request layer, with seconds left.
    pub refused: Vec<(String, u64, String)>,
    /// `[metrics] listen`, when its socket comes with this message (after the audit file).
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyState {
    pub id: u64,
    pub bundle: Bundle,
    /// The XDP generation that holds this policy's tables.
    pub generation: u32,
}

/// One change to a dynamic set, with the program's own expiry clock (CLOCK_MONOTONIC
/// nanoseconds; 0 never expires).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryChange {
    pub list: List,
    pub net: IpNet,
    pub expires_ns: u64,
    pub add: bool,
}

/// Proxy → agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToAgent {
    /// The first message of a session: what the proxy already holds.
    Hello {
        listening: Vec<SocketAddr>,
        policy: Option<u64>,
    },
    Prepared {
        id: u64,
    },
    Refused {
        id: u64,
        reason: String,
    },
    /// Refusals that may count against their source or identity.
    Failures {
        items: Vec<Failure>,
    },
    /// Detections whose action the agent carries out (within its own policy).
    Detected {
        items: Vec<Detected>,
    },
    /// A scrape of `/metrics` asks for the packet layer's part, answered as
    /// `ToProxy::Metrics` with the same id.
    Metrics {
        id: u64,
    },
    /// Verified users' places, for the fleet's `two-places`.
    Seen {
        items: Vec<Seen>,
    },
}

/// A verified user seen at a gate: the wire form of `ops::detections::Sighting`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seen {
    pub site: String,
    pub user: String,
    pub group: Option<String>,
    pub source: Option<IpAddr>,
    pub time_ms: u64,
}

impl Seen {
    /// Bounds a sighting before it is stored or compared.
    pub fn check(&self) -> Result<(), String> {
        if self.site.len() > 128
            || self.user.is_empty()
            || self.user.len() > 512
            || self.group.as_ref().is_some_and(|g| g.len() > 128)
        {
            return Err("a sighting field is empty or too long".into());
        }
        Ok(())
    }
}

/// What a detection asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Detected {
    /// Refuse an identity (`user:NAME`, `token-item:ID`) at the request layer.
    RefuseIdentity {
        detection: String,
        identity: String,
        secs: u32,
    },
    /// Block a source in XDP, where the agent's policy lets a detection do so.
    BlockSource {
        detection: String,
        source: IpAddr,
        secs: u32,
    },
}

impl Detected {
    /// Bounds a proxy's report before the agent acts on it.
    pub fn check(&self) -> Result<(), String> {
        let (name, identity, secs) = match self {
            Detected::RefuseIdentity {
                detection,
                identity,
                secs,
            } => (detection, Some(identity), *secs),
            Detected::BlockSource {
                detection, secs, ..
            } => (detection, None, *secs),
        };
        if name.len() > 64 || identity.is_some_and(|i| i.len() > 512) {
            return Err("a detection report field is too long".into());
        }
        if secs == 0 || secs > 7 * 86_400 {
            return Err(format!("a detection asked for {secs} s"));
        }
        Ok(())
    }
}

/// A refusal the agent's feedback counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    pub source: IpAddr,
    /// The source group's name, as the proxy's tables answered.
    pub group: Option<String>,
    pub class: FailureClass,
    pub reason: String,
    /// The identity that failed (user, token item, certificate subject), when there is one.
    pub identity: Option<String>,
}

impl Failure {
    /// Bounds a proxy's report before the agent acts on it.
    pub fn check(&self) -> Result<(), String> {
        let long = |s: &str| s.len() > 512;
        if long(&self.reason)
            || self.group.as_deref().is_some_and(long)
            || self.identity.as_deref().is_some_and(long)
        {
            return Err("a failure report field is over 512 bytes".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_reads_only_the_messages_a_proxy_may_send() {
        let ok: ToAgent = serde_json::from_str(
            r#"{"type":"failures","items":[{"source":"198.51.100.9","group":"offices","class":"credential","reason":"token_expired","identity":"token:ab"}]}"#,
        )
        .unwrap();
        let ToAgent::Failures { items } = ok else {
            panic!("not failures")
        };
        assert!(items[0].check().is_ok());
        // Unknown types and fields, a class that does not exist, an address that is not one.
        for bad in [
            r#"{"type":"block","source":"198.51.100.9"}"#,
            r#"{"type":"hello","listening":[],"policy":null,"root":true}"#,
            r#"{"type":"failures","items":[{"source":"198.51.100.9","group":null,"class":"admin","reason":"x","identity":null}]}"#,
            r#"{"type":"failures","items":[{"source":"not-an-address","group":null,"class":"protocol","reason":"x","identity":null}]}"#,
        ] {
            assert!(serde_json::from_str::<ToAgent>(bad).is_err(), "{bad}");
        }
        // A scrape's question carries its id and nothing else.
        assert!(matches!(
            serde_json::from_str::<ToAgent>(r#"{"type":"metrics","id":3}"#),
            Ok(ToAgent::Metrics { id: 3 })
        ));
        assert!(
            serde_json::from_str::<ToAgent>(r#"{"type":"metrics","id":3,"text":"x"}"#).is_err()
        );
        let long = Failure {
            source: "198.51.100.9".parse().unwrap(),
            group: None,
            class: FailureClass::Protocol,
            reason: "x".repeat(600),
            identity: None,
        };
        assert!(long.check().is_err());
    }
}
