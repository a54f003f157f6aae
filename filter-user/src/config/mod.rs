//! The configuration file: TOML, checked whole before anything is applied. Every error names
//! the file, line and column it comes from, so a rejected reload says exactly what to fix.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use filter_common::{MAX_GROUPS, MAX_PORTS, MAX_PROTECTED};

use crate::model::{
    agent::{Copy, FeedFilter, FeedSettings, LiveFeed},
    outcome::FailureClass,
    packet::{
        AttachMode, Capacity, Protected, SourceGroup, XdpSettings, DEFAULT_CONTROL_SOCKET,
        DEFAULT_PIN_DIR,
    },
};

/// The validated model a config file becomes, loaded by [`Config::load`].
pub use crate::model::Config;

mod bundle;
mod crowdsec;
mod feed;
mod metrics;
mod fleet;
pub mod ops;
mod request;

pub use bundle::{Bundle, Disk, Files};
pub use feed::{copy_bytes, copy_path, load_copy, parse_feed, save_copy, FeedError};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    At {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// Reads and validates a config file, and bundles it with every file it names.
pub fn load_bundle(path: &Path) -> Result<(Config, Bundle), ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let disk = Disk::default();
    let config = Config::parse_with(path, &text, &disk)?;
    Ok((config, disk.into_bundle(path, text)))
}

/// Where a running agent is found: its control socket and pin directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub control_socket: PathBuf,
    pub pin_dir: PathBuf,
}

/// The `[xdp]` paths of a config file, read even when the rest of it does not parse or
/// validate: the CLI needs only these to reach the agent.
pub fn paths_of(path: &Path) -> Result<Paths, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let value = |key: &str| match toml::from_str::<toml::Table>(&text) {
        Ok(t) => t
            .get("xdp")
            .and_then(|x| x.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_string),
        Err(_) => scan_xdp(&text, key),
    };
    Ok(Paths {
        control_socket: value("control_socket")
            .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into())
            .into(),
        pin_dir: value("pin_dir")
            .unwrap_or_else(|| DEFAULT_PIN_DIR.into())
            .into(),
    })
}

/// `key = "value"` inside `[xdp]`, line by line, for a file TOML cannot read at all.
fn scan_xdp(text: &str, key: &str) -> Option<String> {
    let mut in_xdp = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_xdp = line == "[xdp]";
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if in_xdp && k.trim() == key {
            let v = v.trim();
            return v
                .strip_prefix('"')
                .and_then(|v| v.split('"').next())
                .map(str::to_string);
        }
    }
    None
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        load_bundle(path).map(|(config, _)| config)
    }

    /// Parses `text` as if read from `path`; the files it names are read from the disk.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse_with(path, text, &Disk::default())
    }

    /// The config a bundle holds, validated exactly as the agent validated it.
    pub fn from_bundle(bundle: &Bundle) -> Result<Config, ConfigError> {
        Config::parse_with(&bundle.path, &bundle.text, bundle)
    }

    pub fn parse_with(path: &Path, text: &str, files: &dyn Files) -> Result<Config, ConfigError> {
        let here = Locator { path, text, files };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| s.start).unwrap_or(0);
            here.error(at, e.message().to_string())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut feeds = raw.feeds.unwrap_or_default().validate(&here)?;
        let groups = validate_sources(&here, base, raw.sources, &mut feeds)?;
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        let proxy = raw.proxy.map(|p| p.validate(&here, base)).transpose()?;
        let ops = ops::validate(
            &here,
            base,
            raw.detections,
            raw.audit,
            &names,
            proxy.as_ref(),
        )?;
        let metrics = raw
            .metrics
            .map(|m| {
                let at = m.span().start;
                m.into_inner().validate(&here, at, proxy.as_ref())
            })
            .transpose()?;
        Ok(Config {
            metrics,
            path: path.to_path_buf(),
            xdp: raw.xdp.validate(&here)?,
            protect: validate_protect(&here, raw.protect)?,
            proxy,
            tokens: raw.tokens.unwrap_or_default().validate(&here, base)?,
            feedback: raw.feedback.unwrap_or_default().validate(&here)?,
            content: raw.content.unwrap_or_default().validate(&here)?,
            rules: request::validate_rules(&here, raw.rule, &names)?,
            ops,
            crowdsec: raw.crowdsec.map(|c| c.validate(&here, base)).transpose()?,
            fleet: raw.fleet.map(|f| f.validate(&here, base)).transpose()?,
            feeds,
            groups,
        })
    }
}

/// Turns byte offsets into `file:line:column` errors.
pub(crate) struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
    files: &'a dyn Files,
}

impl Locator<'_> {
    /// A file the config names, resolved against the config's directory and read (so that
    /// it becomes part of the bundle); the error points at where it is named.
    pub(crate) fn file(
        &self,
        base: &Path,
        name: &Spanned<String>,
    ) -> Result<(PathBuf, Vec<u8>), ConfigError> {
        let path = base.join(name.get_ref());
        match self.files.read(&path) {
            Ok(bytes) => Ok((path, bytes)),
            Err(e) => Err(self.at(name, format!("cannot read {}: {e}", path.display()))),
        }
    }

    pub(crate) fn error(&self, offset: usize, message: impl Into<String>) -> ConfigError {
        let (line, column) = line_column(self.text, offset);
        ConfigError::At {
            path: self.path.display().to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    pub(crate) fn line_of<T>(&self, spanned: &Spanned<T>) -> usize {
        line_column(self.text, spanned.span().start).0
    }

    pub(crate) fn at<T>(&self, spanned: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error(spanned.span().start, message)
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, column)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    xdp: RawXdp,
    #[serde(default)]
    protect: Vec<RawProtect>,
    #[serde(default)]
    sources: BTreeMap<Spanned<String>, RawSource>,
    proxy: Option<request::RawProxy>,
    tokens: Option<request::RawTokens>,
    feedback: Option<request::RawFeedback>,
    content: Option<request::RawContent>,
    #[serde(default)]
    rule: Vec<request::RawRule>,
    detections: Option<ops::RawDetections>,
    audit: Option<ops::RawAudit>,
    feeds: Option<feed::RawFeeds>,
    crowdsec: Option<crowdsec::RawCrowdSec>,
    metrics: Option<Spanned<metrics::RawMetrics>>,
    fleet: Option<fleet::RawFleet>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawXdp {
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    mode: Option<Spanned<String>>,
    #[serde(default)]
    monitor: bool,
    pin_dir: Option<String>,
    control_socket: Option<String>,
    capacity: Option<Spanned<Capacity>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProtect {
    address: Spanned<String>,
    #[serde(default)]
    ports: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    #[serde(default)]
    cidrs: Vec<Spanned<String>>,
    #[serde(default)]
    files: Vec<Spanned<String>>,
    feed: Option<Spanned<String>>,
    /// Salesforce's `ip-ranges.json` fetched over HTTPS (see `[feeds]`).
    feed_url: Option<Spanned<String>>,
    /// CA for `feed_url`; the system's roots without it.
    feed_ca: Option<String>,
    /// Keep only these regions, providers, directions of the feed (all when empty).
    #[serde(default)]
    feed_regions: Vec<String>,
    /// Failure classes that may block this group's addresses.
    block_on: Option<Vec<Spanned<String>>>,
    block_failures: Option<u32>,
    #[serde(default)]
    feed_providers: Vec<String>,
    #[serde(default)]
    feed_directions: Vec<String>,
}

impl RawSource {
    fn filter(&self) -> FeedFilter {
        FeedFilter {
            regions: self.feed_regions.clone(),
            providers: self.feed_providers.clone(),
            directions: self.feed_directions.clone(),
        }
    }
}

impl RawXdp {
    fn validate(self, here: &Locator) -> Result<XdpSettings, ConfigError> {
        let mut interfaces = Vec::new();
        for name in &self.interfaces {
            let n = name.get_ref();
            if n.is_empty() || n.len() >= libc::IFNAMSIZ || n.contains(['/', ' ']) {
                return Err(here.at(name, format!("'{n}' is not a valid interface name")));
            }
            if interfaces.contains(n) {
                return Err(here.at(name, format!("interface '{n}' is listed twice")));
            }
            interfaces.push(n.clone());
        }
        let mode = match self.mode.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "auto")) => AttachMode::Auto,
            Some((_, "native")) => AttachMode::Native,
            Some((_, "generic")) => AttachMode::Generic,
            Some((m, other)) => {
                return Err(here.at(
                    m,
                    format!("unknown mode '{other}': expected auto, native or generic"),
                ))
            }
        };
        let capacity = match &self.capacity {
            Some(c) => check_capacity(here, c)?,
            None => Capacity::default(),
        };
        Ok(XdpSettings {
            interfaces,
            mode,
            monitor: self.monitor,
            pin_dir: self.pin_dir.unwrap_or(DEFAULT_PIN_DIR.into()).into(),
            control_socket: self
                .control_socket
                .unwrap_or(DEFAULT_CONTROL_SOCKET.into())
                .into(),
            capacity,
        })
    }
}

fn check_capacity(here: &Locator, c: &Spanned<Capacity>) -> Result<Capacity, ConfigError> {
    let v = *c.get_ref();
    let limits = [
        ("long_prefix_blocks", v.long_prefix_blocks, 1 << 20),
        ("ipv6_prefixes", v.ipv6_prefixes, 1 << 22),
        ("dynamic_entries", v.dynamic_entries, 1 << 22),
    ];
    for (name, value, max) in limits {
        if value == 0 || value > max {
            return Err(here.at(c, format!("{name} = {value}: must be 1..={max}")));
        }
    }
    Ok(v)
}

fn validate_protect(here: &Locator, raw: Vec<RawProtect>) -> Result<Vec<Protected>, ConfigError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for p in raw {
        let text = p.address.get_ref();
        let addr: IpAddr = text
            .parse()
            .map_err(|_| here.at(&p.address, format!("'{text}' is not an IP address")))?;
        if !seen.insert(addr) {
            return Err(here.at(&p.address, format!("{addr} is protected twice")));
        }
        if seen
            .iter()
            .filter(|a| a.is_ipv4() == addr.is_ipv4())
            .count()
            > MAX_PROTECTED
        {
            return Err(here.at(
                &p.address,
                format!("at most {MAX_PROTECTED} protected addresses per address family"),
            ));
        }
        if p.ports.len() > MAX_PORTS {
            return Err(here.at(
                &p.address,
                format!("{addr}: at most {MAX_PORTS} ports per address"),
            ));
        }
        let mut ports = Vec::new();
        for spec in &p.ports {
            let port = parse_port(spec.get_ref()).map_err(|m| here.at(spec, m))?;
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        out.push(Protected { addr, ports });
    }
    Ok(out)
}

/// "tcp/443" or "udp/53".
fn parse_port(spec: &str) -> Result<(u8, u16), String> {
    let bad = || format!("'{spec}' is not a port: expected tcp/PORT or udp/PORT");
    let (proto, port) = spec.split_once('/').ok_or_else(bad)?;
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => 6,
        "udp" => 17,
        _ => return Err(bad()),
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok((proto, p)),
        _ => Err(bad()),
    }
}

fn validate_sources(
    here: &Locator,
    base: &Path,
    raw: BTreeMap<Spanned<String>, RawSource>,
    feeds: &mut FeedSettings,
) -> Result<Vec<SourceGroup>, ConfigError> {
    if raw.len() > MAX_GROUPS {
        return Err(here.error(0, format!("at most {MAX_GROUPS} source groups")));
    }
    let mut groups = Vec::new();
    for (name, src) in raw {
        let mut nets = Vec::new();
        for c in &src.cidrs {
            nets.push(parse_cidr(c.get_ref()).map_err(|m| here.at(c, m))?);
        }
        for f in &src.files {
            let (path, bytes) = here.file(base, f)?;
            nets.extend(read_cidr_file(&path, &bytes).map_err(|m| here.at(f, m))?);
        }
        let filter = src.filter();
        if let Some(feed) = &src.feed {
            let (path, bytes) = here.file(base, feed)?;
            nets.extend(feed::read_feed(&path, &bytes, &filter).map_err(|m| here.at(feed, m))?);
        }
        if let Some(url) = &src.feed_url {
            if let Some(feed) = &src.feed {
                return Err(here.at(feed, "a source group has feed or feed_url, not both"));
            }
            feed::check_group_name(name.get_ref()).map_err(|m| here.at(&name, m))?;
            feed::check_feed_url(url.get_ref()).map_err(|m| here.at(url, m))?;
            let copy = load_copy(here.files, &feeds.state_dir, name.get_ref(), &filter);
            let mut own = nets.clone();
            own.sort();
            own.dedup();
            if let Copy::Held(h) = &copy {
                nets.extend(h.nets.iter().copied());
            }
            feeds.live.push(LiveFeed {
                group: name.get_ref().clone(),
                url: url.get_ref().clone(),
                ca: src.feed_ca.as_ref().map(|c| base.join(c)),
                filter,
                base: own,
                copy,
            });
        } else if src.feed_ca.is_some() {
            return Err(here.at(&name, "feed_ca is set but the group has no feed_url"));
        }
        if src.cidrs.is_empty()
            && src.files.is_empty()
            && src.feed.is_none()
            && src.feed_url.is_none()
        {
            return Err(here.at(&name, "source group has no cidrs, files, feed or feed_url"));
        }
        let block_on = block_classes(here, &src)?;
        let mut group = SourceGroup::from_nets(name.into_inner(), nets);
        group.block_on = block_on;
        group.block_failures = src.block_failures;
        groups.push(group);
    }
    Ok(groups)
}

/// Which failures may block a group's addresses: protocol abuse and credential failures by
/// default, nothing for a group fed from a shared feed (its addresses serve every tenant).
/// Policy denials never may: one client's denied request must not block its neighbours.
fn block_classes(here: &Locator, src: &RawSource) -> Result<Vec<FailureClass>, ConfigError> {
    let Some(list) = &src.block_on else {
        return Ok(match src.feed.is_some() || src.feed_url.is_some() {
            true => Vec::new(),
            false => vec![FailureClass::Protocol, FailureClass::Credential],
        });
    };
    let mut classes = Vec::new();
    for c in list {
        match FailureClass::parse(c.get_ref()) {
            Some(FailureClass::Policy) => {
                return Err(here.at(
                    c,
                    "policy denials never block an address: block_on takes protocol and credential",
                ))
            }
            Some(class) if !classes.contains(&class) => classes.push(class),
            Some(_) => {}
            None => {
                return Err(here.at(
                    c,
                    format!(
                        "unknown failure class '{}': expected protocol or credential",
                        c.get_ref()
                    ),
                ))
            }
        }
    }
    Ok(classes)
}

/// A CIDR, or a bare address meaning /32 or /128. Host bits must be zero: a typo such as
/// 198.51.100.7/24 is more likely a mistake than a wish to allow the whole /24.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let net = match text.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match text.parse::<IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => return Err(format!("'{text}' is not a CIDR or an IP address")),
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "'{text}' has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// One CIDR per line; `#` starts a comment.
fn read_cidr_file(path: &Path, bytes: &[u8]) -> Result<Vec<IpNet>, String> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
    let mut nets = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let net = parse_cidr(content).map_err(|m| format!("{}:{}: {m}", path.display(), i + 1))?;
        nets.push(net);
    }
    Ok(nets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        packet::AttachMode,
        rules::{OpMatch, Scope},
    };

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/ewsgate/test.toml"), text)
    }

    #[test]
    fn the_control_paths_are_read_from_a_broken_file() {
        let dir = std::env::temp_dir().join(format!("ewsgate-paths-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        let xdp = "[xdp]\ncontrol_socket = \"/run/x/ctl.sock\"\npin_dir = \"/sys/fs/bpf/x\"\n";
        for tail in [
            "[[rule]]\nname = \"r\"\nactoin = \"allow\"\n",
            "[proxy\nbroken = \n",
        ] {
            fs::write(&path, format!("{xdp}{tail}")).unwrap();
            assert!(Config::load(&path).is_err());
            let p = paths_of(&path).unwrap();
            assert_eq!(p.control_socket, PathBuf::from("/run/x/ctl.sock"));
            assert_eq!(p.pin_dir, PathBuf::from("/sys/fs/bpf/x"));
        }
        fs::write(&path, "garbage = \n").unwrap();
        assert_eq!(
            paths_of(&path).unwrap().control_socket,
            PathBuf::from(DEFAULT_CONTROL_SOCKET)
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_https_upstreams_ca_travels_in_the_bundle() {
        // The proxy reads files only from the bundle: a CA read beside it would leave the
        // proxy unable to start while `check` passes.
        let dir = std::env::temp_dir().join(format!("ewsgate-upca-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for f in ["cert.pem", "key.pem", "ca.pem"] {
            fs::write(dir.join(f), f).unwrap();
        }
        let path = dir.join("c.toml");
        let text = |ca: &str| {
            format!(
                "[proxy]\nlisten = [\"192.0.2.10:443\"]\ncertificate = \"cert.pem\"\n\
                 private_key = \"key.pem\"\nupstream = \"https://mail.example.org\"\n\
                 upstream_ca = \"{ca}\"\n"
            )
        };
        fs::write(&path, text("ca.pem")).unwrap();
        let (_, bundle) = load_bundle(&path).unwrap();
        assert_eq!(bundle.file(&dir.join("ca.pem")).unwrap(), b"ca.pem");
        fs::write(&path, text("missing.pem")).unwrap();
        let e = load_bundle(&path).unwrap_err().to_string();
        assert!(e.contains(":6:") && e.contains("missing.pem"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            r#"
[xdp]
interfaces = ["eth0"]
mode = "native"
monitor = true

[[protect]]
address = "192.0.2.10"
ports = ["tcp/443"]

[[protect]]
address = "2001:db8:10::10"

[sources.offices]
cidrs = ["198.51.100.0/25", "2001:db8:100::/64", "203.0.113.7"]
"#,
        )
        .unwrap();
        assert_eq!(c.xdp.mode, AttachMode::Native);
        assert!(c.xdp.monitor);
        assert_eq!(c.protect[0].ports, vec![(6, 443)]);
        assert!(c.protect[1].ports.is_empty());
        assert_eq!(c.groups[0].v4.len(), 2);
        assert_eq!(c.groups[0].v6.len(), 1);
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn bad_cidr_names_its_line() {
        let e = error_of(
            "[sources.a]\ncidrs = [\n  \"198.51.100.0/25\",\n  \"198.51.100.300/25\",\n]\n",
        );
        assert!(e.starts_with("/etc/ewsgate/test.toml:4:3:"), "{e}");
        assert!(e.contains("not a CIDR"), "{e}");
    }

    #[test]
    fn content_conditions_parse_and_their_errors_name_the_line() {
        let base = "[sources.offices]\ncidrs = [\"198.51.100.0/25\"]\n[content]\nmeeting_messages = \"email\"\n[[rule]]\nname = \"r\"\naction = \"allow\"\n";
        let c = parse(&format!(
            "{base}operations = [\"read\", \"ExportItems\"]\ndata = [\"calendar\", \"notes\"]\nscope = \"token-item\"\naccess = [\"delegate\"]\n"
        ))
        .unwrap();
        let r = &c.rules[0];
        assert_eq!(
            r.operations,
            vec![
                OpMatch::Class(crate::model::ews::OpClass::Read),
                OpMatch::Name("ExportItems".into())
            ]
        );
        assert_eq!(
            r.data,
            Some(crate::model::ews::DataSet::CALENDAR.union(crate::model::ews::DataSet::NOTES))
        );
        assert_eq!(r.scope, Some(Scope::TokenItem));
        assert!(r.delegate && !r.impersonation && r.judges_content());
        assert_eq!(c.content.meetings.0, crate::model::ews::DataSet::EMAIL);
        for (line, want) in [
            ("operations = [\"GetItme\"]", "'GetItme' is neither"),
            ("data = [\"mail\"]", "unknown data type 'mail'"),
            ("scope = \"mailbox\"", "scope 'mailbox'"),
            ("access = [\"everything\"]", "access 'everything'"),
        ] {
            let e = error_of(&format!("{base}{line}\n"));
            assert!(e.contains(":8:") && e.contains(want), "{line}: {e}");
        }
        let e = error_of(&base.replace("\"email\"", "\"spam\""));
        assert!(e.contains(":4:") && e.contains("meeting_messages"), "{e}");
    }

    #[test]
    fn token_trust_and_auth_kinds_parse_and_their_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("ewsgate-cfg-tok-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("auth.pem"), "pem").unwrap();
        fs::write(dir.join("ca.pem"), "pem").unwrap();
        let at = |text: &str| Config::parse(&dir.join("t.toml"), text);
        let rule =
            "[[rule]]\nname = \"r\"\nauth = [\"kerberos\", \"negotiate\"]\naction = \"allow\"\n";
        let c = at(rule).unwrap();
        assert_eq!(
            c.rules[0].auth,
            vec![
                crate::model::auth::AuthKind::Kerberos,
                crate::model::auth::AuthKind::Negotiate
            ]
        );
        let e = at(&rule.replace("kerberos", "krb5"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(":3:") && e.contains("kerberos"), "{e}");

        let tokens =
            "[tokens]\ncertificates = [\"auth.pem\"]\naudiences = [\"a\"]\nissuers = [\"i\"]\n";
        let e = at(tokens).unwrap_err().to_string();
        assert!(e.contains(":2:") && e.contains("metadata_urls"), "{e}");
        let tokens = format!("{tokens}metadata_urls = [\"https://mail.example.org:443/autodiscover/metadata/json/1\"]\n");
        assert!(at(&tokens).is_ok());

        let entra = |lines: &str| {
            at(&format!(
                "{tokens}[tokens.entra]\nissuers = [\"i\"]\naudiences = [\"a\"]\n{lines}"
            ))
        };
        let url = "discovery_url = \"https://login.microsoftonline.com/t/v2.0/.well-known/openid-configuration\"\nca = \"ca.pem\"\n";
        let c = entra(url).unwrap();
        let Some(crate::model::settings::EntraKeys::Discovery { fetch, jwks_hosts }) =
            c.tokens.entra.map(|e| e.keys)
        else {
            panic!("discovery settings");
        };
        assert_eq!(jwks_hosts, vec!["login.microsoftonline.com".to_string()]);
        assert_eq!(fetch.urls.len(), 1);
        assert_eq!(fetch.max_bytes, 256 * 1024);
        let c = entra(&format!(
            "{url}jwks_hosts = [\"Keys.Example.org:443\", \"127.0.0.1:8443\"]\n"
        ))
        .unwrap();
        assert!(matches!(c.tokens.entra.map(|e| e.keys),
            Some(crate::model::settings::EntraKeys::Discovery { jwks_hosts, .. }) if jwks_hosts == ["keys.example.org", "127.0.0.1:8443"]));
        for (lines, line, says) in [
            (
                "discovery_url = \"http://login.microsoftonline.com/x\"\n",
                ":9:",
                "https",
            ),
            (
                &format!("{url}keys_file = \"auth.pem\"\n") as &str,
                ":11:",
                "not both",
            ),
            ("", ":6:", "keys_file or discovery_url"),
            (
                &format!("{url}jwks_hosts = []\n"),
                ":9:",
                "jwks_hosts is empty",
            ),
            (
                &format!("{url}jwks_hosts = [\"a@b\"]\n"),
                ":11:",
                "HOST or HOST:PORT",
            ),
            (&url.replace("ca.pem", "missing.pem"), ":10:", "cannot read"),
        ] {
            let e = entra(lines).unwrap_err().to_string();
            assert!(e.contains(line) && e.contains(says), "{lines}: {e}");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn host_bits_are_refused_with_a_hint() {
        let e = error_of("[sources.a]\ncidrs = [\"198.51.100.7/24\"]\n");
        assert!(e.contains(":2:10:") && e.contains("198.51.100.0/24"), "{e}");
    }

    #[test]
    fn syntax_and_unknown_keys_name_their_line() {
        assert!(error_of("[xdp]\nmode = \n").contains("test.toml:2:"));
        let e = error_of("[xdp]\nmonitr = true\n");
        assert!(e.contains(":2:1:") && e.contains("monitr"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(error_of("[xdp]\nmode = \"fast\"\n").contains("unknown mode"));
        let e = error_of("[[protect]]\naddress = \"192.0.2.10\"\nports = [\"tcp/0\"]\n");
        assert!(e.contains(":3:10:"), "{e}");
        let e = error_of(
            "[[protect]]\naddress = \"192.0.2.10\"\n[[protect]]\naddress = \"192.0.2.10\"\n",
        );
        assert!(e.contains(":4:") && e.contains("twice"), "{e}");
        assert!(error_of("[sources.empty]\n").contains("no cidrs"));
        let e = error_of("[sources.sf]\nfeed_url = \"http://ranges.example/ip-ranges.json\"\n");
        assert!(e.contains(":2:12:") && e.contains("HTTPS only"), "{e}");
        let e =
            error_of("[sources.\"s f\"]\nfeed_url = \"https://ranges.example/ip-ranges.json\"\n");
        assert!(
            e.contains(":1:") && e.contains("names the feed's state file"),
            "{e}"
        );
        let e = error_of("[feeds]\nmax_shrink = 1.5\n");
        assert!(e.contains(":2:14:") && e.contains("max_shrink"), "{e}");
        let e = error_of("[crowdsec]\nlapi_url = \"http://192.0.2.7:8080\"\napi_key = \"k\"\n");
        assert!(e.contains(":2:12:") && e.contains("loopback"), "{e}");
        let e = error_of("[crowdsec]\nlapi_url = \"http://127.0.0.1:8080\"\n");
        assert!(e.contains("exactly one of api_key"), "{e}");
        let nine: String = (1..=9)
            .map(|i| format!("[[protect]]\naddress = \"192.0.2.{i}\"\n"))
            .collect();
        let e = error_of(&nine);
        assert!(e.contains(":18:11:") && e.contains("at most 8"), "{e}");
        assert!(error_of("[xdp.capacity]\nipv6_prefixes = 0\n").contains("ipv6_prefixes"));
    }

    #[test]
    fn cidr_files_and_feeds() {
        let dir = std::env::temp_dir().join(format!("ewsgate-cfg-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("list.txt"),
            "# offices\n198.51.100.0/25 # hq\n\n2001:db8:100::/64\n",
        )
        .unwrap();
        fs::write(
            dir.join("feed.json"),
            r#"{"syncToken":"1","prefixes":[{"region":"us-east-1","ip_prefix":["198.51.100.128/26","198.51.100.192/26"]},
               {"region":"GLOBAL","ip_prefix":"203.0.113.0/24"}],
               "ipv6_prefixes":[{"region":"us-east-1","ipv6_prefix":"2001:db8:200::/48"}]}"#,
        )
        .unwrap();
        fs::write(dir.join("bad.txt"), "198.51.100.0/25\nnonsense\n").unwrap();
        let path = dir.join("c.toml");
        let c = Config::parse(
            &path,
            "[sources.o]\nfiles = [\"list.txt\"]\n[sources.sf]\nfeed = \"feed.json\"\nfeed_regions = [\"us-east-1\"]\n",
        )
        .unwrap();
        assert_eq!(c.groups[0].name, "o");
        assert_eq!((c.groups[0].v4.len(), c.groups[0].v6.len()), (1, 1));
        assert_eq!((c.groups[1].v4.len(), c.groups[1].v6.len()), (2, 1));
        let e = Config::parse(&path, "[sources.o]\nfiles = [\"bad.txt\"]\n").unwrap_err();
        assert!(e.to_string().contains("bad.txt:2: 'nonsense'"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
