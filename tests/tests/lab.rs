//! The packet layer on a lab of network namespaces with real TCP traffic: office and
//! Salesforce hosts reach the protected listener, internet hosts do not and the counters say
//! why, blocks and allows apply at once, reloads lose no allowed connection, and a killed
//! daemon leaves the filter enforcing until a new one adopts it.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use tests::{
    lab::{reach, tag, BpfFs, Daemon, Lab, GATE_V4, GATE_V6, INTERNET, OFFICE, SALESFORCE},
    write_config,
};

const OK: Duration = Duration::from_secs(2);
/// A dropped SYN is retried after 1 s; 400 ms shows the first one went nowhere.
const DROPPED: Duration = Duration::from_millis(400);

struct Setup {
    daemon: Daemon,
    lab: Lab,
    config: PathBuf,
    dir: PathBuf,
    pin_dir: PathBuf,
    socket: PathBuf,
    _fs: BpfFs,
}

fn config_text(pin_dir: &Path, socket: &Path, sources: &str) -> String {
    config_text_mode(pin_dir, socket, sources, "native")
}

fn config_text_mode(pin_dir: &Path, socket: &Path, sources: &str, mode: &str) -> String {
    format!("{}{sources}", tests::lab_xdp_config(pin_dir, socket, mode))
}

const SOURCES: &str = r#"
[sources.offices]
cidrs = ["198.51.100.0/25", "2001:db8:100::/64"]
[sources.salesforce]
cidrs = ["198.51.100.128/25", "2001:db8:200::/64"]
"#;

fn setup() -> Setup {
    setup_mode("native")
}

fn setup_mode(mode: &str) -> Setup {
    let fs = BpfFs::new().expect("bpffs");
    let mut lab = Lab::new(&[OFFICE, SALESFORCE, INTERNET]).expect("lab");
    lab.serve(443).expect("listener 443");
    lab.serve(8080).expect("listener 8080");
    let t = tag();
    let pin_dir = fs.dir.join("ewsgate");
    let socket = std::env::temp_dir().join(format!("ewsgate-test-{t}/ctl.sock"));
    let config = write_config(&t, &config_text_mode(&pin_dir, &socket, SOURCES, mode));
    let daemon = Daemon::start(&lab.gate, &config, &socket).expect("daemon");
    let dir = config.parent().expect("config dir").to_path_buf();
    Setup {
        daemon,
        lab,
        config,
        dir,
        pin_dir,
        socket,
        _fs: fs,
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn reaches(s: &Setup, role: &str, addr: &str, port: u16) -> bool {
    reach(s.lab.client(role), addr, port, OK)
}

fn dropped(s: &Setup, role: &str, addr: &str, port: u16) -> bool {
    !reach(s.lab.client(role), addr, port, DROPPED)
}

#[test]
fn allowed_groups_pass_and_the_internet_is_dropped() {
    let s = setup();
    for addr in [GATE_V4, GATE_V6] {
        assert!(reaches(&s, "office", addr, 443), "office → {addr}:443");
        assert!(reaches(&s, "sf", addr, 443), "salesforce → {addr}:443");
    }
    let before = s.daemon.counter("drop_not_allowed").unwrap();
    assert!(
        dropped(&s, "inet", GATE_V4, 443),
        "internet → v4:443 must be dropped"
    );
    assert!(
        dropped(&s, "inet", GATE_V6, 443),
        "internet → v6:443 must be dropped"
    );
    let after = s.daemon.counter("drop_not_allowed").unwrap();
    assert!(
        after >= before + 2,
        "drop_not_allowed went {before} → {after}"
    );
    assert!(
        reaches(&s, "inet", GATE_V4, 8080),
        "an unprotected port stays reachable"
    );
    assert!(
        reaches(&s, "inet", GATE_V6, 8080),
        "an unprotected port stays reachable (v6)"
    );
    let status = s.daemon.cli(&["status"]).unwrap();
    assert!(status.contains("g-office (native)"), "{status}");
    // The control socket answers root only.
    use std::os::unix::process::CommandExt;
    let nobody = std::process::Command::new(tests::lab::ewsgate_bin())
        .args(["--socket"])
        .arg(&s.socket)
        .args(["block", "add", "198.51.100.10"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&nobody.stderr);
    assert!(
        !nobody.status.success() && said.contains("Permission denied"),
        "{said}"
    );
    assert!(
        reaches(&s, "office", GATE_V4, 443),
        "the unprivileged block did not apply"
    );
    let json: serde_json::Value =
        serde_json::from_str(&s.daemon.cli(&["status", "--json"]).unwrap()).unwrap();
    let groups = json["groups"].as_array().unwrap();
    assert!(
        groups.iter().all(|g| g[1].as_u64().unwrap() > 0),
        "every group passed packets: {json}"
    );
}

#[test]
fn generic_mode_filters_the_same() {
    let s = setup_mode("generic");
    let status = s.daemon.cli(&["status"]).unwrap();
    assert!(status.contains("g-inet (generic)"), "{status}");
    assert!(reaches(&s, "office", GATE_V4, 443));
    assert!(reaches(&s, "sf", GATE_V6, 443));
    let before = s.daemon.counter("drop_not_allowed").unwrap();
    assert!(dropped(&s, "inet", GATE_V4, 443));
    assert!(dropped(&s, "inet", GATE_V6, 443));
    assert!(s.daemon.counter("drop_not_allowed").unwrap() >= before + 2);
    assert!(reaches(&s, "inet", GATE_V4, 8080));
}

#[test]
fn block_and_allow_commands_apply_at_once() {
    let s = setup();
    assert!(reaches(&s, "office", GATE_V4, 443));
    s.daemon
        .cli(&[
            "block",
            "add",
            "198.51.100.10",
            "--ttl",
            "10m",
            "--reason",
            "test",
        ])
        .unwrap();
    let before = s.daemon.counter("drop_blocked").unwrap();
    assert!(dropped(&s, "office", GATE_V4, 443), "blocked office host");
    assert!(s.daemon.counter("drop_blocked").unwrap() > before);
    assert!(
        reaches(&s, "office", GATE_V6, 443),
        "its IPv6 address is another source"
    );
    let list = s.daemon.cli(&["block", "list"]).unwrap();
    assert!(
        list.contains("198.51.100.10/32") && list.contains("test"),
        "{list}"
    );
    s.daemon.cli(&["block", "del", "198.51.100.10"]).unwrap();
    assert!(reaches(&s, "office", GATE_V4, 443), "unblocked");

    s.daemon
        .cli(&["allow", "add", "203.0.113.0/24", "--ttl", "2s"])
        .unwrap();
    assert!(reaches(&s, "inet", GATE_V4, 443), "temporary allow");
    thread::sleep(Duration::from_millis(2500));
    assert!(dropped(&s, "inet", GATE_V4, 443), "the allow expired");

    let err = s
        .daemon
        .cli(&["block", "add", "203.0.113.5/24"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("host bits"), "{err}");
    let err = s
        .daemon
        .cli(&["block", "add", "not-an-address"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a CIDR"), "{err}");
}

/// 80,000 IPv4 /24s and 20,000 IPv6 /128s starting at `offset`, none near the lab's hosts.
fn bulk_file(path: &Path, offset: u32) {
    let mut text = String::new();
    for i in offset..offset + 80_000 {
        let a = 0x1400_0000u32 + (i << 8);
        text.push_str(&format!("{}/24\n", std::net::Ipv4Addr::from(a)));
    }
    for i in offset..offset + 20_000 {
        text.push_str(&format!(
            "2001:db8:f000::{:x}:{:x}/128\n",
            i >> 16,
            i & 0xffff
        ));
    }
    fs::write(path, text).unwrap();
}

/// Connections from `role`, one after another, until `stop`; returns (ok, failed).
fn steady(
    s: &Setup,
    role: &'static str,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(usize, usize)> {
    let ns_path = format!("/run/netns/{}", s.lab.client(role).name);
    thread::spawn(move || {
        let ok = AtomicUsize::new(0);
        let failed = AtomicUsize::new(0);
        let file = fs::File::open(&ns_path).unwrap();
        // SAFETY: setns on this thread only.
        unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        let deadline = Instant::now() + Duration::from_secs(60);
        let sa = format!("{GATE_V4}:443").parse().unwrap();
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            match std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(900)) {
                Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                Err(_) => failed.fetch_add(1, Ordering::SeqCst),
            };
            thread::sleep(Duration::from_millis(2));
        }
        (ok.into_inner(), failed.into_inner())
    })
}

#[test]
fn reload_under_traffic_loses_no_allowed_connection() {
    let s = setup();
    let stop = Arc::new(AtomicBool::new(false));
    let office = steady(&s, "office", stop.clone());
    // Alternate between configs that all keep the offices; the second drops Salesforce.
    // Each also carries a bulk group of 100,000 prefixes, half of them replaced every time.
    bulk_file(&s.dir.join("bulk-a.txt"), 0);
    bulk_file(&s.dir.join("bulk-b.txt"), 25_000);
    let without_sf = r#"
[sources.offices]
cidrs = ["198.51.100.0/25", "2001:db8:100::/64", "203.0.113.200/32"]
"#;
    for round in 0..6 {
        let sources = if round % 2 == 0 { without_sf } else { SOURCES };
        let bulk = format!(
            "[sources.bulk]\nfiles = [\"bulk-{}.txt\"]\n",
            ["a", "b"][round % 2]
        );
        let text = config_text(&s.pin_dir, &s.socket, &format!("{sources}{bulk}"));
        fs::write(&s.config, text).unwrap();
        let answer = s.daemon.cli(&["reload"]).unwrap();
        assert!(answer.contains("reloaded"), "{answer}");
        let prefixes: usize = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(prefixes > 100_000, "{answer}");
        if round % 2 == 0 {
            assert!(
                dropped(&s, "sf", GATE_V4, 443),
                "removed source right after reload (round {round})"
            );
        } else {
            assert!(
                reaches(&s, "sf", GATE_V4, 443),
                "restored source (round {round})"
            );
        }
    }
    // A config with an error is refused with its line and changes nothing.
    let broken = config_text(
        &s.pin_dir,
        &s.socket,
        "[sources.offices]\ncidrs = [\"198.51.100.0/25\",\n  \"198.51.100.999/25\"]\n",
    );
    fs::write(&s.config, &broken).unwrap();
    let err = s.daemon.cli(&["reload"]).unwrap_err().to_string();
    let line = broken.lines().position(|l| l.contains("999")).unwrap() + 1;
    assert!(err.contains(&format!("ewsgate.toml:{line}:")), "{err}");
    assert!(reaches(&s, "sf", GATE_V4, 443), "the running state stayed");
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = office.join().unwrap();
    assert!(ok > 20, "only {ok} connections made");
    assert_eq!(
        failed,
        0,
        "{failed} of {} office connections failed during reloads",
        ok + failed
    );
}

#[test]
fn config_file_change_and_sighup_reload() {
    let s = setup();
    assert!(reaches(&s, "sf", GATE_V4, 443));
    fs::write(
        &s.config,
        config_text(
            &s.pin_dir,
            &s.socket,
            "[sources.offices]\ncidrs = [\"198.51.100.0/25\"]\n",
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reach(s.lab.client("sf"), GATE_V4, 443, DROPPED) {
        assert!(
            Instant::now() < deadline,
            "the file watch did not reload within 5 s"
        );
    }
    fs::write(&s.config, config_text(&s.pin_dir, &s.socket, SOURCES)).unwrap();
    // SAFETY: signalling our own child by its PID.
    unsafe { libc::kill(s.daemon.child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !reach(s.lab.client("sf"), GATE_V4, 443, OK) {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload within 5 s"
        );
    }
}

#[test]
fn kill_9_keeps_the_filter_and_a_new_daemon_adopts_it() {
    let mut s = setup();
    s.daemon
        .cli(&[
            "block",
            "add",
            "198.51.100.20",
            "--reason",
            "kept across restarts",
        ])
        .unwrap();
    s.daemon.kill9();
    for _ in 0..3 {
        assert!(
            dropped(&s, "inet", GATE_V4, 443),
            "no daemon: internet still dropped"
        );
        assert!(
            reaches(&s, "office", GATE_V4, 443),
            "no daemon: office still passes"
        );
        assert!(
            reaches(&s, "sf", GATE_V6, 443),
            "no daemon: salesforce v6 still passes"
        );
    }
    let versioned = s
        .pin_dir
        .join(format!("v{}", filter_common::LAYOUT_VERSION));
    let links = fs::read_dir(versioned.join("links")).unwrap().count();
    assert_eq!(links, 3, "one pinned link per interface");
    let daemon = Daemon::start(&s.lab.gate, &s.config, &s.socket).expect("second daemon");
    let status = daemon.cli(&["status"]).unwrap();
    assert!(status.contains("(adopted)"), "{status}");
    assert!(
        daemon.log().contains("program replaced"),
        "{}",
        daemon.log()
    );
    let list = daemon.cli(&["block", "list"]).unwrap();
    assert!(
        list.contains("198.51.100.20/32") && list.contains("kept across restarts"),
        "{list}"
    );
    assert!(dropped(&s, "inet", GATE_V4, 443));
    assert!(reaches(&s, "office", GATE_V4, 443));
    // A clean stop (SIGTERM) leaves the filter in place as well.
    let mut daemon = daemon;
    // SAFETY: signalling our own child by its PID.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    daemon.child.wait().unwrap();
    assert!(
        dropped(&s, "inet", GATE_V4, 443),
        "after SIGTERM: internet still dropped"
    );
    assert!(
        reaches(&s, "office", GATE_V4, 443),
        "after SIGTERM: office still passes"
    );
    let daemon = Daemon::start(&s.lab.gate, &s.config, &s.socket).expect("third daemon");
    // detach removes everything: the internet reaches 443 again.
    daemon.cli(&["detach"]).unwrap();
    assert!(!versioned.exists(), "pins removed");
    assert!(
        reaches(&s, "inet", GATE_V4, 443),
        "after detach nothing filters"
    );
    drop(daemon);
}
