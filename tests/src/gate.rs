//! A gate in the network-namespace lab: XDP and the proxy in the gate namespace, the
//! stand-in Exchange on its loopback, certificates minted for the run.

use std::{fs, net::SocketAddr, path::PathBuf};

use ewsgate::identity::tokens::testkit;

use crate::{
    ews::{Backend, Https, Pki},
    lab::{tag, BpfFs, Daemon, Lab, GATE_V4, GATE_V6, INTERNET, OFFICE, SALESFORCE},
    TEST_GROUPS,
};

pub fn gate4() -> SocketAddr {
    SocketAddr::new(GATE_V4.parse().expect("gate address"), 443)
}

pub fn gate6() -> SocketAddr {
    SocketAddr::new(GATE_V6.parse().expect("gate address"), 443)
}

/// A gate in the lab: the daemon with its proxy, a stand-in Exchange, certificates.
pub struct Gate {
    pub daemon: Daemon,
    pub backend: Backend,
    pub pki: Pki,
    pub audit: PathBuf,
    pub dir: PathBuf,
    pub lab: Lab,
    _fs: BpfFs,
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Gate {
    /// Starts a gate whose `[[rule]]`s are `rules`; `failures` is the feedback threshold.
    pub fn start(failures: u32, rules: &str) -> Gate {
        let tokens = format!("metadata_urls = [\"{}\"]\n", testkit::AMURL);
        Gate::start_with(failures, &tokens, rules)
    }

    /// The same, with `tokens` (lines of the `[tokens]` section) for the metadata URLs.
    pub fn start_with(failures: u32, tokens: &str, rules: &str) -> Gate {
        Gate::start_edited(failures, tokens, rules, |text, _| text)
    }

    /// The same, with the config text edited before the agent reads it (`edit` gets the
    /// text and the gate's directory, where it may write files the config names).
    pub fn start_edited(
        failures: u32,
        tokens: &str,
        rules: &str,
        edit: impl FnOnce(String, &std::path::Path) -> String,
    ) -> Gate {
        let fs = BpfFs::new().expect("bpffs");
        let lab = Lab::new(&[OFFICE, SALESFORCE, INTERNET]).expect("lab");
        let backend = Backend::start(&lab.gate).expect("backend");
        let t = tag();
        let dir = std::env::temp_dir().join(format!("ewsgate-test-{t}"));
        let pki = Pki::new(&dir).expect("pki");
        let socket = dir.join("ctl.sock");
        let config = dir.join("ewsgate.toml");
        let text = format!(
            r#"{xdp}
{TEST_GROUPS}
[proxy]
listen = ["{GATE_V4}:443", "[{GATE_V6}]:443"]
certificate = "gate.pem"
private_key = "gate.key"
client_ca = "ca.pem"
upstream = "http://127.0.0.1:8080"
audit_log = "audit.jsonl"
threads = 1

[proxy.limits]
head_timeout_ms = 1500
idle_timeout_ms = 5000
body_grace_ms = 1000
body_min_bytes_per_s = 2000
body_bytes = 1048576
connections_per_source = 16
[[proxy.limits.body]]
path = "/EWS/Exchange.asmx"
bytes = 104857600

[tokens]
audiences = ["{aud}"]
issuers = ["{iss}"]
certificates = ["exchange-auth.pem"]
{tokens}

[feedback]
failures = {failures}
window_secs = 60
block_secs = 60

{rules}"#,
            xdp = crate::lab_xdp_config(&fs.dir.join("ewsgate"), &socket, "native"),
            aud = testkit::AUD,
            iss = testkit::ISS,
        );
        let text = edit(text, &dir);
        fs::write(&config, text).expect("config");
        let daemon = Daemon::start(&lab.gate, &config, &socket).expect("daemon");
        daemon.wait_proxy().expect("the proxy serving");
        Gate {
            daemon,
            backend,
            pki,
            audit: dir.join("audit.jsonl"),
            dir,
            lab,
            _fs: fs,
        }
    }
}

impl Gate {
    /// A TLS connection from a lab host (`office`, `sf`, `internet`).
    pub fn https(&self, role: &str) -> Https {
        Https::connect(self.lab.client(role), gate4(), &self.pki, None).expect("TLS to the gate")
    }

    /// The same, with the client certificate `cn`.
    pub fn https_with_cert(&self, role: &str, cn: &str) -> Https {
        Https::connect(self.lab.client(role), gate4(), &self.pki, Some(cn))
            .expect("TLS to the gate")
    }
}
