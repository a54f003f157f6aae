//! A fleet lab: a three-member etcd cluster (Debian's etcd-server) in a namespace of its
//! own, its members on that namespace's loopback for their peers and on 192.0.2.200 for
//! the gates, and gates joined to it by one veth each. Every member is stopped by its PID.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::lab::{sh, stop_pid, tag, Netns};

/// Where the gates reach the members.
pub const ETCD_ADDR: &str = "192.0.2.200";
/// Client ports of the three members; each peer port is the client port plus one.
pub const CLIENT_PORTS: [u16; 3] = [2379, 12379, 22379];

pub struct Etcd {
    pub ns: Netns,
    pub dir: PathBuf,
    members: Vec<Option<Child>>,
    links: usize,
}

fn name(i: usize) -> String {
    format!("m{i}")
}

impl Etcd {
    pub fn start() -> anyhow::Result<Etcd> {
        let ns = Netns::new("etcd")?;
        ns.ip(&format!("addr add {ETCD_ADDR}/32 dev lo"))?;
        let dir = std::env::temp_dir().join(format!("ewsgate-etcd-{}", tag()));
        fs::create_dir_all(&dir)?;
        let mut e = Etcd {
            ns,
            dir,
            members: vec![None, None, None],
            links: 0,
        };
        for i in 0..3 {
            e.start_member(i)?;
        }
        e.wait_healthy(Duration::from_secs(30))?;
        Ok(e)
    }

    /// The endpoints a gate's `[fleet]` names.
    pub fn endpoints() -> String {
        CLIENT_PORTS
            .iter()
            .map(|p| format!("\"http://{ETCD_ADDR}:{p}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn cluster() -> String {
        (0..3)
            .map(|i| format!("{}=http://127.0.0.1:{}", name(i), CLIENT_PORTS[i] + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts member `i` (again, with its data: it rejoins).
    pub fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        let port = CLIENT_PORTS[i];
        let data = self.dir.join(name(i));
        let log = fs::File::create(self.dir.join(format!("{}.log", name(i))))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "etcd"])
            .args(["--name", &name(i)])
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!(
                "--listen-client-urls=http://127.0.0.1:{port},http://{ETCD_ADDR}:{port}"
            ))
            .arg(format!("--advertise-client-urls=http://{ETCD_ADDR}:{port}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{}", port + 1))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                port + 1
            ))
            .arg(format!("--initial-cluster={}", Etcd::cluster()))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=ewsgate-lab")
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd (cargo xtask setup installs etcd-server)")?;
        self.members[i] = Some(child);
        Ok(())
    }

    /// Stops member `i` by its PID (`ip netns exec` execs etcd, so the PID is etcd's).
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            stop_pid(c.id());
            let _ = c.wait();
        }
    }

    pub fn stop_all(&mut self) {
        for i in 0..3 {
            self.stop_member(i);
        }
    }

    pub fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..3 {
            if self.members[i].is_none() {
                self.start_member(i)?;
            }
        }
        self.wait_healthy(Duration::from_secs(30))
    }

    /// `etcdctl ARGS` against the running members, inside the namespace.
    pub fn ctl(&self, args: &str) -> anyhow::Result<String> {
        let endpoints: Vec<String> = (0..3)
            .filter(|i| self.members[*i].is_some())
            .map(|i| format!("http://127.0.0.1:{}", CLIENT_PORTS[i]))
            .collect();
        sh(&format!(
            "ETCDCTL_API=3 ip netns exec {} etcdctl --command-timeout=3s --endpoints={} {args}",
            self.ns.name,
            endpoints.join(",")
        ))
    }

    pub fn wait_healthy(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.ctl("put /lab/health ok") {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
            thread::sleep(Duration::from_millis(200));
        }
        bail!("etcd did not become healthy: {last}")
    }

    /// The cluster's current revision.
    pub fn revision(&self) -> anyhow::Result<i64> {
        let out = self.ctl("get /lab/health -w json")?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["header"]["revision"].as_i64().context("revision")
    }

    /// Joins a gate namespace to the members by a veth pair; returns the link's name on
    /// the etcd side (set it down to partition the gate).
    pub fn link(&mut self, gate: &Netns) -> anyhow::Result<String> {
        let i = self.links;
        self.links += 1;
        let theirs = format!("f-g{i}");
        let gate_addr = format!("192.0.2.{}", 129 + 4 * i);
        let our_addr = format!("192.0.2.{}", 130 + 4 * i);
        gate.ip(&format!(
            "link add f-etcd type veth peer name {theirs} netns {}",
            self.ns.name
        ))?;
        gate.ip(&format!("addr add {gate_addr}/30 dev f-etcd"))?;
        gate.ip("link set f-etcd up")?;
        self.ns
            .ip(&format!("addr add {our_addr}/30 dev {theirs}"))?;
        self.ns.ip(&format!("link set {theirs} up"))?;
        gate.ip(&format!("route add {ETCD_ADDR}/32 via {our_addr}"))?;
        Ok(theirs)
    }

    /// Cuts (or heals) the gate behind `link` off etcd.
    pub fn set_link(&self, link: &str, up: bool) -> anyhow::Result<()> {
        self.ns
            .ip(&format!(
                "link set {link} {}",
                if up { "up" } else { "down" }
            ))
            .map(|_| ())
    }

    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(self.dir.join(format!("{}.log", name(i)))).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop_all();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A gate's config text without its own `[xdp]` and `[fleet]` sections: what a fleet push
/// carries.
pub fn shared_part(text: &str) -> String {
    let mut out = String::new();
    let mut skip = false;
    for line in text.lines() {
        if line.starts_with('[') {
            skip = line == "[xdp]" || line == "[fleet]";
        }
        if !skip {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `cargo xtask demo fleet`: two gates and an etcd cluster. A source blocked by one gate's
/// feedback is dropped by the other; a config pushed once runs on both.
pub fn demo() -> anyhow::Result<()> {
    use crate::gate::{gate4, Gate};
    use std::{io::Write, net::TcpStream};

    println!("starting a three-member etcd cluster and two gates, each in its own lab ...");
    let mut etcd = Etcd::start()?;
    let mut gates = Vec::new();
    for i in 1..=2 {
        let fleet = format!(
            "\n[fleet]\nendpoints = [{}]\ngate = \"gate-{i}\"\ntimeout_ms = 1000\n",
            Etcd::endpoints()
        );
        let tokens = format!(
            "metadata_urls = [\"{}\"]\n",
            ewsgate::identity::tokens::testkit::AMURL
        );
        let rules = "[[rule]]\nname = \"offices\"\ngroups = [\"offices\"]\naction = \"allow\"\n";
        let gate = Gate::start_edited(5, &tokens, rules, |text, _| text + &fleet);
        etcd.link(&gate.lab.gate)?;
        gates.push(gate);
    }
    let joined = |g: &Gate| {
        g.daemon
            .cli(&["status", "--json"])
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|s| s["fleet"]["state"] == "connected")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !gates.iter().all(joined) {
        if Instant::now() > deadline {
            bail!("the gates did not join the fleet");
        }
        thread::sleep(Duration::from_millis(100));
    }
    let to = gate4();
    let connects = |g: &Gate, role: &str| {
        g.lab
            .client(role)
            .run(move || TcpStream::connect_timeout(&to, Duration::from_millis(400)).is_ok())
    };
    let table = |title: &str, gates: &[Gate]| {
        println!("\n{title}");
        println!(
            "{:<12} {:<18} {:<12} {:<12}",
            "from", "address", "gate-1", "gate-2"
        );
        for (role, addr) in [
            ("office", "198.51.100.10"),
            ("sf", "198.51.100.140"),
            ("inet", "203.0.113.50"),
        ] {
            let r: Vec<&str> = gates
                .iter()
                .map(|g| {
                    if connects(g, role) {
                        "connected"
                    } else {
                        "DROPPED"
                    }
                })
                .collect();
            println!("{role:<12} {addr:<18} {:<12} {:<12}", r[0], r[1]);
        }
    };
    table("tcp/443 on each gate, before:", &gates);

    println!("\n198.51.100.140 fails five TLS handshakes at gate-1 (plain HTTP to port 443) ...");
    for _ in 0..5 {
        gates[0].lab.client("sf").run(move || {
            if let Ok(mut t) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                let _ = t.write_all(b"GET / HTTP/1.0\r\n\r\n");
                let _ = t.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = std::io::Read::read(&mut t, &mut [0u8; 64]);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while connects(&gates[1], "sf") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    println!("\n$ ewsgate block list   (on gate-2)");
    print!("{}", gates[1].daemon.cli(&["block", "list"])?);
    table("tcp/443 on each gate, after gate-1's feedback:", &gates);

    let text = fs::read_to_string(&gates[0].daemon.config)?;
    let pushed = shared_part(&text).replace(
        "[sources.partner]",
        "[sources.lab-internet]\ncidrs = [\"203.0.113.0/24\"]\n[sources.partner]",
    );
    let file = gates[0].dir.join("fleet.toml");
    fs::write(&file, pushed)?;
    println!("\nthe same config with a new source group (203.0.113.0/24), pushed once:");
    println!("$ ewsgate fleet push fleet.toml");
    print!(
        "{}",
        gates[0]
            .daemon
            .cli(&["fleet", "push", &file.display().to_string()])?
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut status = String::new();
    while Instant::now() < deadline {
        status = gates[0].daemon.cli(&["fleet", "status"])?;
        let json: serde_json::Value =
            serde_json::from_str(&gates[0].daemon.cli(&["fleet", "status", "--json"])?)?;
        let rev = json["revision"].as_i64();
        let gates_json = json["gates"].as_array().cloned().unwrap_or_default();
        if gates_json.len() == 2
            && gates_json
                .iter()
                .all(|g| g["report"]["revision"].as_i64() == rev)
        {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    println!("\n$ ewsgate fleet status");
    print!("{status}");
    table("tcp/443 on each gate, after the push:", &gates);
    println!("\n$ ewsgate status   (on gate-2, the fleet line)");
    for line in gates[1].daemon.cli(&["status"])?.lines() {
        if line.starts_with("fleet") || line.starts_with("last reload") {
            println!("{line}");
        }
    }
    drop(gates);
    drop(etcd);
    println!("\nlab removed");
    Ok(())
}
