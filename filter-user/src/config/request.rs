//! The request layer's configuration: the TLS proxy (`[proxy]`), Exchange token trust
//! (`[tokens]`), failure feedback into XDP (`[feedback]`) and the ordered rules (`[[rule]]`).
//! Checked with the rest of the file, so a bad rule keeps the running policy.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Locator};
use crate::model::{
    auth::{AuthKind, TokenKind},
    ews::{self, DataSet, Meetings, OpClass},
    paths,
    rules::{Action, OpMatch, Rule, Scope},
    settings::{
        BodyLimit, ContentSettings, EntraKeys, EntraSettings, Expectations, FeedbackSettings,
        FetchSettings, Limits, OtherPaths, ProxySettings, SoapLimits, TokenSettings, Upstream,
        DEFAULT_JWKS_HOST,
    },
};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawContent {
    request_buffer_bytes: Option<Spanned<u64>>,
    response_bytes: Option<Spanned<u64>>,
    max_depth: Option<Spanned<u64>>,
    max_elements: Option<Spanned<u64>>,
    cache_entries: Option<Spanned<u64>>,
    meeting_messages: Option<Spanned<String>>,
}

impl RawContent {
    pub(crate) fn validate(self, here: &Locator) -> Result<ContentSettings, ConfigError> {
        let d = ContentSettings::default();
        let bounded =
            |v: &Option<Spanned<u64>>, default: usize, min: u64, max: u64, name: &str| match v {
                None => Ok(default),
                Some(x) if (min..=max).contains(x.get_ref()) => Ok(*x.get_ref() as usize),
                Some(x) => Err(here.at(x, format!("{name} must be {min}..={max}"))),
            };
        let meetings = match self
            .meeting_messages
            .as_ref()
            .map(|m| (m, m.get_ref().as_str()))
        {
            None | Some((_, "calendar")) => Meetings(DataSet::CALENDAR),
            Some((_, "email")) => Meetings(DataSet::EMAIL),
            Some((m, other)) => {
                return Err(here.at(
                    m,
                    format!("'{other}': meeting_messages is calendar or email"),
                ))
            }
        };
        Ok(ContentSettings {
            request_buffer: bounded(
                &self.request_buffer_bytes,
                d.request_buffer,
                4096,
                1 << 30,
                "request_buffer_bytes",
            )?,
            response_bytes: bounded(
                &self.response_bytes,
                d.response_bytes,
                4096,
                1 << 31,
                "response_bytes",
            )?,
            limits: SoapLimits {
                depth: bounded(&self.max_depth, d.limits.depth, 8, 256, "max_depth")?,
                elements: bounded(
                    &self.max_elements,
                    d.limits.elements,
                    16,
                    10_000_000,
                    "max_elements",
                )?,
            },
            cache_entries: bounded(
                &self.cache_entries,
                d.cache_entries,
                1,
                100_000_000,
                "cache_entries",
            )?,
            meetings,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProxy {
    listen: Vec<Spanned<String>>,
    certificate: Spanned<String>,
    private_key: Spanned<String>,
    client_ca: Option<Spanned<String>>,
    upstream: Spanned<String>,
    upstream_ca: Option<Spanned<String>>,
    upstream_server_name: Option<String>,
    other_paths: Option<Spanned<String>>,
    audit_log: Option<String>,
    #[serde(default = "yes")]
    tls_resumption: bool,
    utc_offset_minutes: Option<Spanned<i32>>,
    #[serde(default)]
    threads: usize,
    user: Option<Spanned<String>>,
    #[serde(default)]
    server_names: Vec<Spanned<String>>,
    #[serde(default)]
    ews_query: bool,
    mode: Option<Spanned<String>>,
    #[serde(default = "yes")]
    spawn: bool,
    #[serde(default)]
    limits: RawLimits,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    header_count: usize,
    header_bytes: usize,
    body_bytes: u64,
    body: Vec<RawBodyLimit>,
    handshake_timeout_ms: u64,
    head_timeout_ms: u64,
    idle_timeout_ms: u64,
    body_min_bytes_per_s: u64,
    body_grace_ms: u64,
    connections_per_source: usize,
    inspect_budget_bytes: u64,
    audit_backlog_bytes: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            header_count: 100,
            header_bytes: 64 * 1024,
            body_bytes: 16 << 20,
            body: Vec::new(),
            handshake_timeout_ms: 10_000,
            head_timeout_ms: 30_000,
            idle_timeout_ms: 120_000,
            body_min_bytes_per_s: 4096,
            body_grace_ms: 10_000,
            connections_per_source: 256,
            inspect_budget_bytes: 256 << 20,
            audit_backlog_bytes: 64 << 20,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBodyLimit {
    path: Spanned<String>,
    bytes: u64,
}

impl RawProxy {
    pub(crate) fn validate(
        self,
        here: &Locator,
        base: &Path,
    ) -> Result<ProxySettings, ConfigError> {
        let mut listen = Vec::new();
        for l in &self.listen {
            let addr: SocketAddr = l.get_ref().parse().map_err(|_| {
                here.at(
                    l,
                    "not a socket address: expected 192.0.2.10:443 or [2001:db8::10]:443",
                )
            })?;
            listen.push(addr);
        }
        if listen.is_empty() {
            return Err(here.error(0, "[proxy] listen is empty"));
        }
        let upstream = parse_upstream(&self.upstream, self.upstream_server_name)
            .map_err(|m| here.at(&self.upstream, m))?;
        // Read through the locator, so the CA is in the bundle the proxy gets (it has no
        // filesystem) and a missing file is an error at its line.
        let ca = self
            .upstream_ca
            .as_ref()
            .map(|c| existing(here, base, c))
            .transpose()?;
        if upstream.tls && ca.is_none() {
            return Err(here.at(&self.upstream, "an https upstream needs upstream_ca"));
        }
        let other_paths = match self.other_paths.as_ref().map(|o| (o, o.get_ref().as_str())) {
            None | Some((_, "deny")) => OtherPaths::Deny,
            Some((_, "pass")) => OtherPaths::Pass,
            Some((o, v)) => {
                return Err(here.at(o, format!("'{v}': other_paths is pass or deny")));
            }
        };
        let offset = self.utc_offset_minutes.as_ref().map_or(0, |o| *o.get_ref());
        if let Some(o) = self
            .utc_offset_minutes
            .as_ref()
            .filter(|_| offset.abs() > 14 * 60)
        {
            return Err(here.at(o, "utc_offset_minutes out of range"));
        }
        Ok(ProxySettings {
            listen,
            certificate: existing(here, base, &self.certificate)?,
            private_key: existing(here, base, &self.private_key)?,
            client_ca: self
                .client_ca
                .as_ref()
                .map(|c| existing(here, base, c))
                .transpose()?,
            upstream: Upstream { ca, ..upstream },
            other_paths,
            audit_log: self.audit_log.map(|a| base.join(a)),
            limits: self.limits.validate(here)?,
            tls_resumption: self.tls_resumption,
            utc_offset_minutes: offset,
            threads: self.threads,
            user: validate_user(here, self.user.as_ref())?,
            server_names: validate_names(here, &self.server_names)?,
            ews_query: self.ews_query,
            report_only: report_mode(here, self.mode.as_ref())?,
            spawn: self.spawn,
        })
    }
}

/// `mode = "enforce"` (the default) or `"report"`.
fn report_mode(here: &Locator, mode: Option<&Spanned<String>>) -> Result<bool, ConfigError> {
    match mode.map(|m| (m, m.get_ref().as_str())) {
        None | Some((_, "enforce")) => Ok(false),
        Some((_, "report")) => Ok(true),
        Some((m, other)) => Err(here.at(m, format!("mode '{other}': expected enforce or report"))),
    }
}

/// The proxy's user: a name as the system knows it (checked when the agent starts it).
fn validate_user(here: &Locator, user: Option<&Spanned<String>>) -> Result<String, ConfigError> {
    let Some(u) = user else {
        return Ok("ewsgate".into());
    };
    let name = u.get_ref();
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !ok || name == "root" {
        return Err(here.at(u, format!("'{name}' is not an unprivileged user name")));
    }
    Ok(name.clone())
}

/// Host names a request may name the gate by, lower-cased.
fn validate_names(here: &Locator, names: &[Spanned<String>]) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for n in names {
        let name = n.get_ref().to_ascii_lowercase();
        let ok = !name.is_empty()
            && name.len() <= 253
            && name.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'[' | b']' | b':')
            });
        if !ok {
            return Err(here.at(n, format!("'{}' is not a host name", n.get_ref())));
        }
        out.push(name);
    }
    Ok(out)
}

/// A file the config names: read now, so that it is checked and part of the bundle.
fn existing(here: &Locator, base: &Path, file: &Spanned<String>) -> Result<PathBuf, ConfigError> {
    here.file(base, file).map(|(path, _)| path)
}

fn parse_upstream(text: &Spanned<String>, name: Option<String>) -> Result<Upstream, String> {
    let t = text.get_ref();
    let (tls, rest) = if let Some(r) = t.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = t.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!(
            "'{t}': upstream is http://HOST[:PORT] or https://HOST[:PORT]"
        ));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(format!(
            "'{t}': upstream names a host and port only, no path"
        ));
    }
    let has_port = match rest.rfind(']') {
        Some(end) => rest[end..].contains(':'),
        None => rest.contains(':'),
    };
    let authority = if has_port {
        rest.to_string()
    } else {
        format!("{rest}:{}", if tls { 443 } else { 80 })
    };
    let host = authority[..authority.rfind(':').unwrap_or(authority.len())]
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok(Upstream {
        authority,
        tls,
        server_name: name.unwrap_or(host),
        ca: None,
    })
}

impl RawLimits {
    fn validate(self, here: &Locator) -> Result<Limits, ConfigError> {
        let ms = Duration::from_millis;
        let checks = [
            ("header_count", self.header_count as u64, 1, 1000),
            ("header_bytes", self.header_bytes as u64, 8192, 1 << 20),
            ("body_bytes", self.body_bytes, 1, 1 << 40),
            (
                "handshake_timeout_ms",
                self.handshake_timeout_ms,
                1,
                600_000,
            ),
            ("head_timeout_ms", self.head_timeout_ms, 1, 600_000),
            ("idle_timeout_ms", self.idle_timeout_ms, 1, 3_600_000),
            ("body_grace_ms", self.body_grace_ms, 1, 600_000),
            (
                "connections_per_source",
                self.connections_per_source as u64,
                1,
                1 << 20,
            ),
            (
                "inspect_budget_bytes",
                self.inspect_budget_bytes,
                1 << 20,
                1 << 40,
            ),
            (
                "audit_backlog_bytes",
                self.audit_backlog_bytes,
                1 << 16,
                1 << 34,
            ),
        ];
        for (name, value, min, max) in checks {
            if !(min..=max).contains(&value) {
                return Err(here.error(
                    0,
                    format!("[proxy.limits] {name} = {value}: must be {min}..={max}"),
                ));
            }
        }
        let mut body_limits = Vec::new();
        for b in self.body {
            let path = paths::normalise(b.path.get_ref().trim_end_matches('*'))
                .map_err(|e| here.at(&b.path, e.to_string()))?;
            let star = if b.path.get_ref().ends_with('*') {
                "*"
            } else {
                ""
            };
            body_limits.push(BodyLimit {
                path: format!("{path}{star}"),
                bytes: b.bytes,
            });
        }
        Ok(Limits {
            header_count: self.header_count,
            header_bytes: self.header_bytes,
            body_bytes: self.body_bytes,
            body_limits,
            handshake_timeout: ms(self.handshake_timeout_ms),
            head_timeout: ms(self.head_timeout_ms),
            idle_timeout: ms(self.idle_timeout_ms),
            body_min_rate: self.body_min_bytes_per_s,
            body_grace: ms(self.body_grace_ms),
            connections_per_source: self.connections_per_source,
            inspect_budget: self.inspect_budget_bytes,
            audit_backlog: self.audit_backlog_bytes as usize,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTokens {
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    issuers: Vec<String>,
    #[serde(default)]
    metadata_urls: Vec<String>,
    #[serde(default)]
    certificates: Vec<Spanned<String>>,
    leeway_secs: Option<Spanned<u64>>,
    cache_entries: Option<usize>,
    #[serde(default)]
    metadata_fetch: bool,
    metadata_ca: Option<Spanned<String>>,
    metadata_refresh_secs: Option<u64>,
    metadata_timeout_ms: Option<u64>,
    metadata_max_bytes: Option<usize>,
    metadata_refetch_min_secs: Option<u64>,
    entra: Option<Spanned<RawEntra>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntra {
    #[serde(default)]
    issuers: Vec<String>,
    #[serde(default)]
    audiences: Vec<String>,
    /// A JWKS file, or:
    keys_file: Option<Spanned<String>>,
    /// the tenant's OpenID discovery document, fetched with the limits below.
    discovery_url: Option<Spanned<String>>,
    jwks_hosts: Option<Vec<Spanned<String>>>,
    ca: Option<Spanned<String>>,
    refresh_secs: Option<u64>,
    timeout_ms: Option<u64>,
    max_bytes: Option<usize>,
    refetch_min_secs: Option<u64>,
}

/// Debian's bundle of public CAs, which login.microsoftonline.com chains to.
const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

impl RawEntra {
    fn validate(
        &self,
        here: &Locator,
        base: &Path,
        section: &Spanned<RawEntra>,
    ) -> Result<EntraSettings, ConfigError> {
        if self.issuers.is_empty() || self.audiences.is_empty() {
            return Err(here.at(section, "[tokens.entra] needs issuers and audiences"));
        }
        let keys = match (&self.keys_file, &self.discovery_url) {
            (Some(file), None) => EntraKeys::File(existing(here, base, file)?),
            (None, Some(url)) => self.discovery(here, base, url)?,
            (Some(file), Some(_)) => {
                return Err(here.at(
                    file,
                    "[tokens.entra] takes keys_file or discovery_url, not both",
                ))
            }
            (None, None) => {
                return Err(here.at(section, "[tokens.entra] needs keys_file or discovery_url"))
            }
        };
        Ok(EntraSettings {
            issuers: self.issuers.clone(),
            audiences: self.audiences.clone(),
            keys,
        })
    }

    fn discovery(
        &self,
        here: &Locator,
        base: &Path,
        url: &Spanned<String>,
    ) -> Result<EntraKeys, ConfigError> {
        let uri: Option<http::Uri> = url.get_ref().parse().ok();
        let ok = uri
            .as_ref()
            .is_some_and(|u| u.scheme_str() == Some("https") && u.host().is_some());
        if !ok || url.get_ref().contains('@') {
            return Err(here.at(url, "discovery_url is not https://HOST[:PORT]/PATH"));
        }
        let mut jwks_hosts = Vec::new();
        for h in self.jwks_hosts.iter().flatten() {
            let text = h.get_ref().to_ascii_lowercase();
            let valid = !text.is_empty()
                && text.parse::<http::uri::Authority>().is_ok()
                && !text.contains('@');
            if !valid {
                return Err(here.at(h, format!("'{text}' is not HOST or HOST:PORT")));
            }
            jwks_hosts.push(text.strip_suffix(":443").unwrap_or(&text).to_string());
        }
        match &self.jwks_hosts {
            None => jwks_hosts.push(DEFAULT_JWKS_HOST.to_string()),
            Some(h) if h.is_empty() => {
                return Err(here.at(
                    url,
                    "[tokens.entra] jwks_hosts is empty: no JWKS could load",
                ))
            }
            Some(_) => {}
        }
        // Read here either way, so that its bytes travel in the config bundle.
        let ca = match &self.ca {
            Some(c) => existing(here, base, c)?,
            None => match here.files.read(Path::new(SYSTEM_CA)) {
                Ok(_) => PathBuf::from(SYSTEM_CA),
                Err(e) => {
                    return Err(here.at(
                        url,
                        format!("cannot read {SYSTEM_CA} ({e}); set [tokens.entra] ca"),
                    ))
                }
            },
        };
        let secs = Duration::from_secs;
        let fetch = FetchSettings {
            urls: vec![url.get_ref().clone()],
            ca: Some(ca),
            refresh: secs(self.refresh_secs.unwrap_or(3600).max(10)),
            timeout: Duration::from_millis(self.timeout_ms.unwrap_or(5000).clamp(100, 60_000)),
            max_bytes: self.max_bytes.unwrap_or(256 * 1024).clamp(1024, 16 << 20),
            refetch_min: secs(self.refetch_min_secs.unwrap_or(60)),
        };
        Ok(EntraKeys::Discovery { fetch, jwks_hosts })
    }
}

impl RawTokens {
    pub(crate) fn validate(
        self,
        here: &Locator,
        base: &Path,
    ) -> Result<TokenSettings, ConfigError> {
        let mut certificates = Vec::new();
        for c in &self.certificates {
            certificates.push(existing(here, base, c)?);
        }
        let leeway = match &self.leeway_secs {
            Some(l) if *l.get_ref() > 900 => {
                return Err(here.at(l, "leeway_secs above 900 lets expired tokens through"))
            }
            Some(l) => *l.get_ref(),
            None => 60,
        };
        let fetch = self.fetch_settings(here, base)?;
        let entra = self
            .entra
            .as_ref()
            .map(|e| e.get_ref().validate(here, base, e))
            .transpose()?;
        // A callback token's amurl must be one of metadata_urls: without them none passes.
        let incomplete =
            self.audiences.is_empty() || self.issuers.is_empty() || self.metadata_urls.is_empty();
        if (!certificates.is_empty() || fetch.is_some()) && incomplete {
            if certificates.is_empty() {
                return Err(here.error(0, "[tokens] metadata_fetch needs audiences and issuers"));
            }
            return Err(here.at(
                &self.certificates[0],
                "[tokens] with certificates needs audiences, issuers and metadata_urls",
            ));
        }
        Ok(TokenSettings {
            expect: Expectations {
                audiences: self.audiences,
                issuers: self.issuers,
                metadata_urls: self.metadata_urls,
                leeway,
            },
            certificates,
            cache_entries: self.cache_entries.unwrap_or(100_000).max(1),
            fetch,
            entra,
        })
    }

    fn fetch_settings(
        &self,
        here: &Locator,
        base: &Path,
    ) -> Result<Option<FetchSettings>, ConfigError> {
        if !self.metadata_fetch {
            return Ok(None);
        }
        if self.metadata_urls.is_empty() {
            return Err(here.error(0, "[tokens] metadata_fetch needs metadata_urls"));
        }
        let ca = self
            .metadata_ca
            .as_ref()
            .map(|c| existing(here, base, c))
            .transpose()?;
        for url in &self.metadata_urls {
            let uri: Option<http::Uri> = url.parse().ok();
            let scheme = uri
                .as_ref()
                .and_then(|u| u.scheme_str().map(str::to_string));
            let ok = uri.as_ref().is_some_and(|u| u.host().is_some())
                && matches!(scheme.as_deref(), Some("http" | "https"));
            if !ok {
                return Err(here.error(
                    0,
                    format!("[tokens] metadata URL '{url}' is not http(s)://HOST[:PORT]/PATH"),
                ));
            }
            if scheme.as_deref() == Some("https") && ca.is_none() {
                return Err(here.error(
                    0,
                    format!("[tokens] metadata URL '{url}' is https: set metadata_ca"),
                ));
            }
        }
        let secs = Duration::from_secs;
        Ok(Some(FetchSettings {
            urls: self.metadata_urls.clone(),
            ca,
            refresh: secs(self.metadata_refresh_secs.unwrap_or(3600).max(10)),
            timeout: Duration::from_millis(
                self.metadata_timeout_ms.unwrap_or(5000).clamp(100, 60_000),
            ),
            max_bytes: self
                .metadata_max_bytes
                .unwrap_or(256 * 1024)
                .clamp(1024, 16 << 20),
            refetch_min: secs(self.metadata_refetch_min_secs.unwrap_or(60)),
        }))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFeedback {
    window_secs: Option<u64>,
    failures: Option<u32>,
    block_secs: Option<Spanned<u64>>,
    identity_failures: Option<u32>,
    identity_block_secs: Option<Spanned<u64>>,
}

impl RawFeedback {
    pub(crate) fn validate(self, here: &Locator) -> Result<FeedbackSettings, ConfigError> {
        let d = FeedbackSettings::default();
        let block = match &self.block_secs {
            Some(b) if *b.get_ref() == 0 => return Err(here.at(b, "block_secs must be at least 1")),
            Some(b) => Duration::from_secs(*b.get_ref()),
            None => d.block,
        };
        let identity_block = match &self.identity_block_secs {
            Some(b) if *b.get_ref() == 0 => {
                return Err(here.at(b, "identity_block_secs must be at least 1"))
            }
            Some(b) => Duration::from_secs(*b.get_ref()),
            None => d.identity_block,
        };
        Ok(FeedbackSettings {
            window: self
                .window_secs
                .map_or(d.window, |w| Duration::from_secs(w.max(1))),
            failures: self.failures.unwrap_or(d.failures),
            block,
            identity_failures: self.identity_failures.unwrap_or(d.identity_failures),
            identity_block,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    name: Spanned<String>,
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    #[serde(default)]
    auth: Vec<Spanned<String>>,
    #[serde(default)]
    token: Vec<Spanned<String>>,
    #[serde(default)]
    paths: Vec<Spanned<String>>,
    #[serde(default)]
    users: Vec<String>,
    hours: Option<Spanned<String>>,
    #[serde(default)]
    days: Vec<Spanned<String>>,
    #[serde(default)]
    operations: Vec<Spanned<String>>,
    data: Option<Vec<Spanned<String>>>,
    scope: Option<Spanned<String>>,
    #[serde(default)]
    access: Vec<Spanned<String>>,
    action: Spanned<String>,
    mode: Option<Spanned<String>>,
}

pub(crate) fn validate_rules(
    here: &Locator,
    raw: Vec<RawRule>,
    groups: &[&str],
) -> Result<Vec<Rule>, ConfigError> {
    let mut rules: Vec<Rule> = Vec::new();
    for r in raw {
        let name = r.name.get_ref().clone();
        if rules.iter().any(|x| *x.name == *name) {
            return Err(here.at(&r.name, format!("rule '{name}' is defined twice")));
        }
        let line = here.line_of(&r.name);
        rules.push(r.validate(here, groups, line)?);
    }
    Ok(rules)
}

impl RawRule {
    fn validate(self, here: &Locator, groups: &[&str], line: usize) -> Result<Rule, ConfigError> {
        for g in &self.groups {
            if !groups.contains(&g.get_ref().as_str()) {
                return Err(here.at(g, format!("no source group named '{}'", g.get_ref())));
            }
        }
        let auth = self
            .auth
            .iter()
            .map(|a| {
                AuthKind::parse(a.get_ref()).ok_or_else(|| {
                    here.at(a, format!("unknown auth '{}': expected none, basic, ntlm, negotiate (NTLM inside SPNEGO), kerberos, bearer or client-cert", a.get_ref()))
                })
            })
            .collect::<Result<_, _>>()?;
        let token = self
            .token
            .iter()
            .map(|t| match t.get_ref().as_str() {
                "callback" => Ok(TokenKind::Callback),
                "entra" => Ok(TokenKind::Entra),
                other => Err(here.at(
                    t,
                    format!("unknown token family '{other}': expected callback or entra"),
                )),
            })
            .collect::<Result<_, _>>()?;
        let mut paths = Vec::new();
        for p in &self.paths {
            let text = p.get_ref();
            let star = if text.ends_with('*') { "*" } else { "" };
            let norm = paths::normalise(text.trim_end_matches('*'))
                .map_err(|e| here.at(p, e.to_string()))?;
            paths.push(format!("{norm}{star}"));
        }
        let hours = self
            .hours
            .as_ref()
            .map(|h| parse_hours(h.get_ref()).map_err(|m| here.at(h, m)))
            .transpose()?;
        let mut days = 0u8;
        for d in &self.days {
            days |= parse_day(d.get_ref()).map_err(|m| here.at(d, m))?;
        }
        let operations = self
            .operations
            .iter()
            .map(|o| {
                let name = o.get_ref();
                if let Some(c) = OpClass::parse(name) {
                    Ok(OpMatch::Class(c))
                } else if ews::is_operation(name) {
                    Ok(OpMatch::Name(name.clone()))
                } else {
                    Err(here.at(o, format!("'{name}' is neither an EWS operation ewsgate knows nor a class (read, write, send, sync, export, ediscovery, delegates, inbox-rules, apps)")))
                }
            })
            .collect::<Result<_, _>>()?;
        let data = match &self.data {
            None => None,
            Some(list) => {
                let mut set = DataSet::NONE;
                for d in list {
                    set = set.union(DataSet::parse(d.get_ref()).ok_or_else(|| {
                        here.at(d, format!("unknown data type '{}': expected email, calendar, contacts, tasks or notes", d.get_ref()))
                    })?);
                }
                Some(set)
            }
        };
        let scope = match self.scope.as_ref().map(|s| (s, s.get_ref().as_str())) {
            None => None,
            Some((_, "token-item")) => Some(Scope::TokenItem),
            Some((s, other)) => {
                return Err(here.at(s, format!("scope '{other}': expected token-item")))
            }
        };
        let (mut impersonation, mut delegate) = (false, false);
        for a in &self.access {
            match a.get_ref().as_str() {
                "impersonation" => impersonation = true,
                "delegate" => delegate = true,
                other => {
                    return Err(here.at(
                        a,
                        format!("access '{other}': expected impersonation or delegate"),
                    ))
                }
            }
        }
        let action = match self.action.get_ref().as_str() {
            "allow" => Action::Allow,
            "deny" => Action::Deny,
            other => {
                return Err(here.at(
                    &self.action,
                    format!("action '{other}': expected allow or deny"),
                ))
            }
        };
        Ok(Rule {
            name: self.name.into_inner().into(),
            line,
            groups: self.groups.into_iter().map(Spanned::into_inner).collect(),
            auth,
            token,
            paths,
            users: self.users.iter().map(|u| u.to_ascii_lowercase()).collect(),
            hours,
            days: if days == 0 { 0x7f } else { days },
            operations,
            data,
            scope,
            impersonation,
            delegate,
            action,
            report: report_mode(here, self.mode.as_ref())?,
        })
    }
}

/// "07:00-19:00".
pub(super) fn parse_hours(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("'{text}': hours are HH:MM-HH:MM");
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let minutes = |t: &str| -> Option<u16> {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
        (h <= 24 && m < 60 && h * 60 + m <= 1440).then_some(h * 60 + m)
    };
    let (from, to) = (minutes(a).ok_or_else(bad)?, minutes(b).ok_or_else(bad)?);
    if from == to {
        return Err(format!("'{text}': an empty range"));
    }
    Ok((from, to))
}

pub(super) fn parse_day(text: &str) -> Result<u8, String> {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let index = |d: &str| NAMES.iter().position(|n| *n == d.to_ascii_lowercase());
    let bad = || format!("'{text}': days are mon..sun or ranges such as mon-fri");
    match text.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (index(a).ok_or_else(bad)?, index(b).ok_or_else(bad)?);
            if a > b {
                return Err(bad());
            }
            Ok((a..=b).fold(0, |m, i| m | 1 << i))
        }
        None => Ok(1 << index(text).ok_or_else(bad)?),
    }
}
