//! Builds the IPv4 allow table the XDP program reads: DPDK's DIR-24-8 layout. `tbl24` has one
//! entry per /24; prefixes up to /24 are painted straight into it. A /24 that holds a longer
//! prefix points to a 256-entry block in `tbl8` instead. A lookup is then one or two array
//! reads whatever the number of prefixes, where the kernel's LPM trie walks up to 32 nodes.

use ipnet::Ipv4Net;

use filter_common::{
    v6_buckets, v6_hash, V6Bucket, V6Slot, TBL24_ENTRIES, TBL8_FLAG, TBL8_SIZE, V6_MAX_LENGTHS,
    V6_SLOTS,
};

use crate::model::packet::{self, v4_prefixes, SourceGroup};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error(
        "IPv4 prefixes longer than /24 fall in {needed} distinct /24s, more than the \
         {capacity} blocks of xdp.capacity.long_prefix_blocks"
    )]
    LongPrefixBlocks { needed: usize, capacity: usize },
    #[error("{needed} IPv6 prefixes, more than xdp.capacity.ipv6_prefixes = {capacity}")]
    Ipv6Prefixes { needed: usize, capacity: usize },
    #[error("{found} distinct IPv6 prefix lengths; at most {V6_MAX_LENGTHS} are supported")]
    Ipv6Lengths { found: usize },
    #[error("the IPv6 table could not place every prefix; raise xdp.capacity.ipv6_prefixes")]
    Ipv6Full,
}

/// Buckets of the IPv6 table for a capacity: a power of two with twice as many slots as
/// prefixes, so two-choice placement never runs out of room in practice.
pub fn v6_bucket_count(prefixes: u32) -> u32 {
    (prefixes / 2).max(1).next_power_of_two()
}

/// Cuckoo displacements tried before the table counts as full.
const MAX_KICKS: usize = 512;

/// Fills `tbl24` (2^24 entries) and `tbl8` (a multiple of 256) from scratch. Returns the
/// number of tbl8 blocks used. On error nothing the caller relies on has been published: the
/// tables are the idle generation.
pub fn build_v4(
    groups: &[SourceGroup],
    tbl24: &mut [u32],
    tbl8: &mut [u32],
) -> Result<usize, TableError> {
    assert_eq!(
        tbl24.len(),
        TBL24_ENTRIES as usize,
        "tbl24 has 2^24 entries"
    );
    let capacity = tbl8.len() / TBL8_SIZE;
    let prefixes = v4_prefixes(groups);
    let needed = long_prefix_blocks(&prefixes);
    if needed > capacity {
        return Err(TableError::LongPrefixBlocks { needed, capacity });
    }
    tbl24.fill(0);
    let mut used = 0usize;
    for (net, group) in prefixes {
        let start = u32::from(net.network());
        let len = net.prefix_len();
        if len <= 24 {
            let first = (start >> 8) as usize;
            let count = 1usize << (24 - len);
            tbl24[first..first + count].fill(group);
            continue;
        }
        let idx = (start >> 8) as usize;
        if tbl24[idx] & TBL8_FLAG == 0 {
            // The block inherits whatever shorter prefix covered the whole /24.
            let block = &mut tbl8[used * TBL8_SIZE..(used + 1) * TBL8_SIZE];
            block.fill(tbl24[idx]);
            tbl24[idx] = TBL8_FLAG | used as u32;
            used += 1;
        }
        let block = (tbl24[idx] & !TBL8_FLAG) as usize;
        let first = block * TBL8_SIZE + (start & 0xff) as usize;
        let count = 1usize << (32 - len);
        tbl8[first..first + count].fill(group);
    }
    Ok(used)
}

fn long_prefix_blocks(prefixes: &[(Ipv4Net, u32)]) -> usize {
    let mut slash24s: Vec<u32> = prefixes
        .iter()
        .filter(|(n, _)| n.prefix_len() > 24)
        .map(|(n, _)| u32::from(n.network()) >> 8)
        .collect();
    slash24s.sort_unstable();
    slash24s.dedup();
    slash24s.len()
}

/// The geometry of a filled IPv6 table: distinct prefix lengths, longest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V6Lengths(pub Vec<u8>);

/// Fills `buckets` (a power of two of them) from scratch with every IPv6 prefix.
pub fn build_v6(
    groups: &[SourceGroup],
    capacity: usize,
    buckets: &mut [V6Bucket],
) -> Result<V6Lengths, TableError> {
    assert!(
        buckets.len().is_power_of_two(),
        "bucket count is a power of two"
    );
    let prefixes = packet::v6_prefixes(groups);
    if prefixes.len() > capacity {
        return Err(TableError::Ipv6Prefixes {
            needed: prefixes.len(),
            capacity,
        });
    }
    let mut lengths: Vec<u8> = prefixes.iter().map(|(n, _)| n.prefix_len()).collect();
    lengths.sort_unstable_by(|a, b| b.cmp(a));
    lengths.dedup();
    if lengths.len() > V6_MAX_LENGTHS {
        return Err(TableError::Ipv6Lengths {
            found: lengths.len(),
        });
    }
    buckets.fill(V6Bucket::default());
    let mask = buckets.len() as u32 - 1;
    for (net, group) in prefixes {
        let slot = V6Slot {
            addr: words(net.network().octets()),
            meta: group << 8 | net.prefix_len() as u32,
        };
        place(buckets, mask, slot)?;
    }
    Ok(V6Lengths(lengths))
}

/// Two-choice cuckoo placement: a free slot in either bucket, else displace and retry.
fn place(buckets: &mut [V6Bucket], mask: u32, mut item: V6Slot) -> Result<(), TableError> {
    for kick in 0..MAX_KICKS {
        let choices = v6_buckets(v6_hash(&item.addr, item.meta & 0xff), mask);
        for b in choices {
            if let Some(free) = buckets[b as usize].slots.iter_mut().find(|s| s.meta == 0) {
                *free = item;
                return Ok(());
            }
        }
        let victim = &mut buckets[choices[kick % 2] as usize].slots[(kick / 2) % V6_SLOTS];
        std::mem::swap(victim, &mut item);
    }
    Err(TableError::Ipv6Full)
}

/// An address as the program holds it: four words of network-order bytes.
pub fn words(b: [u8; 16]) -> [u32; 4] {
    [0, 4, 8, 12].map(|i| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]))
}

/// The mask of a prefix length, as words.
pub fn mask_words(len: u8) -> [u32; 4] {
    let bits = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len as u32)
    };
    words(bits.to_be_bytes())
}

/// The same lookup the XDP program makes for IPv6; used by tests.
pub fn lookup_v6(buckets: &[V6Bucket], lengths: &V6Lengths, addr: [u8; 16]) -> u32 {
    let src = words(addr);
    let mask = buckets.len() as u32 - 1;
    for &len in &lengths.0 {
        let m = mask_words(len);
        let key = [0, 1, 2, 3].map(|i| src[i] & m[i]);
        for b in v6_buckets(v6_hash(&key, len as u32), mask) {
            let hit = buckets[b as usize]
                .slots
                .iter()
                .find(|s| s.meta != 0 && s.meta & 0xff == len as u32 && s.addr == key);
            if let Some(s) = hit {
                return s.meta >> 8;
            }
        }
    }
    0
}

/// The same lookup the XDP program makes; used by `explain` and by tests.
pub fn lookup_v4(tbl24: &[u32], tbl8: &[u32], addr: u32) -> u32 {
    let entry = tbl24[(addr >> 8) as usize];
    if entry & TBL8_FLAG == 0 {
        return entry;
    }
    let block = (entry & !TBL8_FLAG) as usize;
    tbl8.get(block * TBL8_SIZE + (addr & 0xff) as usize)
        .copied()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn group(name: &str, nets: &[&str]) -> SourceGroup {
        SourceGroup {
            name: name.into(),
            v4: nets.iter().map(|n| n.parse().unwrap()).collect(),
            ..Default::default()
        }
    }

    fn tables() -> (Vec<u32>, Vec<u32>) {
        (vec![0; TBL24_ENTRIES as usize], vec![0; 4 * TBL8_SIZE])
    }

    fn at(t: &(Vec<u32>, Vec<u32>), a: &str) -> u32 {
        lookup_v4(&t.0, &t.1, u32::from(a.parse::<Ipv4Addr>().unwrap()))
    }

    #[test]
    fn longest_prefix_wins_across_groups() {
        let groups = [
            group("wide", &["198.51.0.0/16"]),
            group("office", &["198.51.100.0/25", "198.51.100.200/32"]),
            group("host", &["203.0.113.7/32"]),
        ];
        let mut t = tables();
        let used = build_v4(&groups, &mut t.0, &mut t.1).unwrap();
        assert_eq!(used, 2, "198.51.100/24 and 203.0.113/24 need blocks");
        assert_eq!(at(&t, "198.51.7.1"), 1);
        assert_eq!(at(&t, "198.51.100.1"), 2);
        assert_eq!(at(&t, "198.51.100.127"), 2);
        assert_eq!(at(&t, "198.51.100.128"), 1, "covered by the /16 only");
        assert_eq!(at(&t, "198.51.100.200"), 2);
        assert_eq!(at(&t, "203.0.113.7"), 3);
        assert_eq!(at(&t, "203.0.113.6"), 0);
        assert_eq!(at(&t, "203.0.113.8"), 0);
        assert_eq!(at(&t, "192.0.2.1"), 0);
    }

    #[test]
    fn rebuild_clears_what_was_removed() {
        let mut t = tables();
        build_v4(
            &[group("a", &["198.51.100.0/24", "203.0.113.9/32"])],
            &mut t.0,
            &mut t.1,
        )
        .unwrap();
        build_v4(&[group("a", &["198.51.100.0/25"])], &mut t.0, &mut t.1).unwrap();
        assert_eq!(at(&t, "198.51.100.1"), 1);
        assert_eq!(at(&t, "198.51.100.129"), 0);
        assert_eq!(at(&t, "203.0.113.9"), 0);
    }

    #[test]
    fn too_many_long_prefixes_is_an_error() {
        let nets: Vec<String> = (0..5).map(|i| format!("198.51.{i}.1/32")).collect();
        let refs: Vec<&str> = nets.iter().map(String::as_str).collect();
        let mut t = tables();
        let e = build_v4(&[group("a", &refs)], &mut t.0, &mut t.1).unwrap_err();
        assert_eq!(
            e,
            TableError::LongPrefixBlocks {
                needed: 5,
                capacity: 4
            }
        );
    }

    fn group6(name: &str, nets: &[&str]) -> SourceGroup {
        SourceGroup {
            name: name.into(),
            v6: nets.iter().map(|n| n.parse().unwrap()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn v6_longest_prefix_wins_and_neighbours_miss() {
        let groups = [
            group6("wide", &["2001:db8::/32"]),
            group6("office", &["2001:db8:100::/64", "2001:db8:100::7/128"]),
            group6("hosts", &["2001:db8:300::2/128", "2001:db8:300::4/128"]),
        ];
        let mut buckets = vec![V6Bucket::default(); 8];
        let lengths = build_v6(&groups, 100, &mut buckets).unwrap();
        assert_eq!(lengths.0, vec![128, 64, 32]);
        let at = |a: &str| {
            lookup_v6(
                &buckets,
                &lengths,
                a.parse::<std::net::Ipv6Addr>().unwrap().octets(),
            )
        };
        assert_eq!(at("2001:db8:100::1"), 2);
        assert_eq!(at("2001:db8:100::7"), 2);
        assert_eq!(at("2001:db8:300::2"), 3);
        assert_eq!(
            at("2001:db8:300::3"),
            1,
            "an odd neighbour falls back to the /32"
        );
        assert_eq!(at("2001:db9::1"), 0);
    }

    #[test]
    fn v6_table_holds_its_capacity_of_dense_hosts() {
        let cap = 20_000u32;
        let nets: Vec<String> = (0..cap)
            .map(|i| format!("2001:db8:300::{:x}:{:x}/128", i >> 15, (i & 0x7fff) * 2))
            .collect();
        let refs: Vec<&str> = nets.iter().map(String::as_str).collect();
        let mut buckets = vec![V6Bucket::default(); v6_bucket_count(cap) as usize];
        let lengths = build_v6(&[group6("dense", &refs)], cap as usize, &mut buckets).unwrap();
        for n in nets.iter().step_by(97) {
            let a: ipnet::Ipv6Net = n.parse().unwrap();
            assert_eq!(
                lookup_v6(&buckets, &lengths, a.network().octets()),
                1,
                "{n}"
            );
            let odd = u128::from(a.network()) + 1;
            assert_eq!(
                lookup_v6(&buckets, &lengths, odd.to_be_bytes()),
                0,
                "{n} + 1"
            );
        }
    }

    #[test]
    fn v6_too_many_lengths_is_an_error() {
        let nets: Vec<String> = (40..=57).map(|l| format!("2001:db8::/{l}")).collect();
        let refs: Vec<&str> = nets.iter().map(String::as_str).collect();
        let mut buckets = vec![V6Bucket::default(); 64];
        let e = build_v6(&[group6("many", &refs)], 100, &mut buckets).unwrap_err();
        assert_eq!(e, TableError::Ipv6Lengths { found: 18 });
    }

    #[test]
    fn default_route_and_host_routes() {
        let mut t = tables();
        build_v4(
            &[
                group("all", &["0.0.0.0/0"]),
                group("one", &["192.0.2.1/32"]),
            ],
            &mut t.0,
            &mut t.1,
        )
        .unwrap();
        assert_eq!(at(&t, "255.255.255.255"), 1);
        assert_eq!(at(&t, "192.0.2.1"), 2);
        assert_eq!(at(&t, "192.0.2.2"), 1);
    }
}
