//! Model-based test of the XDP program: tens of thousands of hostile frames (random VLAN
//! stacks, IPv4 options, fragment fields, IPv6 extension chains, truncation anywhere, broken
//! version fields) go through BPF_PROG_TEST_RUN, and each verdict and reason counter is
//! compared with a reference classifier written here from the specification, independently
//! of the eBPF code. The generator is seeded, so a failure names a reproducible frame.

use std::{collections::HashMap, net::IpAddr, path::Path};

use aya::programs::{TestRun, TestRunOptions};
use ewsgate::{config::Config, packet::xdp::Gate};
use filter_common::Reason;
use tests::{
    lab::BpfFs,
    packet::{
        frame, gre_payload, vxlan_payload, Ext, Frame, GRE, GRE_CSUM, GRE_KEY, GRE_SEQ, ICMP, IPIP,
        IPV6_IN_IP, TCP, TPID_8021AD, TPID_8021Q, UDP, VXLAN_PORT,
    },
};

const PASS: u32 = 2;
const DROP: u32 = 1;
const FRAMES: usize = 30_000;

const SOURCES: [&str; 8] = [
    "198.51.100.10",    // offices
    "198.51.100.140",   // salesforce
    "203.0.113.50",     // internet
    "203.0.113.77",     // partner /32
    "2001:db8:100::10", // offices
    "2001:db8:200::10", // salesforce
    "2001:db8:300::50", // internet
    "2001:db8:300::7",  // internet, blocked by /128
];
const DESTS: [&str; 6] = [
    "192.0.2.10",      // tcp/443 and udp/443
    "192.0.2.11",      // whole address
    "192.0.2.99",      // unprotected
    "2001:db8:10::10", // tcp/443
    "2001:db8:10::11", // whole address
    "2001:db8:10::99", // unprotected
];

fn config(pin_dir: &Path) -> Config {
    let text = format!(
        r#"
[xdp]
pin_dir = "{}"
[[protect]]
address = "192.0.2.10"
ports = ["tcp/443", "udp/443"]
[[protect]]
address = "192.0.2.11"
[[protect]]
address = "2001:db8:10::10"
ports = ["tcp/443"]
[[protect]]
address = "2001:db8:10::11"
{groups}
"#,
        pin_dir.display(),
        groups = tests::TEST_GROUPS
    );
    Config::parse(Path::new("model.toml"), &text).expect("model config")
}

/// The specification, as plain Rust over the frame's bytes.
mod model {
    use super::*;

    pub fn verdict(b: &[u8]) -> Reason {
        let Some((proto, off)) = ethernet(b, 0) else {
            return Reason::Malformed;
        };
        match layer(b, proto, off) {
            Step::Done(r) => r,
            // The inner program's bound on where inner headers start.
            Step::Inner(_, off) if off > 4096 => Reason::Malformed,
            Step::Inner(proto, off) => match layer(b, proto, off) {
                Step::Done(r) => r,
                // A tunnel inside a tunnel: the innermost destination may be protected.
                Step::Inner(..) => Reason::Malformed,
            },
        }
    }

    /// One IP layer: a verdict, or a tunnel's inner packet (ethertype, offset).
    enum Step {
        Done(Reason),
        Inner(u16, usize),
    }

    fn layer(b: &[u8], proto: u16, off: usize) -> Step {
        match proto {
            0x0800 => ipv4(b, off),
            0x86dd => ipv6(b, off),
            _ => Step::Done(Reason::NotBound),
        }
    }

    fn be16(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
    }

    fn ethernet(b: &[u8], base: usize) -> Option<(u16, usize)> {
        let mut proto = be16(b, base + 12)?;
        let mut off = base + 14;
        let mut tags = 0;
        while proto == 0x8100 || proto == 0x88a8 {
            if tags == 4 {
                return None;
            }
            proto = be16(b, off + 2)?;
            off += 4;
            tags += 1;
        }
        Some((proto, off))
    }

    /// Destination → (whole address, ports)
    fn protected(dst: IpAddr) -> Option<(bool, &'static [(u8, u16)])> {
        match dst.to_string().as_str() {
            "192.0.2.10" => Some((false, &[(TCP, 443), (UDP, 443)])),
            "192.0.2.11" | "2001:db8:10::11" => Some((true, &[])),
            "2001:db8:10::10" => Some((false, &[(TCP, 443)])),
            _ => None,
        }
    }

    /// Protocols that may carry a tunnel: IPIP, IPv6, GRE, UDP (VXLAN).
    fn carrier(proto: u8) -> bool {
        matches!(proto, 4 | 41 | 47 | 17)
    }

    /// Every packet of `proto` is bound on the address.
    fn listed(whole: bool, ports: &[(u8, u16)], proto: u8) -> bool {
        whole || ports.iter().any(|(p, _)| *p == proto)
    }

    /// A broken header: dropped where the destination is protected, passed elsewhere.
    fn broken(bound: bool) -> Step {
        Step::Done(if bound {
            Reason::Malformed
        } else {
            Reason::NotBound
        })
    }

    fn ipv4(b: &[u8], off: usize) -> Step {
        let Some(h) = b.get(off..off + 20) else {
            return Step::Done(Reason::Malformed);
        };
        let dst = IpAddr::from([h[16], h[17], h[18], h[19]]);
        let ep = protected(dst);
        if ep.is_none() && !carrier(h[9]) {
            return Step::Done(Reason::NotBound);
        }
        let ihl = (h[0] & 0x0f) as usize * 4;
        if h[0] >> 4 != 4 || ihl < 20 {
            return broken(ep.is_some());
        }
        let src = IpAddr::from([h[12], h[13], h[14], h[15]]);
        if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
            return Step::Done(match ep {
                Some((whole, ports)) if listed(whole, ports, h[9]) => source(src),
                _ => Reason::NotBound,
            });
        }
        if b.len() < off + ihl {
            return broken(ep.is_some());
        }
        upper(b, off + ihl, h[9], ep, src)
    }

    fn upper(
        b: &[u8],
        off: usize,
        proto: u8,
        ep: Option<(bool, &[(u8, u16)])>,
        src: IpAddr,
    ) -> Step {
        if let Some((whole, ports)) = ep {
            match l4(b, off, proto, whole, ports, src) {
                Reason::NotBound => {}
                r => return Step::Done(r),
            }
        }
        if !carrier(proto) {
            return Step::Done(Reason::NotBound);
        }
        open(b, off, proto)
    }

    /// A tunnel header: the inner packet's ethertype and offset.
    fn open(b: &[u8], off: usize, proto: u8) -> Step {
        let inner_ethernet = |at: usize| match ethernet(b, at) {
            Some((p, o)) => Step::Inner(p, o),
            None => Step::Done(Reason::Malformed),
        };
        match proto {
            4 => Step::Inner(0x0800, off),
            41 => Step::Inner(0x86dd, off),
            47 => {
                let Some(h) = b.get(off..off + 4) else {
                    return Step::Done(Reason::Malformed);
                };
                if h[0] & 0x40 != 0 || h[1] & 0x07 != 0 {
                    return Step::Done(Reason::NotBound);
                }
                let words = [0x80, 0x20, 0x10].iter().filter(|f| h[0] & *f != 0).count();
                let at = off + 4 + 4 * words;
                match u16::from_be_bytes([h[2], h[3]]) {
                    0x0800 => Step::Inner(0x0800, at),
                    0x86dd => Step::Inner(0x86dd, at),
                    0x6558 => inner_ethernet(at),
                    _ => Step::Done(Reason::NotBound),
                }
            }
            _ => match be16(b, off + 2) {
                None => Step::Done(Reason::Malformed),
                Some(4789) => inner_ethernet(off + 16),
                Some(_) => Step::Done(Reason::NotBound),
            },
        }
    }

    fn is_ext(next: u8) -> bool {
        matches!(next, 0 | 43 | 44 | 51 | 60 | 135)
    }

    fn ipv6(b: &[u8], off: usize) -> Step {
        let Some(h) = b.get(off..off + 40) else {
            return Step::Done(Reason::Malformed);
        };
        let dst = IpAddr::from(<[u8; 16]>::try_from(&h[24..40]).unwrap());
        let ep = protected(dst);
        if ep.is_none() && !carrier(h[6]) && !is_ext(h[6]) {
            return Step::Done(Reason::NotBound);
        }
        if h[0] >> 4 != 6 {
            return broken(ep.is_some());
        }
        let src = IpAddr::from(<[u8; 16]>::try_from(&h[8..24]).unwrap());
        let mut next = h[6];
        let mut cur = off + 40;
        // None, Some(later): the walk stops at a fragment header.
        let mut frag = None;
        let mut headers = 0;
        while is_ext(next) {
            if headers == 8 {
                // Longer than the walk: dropped wherever it goes.
                return Step::Done(Reason::Malformed);
            }
            let Some(e) = b.get(cur..cur + 4) else {
                return broken(ep.is_some());
            };
            headers += 1;
            if next == 44 {
                next = e[0];
                frag = Some(u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0);
                cur += 8;
                break;
            }
            let unit = if next == 51 { 4 } else { 8 };
            next = e[0];
            cur += (e[1] as usize + if unit == 8 { 1 } else { 2 }) * unit;
        }
        match (frag, ep) {
            (Some(_), Some((whole, ports))) if listed(whole, ports, next) || is_ext(next) => {
                Step::Done(source(src))
            }
            (Some(true), _) => Step::Done(Reason::NotBound),
            (Some(false), None) if is_ext(next) => Step::Done(Reason::Malformed),
            _ => upper(b, cur, next, ep, src),
        }
    }

    fn l4(
        b: &[u8],
        off: usize,
        proto: u8,
        whole: bool,
        ports: &[(u8, u16)],
        src: IpAddr,
    ) -> Reason {
        if whole {
            return source(src);
        }
        let need = match proto {
            TCP => 20,
            UDP => 8,
            _ => return Reason::NotBound,
        };
        if b.len() < off + need {
            return Reason::Malformed;
        }
        let dport = u16::from_be_bytes([b[off + 2], b[off + 3]]);
        if ports.contains(&(proto, dport)) {
            source(src)
        } else {
            Reason::NotBound
        }
    }

    fn source(src: IpAddr) -> Reason {
        let s = src.to_string();
        if s == "2001:db8:300::7" {
            return Reason::Blocked;
        }
        let allowed = s.starts_with("198.51.100.")
            || s == "203.0.113.77"
            || s.starts_with("2001:db8:100:")
            || s.starts_with("2001:db8:200:");
        if allowed {
            Reason::AllowGroup
        } else {
            Reason::NotAllowed
        }
    }
}

/// xorshift64*: small, seeded, good enough to spread cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn random_frame(r: &mut Rng) -> Vec<u8> {
    let v6 = r.chance(50);
    let pick = |r: &mut Rng, list: &[&'static str]| list[r.below(list.len() as u64) as usize];
    let src = pick(r, if v6 { &SOURCES[4..] } else { &SOURCES[..4] });
    let dst = pick(r, if v6 { &DESTS[3..] } else { &DESTS[..3] });
    let proto = [TCP, TCP, UDP, ICMP, 47][r.below(5) as usize];
    let port = [443, 443, 80, r.below(65536) as u16][r.below(4) as usize];
    let mut f: Frame = frame(src, dst).port(proto, port);
    for _ in 0..[0, 0, 1, 2, 3, 4, 5][r.below(7) as usize] {
        f = f.vlan(if r.chance(50) {
            TPID_8021Q
        } else {
            TPID_8021AD
        });
    }
    if !v6 {
        if r.chance(30) {
            f = f.options(&vec![1u8; 4 * r.below(11) as usize]);
        }
        if r.chance(25) {
            f = f.fragment(
                if r.chance(50) {
                    0
                } else {
                    1 + r.below(8000) as u16
                },
                r.chance(50),
            );
        }
    } else if r.chance(50) {
        let kinds = [Ext::HopByHop, Ext::Routing, Ext::DestOpts, Ext::Auth];
        let mut chain = Vec::new();
        for _ in 0..r.below(11) {
            chain.push(if r.chance(10) {
                Ext::Fragment {
                    offset: r.below(100) as u16,
                    more: r.chance(50),
                }
            } else {
                kinds[r.below(4) as usize]
            });
        }
        f = f.ext(&chain);
    }
    let mut bytes = f.build();
    let ip = 14 + 4 * f.vlans.len();
    if r.chance(5) && bytes.len() > ip {
        bytes[ip] = (bytes[ip] & 0x0f) | ((r.below(16) as u8) << 4); // any version
    }
    if !v6 && r.chance(5) && bytes.len() > ip {
        bytes[ip] = (bytes[ip] & 0xf0) | r.below(16) as u8; // any IHL
    }
    if r.chance(30) {
        let keep = 14 + r.below((bytes.len() - 14) as u64 + 1) as usize;
        bytes.truncate(keep);
    }
    // Tunnels, now and then one inside another, around whatever was built.
    let mut depth = 0;
    while depth < 2 && r.chance(if depth == 0 { 25 } else { 15 }) {
        bytes = wrap(r, &bytes);
        depth += 1;
    }
    bytes
}

/// Puts a frame (its IP packet or all of it) in a random tunnel to a random destination.
fn wrap(r: &mut Rng, inner: &[u8]) -> Vec<u8> {
    let pick = |r: &mut Rng, list: &[&'static str]| list[r.below(list.len() as u64) as usize];
    let v6 = r.chance(40);
    let src = pick(r, if v6 { &SOURCES[4..] } else { &SOURCES[..4] });
    let dst = pick(r, if v6 { &DESTS[3..] } else { &DESTS[..3] });
    let outer = frame(src, dst);
    // The inner frame's IP packet: after its Ethernet header and tags.
    let mut at = 12;
    while at + 2 <= inner.len()
        && matches!(
            u16::from_be_bytes([inner[at], inner[at + 1]]),
            0x8100 | 0x88a8
        )
    {
        at += 4;
    }
    let ethertype = inner
        .get(at..at + 2)
        .map_or(0x0800, |e| u16::from_be_bytes([e[0], e[1]]));
    let ip = inner.get(at + 2..).unwrap_or_default().to_vec();
    let f = match r.below(4) {
        0 => outer.carrying(
            if ethertype == 0x86dd {
                IPV6_IN_IP
            } else {
                IPIP
            },
            ip,
        ),
        1 => {
            let flags =
                [0, GRE_CSUM, GRE_KEY, GRE_SEQ, GRE_KEY | GRE_SEQ, 0xb0, 0x40][r.below(7) as usize];
            if r.chance(40) {
                outer.carrying(GRE, gre_payload(flags, 0x6558, inner))
            } else {
                outer.carrying(GRE, gre_payload(flags, ethertype, &ip))
            }
        }
        2 => outer.carrying(GRE, {
            // Version 1 (PPTP) or a payload not opened: passed as not bound.
            let mut p = gre_payload(0, [0x880b, 0x8847][r.below(2) as usize], &ip);
            p[1] |= r.below(2) as u8;
            p
        }),
        _ => outer.carrying(
            UDP,
            vxlan_payload([VXLAN_PORT, VXLAN_PORT, 4790][r.below(3) as usize], inner),
        ),
    };
    let mut bytes = f.build();
    if r.chance(10) {
        let keep = 14 + r.below((bytes.len() - 14) as u64 + 1) as usize;
        bytes.truncate(keep);
    }
    bytes
}

#[test]
fn random_hostile_frames_match_the_model() {
    let fs = BpfFs::new().expect("bpffs");
    let mut gate = Gate::open(&config(&fs.dir.join("ewsgate"))).expect("load");
    gate.maps
        .add(
            ewsgate::packet::maps::List::Block,
            "2001:db8:300::7/128".parse().unwrap(),
            None,
        )
        .unwrap();
    let seed = std::env::var("EWSGATE_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_e75a_7e00_0001u64);
    let mut rng = Rng(seed);
    let mut seen: HashMap<&'static str, usize> = HashMap::new();
    for i in 0..FRAMES {
        let bytes = random_frame(&mut rng);
        let want = model::verdict(&bytes);
        let before = gate.maps.counters().unwrap();
        let opts = TestRunOptions {
            data_in: Some(&bytes),
            ..Default::default()
        };
        let got = gate.program().unwrap().test_run(opts).unwrap().return_value;
        let after = gate.maps.counters().unwrap();
        let moved: Vec<&str> = before
            .iter()
            .zip(&after)
            .filter(|((r, b), (_, a))| a != b && *r != Reason::Fragment && *r != Reason::Tunnel)
            .map(|((r, _), _)| r.name())
            .collect();
        let action = match want {
            Reason::NotBound | Reason::AllowGroup | Reason::AllowDynamic => PASS,
            _ => DROP,
        };
        assert_eq!(
            (got, moved.as_slice()),
            (action, [want.name()].as_slice()),
            "frame {i} (seed {seed:#x}): {:02x?}",
            bytes
        );
        *seen.entry(want.name()).or_default() += 1;
        let tunnel = Reason::Tunnel as usize;
        if after[tunnel].1 != before[tunnel].1 {
            *seen.entry("opened tunnels").or_default() += 1;
        }
    }
    // Tunnels must be opened often enough for their inner verdicts to be compared.
    assert!(seen["opened tunnels"] > 2000, "{seen:?}");
    eprintln!("{seen:?}");
    // The generator must reach every verdict, or the comparison proves little.
    for r in [
        Reason::NotBound,
        Reason::AllowGroup,
        Reason::Blocked,
        Reason::NotAllowed,
        Reason::Malformed,
    ] {
        assert!(
            seen.get(r.name()).copied().unwrap_or(0) > 200,
            "too few {} frames: {seen:?}",
            r.name()
        );
    }
}
