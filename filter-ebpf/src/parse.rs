//! Header parsing with a byte cursor. Every read is preceded by a bounds check against
//! `data_end`, and every loop is bounded by a named constant, as the verifier requires.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use filter_common::{Endpoint, Policy, MAX_IPV6_EXT, MAX_PORTS, MAX_PROTECTED, MAX_VLAN_DEPTH};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPV4_FRAG_OFFSET: u16 = 0x1fff;
const IPV6_HLEN: usize = 40;
// IPv6 extension headers we walk through.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_MOBILITY: u8 = 135;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

/// Addresses as 32-bit words holding network-order bytes, as loaded from the packet.
/// Words, not byte arrays: LLVM's BPF backend splits unaligned or byte-array accesses into
/// single-byte loads and stores, which cost more than the lookups themselves.
pub enum Source {
    V4(u32),
    V6([u32; 4]),
}

/// The bytes ff ff as the third word of an IPv4-mapped address.
const V4_MAPPED_MARK: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Source {
    /// The key for the dynamic maps, which hold IPv4 sources IPv4-mapped.
    #[inline(always)]
    pub fn mapped(&self) -> [u32; 4] {
        match self {
            Source::V4(a) => [0, 0, V4_MAPPED_MARK, *a],
            Source::V6(a) => *a,
        }
    }
}

pub enum Bound {
    /// Not for a protected endpoint, or not IP at all.
    No,
    /// Could be for a protected endpoint, but the headers that would tell are broken.
    Malformed,
    /// For a protected endpoint; `fragment` when judged by source alone.
    Yes { source: Source, fragment: bool },
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// Loads a value from the packet with one load instruction. Header fields need not be
/// aligned: the verifier allows misaligned packet loads where the CPU handles them
/// (x86-64, arm64), and a plain load avoids the byte-by-byte code `read_unaligned` becomes.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked that size_of::<T>() bytes lie inside the packet.
    ptr_at::<T>(ctx, off).map(|p| unsafe { p.read() })
}

#[inline(always)]
fn read_be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    read::<u16>(ctx, off).map(u16::from_be)
}

#[inline(always)]
pub fn classify(ctx: &XdpContext, set: &Policy) -> Bound {
    // A frame too short for its Ethernet or VLAN headers cannot be classified: drop.
    let Some((proto, off)) = ethernet(ctx) else {
        return Bound::Malformed;
    };
    match proto {
        ETH_P_IP => ipv4(ctx, off, set),
        ETH_P_IPV6 => ipv6(ctx, off, set),
        _ => Bound::No,
    }
}

/// Returns the ethertype after up to MAX_VLAN_DEPTH 802.1Q/802.1ad tags, and its offset.
#[inline(always)]
fn ethernet(ctx: &XdpContext) -> Option<(u16, usize)> {
    let mut proto = read_be16(ctx, 12)?;
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_DEPTH {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            return Some((proto, off));
        }
        proto = read_be16(ctx, off + 2)?;
        off += 4;
    }
    // Deeper tagging than we walk: the destination is unknown, so fail closed.
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        return None;
    }
    Some((proto, off))
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, off: usize, set: &Policy) -> Bound {
    let Some(hdr) = ptr_at::<[u32; 5]>(ctx, off) else {
        return Bound::Malformed;
    };
    // SAFETY: ptr_at checked the 20-byte fixed header.
    let w = unsafe { hdr.read() };
    let Some(ep) = protected4(set, w[4]) else {
        return Bound::No;
    };
    let first = w[0].to_ne_bytes();
    let ihl = ((first[0] & 0x0f) as usize) * 4;
    if first[0] >> 4 != 4 || ihl < 20 {
        return Bound::Malformed;
    }
    let source = Source::V4(w[3]);
    // Non-first fragments carry no ports (and their "ports" are payload): source alone.
    let frag = w[1].to_ne_bytes();
    if u16::from_be_bytes([frag[2], frag[3]]) & IPV4_FRAG_OFFSET != 0 {
        return Bound::Yes {
            source,
            fragment: true,
        };
    }
    if ptr_at::<u8>(ctx, off + ihl - 1).is_none() {
        return Bound::Malformed; // options run past the end
    }
    let proto = w[2].to_ne_bytes()[1];
    l4(ctx, ep, proto, off + ihl, source)
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, off: usize, set: &Policy) -> Bound {
    let Some(hdr) = ptr_at::<[u32; 10]>(ctx, off) else {
        return Bound::Malformed;
    };
    // SAFETY: ptr_at checked the 40-byte header.
    let dst = unsafe { [(*hdr)[6], (*hdr)[7], (*hdr)[8], (*hdr)[9]] };
    let Some(ep) = protected6(set, &dst) else {
        return Bound::No;
    };
    // SAFETY: as above, inside the checked header.
    let w0 = unsafe { (*hdr)[0] }.to_ne_bytes();
    let w1 = unsafe { (*hdr)[1] }.to_ne_bytes();
    if w0[0] >> 4 != 6 {
        return Bound::Malformed;
    }
    let source = Source::V6(unsafe { [(*hdr)[2], (*hdr)[3], (*hdr)[4], (*hdr)[5]] });
    let mut next = w1[2];
    let mut cur = off + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT {
        let len = match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_MOBILITY => 8,
            NEXTHDR_AUTH => 4,
            // Any IPv6 fragment is judged by its source alone: fragmentation is no bypass.
            NEXTHDR_FRAGMENT => {
                return Bound::Yes {
                    source,
                    fragment: true,
                }
            }
            _ => return l4(ctx, ep, next, cur, source),
        };
        let Some(ext) = read::<[u8; 2]>(ctx, cur) else {
            return Bound::Malformed;
        };
        next = ext[0];
        // HOP/ROUTING/DEST/MH count 8-octet units beyond the first; AH counts 4-octet
        // units minus 2.
        let units = ext[1] as usize + if len == 8 { 1 } else { 2 };
        cur += units * len;
    }
    Bound::Malformed // chain longer than we walk
}

#[inline(always)]
fn protected4(set: &Policy, dst: u32) -> Option<&Endpoint> {
    for i in 0..MAX_PROTECTED {
        if i as u32 >= set.count4 {
            break;
        }
        if set.addr4[i] == dst {
            return Some(&set.ep4[i]);
        }
    }
    None
}

#[inline(always)]
fn protected6<'a>(set: &'a Policy, dst: &[u32; 4]) -> Option<&'a Endpoint> {
    for i in 0..MAX_PROTECTED {
        if i as u32 >= set.count6 {
            break;
        }
        let a = &set.addr6[i];
        // Last word first: it differs most often between addresses of one network.
        if a[3] == dst[3] && a[2] == dst[2] && a[1] == dst[1] && a[0] == dst[0] {
            return Some(&set.ep6[i]);
        }
    }
    None
}

/// Bound when the whole address is protected, or (protocol, destination port) is listed.
#[inline(always)]
fn l4(ctx: &XdpContext, ep: &Endpoint, proto: u8, off: usize, source: Source) -> Bound {
    if ep.whole != 0 {
        return Bound::Yes {
            source,
            fragment: false,
        };
    }
    let complete = match proto {
        IPPROTO_TCP => ptr_at::<[u8; TCP_HLEN]>(ctx, off).is_some(),
        IPPROTO_UDP => ptr_at::<[u8; UDP_HLEN]>(ctx, off).is_some(),
        _ => return Bound::No,
    };
    if !complete {
        return Bound::Malformed; // a first fragment or packet cut inside its L4 header
    }
    // Compared in network order, as the map stores it.
    let Some(dport) = read::<u16>(ctx, off + 2) else {
        return Bound::Malformed;
    };
    for i in 0..MAX_PORTS {
        let p = ep.ports[i];
        if p.proto == 0 {
            break;
        }
        if p.proto == proto && p.port_be == dport {
            return Bound::Yes {
                source,
                fragment: false,
            };
        }
    }
    Bound::No
}

/// For the benchmark's reference program: the source word of an untagged IPv4 TCP packet to
/// 192.0.2.10:443 with no options, or None.
#[inline(always)]
pub fn reference_source(ctx: &XdpContext) -> Option<u32> {
    if read_be16(ctx, 12)? != ETH_P_IP {
        return None;
    }
    let w = read::<[u32; 5]>(ctx, ETH_HLEN)?;
    let bytes = w[4].to_ne_bytes();
    if bytes != [192, 0, 2, 10]
        || w[0].to_ne_bytes()[0] != 0x45
        || w[2].to_ne_bytes()[1] != IPPROTO_TCP
    {
        return None;
    }
    let dport = read_be16(ctx, ETH_HLEN + 20 + 2)?;
    (dport == 443).then_some(w[3])
}
