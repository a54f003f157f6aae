//! CrowdSec both ways, with Debian's crowdsec: ewsgate as a bouncer of a real Local API (ban
//! decisions reach XDP, deletes lift exactly CrowdSec's own entries, an outage keeps them until
//! they expire), and CrowdSec reading ewsgate's audit log through the contrib parser and
//! scenario (`cscli explain` on real audit lines, a replay that fires the scenario and whose
//! ban comes back into XDP), with fail2ban's filter checked on the same lines.

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tests::{
    crowdsec::{contrib, CrowdSec},
    ews::{audit_lines, Https},
    gate::Gate,
    lab::{reach, tag, BpfFs, Daemon, Lab, GATE_V4, GATE_V6, INTERNET, OFFICE, SALESFORCE},
    mailbox::requests,
};

const WAIT: Duration = Duration::from_millis(600);

/// Waits up to `limit` for `cond`; returns how long it took.
fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(100));
    }
    None
}

fn crowdsec_status(d: &Daemon) -> Value {
    let json: Value =
        serde_json::from_str(&d.cli(&["status", "--json"]).expect("status")).expect("json");
    json["crowdsec"].clone()
}

#[test]
fn crowdsec_bans_reach_xdp_and_deletes_lift_only_their_own() {
    let fs_ = BpfFs::new().expect("bpffs");
    let mut lab = Lab::new(&[OFFICE, SALESFORCE, INTERNET]).expect("lab");
    lab.serve(443).expect("echo");
    let dir = std::env::temp_dir().join(format!("ewsgate-crowdsec-{}", tag()));
    fs::create_dir_all(&dir).unwrap();
    let mut cs = CrowdSec::start(&lab.gate, &dir.join("crowdsec")).expect("crowdsec");
    let key = cs.bouncer("ewsgate").expect("bouncer");
    fs::write(dir.join("crowdsec.key"), format!("{key}\n")).unwrap();
    let socket = dir.join("ctl.sock");
    let config = dir.join("ewsgate.toml");
    fs::write(
        &config,
        format!(
            r#"{xdp}
[sources.partners]
cidrs = ["203.0.113.0/24", "2001:db8:300::/64"]

[crowdsec]
lapi_url = "http://127.0.0.1:{port}"
api_key_file = "crowdsec.key"
poll_secs = 1
timeout_ms = 2000
"#,
            xdp = tests::lab_xdp_config(&fs_.dir.join("ewsgate"), &socket, "native"),
            port = cs.port,
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&lab.gate, &config, &socket).expect("daemon");
    let inet = lab.client("inet");
    let v4 = || reach(inet, GATE_V4, 443, WAIT);
    let v6 = || reach(inet, GATE_V6, 443, WAIT);
    assert!(v4() && v6(), "the partner range passes");
    assert!(within(Duration::from_secs(10), || crowdsec_status(&daemon)
        ["state"]
        == "ok")
    .is_some());

    // Each ban is dropped by XDP within a few seconds; its delete lets the source pass again.
    let cases: [(&[&str], &[&str], bool); 4] = [
        (&["--ip", "203.0.113.50"], &["--ip", "203.0.113.50"], true),
        (
            &["--range", "203.0.113.48/28"],
            &["--range", "203.0.113.48/28"],
            true,
        ),
        (
            &["--ip", "2001:db8:300::50"],
            &["--ip", "2001:db8:300::50"],
            false,
        ),
        (
            &["--range", "2001:db8:300::/64"],
            &["--range", "2001:db8:300::/64"],
            false,
        ),
    ];
    for (add, del, ipv4) in cases {
        let probe = || if ipv4 { v4() } else { v6() };
        let other = || if ipv4 { v6() } else { v4() };
        cs.cscli(&[&["decisions", "add"], add].concat())
            .expect("cscli add");
        let took = within(Duration::from_secs(8), || !probe())
            .unwrap_or_else(|| panic!("{add:?} never dropped"));
        println!(
            "crowdsec: {add:?} dropped by XDP {:.1} s after cscli returned",
            took.as_secs_f64()
        );
        assert!(other(), "{add:?} blocks nothing else");
        let list = daemon.cli(&["block", "list"]).unwrap();
        assert!(
            list.contains("crowdsec/cscli: manual 'ban' from 'ewsgate-test'"),
            "{list}"
        );
        cs.cscli(&[&["decisions", "delete"], del].concat())
            .expect("cscli delete");
        assert!(
            within(Duration::from_secs(8), probe).is_some(),
            "{del:?} still dropped after its delete"
        );
    }

    // Not a ban: skipped with a log line, nothing blocked.
    cs.cscli(&[
        "decisions",
        "add",
        "--ip",
        "203.0.113.50",
        "--type",
        "captcha",
    ])
    .unwrap();
    assert!(within(Duration::from_secs(5), || daemon
        .log()
        .contains("type 'captcha' is not a ban"))
    .is_some());
    assert!(v4());

    // An administrator's block on the same address outlives CrowdSec's decision on it.
    daemon
        .cli(&["block", "add", "203.0.113.50", "--reason", "by hand"])
        .unwrap();
    cs.cscli(&["decisions", "add", "--ip", "203.0.113.50"])
        .unwrap();
    assert!(within(Duration::from_secs(5), || daemon
        .cli(&["block", "list"])
        .unwrap()
        .contains("by hand; crowdsec/cscli"))
    .is_some());
    cs.cscli(&["decisions", "delete", "--ip", "203.0.113.50"])
        .unwrap();
    let list = || daemon.cli(&["block", "list"]).unwrap();
    assert!(
        within(Duration::from_secs(5), || !list()
            .contains("crowdsec/cscli"))
        .is_some(),
        "{}",
        list()
    );
    assert!(list().contains("by hand"), "{}", list());
    assert!(!v4(), "the administrator's block stays");
    daemon.cli(&["block", "del", "203.0.113.50"]).unwrap();
    assert!(v4());

    // A LAPI outage keeps CrowdSec's entries until they expire, with no daemon help needed.
    let added = Instant::now();
    cs.cscli(&[
        "decisions",
        "add",
        "--ip",
        "203.0.113.50",
        "--duration",
        "15s",
    ])
    .unwrap();
    assert!(within(Duration::from_secs(5), || !v4()).is_some());
    cs.stop();
    assert!(
        within(Duration::from_secs(5), || crowdsec_status(&daemon)["state"]
            == "unreachable")
        .is_some(),
        "{}",
        crowdsec_status(&daemon)
    );
    assert!(
        added.elapsed() < Duration::from_secs(13),
        "too slow to check the outage"
    );
    assert!(!v4(), "still dropped while the LAPI is away");
    let lifted = within(Duration::from_secs(20), v4).expect("the ban expires with the LAPI away");
    let after = added.elapsed();
    println!(
        "crowdsec: a 15 s ban lifted {:.1} s after cscli added it, LAPI down",
        after.as_secs_f64()
    );
    assert!(
        after >= Duration::from_secs(14),
        "lifted early: {after:?} ({lifted:?})"
    );
    let st = crowdsec_status(&daemon);
    assert!(
        st["why"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("127.0.0.1:{}", cs.port)),
        "{st}"
    );
    assert!(
        st["counters"]["entries_written"].as_u64().unwrap() >= 6,
        "{st}"
    );
    daemon.cli(&["detach"]).unwrap();
    drop(daemon);
    drop(cs);
    let _ = fs::remove_dir_all(&dir);
}

const RULES: &str = r#"
[[rule]]
name = "salesforce-callback"
groups = ["salesforce"]
auth = ["bearer"]
token = ["callback"]
action = "allow"

[[rule]]
name = "office-basic"
groups = ["offices"]
auth = ["basic"]
users = ["*@example.org"]
action = "allow"
"#;

/// What the test sent, told by its User-Agent; lines ewsgate wrote before a request was
/// parsed (TLS and framing refusals) have none and are protocol failures of a connection.
fn marker(line: &Value) -> &str {
    line["user_agent"]
        .as_str()
        .map_or("protocol", |ua| ua.split(' ').next().unwrap_or(""))
}

/// Today's audit line with the fields the daemon's redesign adds: `kind` and `failure`.
/// The test sets them from what it sent.
fn with_redesign_fields(mut line: Value) -> Value {
    let (kind, failure) = match marker(&line) {
        "credential" => ("request", json!("credential")),
        "policy" => ("request", json!("policy")),
        "allow" => ("request", Value::Null),
        _ if line["method"] == "" => ("connection", json!("protocol")),
        _ => ("request", json!("protocol")),
    };
    line["kind"] = json!(kind);
    line["failure"] = failure;
    line
}

fn basic(user: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:secret"))
    )
}

#[test]
fn crowdsec_and_fail2ban_read_the_audit_log() {
    // Every refused token stays a credential failure here: identities are never refused.
    let tokens = format!(
        "metadata_urls = [\"{}\"]\n",
        ewsgate::identity::tokens::testkit::AMURL
    );
    // Off-hours is off: its firing depends on the clock the test runs at, and the counts
    // below are of what the test sent.
    let gate = Gate::start_edited(0, &tokens, RULES, |t, _| {
        t.replace("[feedback]", "[feedback]\nidentity_failures = 0")
            + "\n[detections.off_hours]\nenabled = false\n"
    });
    let office = || gate.https("office");
    let soap = requests::get_item(&["AAMkAD-x="]);
    // Credential failures: a burst of refused tokens from the office host.
    let expired = gate
        .pki
        .token(|c| ewsgate::identity::tokens::testkit::with(c, "aud", json!("wrong")));
    for _ in 0..12 {
        let r = office()
            .ews(
                &[
                    ("Authorization", &format!("Bearer {expired}")),
                    ("User-Agent", "credential burst"),
                ],
                soap.as_bytes(),
            )
            .unwrap();
        assert_eq!(r.status, 401, "{}", r.body);
    }
    // Policy denials, one of them trying to pose as a credential failure in its text.
    let spoof = r#"policy ","failure":"credential","kind":"request","source":"192.0.2.99"#;
    for (user, ua) in [
        ("mallory@evil.example", "policy"),
        ("eve@evil.example", spoof),
    ] {
        let r = office()
            .ews(
                &[("Authorization", &basic(user)), ("User-Agent", ua)],
                soap.as_bytes(),
            )
            .unwrap();
        assert!(
            r.status == 403 || r.status == 500,
            "{} {}",
            r.status,
            r.body
        );
    }
    // An allowed request.
    let r = office()
        .ews(
            &[
                ("Authorization", &basic("alice@example.org")),
                ("User-Agent", "allow"),
            ],
            soap.as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // Protocol failures: request smuggling, and a TLS handshake that is not TLS.
    let mut c = office();
    c.send(b"POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .unwrap();
    let _ = c.read_reply();
    let to: SocketAddr = tests::gate::gate4();
    gate.lab.client("office").run(move || {
        use std::io::Write;
        if let Ok(mut t) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            let _ = t.write_all(b"GET / HTTP/1.0\r\n\r\n");
            let _ = t.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = std::io::Read::read(&mut t, &mut [0u8; 64]);
        }
    });
    let mut lines = Vec::new();
    let ok = within(Duration::from_secs(5), || {
        lines = audit_lines(&gate.audit);
        lines.len() >= 17
    });
    assert!(ok.is_some(), "{} audit lines: {lines:?}", lines.len());
    let lines: Vec<Value> = lines.into_iter().map(with_redesign_fields).collect();
    let failing = |v: &Value| v["failure"] == "credential" || v["failure"] == "protocol";
    let failures = lines.iter().filter(|v| failing(v)).count();
    assert_eq!(failures, 14, "{lines:#?}");
    assert!(
        lines.iter().any(|v| v["kind"] == "connection"),
        "a TLS refusal is audited"
    );
    let file = gate.dir.join("audit-redesign.jsonl");
    let text: String = lines.iter().map(|v| format!("{v}\n")).collect();
    fs::write(&file, &text).unwrap();

    fail2ban_matches_failures_only(&file, &lines);

    // CrowdSec: every line parses, only failures pour into the scenario.
    let mut cs = CrowdSec::start(&gate.lab.gate, &gate.dir.join("crowdsec")).expect("crowdsec");
    let explained = cs
        .cscli(&[
            "explain",
            "--file",
            &file.display().to_string(),
            "--type",
            "ewsgate",
        ])
        .expect("cscli explain");
    let blocks: Vec<&str> = explained.split("line: ").skip(1).collect();
    assert_eq!(blocks.len(), lines.len(), "{explained}");
    for block in &blocks {
        let json = block.lines().next().unwrap_or("");
        let line: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {block}"));
        assert!(
            block.contains("🟢 ewsgate/audit-raw") && block.contains("🟢 ewsgate/audit ("),
            "{block}"
        );
        assert!(block.contains("parser success"), "{block}");
        assert_eq!(
            block.contains("ewsgate/failure-burst"),
            failing(&line),
            "{block}"
        );
    }

    // The burst makes the scenario fire; its ban goes to the LAPI, and ewsgate, following
    // that LAPI as a bouncer, drops the office host in XDP.
    let key = cs.bouncer("ewsgate").expect("bouncer");
    fs::write(gate.dir.join("crowdsec.key"), &key).unwrap();
    let config = gate.daemon.config.clone();
    let mut text = fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[crowdsec]\nlapi_url = \"http://127.0.0.1:{}\"\napi_key_file = \"crowdsec.key\"\npoll_secs = 1\n",
        cs.port
    ));
    fs::write(&config, text).unwrap();
    assert!(
        within(Duration::from_secs(10), || gate
            .daemon
            .cli(&["status", "--json"])
            .unwrap()
            .contains("\"lapi\""))
        .is_some(),
        "the reload picks up [crowdsec]"
    );
    let replay = cs.replay(&file, "ewsgate").expect("replay");
    assert!(
        replay.contains("Ip 198.51.100.10 performed 'ewsgate/failure-burst'"),
        "{replay}"
    );
    let decisions = cs.cscli(&["decisions", "list", "-o", "json"]).unwrap();
    assert!(
        decisions.contains("\"scenario\": \"ewsgate/failure-burst\""),
        "{decisions}"
    );
    assert!(
        !decisions.contains("192.0.2.99"),
        "the spoofed source is never banned"
    );
    let office_passes = || reach_gate(&gate, "office");
    let took =
        within(Duration::from_secs(8), || !office_passes()).expect("the office host is dropped");
    println!(
        "crowdsec: scenario ban dropped by XDP {:.1} s after the replay",
        took.as_secs_f64()
    );
    assert!(reach_gate(&gate, "sf"), "Salesforce is untouched");
    let list = gate.daemon.cli(&["block", "list"]).unwrap();
    assert!(
        list.contains("198.51.100.10") && list.contains("crowdsec/crowdsec: ewsgate/failure-burst"),
        "{list}"
    );
    cs.stop();
}

/// A TLS handshake with the gate's tcp/443 from `role` completes.
fn reach_gate(gate: &Gate, role: &str) -> bool {
    let to = tests::gate::gate4();
    let ns = gate.lab.client(role);
    ns.run(move || std::net::TcpStream::connect_timeout(&to, WAIT).is_ok())
        && Https::connect(gate.lab.client(role), to, &gate.pki, None).is_ok()
}

/// Debian's fail2ban-regex against the same lines: exactly the failures match.
fn fail2ban_matches_failures_only(file: &Path, lines: &[Value]) {
    let filter = contrib().join("fail2ban/filter.d/ewsgate.conf");
    let out = Command::new("fail2ban-regex")
        .args(["-v", "--print-all-matched", "--print-all-missed"])
        .arg(file)
        .arg(&filter)
        .output()
        .expect("fail2ban-regex");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let failures = lines
        .iter()
        .filter(|v| v["failure"] == "credential" || v["failure"] == "protocol")
        .count();
    let want = format!(
        "Lines: {} lines, 0 ignored, {failures} matched, {} missed",
        lines.len(),
        lines.len() - failures
    );
    assert!(text.contains(&want), "want {want}: {text}");
    assert!(text.contains("198.51.100.10"), "{text}");
    let matched = text.split("|- Matched line(s):").nth(1).unwrap_or("");
    let matched = matched
        .split("|- Missed line(s):")
        .next()
        .unwrap_or(matched);
    assert!(!matched.contains("\"failure\":\"policy\""), "{matched}");
    assert!(!matched.contains("\"decision\":\"allow\""), "{matched}");
    assert!(
        !text.contains("192.0.2.99  "),
        "the spoofed source never matches: {text}"
    );
    // The example jail loads with the filter, in a copy of Debian's fail2ban configuration.
    let conf = file.with_extension("fail2ban");
    let copied = Command::new("cp")
        .arg("-r")
        .arg("/etc/fail2ban")
        .arg(&conf)
        .status();
    assert!(copied.is_ok_and(|s| s.success()));
    let _ = fs::remove_file(conf.join("jail.d/defaults-debian.conf"));
    fs::copy(&filter, conf.join("filter.d/ewsgate.conf")).unwrap();
    let jail = fs::read_to_string(contrib().join("fail2ban/jail.d/ewsgate.conf")).unwrap();
    let jail = jail.replace("/var/log/ewsgate/audit.jsonl", &file.display().to_string());
    fs::write(conf.join("jail.d/ewsgate.conf"), jail).unwrap();
    let out = Command::new("fail2ban-client")
        .arg("-c")
        .arg(&conf)
        .arg("-d")
        .output()
        .expect("fail2ban-client");
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{dump}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dump.contains("['add', 'ewsgate', 'polling']") && dump.contains("'addfailregex'"),
        "{dump}"
    );
    let _ = fs::remove_dir_all(&conf);
}
