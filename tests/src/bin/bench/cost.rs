//! `cargo xtask bench cost`: what one request costs the proxy, in instructions counted by
//! callgrind. Seconds on a shared machine move with everything else it runs; instruction
//! counts do not, so this is the suite to compare two builds of ewsgate with. (Against
//! HAProxy and nginx, `cargo xtask bench proxy` compares rates in one run.)
//!
//! The agent runs normally; the proxy is started by hand (`spawn = false`) under
//! `valgrind --tool=callgrind`, as the proxy's user. Three runs of the same set-up and
//! warm-up differ only in what follows: nothing, N requests on one kept-alive connection,
//! or M connections with a full handshake and one request each; the differences divided by
//! N and M are the costs. HAProxy under `bench proxy`'s haproxy-tls configuration is counted
//! the same way, as the peer: callgrind sees user space only, so the kernel's share of a
//! request (the system calls) is in neither figure. Written to target/bench/cost.json; each
//! run's callgrind output is kept beside it (`callgrind_annotate
//! target/bench/cost-2000-0.callgrind`). Last, the SOAP parsers alone: the bench's request
//! and Exchange's answer to it, each parsed a thousand times by this program under
//! callgrind (`instructions_per_parse`).
//!
//! And what a request makes the CPU fetch from beyond its own cache: the same requests
//! spread over 64 kept-alive connections in turn, as `bench proxy`'s wrk sends them, under
//! callgrind's cache simulation with this bench machine's data caches (32 KiB L1, 512 KiB
//! L2 a core): `l2_data_misses_per_request`, reads and writes, for ewsgate and HAProxy.
//! Buffers a connection keeps to itself between requests miss here; buffers shared by
//! all and reused at once do not. The kernel's own reads and writes are not simulated.

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
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use serde_json::Value;
use tests::{ews::Pki, lab::BpfFs};

use crate::proxy::{
    get_item_answer, raise_fd_limit, row, soap_body, start_nginx, wait_port, write_configs, Server,
    BACKEND_PORT, SUBJECTS,
};

const KEEPALIVE_REQUESTS: u64 = 2000;
const HANDSHAKES: u64 = 200;
/// Connections the cache runs spread their requests over, as `bench proxy`'s wrk does.
const CACHE_CONNECTIONS: usize = 64;
/// callgrind's cache simulation: the bench machine's L1 data cache and its L2 (a core's
/// own), 8-way, 64-byte lines. The instruction cache is callgrind's default.
const CACHE_SIM: [&str; 3] = ["--cache-sim=yes", "--D1=32768,8,64", "--LL=524288,8,64"];
/// Ports of their own, so that this suite can run beside `bench proxy`.
const PORT: u16 = 19443;
const BACKEND: u16 = 19080;

pub fn run() -> anyhow::Result<()> {
    raise_fd_limit();
    // Three runs of the same set-up: the difference between them is what the requests cost.
    // The bench's rule, and the same under a rule that limits data types (every response
    // read and judged): `bench proxy`'s two ewsgate subjects.
    let base = measure("ewsgate", Load::NONE)?.instructions;
    let keepalive = measure("ewsgate", Load::KEEPALIVE)?.instructions;
    let handshakes = measure("ewsgate", Load::HANDSHAKES)?.instructions;
    let content_base = measure("ewsgate-content", Load::NONE)?.instructions;
    let content = measure("ewsgate-content", Load::KEEPALIVE)?.instructions;
    // HAProxy terminating TLS with no checks (`bench proxy`'s haproxy-tls), counted the same
    // way: a peer's figure for the same requests, which the machine's noise does not move.
    let peer_base = measure("haproxy-tls", Load::NONE)?.instructions;
    let peer = measure("haproxy-tls", Load::KEEPALIVE)?.instructions;
    let peer_handshakes = measure("haproxy-tls", Load::HANDSHAKES)?.instructions;
    let per = |total: u64, base: u64, n: u64| total.saturating_sub(base) as f64 / n as f64;
    let per_request = |subject: &str, total: u64, base: u64| {
        let value = per(total, base, KEEPALIVE_REQUESTS);
        row("instructions_per_request", subject, value, "instructions")
    };
    let per_connection = |subject: &str, total: u64, base: u64| {
        let value = per(total, base, HANDSHAKES);
        row(
            "instructions_per_connection",
            subject,
            value,
            "instructions",
        )
    };
    let mut rows = vec![
        per_request("ewsgate", keepalive, base),
        per_connection("ewsgate", handshakes, base),
        per_request("ewsgate-content", content, content_base),
        per_request("haproxy-tls", peer, peer_base),
        per_connection("haproxy-tls", peer_handshakes, peer_base),
    ];
    for subject in ["ewsgate", "haproxy-tls"] {
        rows.push(cache_row(subject)?);
    }
    rows.extend(soap_rows()?);
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&out)?;
    fs::write(out.join("cost.json"), serde_json::to_string_pretty(&rows)?)?;
    print(&rows);
    Ok(())
}

/// The simulated L2's data misses a request, reads and writes: the same set-up with the 64
/// connections open and warm, run with and without the requests, the difference divided.
fn cache_row(subject: &str) -> anyhow::Result<Value> {
    let base = measure(subject, Load::CACHE_BASE)?;
    let loaded = measure(subject, Load::CACHE)?;
    let misses = loaded.l2_data_misses.saturating_sub(base.l2_data_misses);
    Ok(row(
        "l2_data_misses_per_request",
        subject,
        misses as f64 / KEEPALIVE_REQUESTS as f64,
        "misses",
    ))
}

/// Parses of each document in the SOAP parsers' count.
const SOAP_PARSES: u64 = 1000;

/// The two documents the SOAP parsers read in a request of the bench.
const SOAP_DOCUMENTS: [&str; 2] = ["request", "answer"];

/// The SOAP parsers alone: the bench's request, and Exchange's answer to it (which only the
/// content rule reads). This program parses each once, and `SOAP_PARSES` more times, under
/// callgrind; the difference divided is one parse, apart from the rest of a request.
fn soap_rows() -> anyhow::Result<Vec<Value>> {
    let mut rows = Vec::new();
    for doc in SOAP_DOCUMENTS {
        let once = count_parses(doc, 1)?;
        let many = count_parses(doc, 1 + SOAP_PARSES)?;
        let value = many.saturating_sub(once) as f64 / SOAP_PARSES as f64;
        let subject = format!("soap-{doc}");
        rows.push(row(
            "instructions_per_parse",
            &subject,
            value,
            "instructions",
        ));
    }
    Ok(rows)
}

/// Runs `ewsgate-bench soap-parse DOC N` under callgrind and reads its total.
fn count_parses(doc: &str, n: u64) -> anyhow::Result<u64> {
    let out = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bench")
        .join(format!("cost-soap-{doc}-{n}.callgrind"));
    let status = Command::new("valgrind")
        .args(["--tool=callgrind", "--vgdb=no"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(std::env::current_exe()?)
        .args(["soap-parse", doc, &n.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("valgrind (cargo xtask setup installs it)")?;
    if !status.success() {
        bail!("parsing the SOAP {doc} under callgrind: {status}");
    }
    Ok(callgrind_counts(&out)?.instructions)
}

/// `ewsgate-bench soap-parse request|answer N`: the child [`soap_rows`] counts, which parses
/// the document `N` times and fails on the first refusal.
pub fn parse_soap() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(2);
    let doc = args.next().unwrap_or_default();
    let n: u64 = args
        .next()
        .and_then(|n| n.parse().ok())
        .context("usage: ewsgate-bench soap-parse request|answer N")?;
    let text = match doc.as_str() {
        "request" => soap_body(),
        "answer" => get_item_answer(),
        _ => bail!(
            "no SOAP document '{doc}' (known: {})",
            SOAP_DOCUMENTS.join(", ")
        ),
    };
    let limits = Default::default();
    for _ in 0..n {
        let bytes = std::hint::black_box(text.as_bytes());
        if doc == "request" {
            ewsgate::soap::parse_request(bytes, true, limits)?;
        } else {
            ewsgate::soap::parse_response(bytes, limits)?;
        }
    }
    Ok(())
}

/// What one callgrind run sends the proxy after its warm-up.
#[derive(Clone, Copy)]
struct Load {
    /// Requests on kept-alive connections, taken in turn.
    requests: u64,
    /// Kept-alive connections, each opened and warmed with one request.
    connections: usize,
    /// Connections of one request each, with a full handshake.
    handshakes: u64,
    /// Whether callgrind simulates the caches.
    cache: bool,
}

impl Load {
    const NONE: Load = Load {
        requests: 0,
        connections: 1,
        handshakes: 0,
        cache: false,
    };
    const KEEPALIVE: Load = Load {
        requests: KEEPALIVE_REQUESTS,
        ..Load::NONE
    };
    const HANDSHAKES: Load = Load {
        handshakes: HANDSHAKES,
        ..Load::NONE
    };
    const CACHE_BASE: Load = Load {
        connections: CACHE_CONNECTIONS,
        cache: true,
        ..Load::NONE
    };
    const CACHE: Load = Load {
        requests: KEEPALIVE_REQUESTS,
        ..Load::CACHE_BASE
    };

    /// The name of the run's kept callgrind file.
    fn file(&self, name: &str) -> String {
        let subject = match name {
            "ewsgate" => String::new(),
            _ => format!("{name}-"),
        };
        let cache = if self.cache { "cache-" } else { "" };
        format!(
            "cost-{cache}{subject}{}-{}.callgrind",
            self.requests, self.handshakes
        )
    }
}

/// Starts the agent and the proxy under callgrind, sends a warm-up, then the load, stops
/// both, and returns what callgrind counted for the proxy in all.
fn measure(name: &str, load: Load) -> anyhow::Result<Counts> {
    let Load {
        requests,
        connections,
        handshakes,
        cache,
    } = load;
    let port = SUBJECTS
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.port)
        .with_context(|| format!("no bench subject {name}"))?;
    let dir = std::env::temp_dir().join(format!(
        "ewsgate-bench-cost-{}-{name}-{requests}-{handshakes}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    let pki = Pki::new(&dir)?;
    let bpffs = BpfFs::new()?;
    let public = rcgen::KeyPair::from_pem(&pki.signer.pem_key)?.public_key_pem();
    fs::write(dir.join("exchange-auth.pub.pem"), public)?;
    write_configs(&dir, &bpffs.dir)?;
    let ports = |t: String| {
        t.replace(
            &format!("127.0.0.1:{BACKEND_PORT}"),
            &format!("127.0.0.1:{BACKEND}"),
        )
        .replace(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{PORT}"))
    };
    let backend_conf = dir.join("backend.conf");
    fs::write(&backend_conf, ports(fs::read_to_string(&backend_conf)?))?;
    let mut backend = start_nginx(&dir, "backend", 1)?;
    wait_port(BACKEND, &mut backend.child, &dir.join("backend.log"))?;
    let (agent, mut proxy) = match name {
        "haproxy-tls" => {
            let config = dir.join(format!("{name}.cfg"));
            fs::write(&config, ports(fs::read_to_string(&config)?))?;
            (None, Callgrind::haproxy(&config, &dir, cache)?)
        }
        _ => {
            let config = dir.join(format!("{name}.toml"));
            let text = ports(fs::read_to_string(&config)?)
                .replace("threads = 1\n", "threads = 1\nspawn = false\n");
            fs::write(&config, text)?;
            let (agent, proxy) = start_ewsgate(&config, &dir, cache)?;
            (Some(agent), proxy)
        }
    };
    wait_port(PORT, &mut proxy.child, &dir.join("proxy.log"))?;
    let client = Client::new(&pki)?;
    let mut conn = client.connect()?;
    for _ in 0..50 {
        conn.get_item()?;
    }
    let mut conns = vec![conn];
    while conns.len() < connections {
        let mut c = client.connect()?;
        c.get_item()?;
        conns.push(c);
    }
    let open = conns.len();
    for i in 0..requests as usize {
        conns[i % open].get_item()?;
    }
    drop(conns);
    for _ in 0..handshakes {
        client.connect()?.get_item()?;
    }
    // The agent leaves a proxy it did not spawn running when it stops, so the proxy is
    // stopped by its own PID too; callgrind writes its counts either way.
    drop(agent);
    proxy.stop();
    let counts = proxy.counts()?;
    drop(backend);
    // Kept for `callgrind_annotate`: where the instructions go.
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&out)?;
    fs::copy(&proxy.out, out.join(load.file(name)))?;
    let _ = fs::remove_dir_all(&dir);
    Ok(counts)
}

/// The agent as usual, and the proxy it waits for started by hand under callgrind.
fn start_ewsgate(config: &Path, dir: &Path, cache: bool) -> anyhow::Result<(Server, Callgrind)> {
    let bin = tests::lab::ewsgate_bin();
    let config_arg = config.to_str().context("path")?;
    let agent = Server::start(
        "ewsgate-agent",
        0,
        &bin,
        &["--config", config_arg, "run"],
        &dir.join("agent.log"),
    )?;
    let socket = dir.join("proxy.sock");
    wait_for(|| socket.exists(), "the agent's proxy socket")?;
    let proxy = Callgrind::ewsgate(&bin, &socket, dir, cache)?;
    Ok((agent, proxy))
}

fn print(rows: &[Value]) {
    println!(
        "\nThe proxy's cost in user space, counted by callgrind (1 KB SOAP POST, callback token)"
    );
    for r in rows {
        println!(
            "{:<30} {:<16} {:>10.0} {}",
            r["measure"].as_str().unwrap_or(""),
            r["subject"].as_str().unwrap_or(""),
            r["value"].as_f64().unwrap_or(f64::NAN),
            r["unit"].as_str().unwrap_or("")
        );
    }
    println!("\nwritten to target/bench/cost.json");
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if done() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("{what}: not within 30 s")
}

/// The proxy under callgrind, as the proxy's user, stopped by its PID.
struct Callgrind {
    child: Child,
    out: std::path::PathBuf,
}

impl Callgrind {
    /// ewsgate's proxy, as the proxy's user.
    fn ewsgate(bin: &Path, socket: &Path, dir: &Path, cache: bool) -> anyhow::Result<Callgrind> {
        // The proxy's user writes the counts here.
        std::os::unix::fs::chown(dir, Some(user_id()?), None)?;
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=ewsgate",
            "--regid=ewsgate",
            "--clear-groups",
            "valgrind",
        ]);
        Self::start(cmd, dir, cache, |c| {
            c.arg(bin)
                .args(["proxy", "--threads", "1", "--agent"])
                .arg(socket);
        })
    }

    /// HAProxy in the foreground with `bench proxy`'s haproxy-tls configuration.
    fn haproxy(config: &Path, dir: &Path, cache: bool) -> anyhow::Result<Callgrind> {
        Self::start(Command::new("valgrind"), dir, cache, |c| {
            c.args(["/usr/sbin/haproxy", "-db", "-f"]).arg(config);
        })
    }

    /// `valgrind` (the end of `cmd`) with callgrind's options, then the program `program`
    /// adds.
    fn start(
        mut cmd: Command,
        dir: &Path,
        cache: bool,
        program: impl FnOnce(&mut Command),
    ) -> anyhow::Result<Callgrind> {
        let out = dir.join("callgrind.out");
        if cache {
            cmd.args(CACHE_SIM);
        }
        cmd.args(["--tool=callgrind", "--vgdb=no"])
            .arg(format!("--callgrind-out-file={}", out.display()));
        program(&mut cmd);
        let child = cmd
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("proxy.log"))?)
            .spawn()
            .context("valgrind (cargo xtask setup installs it)")?;
        Ok(Callgrind { child, out })
    }

    fn stop(&self) {
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// Waits for the proxy to exit and reads the totals callgrind wrote.
    fn counts(&mut self) -> anyhow::Result<Counts> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("the proxy did not exit");
            }
            thread::sleep(Duration::from_millis(50));
        }
        let mut counts = callgrind_counts(&self.out)?;
        counts.instructions = counts.instructions.saturating_sub(self.seeding()?);
        Ok(counts)
    }

    /// What aws-lc's once-per-process entropy seeding ran, which the first handshake pays:
    /// jitterentropy loops on timing, so its count differs by millions between two runs
    /// of the same thing and would swamp the difference this suite divides.
    fn seeding(&self) -> anyhow::Result<u64> {
        let out = Command::new("callgrind_annotate")
            .args(["--inclusive=yes", "--threshold=100", "--auto=no"])
            .arg(&self.out)
            .output()
            .context("callgrind_annotate")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .filter(|l| l.contains(SEEDING))
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|n| n.replace(',', "").parse::<u64>().ok())
            .max()
            .unwrap_or(0))
    }
}

/// What a callgrind run counted in all.
struct Counts {
    instructions: u64,
    /// The simulated last-level cache's data misses, reads and writes (0 without the
    /// cache simulation).
    l2_data_misses: u64,
}

/// The totals of a callgrind output file, found by the names its `events:` line gives.
fn callgrind_counts(file: &Path) -> anyhow::Result<Counts> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
    };
    let events = field("events:").with_context(|| format!("no events in {}", file.display()))?;
    let totals = field("summary:")
        .or_else(|| field("totals:"))
        .with_context(|| format!("no total in {}", file.display()))?;
    let count = |event: &str| -> u64 {
        events
            .iter()
            .position(|e| *e == event)
            .and_then(|i| totals.get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Counts {
        instructions: count("Ir"),
        l2_data_misses: count("DLmr") + count("DLmw"),
    })
}

/// aws-lc's entropy set-up, run once per process.
const SEEDING: &str = "tree_jitter_initialize_once";

fn user_id() -> anyhow::Result<u32> {
    let out = Command::new("id").args(["-u", "ewsgate"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

impl Drop for Callgrind {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child by its PID.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

struct Client {
    config: Arc<rustls::ClientConfig>,
    request: String,
}

impl Client {
    fn new(pki: &Pki) -> anyhow::Result<Client> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&pki.ca)? {
            roots.add(c?)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let body = soap_body();
        let request = format!(
            "POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: mail.example.org\r\nAuthorization: Bearer {}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}",
            pki.token(|c| c),
            body.len()
        );
        Ok(Client {
            config: Arc::new(config),
            request,
        })
    }

    fn connect(&self) -> anyhow::Result<Conn<'_>> {
        let tcp = TcpStream::connect(("127.0.0.1", PORT))?;
        tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
        let conn = rustls::ClientConnection::new(
            self.config.clone(),
            ServerName::try_from("mail.example.org")?,
        )?;
        Ok(Conn {
            tls: rustls::StreamOwned::new(conn, tcp),
            request: &self.request,
        })
    }
}

struct Conn<'a> {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    request: &'a str,
}

impl Conn<'_> {
    /// One request and its whole response (Content-Length framed, as the backend sends).
    fn get_item(&mut self) -> anyhow::Result<()> {
        self.tls.write_all(self.request.as_bytes())?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            self.tls.read_exact(&mut byte)?;
            head.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&head);
        if !text.starts_with("HTTP/1.1 200") {
            bail!("{text}");
        }
        let len: usize = text
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_string())
            })
            .and_then(|v| v.parse().ok())
            .context("no Content-Length")?;
        let mut body = vec![0u8; len];
        self.tls.read_exact(&mut body)?;
        Ok(())
    }
}
