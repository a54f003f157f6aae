//! `cargo xtask demo`: builds a lab (office, Salesforce and internet hosts; the gate with a
//! stand-in Exchange mailbox), runs ewsgate on it with the example config, and shows the
//! packet layer (what XDP drops), the content policy (an office phone reads the calendar
//! and is refused the inbox; a Salesforce token is refused an item it was not issued for),
//! the audit lines, `ewsgate explain` of a refused request, a detection firing, a scrape of
//! `/metrics`, the block list, and a restart that keeps filtering. Then removes it all and writes the HTML report
//! of the demo's audit log.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use ewsgate::identity::tokens::testkit;
use tests::{
    ews::{audit_lines, now, Backend, Https, Pki, Reply},
    gate::gate4,
    lab::{tag, BpfFs, Daemon, Lab, GATE_V4, GATE_V6, INTERNET, OFFICE, SALESFORCE},
    mailbox::{requests, TOKEN_ITEM},
};

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("fleet") {
        return tests::fleet::demo();
    }
    let fs_guard = BpfFs::new()?;
    let mut lab = Lab::new(&[OFFICE, SALESFORCE, INTERNET])?;
    lab.serve(8080)?; // another service on the same host, not protected
    let _exchange = Backend::start(&lab.gate)?;
    let dir = std::env::temp_dir().join(format!("ewsgate-demo-{}", tag()));
    let pki = Pki::new(&dir.join("tls"))?;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    fs::copy(
        examples.join("salesforce-ip-ranges.json"),
        dir.join("salesforce-ip-ranges.json"),
    )?;
    let socket = dir.join("control.sock");
    let audit = dir.join("audit.jsonl");
    let config = demo_config(&examples, &fs_guard.dir, &socket, &audit)?;
    let config_path = dir.join("ewsgate.toml");
    fs::write(&config_path, config)?;

    println!("== lab: gate {GATE_V4} / {GATE_V6}, office 198.51.100.10, salesforce 198.51.100.140, internet 203.0.113.50");
    let mut daemon = Daemon::start(&lab.gate, &config_path, &socket)?;
    traffic(
        &lab,
        "ewsgate running: XDP on the gate's links (TCP connect)",
    );
    content(&lab, &pki, &audit)?;
    explain_refused(&daemon)?;
    detection(&lab, &pki, &audit)?;
    scrape(&lab)?;

    println!("\n== ewsgate block add 198.51.100.10 --ttl 5m --reason demo");
    daemon.cli(&[
        "block",
        "add",
        "198.51.100.10",
        "--ttl",
        "5m",
        "--reason",
        "demo",
    ])?;
    row(&lab, "office", GATE_V4, 443);
    print!("{}", daemon.cli(&["block", "list"])?);
    daemon.cli(&["block", "del", "198.51.100.10"])?;
    println!("== ewsgate block del 198.51.100.10");
    row(&lab, "office", GATE_V4, 443);

    println!("\n== kill -9 of the daemon: the pinned program keeps filtering");
    daemon.kill9();
    row(&lab, "inet", GATE_V4, 443);
    let daemon = Daemon::start(&lab.gate, &config_path, &socket)?;
    println!("== a new daemon adopts the pinned state:");
    println!("\n{}", daemon.cli(&["status"])?);
    daemon.cli(&["detach"])?;
    println!("== ewsgate detach: program, links and maps removed; lab removed");
    html_report(&daemon, &audit)?;
    drop(daemon);
    drop(lab);
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

/// The example config, pointed at the lab: its links, certificates minted for the run,
/// the stand-in Exchange over plain HTTP, files in the demo's directory.
fn demo_config(
    examples: &Path,
    bpffs: &Path,
    socket: &Path,
    audit: &Path,
) -> anyhow::Result<String> {
    let text = fs::read_to_string(examples.join("ewsgate.toml"))?;
    let replaced = [
        (
            r#"interfaces = ["eth0"]"#,
            r#"interfaces = ["g-office", "g-sf", "g-inet"]"#.to_string(),
        ),
        (
            "/sys/fs/bpf/ewsgate",
            bpffs.join("ewsgate").display().to_string(),
        ),
        ("/run/ewsgate/control.sock", socket.display().to_string()),
        ("tls/mail.example.org.pem", "tls/gate.pem".into()),
        ("tls/mail.example.org.key", "tls/gate.key".into()),
        (
            r#"# client_ca = "tls/phones-ca.pem""#,
            r#"client_ca = "tls/ca.pem""#.into(),
        ),
        (
            "https://mail.example.org:443\"",
            format!("http://{}\"", tests::ews::BACKEND),
        ),
        (r#"upstream_ca = "tls/exchange-ca.pem""#, String::new()),
        ("/var/log/ewsgate/audit.jsonl", audit.display().to_string()),
    ];
    Ok(replaced
        .iter()
        .fold(text, |t, (from, to)| t.replace(from, to)))
}

fn content(lab: &Lab, pki: &Pki, audit: &Path) -> anyhow::Result<()> {
    println!("\n== EWS through the gate (TLS, SOAP, the stand-in Exchange mailbox)");
    let mut phone = Https::connect(lab.client("office"), gate4(), pki, Some("phone-0042"))?;
    show(
        "office phone, FindItem calendar",
        &phone.ews(&[], requests::find_item("calendar", true, None).as_bytes())?,
    );
    show(
        "office phone, FindItem inbox",
        &phone.ews(&[], requests::find_item("inbox", false, None).as_bytes())?,
    );
    let token = pki.token(|_| testkit::callback_claims_at(now()));
    let auth = format!("Bearer {token}");
    let mut sf = Https::connect(lab.client("sf"), gate4(), pki, None)?;
    show(
        &format!("salesforce token for {TOKEN_ITEM}, GetItem {TOKEN_ITEM}"),
        &sf.ews(
            &[("Authorization", &auth)],
            requests::get_item(&[TOKEN_ITEM]).as_bytes(),
        )?,
    );
    show(
        &format!("salesforce token for {TOKEN_ITEM}, GetItem M-mail-2"),
        &sf.ews(
            &[("Authorization", &auth)],
            requests::get_item(&["M-mail-2"]).as_bytes(),
        )?,
    );
    std::thread::sleep(Duration::from_millis(200));
    println!("\n== audit lines ({})", audit.display());
    for v in audit_lines(audit)
        .into_iter()
        .filter(|v| v["operation"].is_string())
    {
        println!(
            "{} {:<5} {:<11} {:<24} op={} data={} rule={} reason={}",
            v["source"].as_str().unwrap_or("-"),
            v["decision"].as_str().unwrap_or("-"),
            v["auth"].as_str().unwrap_or("-"),
            v["user"].as_str().unwrap_or("-"),
            v["operation"].as_str().unwrap_or("-"),
            v["data"].as_str().unwrap_or("-"),
            v["rule"].as_str().unwrap_or("-"),
            v["reason"].as_str().unwrap_or("-"),
        );
    }
    Ok(())
}

/// `ewsgate explain` of the request the gate just refused: the live program's packet
/// verdict, each rule with the condition that failed, and the reason the audit line carries.
fn explain_refused(daemon: &Daemon) -> anyhow::Result<()> {
    let args = [
        "explain",
        "--source",
        "198.51.100.10",
        "--auth",
        "client-cert",
        "--user",
        "phone-0042",
        "--operation",
        "FindItem",
        "--folder",
        "inbox",
    ];
    println!("\n== ewsgate {}", args.join(" "));
    print!("{}", daemon.cli(&args)?);
    let args = ["explain", "--source", "203.0.113.50", "--auth", "basic"];
    println!("\n== ewsgate {}", args.join(" "));
    print!("{}", daemon.cli(&args)?);
    Ok(())
}

/// A detection firing: the office phone tries `ExportItems`, which the rules refuse and
/// `export-or-impersonation` reports on its first attempt.
fn detection(lab: &Lab, pki: &Pki, audit: &Path) -> anyhow::Result<()> {
    println!("\n== a detection: the office phone tries to export a mailbox item");
    let mut phone = Https::connect(lab.client("office"), gate4(), pki, Some("phone-0042"))?;
    show(
        "office phone, ExportItems",
        &phone.ews(&[], requests::export_items(TOKEN_ITEM).as_bytes())?,
    );
    let fired = tests::ews::wait_audit(audit, |v| {
        v["kind"] == "detection" && v["detection"] == "export-or-impersonation"
    });
    match fired {
        Some(v) => println!(
            "detection {} severity={} subject={} action={} evidence={}",
            v["detection"].as_str().unwrap_or("-"),
            v["severity"].as_str().unwrap_or("-"),
            v["subject"].as_str().unwrap_or("-"),
            v["action"].as_str().unwrap_or("-"),
            v["evidence"]
        ),
        None => println!("(no detection line in the audit log)"),
    }
    Ok(())
}

/// A few lines of `GET /metrics` (the example config's `[metrics] listen`), as Prometheus
/// would scrape them on the gate.
fn scrape(lab: &Lab) -> anyhow::Result<()> {
    println!("\n== curl http://127.0.0.1:9464/metrics (a few lines)");
    let text = lab.gate.run(|| -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect("127.0.0.1:9464")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?;
    let shown = [
        "ewsgate_requests_total{",
        "ewsgate_refusals_total{",
        "ewsgate_detections_total{",
        "ewsgate_packets_total{verdict=\"drop\"",
        "ewsgate_group_packets_total{",
        "ewsgate_agent_up",
    ];
    for line in text
        .lines()
        .filter(|l| shown.iter().any(|s| l.starts_with(s)) && !l.ends_with(" 0"))
    {
        println!("{line}");
    }
    Ok(())
}

/// `ewsgate report --html` of the demo's audit log, kept after the lab is gone.
fn html_report(daemon: &Daemon, audit: &Path) -> anyhow::Result<()> {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ewsgate-demo-report.html");
    let (audit_s, out_s) = (audit.display().to_string(), out.display().to_string());
    let summary = daemon.cli(&["report", &audit_s, "--html", &out_s])?;
    println!("\n== ewsgate report {audit_s} --html ...");
    for line in summary.lines().take(12) {
        println!("{line}");
    }
    let shown = out.canonicalize().unwrap_or(out);
    println!("== HTML report written to {}", shown.display());
    Ok(())
}

fn show(what: &str, r: &Reply) {
    let between = |open: &str, close: &str| -> Vec<String> {
        r.body
            .split(open)
            .skip(1)
            .filter_map(|s| s.split(close).next())
            .map(str::to_string)
            .collect()
    };
    let subjects = between("<t:Subject>", "</t:Subject>");
    let faults = between("<faultstring xml:lang=\"en-US\">", "</faultstring>");
    let detail = if faults.is_empty() {
        format!("items: {}", subjects.join(", "))
    } else {
        format!("SOAP fault: {}", faults.join("; ").replace("&apos;", "'"))
    };
    println!("{what:<58} HTTP {}  {detail}", r.status);
}

fn traffic(lab: &Lab, title: &str) {
    println!("\n== {title}");
    println!("{:<10} {:<18} {:>5}  result", "from", "to", "port");
    for role in ["office", "sf", "inet"] {
        for addr in [GATE_V4, GATE_V6] {
            for port in [443, 8080] {
                row(lab, role, addr, port);
            }
        }
    }
}

fn row(lab: &Lab, role: &str, addr: &str, port: u16) {
    let sa = SocketAddr::new(addr.parse().expect("address"), port);
    let ok = lab
        .client(role)
        .run(move || TcpStream::connect_timeout(&sa, Duration::from_millis(600)).is_ok());
    let name = match role {
        "sf" => "salesforce",
        "inet" => "internet",
        other => other,
    };
    println!(
        "{name:<10} {addr:<18} {port:>5}  {}",
        if ok { "connected" } else { "DROPPED" }
    );
}
