//! `/metrics` scraped by Debian's real Prometheus: a gate in the lab, known traffic (allowed
//! and refused requests, packets the XDP program drops), and Prometheus' HTTP API asked for
//! the counters that traffic produced. The shipped alerting rules pass `promtool test
//! rules`, and every metric the Grafana dashboard queries exists in a real scrape.

use std::{
    collections::BTreeSet,
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use ewsgate::identity::tokens::testkit;
use tests::{
    ews::audit_lines,
    gate::Gate,
    lab::{stop_pid, tag, Daemon, Netns, GATE_V4},
    mailbox::{requests, TOKEN_ITEM},
};

const METRICS: &str = "127.0.0.1:9464";
const PROMETHEUS: &str = "127.0.0.1:9090";

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

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib")
        .join(path)
}

fn gate() -> Gate {
    let tokens = format!("metadata_urls = [\"{}\"]\n", testkit::AMURL);
    Gate::start_edited(0, &tokens, RULES, |text, _| {
        // Three refusals of one user are a failure burst: a detection the test can count.
        format!(
            "{text}\n[metrics]\nlisten = \"{METRICS}\"\n\n[detections.failure_burst_user]\nthreshold = 3\n"
        )
    })
}

/// One HTTP/1.0 GET inside `ns` (HTTP/1.0: the answer is never chunked): status and body.
fn get(ns: &Netns, addr: &str, target: &str) -> std::io::Result<(u16, String, String)> {
    call(ns, "GET", addr, target)
}

fn call(
    ns: &Netns,
    method: &str,
    addr: &str,
    target: &str,
) -> std::io::Result<(u16, String, String)> {
    let addr: SocketAddr = addr.parse().expect("address");
    let request = format!("{method} {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, head.to_string(), body.to_string()))
    })
}

fn scrape(g: &Gate) -> (String, String) {
    let (status, head, body) = get(&g.lab.gate, METRICS, "/metrics").expect("scrape");
    assert_eq!(status, 200, "{head}\n{body}");
    (head, body)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus in the gate's namespace, scraping the gate every second, with the
/// shipped alerting rules loaded; stopped by its PID.
struct Prometheus<'a> {
    child: Child,
    dir: PathBuf,
    ns: &'a Netns,
}

impl<'a> Prometheus<'a> {
    fn start(ns: &'a Netns) -> Prometheus<'a> {
        let dir = std::env::temp_dir().join(format!("ewsgate-prometheus-{}", tag()));
        fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: ewsgate\n    static_configs:\n      - targets: ['{METRICS}']\n",
            contrib("prometheus/ewsgate.rules.yml").display()
        );
        fs::write(dir.join("prometheus.yml"), config).expect("prometheus config");
        let log = fs::File::create(dir.join("log")).expect("prometheus log");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "prometheus"])
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (cargo xtask setup installs it)");
        let p = Prometheus { child, dir, ns };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if p.get("/-/ready").is_ok_and(|(s, _)| s == 200) {
                return p;
            }
            thread::sleep(Duration::from_millis(200));
        }
        panic!("prometheus never became ready: {}", p.log());
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn get(&self, target: &str) -> std::io::Result<(u16, String)> {
        get(self.ns, PROMETHEUS, target).map(|(s, _, b)| (s, b))
    }

    /// An instant query's single value, `None` when it has no sample.
    fn query(&self, q: &str) -> Option<f64> {
        let (status, body) = self
            .get(&format!("/api/v1/query?query={}", urlencode(q)))
            .ok()?;
        assert_eq!(status, 200, "{q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("query JSON");
        assert_eq!(v["status"], "success", "{q}: {body}");
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits (bounded) for `q` to reach `want`, then returns what it says.
    fn settle(&self, q: &str, want: f64) -> Option<f64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(q);
            if last == Some(want) {
                break;
            }
            thread::sleep(Duration::from_millis(250));
        }
        last
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        stop_pid(self.child.id());
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `count` TCP SYNs to the gate's protected port from `ns`, one packet each, through a raw
/// socket (no connection, so no retransmission adds packets the test did not send).
fn syns(ns: &Netns, count: u16) {
    ns.run(move || {
        // SAFETY: a raw IPv4 socket; the kernel writes the IP header.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let dst = SocketAddrV4::new(GATE_V4.parse::<Ipv4Addr>().expect("gate"), 0);
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(*dst.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        for i in 0..count {
            let mut tcp = [0u8; 20];
            tcp[0..2].copy_from_slice(&(40000 + i).to_be_bytes());
            tcp[2..4].copy_from_slice(&443u16.to_be_bytes());
            tcp[4..8].copy_from_slice(&(1000u32 + u32::from(i)).to_be_bytes());
            tcp[12] = 5 << 4;
            tcp[13] = 0x02; // SYN
            tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
            // SAFETY: sending a local buffer to a valid sockaddr_in.
            let n = unsafe {
                libc::sendto(
                    fd,
                    tcp.as_ptr().cast(),
                    tcp.len(),
                    0,
                    (&sin as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            assert_eq!(n, 20, "sendto: {}", std::io::Error::last_os_error());
        }
        // SAFETY: closing the socket opened above.
        unsafe { libc::close(fd) };
    });
}

/// The audit log once it holds `requests` request lines (bounded wait: it is written
/// behind the answers).
fn audited(g: &Gate, requests: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = audit_lines(&g.audit);
        let n = lines.iter().filter(|l| l["kind"] == "request").count();
        if n >= requests || Instant::now() > deadline {
            assert_eq!(n, requests, "{lines:?}");
            return lines;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// One request the rules allow (a callback token from Salesforce) and one they refuse
/// (Basic from the offices by a user no rule names), `n` times each.
fn traffic(g: &Gate, n: usize) {
    let token = g.pki.token(|c| c);
    let bearer = format!("Bearer {token}");
    let soap = requests::get_item(&[TOKEN_ITEM]);
    for _ in 0..n {
        let r = g
            .https("sf")
            .ews(&[("Authorization", &bearer)], soap.as_bytes())
            .expect("reply");
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let basic = format!(
        "Basic {}",
        STANDARD.encode("mallory@elsewhere.test:s3cret-Pa55")
    );
    for _ in 0..n {
        let r = g
            .https("office")
            .ews(&[("Authorization", &basic)], soap.as_bytes())
            .expect("reply");
        assert_ne!(r.status, 200, "{}", r.body);
    }
}

#[test]
fn prometheus_scrapes_the_counters_the_traffic_produced() {
    let g = gate();
    let prom = Prometheus::start(&g.lab.gate);
    assert_eq!(
        prom.settle("ewsgate_agent_up", 1.0),
        Some(1.0),
        "prometheus never scraped the agent's part: {}",
        prom.log()
    );
    let dropped_q = r#"sum(ewsgate_packets_total{verdict="drop",reason="drop_not_allowed"})"#;
    let dropped_before = prom
        .query(dropped_q)
        .expect("the packet counters are scraped");

    // Allowed: three callback-token requests from Salesforce (one token); refused: three
    // Basic requests from the offices.
    traffic(&g, 3);
    // Dropped by XDP: five SYNs from the internet.
    syns(g.lab.client("inet"), 5);

    audited(&g, 6);
    // The detection's audit event is written right after the third refusal's line.
    thread::sleep(Duration::from_millis(200));
    let audit = audit_lines(&g.audit);
    let detections = audit.iter().filter(|l| l["kind"] == "detection").count();

    let checks: [(&str, f64); 9] = [
        (
            r#"sum(ewsgate_requests_total{rule="salesforce-callback",group="salesforce",auth="bearer",op_class="read",verdict="allow"})"#,
            3.0,
        ),
        (
            r#"sum(ewsgate_requests_total{rule="none",group="offices",auth="basic",verdict="deny"})"#,
            3.0,
        ),
        ("sum(ewsgate_requests_total)", 6.0),
        (r#"sum(ewsgate_refusals_total{failure="policy"})"#, 3.0),
        ("sum(ewsgate_refusals_total)", 3.0),
        ("sum(ewsgate_request_duration_seconds_count)", 6.0),
        ("sum(ewsgate_upstream_duration_seconds_count)", 3.0),
        ("ewsgate_token_cache_misses_total", 1.0),
        ("ewsgate_token_cache_hits_total", 2.0),
    ];
    for (q, want) in checks {
        assert_eq!(prom.settle(q, want), Some(want), "{q}");
    }
    // Each detection the audit log recorded (first-seen sources, at least) is counted.
    assert!(detections > 0, "{audit:?}");
    let fired = detections as f64;
    assert_eq!(
        prom.settle("sum(ewsgate_detections_total)", fired),
        Some(fired)
    );
    assert_eq!(
        prom.settle(dropped_q, dropped_before + 5.0),
        Some(dropped_before + 5.0),
        "the five SYNs are five drops"
    );
    // The group counters and the generation come from the agent too.
    assert!(
        prom.query(r#"sum(ewsgate_group_packets_total{group="salesforce"})"#)
            .is_some_and(|n| n > 0.0),
        "salesforce's packets passed"
    );
    assert!(prom
        .query(r#"ewsgate_map_capacity{map="block_exact"}"#)
        .is_some_and(|n| n > 0.0));
    assert_eq!(prom.query("sum(ewsgate_reloads_total)"), Some(0.0));
    assert_eq!(prom.query("ewsgate_reload_last_success"), Some(1.0));
    assert!(prom.query("ewsgate_generation").is_some());

    // A broken config is refused (the agent reloads on the file's change, or on `reload`):
    // the refusal is counted and the last result says so; the fixed file is applied.
    let config = g.daemon.config.clone();
    let good = fs::read_to_string(&config).expect("config");
    fs::write(
        &config,
        format!("{good}\n[[rule]]\nname = \"broken\"\nactoin = \"allow\"\n"),
    )
    .expect("broken config");
    let _ = g.daemon.cli(&["reload"]);
    assert_eq!(prom.settle("ewsgate_reload_last_success", 0.0), Some(0.0));
    assert!(prom
        .query(r#"ewsgate_reloads_total{result="refused"}"#)
        .is_some_and(|n| n >= 1.0));
    fs::write(&config, &good).expect("config");
    g.daemon.cli(&["reload"]).expect("reload");
    assert_eq!(prom.settle("ewsgate_reload_last_success", 1.0), Some(1.0));
    assert!(prom
        .query(r#"ewsgate_reloads_total{result="ok"}"#)
        .is_some_and(|n| n >= 1.0));
    // Each applied reload flips it (the file's watch may have reloaded too): the scrape
    // says what `status` says.
    let status: serde_json::Value =
        serde_json::from_str(&g.daemon.cli(&["status", "--json"]).expect("status")).unwrap();
    let live = status["generation"].as_f64().expect("status generation");
    assert_eq!(prom.settle("ewsgate_generation", live), Some(live));
    // No alert fires on this healthy gate (the rules are loaded and evaluated).
    let (_, rules) = prom.get("/api/v1/rules").expect("rules");
    assert!(
        rules.contains("EwsgateGroupMostlyRefused") && rules.contains("\"health\":\"ok\""),
        "{rules}"
    );
    assert!(!rules.contains("\"health\":\"err\""), "{rules}");
}

/// Metric names a PromQL expression uses: the `ewsgate_` identifiers in it.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("ewsgate_"))
        .map(str::to_string)
        .collect()
}

/// Every expression in a dashboard: panel targets and templating queries.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition" | "query", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// The series names a scrape offers: every sample's name, and for each declared family the
/// names its type gives it (so a family with no sample yet, such as detections, counts).
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

#[test]
fn the_dashboard_queries_only_metrics_a_real_scrape_has_and_the_agent_can_be_down() {
    let mut g = gate();
    let dashboard: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(contrib("grafana/ewsgate.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(used.len() >= 20, "the dashboard queries {used:?}");
    traffic(&g, 1);
    audited(&g, 2);

    let (head, body) = scrape(&g);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(body.contains("ewsgate_agent_up 1"), "{body}");
    let exposed = exposed_names(&body);
    let missing: Vec<&String> = used.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(missing.is_empty(), "not in a scrape: {missing:?}\n{body}");
    // Each family once: the agent's part and the proxy's do not overlap.
    let mut seen = BTreeSet::new();
    for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert!(seen.insert(line.to_string()), "declared twice: {line}");
    }
    // Anything but GET /metrics is refused.
    let (status, _, _) = get(&g.lab.gate, METRICS, "/admin").expect("404");
    assert_eq!(status, 404);
    let (status, _, _) = call(&g.lab.gate, "DELETE", METRICS, "/metrics").expect("405");
    assert_eq!(status, 405);

    // With the agent gone, the proxy still answers, and says the agent is down.
    g.daemon.kill9();
    let (_, body) = scrape(&g);
    assert!(body.contains("ewsgate_agent_up 0"), "{body}");
    assert!(body.contains("# TYPE ewsgate_requests counter"), "{body}");
    assert!(!body.contains("ewsgate_packets_total"), "{body}");
    // A new agent adopts the proxy, which kept the metrics socket: the packet layer is back.
    let config = g.daemon.config.clone();
    let daemon = Daemon::start(&g.lab.gate, &config, &g.dir.join("ctl.sock")).expect("agent");
    let orphans = std::mem::take(&mut g.daemon.orphans);
    g.daemon = daemon;
    g.daemon.orphans = orphans;
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (_, body) = scrape(&g);
        if body.contains("ewsgate_agent_up 1") || Instant::now() > deadline {
            break body;
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert!(
        body.contains("ewsgate_agent_up 1"),
        "{body}\n{}",
        g.daemon.log()
    );
    assert!(body.contains("ewsgate_packets_total{"), "{body}");
    assert!(
        body.contains(r#"ewsgate_requests_total{rule="salesforce-callback""#),
        "the adopted proxy kept its counts: {body}"
    );
}

#[test]
fn the_alerting_rules_pass_their_promtool_unit_tests() {
    let dir = contrib("prometheus");
    let check = Command::new("promtool")
        .args(["check", "rules", "ewsgate.rules.yml"])
        .current_dir(&dir)
        .output()
        .expect("promtool (cargo xtask setup installs prometheus)");
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{said}");
    assert!(said.contains("SUCCESS: 6 rules found"), "{said}");
    let test = Command::new("promtool")
        .args(["test", "rules", "ewsgate.tests.yml"])
        .current_dir(&dir)
        .output()
        .expect("promtool");
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}
