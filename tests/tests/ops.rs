//! Operations, driven with the tools operators run: the HTML report rendered by headless
//! Chromium, the file sink under a real logrotate, syslog frames read by receivers this test
//! runs (parsed strictly as RFC 5424 and RFC 6587), a real systemd-journald read back with
//! journalctl, and the Sigma rules loaded and converted by pySigma.

use std::{
    collections::BTreeMap,
    io::Read,
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use ewsgate::{
    model::ops::{AuditSettings, DetectionKind, SinkSpec, Transport},
    ops::sinks::Sinks,
};
use serde_json::{json, Value};
use tests::lab::ewsgate_bin;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ewsgate-ops-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Kills and reaps a child process (by its own PID) when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------
// The report in a real browser

/// The attributes of every element named `tag` in serialised HTML.
fn elements(html: &str, tag: &str) -> Vec<BTreeMap<String, String>> {
    let open = format!("<{tag} ");
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find(&open) {
        rest = &rest[i + open.len()..];
        let end = rest.find('>').unwrap_or(rest.len());
        out.push(attributes(&rest[..end]));
        rest = &rest[end..];
    }
    out
}

fn attributes(mut s: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    loop {
        s = s.trim_start();
        let Some(eq) = s.find("=\"") else { break };
        let name = s[..eq].trim().to_string();
        let rest = &s[eq + 2..];
        let Some(close) = rest.find('"') else { break };
        m.insert(name, unescape(&rest[..close]));
        s = &rest[close + 1..];
    }
    m
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn count_of(els: &[BTreeMap<String, String>], key: &str, value: &str, attr: &str) -> u64 {
    let found: Vec<u64> = els
        .iter()
        .filter(|e| e.get(key).map(String::as_str) == Some(value))
        .filter_map(|e| e.get(attr)?.parse().ok())
        .collect();
    assert_eq!(found.len(), 1, "{key}={value} {attr}: {found:?}");
    found[0]
}

/// Renders `file` in headless Chromium and returns the DOM it built.
fn chromium_dom(file: &Path, profile: &Path) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", file.display()))
        .stdin(Stdio::null())
        .output()
        .expect("chromium (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_html_report_renders_in_chromium_with_the_counts_written() {
    let dir = temp_dir("report");
    let audit = dir.join("audit.jsonl");
    let hostile = "<img src=x onerror=alert(1)>\"'&";
    let groups = ["offices", "salesforce"];
    let mut text = String::new();
    let mut decisions: BTreeMap<&str, u64> = BTreeMap::new();
    let mut by_group: BTreeMap<&str, u64> = BTreeMap::new();
    let mut by_data: BTreeMap<&str, u64> = BTreeMap::new();
    let mut refused_by_source: BTreeMap<String, u64> = BTreeMap::new();
    let t0 = 1_795_435_200i64; // 2026-11-23T12:00:00Z
    let n = 1500;
    for i in 0..n {
        let decision = match i % 10 {
            0..=6 => "allow",
            7 | 8 => "deny",
            _ => "would-deny",
        };
        let group = if i % 3 == 2 {
            None
        } else {
            Some(groups[i % 3])
        };
        let data = ["calendar", "contacts", "email"][i % 3];
        let source = format!("198.51.100.{}", i % 13);
        let time = ewsgate::ops::report::format_time(t0 + i as i64 * 37);
        let rec = json!({
            "time": time, "kind": "request", "source": source, "source_port": 40000,
            "source_group": group, "user": format!("user{}@example.org", i % 7),
            "auth": "basic", "operation": "FindItem", "data": data, "decision": decision,
            "failure": if decision == "allow" { None } else { Some("policy") },
            "reason": if decision == "allow" { "forwarded" } else { "no rule allows FindItem on email" },
            "status": 200, "connection": i,
        });
        text.push_str(&rec.to_string());
        text.push('\n');
        *decisions.entry(decision).or_default() += 1;
        *by_group.entry(group.unwrap_or("(none)")).or_default() += 1;
        *by_data.entry(data).or_default() += 1;
        if decision == "deny" {
            *refused_by_source.entry(source).or_default() += 1;
        }
    }
    // One refused request from a user whose name is markup, and some detections.
    text.push_str(
        &json!({"time": "2026-11-23T23:00:00Z", "kind": "request", "source": "203.0.113.66",
                "user": hostile, "auth": "basic", "decision": "deny", "failure": "credential",
                "reason": "upstream refused the credentials"})
        .to_string(),
    );
    text.push('\n');
    *decisions.entry("deny").or_default() += 1;
    *by_group.entry("(none)").or_default() += 1;
    let detections = [("password-spray", 3u64), ("token-reuse", 2)];
    for (name, count) in detections {
        for k in 0..count {
            text.push_str(
                &json!({"time": ewsgate::ops::report::format_time(t0 + 60 * k as i64),
                        "kind": "detection", "detection": name, "severity": "high",
                        "subject": "source 203.0.113.66", "action": "alert",
                        "evidence": {"users": 10}})
                .to_string(),
            );
            text.push('\n');
        }
    }
    // Garbage: not JSON, truncated JSON, a wrong type, and no time.
    text.push_str("-- rotated --\n{\"time\":\"2026-11-23T12:00:00Z\",\"decis\n{\"time\":\"2026-11-23T12:00:00Z\",\"decision\":7}\n{\"decision\":\"allow\"}\n");
    std::fs::write(&audit, &text).unwrap();

    let html = dir.join("report.html");
    let out = Command::new(ewsgate_bin())
        .arg("report")
        .arg(&audit)
        .arg("--html")
        .arg(&html)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["garbage"]["lines"], 4);

    let dom = chromium_dom(&html, &dir.join("profile"));
    // The rendered page built no script or image element out of the user name.
    assert!(
        !dom.contains("<script") && !dom.contains("<img"),
        "markup got through"
    );
    let tds = elements(&dom, "td");
    let rows = elements(&dom, "tr");
    let rects = elements(&dom, "rect");
    let legend = elements(&dom, "li");
    let requests = n as u64 + 1;
    assert_eq!(count_of(&tds, "id", "requests", "data-count"), requests);
    assert_eq!(count_of(&tds, "id", "garbage-lines", "data-count"), 4);
    assert_eq!(count_of(&tds, "id", "detections-total", "data-count"), 5);
    for (d, want) in &decisions {
        assert_eq!(
            count_of(&tds, "id", &format!("decision-{d}"), "data-count"),
            *want,
            "{d}"
        );
    }
    for (name, want) in detections {
        assert_eq!(count_of(&rows, "data-detection", name, "data-count"), want);
    }
    // Every chart's bars add up, per series, to what was written.
    let bars = |series: &str| -> u64 {
        rects
            .iter()
            .filter(|r| r["data-chart"] == "verdict" && r["data-series"] == series)
            .map(|r| r["data-count"].parse::<u64>().unwrap())
            .sum()
    };
    let chart_total = |chart: &str, series: &str| {
        let of_chart: Vec<_> = legend
            .iter()
            .filter(|l| l.get("data-chart").map(String::as_str) == Some(chart))
            .cloned()
            .collect();
        count_of(&of_chart, "data-series", series, "data-total")
    };
    for (d, want) in &decisions {
        assert_eq!(chart_total("verdict", d), *want, "legend {d}");
    }
    let verdict_bars: u64 = decisions.keys().map(|d| bars(d)).sum();
    assert_eq!(verdict_bars, requests);
    for (g, want) in &by_group {
        assert_eq!(chart_total("group", g), *want, "group {g}");
    }
    for (t, want) in &by_data {
        assert_eq!(chart_total("data", t), *want, "data {t}");
    }
    // The group and data charts together: every request once per chart (one type each).
    let all_bars: u64 = rects
        .iter()
        .map(|r| r["data-count"].parse::<u64>().unwrap())
        .sum();
    assert_eq!(all_bars, 3 * requests);
    // Top refused sources and users, the hostile name among them as text.
    let (worst, worst_n) = refused_by_source
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .unwrap();
    assert_eq!(
        count_of(&rows, "data-source", worst, "data-refused"),
        *worst_n
    );
    assert_eq!(count_of(&rows, "data-user", hostile, "data-refused"), 1);
    assert!(
        dom.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "the name is shown as text"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------
// The file sink under logrotate

#[test]
fn logrotate_create_rotation_loses_and_duplicates_no_line() {
    let dir = temp_dir("logrotate");
    let log = dir.join("audit.jsonl");
    let conf = dir.join("logrotate.conf");
    std::fs::write(
        &conf,
        format!(
            "{} {{\n  rotate 100\n  create 0640 root root\n  missingok\n}}\n",
            log.display()
        ),
    )
    .unwrap();
    let sinks = Arc::new(
        Sinks::open(&AuditSettings {
            sinks: vec![SinkSpec::File { path: log.clone() }],
            buffer_bytes: 1 << 20,
        })
        .unwrap(),
    );
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (sinks, done) = (sinks.clone(), done.clone());
        thread::spawn(move || {
            let mut n = 0u64;
            let deadline = Instant::now() + Duration::from_secs(30);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                for _ in 0..20 {
                    sinks
                        .write(&json!({ "kind": "request", "n": n }))
                        .expect("the queue has room");
                    n += 1;
                }
                thread::sleep(Duration::from_millis(2));
            }
            n
        })
    };
    // Five forced rotations, 700 ms apart: some land within a second of the last check.
    for _ in 0..5 {
        thread::sleep(Duration::from_millis(700));
        let out = Command::new("logrotate")
            .arg("-f")
            .arg("-s")
            .arg(dir.join("state"))
            .arg(&conf)
            .output()
            .expect("logrotate (cargo xtask setup installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    thread::sleep(Duration::from_millis(1500));
    done.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(sinks.flush(Duration::from_secs(10)));
    let mut seen = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("audit.jsonl") {
            continue;
        }
        files += 1;
        for line in std::fs::read_to_string(&p).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            seen.push(v["n"].as_u64().unwrap());
        }
    }
    assert!(files >= 5, "{files} files: logrotate did not rotate");
    seen.sort_unstable();
    let lost_or_doubled = seen.len() as i64 - written as i64;
    assert_eq!(seen, (0..written).collect::<Vec<_>>(), "{lost_or_doubled}");
    eprintln!("{written} lines over {files} files, none lost or doubled");
    drop(sinks);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------
// Syslog to receivers this test runs

/// One RFC 5424 message, checked field by field.
struct Syslog {
    pri: u16,
    timestamp: String,
    hostname: String,
    app: String,
    procid: String,
    msgid: String,
    msg: Value,
}

/// Parses a SYSLOG-MSG strictly (RFC 5424 section 6): header fields of PRINTUSASCII within
/// their lengths, a NILVALUE or well-formed structured data, and a JSON message.
fn parse_5424(m: &[u8]) -> Syslog {
    let text = std::str::from_utf8(m).expect("UTF-8");
    let rest = text.strip_prefix('<').expect("PRI");
    let gt = rest.find('>').expect("PRI end");
    let pri_text = &rest[..gt];
    assert!(
        (1..=3).contains(&pri_text.len())
            && pri_text.bytes().all(|b| b.is_ascii_digit())
            && (pri_text == "0" || !pri_text.starts_with('0')),
        "PRI {pri_text}"
    );
    let pri: u16 = pri_text.parse().unwrap();
    assert!(pri <= 191);
    let rest = rest[gt + 1..].strip_prefix("1 ").expect("VERSION 1");
    let mut parts = rest.splitn(6, ' ');
    let mut field = |max: usize, what: &str| {
        let f = parts.next().unwrap_or_else(|| panic!("{what} missing"));
        assert!(
            !f.is_empty() && f.len() <= max && f.bytes().all(|b| (33..=126).contains(&b)),
            "{what} '{f}'"
        );
        f.to_string()
    };
    let timestamp = field(64, "TIMESTAMP");
    let hostname = field(255, "HOSTNAME");
    let app = field(48, "APP-NAME");
    let procid = field(128, "PROCID");
    let msgid = field(32, "MSGID");
    let sd_and_msg = parts.next().expect("STRUCTURED-DATA");
    let msg = sd_and_msg
        .strip_prefix("- ")
        .expect("NILVALUE structured data, then MSG");
    if timestamp != "-" {
        // FULL-DATE "T" FULL-TIME with at most 6 fraction digits and Z or an offset.
        let b = timestamp.as_bytes();
        assert!(
            b.len() >= 20
                && b[4] == b'-'
                && b[7] == b'-'
                && b[10] == b'T'
                && b[13] == b':'
                && b[16] == b':',
            "{timestamp}"
        );
        let tail = &timestamp[19..];
        let tail = tail.strip_prefix('.').map_or(tail, |f| {
            let digits = f.bytes().take_while(u8::is_ascii_digit).count();
            assert!((1..=6).contains(&digits), "{timestamp}");
            &f[digits..]
        });
        assert!(
            tail == "Z" || (tail.len() == 6 && (tail.starts_with('+') || tail.starts_with('-'))),
            "{timestamp}"
        );
    }
    Syslog {
        pri,
        timestamp,
        hostname,
        app,
        procid,
        msgid,
        msg: serde_json::from_str(msg).expect("MSG is the audit line's JSON"),
    }
}

/// Reads RFC 6587 octet-counted frames: `MSG-LEN SP SYSLOG-MSG`, MSG-LEN without leading
/// zeros.
fn octet_frames(mut d: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !d.is_empty() {
        let sp = d.iter().position(|&b| b == b' ').expect("MSG-LEN SP");
        let len_text = std::str::from_utf8(&d[..sp]).unwrap();
        assert!(
            !len_text.is_empty()
                && len_text.bytes().all(|b| b.is_ascii_digit())
                && !len_text.starts_with('0'),
            "MSG-LEN '{len_text}'"
        );
        let len: usize = len_text.parse().unwrap();
        assert!(d.len() >= sp + 1 + len, "frame cut short");
        out.push(d[sp + 1..sp + 1 + len].to_vec());
        d = &d[sp + 1 + len..];
    }
    out
}

fn records(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            if i % 10 == 9 {
                json!({"time": "2026-11-23T12:00:00.250Z", "kind": "detection",
                       "detection": "password-spray", "severity": "high",
                       "subject": "source 203.0.113.9", "action": "block-source",
                       "evidence": {"users": 10, "note": "line\nbreak"}, "n": i})
            } else {
                json!({"time": "2026-11-23T12:00:00.123Z", "kind": "request",
                       "source": "198.51.100.10", "user": "alice@example.org",
                       "decision": if i % 2 == 0 { "allow" } else { "deny" },
                       "reason": "tab\there \"quoted\" é\nsecond line", "n": i})
            }
        })
        .collect()
}

fn check_message(m: &Syslog, want: &Value) {
    assert_eq!(&m.msg, want);
    let severity = match (want["kind"].as_str(), want["decision"].as_str()) {
        (Some("detection"), _) => 3,
        (_, Some("allow")) => 6,
        _ => 5,
    };
    assert_eq!(m.pri, 10 * 8 + severity, "authpriv facility and severity");
    assert_eq!(m.timestamp, want["time"].as_str().unwrap());
    assert_eq!(m.hostname, "gate-1.example.org");
    assert_eq!(m.app, "ewsgate");
    assert_eq!(m.procid, std::process::id().to_string());
    assert_eq!(m.msgid, want["kind"].as_str().unwrap());
}

#[test]
fn syslog_reaches_udp_and_tcp_receivers_as_strict_rfc5424() {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let spec = |transport, address: String| SinkSpec::Syslog {
        transport,
        address,
        facility: 10,
        hostname: Some("gate-1.example.org".into()),
    };
    let sinks = Sinks::open(&AuditSettings {
        sinks: vec![
            spec(Transport::Udp, udp.local_addr().unwrap().to_string()),
            spec(Transport::Tcp, tcp.local_addr().unwrap().to_string()),
        ],
        buffer_bytes: 1 << 20,
    })
    .unwrap();
    let want = records(300);
    let receiver = thread::spawn(move || {
        let (mut c, _) = tcp.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut all = Vec::new();
        let _ = c.read_to_end(&mut all);
        all
    });
    let mut datagrams = Vec::new();
    let mut buf = vec![0u8; 65536];
    for (i, r) in want.iter().enumerate() {
        sinks.write(r).unwrap();
        // Paced so that loopback UDP drops nothing: one datagram read per line written.
        let n = udp
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i}: {e}"));
        datagrams.push(buf[..n].to_vec());
    }
    assert!(sinks.flush(Duration::from_secs(10)));
    drop(sinks);
    for (d, w) in datagrams.iter().zip(&want) {
        check_message(&parse_5424(d), w);
    }
    let frames = octet_frames(&receiver.join().unwrap());
    assert_eq!(frames.len(), want.len());
    for (f, w) in frames.iter().zip(&want) {
        check_message(&parse_5424(f), w);
    }
}

// ---------------------------------------------------------------------------------------
// A real journald

/// systemd-journald in a mount namespace of its own, with its sockets and journal files in
/// a directory of this test (bind-mounted where journald expects them).
struct Journald {
    _child: Reaped,
    socket: PathBuf,
    journal_dir: PathBuf,
}

impl Journald {
    fn start(dir: &Path) -> Journald {
        let sock = dir.join("sock");
        let log = dir.join("log");
        std::fs::create_dir_all(&sock).unwrap();
        std::fs::create_dir_all(&log).unwrap();
        std::fs::write(dir.join("machine-id"), "5ea1ed0000000000000000000000ab1e\n").unwrap();
        std::fs::write(
            dir.join("journald.conf"),
            "[Journal]\nStorage=volatile\nReadKMsg=no\nForwardToSyslog=no\nForwardToWall=no\nForwardToConsole=no\nForwardToKMsg=no\nRateLimitIntervalSec=0\n",
        )
        .unwrap();
        // A private /run (tmpfs) so nothing is created on the host's; the test's directories
        // bound into it, so the socket and the files are reachable from outside.
        let script = format!(
            "set -e\n\
             mount --make-rprivate /\n\
             mount -t tmpfs tmpfs /run\n\
             mkdir -p /run/systemd/journal /run/log/journal\n\
             mount --bind {sock} /run/systemd/journal\n\
             mount --bind {log} /run/log/journal\n\
             mount --bind {mid} /etc/machine-id\n\
             mount --bind {conf} /etc/systemd/journald.conf\n\
             exec /lib/systemd/systemd-journald\n",
            sock = sock.display(),
            log = log.display(),
            mid = dir.join("machine-id").display(),
            conf = dir.join("journald.conf").display(),
        );
        let child = Command::new("unshare")
            .args(["--mount", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare");
        let child = Reaped(child);
        let socket = sock.join("socket");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "journald did not start");
            thread::sleep(Duration::from_millis(50));
        }
        Journald {
            _child: child,
            socket,
            journal_dir: log.join("5ea1ed0000000000000000000000ab1e"),
        }
    }

    /// Entries with SYSLOG_IDENTIFIER=ewsgate, read with journalctl from the files.
    fn entries(&self) -> Vec<Value> {
        let out = Command::new("journalctl")
            .arg(format!("--directory={}", self.journal_dir.display()))
            // --all: without it, fields over 4096 bytes show as null.
            .args([
                "-o",
                "json",
                "--all",
                "--no-pager",
                "SYSLOG_IDENTIFIER=ewsgate",
            ])
            .output()
            .expect("journalctl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// journalctl shows a field that is not valid text as an array of bytes.
fn field_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(bytes) => {
            String::from_utf8(bytes.iter().map(|b| b.as_u64().unwrap() as u8).collect()).unwrap()
        }
        other => panic!("{other}"),
    }
}

#[test]
fn journald_receives_fields_and_large_entries() {
    let dir = temp_dir("journald");
    let j = Journald::start(&dir);
    let sinks = Sinks::open(&AuditSettings {
        sinks: vec![SinkSpec::Journald {
            socket: j.socket.clone(),
        }],
        buffer_bytes: 4 << 20,
    })
    .unwrap();
    let mut want = records(50);
    // Larger than a datagram may be: it must go as a memfd.
    want.push(
        json!({"time": "2026-11-23T12:00:01Z", "kind": "request", "decision": "deny",
                     "reason": "big", "user_agent": "u".repeat(400_000), "n": 50}),
    );
    for r in &want {
        sinks.write(r).unwrap();
    }
    assert!(sinks.flush(Duration::from_secs(10)));
    let status = &sinks.status()[0];
    assert_eq!((status.written, status.errors), (want.len() as u64, 0));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = j.entries();
    while got.len() < want.len() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        got = j.entries();
    }
    assert_eq!(got.len(), want.len());
    for e in &got {
        if e["EWSGATE_N"].is_null() {
            eprintln!(
                "{}",
                e.as_object()
                    .unwrap()
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            eprintln!("{}", e["MESSAGE"].to_string().len());
        }
    }
    got.sort_by_key(|e| field_text(&e["EWSGATE_N"]).parse::<u64>().unwrap());
    for (e, w) in got.iter().zip(&want) {
        assert_eq!(e["SYSLOG_IDENTIFIER"], "ewsgate");
        assert_eq!(e["_TRANSPORT"], "journal");
        let priority = match (w["kind"].as_str(), w["decision"].as_str()) {
            (Some("detection"), _) => "3",
            (_, Some("allow")) => "6",
            _ => "5",
        };
        assert_eq!(e["PRIORITY"], priority);
        for (k, v) in w.as_object().unwrap() {
            let name = format!("EWSGATE_{}", k.to_ascii_uppercase());
            let expect = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let Some(got) = e.get(&name) else {
                panic!(
                    "{name} missing; the entry has {:?}",
                    e.as_object().map(|o| o.keys().collect::<Vec<_>>())
                );
            };
            assert_eq!(field_text(got), expect, "{name}");
        }
    }
    let detection = got
        .iter()
        .find(|e| e["EWSGATE_KIND"] == "detection")
        .unwrap();
    assert_eq!(
        field_text(&detection["MESSAGE"]),
        "detection password-spray (high): source 203.0.113.9, action block-source"
    );
    drop(sinks);
    drop(j);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------
// A gate in the lab: detections in its audit, the audit on a syslog sink

#[test]
fn a_gate_audits_a_detection_and_sends_its_lines_to_syslog() {
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    use tests::{ews::wait_audit, gate::Gate, mailbox::requests};
    let rules = "[[rule]]\nname = \"office-basic\"\ngroups = [\"offices\"]\nauth = [\"basic\"]\naction = \"allow\"\n";
    // The proxy sends from the gate's namespace: the receiver is bound there.
    // The gate pins a token-signing certificate, which needs the metadata URLs its tokens name.
    let tokens = format!(
        "metadata_urls = [\"{}\"]\n",
        ewsgate::identity::tokens::testkit::AMURL
    );
    let g = Gate::start_edited(0, &tokens, rules, |text, _| {
        text.replace(
            "audit_log = \"audit.jsonl\"\n",
            "",
        ) + "\n[audit]\nsinks = [{ type = \"file\", path = \"audit.jsonl\" }, { type = \"syslog\", transport = \"udp\", address = \"127.0.0.1:5514\", hostname = \"gate-1\" }]\n"
    });
    let udp = g.lab.gate.run(|| {
        let s = UdpSocket::bind("127.0.0.1:5514").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    });
    let basic = format!("Basic {}", STANDARD.encode("alice@example.org:secret"));
    let mut c = g.https("office");
    let r = c
        .ews(
            &[("Authorization", &basic)],
            requests::export_items("C-cal-1").as_bytes(),
        )
        .expect("reply");
    assert_eq!(r.status, 500, "{}", r.body);
    let d = wait_audit(&g.audit, |v| v["kind"] == "detection").expect("a detection line");
    assert_eq!(d["detection"], "export-or-impersonation");
    assert_eq!(d["severity"], "high");
    assert_eq!(d["user"], "alice@example.org");
    assert_eq!(d["source_group"], "offices");
    assert_eq!(d["evidence"]["operation"], "ExportItems");
    assert_eq!(d["evidence"]["decision"], "deny");
    assert_eq!(d["action"], "alert");
    // The request line and the detection reach the syslog receiver too, as RFC 5424.
    let mut kinds = Vec::new();
    let mut buf = vec![0u8; 65536];
    while kinds.len() < 2 {
        let n = udp.recv(&mut buf).expect("a syslog datagram");
        let m = parse_5424(&buf[..n]);
        assert_eq!((m.hostname.as_str(), m.app.as_str()), ("gate-1", "ewsgate"));
        assert_eq!(m.msgid, m.msg["kind"].as_str().unwrap());
        kinds.push(m.msgid.clone());
        if m.msgid == "detection" {
            assert_eq!(m.msg["detection"], "export-or-impersonation");
            assert_eq!(m.pri, 16 * 8 + 3);
        } else {
            assert_eq!(m.msg["operation"], "ExportItems");
            assert_eq!(m.msg["decision"], "deny");
        }
    }
    kinds.sort();
    assert_eq!(kinds, ["detection", "request"]);
}

// ---------------------------------------------------------------------------------------
// Sigma rules

fn python() -> String {
    std::env::var("EWSGATE_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/py/bin/python3").to_string()
    })
}

fn sigma_check(dir: &Path) -> std::process::Output {
    let names: Vec<&str> = DetectionKind::ALL.iter().map(|k| k.name()).collect();
    Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/sigma_check.py"
        ))
        .arg(dir)
        .arg(names.join(","))
        .output()
        .expect("python with pySigma (cargo xtask setup installs it)")
}

#[test]
fn every_detection_has_a_sigma_rule_that_pysigma_converts() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/sigma");
    let out = sigma_check(&rules);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for kind in DetectionKind::ALL {
        let escaped = kind.name().replace('-', "\\-");
        assert!(
            text.contains(&format!("kind:detection AND detection:{escaped}")),
            "{}: {text}",
            kind.name()
        );
    }
    // The check fails on a broken rule (an undefined selection) and on a missing one.
    let dir = temp_dir("sigma");
    for entry in std::fs::read_dir(&rules).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let victim = dir.join("ewsgate_token_reuse.yml");
    let broken = std::fs::read_to_string(&victim)
        .unwrap()
        .replace("condition: selection", "condition: selection and filter");
    std::fs::write(&victim, broken).unwrap();
    assert!(!sigma_check(&dir).status.success(), "a broken rule passed");
    std::fs::remove_file(&victim).unwrap();
    let out = sigma_check(&dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("detection token-reuse: 0 rules"));
    std::fs::remove_dir_all(&dir).unwrap();
}
