//! Developer commands: `cargo xtask setup | build | test | demo |
//! bench [xdp|proxy|tokens|cost|fleet|all] | fuzz [--seconds N] [TARGET...] | package`.
//!
//! This crate depends on nothing that needs the eBPF toolchain, so `cargo xtask setup` builds
//! on a machine that has only Rust, gcc and apt.

use std::{
    env,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

mod package;

/// Debian packages: LLVM 22 for bpf-linker, and the tools the tests, demo and bench drive.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "netsniff-ng",
    "xdp-tools",
    "nftables",
    "bpftool",
    // Peers and load generator of `cargo xtask bench proxy`.
    "haproxy",
    "nginx-light",
    "wrk",
    // `bench cost` counts the proxy's instructions per request with callgrind.
    "valgrind",
    // A real EWS client (exchangelib, from PyPI) drives the gate end to end.
    "python3",
    "python3-venv",
    // ewsgate as a CrowdSec bouncer, CrowdSec and fail2ban reading the audit log.
    "crowdsec",
    "fail2ban",
    // The fleet: protoc builds etcd-client's protos (they import protobuf's own
    // descriptor.proto, which is in libprotobuf-dev); the tests run real etcd 3.4 members.
    "protobuf-compiler",
    "libprotobuf-dev",
    "etcd-server",
    "etcd-client",
    // The audit report rendered in a real browser; file sinks under a real logrotate;
    // a real journald (started by the test in its own mount namespace) and journalctl.
    "chromium",
    "logrotate",
    "systemd",
    // A real Prometheus scrapes the gate; its promtool unit-tests the alerting rules.
    "prometheus",
    // `cargo xtask package` and its test: lintian checks the .deb, debootstrap makes a
    // clean Debian 12 root to install it in, systemd-analyze rates the units.
    "lintian",
    "debootstrap",
    "systemd-container",
];
/// Debian's crowdsec registers with CrowdSec's Central API while it installs, which needs the
/// network, unless this file exists with content first (its README.Debian). The tests run
/// their own Local API and never use the Central one.
const CROWDSEC_CAPI: &str = "/etc/crowdsec/online_api_credentials.yaml";
/// From PyPI, pinned, in a virtual environment under target/: exchangelib, and pySigma with
/// its Elasticsearch backend, which check and convert the Sigma rules in contrib/sigma.
const PYTHON_PACKAGES: &[&str] = &[
    "exchangelib==5.6.0",
    "pySigma==1.5.1",
    "pySigma-backend-elasticsearch==2.1.1",
];
/// What `python -c` imports to tell that the environment is complete.
const PYTHON_IMPORTS: &str = "import exchangelib, sigma.backends.elasticsearch";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (apt packages, nightly rust-src, bpf-linker). Idempotent.
    Setup,
    /// Build the ewsgate binary (with its XDP object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit tests, BPF_PROG_TEST_RUN tests and the namespace labs (root).
    Test,
    /// Build a lab of namespaces, run ewsgate on it, send traffic, print what happened.
    /// `demo fleet`: two gates and an etcd cluster instead.
    Demo { which: Option<String> },
    /// Benchmarks against the peers, written to target/bench/*.json.
    Bench {
        /// xdp, proxy, tokens (the token cache alone), cost (instructions per request,
        /// under callgrind), fleet (etcd propagation, resync and scale), or all.
        #[arg(default_value = "all")]
        suite: String,
    },
    /// Run the fuzz targets (cargo-fuzz, nightly), each for a while on its corpus.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (all when none): `cargo fuzz list` names them.
        targets: Vec<String>,
    },
    /// Build the Debian package (cargo-deb): target/debian/ewsgate_VERSION_ARCH.deb.
    Package {
        /// Package this ewsgate binary instead of building a release one.
        #[arg(long)]
        bin: Option<PathBuf>,
        /// The package's version (default: the crate's).
        #[arg(long)]
        deb_version: Option<String>,
        /// Where the .deb goes: a file or a directory.
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Faster compression, a larger file.
        #[arg(long)]
        fast: bool,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Setup => setup(),
        Cmd::Build { release } => {
            setup()?;
            build(release).map(|_| ())
        }
        Cmd::Test => {
            setup()?;
            test()
        }
        Cmd::Demo { which } => {
            setup()?;
            let bin = build(false)?;
            let mut args = vec!["run", "--quiet", "-p", "tests", "--bin", "ewsgate-demo"];
            if let Some(w) = which.as_deref() {
                args.extend(["--", w]);
            }
            cargo(&args, &[("EWSGATE_BIN", &bin)])
        }
        Cmd::Bench { suite } => {
            setup()?;
            // The token suite measures the library alone; the others drive the daemon.
            let bin = if suite == "tokens" {
                PathBuf::new()
            } else {
                build(true)?
            };
            cargo(
                &[
                    "run",
                    "--release",
                    "--quiet",
                    "-p",
                    "tests",
                    "--bin",
                    "ewsgate-bench",
                    "--",
                    &suite,
                ],
                &[("EWSGATE_BIN", &bin)],
            )
        }
        Cmd::Fuzz { seconds, targets } => {
            setup_fuzz()?;
            fuzz(seconds, targets)
        }
        Cmd::Package {
            bin,
            deb_version,
            out,
            fast,
        } => {
            package::setup()?;
            let bin = match bin {
                Some(b) => b,
                None => {
                    setup()?;
                    build(true)?
                }
            };
            let opts = package::Options {
                deb_version,
                out,
                fast,
            };
            package::package(&bin, &opts).map(|_| ())
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// PATH with LLVM 22 and cargo's bin directory first, so bpf-linker finds its LLVM.
fn path_env() -> String {
    let home = env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", env::var("HOME").unwrap_or_default()));
    format!(
        "{LLVM_BIN}:{home}/bin:{}",
        env::var("PATH").unwrap_or_default()
    )
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("running {shown}"))?;
    if !st.success() {
        bail!("{shown} failed: {st}");
    }
    Ok(())
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Python the tests run exchangelib and pySigma with.
fn python() -> PathBuf {
    root().join("target/py/bin/python3")
}

fn python_env() -> anyhow::Result<()> {
    let ready = |py: &Path| quiet_ok(Command::new(py).args(["-c", PYTHON_IMPORTS]));
    if ready(&python()) {
        return Ok(());
    }
    eprintln!(
        "setup: installing {} into target/py",
        PYTHON_PACKAGES.join(" ")
    );
    if !python().exists() {
        status(
            Command::new("python3")
                .args(["-m", "venv"])
                .arg(root().join("target/py")),
        )?;
    }
    status(
        Command::new(python())
            .args(["-m", "pip", "install", "--quiet"])
            .args(PYTHON_PACKAGES),
    )?;
    Ok(())
}

fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing {}", missing.join(" "));
        if missing.contains(&"crowdsec") {
            crowdsec_offline()?;
            // A crowdsec left half-configured by an earlier online registration attempt.
            status(Command::new("dpkg").args(["--configure", "-a"]))?;
        }
        status(Command::new("apt-get").arg("update").arg("-qq"))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    python_env()?;
    proxy_user()?;
    let src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()?;
    if !String::from_utf8_lossy(&src.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        eprintln!("setup: adding rust-src to the nightly toolchain");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    setup_fuzz()?;
    package::setup()?;
    if !quiet_ok(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", path_env()),
    ) {
        eprintln!("setup: building bpf-linker against LLVM 22");
        status(
            Command::new("cargo")
                .args([
                    "install",
                    "--locked",
                    "bpf-linker",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("PATH", path_env()),
        )?;
    }
    Ok(())
}

/// The unprivileged system user the agent runs the proxy as (the package creates it too).
const PROXY_USER: &str = "ewsgate";

fn proxy_user() -> anyhow::Result<()> {
    if quiet_ok(Command::new("getent").args(["passwd", PROXY_USER])) {
        return Ok(());
    }
    eprintln!("setup: creating the system user {PROXY_USER} for the proxy");
    status(Command::new("useradd").args([
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        PROXY_USER,
    ]))
}

/// Writes the Central API opt-out before crowdsec is installed, unless a file with content is
/// already there.
fn crowdsec_offline() -> anyhow::Result<()> {
    let path = Path::new(CROWDSEC_CAPI);
    if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(
        path,
        "# no Central API: ewsgate's tests run their own Local API offline\n",
    )
    .with_context(|| format!("writing {CROWDSEC_CAPI}"))
}

/// cargo-fuzz, built from crates.io when missing. The fuzz targets build with nightly.
fn setup_fuzz() -> anyhow::Result<()> {
    let have = |cmd: &mut Command| quiet_ok(cmd.env("PATH", path_env()));
    if !have(Command::new("cargo").args(["fuzz", "--version"])) {
        eprintln!("setup: installing cargo-fuzz");
        status(
            Command::new("cargo")
                .args(["install", "--locked", "cargo-fuzz"])
                .env("PATH", path_env()),
        )?;
    }
    Ok(())
}

fn cargo(args: &[&str], envs: &[(&str, &Path)]) -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args(args).current_dir(root()).env("PATH", path_env());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    status(&mut cmd)
}

/// Builds `ewsgate` and returns the binary's path.
fn build(release: bool) -> anyhow::Result<PathBuf> {
    let mut args = vec!["build", "--quiet", "-p", "filter-user", "--bin", "ewsgate"];
    if release {
        args.push("--release");
    }
    cargo(&args, &[])?;
    let bin = root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("ewsgate");
    Ok(bin.canonicalize().unwrap_or(bin))
}

fn test() -> anyhow::Result<()> {
    let bin = build(false)?;
    // Two threads: each lab test runs several namespaces and a daemon; two cores here.
    // filter-ebpf builds only for the BPF target; filter-user's build script builds it there.
    let mut child = Command::new("cargo")
        .args([
            "test",
            "--workspace",
            "--exclude",
            "filter-ebpf",
            "--",
            "--test-threads=2",
        ])
        .current_dir(root())
        .env("PATH", path_env())
        .env("EWSGATE_BIN", &bin)
        .env("EWSGATE_PYTHON", python())
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = parse_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let st = child.wait()?;
    // One closing line for the whole run: cargo's own last line is a harness with 0 tests.
    println!("tests: {passed} passed, {failed} failed");
    if !st.success() || failed > 0 {
        bail!("cargo test failed: {st}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// "test result: ok. 9 passed; 0 failed; ..." → (9, 0)
fn parse_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let number = |word: &str| {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches("ok. ")
                    .trim_start_matches("FAILED. ")
                    .strip_suffix(word)
            })
            .and_then(|n| n.trim().parse().ok())
    };
    Some((number(" passed")?, number(" failed")?))
}

/// Builds every fuzz target once, then runs each for `seconds` on its corpus: the seeds
/// kept in fuzz/corpus/TARGET (read only) and what earlier runs found, kept under
/// fuzz/target/corpus/TARGET. A failing input is written to fuzz/artifacts/TARGET/.
fn fuzz(seconds: u64, mut targets: Vec<String>) -> anyhow::Result<()> {
    let root = root().canonicalize()?;
    let fuzz = |args: &[&str]| {
        let mut cmd = Command::new("cargo");
        cmd.arg("+nightly")
            .arg("fuzz")
            .args(args)
            .current_dir(&root)
            .env("PATH", path_env());
        cmd
    };
    if targets.is_empty() {
        let out = fuzz(&["list"]).output().context("cargo fuzz list")?;
        if !out.status.success() {
            bail!("cargo fuzz list: {}", String::from_utf8_lossy(&out.stderr));
        }
        targets = String::from_utf8(out.stdout)?
            .lines()
            .map(str::to_string)
            .collect();
    }
    status(&mut fuzz(&["build"]))?;
    let mut failed = Vec::new();
    for t in &targets {
        let found = root.join("fuzz/target/corpus").join(t);
        std::fs::create_dir_all(&found)?;
        let seeds = root.join("fuzz/corpus").join(t);
        let mut cmd = fuzz(&["run", t]);
        cmd.arg(&found).arg(&seeds).args([
            "--",
            &format!("-max_total_time={seconds}"),
            // An input that takes this long is reported as a hang.
            "-timeout=10",
            "-print_final_stats=1",
        ]);
        match run_target(&mut cmd)? {
            Ok(stats) => println!("fuzz {t}: {stats}"),
            Err(e) => {
                println!("fuzz {t}: FAILED ({e})");
                failed.push(t.as_str());
            }
        }
    }
    // The plain closing line CI reads, one per target.
    println!(
        "fuzz: {} passed, {} failed",
        targets.len() - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(" "));
    }
    Ok(())
}

/// Runs one target, showing libFuzzer's output without its progress lines; the run's
/// executions and rate, or why it failed.
fn run_target(cmd: &mut Command) -> anyhow::Result<Result<String, String>> {
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .context("running cargo fuzz")?;
    let stderr = child.stderr.take().context("cargo fuzz stderr")?;
    let (mut runs, mut rate) = (String::new(), String::new());
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            runs = n.trim().to_string();
        } else if let Some(n) = line.strip_prefix("stat::average_exec_per_sec:") {
            rate = n.trim().to_string();
        }
        let progress = line.starts_with('#')
            && ["NEW", "REDUCE", "pulse"]
                .iter()
                .any(|w| line.split_whitespace().nth(1) == Some(w));
        if !progress && !line.starts_with("stat::") {
            eprintln!("{line}");
        }
    }
    let st = child.wait()?;
    Ok(if st.success() {
        Ok(format!("{runs} executions, {rate} per second, no failure"))
    } else {
        Err(format!("{st}"))
    })
}
