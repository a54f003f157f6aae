//! `cargo xtask demo`: builds a lab (office, Salesforce and internet hosts, the gate with a
//! stand-in EWS listener), runs ewsgate on it with the example config, sends traffic from
//! each host, prints what passed and what was dropped, and removes the lab.

use std::{fs, path::Path, time::Duration};

use tests::lab::{reach, tag, BpfFs, Daemon, Lab, GATE_V4, GATE_V6, INTERNET, OFFICE, SALESFORCE};

fn main() -> anyhow::Result<()> {
    let fs_guard = BpfFs::new()?;
    let mut lab = Lab::new(&[OFFICE, SALESFORCE, INTERNET])?;
    lab.serve(443)?; // stand-in for the EWS front (TLS arrives with the request layer)
    lab.serve(8080)?; // another service on the same host, not protected
    let dir = std::env::temp_dir().join(format!("ewsgate-demo-{}", tag()));
    fs::create_dir_all(&dir)?;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    fs::copy(
        examples.join("salesforce-ip-ranges.json"),
        dir.join("salesforce-ip-ranges.json"),
    )?;
    let socket = dir.join("control.sock");
    let config = fs::read_to_string(examples.join("ewsgate.toml"))?
        .replace(
            r#"interfaces = ["eth0"]"#,
            r#"interfaces = ["g-office", "g-sf", "g-inet"]"#,
        )
        .replace(
            "/sys/fs/bpf/ewsgate",
            &fs_guard.dir.join("ewsgate").display().to_string(),
        )
        .replace("/run/ewsgate/control.sock", &socket.display().to_string());
    let config_path = dir.join("ewsgate.toml");
    fs::write(&config_path, config)?;

    println!("== lab: gate {GATE_V4} / {GATE_V6}, office 198.51.100.10, salesforce 198.51.100.140, internet 203.0.113.50");
    let mut daemon = Daemon::start(&lab.gate, &config_path, &socket)?;
    traffic(&lab, "ewsgate running, enforcing");

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
    row(&lab, "office", GATE_V4, 443);
    row(&lab, "inet", GATE_V4, 443);
    let daemon = Daemon::start(&lab.gate, &config_path, &socket)?;
    println!("== a new daemon adopts the pinned state:");
    println!("\n{}", daemon.cli(&["status"])?);
    daemon.cli(&["detach"])?;
    println!("== ewsgate detach: program, links and maps removed; lab removed");
    drop(daemon);
    drop(lab);
    let _ = fs::remove_dir_all(&dir);
    Ok(())
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
    let ok = reach(lab.client(role), addr, port, Duration::from_millis(600));
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
