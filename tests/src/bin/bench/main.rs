//! `cargo xtask bench [xdp|proxy|tokens|cost|all]`. The XDP suite (`proxy.rs`, `tokens.rs` and `cost.rs` have the others): ewsgate's XDP program against its peers, all measured in one run
//! on this machine, written to target/bench/xdp.json and printed as a table.
//!
//! - ns per packet through BPF_PROG_TEST_RUN (1,000,000 repeats) at 10, 1,000 and 100,000
//!   prefixes, for ewsgate, a minimal XDP_DROP program (the floor), xdp-filter, and a
//!   reference program that judges IPv4 sources with the kernel's plain LPM trie;
//! - a SYN flood over veth with trafgen, packets per second dropped by ewsgate, nftables
//!   (netdev ingress, interval set), xdp-filter and the floor;
//! - the reload time at 100,000 prefixes.
//!
//! Frames carry documentation addresses only; the flood stays on a veth pair between two
//! namespaces this program creates and removes.

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Instant,
};

use anyhow::{bail, Context};
use aya::{
    maps::{Map, MapData, PerCpuHashMap, PerCpuValues},
    programs::{TestRun, TestRunOptions, Xdp, XdpMode},
    util::nr_cpus,
    EbpfLoader,
};
use ewsgate::{config::Config, packet::xdp::Gate};
use serde_json::{json, Value};
use tests::{
    lab::{sh, tag, BpfFs, Daemon, Netns, SysctlGuard},
    packet::{frame, Ext, TCP},
};

const REPEAT: u32 = 1_000_000;
const SIZES: [usize; 3] = [10, 1_000, 100_000];
/// xdp-filter's maps hold 10,000 exact addresses at most.
const XDP_FILTER_MAX: usize = 10_000;
const FLOOD_PACKETS: u64 = 2_000_000;
const FLOOD_ROUNDS: usize = 6;
/// test_run rounds per (size, packet), ewsgate and floor alternating; the minimum of each is
/// kept, the usual way to read a microbenchmark on a shared machine.
const TEST_RUN_ROUNDS: usize = 3;

mod cost;
mod fleet;
mod proxy;
mod tokens;

fn main() -> anyhow::Result<()> {
    let suite = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    match suite.as_str() {
        "xdp" => xdp_suite(),
        "proxy" => proxy::run(),
        "tokens" => tokens::run_suite(),
        "cost" => cost::run(),
        // The child `cost` runs under callgrind to count the SOAP parsers alone.
        "soap-parse" => cost::parse_soap(),
        "fleet" => fleet::run(),
        "all" => xdp_suite()
            .and_then(|()| proxy::run())
            .and_then(|()| tokens::run_suite()),
        _ => bail!("unknown bench suite '{suite}' (known: xdp, proxy, tokens, cost, fleet, all)"),
    }
}

fn xdp_suite() -> anyhow::Result<()> {
    let mut rows = Vec::new();
    test_run_rows(&mut rows)?;
    flood_rows(&mut rows)?;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&out)?;
    // xdp.json keeps to the four subjects it promises; the trie reference goes beside it.
    let (reference, peers): (Vec<Value>, Vec<Value>) = rows
        .iter()
        .cloned()
        .partition(|r| r["subject"] == "lpm-trie");
    fs::write(out.join("xdp.json"), serde_json::to_string_pretty(&peers)?)?;
    fs::write(
        out.join("xdp-lpm-reference.json"),
        serde_json::to_string_pretty(&reference)?,
    )?;
    print_table(&rows);
    println!("\nwritten to target/bench/xdp.json and target/bench/xdp-lpm-reference.json");
    Ok(())
}

fn row(measure: &str, subject: &str, prefixes: usize, value: f64, unit: &str) -> Value {
    json!({"measure": measure, "subject": subject, "prefixes": prefixes, "value": value, "unit": unit})
}

/// The allow list at size `n`: the lab's office group, then dense /24s, and /32s and /128s
/// on every other address around 203.0.113.0 and 2001:db8:300:: so that the odd documentation
/// addresses there miss only after a trie's deepest walk. Map contents only, never traffic.
fn prefixes(n: usize) -> Vec<String> {
    let mut out: Vec<String> = vec!["198.51.100.0/25".into(), "2001:db8:100::/64".into()];
    let rest = n.saturating_sub(out.len());
    let v6 = rest / 5;
    let v4_32 = (rest - v6) / 2;
    let v4_24 = rest - v6 - v4_32;
    out.extend(
        (0..v4_24).map(|i| format!("{}/24", Ipv4Addr::from(0x1400_0000u32 + ((i as u32) << 8)))),
    );
    out.extend((0..v4_32).map(|i| format!("{}/32", dense_v4(i, v4_32))));
    out.extend((0..v6).map(|i| format!("{}/128", dense_v6(i, v6))));
    out
}

/// The i-th of `count` even IPv4 addresses centred on 203.0.113.0.
fn dense_v4(i: usize, count: usize) -> Ipv4Addr {
    let centre = u32::from(Ipv4Addr::new(203, 0, 113, 0));
    Ipv4Addr::from(centre - 2 * (count as u32 / 2) + 2 * i as u32)
}

/// The i-th of `count` even IPv6 addresses centred on 2001:db8:300::.
fn dense_v6(i: usize, count: usize) -> std::net::Ipv6Addr {
    let centre = u128::from(
        "2001:db8:300::"
            .parse::<std::net::Ipv6Addr>()
            .expect("literal"),
    );
    std::net::Ipv6Addr::from(centre - 2 * (count as u128 / 2) + 2 * i as u128)
}

fn write_prefixes(dir: &Path, n: usize) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("prefixes-{n}.txt"));
    fs::write(&path, prefixes(n).join("\n"))?;
    Ok(path)
}

fn config_text(pin_dir: &Path, socket: &Path, list: &Path, interfaces: &str) -> String {
    format!(
        r#"[xdp]
interfaces = [{interfaces}]
mode = "native"
pin_dir = "{}"
control_socket = "{}"
[xdp.capacity]
long_prefix_blocks = 4096
ipv6_prefixes = 65536
[[protect]]
address = "192.0.2.10"
ports = ["tcp/443"]
[[protect]]
address = "2001:db8:10::10"
ports = ["tcp/443"]
[sources.bench]
files = ["{}"]
"#,
        pin_dir.display(),
        socket.display(),
        list.display()
    )
}

/// The frames measured, by name.
fn packets() -> Vec<(&'static str, Vec<u8>)> {
    let chain = [Ext::HopByHop, Ext::DestOpts, Ext::Routing];
    vec![
        ("allowed_v4", frame("198.51.100.10", "192.0.2.10").build()),
        ("dropped_v4", frame("192.0.2.99", "192.0.2.10").build()),
        (
            "ipv6_ext_allowed",
            frame("2001:db8:100::10", "2001:db8:10::10")
                .ext(&chain)
                .build(),
        ),
        (
            "ipv6_ext_dropped",
            frame("2001:db8:ffff::50", "2001:db8:10::10")
                .ext(&chain)
                .build(),
        ),
        (
            "not_bound",
            frame("192.0.2.99", "192.0.2.10").port(TCP, 80).build(),
        ),
        // Odd addresses amid the dense even /32s and /128s: a trie's deepest walk, a miss.
        ("adversarial_v4", frame("203.0.113.1", "192.0.2.10").build()),
        (
            "adversarial_v6",
            frame("2001:db8:300::1", "2001:db8:10::10").build(),
        ),
    ]
}

/// Packets the LPM-trie reference program understands (untagged IPv4 to 443).
const REFERENCE_PACKETS: [&str; 3] = ["allowed_v4", "dropped_v4", "adversarial_v4"];

fn test_run_ns(prog: &Xdp, data: &[u8]) -> anyhow::Result<f64> {
    let opts = TestRunOptions {
        data_in: Some(data),
        repeat: REPEAT,
        ..Default::default()
    };
    Ok(prog.test_run(opts)?.duration.as_nanos() as f64)
}

/// Minimum over TEST_RUN_ROUNDS of `a` and of `b`, measured alternately.
fn paired_min(a: &Xdp, b: &Xdp, data: &[u8]) -> anyhow::Result<(f64, f64)> {
    let (mut best_a, mut best_b) = (f64::MAX, f64::MAX);
    for _ in 0..TEST_RUN_ROUNDS {
        best_a = best_a.min(test_run_ns(a, data)?);
        best_b = best_b.min(test_run_ns(b, data)?);
    }
    Ok((best_a, best_b))
}

fn test_run_rows(rows: &mut Vec<Value>) -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("ewsgate-bench-{}", tag()));
    fs::create_dir_all(&scratch)?;
    let bpffs = BpfFs::new()?;
    let mut floor_obj = side_program(&bpffs.dir.join("floor"), "xdp_drop_floor")?;
    let floor = xdp_program(&mut floor_obj, "xdp_drop_floor")?;
    for n in SIZES {
        let list = write_prefixes(&scratch, n)?;
        let pin_dir = bpffs.dir.join(format!("ewsgate-{n}"));
        let text = config_text(&pin_dir, &scratch.join("none.sock"), &list, "");
        let config = Config::parse(&scratch.join("bench.toml"), &text)?;
        let mut gate = Gate::open(&config)?;
        let mut reference = lpm_reference(&bpffs.dir.join(format!("reference-{n}")), n)?;
        let reference = xdp_program(&mut reference, "xdp_lpm_reference")?;
        for (name, data) in packets() {
            let (ns, floor_ns) = paired_min(gate.program()?, floor, &data)?;
            push_test_run(rows, "ewsgate", n, name, ns);
            push_test_run(rows, "xdp-drop-floor", n, name, floor_ns);
            if REFERENCE_PACKETS.contains(&name) {
                let (trie_ns, _) = paired_min(reference, floor, &data)?;
                push_test_run(rows, "lpm-trie", n, name, trie_ns);
            }
        }
        if n == 100_000 {
            rows.push(row(
                "reload_seconds",
                "ewsgate",
                n,
                reload_seconds(&mut gate, &config)?,
                "s",
            ));
        }
        drop(gate);
        ewsgate::packet::xdp::detach(&pin_dir)?;
    }
    xdp_filter_test_run(rows)?;
    let _ = fs::remove_dir_all(&scratch);
    Ok(())
}

/// Loads ewsgate's object with its pins in `pin_dir`, and in it the program `name` (the
/// floor or the trie reference), never attached by the daemon.
fn side_program(pin_dir: &Path, name: &str) -> anyhow::Result<aya::Ebpf> {
    fs::create_dir_all(pin_dir)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(ewsgate::packet::xdp::OBJECT)?;
    xdp_program(&mut ebpf, name)?.load()?;
    Ok(ebpf)
}

fn xdp_program<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let prog = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name}"))?;
    Ok(prog.try_into()?)
}

/// The reference program with the IPv4 prefixes of `prefixes(n)` in a plain LPM trie.
fn lpm_reference(pin_dir: &Path, n: usize) -> anyhow::Result<aya::Ebpf> {
    let mut ebpf = side_program(pin_dir, "xdp_lpm_reference")?;
    let map = ebpf.map_mut("LPM4_REFERENCE").context("reference map")?;
    let mut trie: aya::maps::LpmTrie<&mut MapData, u32, u32> = aya::maps::LpmTrie::try_from(map)?;
    for p in prefixes(n).iter().filter(|p| !p.contains(':')) {
        let net: ipnet::Ipv4Net = p.parse()?;
        let key = aya::maps::lpm_trie::Key::new(
            net.prefix_len() as u32,
            u32::from_ne_bytes(net.network().octets()),
        );
        trie.insert(&key, 1, 0)?;
    }
    Ok(ebpf)
}

fn push_test_run(rows: &mut Vec<Value>, subject: &str, n: usize, packet: &str, ns: f64) {
    let mut r = row("test_run_ns_per_packet", subject, n, ns, "ns");
    r["packet"] = json!(packet);
    rows.push(r);
}

/// Reload with half the set replaced, the way a feed update looks, timed as the daemon's
/// reload path runs it (build, fill the idle generation, flip).
fn reload_seconds(gate: &mut Gate, config: &Config) -> anyhow::Result<f64> {
    let mut next = config.clone();
    let g = &mut next.groups[0];
    let half = g.v4.len() / 2;
    for (i, net) in g.v4.iter_mut().skip(half).enumerate() {
        *net = format!("{}/32", Ipv4Addr::from(0x6480_0000u32 + i as u32)).parse()?;
    }
    let started = Instant::now();
    gate.apply(&next)?;
    Ok(started.elapsed().as_secs_f64())
}

/// xdp-filter (Debian's xdp-tools) in deny mode with `n` exact source addresses allowed.
struct XdpFilter {
    netns: String,
    iface: String,
}

impl XdpFilter {
    fn load(netns: &str, iface: &str, n: usize) -> anyhow::Result<XdpFilter> {
        let f = XdpFilter {
            netns: netns.into(),
            iface: iface.into(),
        };
        f.cmd(&format!("load -p deny -m native {iface}"))?;
        f.fill(n)?;
        Ok(f)
    }

    fn cmd(&self, args: &str) -> anyhow::Result<String> {
        sh(&format!(
            "nsenter --net=/run/netns/{} xdp-filter {args}",
            self.netns
        ))
    }

    /// Exact addresses, written straight into its pinned maps (one CLI call each would take
    /// minutes): value 1 is its "source address" flag, on every CPU.
    fn fill(&self, n: usize) -> anyhow::Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| e)?;
        let flags = || PerCpuValues::try_from(vec![1u64; cpus]);
        let open = |name: &str| MapData::from_pin(format!("/sys/fs/bpf/xdp-filter/{name}"));
        let mut v4: PerCpuHashMap<MapData, u32, u64> =
            Map::PerCpuHashMap(open("filter_ipv4")?).try_into()?;
        let mut v6: PerCpuHashMap<MapData, [u8; 16], u64> =
            Map::PerCpuHashMap(open("filter_ipv6")?).try_into()?;
        // The office hosts, then the exact addresses of `prefixes`, up to n in all.
        v4.insert(u32::from_ne_bytes([198, 51, 100, 10]), flags()?, 0)?;
        v6.insert(
            "2001:db8:100::10".parse::<std::net::Ipv6Addr>()?.octets(),
            flags()?,
            0,
        )?;
        let exact = prefixes(4 * n)
            .into_iter()
            .filter(|p| p.ends_with("/32") || p.ends_with("/128"));
        for p in exact.take(n.saturating_sub(2)) {
            match p.parse::<ipnet::IpNet>()? {
                ipnet::IpNet::V4(a) => {
                    v4.insert(u32::from_ne_bytes(a.network().octets()), flags()?, 0)?
                }
                ipnet::IpNet::V6(a) => v6.insert(a.network().octets(), flags()?, 0)?,
            }
        }
        Ok(())
    }

    fn prog_id(&self) -> anyhow::Result<u32> {
        let out = sh("bpftool -j prog show")?;
        let progs: Vec<Value> = serde_json::from_str(&out)?;
        progs
            .iter()
            .find(|p| {
                p["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("xdpfilt_dny"))
            })
            .and_then(|p| p["id"].as_u64())
            .map(|id| id as u32)
            .context("xdp-filter's program not found")
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let _ = self.cmd(&format!("unload {}", self.iface));
    }
}

fn xdp_filter_test_run(rows: &mut Vec<Value>) -> anyhow::Result<()> {
    ensure_sys_bpffs()?;
    for n in SIZES.into_iter().filter(|n| *n <= XDP_FILTER_MAX) {
        let ns = Netns::new("xf")?;
        ns.ip("link add xf0 type veth peer name xf1")?;
        ns.ip("link set xf0 up")?;
        ns.ip("link set xf1 up")?;
        let filter = XdpFilter::load(&ns.name, "xf0", n)?;
        let id = filter.prog_id()?;
        for (name, data) in packets() {
            let file = std::env::temp_dir().join(format!("ewsgate-bench-{name}.bin"));
            fs::write(&file, &data)?;
            let out = sh(&format!(
                "bpftool prog run id {id} data_in {} repeat {REPEAT}",
                file.display()
            ))?;
            let _ = fs::remove_file(&file);
            let ns = parse_bpftool_ns(&out).with_context(|| format!("bpftool said: {out}"))?;
            push_test_run(rows, "xdp-filter", n, name, ns);
        }
    }
    Ok(())
}

fn parse_bpftool_ns(out: &str) -> Option<f64> {
    let after = out.split("duration (average):").nth(1)?;
    after.trim().trim_end_matches("ns").trim().parse().ok()
}

/// xdp-filter keeps its pins under /sys/fs/bpf.
fn ensure_sys_bpffs() -> anyhow::Result<()> {
    if sh("mountpoint -q /sys/fs/bpf").is_err() {
        sh("mount -t bpf bpf /sys/fs/bpf")?;
    }
    Ok(())
}

/// A sender and a target namespace joined by one veth pair.
struct FloodLab {
    sender: Netns,
    target: Netns,
    cfg: PathBuf,
    /// trafgen raises the socket buffer limits; they are put back when the lab goes.
    _sysctls: SysctlGuard,
}

impl FloodLab {
    fn new(dir: &Path) -> anyhow::Result<FloodLab> {
        let sysctls = SysctlGuard::save(&["net.core.rmem_max", "net.core.wmem_max"])?;
        let sender = Netns::new("fs")?;
        let target = Netns::new("ft")?;
        sender.ip(&format!(
            "link add vs type veth peer name vt netns {}",
            target.name
        ))?;
        sender.ip("link set vs up")?;
        target.ip("link set vt up")?;
        let links: Vec<Value> = serde_json::from_str(&target.ip("-j link show vt")?)?;
        let mac = links[0]["address"].as_str().context("vt MAC")?.to_string();
        // A fixed odd source amid the dense even /32s: the worst case for a trie.
        let cfg = dir.join("syn.cfg");
        fs::write(
            &cfg,
            format!(
                "{{ eth(da={mac}, sa=02:00:00:00:00:01, type=0x0800),\n  \
                 ipv4(saddr=203.0.113.1, daddr=192.0.2.10, ttl=64, proto=6, id=drnd()),\n  \
                 tcp(sp=drnd(), dp=443, seq=drnd(), syn) }}\n"
            ),
        )?;
        Ok(FloodLab {
            sender,
            target,
            cfg,
            _sysctls: sysctls,
        })
    }

    /// Sends FLOOD_PACKETS SYNs from one CPU and returns packets per second. veth delivers
    /// in the sender's context, so the rate is bounded by what the receiver does with them.
    fn flood(&self) -> anyhow::Result<f64> {
        let started = Instant::now();
        let out = Command::new("timeout")
            .args([
                "60",
                "ip",
                "netns",
                "exec",
                &self.sender.name,
                "trafgen",
                "-o",
                "vs",
                "-i",
            ])
            .arg(&self.cfg)
            .args(["-n", &FLOOD_PACKETS.to_string(), "-P", "1", "-C"])
            .output()?;
        let took = started.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("trafgen: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(FLOOD_PACKETS as f64 / took)
    }
}

fn flood_rows(rows: &mut Vec<Value>) -> anyhow::Result<()> {
    let n = 100_000;
    let dir = std::env::temp_dir().join(format!("ewsgate-flood-{}", tag()));
    fs::create_dir_all(&dir)?;
    let lab = FloodLab::new(&dir)?;
    let list = write_prefixes(&dir, n)?;
    let mut results: Vec<(&str, usize, Vec<f64>)> = vec![
        ("xdp-drop-floor", n, vec![]),
        ("ewsgate", n, vec![]),
        ("xdp-filter", XDP_FILTER_MAX, vec![]),
        ("nftables", n, vec![]),
    ];
    // Rounds interleave the subjects so that drift on a shared machine hits them alike.
    for _ in 0..FLOOD_ROUNDS {
        for (subject, _, rates) in results.iter_mut() {
            rates.push(match *subject {
                "xdp-drop-floor" => flood_floor(&lab)?,
                "ewsgate" => flood_ewsgate(&lab, &dir, &list)?,
                "xdp-filter" => flood_xdp_filter(&lab)?,
                _ => flood_nftables(&lab, &dir, n)?,
            });
        }
    }
    // Each round's ratio to the floor of the same round, then the median: drift between
    // rounds on a shared machine cancels out.
    let floor = results[0].2.clone();
    for (subject, prefixes, rates) in results {
        let ratios: Vec<f64> = rates.iter().zip(&floor).map(|(r, f)| r / f).collect();
        let mut r = row("flood_pps", subject, prefixes, median(&rates), "packets/s");
        r["of_floor"] = json!(median(&ratios));
        let lo = ratios.iter().copied().fold(f64::MAX, f64::min);
        let hi = ratios.iter().copied().fold(f64::MIN, f64::max);
        r["of_floor_range"] = json!([lo, hi]);
        rows.push(r);
    }
    drop(lab);
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

fn flood_floor(lab: &FloodLab) -> anyhow::Result<f64> {
    let bpffs = BpfFs::new()?;
    let mut ebpf = side_program(&bpffs.dir, "xdp_drop_floor")?;
    let prog = xdp_program(&mut ebpf, "xdp_drop_floor")?;
    let netns = format!("/run/netns/{}", lab.target.name);
    thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<()> {
            let file = fs::File::open(&netns)?;
            // SAFETY: setns on this scoped thread only.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) }
                != 0
            {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            prog.attach("vt", XdpMode::Driver)?;
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("attach thread panicked"))?
    })?;
    let rate = lab.flood()?;
    drop(ebpf); // unpinned link: detaches with the object
    Ok(rate)
}

fn flood_ewsgate(lab: &FloodLab, dir: &Path, list: &Path) -> anyhow::Result<f64> {
    let bpffs = BpfFs::new()?;
    let socket = dir.join(format!("ctl-{}.sock", tag()));
    let config = dir.join("flood.toml");
    fs::write(
        &config,
        config_text(&bpffs.dir.join("ewsgate"), &socket, list, "\"vt\""),
    )?;
    let daemon = Daemon::start(&lab.target, &config, &socket)?;
    let before = daemon.counter("drop_not_allowed")?;
    let rate = lab.flood()?;
    check_dropped("ewsgate", daemon.counter("drop_not_allowed")? - before)?;
    daemon.cli(&["detach"])?;
    Ok(rate)
}

fn flood_xdp_filter(lab: &FloodLab) -> anyhow::Result<f64> {
    ensure_sys_bpffs()?;
    let filter = XdpFilter::load(&lab.target.name, "vt", XDP_FILTER_MAX)?;
    let rate = lab.flood()?;
    check_dropped("xdp-filter", xdp_filter_drops(&filter.cmd("status")?)?)?;
    drop(filter);
    Ok(rate)
}

/// "  XDP_DROP     2000000 pkts ..." from `xdp-filter status`.
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

fn xdp_filter_drops(status: &str) -> anyhow::Result<u64> {
    status
        .lines()
        .find_map(|l| l.trim().strip_prefix("XDP_DROP"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no XDP_DROP count in: {status}"))
}

/// A peer that let the flood through would be measured doing something else entirely.
fn check_dropped(subject: &str, dropped: u64) -> anyhow::Result<()> {
    if dropped < FLOOD_PACKETS * 99 / 100 {
        bail!("{subject} dropped {dropped} of {FLOOD_PACKETS} flood packets");
    }
    Ok(())
}

/// Sum of the rule counters in `nft -j list table` output.
fn nft_counted(listing: &str) -> anyhow::Result<u64> {
    let v: Value = serde_json::from_str(listing)?;
    let items = v["nftables"].as_array().context("nft -j output")?;
    let counters = items
        .iter()
        .filter_map(|i| i["rule"]["expr"].as_array())
        .flatten()
        .filter_map(|e| e["counter"]["packets"].as_u64());
    Ok(counters.sum())
}

fn flood_nftables(lab: &FloodLab, dir: &Path, n: usize) -> anyhow::Result<f64> {
    let (mut v4, mut v6) = (String::new(), String::new());
    for p in prefixes(n) {
        let set = if p.contains(':') { &mut v6 } else { &mut v4 };
        let _ = write!(set, "{}{p}", if set.is_empty() { "" } else { ", " });
    }
    let rules = format!(
        "table netdev ewsbench {{\n\
         set allow4 {{ type ipv4_addr; flags interval; elements = {{ {v4} }} }}\n\
         set allow6 {{ type ipv6_addr; flags interval; elements = {{ {v6} }} }}\n\
         chain ingress {{ type filter hook ingress device \"vt\" priority -500; policy accept;\n\
           ip daddr 192.0.2.10 tcp dport 443 ip saddr != @allow4 counter drop\n\
           ip6 daddr 2001:db8:10::10 tcp dport 443 ip6 saddr != @allow6 counter drop\n\
         }}\n}}\n"
    );
    let file = dir.join("nft.rules");
    fs::write(&file, rules)?;
    lab.target.ip("link show vt")?;
    sh(&format!(
        "ip netns exec {} nft -f {}",
        lab.target.name,
        file.display()
    ))?;
    let rate = lab.flood()?;
    let ns = &lab.target.name;
    let listing = sh(&format!(
        "ip netns exec {ns} nft -j list table netdev ewsbench"
    ))?;
    sh(&format!(
        "ip netns exec {ns} nft delete table netdev ewsbench"
    ))?;
    check_dropped("nftables", nft_counted(&listing)?)?;
    Ok(rate)
}

fn print_table(rows: &[Value]) {
    println!("\nBPF_PROG_TEST_RUN, ns per packet, min of {TEST_RUN_ROUNDS} runs of {REPEAT} repeats; Δfloor = ewsgate - floor");
    println!(
        "{:<18} {:>8} {:>9} {:>9} {:>11} {:>9} {:>8}",
        "packet", "prefixes", "ewsgate", "floor", "xdp-filter", "lpm-trie", "Δfloor"
    );
    let get = |subject: &str, n: u64, packet: &str| {
        rows.iter()
            .find(|r| r["subject"] == subject && r["prefixes"] == n && r["packet"] == packet)
            .and_then(|r| r["value"].as_f64())
    };
    for n in SIZES {
        for (name, _) in packets() {
            let e = get("ewsgate", n as u64, name).unwrap_or(f64::NAN);
            let f = get("xdp-drop-floor", n as u64, name).unwrap_or(f64::NAN);
            let shown = |subject| {
                get(subject, n as u64, name).map_or("-".to_string(), |v| format!("{v:.0}"))
            };
            let (x, t) = (shown("xdp-filter"), shown("lpm-trie"));
            println!(
                "{name:<18} {n:>8} {e:>9.0} {f:>9.0} {x:>11} {t:>9} {:>8.0}",
                e - f
            );
        }
    }
    println!(
        "\nSYN flood over veth, one sender CPU, {FLOOD_PACKETS} packets x {FLOOD_ROUNDS} rounds (medians)"
    );
    println!(
        "{:<16} {:>9} {:>12} {:>9}  per-round range",
        "subject", "prefixes", "packets/s", "of floor"
    );
    for r in rows.iter().filter(|r| r["measure"] == "flood_pps") {
        let pct = |v: &Value| 100.0 * v.as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<16} {:>9} {:>12.0} {:>8.1}%  {:.1}-{:.1}%",
            r["subject"].as_str().unwrap_or(""),
            r["prefixes"],
            r["value"].as_f64().unwrap_or(f64::NAN),
            pct(&r["of_floor"]),
            pct(&r["of_floor_range"][0]),
            pct(&r["of_floor_range"][1])
        );
    }
    for r in rows.iter().filter(|r| r["measure"] == "reload_seconds") {
        println!(
            "\nreload at {} prefixes: {:.3} s",
            r["prefixes"],
            r["value"].as_f64().unwrap_or(f64::NAN)
        );
    }
}
