//! A lab of network namespaces joined by veth pairs, with the addresses of DESIGN.md. Every
//! namespace, mount and process a lab creates is removed when it is dropped, on failure too.

use std::{
    fs,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A unique short tag for names that must not collide between parallel tests.
pub fn tag() -> String {
    format!(
        "{}{}",
        std::process::id() % 10000,
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn sh(cmd: &str) -> anyhow::Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .context("spawning sh")?;
    if !out.status.success() {
        bail!("`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A bpffs mounted in a fresh directory (`ip netns exec` hides /sys/fs/bpf).
pub struct BpfFs {
    pub dir: PathBuf,
}

impl BpfFs {
    pub fn new() -> anyhow::Result<BpfFs> {
        let dir = std::env::temp_dir().join(format!("ewsgate-bpffs-{}", tag()));
        fs::create_dir_all(&dir)?;
        sh(&format!("mount -t bpf bpf {}", dir.display()))?;
        Ok(BpfFs { dir })
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = sh(&format!("umount -l {}", self.dir.display()));
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Sysctls as they were when it was made, written back on drop: for tools that raise them
/// (trafgen raises `net.core.rmem_max` and `wmem_max` to 4 MiB and leaves them there).
pub struct SysctlGuard {
    saved: Vec<(PathBuf, String)>,
}

impl SysctlGuard {
    /// Remembers each named sysctl (`net.core.rmem_max`).
    pub fn save(names: &[&str]) -> anyhow::Result<SysctlGuard> {
        let mut saved = Vec::new();
        for name in names {
            let path = Path::new("/proc/sys").join(name.replace('.', "/"));
            let value = fs::read_to_string(&path)?;
            saved.push((path, value.trim().to_string()));
        }
        Ok(SysctlGuard { saved })
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        for (path, value) in &self.saved {
            if fs::read_to_string(path).is_ok_and(|now| now.trim() != value) {
                let _ = fs::write(path, value);
            }
        }
    }
}

/// A host of the lab: one namespace.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> anyhow::Result<Netns> {
        let name = format!("eg-{role}-{}", tag());
        sh(&format!("ip netns add {name}"))?;
        sh(&format!("ip -n {name} link set lo up"))?;
        Ok(Netns { name })
    }

    pub fn ip(&self, args: &str) -> anyhow::Result<String> {
        sh(&format!("ip -n {} {args}", self.name))
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let file = fs::File::open(&path).expect("open netns");
            // SAFETY: setns on a namespace fd; this thread alone moves.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.name));
    }
}

/// Client roles and their addresses, gate-side interface and gate-side addresses.
pub struct ClientSpec {
    pub role: &'static str,
    pub v4: &'static str,
    pub v6: &'static str,
    pub gw4: &'static str,
    pub gw6: &'static str,
}

pub const OFFICE: ClientSpec = ClientSpec {
    role: "office",
    v4: "198.51.100.10/25",
    v6: "2001:db8:100::10/64",
    gw4: "198.51.100.1/25",
    gw6: "2001:db8:100::1/64",
};
pub const SALESFORCE: ClientSpec = ClientSpec {
    role: "sf",
    v4: "198.51.100.140/25",
    v6: "2001:db8:200::10/64",
    gw4: "198.51.100.129/25",
    gw6: "2001:db8:200::1/64",
};
pub const INTERNET: ClientSpec = ClientSpec {
    role: "inet",
    v4: "203.0.113.50/24",
    v6: "2001:db8:300::50/64",
    gw4: "203.0.113.1/24",
    gw6: "2001:db8:300::1/64",
};

pub const GATE_V4: &str = "192.0.2.10";
pub const GATE_V6: &str = "2001:db8:10::10";

/// The gate host and its clients. The gate's interface toward client `role` is `g-<role>`.
pub struct Lab {
    pub gate: Netns,
    pub clients: Vec<(&'static str, Netns)>,
    stop: Arc<AtomicBool>,
    servers: Vec<thread::JoinHandle<()>>,
}

impl Lab {
    pub fn new(specs: &[ClientSpec]) -> anyhow::Result<Lab> {
        let gate = Netns::new("gate")?;
        gate.ip(&format!("addr add {GATE_V4}/32 dev lo"))?;
        gate.ip(&format!("addr add {GATE_V6}/128 dev lo"))?;
        let mut clients = Vec::new();
        for s in specs {
            let ns = Netns::new(s.role)?;
            let g = format!("g-{}", s.role);
            gate.ip(&format!(
                "link add {g} type veth peer name eth0 netns {}",
                ns.name
            ))?;
            gate.ip(&format!("addr add {} dev {g}", s.gw4))?;
            gate.ip(&format!("addr add {} dev {g} nodad", s.gw6))?;
            gate.ip(&format!("link set {g} up"))?;
            ns.ip(&format!("addr add {} dev eth0", s.v4))?;
            ns.ip(&format!("addr add {} dev eth0 nodad", s.v6))?;
            ns.ip("link set eth0 up")?;
            let gw4 = s.gw4.split('/').next().unwrap_or_default();
            let gw6 = s.gw6.split('/').next().unwrap_or_default();
            ns.ip(&format!("route add default via {gw4}"))?;
            ns.ip(&format!("-6 route add default via {gw6}"))?;
            clients.push((s.role, ns));
        }
        Ok(Lab {
            gate,
            clients,
            stop: Arc::new(AtomicBool::new(false)),
            servers: vec![],
        })
    }

    pub fn client(&self, role: &str) -> &Netns {
        &self
            .clients
            .iter()
            .find(|(r, _)| *r == role)
            .expect("client role")
            .1
    }

    /// Starts an echo server on the gate, on both protected addresses.
    pub fn serve(&mut self, port: u16) -> anyhow::Result<()> {
        for addr in [GATE_V4, GATE_V6] {
            let sa = SocketAddr::new(addr.parse::<IpAddr>()?, port);
            let listener = self
                .gate
                .run(move || TcpListener::bind(sa))
                .context("bind on the gate")?;
            listener.set_nonblocking(true)?;
            let stop = self.stop.clone();
            self.servers
                .push(thread::spawn(move || echo_loop(listener, stop)));
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
    }
}

fn echo_loop(listener: TcpListener, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut s, _)) => {
                thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 64];
                    if let Ok(n) = s.read(&mut buf) {
                        let _ = s.write_all(&buf[..n]);
                    }
                });
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Connects from `ns` to `addr:port`, sends a line and expects it echoed back.
pub fn reach(ns: &Netns, addr: &str, port: u16, timeout: Duration) -> bool {
    let sa = SocketAddr::new(addr.parse().expect("address"), port);
    ns.run(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&sa, timeout) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(timeout));
        if s.write_all(b"ews\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).is_ok() && &buf == b"ews\n"
    })
}

/// The `ewsgate` binary built next to these tests.
pub fn ewsgate_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EWSGATE_BIN") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ewsgate");
    assert!(
        p.exists(),
        "{} missing: build it first (cargo xtask test does)",
        p.display()
    );
    p
}

/// A running `ewsgate run` inside the gate namespace, stopped by its PID on drop. A proxy
/// it left behind (its agent killed with SIGKILL) is stopped by its PID too.
pub struct Daemon {
    pub child: Child,
    pub config: PathBuf,
    pub netns: String,
    pub log: PathBuf,
    /// Proxies orphaned by `kill9`, stopped on drop unless a new agent adopted them.
    pub orphans: Vec<u32>,
}

impl Daemon {
    pub fn start(netns: &Netns, config: &Path, socket: &Path) -> anyhow::Result<Daemon> {
        let log = config.with_extension(format!("log.{}", tag()));
        let child = Command::new("ip")
            .args(["netns", "exec", &netns.name])
            .arg(ewsgate_bin())
            .arg("--config")
            .arg(config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()?;
        let mut d = Daemon {
            child,
            config: config.into(),
            netns: netns.name.clone(),
            log,
            orphans: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(d);
            }
            if let Some(status) = d.child.try_wait()? {
                bail!(
                    "ewsgate exited with {status}: {}",
                    fs::read_to_string(&d.log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "ewsgate did not open its socket: {}",
            fs::read_to_string(&d.log).unwrap_or_default()
        )
    }

    /// `ewsgate ARGS` against this daemon's config, inside its namespace.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(ewsgate_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("ewsgate {args:?}: {text}");
        }
        Ok(text)
    }

    /// Counters from `ewsgate status --json`.
    pub fn counter(&self, name: &str) -> anyhow::Result<u64> {
        let json: serde_json::Value = serde_json::from_str(&self.cli(&["status", "--json"])?)?;
        let counters = json["counters"].as_array().context("counters")?;
        for c in counters {
            if c[0] == name {
                return c[1].as_u64().context("counter value");
            }
        }
        bail!("no counter {name}")
    }

    /// Waits until the agent's proxy has its policy and sockets (a busy machine may take a
    /// while to start it).
    pub fn wait_proxy(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.log().contains("proxy session open") {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!("the proxy never connected to its agent: {}", self.log())
    }

    /// The proxy process the agent started (its child), once it runs.
    pub fn proxy_pid(&self) -> Option<u32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let agent = self.child.id();
        while Instant::now() < deadline {
            let children = fs::read_to_string(format!("/proc/{agent}/task/{agent}/children"))
                .unwrap_or_default();
            let pid = children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .find(|pid| {
                    fs::read_to_string(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c.split('\0').nth(1) == Some("proxy"))
                });
            if pid.is_some() {
                return pid;
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Kills the agent with SIGKILL; its proxy keeps serving (and is remembered, so that it
    /// is stopped when this value is dropped).
    pub fn kill9(&mut self) {
        if let Some(pid) = self.proxy_pid_now() {
            self.orphans.push(pid);
        }
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    fn proxy_pid_now(&self) -> Option<u32> {
        let agent = self.child.id();
        let children =
            fs::read_to_string(format!("/proc/{agent}/task/{agent}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .next()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Stops a process by its PID: SIGTERM, then SIGKILL after two seconds.
pub fn stop_pid(pid: u32) {
    let alive = || Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid);
    // SAFETY: signalling a process this test started, by its PID.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(2);
    while alive() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    if alive() {
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let proxy = self.proxy_pid_now();
        self.stop_agent();
        for pid in proxy.into_iter().chain(self.orphans.drain(..)) {
            stop_pid(pid);
        }
        let _ = fs::remove_file(&self.log);
    }
}

impl Daemon {
    fn stop_agent(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child by its PID.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    let _ = fs::remove_file(&self.log);
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            self.kill9();
        }
        let _ = fs::remove_file(&self.log);
    }
}
