//! Paths around the program. Tunnels ending on the gate (IPIP, 6in4, 4in6, GRE, VXLAN) are
//! opened and their inner packet judged by its own source, through BPF_PROG_TEST_RUN with
//! crafted frames and through real tunnel devices in a lab; an interface that does not run
//! the program is named by `ewsgate status`, and the proxy refuses at accept what arrives
//! through it from outside the groups.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ewsgate::config::Config;
use filter_common::Reason;
use tests::{
    ews::{wait_audit, Https},
    gate::{gate4, Gate as LabGate},
    lab::GATE_V4,
    packet::{
        frame, gre, ip_in_ip, vxlan, Frame, ProgramBench, GRE_CSUM, GRE_KEY, GRE_SEQ, ICMP, TCP,
        UDP,
    },
};

const PASS: u32 = 2;
const DROP: u32 = 1;

const OFFICE: &str = "198.51.100.10";
const INET: &str = "203.0.113.50";
const OFFICE6: &str = "2001:db8:100::10";
const INET6: &str = "2001:db8:300::50";
const GATE: &str = "192.0.2.10";
const GATE6: &str = "2001:db8:10::10";
const WHOLE: &str = "192.0.2.11";
/// The gate's tunnel endpoints: addresses of the host that are not protected.
const ENDPOINT: &str = "192.0.2.99";
const ENDPOINT6: &str = "2001:db8:10::99";

fn config(pin_dir: &Path) -> Config {
    let text = format!(
        r#"
[xdp]
pin_dir = "{}"
[[protect]]
address = "{GATE}"
ports = ["tcp/443"]
[[protect]]
address = "{GATE6}"
ports = ["tcp/443"]
[[protect]]
address = "{WHOLE}"
{groups}
"#,
        pin_dir.display(),
        groups = tests::TEST_GROUPS
    );
    Config::parse(Path::new("paths.toml"), &text).expect("test config")
}

/// The program on a fresh bpffs, with the checks these tests make.
struct Bench(ProgramBench);

impl Bench {
    fn new() -> Bench {
        Bench(ProgramBench::open(config))
    }

    /// Runs a frame; checks its action, the reason counter it bumped, and whether the
    /// program opened a tunnel for it.
    fn check(&mut self, what: &str, f: Frame, action: u32, reason: Reason, opened: bool) {
        let moved = self.0.expect(what, &f.build(), action, reason);
        assert_eq!(moved["tunnel"], opened as u64, "{what}: tunnel opened");
    }
}

/// An outer header from an allowed office host to the gate's tunnel endpoint: a tunnel
/// must not lend its outer source to the inner packet.
fn outer() -> Frame {
    frame(OFFICE, ENDPOINT)
}

fn outer6() -> Frame {
    frame(OFFICE6, ENDPOINT6)
}

#[test]
fn ip_in_ip_is_judged_by_the_inner_source() {
    let mut b = Bench::new();
    let cases = [
        ("ipip", outer(), frame(INET, GATE)),
        ("6in4", outer(), frame(INET6, GATE6)),
        ("4in6", outer6(), frame(INET, GATE)),
        ("6in6", outer6(), frame(INET6, GATE6)),
    ];
    for (kind, out, inner) in cases {
        b.check(
            &format!("{kind}: internet inside"),
            ip_in_ip(out.clone(), &inner),
            DROP,
            Reason::NotAllowed,
            true,
        );
        let allowed = if inner.dst.is_ipv4() {
            frame(OFFICE, GATE)
        } else {
            frame(OFFICE6, GATE6)
        };
        b.check(
            &format!("{kind}: office inside"),
            ip_in_ip(out.clone(), &allowed),
            PASS,
            Reason::AllowGroup,
            true,
        );
        b.check(
            &format!("{kind}: internet inside, unprotected port"),
            ip_in_ip(out, &inner.port(TCP, 80)),
            PASS,
            Reason::NotBound,
            true,
        );
    }
}

#[test]
fn gre_and_vxlan_are_judged_by_the_inner_source() {
    let mut b = Bench::new();
    for flags in [0, GRE_KEY, GRE_CSUM | GRE_KEY | GRE_SEQ] {
        for teb in [false, true] {
            let what = format!("gre flags {flags:#x} ethernet {teb}");
            b.check(
                &format!("{what}: internet inside"),
                gre(outer(), flags, &frame(INET, GATE), teb),
                DROP,
                Reason::NotAllowed,
                true,
            );
            b.check(
                &format!("{what}: office inside"),
                gre(outer(), flags, &frame(OFFICE, GATE), teb),
                PASS,
                Reason::AllowGroup,
                true,
            );
        }
    }
    b.check(
        "gretap with a VLAN tag inside, internet",
        gre(outer(), 0, &frame(INET, GATE).vlan(0x8100), true),
        DROP,
        Reason::NotAllowed,
        true,
    );
    b.check(
        "gre over IPv6, IPv6 inside",
        gre(outer6(), GRE_KEY, &frame(INET6, GATE6), false),
        DROP,
        Reason::NotAllowed,
        true,
    );
    b.check(
        "vxlan, internet inside",
        vxlan(outer(), 4789, &frame(INET, GATE)),
        DROP,
        Reason::NotAllowed,
        true,
    );
    b.check(
        "vxlan, office inside",
        vxlan(outer(), 4789, &frame(OFFICE, GATE)),
        PASS,
        Reason::AllowGroup,
        true,
    );
    b.check(
        "vxlan over IPv6, IPv6 inside",
        vxlan(outer6(), 4789, &frame(INET6, GATE6)),
        DROP,
        Reason::NotAllowed,
        true,
    );
    b.check(
        "the same bytes to another UDP port are not a tunnel",
        vxlan(outer(), 4790, &frame(INET, GATE)),
        PASS,
        Reason::NotBound,
        false,
    );
}

#[test]
fn what_cannot_be_opened_within_bounds_fails_closed() {
    let mut b = Bench::new();
    // A tunnel inside a tunnel: the innermost destination may be protected.
    let nested = ip_in_ip(frame(INET, ENDPOINT), &frame(OFFICE, GATE));
    b.check(
        "ipip inside gre",
        gre(outer(), 0, &nested, false),
        DROP,
        Reason::Malformed,
        true,
    );
    b.check(
        "vxlan inside ipip",
        ip_in_ip(
            outer(),
            &vxlan(frame(INET, ENDPOINT), 4789, &frame(INET, GATE)),
        ),
        DROP,
        Reason::Malformed,
        true,
    );
    // Inner headers cut short.
    let mut cut = ip_in_ip(outer(), &frame(INET, GATE)).build();
    cut.truncate(14 + 20 + 12);
    run_bytes(
        &mut b,
        "inner IPv4 header cut",
        &cut,
        DROP,
        Reason::Malformed,
    );
    let mut cut = gre(outer(), GRE_KEY, &frame(INET, GATE), false).build();
    cut.truncate(14 + 20 + 6);
    run_bytes(&mut b, "GRE key word cut", &cut, DROP, Reason::Malformed);
    let mut cut = vxlan(outer(), 4789, &frame(INET, GATE)).build();
    cut.truncate(14 + 20 + 8 + 8 + 10);
    run_bytes(
        &mut b,
        "VXLAN inner Ethernet cut",
        &cut,
        DROP,
        Reason::Malformed,
    );
    // What Linux itself does not decapsulate passes: GRE with the routing bit, version 1
    // (PPTP, which ends in a ppp device `status` names), payloads that are not IP.
    let mut routing = gre(outer(), 0, &frame(INET, GATE), false);
    if let Some(p) = routing.payload.as_mut() {
        p[0] |= 0x40;
    }
    b.check("gre routing bit", routing, PASS, Reason::NotBound, false);
}

#[test]
fn the_outer_header_binds_first() {
    let mut b = Bench::new();
    // A tunnel to a wholly protected address is judged by its outer source, like any
    // packet to that address.
    b.check(
        "ipip to a whole address from the internet",
        ip_in_ip(frame(INET, WHOLE), &frame(OFFICE, GATE)),
        DROP,
        Reason::NotAllowed,
        false,
    );
    // A later fragment of a tunnel packet carries no inner header: the first fragment
    // does, and is judged; the kernel reassembles nothing without it.
    let first = ip_in_ip(outer(), &frame(INET, GATE)).fragment(0, true);
    b.check(
        "first fragment of ipip",
        first,
        DROP,
        Reason::NotAllowed,
        true,
    );
    let later = ip_in_ip(outer(), &frame(INET, GATE)).fragment(100, false);
    b.check(
        "later fragment of ipip",
        later,
        PASS,
        Reason::NotBound,
        false,
    );
    // Ordinary traffic to the endpoint is untouched.
    b.check(
        "ping to the endpoint",
        frame(INET, ENDPOINT).port(ICMP, 0),
        PASS,
        Reason::NotBound,
        false,
    );
    b.check(
        "dns to the endpoint",
        frame(INET, ENDPOINT).port(UDP, 53),
        PASS,
        Reason::NotBound,
        false,
    );
}

fn run_bytes(b: &mut Bench, what: &str, bytes: &[u8], action: u32, reason: Reason) {
    b.0.expect(what, bytes, action, reason);
}

const RULES: &str = r#"
[[rule]]
name = "salesforce-callback"
groups = ["salesforce"]
auth = ["bearer"]
token = ["callback"]
action = "allow"
"#;

fn tokens() -> String {
    format!(
        "metadata_urls = [\"{}\"]\n",
        ewsgate::identity::tokens::testkit::AMURL
    )
}

/// Whether a TCP connect from `ns` to `to` goes unanswered (dropped by XDP).
fn dropped(ns: &tests::lab::Netns, to: SocketAddr) -> bool {
    ns.run(move || TcpStream::connect_timeout(&to, Duration::from_millis(500)))
        .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
}

#[test]
fn a_real_vxlan_tunnel_ending_on_the_gate_is_judged_by_its_inner_source() {
    // VXLAN is the tunnel a stock kernel always has; IPIP and GRE devices need modules a
    // CI kernel may lack, so those kinds are covered by the crafted frames above.
    let g = LabGate::start(0, RULES);
    let inet = g.lab.client("inet");
    let dev = "eg-vx";
    // The internet host tunnels to the gate's internet-facing address, from an inner
    // address in no group; the gate routes the answers back through the tunnel.
    inet.ip(&format!(
        "link add {dev} type vxlan id 42 local 203.0.113.50 remote 203.0.113.1 dstport 4789"
    ))
    .unwrap();
    g.lab
        .gate
        .ip(&format!(
            "link add {dev} type vxlan id 42 local 203.0.113.1 remote 203.0.113.50 dstport 4789"
        ))
        .unwrap();
    for ns in [inet, &g.lab.gate] {
        ns.ip(&format!("link set {dev} up")).unwrap();
    }
    inet.ip(&format!("addr add 192.0.2.77/32 dev {dev}"))
        .unwrap();
    inet.ip(&format!("route add {GATE_V4}/32 dev {dev} src 192.0.2.77"))
        .unwrap();
    g.lab
        .gate
        .ip(&format!("route add 192.0.2.77/32 dev {dev}"))
        .unwrap();
    let before = g.daemon.counter("tunnel").unwrap();
    let not_allowed = g.daemon.counter("drop_not_allowed").unwrap();
    assert!(dropped(inet, gate4()), "the inner SYN reached the gate");
    assert!(
        g.daemon.counter("tunnel").unwrap() > before,
        "the program opened the tunnel"
    );
    assert!(g.daemon.counter("drop_not_allowed").unwrap() > not_allowed);
    // The inner ARP is not bound: the tunnel itself works (the gate answered it).
    let neigh = inet.ip(&format!("neigh show dev {dev}")).unwrap();
    assert!(neigh.contains(GATE_V4), "{neigh}");
    // The tunnel device is a path around the program too: status names it.
    let status = g.daemon.cli(&["status"]).unwrap();
    assert!(
        status.contains(&format!("WARNING      interface {dev}")),
        "{status}"
    );
}

#[test]
fn an_interface_without_the_program_is_named_and_the_proxy_refuses_at_accept() {
    let all = LabGate::start(0, RULES);
    let status = all.daemon.cli(&["status"]).unwrap();
    assert!(!status.contains("WARNING"), "{status}");
    drop(all);
    // The internet-facing interface does not run the program.
    let g = LabGate::start_edited(0, &tokens(), RULES, |t, _| {
        t.replace(
            "interfaces = [\"g-office\", \"g-sf\", \"g-inet\"]",
            "interfaces = [\"g-office\", \"g-sf\"]",
        )
    });
    let status = g.daemon.cli(&["status"]).unwrap();
    assert!(
        status.contains("WARNING      interface g-inet (ether) is up and does not run"),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&g.daemon.cli(&["status", "--json"]).unwrap()).unwrap();
    let warnings = json["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    // A disallowed source arriving there reaches the host, and the proxy refuses it.
    assert!(!dropped(g.lab.client("inet"), gate4()), "routed around XDP");
    let attempt = Https::connect(g.lab.client("inet"), gate4(), &g.pki, None)
        .and_then(|mut c| c.ews(&[], b"<x/>"));
    assert!(attempt.is_err(), "the proxy answered a source in no group");
    let line = wait_audit(&g.audit, |v| {
        v["reason"] == "source_not_allowed" && v["source"] == "203.0.113.50"
    })
    .expect("audited");
    assert_eq!(line["kind"], "connection");
    assert!(g.backend.requests().is_empty());
}

/// `ewsgate run` in a fresh mount namespace where nothing is mounted at /sys/fs/bpf (as on
/// a host without systemd): the agent mounts bpffs there itself, pins, and serves.
#[test]
fn the_agent_mounts_bpffs_where_nothing_is_mounted() {
    let t = tests::lab::tag();
    let dir = std::env::temp_dir().join(format!("ewsgate-bpffs-test-{t}"));
    fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("ctl.sock");
    let config = dir.join("ewsgate.toml");
    let pin_dir = format!("/sys/fs/bpf/ewsgate-test-{t}");
    let text = format!(
        "[xdp]\npin_dir = \"{pin_dir}\"\ncontrol_socket = \"{}\"\n\n[[protect]]\naddress = \"{GATE}\"\nports = [\"tcp/443\"]\n{}",
        socket.display(),
        tests::TEST_GROUPS
    );
    fs::write(&config, text).unwrap();
    let log = dir.join("agent.log");
    // unshare and sh exec in place: the child's PID is the agent's.
    let script = format!(
        "umount /sys/fs/bpf 2>/dev/null; exec {} --config {} run",
        tests::lab::ewsgate_bin().display(),
        config.display()
    );
    let mut child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&socket).is_err() && Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new(tests::lab::ewsgate_bin())
        .args(["--config", config.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    tests::lab::stop_pid(child.id());
    let _ = child.wait();
    let text = fs::read_to_string(&log).unwrap_or_default();
    let _ = fs::remove_dir_all(&dir);
    assert!(
        text.contains("mounted bpffs at /sys/fs/bpf"),
        "the agent did not say it mounted bpffs: {text}"
    );
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(
        out.contains(&format!("{pin_dir}/v")),
        "status: {out}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    // The mount lived in the agent's namespace only: the host's /sys/fs/bpf is as it was.
    assert!(!Path::new(&pin_dir).exists(), "the pins leaked to the host");
}

/// A pin_dir on another file system gets an error that says what to do, never a bare
/// "No such file or directory".
#[test]
fn a_pin_dir_off_bpffs_gets_an_error_that_says_what_to_do() {
    let t = tests::lab::tag();
    let dir = std::env::temp_dir().join(format!("ewsgate-bpffs-test-{t}"));
    fs::create_dir_all(&dir).unwrap();
    let config = dir.join("ewsgate.toml");
    let text = format!(
        "[xdp]\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\n\n[[protect]]\naddress = \"{GATE}\"\nports = [\"tcp/443\"]\n",
        dir.join("pins/deeper").display(),
        dir.join("ctl.sock").display(),
    );
    fs::write(&config, text).unwrap();
    let out = Command::new(tests::lab::ewsgate_bin())
        .args(["--config", config.to_str().unwrap(), "run"])
        .output()
        .unwrap();
    let _ = fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is not on a BPF file system: mount one there"),
        "{err}"
    );
    assert!(!err.contains("No such file or directory"), "{err}");
}
