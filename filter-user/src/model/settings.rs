//! The request layer's settings: the proxy, its limits, token trust, feedback and content.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use super::{ews::Meetings, paths};

#[derive(Debug, Clone, PartialEq)]
pub struct ProxySettings {
    pub listen: Vec<SocketAddr>,
    /// PEM chain served to clients: the same certificate as IIS, so Extended Protection
    /// (channel binding) keeps working.
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    /// CA that signs client certificates; without it no client certificate is asked for.
    pub client_ca: Option<PathBuf>,
    pub upstream: Upstream,
    pub other_paths: OtherPaths,
    /// JSON lines, one per decision; `None` writes them to standard output.
    pub audit_log: Option<PathBuf>,
    pub limits: Limits,
    /// Session tickets and the session cache (off only for benchmarks of full handshakes).
    pub tls_resumption: bool,
    /// Offset of local time from UTC for `hours` and `days` in rules, in minutes.
    pub utc_offset_minutes: i32,
    /// Worker threads of the proxy runtime; 0 means one per CPU.
    pub threads: usize,
    /// The unprivileged user the agent runs the proxy as.
    pub user: String,
    /// Names `Host` may carry; empty means the certificate's DNS names.
    pub server_names: Vec<String>,
    /// Whether a query string on the EWS path is forwarded (it is refused otherwise).
    pub ews_query: bool,
    /// `mode = "report"`: every verdict is computed and audited, and the request forwarded.
    pub report_only: bool,
    /// The agent starts the proxy itself; when false, a proxy started elsewhere (its own
    /// service unit) connects to the agent's proxy socket.
    pub spawn: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `host:port` to connect to.
    pub authority: String,
    pub tls: bool,
    /// Name checked against Exchange's certificate (and sent as SNI).
    pub server_name: String,
    /// CA file for Exchange's certificate; required when `tls`.
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtherPaths {
    Pass,
    Deny,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub header_count: usize,
    pub header_bytes: usize,
    /// Default request body cap, and per-path caps (normalised path, bytes).
    pub body_bytes: u64,
    pub body_limits: Vec<BodyLimit>,
    pub handshake_timeout: Duration,
    pub head_timeout: Duration,
    pub idle_timeout: Duration,
    /// A request body slower than this (after `body_grace`) is cut off.
    pub body_min_rate: u64,
    pub body_grace: Duration,
    pub connections_per_source: usize,
    /// Bytes held for response inspection across all connections at once.
    pub inspect_budget: u64,
    /// Audit bytes waiting for the writer past which new requests are refused (503).
    pub audit_backlog: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyLimit {
    pub path: String,
    pub bytes: u64,
}

impl Limits {
    /// The body cap for a normalised path: the longest matching entry, else the default.
    pub fn body_cap(&self, path: &str) -> u64 {
        self.body_limits
            .iter()
            .filter(|l| paths::matches(&l.path, path))
            .max_by_key(|l| l.path.len())
            .map_or(self.body_bytes, |l| l.bytes)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenSettings {
    pub expect: Expectations,
    /// PEM files of pinned Exchange auth certificates (several at once for rotation).
    pub certificates: Vec<PathBuf>,
    pub cache_entries: usize,
    /// Keys fetched from the metadata URLs (`metadata_fetch = true`).
    pub fetch: Option<FetchSettings>,
    /// `[tokens.entra]`: Entra ID bearer tokens.
    pub entra: Option<EntraSettings>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedbackSettings {
    pub window: Duration,
    /// Failures in the window that put the source in the XDP block set; 0 turns it off.
    /// A source group may set its own (`block_failures`).
    pub failures: u32,
    pub block: Duration,
    /// Credential failures of one identity in the window that refuse it at the request
    /// layer for `identity_block`; 0 turns it off.
    pub identity_failures: u32,
    pub identity_block: Duration,
}

impl Default for FeedbackSettings {
    fn default() -> Self {
        FeedbackSettings {
            window: Duration::from_secs(60),
            failures: 20,
            block: Duration::from_secs(900),
            identity_failures: 10,
            identity_block: Duration::from_secs(900),
        }
    }
}

/// `[content]`: how EWS SOAP is read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContentSettings {
    /// Requests are read whole up to this; past it, only bulk content may continue.
    pub request_buffer: usize,
    /// Responses that must be inspected are held whole up to this.
    pub response_bytes: usize,
    pub limits: SoapLimits,
    pub cache_entries: usize,
    pub meetings: Meetings,
}

impl Default for ContentSettings {
    fn default() -> Self {
        ContentSettings {
            request_buffer: 1 << 20,
            response_bytes: 32 << 20,
            limits: SoapLimits::default(),
            cache_entries: 100_000,
            meetings: Meetings::default(),
        }
    }
}

/// What the deployment expects of Exchange tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expectations {
    /// Accepted `aud` values of callback tokens (the Exchange principal, exact).
    pub audiences: Vec<String>,
    /// Accepted `iss` values (exact).
    pub issuers: Vec<String>,
    /// Accepted `appctx.amurl` values (exact, scheme, host, port and path).
    pub metadata_urls: Vec<String>,
    /// Clock skew allowed on `nbf` and `exp`, in seconds.
    pub leeway: u64,
}

/// Signing keys fetched from allow-listed URLs.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchSettings {
    /// The exact allow list: the only URLs fetched.
    pub urls: Vec<String>,
    /// CA file for `https` URLs (its bytes travel in the config bundle).
    pub ca: Option<std::path::PathBuf>,
    pub refresh: Duration,
    pub timeout: Duration,
    pub max_bytes: usize,
    pub refetch_min: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EntraSettings {
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    pub keys: EntraKeys,
}

/// Where Entra ID signing keys come from.
#[derive(Debug, Clone, PartialEq)]
pub enum EntraKeys {
    /// A JWKS file the admin keeps current.
    File(std::path::PathBuf),
    /// The tenant's OpenID discovery document (the one URL in `fetch.urls`), and the
    /// `jwks_uri` it names if that is https on one of `jwks_hosts` (`host` for port 443,
    /// `host:port` otherwise, lower case).
    Discovery {
        fetch: FetchSettings,
        jwks_hosts: Vec<String>,
    },
}

/// Where an Entra tenant's JWKS may live unless configured otherwise.
pub const DEFAULT_JWKS_HOST: &str = "login.microsoftonline.com";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoapLimits {
    pub depth: usize,
    pub elements: usize,
}

impl Default for SoapLimits {
    fn default() -> Self {
        SoapLimits {
            depth: 48,
            elements: 200_000,
        }
    }
}
