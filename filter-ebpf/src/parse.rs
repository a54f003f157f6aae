//! Header parsing with a byte cursor. Every read is preceded by a bounds check against
//! `data_end`, and every loop is bounded by a named constant, as the verifier requires.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use filter_common::{
    DropEvent, Endpoint, Policy, Report, MAX_IPV6_EXT, MAX_PORTS, MAX_PROTECTED, MAX_VLAN_DEPTH,
};

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
const IPV6_FRAG_OFFSET: u16 = 0xfff8;
// Tunnels opened to judge their inner packet.
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_GRE: u8 = 47;
const ETH_P_TEB: u16 = 0x6558;
const GRE_CSUM: u8 = 0x80;
const GRE_ROUTING: u8 = 0x40;
const GRE_KEY: u8 = 0x20;
const GRE_SEQ: u8 = 0x10;
const GRE_VERSION: u8 = 0x07;
const VXLAN_PORT: u16 = 4789;
const VXLAN_HLEN: usize = 8;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

/// The bytes ff ff as the third word of an IPv4-mapped address.
const V4_MAPPED_MARK: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// What the parse learnt about the judged packet (the inner one of a tunnel). Every field
/// is always written: enums with payloads of different sizes leave undefined words that
/// LLVM may copy from a register holding a pointer, which the verifier refuses.
#[derive(Default)]
pub struct Facts {
    /// The source as the dynamic maps key it: IPv6, or IPv4-mapped. Addresses are 32-bit
    /// words holding network-order bytes, as loaded from the packet. Words, not byte
    /// arrays: LLVM's BPF backend splits unaligned or byte-array accesses into single-byte
    /// loads and stores, which cost more than the lookups themselves.
    pub source: [u32; 4],
    pub v4: bool,
    /// Offset of the judged IP header (for `ewsgate watch`).
    pub ip_off: usize,
    /// Offset of its TCP or UDP header, 0 when there is none to read.
    pub l4_off: usize,
    /// Protocol of the judged packet.
    pub proto: u8,
    /// A tunnel's inner packet: its ethertype and offset.
    pub inner_proto: u16,
    pub inner_off: usize,
}

impl Facts {
    #[inline(always)]
    fn set_v4(&mut self, off: usize, addr: u32) {
        self.source = [0, 0, V4_MAPPED_MARK, addr];
        self.v4 = true;
        self.ip_off = off;
    }

    #[inline(always)]
    fn set_v6(&mut self, off: usize, addr: [u32; 4]) {
        self.source = addr;
        self.v4 = false;
        self.ip_off = off;
    }
}

/// Field-less on purpose (see `Facts`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Not for a protected endpoint, or not IP at all.
    No,
    /// Could be for a protected endpoint, but the headers that would tell are broken.
    Malformed,
    /// For a protected endpoint.
    Yes,
    /// For a protected endpoint, judged by source alone (a fragment).
    Fragment,
}

/// What one IP layer says: a verdict, or "a tunnel carries an inner packet" (in `Facts`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Done(Bound),
    Inner,
}

/// Where an IPv6 header chain ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Frag {
    None,
    /// Offset 0: the headers that follow are all there.
    First,
    /// Offset > 0: what follows the fragment header is payload, not headers.
    Later,
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

/// Classifies a frame. None: a tunnel carries an inner packet, whose ethertype and offset
/// are in `facts` for `classify_inner` (run in its own program through a tail call, so the
/// verifier checks each layer on its own).
///
/// One level of encapsulation is opened (IPIP, 6in4, 4in6, 6in6, GRE carrying IP or
/// Ethernet, VXLAN on udp/4789), whatever the outer destination: the kernel decapsulates
/// for any of its addresses, and the inner packet then reaches the proxy through a tunnel
/// device that runs no XDP. The inner packet is judged by its own source as if it had
/// arrived bare. A tunnel inside a tunnel is not walked: its innermost destination may be
/// protected, so it is dropped as malformed.
#[inline(always)]
pub fn classify(ctx: &XdpContext, set: &Policy, facts: &mut Facts) -> Option<Bound> {
    // A frame too short for its Ethernet or VLAN headers cannot be classified: drop.
    let Some((proto, off)) = ethernet(ctx, 0) else {
        return Some(Bound::Malformed);
    };
    match layer(ctx, proto, off, set, facts) {
        Step::Done(b) => Some(b),
        Step::Inner => None,
    }
}

/// Classifies a tunnel's inner packet at `off` (an Ethernet frame when `proto` is
/// ETH_P_TEB); one more tunnel inside is malformed.
#[inline(always)]
pub fn classify_inner(
    ctx: &XdpContext,
    set: &Policy,
    facts: &mut Facts,
    proto: u16,
    off: usize,
) -> Bound {
    let (proto, off) = if proto == ETH_P_TEB {
        match ethernet(ctx, off) {
            Some(found) => found,
            None => return Bound::Malformed,
        }
    } else {
        (proto, off)
    };
    match layer(ctx, proto, off, set, facts) {
        Step::Done(b) => b,
        Step::Inner => Bound::Malformed,
    }
}

#[inline(always)]
fn layer(ctx: &XdpContext, proto: u16, off: usize, set: &Policy, facts: &mut Facts) -> Step {
    match proto {
        ETH_P_IP => ipv4(ctx, off, set, facts),
        ETH_P_IPV6 => ipv6(ctx, off, set, facts),
        _ => Step::Done(Bound::No),
    }
}

/// Returns the ethertype after up to MAX_VLAN_DEPTH 802.1Q/802.1ad tags, and its offset,
/// for an Ethernet header at `base`.
#[inline(always)]
fn ethernet(ctx: &XdpContext, base: usize) -> Option<(u16, usize)> {
    let mut proto = read_be16(ctx, base + 12)?;
    let mut off = base + ETH_HLEN;
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

/// Malformed where the destination is protected; elsewhere the kernel drops such headers
/// itself, so they pass.
#[inline(always)]
fn broken(ep: Option<&Endpoint>) -> Step {
    Step::Done(if ep.is_some() {
        Bound::Malformed
    } else {
        Bound::No
    })
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, off: usize, set: &Policy, facts: &mut Facts) -> Step {
    let Some(hdr) = ptr_at::<[u32; 5]>(ctx, off) else {
        return Step::Done(Bound::Malformed);
    };
    // SAFETY: ptr_at checked the 20-byte fixed header.
    let w = unsafe { hdr.read() };
    let proto = w[2].to_ne_bytes()[1];
    let ep = protected4(set, w[4]);
    if ep.is_none() && !carrier(proto) {
        return Step::Done(Bound::No);
    }
    let first = w[0].to_ne_bytes();
    let ihl = ((first[0] & 0x0f) as usize) * 4;
    if first[0] >> 4 != 4 || ihl < 20 {
        return broken(ep);
    }
    facts.set_v4(off, w[3]);
    facts.proto = proto;
    facts.l4_off = 0;
    let frag = w[1].to_ne_bytes();
    // A later fragment carries no headers: only the protocol field tells. A tunnel's
    // inner header is in its first fragment, judged there.
    if u16::from_be_bytes([frag[2], frag[3]]) & IPV4_FRAG_OFFSET != 0 {
        return Step::Done(match ep {
            Some(ep) if listed(ep, proto) => Bound::Fragment,
            _ => Bound::No,
        });
    }
    if ptr_at::<u8>(ctx, off + ihl - 1).is_none() {
        return broken(ep); // options run past the end
    }
    upper(ctx, ep, proto, off + ihl, facts)
}

/// The upper layer of a packet that is not a later fragment: its ports if the address is
/// protected, and a tunnel's inner packet if the outer header does not bind it.
#[inline(always)]
fn upper(
    ctx: &XdpContext,
    ep: Option<&Endpoint>,
    proto: u8,
    off: usize,
    facts: &mut Facts,
) -> Step {
    if let Some(ep) = ep {
        match l4(ctx, ep, proto, off) {
            Bound::No => {}
            b => {
                if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
                    facts.l4_off = off;
                }
                return Step::Done(b);
            }
        }
    }
    if carrier(proto) {
        open(ctx, proto, off, facts)
    } else {
        Step::Done(Bound::No)
    }
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, off: usize, set: &Policy, facts: &mut Facts) -> Step {
    let Some(hdr) = ptr_at::<[u32; 10]>(ctx, off) else {
        return Step::Done(Bound::Malformed);
    };
    // SAFETY: ptr_at checked the 40-byte header.
    let dst = unsafe { [(*hdr)[6], (*hdr)[7], (*hdr)[8], (*hdr)[9]] };
    let ep = protected6(set, &dst);
    // SAFETY: as above, inside the checked header.
    let w0 = unsafe { (*hdr)[0] }.to_ne_bytes();
    let w1 = unsafe { (*hdr)[1] }.to_ne_bytes();
    let first = w1[2];
    if ep.is_none() && !carrier(first) && !is_ext(first) {
        return Step::Done(Bound::No);
    }
    if w0[0] >> 4 != 6 {
        return broken(ep);
    }
    facts.set_v6(off, unsafe { [(*hdr)[2], (*hdr)[3], (*hdr)[4], (*hdr)[5]] });
    facts.l4_off = 0;
    let Some((next, cur, frag)) = chain(ctx, first, off + IPV6_HLEN) else {
        // A chain longer than we walk may hide anything: dropped wherever it goes.
        return Step::Done(Bound::Malformed);
    };
    facts.proto = next;
    if cur == CUT {
        return broken(ep);
    }
    match (frag, ep) {
        // Protocol bound on the address: a fragment is judged by its source alone, so
        // fragmentation is no bypass. When the fragment header names another extension
        // header the protocol is unknown, so it counts as bound.
        (Frag::Later | Frag::First, Some(ep)) if listed(ep, next) || is_ext(next) => {
            Step::Done(Bound::Fragment)
        }
        (Frag::Later, _) => Step::Done(Bound::No),
        // A first fragment whose headers go on may hide a tunnel to a protected address.
        (Frag::First, None) if is_ext(next) => Step::Done(Bound::Malformed),
        _ => upper(ctx, ep, next, cur, facts),
    }
}

#[inline(always)]
fn is_ext(next: u8) -> bool {
    next == NEXTHDR_FRAGMENT || ext_len(next).is_some()
}

/// Extension headers we walk, with their length unit: HOP/ROUTING/DEST/MH count 8-octet
/// units beyond the first, AH 4-octet units minus 2.
#[inline(always)]
fn ext_len(next: u8) -> Option<usize> {
    match next {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_MOBILITY => Some(8),
        NEXTHDR_AUTH => Some(4),
        _ => None,
    }
}

/// Offset `chain` returns for a chain cut short by the end of the packet.
const CUT: usize = usize::MAX;

/// Walks up to MAX_IPV6_EXT extension headers and returns the upper-layer protocol, its
/// offset and what fragment this is. The walk stops at a fragment header (it counts as one
/// of the headers) and returns what that header names next. None: the chain is longer than
/// we walk. Offset `CUT`: the chain is cut short.
#[inline(always)]
fn chain(ctx: &XdpContext, first: u8, start: usize) -> Option<(u8, usize, Frag)> {
    let mut next = first;
    let mut cur = start;
    // One more round than there are headers: the last may only find the upper layer.
    for i in 0..=MAX_IPV6_EXT {
        let fragment = next == NEXTHDR_FRAGMENT;
        let len = match ext_len(next) {
            Some(len) => len,
            None if fragment => 8,
            None => return Some((next, cur, Frag::None)),
        };
        if i == MAX_IPV6_EXT {
            return None;
        }
        let Some(ext) = read::<[u8; 4]>(ctx, cur) else {
            return Some((next, CUT, Frag::None));
        };
        if fragment {
            // Stopping here keeps the verifier's paths few: walking on after a first
            // fragment's header multiplies them past its limit.
            let later = u16::from_be_bytes([ext[2], ext[3]]) & IPV6_FRAG_OFFSET != 0;
            let frag = if later { Frag::Later } else { Frag::First };
            return Some((ext[0], cur + 8, frag));
        }
        next = ext[0];
        cur += (ext[1] as usize + if len == 8 { 1 } else { 2 }) * len;
    }
    None
}

/// Protocols that may carry a tunnel: IP in IP, IPv6 in IP, GRE, and UDP (VXLAN).
#[inline(always)]
fn carrier(proto: u8) -> bool {
    matches!(
        proto,
        IPPROTO_IPIP | IPPROTO_IPV6 | IPPROTO_GRE | IPPROTO_UDP
    )
}

/// Opens a tunnel header at `off`: the inner packet's ethertype and offset, or a verdict.
#[inline(always)]
fn open(ctx: &XdpContext, proto: u8, off: usize, facts: &mut Facts) -> Step {
    let inner = match proto {
        IPPROTO_IPIP => Some((ETH_P_IP, off)),
        IPPROTO_IPV6 => Some((ETH_P_IPV6, off)),
        IPPROTO_GRE => match gre(ctx, off) {
            Ok(inner) => inner,
            Err(()) => return Step::Done(Bound::Malformed),
        },
        IPPROTO_UDP => match vxlan(ctx, off) {
            Ok(inner) => inner,
            Err(()) => return Step::Done(Bound::Malformed),
        },
        _ => None,
    };
    match inner {
        Some((proto, at)) => {
            facts.inner_proto = proto;
            facts.inner_off = at;
            Step::Inner
        }
        None => Step::Done(Bound::No),
    }
}

/// GRE version 0 (RFC 2784/2890): optional checksum, key and sequence words, then IPv4,
/// IPv6 or Ethernet (gretap, returned as ETH_P_TEB for the inner program to walk). Linux drops version 0 with the routing bit; version 1 (PPTP)
/// ends in a ppp device, and other payloads (MPLS, ERSPAN) need their own devices: those
/// pass here, and `ewsgate status` names such devices as paths around the program.
/// Err: cut short.
#[inline(always)]
fn gre(ctx: &XdpContext, off: usize) -> Result<Option<(u16, usize)>, ()> {
    let h = read::<[u8; 4]>(ctx, off).ok_or(())?;
    if h[0] & GRE_ROUTING != 0 || h[1] & GRE_VERSION != 0 {
        return Ok(None);
    }
    let words = (h[0] & GRE_CSUM != 0) as usize
        + (h[0] & GRE_KEY != 0) as usize
        + (h[0] & GRE_SEQ != 0) as usize;
    let inner = off + 4 + 4 * words;
    match u16::from_be_bytes([h[2], h[3]]) {
        ETH_P_IP => Ok(Some((ETH_P_IP, inner))),
        ETH_P_IPV6 => Ok(Some((ETH_P_IPV6, inner))),
        ETH_P_TEB => Ok(Some((ETH_P_TEB, inner))),
        _ => Ok(None),
    }
}

/// VXLAN (RFC 7348) on its IANA port: an 8-byte header, then an Ethernet frame (returned
/// as ETH_P_TEB for the inner program to walk). Err: cut short.
#[inline(always)]
fn vxlan(ctx: &XdpContext, off: usize) -> Result<Option<(u16, usize)>, ()> {
    let dport = read_be16(ctx, off + 2).ok_or(())?;
    if dport != VXLAN_PORT {
        return Ok(None);
    }
    Ok(Some((ETH_P_TEB, off + UDP_HLEN + VXLAN_HLEN)))
}

/// Whether every packet of `proto` to the address is bound: the whole address is, or a
/// port of that protocol is listed.
#[inline(always)]
fn listed(ep: &Endpoint, proto: u8) -> bool {
    if ep.whole != 0 {
        return true;
    }
    for i in 0..MAX_PORTS {
        let p = ep.ports[i].proto;
        if p == 0 {
            break;
        }
        if p == proto {
            return true;
        }
    }
    false
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
fn l4(ctx: &XdpContext, ep: &Endpoint, proto: u8, off: usize) -> Bound {
    if ep.whole != 0 {
        return Bound::Yes;
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
            return Bound::Yes;
        }
    }
    Bound::No
}

/// Fills a drop event from what the parse learnt, reading the destination and port again
/// from the packet (only for sampled drops, so the parse itself keeps no more).
#[inline(always)]
pub fn describe(ctx: &XdpContext, r: &Report, event: &mut DropEvent) {
    if r.ip_off == 0 {
        return; // not parsed as far as an IP header
    }
    // Masked, not range-checked: LLVM folds a range check into arithmetic the verifier
    // cannot follow. Under 16 KiB the verifier can add a header length and still bound it;
    // a deeper offset (only past a very long extension chain) shows wrong bytes, nothing more.
    let ip = (r.ip_off & 0x3fff) as usize;
    event.source = r.source;
    event.proto = r.proto as u8;
    if r.v4 != 0 {
        event.family = 4;
        if let Some(dst) = read::<u32>(ctx, ip + 16) {
            event.destination = [0, 0, 0, dst];
        }
    } else {
        event.family = 6;
        if let Some(dst) = read::<[u32; 4]>(ctx, ip + 24) {
            event.destination = dst;
        }
    }
    let l4 = (r.l4_off & 0x3fff) as usize;
    if l4 != 0 {
        if let Some(port) = read_be16(ctx, l4 + 2) {
            event.port = port;
        }
    }
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
