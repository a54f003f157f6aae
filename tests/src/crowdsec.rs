//! Debian's CrowdSec for the tests: a Local API with its own config and data directories in
//! a namespace of the lab, on a free loopback port there, with ewsgate's contrib parser and
//! scenario installed; stopped by its PID.

use std::{
    fs,
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::lab::Netns;

/// Where the repository's contrib files are.
pub fn contrib() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib")
}

pub struct CrowdSec {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    pub netns: String,
    child: Option<Child>,
}

impl CrowdSec {
    /// Writes a config under `dir`, registers a machine for cscli, starts the LAPI.
    pub fn start(ns: &Netns, dir: &Path) -> anyhow::Result<CrowdSec> {
        let port = ns
            .run(|| TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()))
            .context("a free port")?
            .port();
        let etc = dir.join("etc");
        for sub in [
            "parsers/s00-raw",
            "parsers/s01-parse",
            "parsers/s02-enrich",
            "scenarios",
        ] {
            fs::create_dir_all(etc.join(sub))?;
        }
        fs::create_dir_all(dir.join("data"))?;
        fs::create_dir_all(dir.join("log"))?;
        fs::create_dir_all(dir.join("tmp"))?;
        let config = etc.join("config.yaml");
        fs::write(&config, config_yaml(dir, port))?;
        fs::write(etc.join("simulation.yaml"), "simulation: off\n")?;
        fs::write(etc.join("acquis.yaml"), "")?;
        fs::write(
            etc.join("profiles.yaml"),
            "name: default_ip_remediation\nfilters:\n - Alert.Remediation == true && Alert.GetScope() == \"Ip\"\ndecisions:\n - type: ban\n   duration: 4h\non_success: break\n",
        )?;
        // The grok patterns and the date parser come with the package.
        std::os::unix::fs::symlink("/etc/crowdsec/patterns", etc.join("patterns"))?;
        std::os::unix::fs::symlink(
            "/usr/share/crowdsec/hub/parsers/s02-enrich/crowdsecurity/dateparse-enrich.yaml",
            etc.join("parsers/s02-enrich/dateparse-enrich.yaml"),
        )?;
        let c = contrib().join("crowdsec");
        for (from, to) in [
            (
                "parsers/s00-raw/ewsgate-raw.yaml",
                "parsers/s00-raw/ewsgate-raw.yaml",
            ),
            (
                "parsers/s01-parse/ewsgate-audit.yaml",
                "parsers/s01-parse/ewsgate-audit.yaml",
            ),
            (
                "scenarios/ewsgate-failure-burst.yaml",
                "scenarios/ewsgate-failure-burst.yaml",
            ),
        ] {
            fs::copy(c.join(from), etc.join(to)).with_context(|| format!("installing {from}"))?;
        }
        let mut cs = CrowdSec {
            dir: dir.into(),
            config,
            port,
            netns: ns.name.clone(),
            child: None,
        };
        let creds = etc.join("local_api_credentials.yaml");
        cs.cscli(&[
            "machines",
            "add",
            "ewsgate-test",
            "--password",
            "ewsgate-test-password-0123456789",
            "-f",
            &creds.display().to_string(),
            "--url",
            &format!("http://127.0.0.1:{port}"),
        ])?;
        let log = fs::File::create(dir.join("log/lapi.out"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "crowdsec", "-c"])
            .arg(&cs.config)
            .arg("-no-cs")
            .current_dir(dir)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting crowdsec")?;
        cs.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = ns.run(move || {
                TcpStream::connect_timeout(
                    &([127, 0, 0, 1], port).into(),
                    Duration::from_millis(200),
                )
                .is_ok()
            });
            if up {
                return Ok(cs);
            }
            if let Some(Ok(Some(st))) = cs.child.as_mut().map(|c| c.try_wait()) {
                bail!("crowdsec exited with {st}: {}", cs.log());
            }
            if Instant::now() > deadline {
                bail!("the LAPI did not listen within 30 s: {}", cs.log());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `cscli -c CONFIG ARGS` in the LAPI's namespace.
    pub fn cscli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns, "cscli", "-c"])
            .arg(&self.config)
            .args(args)
            .current_dir(&self.dir)
            .env("TMPDIR", self.dir.join("tmp"))
            .stdin(Stdio::null())
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("cscli {args:?}: {text}");
        }
        Ok(text)
    }

    /// Registers a bouncer and returns its API key.
    pub fn bouncer(&self, name: &str) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns, "cscli", "-c"])
            .arg(&self.config)
            .args(["bouncers", "add", name, "-o", "raw"])
            .stdin(Stdio::null())
            .output()?;
        let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || key.is_empty() {
            bail!(
                "cscli bouncers add: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(key)
    }

    /// Runs the agent over `file` in time-machine mode: its alerts go to this LAPI.
    pub fn replay(&self, file: &Path, kind: &str) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns, "crowdsec", "-c"])
            .arg(&self.config)
            .arg("-dsn")
            .arg(format!("file://{}", file.display()))
            .args(["-type", kind, "-no-api"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("crowdsec replay: {text}");
        }
        Ok(text)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log/lapi.out")).unwrap_or_default()
    }

    /// Stops the LAPI by its PID (SIGTERM, then SIGKILL after 15 s).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child by its PID (`ip netns exec` execs crowdsec).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for CrowdSec {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config_yaml(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"common:
  daemonize: false
  log_media: file
  log_level: info
  log_dir: {d}/log/
  working_dir: .
config_paths:
  config_dir: {d}/etc/
  data_dir: {d}/data/
  simulation_path: {d}/etc/simulation.yaml
  hub_dir: /usr/share/crowdsec/hub/
  index_path: /usr/share/crowdsec/hub/.index.json
  notification_dir: {d}/etc/notifications/
  plugin_dir: /usr/lib/crowdsec/plugins/
crowdsec_service:
  acquisition_path: {d}/etc/acquis.yaml
  parser_routines: 1
cscli:
  output: human
  color: "no"
db_config:
  log_level: info
  type: sqlite
  db_path: {d}/data/crowdsec.db
  use_wal: false
  flush:
    max_items: 5000
    max_age: 7d
api:
  client:
    insecure_skip_verify: false
    credentials_path: {d}/etc/local_api_credentials.yaml
  server:
    log_level: info
    listen_uri: 127.0.0.1:{port}
    profiles_path: {d}/etc/profiles.yaml
    console_path: {d}/etc/console.yaml
    trusted_ips:
      - 127.0.0.1
      - ::1
prometheus:
  enabled: false
"#
    )
}
