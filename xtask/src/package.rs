//! `cargo xtask package`: the Debian package, built with cargo-deb from files staged under
//! target/pkg/stage: the stripped binary (its XDP object inside), the man pages and shell
//! completions the binary generates from its own CLI, and the conffile made from the
//! example config (monitor mode, the request layer left for the administrator to enable).
//! Units, maintainer scripts, the sysusers and logrotate files are in pkg/.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

use crate::{path_env, quiet_ok, root, status};

/// What the package is made of besides what `[package.metadata.deb]` names.
pub struct Options {
    /// The package's version (default: the crate's).
    pub deb_version: Option<String>,
    /// Where the .deb goes: a file or a directory (default: target/debian).
    pub out: Option<PathBuf>,
    /// Faster compression, a larger file (the tests build two packages).
    pub fast: bool,
}

/// cargo-deb, built from crates.io when missing.
pub fn setup() -> anyhow::Result<()> {
    if quiet_ok(
        Command::new("cargo")
            .args(["deb", "--version"])
            .env("PATH", path_env()),
    ) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-deb");
    status(
        Command::new("cargo")
            .args(["install", "--locked", "cargo-deb"])
            .env("PATH", path_env()),
    )
}

/// Stages the files, runs cargo-deb, and returns the .deb's path.
pub fn package(bin: &Path, opts: &Options) -> anyhow::Result<PathBuf> {
    let root = root().canonicalize()?;
    let stage = root.join("target/pkg/stage");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }
    fs::create_dir_all(&stage)?;
    let staged = stage.join("ewsgate");
    // Symbols and debug info stay in the build tree; the package carries the code.
    status(Command::new("strip").arg("-o").arg(&staged).arg(bin))?;
    status(Command::new(&staged).arg("manual").arg(&stage))?;
    let example = root.join("examples/ewsgate.toml");
    let text =
        fs::read_to_string(&example).with_context(|| format!("reading {}", example.display()))?;
    fs::write(stage.join("ewsgate.toml"), conffile(&text)?)?;
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/debian"));
    let mut cmd = Command::new("cargo");
    cmd.args(["deb", "-p", "filter-user", "--no-build", "--no-strip", "-o"])
        .arg(&out)
        .current_dir(&root)
        .env("PATH", path_env());
    if opts.fast {
        cmd.arg("--fast");
    }
    if let Some(v) = &opts.deb_version {
        cmd.args(["--deb-version", v]);
    }
    let shown = format!("{cmd:?}");
    let output = cmd.output().with_context(|| format!("running {shown}"))?;
    if !output.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // cargo-deb prints the package's path last.
    let printed = String::from_utf8_lossy(&output.stdout);
    let deb = printed
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .map(|l| PathBuf::from(l.trim()))
        .context("cargo-deb printed no .deb path")?;
    println!("{}", deb.display());
    Ok(deb)
}

/// Marks where the request layer's sections begin in the example.
const REQUEST_LAYER: &str = "# ---- The request layer";

/// The packaged config: the example, safe by default. Monitor mode (counts, drops
/// nothing); Salesforce's ranges from its live feed rather than a sample file; the request
/// layer commented out, since it needs the site's certificates, with `spawn = false` for the
/// proxy's own unit. Every change must find its text, so the example cannot drift away
/// unnoticed.
pub fn conffile(example: &str) -> anyhow::Result<String> {
    let mut text = example.to_string();
    let edits: &[(&str, &str)] = &[
        (
            "# ewsgate example configuration.",
            "# ewsgate configuration, as the package installs it: monitor mode, the packet layer only.\n\
             # Edit the interfaces, [[protect]] and [sources], check with\n\
             #   ewsgate --config /etc/ewsgate/ewsgate.toml check\n\
             # then: systemctl enable --now ewsgate\n\
             #\n\
             # From the example configuration.",
        ),
        (
            "monitor = false",
            "monitor = true    # the package starts here: set false once `ewsgate status` shows what you expect",
        ),
        (
            "feed = \"salesforce-ip-ranges.json\"   # Salesforce's ip-ranges.json, from a file",
            "feed_url = \"https://ip-ranges.salesforce.com/ip-ranges.json\"   # live, every refresh_secs",
        ),
        (
            "# Or fetched over HTTPS at start and every [feeds] refresh_secs, instead of `feed`:\n\
             # feed_url = \"https://ip-ranges.salesforce.com/ip-ranges.json\"\n",
            "# Or from a file someone refreshes, instead of `feed_url`:\n\
             # feed = \"salesforce-ip-ranges.json\"\n",
        ),
        (
            "[proxy]\n",
            "[proxy]\nspawn = false    # the package runs the proxy as ewsgate-proxy.service (enable it)\n",
        ),
    ];
    for (from, to) in edits {
        if !text.contains(from) {
            bail!("examples/ewsgate.toml no longer holds {from:?}: update xtask's conffile");
        }
        text = text.replacen(from, to, 1);
    }
    let Some(at) = text.find(REQUEST_LAYER) else {
        bail!("examples/ewsgate.toml no longer holds {REQUEST_LAYER:?}");
    };
    let (packet, request) = text.split_at(at);
    let mut out = packet.to_string();
    out.push_str(
        "# ---- Everything below needs the request layer: this site's certificates and Exchange.\n\
         # Uncomment it, then enable the proxy: systemctl enable --now ewsgate-proxy\n",
    );
    for line in request.lines() {
        match line.trim_start().starts_with('#') || line.trim().is_empty() {
            true => out.push_str(line),
            false => {
                out.push('#');
                out.push_str(line);
            }
        }
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conffile_is_the_example_in_monitor_mode_without_the_request_layer() {
        let example = fs::read_to_string(root().join("examples/ewsgate.toml")).unwrap();
        let conf = conffile(&example).unwrap();
        let active: Vec<&str> = conf
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .collect();
        assert!(active.contains(&"monitor = true    # the package starts here: set false once `ewsgate status` shows what you expect"));
        assert!(!active.iter().any(|l| l.starts_with("monitor = false")));
        assert!(active
            .iter()
            .any(|l| l.starts_with("feed_url = \"https://")));
        for section in ["[proxy]", "[tokens]", "[[rule]]", "[audit]", "[detections]"] {
            assert!(!active.contains(&section), "{section} is active");
            assert!(conf.contains(&format!("#{section}")), "{section} is gone");
        }
        assert!(conf.contains("#spawn = false"), "{conf}");
        // Every line of the example is still there, active or commented.
        assert!(conf.lines().count() > example.lines().count());
    }

    #[test]
    fn a_changed_example_is_an_error_not_a_silent_conffile() {
        let err = conffile("[xdp]\nmonitor = true\n").unwrap_err().to_string();
        assert!(err.contains("no longer holds"), "{err}");
    }
}
