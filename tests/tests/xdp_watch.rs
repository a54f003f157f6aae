//! `ewsgate watch`: drops appear live, with their source, destination, port and reason,
//! while a watcher is connected; the agent turns the events off when it leaves.

use std::{
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use tests::{
    gate::{gate4, gate6, Gate},
    lab::{ewsgate_bin, stop_pid},
};

const RULES: &str = r#"
[[rule]]
name = "salesforce-callback"
groups = ["salesforce"]
auth = ["bearer"]
token = ["callback"]
action = "allow"
"#;

/// `ewsgate watch ARGS` in the gate's namespace while `traffic` runs; its output, or a
/// failure when it does not finish within 20 s (it is then stopped by its PID).
fn watch_while(g: &Gate, args: &[&str], traffic: impl Fn()) -> String {
    let child = Command::new("ip")
        .args(["netns", "exec", &g.daemon.netns])
        .arg(ewsgate_bin())
        .arg("--config")
        .arg(&g.daemon.config)
        .arg("watch")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ewsgate watch");
    let pid = child.id();
    let waiter = thread::spawn(move || child.wait_with_output());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !waiter.is_finished() && Instant::now() < deadline {
        traffic();
    }
    if !waiter.is_finished() {
        stop_pid(pid);
    }
    let out = waiter.join().expect("waiter").expect("output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "watch {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// One TCP connect from `role` that XDP drops (its SYN and the retries).
fn knock(g: &Gate, role: &str, to: SocketAddr) {
    let _ = g
        .lab
        .client(role)
        .run(move || TcpStream::connect_timeout(&to, Duration::from_millis(200)));
}

#[test]
fn drops_appear_in_watch_with_their_reasons() {
    let g = Gate::start(0, RULES);
    let out = watch_while(&g, &["--count", "3"], || knock(&g, "inet", gate4()));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for l in &lines {
        assert_eq!(
            *l, "203.0.113.50 -> 192.0.2.10 tcp/443 drop_not_allowed",
            "{out}"
        );
    }
    // A blocked office host, over IPv6, as JSON.
    g.daemon
        .cli(&["block", "add", "2001:db8:100::10"])
        .expect("block");
    let out = watch_while(&g, &["--count", "2", "--json"], || {
        knock(&g, "office", gate6())
    });
    for l in out.lines() {
        let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
        assert_eq!(v["source"], "2001:db8:100::10", "{l}");
        assert_eq!(v["destination"], "2001:db8:10::10", "{l}");
        assert_eq!(v["port"], 443, "{l}");
        assert_eq!(v["reason"], "drop_blocked", "{l}");
    }
    assert_eq!(out.lines().count(), 2, "{out}");
    // The watcher left: the agent turned the events off and takes a new watcher.
    let status = g.daemon.cli(&["status"]).expect("status");
    assert!(status.contains("enforcing"), "{status}");
    let out = watch_while(&g, &["--count", "1", "--rate", "1"], || {
        knock(&g, "inet", gate4())
    });
    assert_eq!(out.lines().count(), 1, "{out}");
}

#[test]
fn a_rate_out_of_range_is_refused() {
    let out = Command::new(ewsgate_bin())
        .args(["--socket", "/nonexistent/ctl.sock", "watch", "--rate", "0"])
        .output()
        .expect("ewsgate");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--rate 0: from 1 to 1000"), "{err}");
}
