//! ewsgate's XDP program: drops packets bound for a protected EWS endpoint unless their
//! source is allowed, and passes everything else untouched.
//!
//! Order for bound packets: block set → allowed CIDR group → dynamic allow → drop.
//! Every verdict lands in a per-CPU counter; nothing is logged on this path.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_MMAPABLE},
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, ProgramArray, RingBuf},
    programs::XdpContext,
};
use filter_common::{
    v6_buckets, v6_hash, DropEvent, Expiring, Policy, Reason, Report, Settings, V6Bucket,
    DROPS_BYTES, MAX_GROUPS, REASON_COUNT, TBL24_ROW, TBL24_ROWS, TBL8_FLAG, TBL8_SIZE,
    V6_MAX_LENGTHS, V6_SLOTS,
};
use parse::{Bound, Facts};

// Sizes marked "sized at load" are set by the daemon from its config before loading.
#[map]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(REASON_COUNT, 0);
#[map]
static GROUP_HITS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_GROUPS as u32 + 1, 0);
/// One `Policy` (protected endpoints, IPv6 table geometry) per generation.
#[map]
static POLICY: Array<Policy> = Array::pinned(2, 0);

// IPv4 allow table, DIR-24-8, two buffers: the daemon fills the idle one through mmap and
// flips `Settings::generation`, so a lookup sees the old set or the new one, never a mix.
#[map]
static TBL24_0: Array<[u32; TBL24_ROW]> = Array::pinned(TBL24_ROWS, BPF_F_MMAPABLE);
#[map]
static TBL24_1: Array<[u32; TBL24_ROW]> = Array::pinned(TBL24_ROWS, BPF_F_MMAPABLE);
#[map]
static TBL8_0: Array<[u32; TBL8_SIZE]> = Array::pinned(1, BPF_F_MMAPABLE); // sized at load
#[map]
static TBL8_1: Array<[u32; TBL8_SIZE]> = Array::pinned(1, BPF_F_MMAPABLE); // sized at load

// IPv6 allow tables, one per generation, filled through mmap like the IPv4 ones.
#[map]
static V6TBL_0: Array<V6Bucket> = Array::pinned(1, BPF_F_MMAPABLE); // sized at load
#[map]
static V6TBL_1: Array<V6Bucket> = Array::pinned(1, BPF_F_MMAPABLE); // sized at load

// Dynamic entries, keyed by IPv4-mapped or IPv6 source. Keys are [u32; 4]: the same 16
// bytes user space writes as [u8; 16], but word-aligned so they are built with word stores.
#[map]
static BLOCK_EXACT: HashMap<[u32; 4], Expiring> = HashMap::pinned(1, 0); // sized at load
#[map]
static BLOCK_CIDR: LpmTrie<[u32; 4], Expiring> = LpmTrie::pinned(1, 0); // sized at load
#[map]
static ALLOW_EXACT: HashMap<[u32; 4], Expiring> = HashMap::pinned(1, 0); // sized at load
#[map]
static ALLOW_CIDR: LpmTrie<[u32; 4], Expiring> = LpmTrie::pinned(1, 0); // sized at load

// Tunnels: the outer program leaves the inner packet's ethertype and offset here and tail
// calls the inner program, so the verifier checks each layer's parse on its own (one
// program walking both explodes past its instruction limit).
#[map]
static TAIL: ProgramArray = ProgramArray::pinned(2, 0);
const TAIL_TUNNEL: u32 = 0;
const TAIL_REPORT: u32 = 1;
#[map]
static INNER: PerCpuArray<[u32; 2]> = PerCpuArray::pinned(1, 0);

// `ewsgate watch`: sampled drops, and per CPU the current one-second window's start and the
// events sent in it.
#[map]
static DROPS: RingBuf = RingBuf::pinned(DROPS_BYTES, 0);
#[map]
static WATCH_WINDOW: PerCpuArray<[u64; 2]> = PerCpuArray::pinned(1, 0);
#[map]
static REPORT: PerCpuArray<Report> = PerCpuArray::pinned(1, 0);

/// Inner headers start no further than this into a frame; further is malformed. Well past
/// any real outer chain, and it keeps the verifier's offset arithmetic bounded.
const MAX_INNER_OFF: u32 = 4096;

#[xdp]
pub fn ewsgate_xdp(ctx: XdpContext) -> u32 {
    // Index 0 of a one-entry array (and 0 or 1 of POLICY below) always exists: these
    // branches only satisfy the verifier. The daemon fills both before it attaches.
    let Some(settings) = SETTINGS.get(0) else {
        return xdp_action::XDP_PASS;
    };
    // Read once: a reload may flip it while this packet is judged, and the protected set
    // and tables must come from the same generation.
    let generation = settings.generation & 1;
    let Some(policy) = POLICY.get(generation) else {
        return xdp_action::XDP_PASS;
    };
    let mut facts = Facts::default();
    let reason = match parse::classify(&ctx, policy, &mut facts) {
        Some(bound) => decide(settings, generation, policy, bound, &facts),
        None => {
            count(Reason::Tunnel);
            if let Some(slot) = INNER.get_ptr_mut(0) {
                // SAFETY: per-CPU slot, read by the tail-called program on this CPU.
                unsafe { *slot = [facts.inner_proto as u32, facts.inner_off as u32] };
            }
            // SAFETY: index 0 of our own program array; on success this never returns.
            unsafe { TAIL.tail_call(&ctx, TAIL_TUNNEL) };
            // No inner program installed: the inner packet cannot be judged.
            Reason::Malformed
        }
    };
    verdict(&ctx, settings, reason, &facts)
}

/// The inner packet of a tunnel, reached only by tail call from `ewsgate_xdp`.
#[xdp]
pub fn ewsgate_tunnel(ctx: XdpContext) -> u32 {
    let Some(settings) = SETTINGS.get(0) else {
        return xdp_action::XDP_DROP;
    };
    let generation = settings.generation & 1;
    let Some(policy) = POLICY.get(generation) else {
        return xdp_action::XDP_DROP;
    };
    let Some(&[proto, off]) = INNER.get(0) else {
        return xdp_action::XDP_DROP;
    };
    let mut facts = Facts::default();
    let reason = if off > MAX_INNER_OFF {
        Reason::Malformed
    } else {
        let bound = parse::classify_inner(&ctx, policy, &mut facts, proto as u16, off as usize);
        decide(settings, generation, policy, bound, &facts)
    };
    verdict(&ctx, settings, reason, &facts)
}

#[inline(always)]
fn decide(
    settings: &Settings,
    generation: u32,
    policy: &Policy,
    bound: Bound,
    facts: &Facts,
) -> Reason {
    match bound {
        Bound::No => Reason::NotBound,
        Bound::Malformed => Reason::Malformed,
        Bound::Yes => judge(settings, generation, policy, facts),
        Bound::Fragment => {
            count(Reason::Fragment);
            judge(settings, generation, policy, facts)
        }
    }
}

/// Benchmark reference: the plain kernel LPM trie that DIR-24-8 replaces for IPv4. Not
/// pinned and never loaded by the daemon; without preallocation it costs nothing unused.
#[map]
static LPM4_REFERENCE: LpmTrie<u32, u32> = LpmTrie::with_max_entries(262_144, 0);

/// Benchmark reference program: untagged IPv4 to 192.0.2.10 tcp/443, source judged by one
/// LPM trie lookup. Measured beside `ewsgate_xdp` to show what the trie would cost.
#[xdp]
pub fn xdp_lpm_reference(ctx: XdpContext) -> u32 {
    parse::reference_source(&ctx).map_or(xdp_action::XDP_PASS, |src| {
        let key = Key::new(32, src);
        match LPM4_REFERENCE.get(key) {
            Some(_) => xdp_action::XDP_PASS,
            None => xdp_action::XDP_DROP,
        }
    })
}

/// Minimal program used by the benchmark as the cost floor.
#[xdp]
pub fn xdp_drop_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[inline(always)]
fn verdict(ctx: &XdpContext, settings: &Settings, reason: Reason, facts: &Facts) -> u32 {
    count(reason);
    match reason {
        Reason::Blocked | Reason::NotAllowed | Reason::Malformed => {
            let action = if settings.monitor != 0 {
                count(Reason::MonitorPassed);
                xdp_action::XDP_PASS
            } else {
                xdp_action::XDP_DROP
            };
            if settings.watch_rate != 0 {
                report(ctx, reason, facts, action);
            }
            action
        }
        _ => xdp_action::XDP_PASS,
    }
}

/// Hands a drop to `ewsgate_report` through the scratch slot. A tail call, so the verifier
/// checks the event's packet reads once rather than on every path that ends in a drop.
#[inline(always)]
fn report(ctx: &XdpContext, reason: Reason, facts: &Facts, action: u32) {
    if let Some(slot) = REPORT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, read by the tail-called program on this CPU.
        unsafe {
            *slot = Report {
                source: facts.source,
                ip_off: facts.ip_off as u32,
                l4_off: facts.l4_off as u32,
                proto: facts.proto as u32,
                v4: facts.v4 as u32,
                reason: reason as u32,
                action,
            }
        };
    }
    // SAFETY: our own program array; on success this never returns.
    unsafe { TAIL.tail_call(ctx, TAIL_REPORT) };
}

/// A sampled drop: sends it to `DROPS` unless this CPU has sent `watch_rate` in the
/// current second (a fixed one-second window per CPU: cheap, and enough to keep a flood
/// from filling the buffer), then gives the verdict the caller decided.
#[xdp]
pub fn ewsgate_report(ctx: XdpContext) -> u32 {
    let Some(r) = REPORT.get(0) else {
        return xdp_action::XDP_DROP;
    };
    let r = *r;
    let rate = SETTINGS.get(0).map_or(0, |s| s.watch_rate);
    if let Some(window) = WATCH_WINDOW.get_ptr_mut(0) {
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: per-CPU slot, as in `count`.
        let w = unsafe { &mut *window };
        if now.wrapping_sub(w[0]) >= 1_000_000_000 {
            w[0] = now;
            w[1] = 0;
        }
        if w[1] < rate as u64 {
            w[1] += 1;
            let mut event = DropEvent {
                reason: r.reason,
                ..Default::default()
            };
            parse::describe(&ctx, &r, &mut event);
            let _ = DROPS.output::<DropEvent>(&event, 0);
        }
    }
    r.action
}

#[inline(always)]
fn count(reason: Reason) {
    if let Some(slot) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it, softirq context is not re-entered.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn judge(settings: &Settings, generation: u32, policy: &Policy, facts: &Facts) -> Reason {
    let key = || facts.source;
    if settings.block_exact != 0 && live(unsafe { BLOCK_EXACT.get(key()) }) {
        return Reason::Blocked;
    }
    if settings.block_cidr != 0 && live(BLOCK_CIDR.get(lpm_key(&key()).as_key())) {
        return Reason::Blocked;
    }
    let group = if facts.v4 {
        group_v4(generation, u32::from_be(facts.source[3]))
    } else {
        group_v6(generation, policy, &facts.source)
    };
    if group != 0 {
        if let Some(slot) = GROUP_HITS.get_ptr_mut(group) {
            // SAFETY: per-CPU slot, as in `count`.
            unsafe { *slot += 1 };
        }
        return Reason::AllowGroup;
    }
    if settings.allow_exact != 0 && live(unsafe { ALLOW_EXACT.get(key()) }) {
        return Reason::AllowDynamic;
    }
    if settings.allow_cidr != 0 && live(ALLOW_CIDR.get(lpm_key(&key()).as_key())) {
        return Reason::AllowDynamic;
    }
    Reason::NotAllowed
}

/// Expiry is checked here rather than only by the daemon's sweeper, so an entry lapses on
/// time even while no daemon runs.
#[inline(always)]
fn live(entry: Option<&Expiring>) -> bool {
    match entry {
        Some(e) => e.expires_ns == 0 || unsafe { bpf_ktime_get_ns() } < e.expires_ns,
        None => false,
    }
}

/// DIR-24-8 lookup: one array read for prefixes up to /24, two for longer ones.
#[inline(always)]
fn group_v4(generation: u32, src: u32) -> u32 {
    let idx = src >> 8;
    let row = idx / TBL24_ROW as u32;
    let col = (idx % TBL24_ROW as u32) as usize;
    let entry = match if generation == 0 {
        TBL24_0.get(row)
    } else {
        TBL24_1.get(row)
    } {
        Some(r) => r[col],
        None => return 0,
    };
    if entry & TBL8_FLAG == 0 {
        return entry;
    }
    let block = entry & !TBL8_FLAG;
    let tbl8 = if generation == 0 {
        TBL8_0.get(block)
    } else {
        TBL8_1.get(block)
    };
    match tbl8 {
        Some(b) => b[(src & 0xff) as usize],
        None => 0,
    }
}

/// Longest prefix first: for each distinct length, mask the source, hash, and look in the
/// two candidate buckets. A few inlined array reads per length, however dense the table.
#[inline(always)]
fn group_v6(generation: u32, policy: &Policy, src: &[u32; 4]) -> u32 {
    for i in 0..V6_MAX_LENGTHS {
        if i as u32 >= policy.v6_lengths {
            break;
        }
        let m = &policy.v6_mask[i];
        let key = [src[0] & m[0], src[1] & m[1], src[2] & m[2], src[3] & m[3]];
        let len = policy.v6_len[i];
        for b in v6_buckets(v6_hash(&key, len), policy.v6_bucket_mask) {
            let bucket = if generation == 0 {
                V6TBL_0.get(b)
            } else {
                V6TBL_1.get(b)
            };
            let Some(bucket) = bucket else { continue };
            for s in 0..V6_SLOTS {
                let slot = &bucket.slots[s];
                if slot.meta & 0xff == len && slot.meta != 0 && slot.addr == key {
                    return slot.meta >> 8;
                }
            }
        }
    }
    0
}

/// A full-length LPM lookup key laid out like aya's `Key<[u32; 4]>` (prefix length, then
/// data) but 4-byte aligned: aya's key is `packed`, which makes LLVM build it byte by byte.
#[repr(C, align(4))]
struct LpmLookup {
    prefix_len: u32,
    data: [u32; 4],
}

impl LpmLookup {
    #[inline(always)]
    fn as_key(&self) -> &Key<[u32; 4]> {
        // SAFETY: same size and field order; the packed type has no alignment requirement.
        unsafe { &*(self as *const LpmLookup).cast::<Key<[u32; 4]>>() }
    }
}

#[inline(always)]
fn lpm_key(addr: &[u32; 4]) -> LpmLookup {
    LpmLookup {
        prefix_len: 128,
        data: *addr,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
