//! The packet layer's answer, given again at accept: a connection that reached the proxy
//! around XDP (a tunnel ending on the gate, an interface the program does not run on) is
//! refused exactly as XDP would have dropped it. The order is the program's: block set,
//! then the allowed groups, then the dynamic allow set. The agent pushes every change to
//! the dynamic sets; entries lapse on the program's own clock (CLOCK_MONOTONIC).

use std::{collections::HashMap, net::IpAddr, sync::RwLock};

use ipnet::IpNet;

use crate::{ipc::EntryChange, packet::maps::List};

/// Why a source may or may not connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// In an allowed group (its 1-based id as the tables number it).
    Group(u32),
    /// In a live dynamic allow entry.
    Dynamic,
    Blocked,
    NotAllowed,
}

impl Admit {
    pub fn allowed(self) -> bool {
        matches!(self, Admit::Group(_) | Admit::Dynamic)
    }

    pub fn reason(self) -> &'static str {
        match self {
            Admit::Blocked => "source_blocked",
            Admit::NotAllowed => "source_not_allowed",
            Admit::Group(_) | Admit::Dynamic => "source_allowed",
        }
    }
}

/// One dynamic set: per prefix length, masked IPv6 (IPv4 mapped) → expiry (0: never).
#[derive(Default)]
struct Set {
    by_length: HashMap<u8, HashMap<u128, u64>>,
}

impl Set {
    fn apply(&mut self, net: IpNet, expires_ns: u64, add: bool) {
        let (len, key) = mapped(net);
        if add {
            self.by_length
                .entry(len)
                .or_default()
                .insert(key, expires_ns);
        } else if let Some(m) = self.by_length.get_mut(&len) {
            m.remove(&key);
            if m.is_empty() {
                self.by_length.remove(&len);
            }
        }
    }

    fn contains(&self, addr: u128, now_ns: u64) -> bool {
        self.by_length.iter().any(|(len, m)| {
            let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
            m.get(&(addr & mask))
                .is_some_and(|&until| until == 0 || now_ns < until)
        })
    }

    fn len(&self) -> usize {
        self.by_length.values().map(HashMap::len).sum()
    }
}

/// A network as the dynamic maps key it: IPv4 mapped into IPv6.
fn mapped(net: IpNet) -> (u8, u128) {
    match net {
        IpNet::V4(n) => (
            96 + n.prefix_len(),
            u128::from(n.network().to_ipv6_mapped()),
        ),
        IpNet::V6(n) => (n.prefix_len(), u128::from(n.network())),
    }
}

fn mapped_addr(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The block and dynamic allow sets as the agent last told them.
#[derive(Default)]
pub struct Dynamic {
    sets: RwLock<[Set; 2]>,
}

impl Dynamic {
    pub fn apply(&self, changes: &[EntryChange]) {
        let Ok(mut sets) = self.sets.write() else {
            return;
        };
        for c in changes {
            let i = match c.list {
                List::Block => 0,
                List::Allow => 1,
            };
            sets[i].apply(c.net, c.expires_ns, c.add);
        }
    }

    /// Replaces both sets with a snapshot.
    pub fn reset(&self, entries: &[EntryChange]) {
        if let Ok(mut sets) = self.sets.write() {
            *sets = Default::default();
        }
        self.apply(entries);
    }

    pub fn len(&self) -> (usize, usize) {
        self.sets
            .read()
            .map(|s| (s[0].len(), s[1].len()))
            .unwrap_or_default()
    }

    /// The program's order: block set, then `group`, then the dynamic allow set.
    pub fn admit(&self, addr: IpAddr, group: Option<u32>) -> Admit {
        let addr = canonical(addr);
        let key = mapped_addr(addr);
        let now = monotonic_ns();
        // A poisoned lock fails closed.
        let Ok(sets) = self.sets.read() else {
            return Admit::NotAllowed;
        };
        if sets[0].contains(key, now) {
            return Admit::Blocked;
        }
        if let Some(g) = group {
            return Admit::Group(g);
        }
        if sets[1].contains(key, now) {
            return Admit::Dynamic;
        }
        Admit::NotAllowed
    }
}

/// An IPv4-mapped IPv6 peer (a dual-stack socket) is its IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock `bpf_ktime_get_ns` reads.
pub use crate::packet::maps::monotonic_ns;

#[cfg(test)]
mod tests {
    use super::*;

    fn change(list: List, net: &str, expires_ns: u64, add: bool) -> EntryChange {
        EntryChange {
            list,
            net: net.parse().unwrap(),
            expires_ns,
            add,
        }
    }

    #[test]
    fn the_programs_order_block_group_allow() {
        let d = Dynamic::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        d.apply(&[
            change(List::Block, "198.51.100.7/32", 0, true),
            change(List::Block, "2001:db8:300::/48", 0, true),
            change(List::Allow, "203.0.113.0/28", 0, true),
            change(List::Allow, "203.0.113.20/32", 1, true),
        ]);
        assert_eq!(d.admit(ip("198.51.100.7"), Some(1)), Admit::Blocked);
        assert_eq!(d.admit(ip("::ffff:198.51.100.7"), Some(1)), Admit::Blocked);
        assert_eq!(d.admit(ip("198.51.100.8"), Some(1)), Admit::Group(1));
        assert_eq!(d.admit(ip("2001:db8:300::9"), None), Admit::Blocked);
        assert_eq!(d.admit(ip("203.0.113.5"), None), Admit::Dynamic);
        assert_eq!(
            d.admit(ip("203.0.113.20"), None),
            Admit::NotAllowed,
            "expired"
        );
        assert_eq!(d.admit(ip("203.0.113.50"), None), Admit::NotAllowed);
        d.apply(&[change(List::Block, "198.51.100.7/32", 0, false)]);
        assert_eq!(d.admit(ip("198.51.100.7"), Some(1)), Admit::Group(1));
        assert_eq!(d.len(), (1, 2));
    }
}
