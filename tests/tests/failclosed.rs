//! Fail closed, never self-inflicted: what the gate does with what it does not understand,
//! and what refusals may and may not cost the sources they come from. Each test drives the
//! gate as a client or an attacker would, through XDP, TLS and HTTP.

use std::{
    fs,
    net::TcpStream,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    ews::{audit_lines, wait_audit, Https, Reply, SERVER_NAME},
    gate::{gate4, Gate},
    lab::GATE_V4,
    mailbox::{requests, TOKEN_ITEM},
};

const RULES: &str = r#"
[[rule]]
name = "salesforce-callback"
groups = ["salesforce"]
auth = ["bearer"]
token = ["callback"]
action = "allow"

[[rule]]
name = "office-phones"
groups = ["offices"]
auth = ["client-cert"]
users = ["phone-*"]
data = ["calendar", "contacts"]
action = "allow"
"#;

fn tokens() -> String {
    format!(
        "metadata_urls = [\"{}\"]\n",
        ewsgate::identity::tokens::testkit::AMURL
    )
}

fn dropped(g: &Gate, role: &str) -> bool {
    let to = gate4();
    g.lab
        .client(role)
        .run(move || TcpStream::connect_timeout(&to, Duration::from_millis(300)))
        .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
}

fn is_fault(r: &Reply, code: &str, reason: &str) -> bool {
    r.header("content-type")
        .is_some_and(|t| t.starts_with("text/xml"))
        && r.body.contains(code)
        && r.body.contains(reason)
}

fn raw(g: &Gate, role: &str, request: &str) -> Reply {
    let mut c = g.https(role);
    c.send(request.as_bytes()).unwrap();
    c.read_reply().expect("a reply")
}

fn bearer_get_item(g: &Gate, token: &str) -> Reply {
    let soap = requests::get_item(&[TOKEN_ITEM]);
    g.https("sf")
        .ews(
            &[("Authorization", &format!("Bearer {token}"))],
            soap.as_bytes(),
        )
        .unwrap()
}

#[test]
fn a_hundred_policy_denials_from_an_office_block_nothing() {
    let g = Gate::start(5, RULES);
    let inbox = requests::find_item("inbox", false, None);
    for _ in 0..100 {
        let mut phone = g.https_with_cert("office", "phone-0042");
        let r = phone.ews(&[], inbox.as_bytes()).unwrap();
        assert_eq!(r.status, 500, "{}", r.body);
    }
    let line = wait_audit(&g.audit, |v| {
        v["reason"].as_str().is_some_and(|r| r.contains("FindItem"))
    })
    .expect("denials audited");
    assert_eq!(line["failure"], "policy");
    assert!(!dropped(&g, "office"), "a policy denial blocked the office");
    assert!(!g
        .daemon
        .cli(&["block", "list"])
        .unwrap()
        .contains("198.51.100.10"));
    let mut phone = g.https_with_cert("office", "phone-0042");
    let calendar = requests::find_item("calendar", true, None);
    assert_eq!(phone.ews(&[], calendar.as_bytes()).unwrap().status, 200);
}

/// Salesforce's egress from a feed: shared by every Salesforce tenant, so it blocks nothing.
fn salesforce_from_a_feed(text: String, dir: &std::path::Path) -> String {
    fs::write(
        dir.join("salesforce.json"),
        r#"{"prefixes":[{"region":"us-east-1","ip_prefix":["198.51.100.128/25"]}],
            "ipv6_prefixes":[{"region":"us-east-1","ipv6_prefix":"2001:db8:200::/64"}]}"#,
    )
    .unwrap();
    text.replace(
        "[sources.salesforce]\ncidrs = [\"198.51.100.128/25\", \"2001:db8:200::/64\"]",
        "[sources.salesforce]\nfeed = \"salesforce.json\"",
    )
    .replace("[feedback]", "[feedback]\nidentity_failures = 3")
}

#[test]
fn bad_tokens_from_a_shared_feed_refuse_the_token_not_the_address() {
    let g = Gate::start_edited(5, &tokens(), RULES, salesforce_from_a_feed);
    let forged = g
        .pki
        .token(|c| ewsgate::identity::tokens::testkit::with(c, "aud", serde_json::json!("wrong")));
    let mut reasons = Vec::new();
    for _ in 0..12 {
        let r = bearer_get_item(&g, &forged);
        assert!(
            is_fault(&r, "ErrorAccessDenied", ""),
            "{} {}",
            r.status,
            r.body
        );
        reasons.push(r.status);
    }
    // Never blocked: the address serves everyone's Salesforce.
    assert!(!dropped(&g, "sf"));
    assert!(!g
        .daemon
        .cli(&["block", "list"])
        .unwrap()
        .contains("198.51.100.140"));
    // The token that kept failing is refused at the request layer, with its own reason.
    let line = wait_audit(&g.audit, |v| {
        v["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("identity_refused"))
    })
    .expect("the identity refused");
    assert_eq!(line["auth"], "bearer");
    let first = audit_lines(&g.audit)
        .into_iter()
        .find(|v| v["reason"] == "token_audience")
        .expect("the first refusals name the token's fault");
    assert_eq!(
        first["auth"], "bearer",
        "a refused token's line says bearer"
    );
    assert_eq!(first["failure"], "credential");
    // Another tenant's good token from the same address still passes.
    assert_eq!(bearer_get_item(&g, &g.pki.token(|c| c)).status, 200);
}

#[test]
fn smuggling_from_an_office_gets_it_blocked_in_xdp() {
    let g = Gate::start(3, RULES);
    for _ in 0..3 {
        let r = raw(
            &g,
            "office",
            &format!("POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: {SERVER_NAME}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        );
        assert!(
            is_fault(
                &r,
                "ErrorInvalidRequest",
                "content_length_with_transfer_encoding"
            ),
            "{}",
            r.body
        );
    }
    let started = Instant::now();
    while !dropped(&g, "office") {
        assert!(started.elapsed() < Duration::from_secs(5), "never blocked");
    }
    let list = g.daemon.cli(&["block", "list"]).unwrap();
    assert!(
        list.contains("198.51.100.10") && list.contains("protocol"),
        "{list}"
    );
}

#[test]
fn host_and_target_must_name_the_gate() {
    let g = Gate::start(0, RULES);
    let token = g.pki.token(|c| c);
    let soap = requests::get_item(&[TOKEN_ITEM]);
    let post = |target: &str, hosts: &[&str]| {
        let hosts: String = hosts.iter().map(|h| format!("Host: {h}\r\n")).collect();
        format!(
            "POST {target} HTTP/1.1\r\n{hosts}Authorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{soap}",
            soap.len()
        )
    };
    for (request, reason) in [
        (post("/EWS/Exchange.asmx", &[]), "missing_host"),
        (
            post("/EWS/Exchange.asmx", &[SERVER_NAME, SERVER_NAME]),
            "duplicate_host",
        ),
        (
            post("/EWS/Exchange.asmx", &["intranet.example.org"]),
            "host_not_this_gate",
        ),
        (
            post("/EWS/Exchange.asmx", &[&format!("{SERVER_NAME}:8443")]),
            "host_not_this_gate",
        ),
        (
            post(
                "https://intranet.example.org/EWS/Exchange.asmx",
                &[SERVER_NAME],
            ),
            "target_not_this_gate",
        ),
    ] {
        let r = raw(&g, "sf", &request);
        assert_eq!(r.status, 400, "{reason}: {}", r.body);
        assert!(
            is_fault(&r, "ErrorInvalidRequest", reason),
            "{reason}: {}",
            r.body
        );
    }
    assert!(g.backend.requests().is_empty());
    for (target, host) in [
        ("/EWS/Exchange.asmx", format!("{SERVER_NAME}:443")),
        ("/EWS/Exchange.asmx", "MAIL.Example.ORG".to_string()),
        (
            "https://mail.example.org/EWS/Exchange.asmx",
            SERVER_NAME.to_string(),
        ),
        ("/EWS/Exchange.asmx", GATE_V4.to_string()),
    ] {
        let r = raw(&g, "sf", &post(target, &[&host]));
        assert_eq!(r.status, 200, "{target} {host}: {}", r.body);
    }
    // What Exchange saw is what the audit line says was forwarded.
    assert!(g
        .backend
        .requests()
        .iter()
        .all(|s| s.path == "/EWS/Exchange.asmx"));
}

#[test]
fn a_query_on_the_ews_path_is_refused_unless_configured() {
    let g = Gate::start(0, RULES);
    let token = g.pki.token(|c| c);
    let soap = requests::get_item(&[TOKEN_ITEM]);
    let mut c = g.https("sf");
    let r = c
        .request(
            "POST",
            "/EWS/Exchange.asmx?wsdl",
            &[("Authorization", &format!("Bearer {token}"))],
            soap.as_bytes(),
        )
        .unwrap();
    assert!(
        is_fault(&r, "ErrorInvalidRequest", "ews_query_string"),
        "{}",
        r.body
    );
    assert!(g.backend.requests().is_empty());

    let g = Gate::start_edited(0, &tokens(), RULES, |t, _| {
        t.replace("threads = 1\n", "threads = 1\news_query = true\n")
    });
    let token = g.pki.token(|c| c);
    let mut c = g.https("sf");
    let r = c
        .request(
            "POST",
            "/EWS/Exchange.asmx?a=1",
            &[("Authorization", &format!("Bearer {token}"))],
            soap.as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(g.backend.requests()[0].path, "/EWS/Exchange.asmx?a=1");
    let line = wait_audit(&g.audit, |v| v["decision"] == "allow").unwrap();
    assert_eq!(line["path"], "/EWS/Exchange.asmx?a=1");
}

#[test]
fn a_source_that_goes_around_xdp_is_refused_at_accept() {
    // The internet-facing interface does not run the program: packets from there reach the
    // host, as through a tunnel ending on it.
    let g = Gate::start_edited(0, &tokens(), RULES, |t, _| {
        t.replace(
            "interfaces = [\"g-office\", \"g-sf\", \"g-inet\"]",
            "interfaces = [\"g-office\", \"g-sf\"]",
        )
    });
    assert!(
        !dropped(&g, "inet"),
        "the lab routes the internet around XDP"
    );
    let attempt = Https::connect(g.lab.client("inet"), gate4(), &g.pki, None)
        .and_then(|mut c| c.ews(&[], b"<x/>"));
    assert!(
        attempt.is_err(),
        "the proxy answered a source outside every group"
    );
    let line = wait_audit(&g.audit, |v| v["reason"] == "source_not_allowed").expect("audited");
    assert_eq!(line["kind"], "connection");
    assert_eq!(line["source"], "203.0.113.50");
    assert!(g.backend.requests().is_empty());
    // A dynamic allow is admitted at accept, as XDP would pass it, then judged by the rules.
    g.daemon.cli(&["allow", "add", "203.0.113.50"]).unwrap();
    let token = g.pki.token(|c| c);
    let r = Https::connect(g.lab.client("inet"), gate4(), &g.pki, None).and_then(|mut c| {
        c.ews(
            &[("Authorization", &format!("Bearer {token}"))],
            requests::get_item(&[TOKEN_ITEM]).as_bytes(),
        )
    });
    assert!(
        r.is_ok_and(|r| r.status == 403),
        "admitted, then refused by the rules"
    );
}

#[test]
fn a_reload_that_fails_anywhere_changes_nothing() {
    let g = Gate::start(0, RULES);
    assert!(dropped(&g, "inet"));
    let config = g.dir.join("ewsgate.toml");
    let good = fs::read_to_string(&config).unwrap();
    // The internet's range allowed, and a certificate the proxy cannot load.
    fs::write(
        g.dir.join("broken.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .unwrap();
    let bad = good
        .replace(
            "[sources.partner]",
            "[sources.internet]\ncidrs = [\"203.0.113.0/24\"]\n[sources.partner]",
        )
        .replace("certificate = \"gate.pem\"", "certificate = \"broken.pem\"");
    fs::write(&config, bad).unwrap();
    let err = g.daemon.cli(&["reload"]).unwrap_err().to_string();
    assert!(err.contains("broken.pem"), "{err}");
    let status: Value =
        serde_json::from_str(&g.daemon.cli(&["status", "--json"]).unwrap()).unwrap();
    let last = status["last_reload"].as_str().unwrap();
    assert!(
        last.contains("refused") && last.contains("broken.pem"),
        "{last}"
    );
    // Nothing of it applied: the internet is still dropped, the proxy still serves.
    assert!(
        dropped(&g, "inet"),
        "the tables of a refused reload went live"
    );
    assert_eq!(bearer_get_item(&g, &g.pki.token(|c| c)).status, 200);
    // status, reload and detach reach the agent when the config does not even parse.
    fs::write(&config, format!("{good}\n[[rule]\nbroken =")).unwrap();
    let err = g.daemon.cli(&["reload"]).unwrap_err().to_string();
    assert!(err.contains("ewsgate.toml"), "{err}");
    let status = g.daemon.cli(&["status"]).unwrap();
    assert!(status.contains("refused"), "{status}");
}

/// A pipe as the audit log, with a reader that opens it and then reads nothing until told.
struct StalledSink {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    go: std::sync::mpsc::Sender<()>,
}

impl StalledSink {
    fn new(path: &std::path::Path) -> StalledSink {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a path this test owns.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let lines: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (path, seen) = (path.to_path_buf(), lines.clone());
        std::thread::spawn(move || {
            use std::io::BufRead;
            let file = fs::File::open(&path).unwrap();
            let _ = wait.recv();
            for line in std::io::BufReader::new(file).lines() {
                let Ok(line) = line else { return };
                seen.lock().unwrap().push(line);
            }
        });
        StalledSink { lines, go }
    }
}

#[test]
fn a_stalled_audit_sink_refuses_with_503_and_loses_no_line() {
    let mut sink = None;
    let g = Gate::start_edited(0, &tokens(), RULES, |t, dir| {
        sink = Some(StalledSink::new(&dir.join("audit.fifo")));
        t.replace("audit_log = \"audit.jsonl\"", "audit_log = \"audit.fifo\"")
            .replace(
                "[proxy.limits]",
                "[proxy.limits]\naudit_backlog_bytes = 65536",
            )
    });
    let sink = sink.unwrap();
    let token = g.pki.token(|c| c);
    let (mut served, mut refused) = (0, 0);
    for _ in 0..3000 {
        let r = bearer_get_item(&g, &token);
        match r.status {
            200 => served += 1,
            503 => {
                assert!(
                    is_fault(&r, "ErrorServerBusy", "audit_backlog"),
                    "{}",
                    r.body
                );
                refused += 1;
                if refused >= 3 {
                    break;
                }
            }
            other => panic!("{other}: {}", r.body),
        }
    }
    assert!(
        refused >= 3,
        "the gate never refused: {served} served into a stalled sink"
    );
    // The sink recovers: every decision's line arrives, and requests are served again.
    sink.go.send(()).unwrap();
    let started = Instant::now();
    loop {
        let r = bearer_get_item(&g, &token);
        if r.status == 200 {
            served += 1;
            break;
        }
        refused += 1;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never recovered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let decided = served + refused;
    let started = Instant::now();
    loop {
        let lines = sink.lines.lock().unwrap().clone();
        let requests: Vec<Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["kind"] == "request")
            .collect();
        if requests.len() >= decided {
            assert_eq!(requests.len(), decided, "a line for every decision, once");
            let busy = requests
                .iter()
                .filter(|v| v["reason"] == "audit_backlog")
                .count();
            assert_eq!(busy, refused);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} of {decided} lines arrived",
            requests.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A stand-in Exchange that answers every request with one calendar item whose subject is
/// `size` bytes long, on the gate's loopback.
fn big_backend(g: &Gate, port: u16, size: usize) {
    let listener = g
        .lab
        .gate
        .run(move || std::net::TcpListener::bind(("127.0.0.1", port)))
        .unwrap();
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Read, Write};
        let subject = "x".repeat(size);
        let body = format!(
            r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><m:GetItemResponse xmlns:m="{m}" xmlns:t="{t}"><m:ResponseMessages><m:GetItemResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode><m:Items><t:CalendarItem><t:ItemId Id="{TOKEN_ITEM}" ChangeKey="A"/><t:ItemClass>IPM.Appointment</t:ItemClass><t:Subject>{subject}</t:Subject></t:CalendarItem></m:Items></m:GetItemResponseMessage></m:ResponseMessages></m:GetItemResponse></s:Body></s:Envelope>"#,
            m = tests::mailbox::MESSAGES,
            t = tests::mailbox::TYPES,
        );
        for stream in listener.incoming().take(20).flatten() {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut skip = vec![0u8; len];
                    if reader.read_exact(&mut skip).is_err() {
                        return;
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    if stream.write_all(head.as_bytes()).is_err()
                        || stream.write_all(body.as_bytes()).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
}

fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn memory_held_for_a_large_inspected_answer_is_given_back() {
    const RULE: &str = r#"
[[rule]]
name = "salesforce-calendar"
groups = ["salesforce"]
auth = ["bearer"]
token = ["callback"]
data = ["calendar"]
action = "allow"
"#;
    let g = Gate::start_edited(0, &tokens(), RULE, |t, _| {
        t.replace(
            "upstream = \"http://127.0.0.1:8080\"",
            "upstream = \"http://127.0.0.1:8090\"",
        )
    });
    big_backend(&g, 8090, 30 << 20);
    let pid = g.daemon.proxy_pid().expect("a proxy");
    let token = g.pki.token(|c| c);
    let soap = requests::get_item(&[TOKEN_ITEM]);
    let mut c = g.https("sf");
    c.ews(&[("Authorization", &format!("Bearer {token}"))], b"")
        .unwrap();
    let baseline = rss_kib(pid);
    let r = c
        .ews(
            &[("Authorization", &format!("Bearer {token}"))],
            soap.as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.len() > 30 << 20, "the whole answer went through");
    let line = wait_audit(&g.audit, |v| {
        v["rule"] == "salesforce-calendar" && v["status"] == 200
    })
    .expect("audited");
    assert!(line["bytes_out"].as_u64().unwrap() > 30 << 20);
    // The connection stays open and idle; what held the answer is given back.
    std::thread::sleep(Duration::from_secs(3));
    let after = rss_kib(pid);
    println!("proxy RssAnon: {baseline} KiB before, {after} KiB after a 30 MiB inspected answer");
    assert!(
        after < baseline + 8 * 1024,
        "{after} KiB after, {baseline} KiB before"
    );
    drop(c);
}

#[test]
fn an_expired_entry_takes_its_note_with_it() {
    let g = Gate::start(0, RULES);
    g.daemon
        .cli(&[
            "block",
            "add",
            "203.0.113.9",
            "--ttl",
            "1",
            "--reason",
            "short-lived-note",
        ])
        .unwrap();
    g.daemon
        .cli(&["block", "add", "203.0.113.10", "--reason", "lasting-note"])
        .unwrap();
    let notes = g.dir.join("ctl.notes.json");
    assert!(fs::read_to_string(&notes)
        .unwrap()
        .contains("short-lived-note"));
    let started = Instant::now();
    while fs::read_to_string(&notes)
        .unwrap()
        .contains("short-lived-note")
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the note outlived its entry"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(fs::read_to_string(&notes).unwrap().contains("lasting-note"));
}

#[test]
fn report_only_rules_say_what_they_would_refuse_and_forward() {
    // A new, narrower rule rolled out in report mode above the rule in force.
    const ROLLOUT: &str = r#"
[[rule]]
name = "phones-calendar-only"
groups = ["offices"]
auth = ["client-cert"]
users = ["phone-*"]
data = ["calendar", "contacts"]
mode = "report"
action = "allow"

[[rule]]
name = "phones-everything"
groups = ["offices"]
auth = ["client-cert"]
users = ["phone-*"]
action = "allow"
"#;
    let g = Gate::start(5, ROLLOUT);
    let mut phone = g.https_with_cert("office", "phone-0042");
    let inbox = phone
        .ews(&[], requests::find_item("inbox", false, None).as_bytes())
        .unwrap();
    assert_eq!(
        inbox.status, 200,
        "enforced: the rule in force allows the inbox"
    );
    let line = wait_audit(&g.audit, |v| v["decision"] == "would-deny").expect("would-deny");
    assert_eq!(line["rule"], "phones-everything");
    assert_eq!(line["report"]["decision"], "deny");
    assert!(
        line["report"]["reason"].as_str().unwrap().contains("email"),
        "{line}"
    );
    let calendar = phone
        .ews(&[], requests::find_item("calendar", true, None).as_bytes())
        .unwrap();
    assert_eq!(calendar.status, 200);
    let last = wait_audit(&g.audit, |v| v["data"] == "calendar").expect("the calendar line");
    assert_eq!(
        last["decision"], "allow",
        "the report rule allows the calendar too: {last}"
    );
    assert!(
        last.get("report").is_none(),
        "no difference to report: {last}"
    );

    // The whole request layer in report mode: refusals are audited, requests forwarded.
    let g = Gate::start_edited(5, &tokens(), RULES, |t, _| {
        t.replace("threads = 1\n", "threads = 1\nmode = \"report\"\n")
    });
    let mut phone = g.https_with_cert("office", "phone-0042");
    for _ in 0..10 {
        let r = phone
            .ews(&[], requests::find_item("inbox", false, None).as_bytes())
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let line = wait_audit(&g.audit, |v| v["decision"] == "would-deny").expect("would-deny");
    assert!(
        line["report"]["reason"]
            .as_str()
            .unwrap()
            .contains("FindItem"),
        "{line}"
    );
    assert!(
        line["failure"].is_null(),
        "a report-mode verdict is no failure"
    );
    assert!(!dropped(&g, "office"));
}

#[test]
fn detection_actions_reach_the_agent_within_its_own_policy() {
    // An ExportItems attempt from an office: refused by the rules, and a detection whose
    // action blocks the source, in a group the agent lets detections block.
    const RULES_EXPORT: &str = r#"
[[rule]]
name = "office-basic"
groups = ["offices"]
auth = ["basic"]
action = "allow"

[detections]
block_groups = ["offices"]
[detections.export_or_impersonation]
action = "block-source"
action_secs = 60
[detections.off_hours]
ignore_groups = ["offices", "salesforce"]
[detections.first_seen_source]
enabled = false
"#;
    let g = Gate::start(0, RULES_EXPORT);
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "bob@example.org:pw"
        )
    );
    let r = g
        .https("office")
        .ews(
            &[("Authorization", &basic)],
            requests::export_items(TOKEN_ITEM).as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 500, "{}", r.body);
    let event = wait_audit(&g.audit, |v| v["kind"] == "detection").expect("the detection fired");
    assert_eq!(event["action"], "block-source", "{event}");
    let started = Instant::now();
    while !dropped(&g, "office") {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the agent never blocked it"
        );
    }
    let list = g.daemon.cli(&["block", "list"]).unwrap();
    assert!(
        list.contains("198.51.100.10") && list.contains("detection"),
        "{list}"
    );

    // The same from a group the agent does not let detections block: alert only.
    let g = Gate::start(
        0,
        &RULES_EXPORT.replace("block_groups = [\"offices\"]", "block_groups = []"),
    );
    let r = g
        .https("office")
        .ews(
            &[("Authorization", &basic)],
            requests::export_items(TOKEN_ITEM).as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 500);
    wait_audit(&g.audit, |v| v["kind"] == "detection").expect("the detection fired");
    std::thread::sleep(Duration::from_secs(1));
    assert!(!dropped(&g, "office"));
}
