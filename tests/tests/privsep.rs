//! Two processes, two trust levels: the proxy that parses everything from the network runs
//! as an unprivileged user with no capabilities, the agent that owns XDP runs as root, and
//! neither one's death opens the endpoint.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use tests::{
    ews::Https,
    gate::{gate4, Gate},
    lab::{Daemon, GATE_V4},
    mailbox::{requests, TOKEN_ITEM},
};

const RULES: &str = r#"
[[rule]]
name = "salesforce-callback"
groups = ["salesforce"]
auth = ["bearer"]
token = ["callback"]
action = "allow"
"#;

fn status_field(pid: u32, name: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// One GetItem from Salesforce; 0 when no answer came.
fn get_item(g: &Gate) -> u16 {
    let auth = format!("Bearer {}", g.pki.token(|c| c));
    let soap = requests::get_item(&[TOKEN_ITEM]);
    Https::connect(g.lab.client("sf"), gate4(), &g.pki, None)
        .and_then(|mut c| c.ews(&[("Authorization", &auth)], soap.as_bytes()))
        .map_or(0, |r| r.status)
}

/// Whether a TCP connect from `role` to the gate's 443 goes unanswered (dropped by XDP).
fn dropped(g: &Gate, role: &str) -> bool {
    let to = gate4();
    g.lab
        .client(role)
        .run(move || TcpStream::connect_timeout(&to, Duration::from_millis(300)))
        .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {limit:?}");
}

#[test]
fn the_proxy_runs_unprivileged_with_no_capabilities() {
    let g = Gate::start(0, RULES);
    let pid = g.daemon.proxy_pid().expect("the agent started a proxy");
    assert_eq!(get_item(&g), 200);
    let uids: Vec<u32> = status_field(pid, "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert_eq!(uids.len(), 4);
    assert!(uids.iter().all(|&u| u != 0), "uids {uids:?}");
    let gids = status_field(pid, "Gid");
    assert!(gids.split_whitespace().all(|g| g != "0"), "gids {gids}");
    assert_eq!(status_field(pid, "Groups"), "", "no supplementary groups");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status_field(pid, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // The agent stays root: it owns the maps.
    assert_eq!(
        status_field(g.daemon.child.id(), "Uid")
            .split_whitespace()
            .next(),
        Some("0")
    );
    // The proxy holds no BPF map or program: every descriptor it has is a socket, a pipe,
    // an anonymous inode of its runtime, or its audit file.
    for fd in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let target = fs::read_link(fd.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        assert!(!t.contains("bpf-map") && !t.contains("bpf-prog"), "{t}");
    }
}

#[test]
fn killing_the_proxy_under_load_keeps_xdp_protection_and_the_agent_brings_it_back() {
    let g = Arc::new(Gate::start(0, RULES));
    let first = g.daemon.proxy_pid().expect("a proxy");
    assert_eq!(get_item(&g), 200);
    let before = g.daemon.counter("drop_not_allowed").unwrap();
    // Steady load from Salesforce, bounded in time and count.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let load = {
        let (g, stop, ok) = (g.clone(), stop.clone(), ok.clone());
        thread::spawn(move || {
            let started = Instant::now();
            for _ in 0..5000 {
                if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(30) {
                    break;
                }
                if get_item(&g) == 200 {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    wait_for("some load served", Duration::from_secs(10), || {
        ok.load(Ordering::SeqCst) > 5
    });
    // SAFETY: a process this test's agent started, by its PID.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    let served_at_kill = ok.load(Ordering::SeqCst);
    // While no proxy runs, XDP still drops the internet.
    for _ in 0..3 {
        assert!(dropped(&g, "inet"), "the internet reached the gate");
    }
    assert!(g.daemon.counter("drop_not_allowed").unwrap() > before);
    // The agent starts a new proxy, and Salesforce is served again.
    let mut second = None;
    wait_for("a new proxy", Duration::from_secs(15), || {
        second = g.daemon.proxy_pid().filter(|p| *p != first);
        second.is_some()
    });
    wait_for(
        "requests served after the restart",
        Duration::from_secs(15),
        || ok.load(Ordering::SeqCst) > served_at_kill + 5,
    );
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    assert!(dropped(&g, "inet"));
    assert!(
        g.daemon.log().contains("the proxy exited"),
        "{}",
        g.daemon.log()
    );
}

#[test]
fn a_proxy_outlives_its_agent_and_the_next_agent_adopts_it() {
    let mut g = Gate::start(0, RULES);
    let proxy = g.daemon.proxy_pid().expect("a proxy");
    g.daemon.kill9();
    // The proxy keeps serving on its last policy, and XDP keeps dropping.
    assert_eq!(get_item(&g), 200);
    assert!(dropped(&g, "inet"));
    assert!(Path::new(&format!("/proc/{proxy}")).exists());
    // A new agent adopts it: same process, and a reload through the new agent reaches it.
    let orphans = std::mem::take(&mut g.daemon.orphans);
    let config = g.dir.join("ewsgate.toml");
    let socket = g.dir.join("ctl.sock");
    let mut next = Daemon::start(&g.lab.gate, &config, &socket).expect("a new agent");
    next.orphans = orphans;
    g.daemon = next;
    wait_for("adoption", Duration::from_secs(15), || {
        g.daemon.log().contains("adopted a running proxy")
    });
    let text = fs::read_to_string(&config).unwrap();
    fs::write(
        &config,
        text.replace("name = \"salesforce-callback\"", "name = \"renamed\"")
            .replace("action = \"allow\"", "action = \"deny\""),
    )
    .unwrap();
    g.daemon.cli(&["reload"]).expect("reload");
    wait_for(
        "the new policy in the adopted proxy",
        Duration::from_secs(10),
        || get_item(&g) == 403,
    );
    assert!(
        Path::new(&format!("/proc/{proxy}")).exists(),
        "the same proxy"
    );
}

/// Runs a small Python client as the proxy's user against the proxy socket.
fn as_proxy_user(socket: &Path, payload_hex: &str) {
    let script = format!(
        "import socket,time\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\ns.sendall(bytes.fromhex({payload_hex:?}))\ntime.sleep(1)\n",
        socket.to_string_lossy()
    );
    let out = Command::new("setpriv")
        .args([
            "--reuid=ewsgate",
            "--regid=ewsgate",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
        ])
        .arg(script)
        .output()
        .expect("setpriv and python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn frame(json: &str) -> String {
    let mut f = (json.len() as u32).to_be_bytes().to_vec();
    f.push(0);
    f.extend_from_slice(json.as_bytes());
    f.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_proxy_that_sends_the_agent_garbage_is_refused_and_logged() {
    let g = Gate::start(0, RULES);
    assert_eq!(get_item(&g), 200);
    let socket = g.dir.join("proxy.sock");
    // Not the proxy's user: refused before a byte is read.
    let mut root = UnixStream::connect(&socket).unwrap();
    let _ = root.write_all(b"hello");
    let mut buf = [0u8; 8];
    let _ = root.set_read_timeout(Some(Duration::from_secs(2)));
    assert!(matches!(root.read(&mut buf), Ok(0) | Err(_)));
    wait_for("the refusal of a root peer", Duration::from_secs(5), || {
        g.daemon.log().contains("not the proxy's user")
    });
    // The proxy's user, but bytes that are no message, a frame that lies about its size, and
    // a well-formed message the protocol does not allow.
    as_proxy_user(&socket, "00000005007b7b7b7b7b");
    as_proxy_user(&socket, "ffffffff00");
    // A well-formed hello while the real proxy's session is open: a second proxy.
    as_proxy_user(
        &socket,
        &frame(r#"{"type":"hello","listening":[],"policy":null}"#),
    );
    wait_for("garbage refused", Duration::from_secs(10), || {
        let log = g.daemon.log();
        log.contains("bad message") && log.contains("over the limit")
    });
    assert!(g.daemon.log().contains("refused a second proxy"));
    // The real proxy was not disturbed, and nothing was blocked.
    assert_eq!(get_item(&g), 200);
    let blocked = g.daemon.cli(&["block", "list"]).unwrap();
    assert!(!blocked.contains(GATE_V4), "{blocked}");
}
