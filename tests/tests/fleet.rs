//! The fleet against real etcd: a three-member cluster (Debian's etcd-server 3.4) and three
//! gates, each in its own lab of network namespaces with documentation addresses only.
//! Blocks and allows made on one gate are enforced by XDP at the others; gates keep
//! enforcing while etcd is partly or wholly gone and resync by listing when it returns;
//! config revisions are applied everywhere or refused everywhere; failure counts add up
//! across gates.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    fleet::{shared_part, Etcd},
    gate::{gate4, Gate},
    lab::{Daemon, Netns},
};

const RULES: &str = r#"
[[rule]]
name = "offices"
groups = ["offices"]
action = "allow"
"#;

/// One gate of the fleet and the name of its link on the etcd side.
struct Member {
    gate: Gate,
    link: String,
}

/// A fleet of `n` gates named gate-1.., each with feedback threshold `failures`.
fn fleet(etcd: &mut Etcd, n: usize, failures: u32) -> Vec<Member> {
    fleet_with(etcd, n, failures, RULES, |_| String::new())
}

/// The same, with `rules` and each gate's extra config text from `extra(i)`.
fn fleet_with(
    etcd: &mut Etcd,
    n: usize,
    failures: u32,
    rules: &str,
    extra: impl Fn(usize) -> String,
) -> Vec<Member> {
    let mut out = Vec::new();
    for i in 1..=n {
        let fleet = format!(
            "\n{}\n[fleet]\nendpoints = [{}]\ngate = \"gate-{i}\"\ntimeout_ms = 1000\nsession_ttl_secs = 3\n",
            extra(i),
            Etcd::endpoints()
        );
        let tokens = format!(
            "metadata_urls = [\"{}\"]\n",
            ewsgate::identity::tokens::testkit::AMURL
        );
        let gate = Gate::start_edited(failures, &tokens, rules, |text, _| text + &fleet);
        let link = etcd.link(&gate.lab.gate).expect("link to etcd");
        out.push(Member { gate, link });
    }
    for m in &out {
        wait_for(Duration::from_secs(20), "the gate joins the fleet", || {
            fleet_state(&m.gate.daemon) == "connected"
        });
    }
    out
}

fn status(d: &Daemon) -> Value {
    d.cli(&["status", "--json"])
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn fleet_state(d: &Daemon) -> String {
    status(d)["fleet"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn wait_for(limit: Duration, what: &str, ok: impl FnMut() -> bool) {
    assert!(within(limit, ok), "{what}: not within {limit:?}");
}

fn within(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A TCP connection from `role` to the gate's tcp/443 opens (XDP did not drop the SYN).
fn connects(m: &Member, role: &str) -> bool {
    let to: SocketAddr = gate4();
    let ns: &Netns = m.gate.lab.client(role);
    ns.run(move || TcpStream::connect_timeout(&to, Duration::from_millis(400)).is_ok())
}

/// Waits until `role` is dropped (or let through) at every gate in `at`.
fn expect(at: &[&Member], role: &str, dropped: bool, limit: Duration, what: &str) {
    let ok = within(limit, || at.iter().all(|m| connects(m, role) != dropped));
    if !ok {
        for m in at {
            eprintln!(
                "--- {}\n{}",
                m.gate.daemon.config.display(),
                m.gate.daemon.log()
            );
        }
    }
    assert!(ok, "{what}: not within {limit:?}");
}

/// `failures` connections from `role` that send plain HTTP to the TLS port: each a failed
/// handshake, a protocol failure.
fn fail(m: &Member, role: &str, failures: u32) {
    let to = gate4();
    for _ in 0..failures {
        m.gate.lab.client(role).run(move || {
            if let Ok(mut t) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                let _ = t.write_all(b"GET / HTTP/1.0\r\n\r\n");
                let _ = t.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = std::io::Read::read(&mut t, &mut [0u8; 64]);
            }
        });
    }
}

fn blocks(m: &Member) -> Vec<String> {
    let text = m.gate.daemon.cli(&["block", "list"]).unwrap_or_default();
    let mut nets: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.contains('/') || w.contains('.'))
        .map(str::to_string)
        .collect();
    nets.sort();
    nets
}

#[test]
fn blocks_propagate_and_lapse_everywhere_also_without_etcd() {
    let mut etcd = Etcd::start().expect("etcd");
    let f = fleet(&mut etcd, 3, 5);
    let (g1, g2, g3) = (&f[0], &f[1], &f[2]);
    assert!(connects(g2, "office") && connects(g3, "office"));
    // A block typed on gate 1 drops the office at gates 2 and 3.
    g1.gate
        .daemon
        .cli(&[
            "block",
            "add",
            "198.51.100.10",
            "--ttl",
            "6",
            "--reason",
            "lab",
        ])
        .unwrap();
    let t = Instant::now();
    expect(
        &[g2, g3],
        "office",
        true,
        Duration::from_secs(5),
        "block reaches 2, 3",
    );
    println!(
        "CLI block enforced at gates 2 and 3 after {:?}",
        t.elapsed()
    );
    let list = g2.gate.daemon.cli(&["block", "list"]).unwrap();
    assert!(list.contains("fleet gate-1: lab"), "{list}");
    // Its expiry lapses everywhere.
    expect(
        &[g1, g2, g3],
        "office",
        false,
        Duration::from_secs(10),
        "expiry lapses",
    );

    // Feedback on gate 1: Salesforce's address fails five times and is dropped at 2 and 3.
    assert!(connects(g3, "sf"));
    fail(g1, "sf", 5);
    expect(
        &[g1, g2, g3],
        "sf",
        true,
        Duration::from_secs(5),
        "feedback block reaches all",
    );
    let list = g3.gate.daemon.cli(&["block", "list"]).unwrap();
    assert!(
        list.contains("198.51.100.140") && list.contains("fleet gate-1"),
        "{list}"
    );
    g1.gate
        .daemon
        .cli(&["block", "del", "198.51.100.140"])
        .unwrap();
    expect(
        &[g1, g2, g3],
        "sf",
        false,
        Duration::from_secs(5),
        "block del lifts it everywhere",
    );

    // A temporary allow typed on gate 1 lets the internet host through at 2 and 3.
    assert!(!connects(g2, "inet"));
    g1.gate
        .daemon
        .cli(&["allow", "add", "203.0.113.50", "--ttl", "60"])
        .unwrap();
    expect(
        &[g1, g2, g3],
        "inet",
        false,
        Duration::from_secs(5),
        "allow reaches all",
    );
    g1.gate
        .daemon
        .cli(&["allow", "del", "203.0.113.50"])
        .unwrap();
    expect(
        &[g1, g2, g3],
        "inet",
        true,
        Duration::from_secs(5),
        "allow del reaches all",
    );

    // Expiry while etcd is down: the gates lapse the entry on their own clock.
    g1.gate
        .daemon
        .cli(&["block", "add", "198.51.100.10", "--ttl", "5"])
        .unwrap();
    expect(
        &[g2, g3],
        "office",
        true,
        Duration::from_secs(5),
        "second block reaches 2, 3",
    );
    etcd.stop_all();
    wait_for(Duration::from_secs(10), "gates see etcd gone", || {
        f.iter()
            .all(|m| fleet_state(&m.gate.daemon) == "partitioned")
    });
    let s = status(&g2.gate.daemon);
    assert!(s["fleet"]["partitioned_since"].as_u64().is_some(), "{s}");
    let text = g2.gate.daemon.cli(&["status"]).unwrap();
    assert!(text.contains("partitioned since"), "{text}");
    expect(
        &[g1, g2, g3],
        "office",
        false,
        Duration::from_secs(10),
        "expiry without etcd",
    );
}

#[test]
fn members_and_quorum_lost_then_back() {
    let mut etcd = Etcd::start().expect("etcd");
    let f = fleet(&mut etcd, 3, 5);
    let (g1, g2, g3) = (&f[0], &f[1], &f[2]);
    // One member gone: the fleet goes on as before.
    etcd.stop_member(0);
    g1.gate
        .daemon
        .cli(&["block", "add", "198.51.100.10", "--ttl", "60"])
        .unwrap();
    expect(
        &[g2, g3],
        "office",
        true,
        Duration::from_secs(10),
        "block with 2 of 3 members",
    );
    g1.gate
        .daemon
        .cli(&["block", "del", "198.51.100.10"])
        .unwrap();
    expect(
        &[g1, g2, g3],
        "office",
        false,
        Duration::from_secs(10),
        "del with 2 of 3",
    );
    // Quorum lost: every gate keeps enforcing what it holds; a block on gate 2 holds there.
    g1.gate
        .daemon
        .cli(&["block", "add", "198.51.100.140", "--ttl", "120"])
        .unwrap();
    expect(
        &[g2, g3],
        "sf",
        true,
        Duration::from_secs(10),
        "sf block before quorum loss",
    );
    etcd.stop_member(1);
    g2.gate
        .daemon
        .cli(&["block", "add", "198.51.100.10", "--ttl", "120"])
        .unwrap();
    assert!(!connects(g2, "office"), "enforced at gate 2 at once");
    wait_for(Duration::from_secs(10), "gate 2 sees the partition", || {
        fleet_state(&g2.gate.daemon) == "partitioned"
    });
    let s = status(&g2.gate.daemon);
    assert!(
        s["fleet"]["outbox"].as_u64() >= Some(1),
        "{s}\n{}",
        g2.gate.daemon.log()
    );
    thread::sleep(Duration::from_secs(2));
    assert!(
        connects(g1, "office") && connects(g3, "office"),
        "not yet elsewhere"
    );
    for m in &f {
        assert!(!connects(m, "sf"), "held entries stay enforced");
    }
    // Quorum back: gate 2's block reaches the others.
    etcd.start_all().expect("etcd back");
    expect(
        &[g1, g3],
        "office",
        true,
        Duration::from_secs(20),
        "queued block after recovery",
    );
    wait_for(Duration::from_secs(10), "gate 2 rejoins", || {
        fleet_state(&g2.gate.daemon) == "connected"
    });
}

#[test]
fn a_partitioned_gate_is_exact_after_healing_across_a_compaction() {
    let mut etcd = Etcd::start().expect("etcd");
    let f = fleet(&mut etcd, 3, 5);
    let (g1, g3) = (&f[0], &f[2]);
    let d1 = &g1.gate.daemon;
    for net in ["203.0.113.16/28", "203.0.113.32/28", "2001:db8:300::/64"] {
        d1.cli(&["block", "add", net, "--ttl", "300"]).unwrap();
    }
    wait_for(
        Duration::from_secs(10),
        "gate 3 holds the first entries",
        || blocks(g3).len() == 3,
    );
    etcd.set_link(&g3.link, false).unwrap();
    wait_for(Duration::from_secs(10), "gate 3 partitioned", || {
        fleet_state(&g3.gate.daemon) == "partitioned"
    });
    d1.cli(&["block", "del", "203.0.113.16/28"]).unwrap();
    d1.cli(&["block", "add", "203.0.113.48/28", "--ttl", "300"])
        .unwrap();
    d1.cli(&["block", "add", "198.51.100.10", "--ttl", "300"])
        .unwrap();
    d1.cli(&["block", "del", "2001:db8:300::/64"]).unwrap();
    // Many revisions, then compaction: a watch from before it cannot resume.
    for i in 0..50 {
        etcd.ctl(&format!("put /lab/churn {i}")).unwrap();
    }
    let rev = etcd.revision().unwrap();
    etcd.ctl(&format!("compact {rev}")).unwrap();
    assert!(
        connects(g3, "office"),
        "gate 3 has not heard of the office block"
    );
    etcd.set_link(&g3.link, true).unwrap();
    wait_for(Duration::from_secs(15), "gate 3 exact again", || {
        blocks(g3) == blocks(g1)
    });
    let want = vec![
        "198.51.100.10/32".to_string(),
        "203.0.113.32/28".into(),
        "203.0.113.48/28".into(),
    ];
    assert_eq!(blocks(g3), want);
    assert!(!connects(g3, "office"));
    let s = status(&g3.gate.daemon);
    assert!(s["fleet"]["resyncs"].as_u64() >= Some(2), "{s}");
}

#[test]
fn a_gate_killed_and_restarted_without_etcd_enforces_its_pins_and_catches_up() {
    let mut etcd = Etcd::start().expect("etcd");
    let mut f = fleet(&mut etcd, 2, 5);
    f[0].gate
        .daemon
        .cli(&["block", "add", "198.51.100.140", "--ttl", "300"])
        .unwrap();
    expect(
        &[&f[1]],
        "sf",
        true,
        Duration::from_secs(10),
        "first block at gate 2",
    );
    f[1].gate.daemon.kill9();
    // Made while gate 2 is down: it must catch up later.
    f[0].gate
        .daemon
        .cli(&["block", "add", "198.51.100.10", "--ttl", "300"])
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    etcd.stop_all();
    let g2 = &mut f[1].gate;
    let socket = g2.dir.join("ctl.sock");
    let config = g2.daemon.config.clone();
    let orphans = std::mem::take(&mut g2.daemon.orphans);
    g2.daemon = Daemon::start(&g2.lab.gate, &config, &socket).expect("restart");
    g2.daemon.orphans = orphans;
    let m2 = &f[1];
    assert!(!connects(m2, "sf"), "the pinned entry is enforced");
    assert!(
        connects(m2, "office"),
        "the block made meanwhile is not known yet"
    );
    wait_for(Duration::from_secs(10), "partitioned at start", || {
        fleet_state(&m2.gate.daemon) == "partitioned"
    });
    etcd.start_all().expect("etcd back");
    expect(
        &[m2],
        "office",
        true,
        Duration::from_secs(20),
        "caught up after etcd returns",
    );
}

fn fleet_status(m: &Member) -> Value {
    let text = m
        .gate
        .daemon
        .cli(&["fleet", "status", "--json"])
        .unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

#[test]
fn a_pushed_config_runs_everywhere_and_a_bad_one_nowhere() {
    let mut etcd = Etcd::start().expect("etcd");
    let f = fleet(&mut etcd, 3, 5);
    let g1 = &f[0];
    let text = std::fs::read_to_string(&g1.gate.daemon.config).unwrap();
    // Valid: the internet host becomes an allowed group everywhere.
    let shared = shared_part(&text).replace(
        "[sources.partner]",
        "[sources.lab-internet]\ncidrs = [\"203.0.113.0/24\"]\n[sources.partner]",
    );
    let good = g1.gate.dir.join("fleet-good.toml");
    std::fs::write(&good, &shared).unwrap();
    for m in &f {
        assert!(!connects(m, "inet"));
    }
    let out = g1
        .gate
        .daemon
        .cli(&["fleet", "push", good.to_str().unwrap()])
        .unwrap();
    assert!(out.contains("revision"), "{out}");
    let mut rev = None;
    let mut seen = Value::Null;
    let ran = within(Duration::from_secs(20), || {
        seen = fleet_status(g1);
        rev = seen["revision"].as_i64();
        let gates = seen["gates"].as_array().cloned().unwrap_or_default();
        gates.len() == 3
            && gates
                .iter()
                .all(|g| g["report"]["revision"].as_i64() == rev)
    });
    assert!(
        ran,
        "every gate runs the revision: {seen}\n{}",
        f[1].gate.daemon.log()
    );
    for m in &f {
        assert!(connects(m, "inet"), "the new group is in force");
    }
    // A config that checks here but fails on the gates (a certificate that is not one):
    // refused by all, the reason shown, traffic as before.
    let bad = g1.gate.dir.join("fleet-bad.toml");
    std::fs::write(g1.gate.dir.join("not-a-cert.pem"), "not a certificate\n").unwrap();
    std::fs::write(
        &bad,
        shared
            .replace(
                "certificate = \"gate.pem\"",
                "certificate = \"not-a-cert.pem\"",
            )
            .replace("203.0.113.0/24", "203.0.113.0/25"),
    )
    .unwrap();
    g1.gate
        .daemon
        .cli(&["fleet", "push", bad.to_str().unwrap()])
        .unwrap();
    let refused = within(Duration::from_secs(20), || {
        seen = fleet_status(g1);
        let bad_rev = seen["revision"].as_i64();
        let gates = seen["gates"].as_array().cloned().unwrap_or_default();
        bad_rev != rev
            && gates.len() == 3
            && gates.iter().all(|g| {
                g["report"]["refused"][0].as_i64() == bad_rev
                    && g["report"]["revision"].as_i64() == rev
            })
    });
    assert!(refused, "every gate refuses it: {seen}");
    let why = seen["gates"][0]["report"]["refused"][1]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        why.contains("certificate") || why.contains("not-a-cert"),
        "{why}"
    );
    let table = g1.gate.daemon.cli(&["fleet", "status"]).unwrap();
    assert!(table.contains("refused revision"), "{table}");
    for m in &f {
        assert!(connects(m, "inet"), "the running config stays");
        assert!(connects(m, "office"));
    }
    // A file with [xdp] is refused before it is stored, with the reason.
    let err = g1
        .gate
        .daemon
        .cli(&["fleet", "push", g1.gate.daemon.config.to_str().unwrap()])
        .unwrap_err();
    assert!(
        err.to_string().contains("[xdp] is each gate's own"),
        "{err}"
    );
}

#[test]
fn failures_split_across_gates_reach_the_fleet_wide_threshold() {
    let mut etcd = Etcd::start().expect("etcd");
    let f = fleet(&mut etcd, 3, 10);
    let (g1, g2, g3) = (&f[0], &f[1], &f[2]);
    fail(g1, "sf", 6);
    thread::sleep(Duration::from_secs(1));
    assert!(connects(g1, "sf"), "6 of 10 at gate 1 block nothing");
    fail(g2, "sf", 3);
    thread::sleep(Duration::from_secs(1));
    assert!(connects(g2, "sf"), "9 of 10 across the fleet block nothing");
    fail(g2, "sf", 1);
    expect(
        &[g1, g2, g3],
        "sf",
        true,
        Duration::from_secs(5),
        "the tenth failure blocks everywhere",
    );
    let list = g3.gate.daemon.cli(&["block", "list"]).unwrap();
    assert!(list.contains("at other gates of the fleet"), "{list}");
}

#[test]
fn the_same_user_at_two_sites_is_a_fleet_detection() {
    use base64::Engine as _;
    let mut etcd = Etcd::start().expect("etcd");
    let rules = r#"
[[rule]]
name = "basic users"
groups = ["offices", "salesforce"]
auth = ["basic"]
action = "allow"
"#;
    let f = fleet_with(&mut etcd, 2, 5, rules, |i| {
        format!("[detections]\nsite = \"site-{i}\"\n")
    });
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice@example.org:secret")
    );
    let soap = tests::mailbox::requests::get_item(&[tests::mailbox::TOKEN_ITEM]);
    let ask = |m: &Member, role: &str| {
        let r = m
            .gate
            .https(role)
            .ews(&[("Authorization", &basic)], soap.as_bytes())
            .expect("reply");
        assert_eq!(r.status, 200, "{}", r.body);
    };
    // Alice at site 1, from the office network; gate 1 publishes where it saw her.
    ask(&f[0], "office");
    wait_for(Duration::from_secs(10), "the sighting reaches etcd", || {
        etcd.ctl("get --prefix --keys-only /ewsgate/seen/")
            .is_ok_and(|k| k.contains("/gate-1"))
    });
    let fired = |m: &Member| {
        tests::ews::audit_lines(&m.gate.audit)
            .iter()
            .any(|l| l["kind"] == "detection" && l["detection"] == "two-places")
    };
    assert!(!f.iter().any(fired), "nothing fired yet");
    // The same user minutes later at site 2, from another network: only the fleet knows.
    ask(&f[1], "sf");
    wait_for(Duration::from_secs(10), "two-places fires", || {
        f.iter().any(fired)
    });
    let line = tests::ews::audit_lines(&f[1].gate.audit)
        .into_iter()
        .chain(tests::ews::audit_lines(&f[0].gate.audit))
        .find(|l| l["detection"] == "two-places")
        .unwrap();
    assert!(
        line["user"].as_str().unwrap_or("").contains("alice"),
        "{line}"
    );
}
