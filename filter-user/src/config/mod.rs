//! The configuration file: TOML, checked whole before anything is applied. Every error names
//! the file, line and column it comes from, so a rejected reload says exactly what to fix.

use std::{
    collections::{BTreeMap, HashSet},
    fmt, fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;
use toml::Spanned;

use filter_common::{MAX_GROUPS, MAX_PORTS, MAX_PROTECTED};

mod request;
pub use request::{
    Action, AuthKind, BodyLimit, ContentSettings, FeedbackSettings, Limits, OpMatch, OtherPaths,
    ProxySettings, Rule, Scope, TokenKind, TokenSettings, Upstream,
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ewsgate";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/ewsgate/control.sock";

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

/// A validated configuration; group ids are the position in `groups` plus one.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub xdp: XdpSettings,
    pub protect: Vec<Protected>,
    pub groups: Vec<SourceGroup>,
    /// The request layer; absent when the daemon runs the packet filter only.
    pub proxy: Option<ProxySettings>,
    pub tokens: TokenSettings,
    pub feedback: FeedbackSettings,
    pub content: ContentSettings,
    /// Ordered, first match wins, default deny.
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct XdpSettings {
    pub interfaces: Vec<String>,
    pub mode: AttachMode,
    pub monitor: bool,
    pub pin_dir: PathBuf,
    pub control_socket: PathBuf,
    pub capacity: Capacity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic with a warning.
    Auto,
    Native,
    Generic,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Auto => "auto",
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        })
    }
}

/// Map sizes fixed when the maps are first created (changing them needs `ewsgate detach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capacity {
    /// 1 KiB blocks for IPv4 prefixes longer than /24: one per /24 that holds such a prefix.
    pub long_prefix_blocks: u32,
    pub ipv6_prefixes: u32,
    /// Each of the block and dynamic allow maps (exact and CIDR) holds this many.
    pub dynamic_entries: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            long_prefix_blocks: 8192,
            ipv6_prefixes: 65536,
            dynamic_entries: 65536,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protected {
    pub addr: IpAddr,
    /// (IP protocol number, port). Empty: the whole address is protected.
    pub ports: Vec<(u8, u16)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceGroup {
    pub name: String,
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
}

impl Config {
    pub fn prefix_count(&self) -> usize {
        self.groups.iter().map(|g| g.v4.len() + g.v6.len()).sum()
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let here = Locator { path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| s.start).unwrap_or(0);
            here.error(at, e.message().to_string())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let groups = validate_sources(&here, base, raw.sources)?;
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        Ok(Config {
            path: path.to_path_buf(),
            xdp: raw.xdp.validate(&here)?,
            protect: validate_protect(&here, raw.protect)?,
            proxy: raw.proxy.map(|p| p.validate(&here, base)).transpose()?,
            tokens: raw.tokens.unwrap_or_default().validate(&here, base)?,
            feedback: raw.feedback.unwrap_or_default().validate(&here)?,
            content: raw.content.unwrap_or_default().validate(&here)?,
            rules: request::validate_rules(&here, raw.rule, &names)?,
            groups,
        })
    }
}

/// Turns byte offsets into `file:line:column` errors.
pub(crate) struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
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
    /// Keep only these regions of the feed (all when empty).
    #[serde(default)]
    feed_regions: Vec<String>,
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
            let path = base.join(f.get_ref());
            nets.extend(read_cidr_file(&path).map_err(|m| here.at(f, m))?);
        }
        if let Some(feed) = &src.feed {
            let path = base.join(feed.get_ref());
            nets.extend(read_feed(&path, &src.feed_regions).map_err(|m| here.at(feed, m))?);
        }
        if src.cidrs.is_empty() && src.files.is_empty() && src.feed.is_none() {
            return Err(here.at(&name, "source group has no cidrs, files or feed"));
        }
        groups.push(group_from(name.into_inner(), nets));
    }
    Ok(groups)
}

fn group_from(name: String, nets: Vec<IpNet>) -> SourceGroup {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for n in nets {
        match n {
            IpNet::V4(n) => v4.push(n),
            IpNet::V6(n) => v6.push(n),
        }
    }
    v4.sort();
    v4.dedup();
    v6.sort();
    v6.dedup();
    SourceGroup { name, v4, v6 }
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
fn read_cidr_file(path: &Path) -> Result<Vec<IpNet>, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
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

#[derive(Deserialize)]
struct Feed {
    #[serde(default)]
    prefixes: Vec<FeedEntry>,
    #[serde(default)]
    ipv6_prefixes: Vec<FeedEntry>,
}

#[derive(Deserialize)]
struct FeedEntry {
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    ip_prefix: Option<OneOrMany>,
    #[serde(default)]
    ipv6_prefix: Option<OneOrMany>,
}

/// Salesforce's feed gives arrays where AWS's schema has strings; accept both.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Salesforce's `ip-ranges.json`.
fn read_feed(path: &Path, regions: &[String]) -> Result<Vec<IpNet>, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let feed: Feed = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}:{}:{}: not a Salesforce ip-ranges feed: {e}",
            path.display(),
            e.line(),
            e.column()
        )
    })?;
    let mut nets = Vec::new();
    for entry in feed.prefixes.iter().chain(&feed.ipv6_prefixes) {
        let wanted = regions.is_empty()
            || entry
                .region
                .as_ref()
                .is_some_and(|r| regions.iter().any(|w| w == r));
        if !wanted {
            continue;
        }
        for p in [&entry.ip_prefix, &entry.ipv6_prefix].into_iter().flatten() {
            let list = match p {
                OneOrMany::One(s) => std::slice::from_ref(s),
                OneOrMany::Many(v) => v.as_slice(),
            };
            for s in list {
                nets.push(parse_cidr(s).map_err(|m| format!("{}: {m}", path.display()))?);
            }
        }
    }
    if nets.is_empty() {
        return Err(format!("{}: the feed holds no prefixes", path.display()));
    }
    Ok(nets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/ewsgate/test.toml"), text)
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
                OpMatch::Class(crate::content::OpClass::Read),
                OpMatch::Name("ExportItems".into())
            ]
        );
        assert_eq!(
            r.data,
            Some(crate::content::DataSet::CALENDAR.union(crate::content::DataSet::NOTES))
        );
        assert_eq!(r.scope, Some(Scope::TokenItem));
        assert!(r.delegate && !r.impersonation && r.judges_content());
        assert_eq!(c.content.meetings.0, crate::content::DataSet::EMAIL);
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
            vec![AuthKind::Kerberos, AuthKind::Negotiate]
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
        let Some(crate::entra::EntraKeys::Discovery { fetch, jwks_hosts }) =
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
            Some(crate::entra::EntraKeys::Discovery { jwks_hosts, .. }) if jwks_hosts == ["keys.example.org", "127.0.0.1:8443"]));
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
            (
                &url.replace("ca.pem", "missing.pem"),
                ":10:",
                "no such file",
            ),
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
