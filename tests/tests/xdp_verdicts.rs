//! The XDP program, driven through BPF_PROG_TEST_RUN with crafted frames: every verdict and
//! reason, VLAN/QinQ, IPv4 options, IPv6 extension chains, both fragment kinds, truncation at
//! each header boundary, dynamic entries and their expiry, monitor mode and reloads.

use std::{path::Path, thread, time::Duration};

use ewsgate::{
    config::Config,
    packet::{maps::List, xdp::Gate},
};
use filter_common::Reason;
use tests::{
    lab::BpfFs,
    packet::{
        arp, frame, Ext, Frame, ProgramBench, ICMP, ICMPV6, TCP, TPID_8021AD, TPID_8021Q, UDP,
    },
};

const PASS: u32 = 2;
const DROP: u32 = 1;

const OFFICE: &str = "198.51.100.10";
const SF: &str = "198.51.100.140";
const INET: &str = "203.0.113.50";
const OFFICE6: &str = "2001:db8:100::10";
const INET6: &str = "2001:db8:300::50";
const GATE: &str = "192.0.2.10";
const GATE6: &str = "2001:db8:10::10";
const WHOLE: &str = "192.0.2.11";

fn config(pin_dir: &Path, extra: &str) -> Config {
    let text = format!(
        r#"
[xdp]
pin_dir = "{}"
control_socket = "/nonexistent/ctl.sock"
[xdp.capacity]
long_prefix_blocks = 16
ipv6_prefixes = 64
dynamic_entries = 64

[[protect]]
address = "{GATE}"
ports = ["tcp/443"]
[[protect]]
address = "{GATE6}"
ports = ["tcp/443"]
[[protect]]
address = "{WHOLE}"

{groups}
{extra}
"#,
        pin_dir.display(),
        groups = tests::TEST_GROUPS
    );
    Config::parse(Path::new("test.toml"), &text).expect("test config")
}

/// The program on a fresh bpffs, with the checks these tests make.
struct Bench(ProgramBench);

impl std::ops::Deref for Bench {
    type Target = ProgramBench;
    fn deref(&self) -> &ProgramBench {
        &self.0
    }
}

impl std::ops::DerefMut for Bench {
    fn deref_mut(&mut self) -> &mut ProgramBench {
        &mut self.0
    }
}

impl Bench {
    fn new() -> Bench {
        Bench(ProgramBench::open(|pins| config(pins, "")))
    }

    fn check(&mut self, what: &str, f: Frame, action: u32, reason: Reason) {
        self.0.expect(what, &f.build(), action, reason);
    }
}

#[test]
fn ipv4_verdicts_by_source_and_destination() {
    let mut b = Bench::new();
    b.check(
        "office to 443",
        frame(OFFICE, GATE),
        PASS,
        Reason::AllowGroup,
    );
    b.check(
        "salesforce to 443",
        frame(SF, GATE),
        PASS,
        Reason::AllowGroup,
    );
    b.check(
        "internet to 443",
        frame(INET, GATE),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "internet to unprotected port",
        frame(INET, GATE).port(TCP, 80),
        PASS,
        Reason::NotBound,
    );
    b.check(
        "internet to udp/443",
        frame(INET, GATE).port(UDP, 443),
        PASS,
        Reason::NotBound,
    );
    b.check(
        "internet to another host",
        frame(INET, "192.0.2.99"),
        PASS,
        Reason::NotBound,
    );
    b.check(
        "internet icmp to whole address",
        frame(INET, WHOLE).port(ICMP, 0),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "office icmp to whole address",
        frame(OFFICE, WHOLE).port(ICMP, 0),
        PASS,
        Reason::AllowGroup,
    );
    b.expect("arp", &arp(), PASS, Reason::NotBound);
    // A /32 lives in a tbl8 block: its neighbours must not match.
    b.check(
        "partner /32",
        frame("203.0.113.77", GATE),
        PASS,
        Reason::AllowGroup,
    );
    b.check(
        "partner neighbour below",
        frame("203.0.113.76", GATE),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "partner neighbour above",
        frame("203.0.113.78", GATE),
        DROP,
        Reason::NotAllowed,
    );
    let hits = b.gate.maps.group_hits().unwrap();
    assert_eq!(hits[1], 2, "offices: office to 443 and icmp to whole");
    assert_eq!(hits[2], 1, "salesforce");
    assert_eq!(hits[3], 1, "partner");
}

#[test]
fn vlan_and_qinq() {
    let mut b = Bench::new();
    b.check(
        "802.1Q internet",
        frame(INET, GATE).vlan(TPID_8021Q),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "802.1Q office",
        frame(OFFICE, GATE).vlan(TPID_8021Q),
        PASS,
        Reason::AllowGroup,
    );
    let qinq = |src| frame(src, GATE).vlan(TPID_8021AD).vlan(TPID_8021Q);
    b.check("QinQ internet", qinq(INET), DROP, Reason::NotAllowed);
    b.check("QinQ office", qinq(OFFICE), PASS, Reason::AllowGroup);
    b.check(
        "QinQ v6 internet",
        frame(INET6, GATE6).vlan(TPID_8021AD).vlan(TPID_8021Q),
        DROP,
        Reason::NotAllowed,
    );
    let mut deep = frame(OFFICE, GATE);
    for _ in 0..5 {
        deep = deep.vlan(TPID_8021Q);
    }
    b.check(
        "five tags: destination unknown",
        deep,
        DROP,
        Reason::Malformed,
    );
}

#[test]
fn ipv4_options_shift_the_ports() {
    let mut b = Bench::new();
    // Options whose bytes 2..4 read as port 443: a parser that ignores IHL sees "443".
    let opts = [0x01, 0x01, 0x01, 0xbb, 0x01, 0x01, 0x01, 0x01];
    b.check(
        "options, real port 80",
        frame(INET, GATE).options(&opts).port(TCP, 80),
        PASS,
        Reason::NotBound,
    );
    b.check(
        "options, real port 443",
        frame(INET, GATE).options(&opts),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "options, office",
        frame(OFFICE, GATE).options(&opts),
        PASS,
        Reason::AllowGroup,
    );
    b.check(
        "40 bytes of options",
        frame(INET, GATE).options(&[1; 40]),
        DROP,
        Reason::NotAllowed,
    );
}

#[test]
fn ipv6_extension_chains() {
    let mut b = Bench::new();
    let chain = [
        Ext::HopByHop,
        Ext::DestOpts,
        Ext::Routing,
        Ext::Auth,
        Ext::DestOpts,
    ];
    b.check(
        "v6 plain internet",
        frame(INET6, GATE6),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "v6 plain office",
        frame(OFFICE6, GATE6),
        PASS,
        Reason::AllowGroup,
    );
    b.check(
        "v6 chain internet",
        frame(INET6, GATE6).ext(&chain),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "v6 chain office",
        frame(OFFICE6, GATE6).ext(&chain),
        PASS,
        Reason::AllowGroup,
    );
    b.check(
        "v6 chain to port 80",
        frame(INET6, GATE6).ext(&chain).port(TCP, 80),
        PASS,
        Reason::NotBound,
    );
    b.check(
        "v6 to another host",
        frame(INET6, "2001:db8:10::99"),
        PASS,
        Reason::NotBound,
    );
    // Exactly eight headers are walked to their upper layer; a ninth is too many.
    let eight = [Ext::DestOpts; 8];
    b.check(
        "eight headers, internet",
        frame(INET6, GATE6).ext(&eight),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "eight headers, office",
        frame(OFFICE6, GATE6).ext(&eight),
        PASS,
        Reason::AllowGroup,
    );
    b.check(
        "eight headers to port 80",
        frame(INET6, GATE6).ext(&eight).port(TCP, 80),
        PASS,
        Reason::NotBound,
    );
    let mut seven_and_fragment = vec![Ext::DestOpts; 7];
    seven_and_fragment.push(Ext::Fragment {
        offset: 0,
        more: true,
    });
    b.check(
        "seven headers and a fragment header, internet",
        frame(INET6, GATE6).ext(&seven_and_fragment),
        DROP,
        Reason::NotAllowed,
    );
    let long = [Ext::DestOpts; 9];
    b.check(
        "chain longer than the walk",
        frame(OFFICE6, GATE6).ext(&long),
        DROP,
        Reason::Malformed,
    );
}

#[test]
fn fragments_are_judged_by_source() {
    let mut b = Bench::new();
    // A non-first fragment's "ports" are payload: port 80 here must not let it through.
    let later = |src| frame(src, GATE).port(TCP, 80).fragment(100, false);
    b.check(
        "v4 later fragment, internet",
        later(INET),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "v4 later fragment, office",
        later(OFFICE),
        PASS,
        Reason::AllowGroup,
    );
    b.check(
        "v4 first fragment to 443, internet",
        frame(INET, GATE).fragment(0, true),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "v4 first fragment to 80, internet",
        frame(INET, GATE).port(TCP, 80).fragment(0, true),
        PASS,
        Reason::NotBound,
    );
    let frag6 = |src, off| {
        frame(src, GATE6).port(TCP, 80).ext(&[
            Ext::HopByHop,
            Ext::Fragment {
                offset: off,
                more: true,
            },
        ])
    };
    b.check(
        "v6 first fragment to 80, internet",
        frag6(INET6, 0),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "v6 later fragment, internet",
        frag6(INET6, 50),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "v6 fragment, office",
        frag6(OFFICE6, 50),
        PASS,
        Reason::AllowGroup,
    );
    assert_eq!(
        b.counters()["fragment"],
        5,
        "every fragment judged by its source is counted"
    );
}

#[test]
fn fragments_of_unprotected_protocols_pass() {
    // The gate protects tcp/443 only: a large ping or a fragmented UDP answer to the host
    // must not break, whatever its source.
    let mut b = Bench::new();
    let v4 = |proto, off, more| frame(INET, GATE).port(proto, 0).fragment(off, more);
    b.check("v4 ping, first", v4(ICMP, 0, true), PASS, Reason::NotBound);
    b.check(
        "v4 ping, later",
        v4(ICMP, 185, false),
        PASS,
        Reason::NotBound,
    );
    b.check(
        "v4 udp answer, first",
        v4(UDP, 0, true),
        PASS,
        Reason::NotBound,
    );
    b.check(
        "v4 udp answer, later",
        v4(UDP, 185, true),
        PASS,
        Reason::NotBound,
    );
    b.check(
        "v4 tcp, later: still by source",
        v4(TCP, 185, false),
        DROP,
        Reason::NotAllowed,
    );
    let v6 = |proto, off| {
        frame(INET6, GATE6).port(proto, 0).ext(&[Ext::Fragment {
            offset: off,
            more: true,
        }])
    };
    b.check("v6 ping, first", v6(ICMPV6, 0), PASS, Reason::NotBound);
    b.check("v6 ping, later", v6(ICMPV6, 181), PASS, Reason::NotBound);
    b.check("v6 udp answer, later", v6(UDP, 181), PASS, Reason::NotBound);
    b.check(
        "v6 tcp, later: still by source",
        v6(TCP, 181),
        DROP,
        Reason::NotAllowed,
    );
    // A whole protected address binds every protocol, fragments included.
    b.check(
        "v4 ping to a whole address, later",
        frame(INET, WHOLE).port(ICMP, 0).fragment(185, false),
        DROP,
        Reason::NotAllowed,
    );
    assert_eq!(b.counters()["fragment"], 3, "only the bound ones");
}

#[test]
fn truncation_at_every_header_boundary() {
    let mut b = Bench::new();
    let v4 = frame(INET, GATE).build();
    let v4opts = frame(INET, GATE).options(&[1; 8]).build();
    let v6 = frame(INET6, GATE6).ext(&[Ext::HopByHop]).build();
    let vlan = frame(INET, GATE).vlan(TPID_8021Q).build();
    let cases: [(&str, &[u8], usize); 8] = [
        ("ethernet only", &v4, 14),
        ("inside the IPv4 header", &v4, 14 + 19),
        ("inside IPv4 options", &v4opts, 14 + 24),
        ("inside the TCP header", &v4, 14 + 20 + 10),
        ("inside the VLAN tag", &vlan, 16),
        ("inside the IPv6 header", &v6, 14 + 39),
        ("inside an IPv6 extension header", &v6, 14 + 40 + 1),
        ("IPv6 TCP header cut", &v6, 14 + 40 + 16 + 3),
    ];
    for (what, full, len) in cases {
        b.expect(what, &full[..len], DROP, Reason::Malformed);
    }
    // Broken headers are harmless when the destination is not protected.
    let other = frame(INET, "192.0.2.99").build();
    b.expect(
        "cut TCP to another host",
        &other[..14 + 20 + 10],
        PASS,
        Reason::NotBound,
    );
    // A wrong IP version in a frame to a protected address.
    let mut bad = frame(INET, GATE).build();
    bad[14] = 0x65;
    b.expect("IPv4 ethertype, version 6", &bad, DROP, Reason::Malformed);
}

#[test]
fn block_and_allow_entries_with_expiry() {
    let mut b = Bench::new();
    let net = |s: &str| s.parse().unwrap();
    b.gate
        .maps
        .add(List::Block, net("198.51.100.10/32"), None)
        .unwrap();
    b.check(
        "blocked office host",
        frame(OFFICE, GATE),
        DROP,
        Reason::Blocked,
    );
    b.check(
        "its neighbour",
        frame("198.51.100.11", GATE),
        PASS,
        Reason::AllowGroup,
    );
    b.gate
        .maps
        .add(List::Block, net("198.51.100.0/28"), None)
        .unwrap();
    b.check(
        "blocked office CIDR",
        frame("198.51.100.11", GATE),
        DROP,
        Reason::Blocked,
    );
    b.gate
        .maps
        .add(List::Block, net("2001:db8:100::/80"), None)
        .unwrap();
    b.check(
        "blocked v6 CIDR",
        frame(OFFICE6, GATE6),
        DROP,
        Reason::Blocked,
    );
    b.check(
        "block does not touch other ports",
        frame(OFFICE, GATE).port(TCP, 80),
        PASS,
        Reason::NotBound,
    );
    assert!(b
        .gate
        .maps
        .remove(List::Block, net("198.51.100.0/28"))
        .unwrap());
    assert!(b
        .gate
        .maps
        .remove(List::Block, net("198.51.100.10/32"))
        .unwrap());
    assert!(!b
        .gate
        .maps
        .remove(List::Block, net("198.51.100.10/32"))
        .unwrap());
    b.check("unblocked", frame(OFFICE, GATE), PASS, Reason::AllowGroup);

    b.gate
        .maps
        .add(List::Allow, net("203.0.113.50/32"), None)
        .unwrap();
    b.check(
        "dynamic allow",
        frame(INET, GATE),
        PASS,
        Reason::AllowDynamic,
    );
    b.gate
        .maps
        .add(List::Allow, net("2001:db8:300::/64"), None)
        .unwrap();
    b.check(
        "dynamic allow v6 CIDR",
        frame(INET6, GATE6),
        PASS,
        Reason::AllowDynamic,
    );
    b.gate
        .maps
        .add(List::Block, net("203.0.113.50/32"), None)
        .unwrap();
    b.check(
        "block beats allow",
        frame(INET, GATE),
        DROP,
        Reason::Blocked,
    );

    // Expiry is checked in the program: no sweep runs between these.
    b.gate
        .maps
        .add(
            List::Allow,
            net("203.0.113.60/32"),
            Some(Duration::from_millis(200)),
        )
        .unwrap();
    b.gate
        .maps
        .add(
            List::Block,
            net("198.51.100.20/32"),
            Some(Duration::from_millis(200)),
        )
        .unwrap();
    b.check(
        "live temporary allow",
        frame("203.0.113.60", GATE),
        PASS,
        Reason::AllowDynamic,
    );
    b.check(
        "live temporary block",
        frame("198.51.100.20", GATE),
        DROP,
        Reason::Blocked,
    );
    thread::sleep(Duration::from_millis(300));
    b.check(
        "expired allow",
        frame("203.0.113.60", GATE),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "expired block",
        frame("198.51.100.20", GATE),
        PASS,
        Reason::AllowGroup,
    );
    assert_eq!(
        b.gate.maps.sweep().unwrap(),
        2,
        "the sweeper removes both expired entries"
    );
    assert!(b
        .gate
        .maps
        .list(List::Allow)
        .iter()
        .all(|e| e.net != net("203.0.113.60/32")));
}

#[test]
fn monitor_mode_counts_and_drops_nothing() {
    let mut b = Bench::new();
    b.gate.maps.set_monitor(true).unwrap();
    let before = b.counters();
    b.check(
        "would drop: not allowed",
        frame(INET, GATE),
        PASS,
        Reason::NotAllowed,
    );
    let mut cut = frame(INET, GATE).build();
    cut.truncate(14 + 10);
    b.expect("would drop: malformed", &cut, PASS, Reason::Malformed);
    b.check(
        "allowed as usual",
        frame(OFFICE, GATE),
        PASS,
        Reason::AllowGroup,
    );
    assert_eq!(b.counters()["monitor_passed"], before["monitor_passed"] + 2);
    b.gate.maps.set_monitor(false).unwrap();
    b.check(
        "enforcing again",
        frame(INET, GATE),
        DROP,
        Reason::NotAllowed,
    );
}

#[test]
fn reload_swaps_the_whole_set() {
    let mut b = Bench::new();
    let dir = b.pin_dir();
    b.check(
        "salesforce before",
        frame(SF, GATE),
        PASS,
        Reason::AllowGroup,
    );
    // Salesforce removed, internet /24 added, offices unchanged.
    let mut next = config(&dir, "");
    next.groups.retain(|g| g.name != "salesforce");
    next.groups[0].v4.push("203.0.113.0/24".parse().unwrap());
    b.gate.apply(&next).unwrap();
    b.check(
        "removed source, at once",
        frame(SF, GATE),
        DROP,
        Reason::NotAllowed,
    );
    b.check("added source", frame(INET, GATE), PASS, Reason::AllowGroup);
    b.check("kept source", frame(OFFICE, GATE), PASS, Reason::AllowGroup);
    b.check(
        "v6 of removed group",
        frame("2001:db8:200::10", GATE6),
        DROP,
        Reason::NotAllowed,
    );
    // A reload that does not fit is refused and changes nothing.
    let mut too_big = next.clone();
    too_big.groups[0].v4 = (0..17)
        .map(|i| format!("198.51.{i}.1/32").parse().unwrap())
        .collect();
    let err = b.gate.apply(&too_big).unwrap_err().to_string();
    assert!(err.contains("long_prefix_blocks"), "{err}");
    b.check(
        "still the previous set",
        frame(INET, GATE),
        PASS,
        Reason::AllowGroup,
    );
    // Protected endpoints follow the config too.
    next.protect.retain(|p| p.addr.to_string() != WHOLE);
    b.gate.apply(&next).unwrap();
    b.check(
        "no longer protected",
        frame(INET, WHOLE).port(ICMP, 0),
        PASS,
        Reason::NotBound,
    );
}

#[test]
fn incompatible_pinned_maps_are_refused_not_reused() {
    let fs = BpfFs::new().expect("bpffs");
    let dir = fs.dir.join("ewsgate");
    let gate = Gate::open(&config(&dir, "")).expect("first load");
    drop(gate);
    // A second load adopts what the first pinned.
    let gate = Gate::open(&config(&dir, "")).expect("adopt");
    assert_eq!(gate.start, ewsgate::packet::xdp::Start::Adopted);
    drop(gate);
    // Put a map of another layout where SETTINGS should be: COUNTERS is a per-CPU array.
    let maps = dir.join(format!("v{}/maps", filter_common::LAYOUT_VERSION));
    let counters = aya::maps::MapData::from_pin(maps.join("COUNTERS")).unwrap();
    std::fs::remove_file(maps.join("SETTINGS")).unwrap();
    counters.pin(maps.join("SETTINGS")).unwrap();
    let err = Gate::open(&config(&dir, ""))
        .err()
        .expect("must refuse")
        .to_string();
    assert!(
        err.contains("SETTINGS") && err.contains("does not match"),
        "{err}"
    );
    // A partial set of pins is refused too.
    std::fs::remove_file(maps.join("SETTINGS")).unwrap();
    let err = Gate::open(&config(&dir, ""))
        .err()
        .expect("must refuse")
        .to_string();
    assert!(err.contains("18 of 19 maps pinned"), "{err}");
    ewsgate::packet::xdp::detach(&dir).unwrap();
}

#[test]
fn ipv6_table_across_prefix_lengths() {
    let extra = r#"
[sources.hosts6]
cidrs = ["2001:db8:300::2", "2001:db8:300::4", "2001:db8:400::/48", "2001:db8:400:7::/64"]
"#;
    let mut b = Bench(ProgramBench::open(|pins| config(pins, extra)));
    b.check(
        "/128 host",
        frame("2001:db8:300::2", GATE6),
        PASS,
        Reason::AllowGroup,
    );
    b.check(
        "its odd neighbour",
        frame("2001:db8:300::3", GATE6),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "inside the /48",
        frame("2001:db8:400:1::5", GATE6),
        PASS,
        Reason::AllowGroup,
    );
    b.check(
        "inside the nested /64",
        frame("2001:db8:400:7::5", GATE6),
        PASS,
        Reason::AllowGroup,
    );
    b.check(
        "next to the /48",
        frame("2001:db8:401::1", GATE6),
        DROP,
        Reason::NotAllowed,
    );
    b.check(
        "office /64 still",
        frame(OFFICE6, GATE6),
        PASS,
        Reason::AllowGroup,
    );
    let hits = b.gate.maps.group_hits().unwrap();
    assert_eq!(hits[1], 3, "hosts6 is the first group in name order");
    assert_eq!(hits[2], 1, "offices the second");
}

#[test]
fn auto_mode_falls_back_to_generic_where_native_is_refused() {
    // Loopback has no native XDP: `mode = "auto"` must still attach, in generic mode, and
    // say so; `mode = "native"` must refuse instead of silently degrading.
    let fs = BpfFs::new().expect("bpffs");
    let ns = tests::lab::Netns::new("auto").expect("netns");
    let dir = fs.dir.join("ewsgate");
    let attach = move |mode: &'static str| {
        let dir = dir.clone();
        move || {
            let mut c = config(&dir, "");
            c.xdp.interfaces = vec!["lo".into()];
            c.xdp.mode = match mode {
                "auto" => ewsgate::model::packet::AttachMode::Auto,
                _ => ewsgate::model::packet::AttachMode::Native,
            };
            let result = Gate::open(&c)
                .map(|g| g.attached.clone())
                .map_err(|e| e.to_string());
            let _ = ewsgate::packet::xdp::detach(&dir);
            result
        }
    };
    let refused = ns.run(attach("native"));
    assert!(refused.is_err(), "native mode on loopback: {refused:?}");
    let auto = ns.run(attach("auto")).expect("auto mode attaches");
    assert_eq!(auto.get("lo").map(String::as_str), Some("generic"));
}
