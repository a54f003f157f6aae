//! Operations settings: detections (thresholds and actions) and where the audit goes.

use std::path::PathBuf;

/// Every detection the engine knows, in the order the config and the docs list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DetectionKind {
    /// The same user from two sites, two source groups, or addresses in different /16s
    /// (IPv4) or /48s (IPv6) within the window.
    TwoPlaces,
    /// Access (allowed or would-deny) outside the configured hours and days.
    OffHours,
    /// Refusals of one user within the window.
    FailureBurstUser,
    /// Refusals of one source address within the window.
    FailureBurstSource,
    /// A user seen from a (group, /24 or /48) that user was not seen from before.
    FirstSeenSource,
    /// One callback token's item used from several source addresses.
    TokenReuse,
    /// Items read by one user within the window.
    ItemsRead,
    /// FindItem requests by one user on one folder within the window (paging through it).
    FindItemPaging,
    /// ExportItems/UploadItems or an impersonation header, allowed or not.
    ExportOrImpersonation,
    /// Distinct users failing their credentials from one source within the window.
    PasswordSpray,
}

/// What a detection's subject is: it decides which actions make sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectKind {
    User,
    Source,
    Token,
}

impl DetectionKind {
    pub const ALL: [DetectionKind; 10] = [
        DetectionKind::TwoPlaces,
        DetectionKind::OffHours,
        DetectionKind::FailureBurstUser,
        DetectionKind::FailureBurstSource,
        DetectionKind::FirstSeenSource,
        DetectionKind::TokenReuse,
        DetectionKind::ItemsRead,
        DetectionKind::FindItemPaging,
        DetectionKind::ExportOrImpersonation,
        DetectionKind::PasswordSpray,
    ];

    /// The name in audit events, Sigma rules and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DetectionKind::TwoPlaces => "two-places",
            DetectionKind::OffHours => "off-hours",
            DetectionKind::FailureBurstUser => "failure-burst-user",
            DetectionKind::FailureBurstSource => "failure-burst-source",
            DetectionKind::FirstSeenSource => "first-seen-source",
            DetectionKind::TokenReuse => "token-reuse",
            DetectionKind::ItemsRead => "items-read",
            DetectionKind::FindItemPaging => "finditem-paging",
            DetectionKind::ExportOrImpersonation => "export-or-impersonation",
            DetectionKind::PasswordSpray => "password-spray",
        }
    }

    /// The table under `[detections]`.
    pub fn config_key(self) -> &'static str {
        match self {
            DetectionKind::TwoPlaces => "two_places",
            DetectionKind::OffHours => "off_hours",
            DetectionKind::FailureBurstUser => "failure_burst_user",
            DetectionKind::FailureBurstSource => "failure_burst_source",
            DetectionKind::FirstSeenSource => "first_seen_source",
            DetectionKind::TokenReuse => "token_reuse",
            DetectionKind::ItemsRead => "items_read",
            DetectionKind::FindItemPaging => "finditem_paging",
            DetectionKind::ExportOrImpersonation => "export_or_impersonation",
            DetectionKind::PasswordSpray => "password_spray",
        }
    }

    pub fn subject(self) -> SubjectKind {
        match self {
            DetectionKind::FailureBurstSource | DetectionKind::PasswordSpray => SubjectKind::Source,
            DetectionKind::TokenReuse => SubjectKind::Token,
            _ => SubjectKind::User,
        }
    }

    /// Default (threshold, window in seconds).
    pub fn defaults(self) -> (u32, u32) {
        match self {
            DetectionKind::TwoPlaces => (2, 1800),
            DetectionKind::FailureBurstUser => (10, 300),
            DetectionKind::FailureBurstSource => (20, 60),
            DetectionKind::TokenReuse => (2, 600),
            DetectionKind::ItemsRead => (500, 60),
            DetectionKind::FindItemPaging => (20, 300),
            DetectionKind::PasswordSpray => (10, 600),
            DetectionKind::OffHours
            | DetectionKind::FirstSeenSource
            | DetectionKind::ExportOrImpersonation => (1, 0),
        }
    }

    /// The largest threshold: token reuse and password spray keep one entry per distinct
    /// source or user up to the threshold, so it bounds their memory.
    pub fn max_threshold(self) -> u32 {
        match self {
            DetectionKind::TokenReuse | DetectionKind::PasswordSpray => 256,
            _ => 1_000_000,
        }
    }
}

/// What a detection asks for when it fires. The engine returns it; the agent applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionSpec {
    Alert,
    /// Refuse the detection's identity (user or token item) at the request layer.
    RefuseIdentity {
        secs: u32,
    },
    /// Put the source in the XDP block set, where its group allows blocks.
    BlockSource {
        secs: u32,
    },
}

impl ActionSpec {
    pub fn name(self) -> &'static str {
        match self {
            ActionSpec::Alert => "alert",
            ActionSpec::RefuseIdentity { .. } => "refuse-identity",
            ActionSpec::BlockSource { .. } => "block-source",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectionRule {
    pub kind: DetectionKind,
    pub enabled: bool,
    /// What the detection counts reaches this: failures, items, pages, distinct sources or
    /// users. 1 for the detections that fire on one event.
    pub threshold: u32,
    pub window_secs: u32,
    pub action: ActionSpec,
    /// Observations from these groups are not looked at by this detection.
    pub ignore_groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectionSettings {
    /// Off: no detection runs at all.
    pub enabled: bool,
    /// This gate's site, carried by its sightings; a fleet compares users across sites.
    pub site: String,
    /// Local time for `off_hours`; defaults to `proxy.utc_offset_minutes`.
    pub utc_offset_minutes: i32,
    pub max_users: usize,
    pub max_sources: usize,
    pub max_tokens: usize,
    /// A detection fires at most once per subject within this time.
    pub quiet_secs: u32,
    /// Groups whose sources a `block-source` action may block; a source in no group always
    /// may. Elsewhere the action is downgraded to an alert.
    pub block_groups: Vec<String>,
    /// Minutes after local midnight, [from, to); `from > to` spans midnight.
    pub hours: (u16, u16),
    /// Bit 0 = Monday.
    pub days: u8,
    /// One per kind, in `DetectionKind::ALL` order.
    pub rules: Vec<DetectionRule>,
}

impl DetectionSettings {
    pub fn rule(&self, kind: DetectionKind) -> &DetectionRule {
        // `rules` is built from ALL, in order; the index always exists.
        &self.rules[kind as usize]
    }
}

impl DetectionRule {
    /// The rule a detection has when the config says nothing of it: on, alerting.
    pub fn default_for(kind: DetectionKind) -> DetectionRule {
        let (threshold, window_secs) = kind.defaults();
        DetectionRule {
            kind,
            enabled: true,
            threshold,
            window_secs,
            action: ActionSpec::Alert,
            ignore_groups: Vec::new(),
        }
    }
}

impl Default for DetectionSettings {
    fn default() -> Self {
        DetectionSettings {
            enabled: true,
            site: "local".into(),
            utc_offset_minutes: 0,
            max_users: 50_000,
            max_sources: 20_000,
            max_tokens: 20_000,
            quiet_secs: 600,
            block_groups: Vec::new(),
            hours: (7 * 60, 20 * 60),
            // Monday to Friday.
            days: 0b1_1111,
            rules: DetectionKind::ALL.map(DetectionRule::default_for).to_vec(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    /// JSON lines appended to a file, reopened after rotation.
    File { path: PathBuf },
    /// JSON lines on standard output.
    Stdout,
    /// The journal's native protocol.
    Journald { socket: PathBuf },
    /// RFC 5424 messages, over UDP (one datagram each) or TCP (octet-counted, RFC 6587).
    Syslog {
        transport: Transport,
        /// `host:port`, resolved when connecting.
        address: String,
        facility: u8,
        /// HOSTNAME in the header; the system's host name when unset.
        hostname: Option<String>,
    },
}

impl SinkSpec {
    /// A short label for logs, status and metrics.
    pub fn label(&self) -> String {
        match self {
            SinkSpec::File { path } => format!("file:{}", path.display()),
            SinkSpec::Stdout => "stdout".into(),
            SinkSpec::Journald { .. } => "journald".into(),
            SinkSpec::Syslog {
                transport, address, ..
            } => format!(
                "syslog-{}:{address}",
                if *transport == Transport::Udp {
                    "udp"
                } else {
                    "tcp"
                }
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    pub sinks: Vec<SinkSpec>,
    /// Bytes each sink may hold before it counts as full.
    pub buffer_bytes: usize,
}

pub const DEFAULT_JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

impl AuditSettings {
    /// The file sink: the agent opens it and hands it to the unprivileged proxy.
    pub fn file(&self) -> Option<&std::path::Path> {
        self.sinks.iter().find_map(|s| match s {
            SinkSpec::File { path } => Some(path.as_path()),
            _ => None,
        })
    }

    /// The sinks the proxy writes itself, beside the file the agent hands it: journald and
    /// syslog. (Without a file sink the audit file is standard output already.)
    pub fn network(&self) -> Vec<SinkSpec> {
        self.sinks
            .iter()
            .filter(|s| matches!(s, SinkSpec::Journald { .. } | SinkSpec::Syslog { .. }))
            .cloned()
            .collect()
    }

    /// Where the audit went before `[audit]`: `proxy.audit_log`, or standard output.
    pub fn legacy(path: Option<PathBuf>) -> AuditSettings {
        AuditSettings {
            sinks: vec![match path {
                Some(path) => SinkSpec::File { path },
                None => SinkSpec::Stdout,
            }],
            buffer_bytes: 16 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsSettings {
    pub detections: DetectionSettings,
    pub audit: AuditSettings,
}
