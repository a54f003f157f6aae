//! `cargo xtask bench proxy`: ewsgate's request layer against HAProxy (with and without
//! `jwt_verify`) and nginx, all terminating TLS with the same certificate in front of the
//! same backend, in one run on this machine. Written to target/bench/proxy.json.
//!
//! The proxy under test is pinned to CPU 0; wrk and the backend share CPU 1. Everything
//! listens on 127.0.0.1. Resumption is off in every subject, so a `Connection: close` run
//! measures full handshakes. All the subjects run from the start and take turns, one round
//! each per turn, so that a shared machine's slow spells fall on all of them alike.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use ewsgate::identity::tokens::testkit;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use serde_json::{json, Value};
use tests::{ews::Pki, lab::BpfFs};

pub(crate) const BACKEND_PORT: u16 = 18080;
const LOAD_SECONDS: u32 = 8;
const KEEPALIVE_ROUNDS: usize = 3;
const HANDSHAKE_ROUNDS: usize = 2;
const CONNECTIONS: u32 = 64;
const IDLE_CONNECTIONS: usize = 1000;

pub(crate) struct Subject {
    pub(crate) name: &'static str,
    pub(crate) port: u16,
}

pub(crate) const SUBJECTS: [Subject; 6] = [
    Subject {
        name: "ewsgate",
        port: 18443,
    },
    // The same, under a rule that limits data types: every response is read and judged.
    Subject {
        name: "ewsgate-content",
        port: 18447,
    },
    Subject {
        name: "haproxy-jwt",
        port: 18444,
    },
    Subject {
        name: "haproxy-tls",
        port: 18445,
    },
    Subject {
        name: "nginx-tls",
        port: 18446,
    },
    // A second ewsgate build under ewsgate's rule, run only when EWSGATE_BIN_B names it:
    // two builds measured in the same turns tell a change of a few percent from the noise.
    Subject {
        name: "ewsgate-b",
        port: 18448,
    },
];

/// A server process pinned to a CPU, stopped by its own PID.
pub(crate) struct Server {
    pub(crate) child: Child,
    name: String,
}

impl Server {
    pub(crate) fn start(
        name: &str,
        cpu: u32,
        program: &Path,
        args: &[&str],
        log: &Path,
    ) -> anyhow::Result<Server> {
        let child = Command::new("taskset")
            .arg("-c")
            .arg(cpu.to_string())
            .arg(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Server {
            child,
            name: name.into(),
        })
    }

    /// The server's PID (taskset execs the program, so it is the child's).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} ignored SIGTERM; killing", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn wait_port(port: u16, child: &mut Child, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "exited with {status}: {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "port {port} never opened: {}",
        fs::read_to_string(log).unwrap_or_default()
    )
}

pub fn run() -> anyhow::Result<()> {
    raise_fd_limit();
    let dir = std::env::temp_dir().join(format!("ewsgate-bench-proxy-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let pki = Pki::new(&dir)?;
    let fs_guard = BpfFs::new()?;
    // HAProxy 2.6's jwt_verify takes a public key file rather than a certificate.
    let public = rcgen::KeyPair::from_pem(&pki.signer.pem_key)?.public_key_pem();
    fs::write(dir.join("exchange-auth.pub.pem"), public)?;
    write_configs(&dir, &fs_guard.dir)?;
    let mut backend = start_nginx(&dir, "backend", 1)?;
    wait_port(BACKEND_PORT, &mut backend.child, &dir.join("backend.log"))?;
    // BENCH_SUBJECTS=ewsgate,nginx-tls narrows a run while working on one subject.
    let only = std::env::var("BENCH_SUBJECTS").ok();
    let build_b = std::env::var_os("EWSGATE_BIN_B");
    let chosen: Vec<&Subject> = SUBJECTS
        .iter()
        .filter(|s| s.name != "ewsgate-b" || build_b.is_some())
        .filter(|s| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n == s.name))
        })
        .collect();
    // Every subject runs from the start; only the one under load does any work.
    let mut servers = Vec::new();
    for subject in &chosen {
        let mut server = start_subject(subject, &dir)?;
        wait_port(
            subject.port,
            &mut server.child,
            &dir.join(format!("{}.log", subject.name)),
        )
        .with_context(|| format!("starting {}", subject.name))?;
        servers.push(server);
    }
    let rows = measure(&chosen, &servers, &pki, &dir)?;
    drop(servers);
    drop(backend);
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&out)?;
    fs::write(out.join("proxy.json"), serde_json::to_string_pretty(&rows)?)?;
    print_table(&rows);
    println!("\nwritten to target/bench/proxy.json");
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

pub(crate) fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max.min(65_536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// All the subjects' measures. Their rounds take turns, one round of each subject after
/// another: on a shared machine a slow spell then falls on every subject alike, rather than
/// on whichever subject's rounds it met.
fn measure(
    subjects: &[&Subject],
    servers: &[Server],
    pki: &Pki,
    dir: &Path,
) -> anyhow::Result<Vec<Value>> {
    let mut rows = Vec::new();
    let keepalive = rounds(subjects, pki, dir, false)?;
    for (subject, rounds) in subjects.iter().zip(&keepalive) {
        let name = subject.name;
        let best = best(rounds);
        rows.push(row("keepalive_rps", name, best.rps, "requests/s"));
        rows.push(row("keepalive_p50_ms", name, best.p50_ms, "ms"));
        rows.push(row("keepalive_p99_ms", name, best.p99_ms, "ms"));
        rows.push(row("keepalive_cpu0_idle_pct", name, best.idle_pct[0], "%"));
        rows.push(row("keepalive_cpu1_idle_pct", name, best.idle_pct[1], "%"));
        let us = busy_us_per(best.idle_pct[0], best.rps);
        rows.push(row("cpu0_us_per_request", name, us, "µs"));
    }
    paired_ratios(subjects, &keepalive, &mut rows);
    // Only the content policy's cost is measured for ewsgate-content; the rest is
    // ewsgate's row.
    let (full, servers): (Vec<&Subject>, Vec<&Server>) = subjects
        .iter()
        .zip(servers)
        .filter(|(s, _)| s.name != "ewsgate-content")
        .unzip();
    let handshakes = rounds(&full, pki, dir, true)?;
    for (subject, rounds) in full.iter().zip(&handshakes) {
        let name = subject.name;
        let best = best(rounds);
        rows.push(row("full_handshakes_per_s", name, best.rps, "handshakes/s"));
        // A CPU 0 left idle means wrk's side of the handshakes, not the subject, set the
        // rate.
        rows.push(row("handshake_cpu0_idle_pct", name, best.idle_pct[0], "%"));
        rows.push(row("handshake_cpu1_idle_pct", name, best.idle_pct[1], "%"));
        let us = busy_us_per(best.idle_pct[0], best.rps);
        rows.push(row("cpu0_us_per_handshake", name, us, "µs"));
    }
    for (subject, server) in full.iter().zip(servers) {
        let (rss, anon) = idle_rss(subject.port, server.pid(), pki)
            .with_context(|| format!("measuring {}", subject.name))?;
        rows.push(row("rss_mb_1000_idle", subject.name, rss, "MB"));
        rows.push(row("anon_mb_1000_idle", subject.name, anon, "MB"));
    }
    Ok(rows)
}

/// Each subject's rounds (keep-alive, or with `close` full handshakes), taken in turns;
/// each round is printed to stderr as it ends.
fn rounds(
    subjects: &[&Subject],
    pki: &Pki,
    dir: &Path,
    close: bool,
) -> anyhow::Result<Vec<Vec<Wrk>>> {
    let (count, what) = match close {
        false => (keepalive_rounds()?, "keep-alive"),
        true => (HANDSHAKE_ROUNDS, "handshake"),
    };
    let mut all: Vec<Vec<Wrk>> = subjects.iter().map(|_| Vec::new()).collect();
    for turn in 0..count {
        // Every other turn runs backwards, so that a machine slowing down or speeding up
        // through a turn does not always favour the same subjects.
        let mut order: Vec<usize> = (0..subjects.len()).collect();
        if turn % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (subject, mine) = (subjects[i], &mut all[i]);
            let w = wrk(subject.port, &pki.token(|c| c), close, dir)
                .with_context(|| format!("measuring {}", subject.name))?;
            eprintln!(
                "{}: {what} round: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, idle CPU 0 {:.0}%, CPU 1 {:.0}%",
                subject.name, w.rps, w.p50_ms, w.p99_ms, w.idle_pct[0], w.idle_pct[1]
            );
            mine.push(w);
        }
    }
    Ok(all)
}

/// KEEPALIVE_ROUNDS, or BENCH_ROUNDS turns (1 to 20) for a closer look at two builds.
fn keepalive_rounds() -> anyhow::Result<usize> {
    let Ok(v) = std::env::var("BENCH_ROUNDS") else {
        return Ok(KEEPALIVE_ROUNDS);
    };
    match v.parse() {
        Ok(n @ 1..=20) => Ok(n),
        _ => bail!("BENCH_ROUNDS={v}: a number of turns from 1 to 20"),
    }
}

/// The fastest round.
fn best(rounds: &[Wrk]) -> &Wrk {
    rounds
        .iter()
        .max_by(|a, b| a.rps.total_cmp(&b.rps))
        .expect("at least one round")
}

/// The ratios the goals are stated in, turn by turn: a subject's round against the other
/// subject's round in the same turn, less than a minute apart. The median over the turns is
/// the row `keepalive_paired_ratio` (subject `ewsgate/haproxy-tls` and so on) for the rate,
/// and `keepalive_p99_paired_ratio` for the 99th percentile of latency: one round's p99
/// moves with the machine as much as its rate does, so the best round's alone says little.
fn paired_ratios(subjects: &[&Subject], keepalive: &[Vec<Wrk>], rows: &mut Vec<Value>) {
    let of = |name: &str| {
        subjects
            .iter()
            .position(|s| s.name == name)
            .map(|i| &keepalive[i])
    };
    let pairs = [
        ("ewsgate", "haproxy-tls"),
        ("ewsgate", "haproxy-jwt"),
        ("ewsgate", "nginx-tls"),
        ("ewsgate-content", "ewsgate"),
        ("ewsgate-b", "ewsgate"),
    ];
    for (a, b) in pairs {
        let (Some(ra), Some(rb)) = (of(a), of(b)) else {
            continue;
        };
        let measures: [PairedMeasure; 2] = [
            ("keepalive_paired_ratio", "", |w| w.rps),
            ("keepalive_p99_paired_ratio", "p99 ", |w| w.p99_ms),
        ];
        for (measure, what, value) in measures {
            let ratios: Vec<f64> = ra
                .iter()
                .zip(rb)
                .map(|(x, y)| value(x) / value(y))
                .collect();
            let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            eprintln!("{what}{a} / {b}, turn by turn: {}", shown.join(", "));
            rows.push(row(measure, &format!("{a}/{b}"), median(ratios), "ratio"));
        }
    }
}

/// A row's measure, the prefix of its printed line, and the value of a round it compares.
type PairedMeasure = (&'static str, &'static str, fn(&Wrk) -> f64);

/// The middle value (the upper one of an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(crate) fn row(measure: &str, subject: &str, value: f64, unit: &str) -> Value {
    json!({"measure": measure, "subject": subject, "value": (value * 100.0).round() / 100.0, "unit": unit})
}

/// A 1 KB SOAP request, as Salesforce's integration would send it.
pub(crate) fn soap_body() -> String {
    let mut body = String::from(
        r#"<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types" xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"><soap:Header><t:RequestServerVersion Version="Exchange2013"/></soap:Header><soap:Body><m:GetItem><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape><m:ItemIds><t:ItemId Id="AAMkAD-item-1="/></m:ItemIds></m:GetItem></soap:Body></soap:Envelope>"#,
    );
    while body.len() < 1024 {
        body.push(' ');
    }
    body
}

struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Idle share of each CPU over the round, in percent: CPU 0 runs the subject, CPU 1
    /// wrk and the backend. A CPU 1 with no idle time left caps the subject's rate.
    idle_pct: [f64; 2],
}

/// Idle and total jiffies of CPU 0 and CPU 1, from /proc/stat.
fn cpu_times() -> anyhow::Result<[(u64, u64); 2]> {
    let stat = fs::read_to_string("/proc/stat")?;
    let mut out = [(0, 0); 2];
    for (i, slot) in out.iter_mut().enumerate() {
        let line = stat
            .lines()
            .find(|l| l.starts_with(&format!("cpu{i} ")))
            .with_context(|| format!("no cpu{i} in /proc/stat"))?;
        let n: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        let idle = n.get(3).copied().unwrap_or(0) + n.get(4).copied().unwrap_or(0);
        *slot = (idle, n.iter().take(8).sum());
    }
    Ok(out)
}

/// CPU 0's busy time per unit of work: what the subject costs, whichever side set the rate.
fn busy_us_per(idle_pct: f64, rate: f64) -> f64 {
    (100.0 - idle_pct) / 100.0 * 1e6 / rate.max(1.0)
}

fn idle_between(a: [(u64, u64); 2], b: [(u64, u64); 2]) -> [f64; 2] {
    let pct = |i: usize| {
        let total = b[i].1.saturating_sub(a[i].1).max(1);
        100.0 * b[i].0.saturating_sub(a[i].0) as f64 / total as f64
    };
    [pct(0), pct(1)]
}

fn wrk(port: u16, token: &str, close: bool, dir: &Path) -> anyhow::Result<Wrk> {
    let script = dir.join("post.lua");
    let mut lua = format!(
        "wrk.method = \"POST\"\nwrk.body = [[{}]]\nwrk.headers[\"Host\"] = \"mail.example.org\"\nwrk.headers[\"Content-Type\"] = \"text/xml; charset=utf-8\"\nwrk.headers[\"Authorization\"] = \"Bearer {token}\"\n",
        soap_body()
    );
    if close {
        lua.push_str("wrk.headers[\"Connection\"] = \"close\"\n");
    }
    fs::write(&script, lua)?;
    let before = cpu_times()?;
    let out = Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1"])
        .arg(format!("-c{CONNECTIONS}"))
        .arg(format!("-d{LOAD_SECONDS}s"))
        .args(["--latency", "-s"])
        .arg(&script)
        .arg(format!("https://127.0.0.1:{port}/EWS/Exchange.asmx"))
        .output()
        .context("running wrk")?;
    let idle_pct = idle_between(before, cpu_times()?);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    // Every response must have been Exchange's 200: a proxy that refuses is not fast.
    if text.contains("Non-2xx") {
        bail!("wrk saw refusals:\n{text}");
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    Ok(Wrk {
        rps,
        p50_ms: percentile(&text, "50%")?,
        p99_ms: percentile(&text, "99%")?,
        idle_pct,
    })
}

/// wrk's "Latency Distribution" line, e.g. "     99%    3.21ms".
fn percentile(text: &str, which: &str) -> anyhow::Result<f64> {
    let value = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(which))
        .map(str::trim)
        .with_context(|| format!("no {which} line in wrk output"))?;
    let (number, unit) = value.split_at(
        value
            .find(|c: char| c.is_alphabetic())
            .unwrap_or(value.len()),
    );
    let n: f64 = number
        .parse()
        .with_context(|| format!("latency '{value}'"))?;
    Ok(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => bail!("latency unit '{unit}'"),
    })
}

/// Opens 1,000 TLS connections, one request on each, holds them idle, and reads the
/// resident memory of the proxy's processes: all of it (VmRSS) and the anonymous part
/// (RssAnon), each summed over the subject's processes.
fn idle_rss(port: u16, pid: u32, pki: &Pki) -> anyhow::Result<(f64, f64)> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&pki.ca)? {
        roots.add(c?)?;
    }
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let token = pki.token(|c| c);
    let body = soap_body();
    let request = format!(
        "POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: mail.example.org\r\nAuthorization: Bearer {token}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut held = Vec::with_capacity(IDLE_CONNECTIONS);
    for i in 0..IDLE_CONNECTIONS {
        let tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let conn = rustls::ClientConnection::new(
            config.clone(),
            ServerName::try_from("mail.example.org")?,
        )?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(request.as_bytes())?;
        let mut head = [0u8; 12];
        tls.read_exact(&mut head)
            .with_context(|| format!("idle connection {i}: no response"))?;
        if &head[9..12] != b"200" {
            bail!("idle connection {i}: {}", String::from_utf8_lossy(&head));
        }
        held.push(tls);
    }
    thread::sleep(Duration::from_secs(2));
    let kib = tree_kib(pid, "VmRSS:")?;
    let anon_kib = tree_kib(pid, "RssAnon:")?;
    // Shared pages (for ewsgate, the XDP tables it mmaps) are not per-connection memory.
    if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
        let parts: Vec<&str> = status
            .lines()
            .filter(|l| {
                l.starts_with("RssAnon") || l.starts_with("RssFile") || l.starts_with("RssShmem")
            })
            .collect();
        println!(
            "  {port}: {}",
            parts
                .join(", ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    drop(held);
    Ok((kib as f64 / 1024.0, anon_kib as f64 / 1024.0))
}

/// A `/proc/PID/status` field of a process and its descendants (nginx's workers, ewsgate's
/// proxy), summed, in KiB.
fn tree_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mut total = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| field.to_string())?;
    let children =
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for c in children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
    {
        total += tree_kib(c, field)?;
    }
    Ok(total)
}

fn start_subject(subject: &Subject, dir: &Path) -> anyhow::Result<Server> {
    let log = dir.join(format!("{}.log", subject.name));
    match subject.name {
        "ewsgate" | "ewsgate-content" | "ewsgate-b" => {
            let bin = match subject.name {
                "ewsgate-b" => std::env::var_os("EWSGATE_BIN_B")
                    .context("EWSGATE_BIN_B")?
                    .into(),
                _ => tests::lab::ewsgate_bin(),
            };
            let config = dir.join(format!("{}.toml", subject.name));
            let config = config.to_str().context("path")?;
            Server::start(subject.name, 0, &bin, &["--config", config, "run"], &log)
        }
        "haproxy-jwt" | "haproxy-tls" => {
            let cfg = dir.join(format!("{}.cfg", subject.name));
            let cfg = cfg.to_str().context("path")?;
            Server::start(
                subject.name,
                0,
                Path::new("/usr/sbin/haproxy"),
                &["-db", "-f", cfg],
                &log,
            )
        }
        _ => start_nginx(dir, "nginx-tls", 0),
    }
}

pub(crate) fn start_nginx(dir: &Path, name: &str, cpu: u32) -> anyhow::Result<Server> {
    let conf = dir.join(format!("{name}.conf"));
    let log = dir.join(format!("{name}.log"));
    let prefix = format!("{}/", dir.display());
    let conf = conf.to_str().context("path")?;
    Server::start(
        name,
        cpu,
        Path::new("/usr/sbin/nginx"),
        &["-p", &prefix, "-c", conf],
        &log,
    )
}

/// What the backend answers every request with: Exchange's answer to the bench's GetItem,
/// a calendar item.
pub(crate) fn get_item_answer() -> String {
    let item = tests::mailbox::Item {
        id: tests::mailbox::TOKEN_ITEM.into(),
        folder: "F-calendar",
        element: "CalendarItem",
        class: "IPM.Appointment",
        subject: "Quarterly review with ACME",
        attachments: vec!["AAMkAD-attachment-1="],
        extra: "",
    };
    tests::mailbox::get_item_response(&[Some(&item)])
}

pub(crate) fn write_configs(dir: &Path, bpffs: &Path) -> anyhow::Result<()> {
    let d = dir.display();
    // Quotes escaped for nginx's `return`.
    let answer = get_item_answer().replace('\'', "\\'");
    let cert = dir.join("gate.pem");
    let key = dir.join("gate.key");
    // HAProxy wants the certificate and key in one file.
    fs::write(
        dir.join("haproxy.pem"),
        format!(
            "{}{}",
            fs::read_to_string(&cert)?,
            fs::read_to_string(&key)?
        ),
    )?;
    fs::write(
        dir.join("backend.conf"),
        format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/backend.pid; error_log {d}/backend-error.log;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 10000000;
  server {{ listen 127.0.0.1:{BACKEND_PORT}; client_body_buffer_size 16k;
    location / {{ default_type text/xml; return 200 '{answer}'; }} }} }}
"
        ),
    )?;
    fs::write(
        dir.join("nginx-tls.conf"),
        format!(
            "daemon off; master_process off; worker_processes 1; worker_rlimit_nofile 65536; pid {d}/nginx.pid; error_log {d}/nginx-error.log;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 10000000;
  upstream be {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 128; }}
  server {{ listen 127.0.0.1:18446 ssl; ssl_certificate {d}/gate.pem; ssl_certificate_key {d}/gate.key;
    ssl_session_cache off; ssl_session_tickets off;
    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}
"
        ),
    )?;
    let haproxy = |jwt: bool, port: u16| {
        let check = if jwt {
            format!(
                "    http-request set-var(txn.bearer) http_auth_bearer
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
    http-request deny unless {{ var(txn.alg) -m str RS256 }}
    http-request deny unless {{ var(txn.bearer),jwt_verify(txn.alg,\"{d}/exchange-auth.pub.pem\") -m int 1 }}
"
            )
        } else {
            String::new()
        };
        format!(
            "global
    nbthread 1
    maxconn 4000
    tune.ssl.cachesize 0
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend fe
    bind 127.0.0.1:{port} ssl crt {d}/haproxy.pem alpn http/1.1 no-tls-tickets
    acl lab src 127.0.0.0/8
    http-request deny unless lab
{check}    default_backend be
backend be
    server exchange 127.0.0.1:{BACKEND_PORT}
"
        )
    };
    fs::write(dir.join("haproxy-jwt.cfg"), haproxy(true, 18444))?;
    fs::write(dir.join("haproxy-tls.cfg"), haproxy(false, 18445))?;
    for (name, port, limit) in [
        ("ewsgate", 18443, ""),
        ("ewsgate-b", 18448, ""),
        (
            "ewsgate-content",
            18447,
            "operations = [\"GetItem\"]\ndata = [\"calendar\"]\n",
        ),
    ] {
        fs::write(
            dir.join(format!("{name}.toml")),
            format!(
                r#"[xdp]
interfaces = []
pin_dir = "{pins}"
control_socket = "{d}/{name}.sock"

[sources.lab]
cidrs = ["127.0.0.0/8"]

[proxy]
listen = ["127.0.0.1:{port}"]
certificate = "gate.pem"
private_key = "gate.key"
upstream = "http://127.0.0.1:{BACKEND_PORT}"
audit_log = "{name}-audit.jsonl"
tls_resumption = false
threads = 1
[proxy.limits]
connections_per_source = 5000

[tokens]
audiences = ["{aud}"]
issuers = ["{iss}"]
metadata_urls = ["{amurl}"]
certificates = ["exchange-auth.pem"]

[[rule]]
name = "salesforce-callback"
groups = ["lab"]
auth = ["bearer"]
token = ["callback"]
{limit}action = "allow"
"#,
                pins = bpffs.join(name).display(),
                aud = testkit::AUD,
                iss = testkit::ISS,
                amurl = testkit::AMURL,
            ),
        )?;
    }
    Ok(())
}

fn print_table(rows: &[Value]) {
    let get = |m: &str, s: &str| {
        rows.iter()
            .find(|r| r["measure"] == m && r["subject"] == s)
            .and_then(|r| r["value"].as_f64())
            .unwrap_or(f64::NAN)
    };
    println!("\nTLS proxy, 1 KB SOAP POST with a callback token; proxy on CPU 0, wrk (1 thread, {CONNECTIONS} connections) and backend on CPU 1");
    println!(
        "{:<16} {:>12} {:>9} {:>9} {:>14} {:>14} {:>14} {:>12}",
        "subject",
        "keepalive/s",
        "p50 ms",
        "p99 ms",
        "handshakes/s",
        "RSS 1000 idle",
        "anon 1000 idle",
        "idle CPU0/1"
    );
    let measured = |s: &&str| rows.iter().any(|r| r["subject"] == *s);
    for s in SUBJECTS.iter().map(|s| s.name).filter(measured) {
        println!(
            "{s:<16} {:>12.0} {:>9.2} {:>9.2} {:>14.0} {:>11.1} MB {:>11.1} MB {:>5.0}%/{:.0}%",
            get("keepalive_rps", s),
            get("keepalive_p50_ms", s),
            get("keepalive_p99_ms", s),
            get("full_handshakes_per_s", s),
            get("rss_mb_1000_idle", s),
            get("anon_mb_1000_idle", s),
            get("keepalive_cpu0_idle_pct", s),
            get("keepalive_cpu1_idle_pct", s)
        );
    }
    let e = get("keepalive_rps", "ewsgate");
    println!(
        "\nratios: ewsgate / haproxy-jwt = {:.2}, ewsgate / haproxy-tls = {:.2}, ewsgate / nginx-tls = {:.2}, handshakes ewsgate / haproxy-tls = {:.2}",
        e / get("keepalive_rps", "haproxy-jwt"),
        e / get("keepalive_rps", "haproxy-tls"),
        e / get("keepalive_rps", "nginx-tls"),
        get("full_handshakes_per_s", "ewsgate") / get("full_handshakes_per_s", "haproxy-tls"),
    );
    println!(
        "content policy: ewsgate-content / ewsgate = {:.2} (the response of every request read and judged)",
        get("keepalive_rps", "ewsgate-content") / e,
    );
    let paired = |pair: &str| get("keepalive_paired_ratio", pair);
    println!(
        "turn by turn (the median of the ratios of rounds taken in the same turn): ewsgate / haproxy-tls = {:.2}, ewsgate / haproxy-jwt = {:.2}, ewsgate / nginx-tls = {:.2}, ewsgate-content / ewsgate = {:.2}",
        paired("ewsgate/haproxy-tls"),
        paired("ewsgate/haproxy-jwt"),
        paired("ewsgate/nginx-tls"),
        paired("ewsgate-content/ewsgate"),
    );
    println!(
        "p99 turn by turn (lower is better): ewsgate / haproxy-tls = {:.2}, ewsgate-content / ewsgate = {:.2}",
        get("keepalive_p99_paired_ratio", "ewsgate/haproxy-tls"),
        get("keepalive_p99_paired_ratio", "ewsgate-content/ewsgate"),
    );
    if measured(&"ewsgate-b") {
        println!(
            "two builds (EWSGATE_BIN_B against EWSGATE_BIN), turn by turn: ewsgate-b / ewsgate = {:.2}",
            paired("ewsgate-b/ewsgate")
        );
    }
    println!(
        "\nCPU 0 busy time per unit of work (what the subject costs, whichever CPU set the rate):"
    );
    for s in SUBJECTS.iter().map(|s| s.name).filter(measured) {
        println!(
            "{s:<16} {:>7.1} µs per keep-alive request {:>8.1} µs per handshake (idle CPU 0/1 while handshaking: {:.0}%/{:.0}%)",
            get("cpu0_us_per_request", s),
            get("cpu0_us_per_handshake", s),
            get("handshake_cpu0_idle_pct", s),
            get("handshake_cpu1_idle_pct", s),
        );
    }
}
