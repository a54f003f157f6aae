//! `ewsgate explain` against a real gate in the lab: for each question, the same request is
//! really sent (or the same SYN), and explain's verdict and reason must be what the gate
//! did: the audit line's decision and reason, the packet's fate and the counter it moved.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use ewsgate::identity::tokens::testkit;
use serde_json::Value;
use tests::{
    ews::{audit_lines, now, wait_audit},
    gate::Gate,
    lab::{ewsgate_bin, Netns, GATE_V4},
    mailbox::{requests, TOKEN_ITEM},
};

/// Rules with a login-hours window that excludes the current hour (UTC, the gate's offset
/// is 0), so that "outside hours" is what a real request meets now.
fn rules() -> String {
    let hour = (now() / 3600 % 24) as u16;
    let from = (hour + 3) % 24;
    let to = (hour + 5) % 24;
    format!(
        r#"
[[rule]]
name = "salesforce-token-item"
groups = ["salesforce"]
auth = ["bearer"]
token = ["callback"]
operations = ["GetItem", "GetAttachment"]
scope = "token-item"
action = "allow"

[[rule]]
name = "alice-mail-in-hours"
groups = ["offices"]
auth = ["basic"]
users = ["alice@example.org"]
hours = "{from:02}:00-{to:02}:00"
action = "allow"

[[rule]]
name = "wsdl-in-hours"
groups = ["offices"]
paths = ["/EWS/Services.wsdl"]
hours = "{from:02}:00-{to:02}:00"
action = "allow"

[[rule]]
name = "phones-calendar-contacts"
groups = ["offices"]
auth = ["client-cert", "basic"]
operations = ["read", "sync"]
data = ["calendar", "contacts"]
action = "allow"
"#
    )
}

/// One run of the CLI in the gate's namespace: exit code, standard output, standard error.
fn run(g: &Gate, config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &g.daemon.netns])
        .arg(ewsgate_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("ewsgate runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `explain ARGS --json` against `config`, parsed.
fn explain_with(g: &Gate, config: &Path, args: &[&str]) -> Value {
    let mut all = vec!["explain"];
    all.extend_from_slice(args);
    all.push("--json");
    let (code, out, err) = run(g, config, &all);
    assert_eq!(code, 0, "explain {args:?}: {out}{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("explain --json: {e}: {out}"))
}

fn explain(g: &Gate, args: &[&str]) -> Value {
    explain_with(g, &g.daemon.config, args)
}

fn write(g: &Gate, name: &str, text: &str) -> PathBuf {
    let p = g.dir.join(name);
    fs::write(&p, text).expect("write");
    p
}

fn basic(user: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:secret")))
}

/// Sends `body` from `role` with `auth` and returns the audit line it produced.
fn send(g: &Gate, role: &str, auth: &str, body: &str) -> Value {
    send_to(
        g,
        role,
        "POST",
        "/EWS/Exchange.asmx",
        &[("Authorization", auth)],
        body,
    )
}

/// The same, any method, path and headers.
fn send_to(
    g: &Gate,
    role: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Value {
    let before = audit_lines(&g.audit).len();
    let r = g
        .https(role)
        .request(method, path, headers, body.as_bytes())
        .expect("reply");
    assert!(r.status > 0);
    wait_audit(&g.audit, |_| audit_lines(&g.audit).len() > before)
        .expect("an audit line for the request");
    audit_lines(&g.audit)
        .into_iter()
        .nth(before)
        .expect("the request's audit line")
}

/// explain's verdict equals what the audit line says the gate did.
fn assert_same(what: &str, e: &Value, line: &Value) {
    assert_eq!(
        e["verdict"]["decision"], line["decision"],
        "{what}: decision; explain {e:#}, audit {line}"
    );
    assert_eq!(
        e["verdict"]["reason"], line["reason"],
        "{what}: reason; explain {e:#}, audit {line}"
    );
    assert_eq!(e["verdict"]["rule"], line["rule"], "{what}: rule");
}

fn rule<'a>(e: &'a Value, name: &str) -> &'a Value {
    e["rules"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no rule {name} in {e:#}"))
}

#[test]
fn explain_says_what_the_gate_does_with_the_same_request() {
    let g = Gate::start(0, &rules());
    let token = g.pki.token(|_| testkit::callback_claims_at(now()));
    let token_file = write(&g, "token.jwt", &token);
    let bearer = format!("Bearer {token}");
    let own = write(&g, "own.xml", &requests::get_item(&[TOKEN_ITEM]));
    let other = write(&g, "other.xml", &requests::get_item(&["M-mail-2"]));
    let inbox = write(&g, "inbox.xml", &requests::find_item("inbox", false, None));
    let (tok, own_s, other_s, inbox_s) = (
        token_file.to_str().unwrap(),
        own.to_str().unwrap(),
        other.to_str().unwrap(),
        inbox.to_str().unwrap(),
    );

    // The Salesforce callback token reading its own item: allowed.
    let sf = [
        "--source",
        "198.51.100.140",
        "--auth",
        "bearer",
        "--token",
        tok,
    ];
    let e = explain(&g, &[&sf[..], &["--soap", own_s]].concat());
    assert_eq!(e["packet"]["action"], "pass", "{e:#}");
    assert_eq!(e["packet"]["reason"], "allow_group");
    assert_eq!(e["token"]["verdict"], "valid");
    assert_eq!(e["token"]["item"], TOKEN_ITEM);
    assert_eq!(rule(&e, "salesforce-token-item")["outcome"], "matched");
    let line = send(&g, "sf", &bearer, &requests::get_item(&[TOKEN_ITEM]));
    assert_eq!(line["decision"], "allow");
    assert_same("own item", &e, &line);

    // The same token naming another item: the token's scope.
    let e = explain(&g, &[&sf[..], &["--soap", other_s]].concat());
    let r = rule(&e, "salesforce-token-item");
    assert_eq!(r["outcome"], "failed");
    assert!(r["condition"].as_str().unwrap().contains("scope"), "{r}");
    let line = send(&g, "sf", &bearer, &requests::get_item(&["M-mail-2"]));
    assert_eq!(line["decision"], "deny");
    assert_same("another item", &e, &line);

    // The token from the wrong group: no rule's head matches.
    let office_token = [
        "--source",
        "198.51.100.10",
        "--auth",
        "bearer",
        "--token",
        tok,
    ];
    let e = explain(&g, &[&office_token[..], &["--soap", own_s]].concat());
    let r = rule(&e, "salesforce-token-item");
    assert_eq!(r["outcome"], "failed");
    assert!(
        r["condition"].as_str().unwrap().starts_with("groups"),
        "{r}"
    );
    let line = send(&g, "office", &bearer, &requests::get_item(&[TOKEN_ITEM]));
    assert_eq!(line["decision"], "deny");
    assert_same("wrong group", &e, &line);

    // Basic from an office, mail: outside alice's hours, and the phones rule allows no mail.
    let alice = [
        "--source",
        "198.51.100.10",
        "--auth",
        "basic",
        "--user",
        "alice@example.org",
    ];
    let e = explain(&g, &[&alice[..], &["--soap", inbox_s]].concat());
    assert_eq!(rule(&e, "alice-mail-in-hours")["outcome"], "failed");
    assert!(rule(&e, "alice-mail-in-hours")["condition"]
        .as_str()
        .unwrap()
        .starts_with("hours"));
    let r = rule(&e, "phones-calendar-contacts");
    assert_eq!(r["outcome"], "failed");
    assert!(r["condition"].as_str().unwrap().starts_with("data"), "{r}");
    assert_eq!(e["content"]["data"], "email");
    let line = send(
        &g,
        "office",
        &basic("alice@example.org"),
        &requests::find_item("inbox", false, None),
    );
    assert_eq!(line["decision"], "deny");
    assert_same("outside hours, wrong data type", &e, &line);

    // Outside hours alone: the only rule for the WSDL is closed now.
    let w = explain(
        &g,
        &[
            "--source",
            "198.51.100.10",
            "--auth",
            "none",
            "--path",
            "/EWS/Services.wsdl",
        ],
    );
    let r = rule(&w, "wsdl-in-hours");
    assert_eq!(r["outcome"], "failed", "{w:#}");
    assert!(r["condition"].as_str().unwrap().starts_with("hours"), "{r}");
    let line = send_to(&g, "office", "GET", "/EWS/Services.wsdl", &[], "");
    assert_eq!(line["decision"], "deny");
    assert_same("outside hours", &w, &line);

    // The same question synthesized from --operation/--folder, and at a time inside the
    // window: the hours rule decides.
    let synth = [
        &alice[..],
        &["--operation", "FindItem", "--folder", "inbox"],
    ]
    .concat();
    let e2 = explain(&g, &synth);
    assert_eq!(e2["verdict"], e["verdict"], "--operation explains the same");
    let hour = (now() / 3600 % 24 + 4) % 24;
    let day = time_today(hour);
    let e3 = explain(&g, &[&synth[..], &["--time", &day]].concat());
    assert_eq!(e3["verdict"]["decision"], "allow", "{e3:#}");
    assert_eq!(e3["verdict"]["rule"], "alice-mail-in-hours");

    // Calendar for the phones rule: allowed, as the gate does.
    let calendar = write(&g, "cal.xml", &requests::find_item("calendar", true, None));
    let e = explain(
        &g,
        &[&alice[..], &["--soap", calendar.to_str().unwrap()]].concat(),
    );
    let line = send(
        &g,
        "office",
        &basic("alice@example.org"),
        &requests::find_item("calendar", true, None),
    );
    assert_eq!(line["decision"], "allow");
    assert_same("calendar", &e, &line);

    // The text form names each rule and the verdict.
    let (code, text, err) = run(
        &g,
        &g.daemon.config,
        &[&["explain"][..], &alice[..], &["--soap", inbox_s]].concat(),
    );
    assert_eq!(code, 0, "{err}");
    eprintln!("{text}");
    assert!(text.contains("alice-mail-in-hours"), "{text}");
    assert!(text.contains("verdict      DENY"), "{text}");
}

/// `2026-12-01T<hour>:30` for today (UTC).
fn time_today(hour: u64) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let day = secs / 86_400;
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = day as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{hour:02}:30")
}

/// Whether a TCP connection from `ns` to the gate's port 443 opens.
fn connects(ns: &Netns, timeout: Duration) -> bool {
    let to = std::net::SocketAddr::new(GATE_V4.parse().expect("address"), 443);
    ns.run(move || std::net::TcpStream::connect_timeout(&to, timeout).is_ok())
}

#[test]
fn the_packet_verdict_is_the_live_programs_and_matches_a_real_syn() {
    let g = Gate::start(0, &rules());
    let inet = g.lab.client("inet");

    let e = explain(&g, &["--source", "203.0.113.50", "--auth", "none"]);
    assert_eq!(e["packet"]["action"], "drop", "{e:#}");
    assert_eq!(e["verdict"]["decision"], "drop");
    let reason = e["verdict"]["reason"].as_str().unwrap().to_string();
    assert_eq!(reason, "drop_not_allowed");
    assert!(e["packet"]["by"]
        .as_str()
        .unwrap()
        .contains("BPF_PROG_TEST_RUN"));
    let before = g.daemon.counter(&reason).expect("counter");
    assert!(!connects(inet, Duration::from_millis(800)));
    assert!(g.daemon.counter(&reason).expect("counter") > before);
    // IPv6: the program's answer for the other family's protected address.
    let e = explain(&g, &["--source", "2001:db8:300::50", "--auth", "none"]);
    assert_eq!(e["destination"], "[2001:db8:10::10]:443", "{e:#}");
    assert_eq!(e["verdict"]["reason"], "drop_not_allowed");
    let e = explain(&g, &["--source", "2001:db8:200::10", "--auth", "none"]);
    assert_eq!(e["packet"]["reason"], "allow_group", "{e:#}");

    // A blocked office host: the block set, in the program's order.
    g.daemon
        .cli(&["block", "add", "198.51.100.10"])
        .expect("block");
    let e = explain(&g, &["--source", "198.51.100.10", "--auth", "none"]);
    assert_eq!(e["verdict"]["decision"], "drop", "{e:#}");
    assert_eq!(e["verdict"]["reason"], "drop_blocked");
    let before = g.daemon.counter("drop_blocked").expect("counter");
    assert!(!connects(
        g.lab.client("office"),
        Duration::from_millis(800)
    ));
    assert!(g.daemon.counter("drop_blocked").expect("counter") > before);
    g.daemon
        .cli(&["block", "del", "198.51.100.10"])
        .expect("unblock");
    let e = explain(&g, &["--source", "198.51.100.10", "--auth", "none"]);
    assert_eq!(e["packet"]["reason"], "allow_group", "{e:#}");
    assert!(connects(g.lab.client("office"), Duration::from_secs(3)));
}

#[test]
fn a_config_under_review_is_explained_without_touching_the_gate() {
    let g = Gate::start(0, &rules());
    let running = fs::read_to_string(&g.daemon.config).expect("config");
    // The change under review: the phones rule also allows mail.
    let review = write(
        &g,
        "review.toml",
        &running.replace(
            "data = [\"calendar\", \"contacts\"]",
            "data = [\"calendar\", \"contacts\", \"email\"]",
        ),
    );
    let alice = [
        "--source",
        "198.51.100.10",
        "--auth",
        "basic",
        "--user",
        "alice@example.org",
        "--operation",
        "FindItem",
        "--folder",
        "inbox",
    ];
    let status = |g: &Gate| -> Value {
        serde_json::from_str(&g.daemon.cli(&["status", "--json"]).expect("status")).expect("json")
    };
    let before = status(&g);
    let e = explain_with(&g, &review, &alice);
    assert_eq!(e["verdict"]["decision"], "allow", "{e:#}");
    assert_eq!(e["verdict"]["rule"], "phones-calendar-contacts");
    assert!(e["against"].as_str().unwrap().contains("review.toml"));
    assert!(e["packet"]["by"].as_str().unwrap().contains("not running"));
    // The running gate is unchanged: the same policy and reload, and it explains, and
    // does, a refusal.
    let after = status(&g);
    assert_eq!(before["policy"], after["policy"]);
    assert_eq!(before["last_reload"], after["last_reload"]);
    assert_eq!(
        fs::read_to_string(&g.daemon.config).expect("config"),
        running
    );
    let live = explain(&g, &alice);
    assert_eq!(live["verdict"]["decision"], "deny", "{live:#}");
    let line = send(
        &g,
        "office",
        &basic("alice@example.org"),
        &requests::find_item("inbox", false, None),
    );
    assert_eq!(line["decision"], "deny");
    assert_same("running gate after review", &live, &line);

    // A review file that does not validate: named with its line, exit 2.
    let broken = write(
        &g,
        "broken.toml",
        &running.replace("action = \"allow\"", "action = \"maybe\""),
    );
    let (code, _, err) = run(
        &g,
        &broken,
        &["explain", "--source", "198.51.100.10", "--auth", "basic"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("broken.toml:"), "{err}");
}

#[test]
fn bad_questions_are_usage_errors() {
    let g = Gate::start(0, &rules());
    let cfg = g.daemon.config.clone();
    for (args, says) in [
        (
            vec!["--source", "198.51.100.999", "--auth", "basic"],
            "not an IP address",
        ),
        (
            vec!["--source", "198.51.100.10", "--auth", "password"],
            "unknown --auth",
        ),
        (
            vec![
                "--source",
                "198.51.100.10",
                "--auth",
                "basic",
                "--soap",
                "/nonexistent/x.xml",
            ],
            "--soap",
        ),
        (
            vec![
                "--source",
                "198.51.100.10",
                "--auth",
                "basic",
                "--folder",
                "inbox",
            ],
            "--folder and --item need --operation",
        ),
        (
            vec![
                "--source",
                "198.51.100.10",
                "--auth",
                "basic",
                "--time",
                "yesterday-ish",
            ],
            "--time",
        ),
    ] {
        let (code, out, err) = run(&g, &cfg, &[&["explain"][..], &args[..]].concat());
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Hostile SOAP is the gate's 400, explained, not an error of explain.
    let bad = write(&g, "bad.xml", "<!DOCTYPE x [<!ENTITY a \"b\">]><x/>");
    let e = explain(
        &g,
        &[
            "--source",
            "198.51.100.10",
            "--auth",
            "basic",
            "--user",
            "a@example.org",
            "--soap",
            bad.to_str().unwrap(),
        ],
    );
    assert_eq!(e["verdict"]["status"], 400, "{e:#}");
    assert_eq!(e["verdict"]["failure"], "protocol");
}

#[test]
fn a_report_only_rule_is_explained_as_the_audit_line_reports_it() {
    let rules = r#"
[[rule]]
name = "phones: calendar only"
groups = ["offices"]
auth = ["basic"]
data = ["calendar"]
mode = "report"
action = "allow"

[[rule]]
name = "office-basic"
groups = ["offices"]
auth = ["basic"]
action = "allow"
"#;
    let g = Gate::start(0, rules);
    let alice = [
        "--source",
        "198.51.100.10",
        "--auth",
        "basic",
        "--user",
        "alice@example.org",
        "--operation",
        "FindItem",
        "--folder",
        "inbox",
    ];
    let e = explain(&g, &alice);
    assert_eq!(
        rule(&e, "phones: calendar only")["outcome"],
        "report-only",
        "{e:#}"
    );
    assert_eq!(rule(&e, "office-basic")["outcome"], "matched");
    assert_eq!(e["verdict"]["decision"], "would-deny", "{e:#}");
    assert_eq!(e["report"]["decision"], "deny");
    let line = send(
        &g,
        "office",
        &basic("alice@example.org"),
        &requests::find_item("inbox", false, None),
    );
    assert_same("report-only", &e, &line);
    assert_eq!(e["report"]["reason"], line["report"]["reason"], "{line}");
    assert_eq!(e["report"]["rule"], line["report"]["rule"], "{line}");

    // A token refused for its audience: the identity phase's reason, before any rule.
    let token = g
        .pki
        .token(|c| testkit::with(c, "aud", serde_json::json!("https://evil.example/")));
    let token_file = write(&g, "evil.jwt", &token);
    let own = write(&g, "own.xml", &requests::get_item(&[TOKEN_ITEM]));
    let e = explain(
        &g,
        &[
            "--source",
            "198.51.100.140",
            "--auth",
            "bearer",
            "--token",
            token_file.to_str().unwrap(),
            "--soap",
            own.to_str().unwrap(),
        ],
    );
    assert_eq!(e["token"]["verdict"], "refused", "{e:#}");
    let line = send(
        &g,
        "sf",
        &format!("Bearer {token}"),
        &requests::get_item(&[TOKEN_ITEM]),
    );
    assert_eq!(line["decision"], "deny");
    assert_same("foreign audience", &e, &line);
}
