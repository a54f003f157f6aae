//! Helpers shared by the integration tests: crafted frames and network-namespace labs.
//! Every test here needs root (BPF and namespaces); `cargo xtask test` runs them.

pub mod lab;
pub mod packet;

use std::{fs, path::PathBuf};

/// Writes a config file for a test into a fresh directory and returns its path.
pub fn write_config(dir_tag: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ewsgate-test-{dir_tag}"));
    fs::create_dir_all(&dir).expect("config dir");
    let path = dir.join("ewsgate.toml");
    fs::write(&path, text).expect("config file");
    path
}
