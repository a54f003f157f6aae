//! The Debian package as an administrator meets it: lintian finds no error in it; it
//! installs on a clean Debian 12 root and `ewsgate check` passes on the conffile it ships; an
//! upgrade under steady traffic loses no allowed connection and lets no disallowed packet
//! past XDP (the new agent's program replaces the old one on the pinned links); stopping the
//! agent and removing the package leave the filter enforcing; purging detaches it and
//! leaves no pins, units, user or config.
//!
//! Root is needed. Two packages are built once per run from `EWSGATE_BIN` with
//! `cargo xtask package --fast` (the same binary under two versions: the upgrade path is the
//! package's, not the code's). The Debian 12 root is made once with debootstrap (which needs
//! a Debian mirror) and kept under target/package-test; each run installs into a fresh
//! overlay of it and chroots there. systemd does not run inside the root: the test does what
//! the units would (start the agent, restart it after the upgrade, stop it) with the
//! installed binary, on a lab of network namespaces.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

use tests::lab::{
    reach, sh, stop_pid, tag, BpfFs, Lab, Netns, GATE_V4, INTERNET, OFFICE, SALESFORCE,
};

const OK: Duration = Duration::from_secs(2);
/// A dropped SYN is retried after 1 s; 400 ms shows the first one went nowhere.
const DROPPED: Duration = Duration::from_millis(400);
const MIRROR: &str = "http://deb.debian.org/debian";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("workspace root")
}

fn cache() -> PathBuf {
    workspace().join("target/package-test")
}

/// The previous build and the new one.
struct Debs {
    old: PathBuf,
    new: PathBuf,
}

fn debs() -> &'static Debs {
    static DEBS: OnceLock<Debs> = OnceLock::new();
    DEBS.get_or_init(|| {
        let dir = cache().join("debs");
        fs::create_dir_all(&dir).expect("deb dir");
        Debs {
            old: build_deb("0.1.0-1", &dir.join("ewsgate_old.deb")),
            new: build_deb("0.1.0-2", &dir.join("ewsgate_new.deb")),
        }
    })
}

fn build_deb(version: &str, out: &Path) -> PathBuf {
    let started = Instant::now();
    let output = Command::new("cargo")
        .args([
            "xtask",
            "package",
            "--fast",
            "--deb-version",
            version,
            "--bin",
        ])
        .arg(tests::lab::ewsgate_bin())
        .arg("-o")
        .arg(out)
        .current_dir(workspace())
        .output()
        .expect("running cargo xtask package");
    assert!(
        output.status.success(),
        "cargo xtask package: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(out.exists(), "{} was not written", out.display());
    eprintln!(
        "package {version}: built in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    out.to_path_buf()
}

/// A minimal Debian 12 with systemd (for systemd-sysusers and the unit helpers), made once.
fn debian_root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = cache().join("debian12-root");
        if root.join("usr/bin/apt-get").exists() {
            return root;
        }
        let started = Instant::now();
        let partial = cache().join(format!("debian12-root.partial-{}", std::process::id()));
        let _ = fs::remove_dir_all(&partial);
        let out = Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--include=systemd,systemd-sysv,dbus,iproute2,ca-certificates",
                "bookworm",
            ])
            .arg(&partial)
            .arg(MIRROR)
            .output()
            .expect("running debootstrap");
        assert!(
            out.status.success(),
            "debootstrap: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::rename(&partial, &root).expect("keeping the Debian root");
        eprintln!(
            "debootstrap: {:.0} s (kept in {})",
            started.elapsed().as_secs_f64(),
            root.display()
        );
        root
    })
    .clone()
}

/// A fresh copy of the Debian root (an overlay over the cached one) with /proc, /dev/pts
/// and the lab's bpffs mounted inside, all unmounted on drop.
struct Chroot {
    dir: PathBuf,
    root: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Chroot {
    fn new(bpffs: &Path) -> Chroot {
        let dir = std::env::temp_dir().join(format!("ewsgate-pkg-{}", tag()));
        let root = dir.join("root");
        for d in ["upper", "work", "root"] {
            fs::create_dir_all(dir.join(d)).expect("overlay dirs");
        }
        let mut c = Chroot {
            dir: dir.clone(),
            root: root.clone(),
            mounts: Vec::new(),
        };
        sh(&format!(
            "mount -t overlay overlay -o lowerdir={},upperdir={},workdir={} {}",
            debian_root().display(),
            dir.join("upper").display(),
            dir.join("work").display(),
            root.display()
        ))
        .expect("overlay");
        c.mounts.push(root.clone());
        sh(&format!("mount -t proc proc {}/proc", root.display())).expect("proc");
        c.mounts.push(root.join("proc"));
        fs::create_dir_all(root.join("dev/pts")).expect("dev/pts");
        sh(&format!("mount --bind /dev/pts {}/dev/pts", root.display())).expect("dev/pts");
        c.mounts.push(root.join("dev/pts"));
        // The pins live on the lab's bpffs; inside the root at the same path, so that the
        // maintainer scripts see what the agent pinned.
        let inside = c.path(bpffs);
        fs::create_dir_all(&inside).expect("bpffs mount point");
        sh(&format!(
            "mount --bind {} {}",
            bpffs.display(),
            inside.display()
        ))
        .expect("bpffs bind");
        c.mounts.push(inside);
        c
    }

    /// Unmounts /proc, /dev/pts and the bpffs again, leaving the overlay (before a boot,
    /// which mounts its own).
    fn release_mounts(&mut self) {
        while self.mounts.len() > 1 {
            if let Some(m) = self.mounts.pop() {
                sh(&format!("umount {}", m.display())).expect("umount");
            }
        }
    }

    /// A path inside the root, as the host sees it.
    fn path(&self, inside: &Path) -> PathBuf {
        self.root.join(inside.strip_prefix("/").unwrap_or(inside))
    }

    /// Runs a command inside the root; returns whether it succeeded and what it printed.
    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("chroot")
            .arg(&self.root)
            .args(args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LANG", "C")
            .output()
            .expect("running chroot");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn must(&self, args: &[&str]) -> String {
        let (ok, text) = self.run(args);
        assert!(ok, "{args:?} failed inside the Debian root: {text}");
        text
    }

    /// apt-get, offline: only the package and what the root holds already.
    fn apt(&self, args: &[&str]) -> String {
        let mut all = vec![
            "apt-get",
            "-y",
            "-q",
            "--no-install-recommends",
            "-o",
            "Dpkg::Options::=--force-confold",
        ];
        all.extend_from_slice(args);
        self.must(&all)
    }

    /// Copies a package into the root's /tmp and returns its path there.
    fn put(&self, deb: &Path, name: &str) -> String {
        let inside = format!("/tmp/{name}");
        fs::copy(deb, self.path(Path::new(&inside))).expect("copying the package");
        inside
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = sh(&format!("umount -l {}", m.display()));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The agent as its unit runs it, from the installed tree, in the gate's namespace.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(gate: &Netns, bin: &Path, config: &Path, socket: &Path) -> Agent {
        let log = socket.with_extension(format!("log.{}", tag()));
        let child = Command::new("ip")
            .args(["netns", "exec", &gate.name])
            .arg(bin)
            .arg("--config")
            .arg(config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("starting the agent");
        let mut agent = Agent { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("the agent exited with {status}: {}", agent.log());
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not open its socket: {}",
                agent.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as `systemctl stop` sends, and wait for the exit.
    fn stop(mut self) {
        stop_pid(self.child.id());
        let status = self.child.wait().expect("agent exit");
        assert!(status.success(), "agent exit {status}: {}", self.log());
        let _ = fs::remove_file(&self.log);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            stop_pid(self.child.id());
            let _ = self.child.wait();
        }
    }
}

/// Packets to the protected port that got past XDP into the gate's stack, per source,
/// counted by nftables' input hook.
struct Counters {
    gate: String,
    table: String,
}

impl Counters {
    fn new(gate: &Netns) -> Counters {
        let table = format!("egpkg{}", tag());
        let rules = format!(
            "table inet {table} {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  \
             ip saddr 203.0.113.50 tcp dport 443 counter\n  \
             ip saddr 198.51.100.10 tcp dport 443 counter\n }}\n}}\n"
        );
        let path = std::env::temp_dir().join(format!("{table}.nft"));
        fs::write(&path, rules).expect("nft rules");
        sh(&format!(
            "ip netns exec {} nft -f {}",
            gate.name,
            path.display()
        ))
        .expect("nft");
        let _ = fs::remove_file(&path);
        Counters {
            gate: gate.name.clone(),
            table,
        }
    }

    /// Packets from `source` so far.
    fn packets(&self, source: &str) -> u64 {
        let text = sh(&format!(
            "ip netns exec {} nft list table inet {}",
            self.gate, self.table
        ))
        .expect("nft list");
        let line = text
            .lines()
            .find(|l| l.contains(&format!("saddr {source} ")))
            .unwrap_or_else(|| panic!("no counter for {source}: {text}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "packets").expect("packets");
        words[at + 1].parse().expect("packet count")
    }
}

/// The XDP program id on a gate interface (`prog/xdp id N`), if one is attached.
fn xdp_prog(gate: &Netns, iface: &str) -> Option<u32> {
    let text = gate.ip(&format!("-d link show {iface}")).ok()?;
    let after = text.split("prog/xdp id ").nth(1)?;
    after.split_whitespace().next()?.parse().ok()
}

/// Connections from `ns`, one after another, until `stop` (60 s and 5000 at most); returns
/// (made, failed).
fn steady(
    ns: &Netns,
    timeout: Duration,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(usize, usize)> {
    let ns_path = format!("/run/netns/{}", ns.name);
    thread::spawn(move || {
        let file = fs::File::open(&ns_path).expect("netns");
        // SAFETY: setns on this thread only.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        let sa = format!("{GATE_V4}:443").parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut made, mut failed) = (0, 0);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && made + failed < 5000 {
            match std::net::TcpStream::connect_timeout(&sa, timeout) {
                Ok(_) => made += 1,
                Err(_) => failed += 1,
            }
            thread::sleep(Duration::from_millis(5));
        }
        (made, failed)
    })
}

#[test]
fn lintian_finds_no_errors() {
    let deb = &debs().new;
    let out = Command::new("lintian")
        .args(["--fail-on", "error", "--tag-display-limit", "0"])
        .arg(deb)
        .output()
        .expect("running lintian");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("lintian:\n{text}");
    assert!(
        out.status.success(),
        "lintian failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.lines().any(|l| l.starts_with("E:")),
        "lintian errors: {text}"
    );
}

/// Each unit's `systemd-analyze security` exposure (0 best, 10 worst), printed and held
/// under a ceiling so that a loosened unit fails.
#[test]
fn units_are_hardened() {
    for (unit, ceiling) in [("ewsgate.service", 3.5), ("ewsgate-proxy.service", 1.5)] {
        let path = workspace().join("pkg").join(unit);
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path)
            .output()
            .expect("running systemd-analyze");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure level: {text}"));
        eprintln!("{line}");
        let level: f64 = line
            .split(':')
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unreadable: {line}"));
        assert!(level <= ceiling, "{unit}: exposure {level} > {ceiling}");
    }
}

#[test]
fn installs_upgrades_under_traffic_and_purges() {
    let started = Instant::now();
    let debs = debs();
    let bpffs = BpfFs::new().expect("bpffs");
    let c = Chroot::new(&bpffs.dir);

    // A clean install: the user, the units, the conffile, which `check` accepts as shipped.
    let old = c.put(&debs.old, "ewsgate_old.deb");
    let out = c.apt(&["install", &old]);
    assert!(out.contains("monitor mode"), "{out}");
    let check = c.must(&["ewsgate", "--config", "/etc/ewsgate/ewsgate.toml", "check"]);
    assert!(check.starts_with("ok:"), "{check}");
    let conf = fs::read_to_string(c.path(Path::new("/etc/ewsgate/ewsgate.toml"))).unwrap();
    assert!(conf.contains("\nmonitor = true"), "{conf}");
    c.must(&["getent", "passwd", "ewsgate"]);
    for unit in ["ewsgate.service", "ewsgate-proxy.service"] {
        let path = c.path(&Path::new("/usr/lib/systemd/system").join(unit));
        assert!(path.exists(), "{} missing", path.display());
    }
    for file in [
        "/usr/share/man/man8/ewsgate.8.gz",
        "/usr/share/man/man8/ewsgate-block-add.8.gz",
        "/usr/share/bash-completion/completions/ewsgate",
        "/etc/logrotate.d/ewsgate",
    ] {
        assert!(c.path(Path::new(file)).exists(), "{file} missing");
    }

    // The administrator's config: the lab's gate, enforcing, offices allowed.
    let mut lab = Lab::new(&[OFFICE, SALESFORCE, INTERNET]).expect("lab");
    lab.serve(443).expect("listener");
    let pin_dir = bpffs.dir.join("ewsgate");
    let socket = c.dir.join("control.sock");
    let config = c.path(Path::new("/etc/ewsgate/ewsgate.toml"));
    let text = format!(
        "{}\n[sources.offices]\ncidrs = [\"198.51.100.0/25\", \"2001:db8:100::/64\"]\n",
        tests::lab_xdp_config(&pin_dir, &socket, "native")
    );
    fs::write(&config, text).expect("writing the config");
    let bin = c.path(Path::new("/usr/sbin/ewsgate"));
    let agent = Agent::start(&lab.gate, &bin, &config, &socket);
    let office = lab.client("office");
    let inet = lab.client("inet");
    assert!(reach(office, GATE_V4, 443, OK), "office before the upgrade");
    assert!(
        !reach(inet, GATE_V4, 443, DROPPED),
        "internet before the upgrade"
    );
    let counters = Counters::new(&lab.gate);
    let prog_before = xdp_prog(&lab.gate, "g-office").expect("XDP attached");

    // The upgrade under steady traffic: dpkg replaces the files, then the agent restarts as
    // the postinst's `try-restart` does: SIGTERM, and the new binary starts.
    let stop = Arc::new(AtomicBool::new(false));
    let allowed = steady(office, Duration::from_millis(900), stop.clone());
    let denied = steady(inet, Duration::from_millis(200), stop.clone());
    thread::sleep(Duration::from_millis(500));
    let new = c.put(&debs.new, "ewsgate_new.deb");
    let out = c.apt(&["install", &new]);
    assert!(out.contains("Unpacking ewsgate (0.1.0-2)"), "{out}");
    agent.stop();
    let agent = Agent::start(&lab.gate, &bin, &config, &socket);
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let (made, failed) = allowed.join().expect("office traffic");
    let (through, _) = denied.join().expect("internet traffic");
    eprintln!("upgrade: office {made} connections, {failed} failed; internet {through} through");
    assert!(
        made > 20,
        "only {made} office connections during the upgrade"
    );
    assert_eq!(failed, 0, "{failed} office connections lost in the upgrade");
    assert_eq!(through, 0, "{through} internet connections got through");
    let leaked = counters.packets("203.0.113.50");
    assert_eq!(leaked, 0, "{leaked} internet packets passed XDP");
    assert!(counters.packets("198.51.100.10") > 0, "the counter counts");
    let prog_after = xdp_prog(&lab.gate, "g-office").expect("XDP attached after");
    assert_ne!(
        prog_before, prog_after,
        "the new agent's program is in the link"
    );
    let version = c.must(&["dpkg-query", "-W", "-f=${Version}", "ewsgate"]);
    assert_eq!(version, "0.1.0-2");

    // `systemctl stop`: the agent exits, the pinned program goes on enforcing.
    agent.stop();
    assert!(reach(office, GATE_V4, 443, OK), "office after stop");
    assert!(!reach(inet, GATE_V4, 443, DROPPED), "internet after stop");

    // `apt remove`: the program stays, and the package says so.
    let out = c.apt(&["remove", "ewsgate"]);
    assert!(out.contains("stays attached and enforcing"), "{out}");
    assert!(pin_dir.exists(), "remove kept the pins");
    assert!(!reach(inet, GATE_V4, 443, DROPPED), "internet after remove");
    assert!(config.exists(), "remove keeps the conffile");

    // `apt purge`: detached, and nothing of the package is left.
    let out = c.apt(&["purge", "ewsgate"]);
    assert!(out.contains("XDP program detached"), "{out}");
    assert!(!pin_dir.exists(), "pins left behind");
    assert_eq!(xdp_prog(&lab.gate, "g-office"), None, "XDP still attached");
    assert!(reach(inet, GATE_V4, 443, OK), "nothing filters after purge");
    let (user, _) = c.run(&["getent", "passwd", "ewsgate"]);
    assert!(!user, "the user is left");
    let (group, _) = c.run(&["getent", "group", "ewsgate"]);
    assert!(!group, "the group is left");
    for gone in ["/etc/ewsgate", "/var/lib/ewsgate", "/usr/sbin/ewsgate"] {
        assert!(!c.path(Path::new(gone)).exists(), "{gone} left behind");
    }
    let units = sh(&format!(
        "find {} -name 'ewsgate*'",
        c.path(Path::new("/etc/systemd")).display()
    ))
    .unwrap_or_default()
        + &sh(&format!(
            "find {} -name 'ewsgate*'",
            c.path(Path::new("/usr/lib/systemd")).display()
        ))
        .unwrap_or_default();
    assert!(units.trim().is_empty(), "units left behind: {units}");
    eprintln!(
        "install, upgrade, remove, purge: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The Debian root booted with systemd-nspawn (its own network namespace, a veth `host0`,
/// the lab's bpffs at /sys/fs/bpf, CAP_BPF and CAP_PERFMON, which nspawn drops by default),
/// powered off and waited for on drop.
struct Booted {
    nspawn: Child,
    init: u32,
    log: PathBuf,
}

impl Booted {
    fn boot(root: &Path, bpffs: &Path) -> Booted {
        let machine = format!("eg{}", tag());
        let log = std::env::temp_dir().join(format!("{machine}.nspawn.log"));
        let nspawn = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(root)
            .args([
                "-b",
                "--register=no",
                "--keep-unit",
                "--console=passive",
                "--network-veth",
                "-M",
                &machine,
                "--capability=CAP_BPF,CAP_PERFMON",
                "--system-call-filter=bpf perf_event_open",
            ])
            .arg(format!("--bind={}:/sys/fs/bpf", bpffs.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("nspawn log"))
            .spawn()
            .expect("starting systemd-nspawn");
        let mut booted = Booted {
            init: 0,
            nspawn,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                Instant::now() < deadline,
                "the container did not boot: {}",
                fs::read_to_string(&booted.log).unwrap_or_default()
            );
            if let Ok(Some(status)) = booted.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn exited with {status}: {}",
                    fs::read_to_string(&booted.log).unwrap_or_default()
                );
            }
            let pid = booted.nspawn.id();
            booted.init = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default()
                .split_whitespace()
                .find_map(|c| c.parse().ok())
                .unwrap_or(0);
            if booted.init != 0 {
                let (_, state) = booted.run(&["systemctl", "is-system-running"]);
                if ["running", "degraded"].contains(&state.trim()) {
                    return booted;
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs a command inside the booted container.
    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a"])
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .expect("running nsenter");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn must(&self, args: &[&str]) -> String {
        let (ok, text) = self.run(args);
        assert!(ok, "{args:?} failed in the container: {text}");
        text
    }

    /// `systemctl start UNIT`, with the unit's journal when it fails.
    fn start(&self, unit: &str) {
        let (ok, text) = self.run(&["systemctl", "start", unit]);
        let journal = || {
            self.run(&["journalctl", "-u", unit, "--no-pager", "-n", "30"])
                .1
        };
        assert!(ok, "systemctl start {unit}: {text}{}", journal());
    }

    fn main_pid(&self, unit: &str) -> u32 {
        self.must(&["systemctl", "show", "-p", "MainPID", "--value", unit])
            .trim()
            .parse()
            .expect("MainPID")
    }

    /// Waits (10 s at most) until `f` holds.
    fn wait(&self, what: &str, f: impl Fn(&Booted) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "{what}: {}",
                self.run(&["journalctl", "--no-pager", "-n", "40"]).1
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        let _ = self.run(&["systemctl", "poweroff"]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                let _ = fs::remove_file(&self.log);
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        stop_pid(self.nspawn.id());
        let _ = self.nspawn.wait();
    }
}

/// The installed units under a real systemd: the agent starts (Type=notify) and attaches
/// within its sandbox; the proxy's unit runs it unprivileged on the sockets the agent
/// hands over; an agent killed with SIGKILL is restarted and adopts the proxy, which lives
/// in its own cgroup; `apt remove` stops both and leaves the program attached; `apt purge`
/// detaches it.
#[test]
fn units_run_under_systemd() {
    let debs = debs();
    let bpffs = BpfFs::new().expect("bpffs");
    let mut c = Chroot::new(&bpffs.dir);
    let deb = c.put(&debs.new, "ewsgate.deb");
    c.apt(&["install", &deb]);
    c.release_mounts();
    // The request layer with a certificate for the gate; Exchange is never called here.
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["mail.example.org".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let etc = c.path(Path::new("/etc/ewsgate"));
    fs::write(etc.join("gate.pem"), cert.pem()).expect("certificate file");
    fs::write(etc.join("gate.key"), key.serialize_pem()).expect("key file");
    let config = r#"
[xdp]
interfaces = ["host0"]
mode = "generic"
[[protect]]
address = "192.0.2.10"
ports = ["tcp/443"]
[sources.offices]
cidrs = ["198.51.100.0/25"]
[proxy]
spawn = false
listen = ["192.0.2.10:443"]
certificate = "gate.pem"
private_key = "gate.key"
upstream = "http://192.0.2.20:80"
[[rule]]
name = "office-basic"
groups = ["offices"]
auth = ["basic"]
action = "allow"
"#;
    fs::write(etc.join("ewsgate.toml"), config).expect("config");

    let b = Booted::boot(&c.root, &bpffs.dir);
    b.must(&["ip", "addr", "add", "192.0.2.10/32", "dev", "lo"]);
    b.start("ewsgate");
    let status = b.must(&["ewsgate", "status"]);
    assert!(
        status.contains("enforcing") && status.contains("host0 (generic)"),
        "{status}"
    );
    let link = b.must(&["ip", "-d", "link", "show", "host0"]);
    assert!(link.contains("prog/xdp id"), "{link}");
    // explain's packet verdict comes from the live program, through the sandboxed agent.
    let explained = b.must(&[
        "ewsgate",
        "explain",
        "--source",
        "203.0.113.50",
        "--auth",
        "none",
        "--json",
    ]);
    let e: serde_json::Value = serde_json::from_str(explained.trim()).expect("explain --json");
    assert_eq!(e["packet"]["action"], "drop", "{e:#}");

    b.start("ewsgate-proxy");
    b.wait("the proxy never listened", |b| {
        b.run(&["journalctl", "-u", "ewsgate-proxy", "--no-pager"])
            .1
            .contains("proxy listening")
    });
    let proxy = b.main_pid("ewsgate-proxy");
    let proc_status = b.must(&["cat", &format!("/proc/{proxy}/status")]);
    let field = |name: &str| {
        proc_status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_default()
            .to_string()
    };
    assert_ne!(field("Uid:"), "0", "the proxy runs as root");
    assert_eq!(field("CapEff:"), "0000000000000000", "{proc_status}");
    assert_eq!(field("CapBnd:"), "0000000000000000", "{proc_status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{proc_status}");
    assert_eq!(field("Seccomp:"), "2", "{proc_status}");

    // A crash of the agent: systemd restarts it, the proxy in its own cgroup lives on.
    let agent = b.main_pid("ewsgate");
    b.must(&["systemctl", "kill", "-s", "KILL", "ewsgate"]);
    b.wait("the agent was not restarted", |b| {
        let pid = b.main_pid("ewsgate");
        pid != 0 && pid != agent
    });
    b.wait("the new agent did not adopt the proxy", |b| {
        b.run(&["journalctl", "-u", "ewsgate", "--no-pager"])
            .1
            .contains(&format!("adopted a running proxy pid={proxy}"))
    });
    assert_eq!(
        b.main_pid("ewsgate-proxy"),
        proxy,
        "the proxy was restarted"
    );

    for unit in ["ewsgate.service", "ewsgate-proxy.service"] {
        let text = b.must(&["systemd-analyze", "security", "--no-pager", unit]);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_default();
        eprintln!("in the container: {line}");
    }

    // `apt remove` with both units running: systemd stops them, the program stays attached.
    let apt = |verb: &str| {
        b.must(&[
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "-y",
            "-q",
            verb,
            "ewsgate",
        ])
    };
    let out = apt("remove");
    assert!(out.contains("stays attached and enforcing"), "{out}");
    for unit in ["ewsgate", "ewsgate-proxy"] {
        let (active, state) = b.run(&["systemctl", "is-active", unit]);
        assert!(!active, "{unit} is {state} after remove");
    }
    let link = b.must(&["ip", "-d", "link", "show", "host0"]);
    assert!(link.contains("prog/xdp id"), "detached by remove: {link}");
    // `apt purge`: detached, the user gone.
    let out = apt("purge");
    assert!(out.contains("XDP program detached"), "{out}");
    let link = b.must(&["ip", "-d", "link", "show", "host0"]);
    assert!(
        !link.contains("prog/xdp"),
        "still attached after purge: {link}"
    );
    let (user, _) = b.run(&["getent", "passwd", "ewsgate"]);
    assert!(!user, "the user is left");
}
