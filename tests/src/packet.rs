//! Crafted frames for BPF_PROG_TEST_RUN. Checksums are left zero: XDP verdicts do not read
//! them, and these frames never reach a socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// An IPv6 extension header to put in a chain.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
    /// Fragment header with an offset (in 8-octet units) and the more-fragments flag.
    Fragment {
        offset: u16,
        more: bool,
    },
    Auth,
}

impl Ext {
    fn number(self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::Fragment { .. } => 44,
            Ext::Auth => 51,
            Ext::DestOpts => 60,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            // 16 bytes: hdr ext len 1 (units of 8 beyond the first 8), padded with PadN.
            Ext::HopByHop | Ext::DestOpts => {
                let mut b = vec![next, 1, 1, 12];
                b.resize(16, 0);
                b
            }
            Ext::Routing => {
                let mut b = vec![next, 0, 0, 0];
                b.resize(8, 0);
                b
            }
            Ext::Fragment { offset, more } => {
                let field = (offset << 3) | more as u16;
                let mut b = vec![next, 0];
                b.extend(field.to_be_bytes());
                b.extend([0, 0, 0, 1]);
                b
            }
            // AH: payload len 2 → (2 + 2) * 4 = 16 bytes.
            Ext::Auth => {
                let mut b = vec![next, 2, 0, 0];
                b.resize(16, 0);
                b
            }
        }
    }
}

/// A frame under construction.
#[derive(Clone, Debug)]
pub struct Frame {
    pub vlans: Vec<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub dport: u16,
    /// IPv4 options (padded to 4 bytes).
    pub options: Vec<u8>,
    /// IPv4 fragment offset in 8-octet units and MF flag.
    pub frag: (u16, bool),
    pub ext: Vec<Ext>,
    /// Bytes after the IP header chain in place of a TCP, UDP or ICMP header (a tunnel).
    pub payload: Option<Vec<u8>>,
}

pub fn frame(src: &str, dst: &str) -> Frame {
    Frame {
        vlans: vec![],
        src: src.parse().expect("test address"),
        dst: dst.parse().expect("test address"),
        proto: TCP,
        dport: 443,
        options: vec![],
        frag: (0, false),
        ext: vec![],
        payload: None,
    }
}

impl Frame {
    pub fn port(mut self, proto: u8, dport: u16) -> Frame {
        self.proto = proto;
        self.dport = dport;
        self
    }
    pub fn vlan(mut self, tpid: u16) -> Frame {
        self.vlans.push(tpid);
        self
    }
    pub fn options(mut self, opts: &[u8]) -> Frame {
        self.options = opts.to_vec();
        self
    }
    pub fn fragment(mut self, offset: u16, more: bool) -> Frame {
        self.frag = (offset, more);
        self
    }
    pub fn ext(mut self, ext: &[Ext]) -> Frame {
        self.ext = ext.to_vec();
        self
    }

    /// Carries `payload` as protocol `proto` (a tunnel header and its inner packet).
    pub fn carrying(mut self, proto: u8, payload: Vec<u8>) -> Frame {
        self.proto = proto;
        self.payload = Some(payload);
        self
    }

    /// The IP packet alone, without the Ethernet header and tags.
    pub fn ip_packet(&self) -> Vec<u8> {
        self.build()[14 + 4 * self.vlans.len()..].to_vec()
    }

    fn l4(&self) -> Vec<u8> {
        if let Some(p) = &self.payload {
            return p.clone();
        }
        match self.proto {
            TCP => {
                let mut t = vec![0u8; 20];
                t[0..2].copy_from_slice(&40000u16.to_be_bytes());
                t[2..4].copy_from_slice(&self.dport.to_be_bytes());
                t[12] = 5 << 4;
                t[13] = 0x02; // SYN
                t
            }
            UDP => {
                let mut u = vec![0u8; 8];
                u[0..2].copy_from_slice(&40000u16.to_be_bytes());
                u[2..4].copy_from_slice(&self.dport.to_be_bytes());
                u[4..6].copy_from_slice(&8u16.to_be_bytes());
                u
            }
            _ => vec![8, 0, 0, 0, 0, 0, 0, 0], // ICMP echo
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        for (i, tpid) in self.vlans.iter().enumerate() {
            out.extend(tpid.to_be_bytes());
            out.extend((100 + i as u16).to_be_bytes()); // TCI: VLAN id
        }
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.extend(0x0800u16.to_be_bytes());
                out.extend(self.ipv4(s, d));
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                out.extend(0x86ddu16.to_be_bytes());
                out.extend(self.ipv6(s, d));
            }
            _ => panic!("mixed address families"),
        }
        out
    }

    fn ipv4(&self, s: Ipv4Addr, d: Ipv4Addr) -> Vec<u8> {
        let mut opts = self.options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0);
        }
        let payload = self.l4();
        let ihl = 5 + opts.len() / 4;
        let total = ihl * 4 + payload.len();
        let mut h = vec![(4 << 4) | ihl as u8, 0];
        h.extend((total as u16).to_be_bytes());
        h.extend([0, 1]);
        let frag = self.frag.0 | if self.frag.1 { 0x2000 } else { 0 };
        h.extend(frag.to_be_bytes());
        h.extend([64, self.proto, 0, 0]);
        h.extend(s.octets());
        h.extend(d.octets());
        h.extend(opts);
        h.extend(payload);
        h
    }

    fn ipv6(&self, s: Ipv6Addr, d: Ipv6Addr) -> Vec<u8> {
        let mut body = self.l4();
        let mut next = self.proto;
        for ext in self.ext.iter().rev() {
            let mut b = ext.bytes(next);
            b.extend(body);
            body = b;
            next = ext.number();
        }
        let mut h = vec![0x60, 0, 0, 0];
        h.extend((body.len() as u16).to_be_bytes());
        h.extend([next, 64]);
        h.extend(s.octets());
        h.extend(d.octets());
        h.extend(body);
        h
    }
}

/// An ARP request, to show non-IP traffic passes.
pub fn arp() -> Vec<u8> {
    let mut out = vec![0xff; 6];
    out.extend([0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    out.extend([0, 1, 8, 0, 6, 4, 0, 1]);
    out.extend([0x02, 0, 0, 0, 0, 1, 203, 0, 113, 5]);
    out.extend([0, 0, 0, 0, 0, 0, 192, 0, 2, 10]);
    out
}

pub const IPIP: u8 = 4;
pub const IPV6_IN_IP: u8 = 41;
pub const GRE: u8 = 47;
pub const VXLAN_PORT: u16 = 4789;
/// GRE flag bits of the first byte: checksum, key, sequence number present.
pub const GRE_CSUM: u8 = 0x80;
pub const GRE_KEY: u8 = 0x20;
pub const GRE_SEQ: u8 = 0x10;

/// `outer` carrying `inner`'s IP packet: IPIP, 6in4, 4in6 or 6in6 by the inner family.
pub fn ip_in_ip(outer: Frame, inner: &Frame) -> Frame {
    let proto = if inner.dst.is_ipv4() {
        IPIP
    } else {
        IPV6_IN_IP
    };
    outer.carrying(proto, inner.ip_packet())
}

/// `outer` carrying `inner` in GRE version 0 with the given flag bits (each adds a word):
/// its IP packet, or with `teb` its whole Ethernet frame (gretap).
pub fn gre(outer: Frame, flags: u8, inner: &Frame, teb: bool) -> Frame {
    let ethertype: u16 = match (teb, inner.dst.is_ipv4()) {
        (true, _) => 0x6558,
        (false, true) => 0x0800,
        (false, false) => 0x86dd,
    };
    let bytes = if teb {
        inner.build()
    } else {
        inner.ip_packet()
    };
    outer.carrying(GRE, gre_payload(flags, ethertype, &bytes))
}

/// A GRE header (flags, version 0, `ethertype`, a word per flag) and `inner`.
pub fn gre_payload(flags: u8, ethertype: u16, inner: &[u8]) -> Vec<u8> {
    let mut p = vec![flags, 0];
    p.extend(ethertype.to_be_bytes());
    for bit in [GRE_CSUM, GRE_KEY, GRE_SEQ] {
        if flags & bit != 0 {
            p.extend([0, 0, 0, 7]);
        }
    }
    p.extend(inner);
    p
}

/// `outer` carrying `inner`'s Ethernet frame in VXLAN to `port` (4789 is VXLAN's).
pub fn vxlan(outer: Frame, port: u16, inner: &Frame) -> Frame {
    outer.carrying(UDP, vxlan_payload(port, &inner.build()))
}

/// A UDP header to `port`, a VXLAN header (VNI 42) and the Ethernet `frame`.
pub fn vxlan_payload(port: u16, frame: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend(40000u16.to_be_bytes());
    p.extend(port.to_be_bytes());
    p.extend(((8 + 8 + frame.len()) as u16).to_be_bytes());
    p.extend([0, 0]);
    p.extend([0x08, 0, 0, 0, 0, 0, 42, 0]); // I flag, VNI 42
    p.extend(frame);
    p
}

/// The XDP program loaded (not attached) from a config on a fresh bpffs, driven with
/// BPF_PROG_TEST_RUN: what the packet tests share.
pub struct ProgramBench {
    pub gate: ewsgate::packet::xdp::Gate,
    _fs: crate::lab::BpfFs,
}

impl ProgramBench {
    /// Loads the program from the config `config` makes for a pin directory.
    pub fn open(config: impl FnOnce(&std::path::Path) -> ewsgate::config::Config) -> Self {
        let fs = crate::lab::BpfFs::new().expect("bpffs");
        let gate = ewsgate::packet::xdp::Gate::open(&config(&fs.dir.join("ewsgate")));
        ProgramBench {
            gate: gate.expect("load"),
            _fs: fs,
        }
    }

    /// Where the program and its maps are pinned.
    pub fn pin_dir(&self) -> std::path::PathBuf {
        self._fs.dir.join("ewsgate")
    }

    /// The program's action for one frame.
    pub fn run(&mut self, frame: &[u8]) -> u32 {
        use aya::programs::{TestRun, TestRunOptions};
        let prog = self.gate.program().expect("program");
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..Default::default()
        };
        prog.test_run(opts).expect("test_run").return_value
    }

    /// The per-reason counters, summed over CPUs.
    pub fn counters(&self) -> std::collections::HashMap<&'static str, u64> {
        let c = self.gate.maps.counters().expect("counters");
        c.into_iter().map(|(r, n)| (r.name(), n)).collect()
    }

    /// Runs a frame and checks its action and the reason counter it bumped; returns how
    /// much each counter moved, for the checks a caller adds.
    pub fn expect(
        &mut self,
        what: &str,
        frame: &[u8],
        action: u32,
        reason: filter_common::Reason,
    ) -> std::collections::HashMap<&'static str, u64> {
        let before = self.counters();
        let got = self.run(frame);
        let after = self.counters();
        assert_eq!(got, action, "{what}: action");
        assert_eq!(
            after[reason.name()],
            before[reason.name()] + 1,
            "{what}: counter {}",
            reason.name()
        );
        after
            .iter()
            .map(|(k, v)| (*k, v - before.get(k).copied().unwrap_or(0)))
            .collect()
    }
}
