//! Helpers shared by the integration tests: crafted frames and network-namespace labs.
//! Every test here needs root (BPF and namespaces); `cargo xtask test` runs them.

pub mod crowdsec;
pub mod docs;
pub mod ews;
pub mod feedserver;
pub mod fleet;
pub mod gate;
pub mod lab;
pub mod mailbox;
pub mod packet;

use std::{fs, path::PathBuf};

/// The source groups the packet-level tests judge against: the lab's offices and
/// Salesforce ranges, and one partner /32 that lands in a DIR-24-8 long-prefix block.
pub const TEST_GROUPS: &str = r#"
[sources.offices]
cidrs = ["198.51.100.0/25", "2001:db8:100::/64"]
[sources.salesforce]
cidrs = ["198.51.100.128/25", "2001:db8:200::/64"]
[sources.partner]
cidrs = ["203.0.113.77/32"]
"#;

/// The `[xdp]` and `[[protect]]` part of a lab config: the gate's three client-facing
/// interfaces, tcp/443 on both gate addresses.
pub fn lab_xdp_config(pin_dir: &std::path::Path, socket: &std::path::Path, mode: &str) -> String {
    format!(
        r#"
[xdp]
interfaces = ["g-office", "g-sf", "g-inet"]
mode = "{mode}"
pin_dir = "{}"
control_socket = "{}"

[[protect]]
address = "{}"
ports = ["tcp/443"]
[[protect]]
address = "{}"
ports = ["tcp/443"]
"#,
        pin_dir.display(),
        socket.display(),
        lab::GATE_V4,
        lab::GATE_V6,
    )
}

/// Writes a config file for a test into a fresh directory and returns its path.
pub fn write_config(dir_tag: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ewsgate-test-{dir_tag}"));
    fs::create_dir_all(&dir).expect("config dir");
    let path = dir.join("ewsgate.toml");
    fs::write(&path, text).expect("config file");
    path
}
