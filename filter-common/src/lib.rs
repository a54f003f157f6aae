//! Types shared by the XDP program (`filter-ebpf`) and the daemon (`filter-user`).
//!
//! Everything here is `#[repr(C)]` with explicit padding: the kernel compares map keys byte
//! by byte, so a padding byte left to chance would make two equal keys differ.
#![no_std]

/// Bumped whenever a map's layout or meaning changes. Pins live under `<pin_dir>/v<N>`, so a
/// daemon never adopts maps written by an incompatible build (aya reuses a pinned map
/// without comparing its layout).
pub const LAYOUT_VERSION: u32 = 4;

/// Protected addresses per family; more is a config error. A firewall in front of Exchange
/// protects a handful, and a short scan beats a hash lookup on every packet.
pub const MAX_PROTECTED: usize = 8;
/// Ports one protected address can carry; more is a config error.
pub const MAX_PORTS: usize = 8;
/// VLAN tags walked (802.1Q and 802.1ad, so QinQ and one more level).
pub const MAX_VLAN_DEPTH: usize = 4;
/// IPv6 extension headers walked (a fragment header counts as one); a chain of more is
/// dropped as malformed, wherever it goes.
pub const MAX_IPV6_EXT: usize = 8;
/// Source groups are numbered 1..=MAX_GROUPS; 0 means "no group".
pub const MAX_GROUPS: usize = 255;

/// IPv4 allow table: 2^24 direct entries (one per /24) plus blocks of 256 for longer prefixes
/// (DPDK's DIR-24-8 layout). An entry is 0 (no group), a group id, or `TBL8_FLAG | block`.
pub const TBL24_ENTRIES: u32 = 1 << 24;
/// `TBL24` is stored as rows of this many entries so that one array value is 64 bytes.
pub const TBL24_ROW: usize = 16;
pub const TBL24_ROWS: u32 = TBL24_ENTRIES / TBL24_ROW as u32;
pub const TBL8_FLAG: u32 = 1 << 31;
pub const TBL8_SIZE: usize = 256;

/// IPv6 allow table: per-prefix-length hashing in an open-addressing table of our own, so
/// a lookup is a few inlined array reads per distinct length instead of a trie walk (or a
/// hash-map helper call, ~25 ns each). Each key has two candidate buckets of `V6_SLOTS`.
pub const V6_MAX_LENGTHS: usize = 16;
pub const V6_SLOTS: usize = 4;

/// Index into the per-CPU `COUNTERS` array: one slot per verdict and reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not bound for a protected endpoint: passed untouched.
    NotBound = 0,
    /// Source in an allowed CIDR group: passed.
    AllowGroup = 1,
    /// Source in a live dynamic allow entry: passed.
    AllowDynamic = 2,
    /// Source in the block set: dropped.
    Blocked = 3,
    /// Source in no group and no allow entry: dropped.
    NotAllowed = 4,
    /// Truncated or malformed headers on a packet that may be bound: dropped.
    Malformed = 5,
    /// A fragment to a protected address, judged by its source alone (counted in addition
    /// to its verdict).
    Fragment = 6,
    /// Monitor mode passed a packet that would have been dropped (counted in addition).
    MonitorPassed = 7,
    /// A tunnelled packet (IPIP, 6in4, 4in6, 6in6, GRE, VXLAN) opened to judge its inner
    /// packet (counted in addition to the inner packet's verdict).
    Tunnel = 8,
}

pub const REASON_COUNT: u32 = 9;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::NotBound,
        Reason::AllowGroup,
        Reason::AllowDynamic,
        Reason::Blocked,
        Reason::NotAllowed,
        Reason::Malformed,
        Reason::Fragment,
        Reason::MonitorPassed,
        Reason::Tunnel,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Reason::NotBound => "not_bound",
            Reason::AllowGroup => "allow_group",
            Reason::AllowDynamic => "allow_dynamic",
            Reason::Blocked => "drop_blocked",
            Reason::NotAllowed => "drop_not_allowed",
            Reason::Malformed => "drop_malformed",
            Reason::Fragment => "fragment",
            Reason::MonitorPassed => "monitor_passed",
            Reason::Tunnel => "tunnel",
        }
    }
}

/// The single entry of the `SETTINGS` array. Written only by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Non-zero: count every verdict, drop nothing.
    pub monitor: u32,
    /// Which generation (0 or 1) of the protected set and allow tables is live. A reload
    /// fills the other and flips this one word.
    pub generation: u32,
    /// Entry counts of the dynamic maps, so an empty map costs the packet nothing.
    pub block_exact: u32,
    pub block_cidr: u32,
    pub allow_exact: u32,
    pub allow_cidr: u32,
    /// Drop events per second and CPU sent to `DROPS` for `ewsgate watch`; 0 (nobody
    /// watching) sends none, so the feature costs a dropped packet one compare.
    pub watch_rate: u32,
    pub _pad: u32,
}

/// One sampled drop in the `DROPS` ring buffer, for `ewsgate watch`. Addresses as the
/// packet holds them (network order); IPv4 in the last word.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    pub source: [u32; 4],
    pub destination: [u32; 4],
    /// Destination port, host order; 0 when none was read.
    pub port: u16,
    pub proto: u8,
    /// 4 or 6; 0 when the headers were too broken to tell.
    pub family: u8,
    /// A `Reason`.
    pub reason: u32,
}

/// A drop handed to the report program (per-CPU scratch between two programs of one run).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Source as the dynamic maps key it (IPv4 mapped).
    pub source: [u32; 4],
    /// Offsets of the judged IP header and its TCP/UDP header (0: none).
    pub ip_off: u32,
    pub l4_off: u32,
    pub proto: u32,
    pub v4: u32,
    pub reason: u32,
    /// The XDP action the caller decided.
    pub action: u32,
}

/// Size of the `DROPS` ring buffer (a power-of-two number of pages).
pub const DROPS_BYTES: u32 = 64 * 1024;

/// One protected (protocol, port) on an address; `proto` 0 ends the list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtoPort {
    pub proto: u8,
    pub _pad: u8,
    /// Network byte order, as read from the packet.
    pub port_be: u16,
}

/// What to do for one protected address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Non-zero: every packet to the address is bound, whatever its protocol or port.
    pub whole: u32,
    pub ports: [ProtoPort; MAX_PORTS],
}

/// One generation of the `POLICY` array: the protected addresses, scanned linearly, and the
/// geometry of that generation's IPv6 table. Addresses are 32-bit words holding
/// network-order bytes, as loaded from the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub count4: u32,
    pub count6: u32,
    pub addr4: [u32; MAX_PROTECTED],
    pub addr6: [[u32; 4]; MAX_PROTECTED],
    pub ep4: [Endpoint; MAX_PROTECTED],
    pub ep6: [Endpoint; MAX_PROTECTED],
    /// Distinct IPv6 prefix lengths in the table, longest first, with their masks.
    pub v6_lengths: u32,
    /// Bucket count minus one (the count is a power of two).
    pub v6_bucket_mask: u32,
    pub v6_len: [u32; V6_MAX_LENGTHS],
    pub v6_mask: [[u32; 4]; V6_MAX_LENGTHS],
}

/// One IPv6 prefix in the table: its masked address and `group << 8 | prefix length`.
/// `meta == 0` marks an empty slot (group ids start at 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V6Slot {
    pub addr: [u32; 4],
    pub meta: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V6Bucket {
    pub slots: [V6Slot; V6_SLOTS],
}

/// The hash both sides use to place and find an IPv6 prefix.
#[inline(always)]
pub fn v6_hash(addr: &[u32; 4], prefix_len: u32) -> u32 {
    let mut h = prefix_len.wrapping_mul(0x9e37_79b9);
    for w in addr {
        h = (h ^ *w).wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
    }
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The two candidate buckets of a hash.
#[inline(always)]
pub fn v6_buckets(hash: u32, mask: u32) -> [u32; 2] {
    [
        hash & mask,
        hash.rotate_left(16).wrapping_mul(0x27d4_eb2f) & mask,
    ]
}

/// Block and dynamic allow maps hold IPv4 sources IPv4-mapped (`::ffff:a.b.c.d`), so one map
/// serves both families and an IPv4 /n is a /96+n there.
///
/// Value of the block and dynamic allow maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expiring {
    /// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`) after which the entry is ignored;
    /// 0 never expires. Checked by the program, so entries lapse even with no daemon.
    pub expires_ns: u64,
    /// Free text kept by the daemon is not stored in the kernel; this is a reason code.
    pub reason: u32,
    pub _pad: u32,
}

/// IPv4-mapped IPv6 form of an IPv4 address (network order in, 16 bytes out).
#[inline(always)]
pub const fn v4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C) plain data with explicit padding and no pointers.
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for Policy {}
    unsafe impl aya::Pod for V6Bucket {}
    unsafe impl aya::Pod for Expiring {}
    unsafe impl aya::Pod for DropEvent {}
}
