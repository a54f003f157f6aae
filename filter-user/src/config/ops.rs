//! `[detections]` (signals over the decision stream, with thresholds and an optional action
//! each) and `[audit]` (where the audit lines go), checked into `model::ops`.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{
    request::{parse_day, parse_hours},
    ConfigError, Locator,
};
use crate::model::{
    ops::{
        ActionSpec, AuditSettings, DetectionKind, DetectionRule, DetectionSettings, OpsSettings,
        SinkSpec, SubjectKind, Transport, DEFAULT_JOURNAL_SOCKET,
    },
    settings::ProxySettings,
};

/// Which settings keys a detection reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keys {
    /// `window_secs` only.
    Window,
    /// `threshold` and `window_secs`.
    Counted,
    /// `hours` and `days`.
    Hours,
    /// Neither: it fires on a single event.
    None,
}

fn keys(kind: DetectionKind) -> Keys {
    match kind {
        DetectionKind::TwoPlaces => Keys::Window,
        DetectionKind::OffHours => Keys::Hours,
        DetectionKind::FirstSeenSource | DetectionKind::ExportOrImpersonation => Keys::None,
        _ => Keys::Counted,
    }
}

/// `[detections]` and `[audit]`, checked with the rest of the file.
pub(crate) fn validate(
    here: &Locator,
    base: &std::path::Path,
    detections: Option<RawDetections>,
    audit: Option<RawAudit>,
    groups: &[&str],
    proxy: Option<&ProxySettings>,
) -> Result<OpsSettings, ConfigError> {
    let legacy = proxy.and_then(|p| p.audit_log.clone());
    Ok(OpsSettings {
        detections: detections.unwrap_or_default().validate(
            here,
            groups,
            proxy.map_or(0, |p| p.utc_offset_minutes),
        )?,
        audit: match audit {
            Some(a) => a.validate(here, base, legacy)?,
            None => AuditSettings::legacy(legacy),
        },
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDetections {
    enabled: Option<bool>,
    site: Option<Spanned<String>>,
    utc_offset_minutes: Option<Spanned<i32>>,
    max_users: Option<Spanned<u64>>,
    max_sources: Option<Spanned<u64>>,
    max_tokens: Option<Spanned<u64>>,
    quiet_secs: Option<Spanned<u64>>,
    #[serde(default)]
    block_groups: Vec<Spanned<String>>,
    two_places: Option<Spanned<RawDetection>>,
    off_hours: Option<Spanned<RawDetection>>,
    failure_burst_user: Option<Spanned<RawDetection>>,
    failure_burst_source: Option<Spanned<RawDetection>>,
    first_seen_source: Option<Spanned<RawDetection>>,
    token_reuse: Option<Spanned<RawDetection>>,
    items_read: Option<Spanned<RawDetection>>,
    finditem_paging: Option<Spanned<RawDetection>>,
    export_or_impersonation: Option<Spanned<RawDetection>>,
    password_spray: Option<Spanned<RawDetection>>,
}

/// One detection's table. Which keys apply depends on the detection; the others are refused.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDetection {
    enabled: Option<bool>,
    threshold: Option<Spanned<u64>>,
    window_secs: Option<Spanned<u64>>,
    hours: Option<Spanned<String>>,
    #[serde(default)]
    days: Vec<Spanned<String>>,
    action: Option<Spanned<String>>,
    action_secs: Option<Spanned<u64>>,
    #[serde(default)]
    ignore_groups: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAudit {
    #[serde(default)]
    sinks: Vec<Spanned<RawSink>>,
    buffer_bytes: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    #[serde(rename = "type")]
    kind: Spanned<String>,
    path: Option<String>,
    socket: Option<String>,
    transport: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    facility: Option<Spanned<String>>,
    hostname: Option<Spanned<String>>,
}

fn in_range(
    here: &Locator,
    v: Option<&Spanned<u64>>,
    name: &str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) if range.contains(s.get_ref()) => Ok(*s.get_ref()),
        Some(s) => Err(here.at(
            s,
            format!(
                "{name} = {}: must be {}..={}",
                s.get_ref(),
                range.start(),
                range.end()
            ),
        )),
    }
}

impl RawDetections {
    pub(crate) fn validate(
        mut self,
        here: &Locator,
        groups: &[&str],
        proxy_offset: i32,
    ) -> Result<DetectionSettings, ConfigError> {
        let offset = match &self.utc_offset_minutes {
            Some(o) if o.get_ref().abs() > 14 * 60 => {
                return Err(here.at(o, "utc_offset_minutes out of range"))
            }
            Some(o) => *o.get_ref(),
            None => proxy_offset,
        };
        let site = match &self.site {
            Some(s) if !valid_label(s.get_ref()) => {
                return Err(here.at(
                    s,
                    format!(
                        "site '{}': 1 to 64 letters, digits, '-', '_' or '.'",
                        s.get_ref()
                    ),
                ))
            }
            Some(s) => s.get_ref().clone(),
            None => DetectionSettings::default().site,
        };
        let d = DetectionSettings::default();
        let count = |v: &Option<Spanned<u64>>, name: &str, default: usize| {
            in_range(here, v.as_ref(), name, default as u64, 1..=10_000_000)
        };
        let max_users = count(&self.max_users, "max_users", d.max_users)? as usize;
        let max_sources = count(&self.max_sources, "max_sources", d.max_sources)? as usize;
        let max_tokens = count(&self.max_tokens, "max_tokens", d.max_tokens)? as usize;
        let quiet_secs = in_range(
            here,
            self.quiet_secs.as_ref(),
            "quiet_secs",
            d.quiet_secs.into(),
            0..=7 * 86_400,
        )? as u32;
        let block_groups = known_groups(here, &self.block_groups, groups, "block_groups")?;
        let (mut hours, mut days) = (d.hours, d.days);
        let mut rules = Vec::new();
        for kind in DetectionKind::ALL {
            let raw = self.take(kind);
            let rule = validate_rule(here, kind, raw.as_ref(), groups)?;
            if let (Some(r), Keys::Hours) = (&raw, keys(kind)) {
                let r = r.get_ref();
                if let Some(h) = &r.hours {
                    hours = parse_hours(h.get_ref()).map_err(|m| here.at(h, m))?;
                }
                if !r.days.is_empty() {
                    days = 0;
                    for d in &r.days {
                        days |= parse_day(d.get_ref()).map_err(|m| here.at(d, m))?;
                    }
                }
            }
            rules.push(rule);
        }
        Ok(DetectionSettings {
            enabled: self.enabled.unwrap_or(true),
            site,
            utc_offset_minutes: offset,
            max_users,
            max_sources,
            max_tokens,
            quiet_secs,
            block_groups,
            hours,
            days,
            rules,
        })
    }

    fn take(&mut self, kind: DetectionKind) -> Option<Spanned<RawDetection>> {
        match kind {
            DetectionKind::TwoPlaces => self.two_places.take(),
            DetectionKind::OffHours => self.off_hours.take(),
            DetectionKind::FailureBurstUser => self.failure_burst_user.take(),
            DetectionKind::FailureBurstSource => self.failure_burst_source.take(),
            DetectionKind::FirstSeenSource => self.first_seen_source.take(),
            DetectionKind::TokenReuse => self.token_reuse.take(),
            DetectionKind::ItemsRead => self.items_read.take(),
            DetectionKind::FindItemPaging => self.finditem_paging.take(),
            DetectionKind::ExportOrImpersonation => self.export_or_impersonation.take(),
            DetectionKind::PasswordSpray => self.password_spray.take(),
        }
    }
}

fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn known_groups(
    here: &Locator,
    list: &[Spanned<String>],
    groups: &[&str],
    key: &str,
) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for g in list {
        if !groups.contains(&g.get_ref().as_str()) {
            return Err(here.at(g, format!("{key}: no source group named '{}'", g.get_ref())));
        }
        out.push(g.get_ref().clone());
    }
    Ok(out)
}

fn validate_rule(
    here: &Locator,
    kind: DetectionKind,
    raw: Option<&Spanned<RawDetection>>,
    groups: &[&str],
) -> Result<DetectionRule, ConfigError> {
    let (threshold, window) = kind.defaults();
    let Some(spanned) = raw else {
        return Ok(DetectionRule::default_for(kind));
    };
    let r = spanned.get_ref();
    let key = kind.config_key();
    let refuse = |what: &str| here.at(spanned, format!("[detections.{key}] has no {what} setting"));
    let keys = keys(kind);
    if r.threshold.is_some() && keys != Keys::Counted {
        return Err(refuse("threshold"));
    }
    if r.window_secs.is_some() && !matches!(keys, Keys::Counted | Keys::Window) {
        return Err(refuse("window_secs"));
    }
    if (r.hours.is_some() || !r.days.is_empty()) && keys != Keys::Hours {
        return Err(refuse("hours or days"));
    }
    let threshold = in_range(
        here,
        r.threshold.as_ref(),
        "threshold",
        threshold.into(),
        1..=kind.max_threshold().into(),
    )? as u32;
    let window_secs = in_range(
        here,
        r.window_secs.as_ref(),
        "window_secs",
        window.into(),
        1..=7 * 86_400,
    )? as u32;
    let secs = in_range(
        here,
        r.action_secs.as_ref(),
        "action_secs",
        900,
        1..=7 * 86_400,
    )? as u32;
    let action = match r.action.as_ref().map(|a| (a, a.get_ref().as_str())) {
        None | Some((_, "alert")) => ActionSpec::Alert,
        Some((a, "refuse-identity")) => {
            if kind.subject() == SubjectKind::Source {
                return Err(here.at(a,
                    format!("{key}: refuse-identity needs an identity, and this detection's subject is a source address; use alert or block-source"),
                ));
            }
            ActionSpec::RefuseIdentity { secs }
        }
        Some((_, "block-source")) => ActionSpec::BlockSource { secs },
        Some((a, other)) => {
            return Err(here.at(
                a,
                format!("action '{other}': expected alert, refuse-identity or block-source"),
            ))
        }
    };
    if r.action_secs.is_some() && action == ActionSpec::Alert {
        return Err(refuse("action_secs with action alert (it lasts no time)"));
    }
    Ok(DetectionRule {
        kind,
        enabled: r.enabled.unwrap_or(true),
        threshold,
        window_secs,
        action,
        ignore_groups: known_groups(here, &r.ignore_groups, groups, "ignore_groups")?,
    })
}

impl RawAudit {
    pub(crate) fn validate(
        self,
        here: &Locator,
        base: &std::path::Path,
        legacy: Option<PathBuf>,
    ) -> Result<AuditSettings, ConfigError> {
        if legacy.is_some() && !self.sinks.is_empty() {
            return Err(here.at(
                &self.sinks[0],
                "both proxy.audit_log and [audit] sinks are set: move audit_log into sinks as { type = \"file\", path = \"...\" }",
            ));
        }
        let buffer_bytes = in_range(
            here,
            self.buffer_bytes.as_ref(),
            "buffer_bytes",
            16 << 20,
            64 << 10..=1 << 30,
        )? as usize;
        if self.sinks.is_empty() {
            return Ok(AuditSettings {
                buffer_bytes,
                ..AuditSettings::legacy(legacy)
            });
        }
        let mut sinks = Vec::new();
        for s in &self.sinks {
            let spec = validate_sink(here, base, s)?;
            if sinks.contains(&spec) {
                return Err(here.at(s, "this sink is listed twice"));
            }
            let local = |s: &SinkSpec| matches!(s, SinkSpec::File { .. } | SinkSpec::Stdout);
            if local(&spec) && sinks.iter().any(local) {
                return Err(here.at(
                    s,
                    "one file or stdout sink at most: the agent opens the audit file and hands it to the unprivileged proxy",
                ));
            }
            sinks.push(spec);
        }
        Ok(AuditSettings {
            sinks,
            buffer_bytes,
        })
    }
}

/// Syslog facilities by name (RFC 5424 section 6.2.1).
const FACILITIES: [(&str, u8); 12] = [
    ("user", 1),
    ("daemon", 3),
    ("auth", 4),
    ("authpriv", 10),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

fn validate_sink(
    here: &Locator,
    base: &std::path::Path,
    s: &Spanned<RawSink>,
) -> Result<SinkSpec, ConfigError> {
    let r = s.get_ref();
    let kind = r.kind.get_ref().as_str();
    let stray = |key: &str| here.at(s, format!("a {kind} sink has no '{key}'"));
    let syslog_keys = [
        ("transport", r.transport.is_some()),
        ("address", r.address.is_some()),
        ("facility", r.facility.is_some()),
        ("hostname", r.hostname.is_some()),
    ];
    let check_keys = |allowed: &[&str]| -> Result<(), ConfigError> {
        let mut present = vec![("path", r.path.is_some()), ("socket", r.socket.is_some())];
        present.extend(syslog_keys);
        match present.iter().find(|(k, set)| *set && !allowed.contains(k)) {
            Some((k, _)) => Err(stray(k)),
            None => Ok(()),
        }
    };
    match kind {
        "file" => {
            check_keys(&["path"])?;
            let path = r
                .path
                .as_ref()
                .ok_or_else(|| here.at(s, "a file sink needs a path"))?;
            Ok(SinkSpec::File {
                path: base.join(path),
            })
        }
        "stdout" => {
            check_keys(&[])?;
            Ok(SinkSpec::Stdout)
        }
        "journald" => {
            check_keys(&["socket"])?;
            Ok(SinkSpec::Journald {
                socket: r
                    .socket
                    .clone()
                    .unwrap_or_else(|| DEFAULT_JOURNAL_SOCKET.into())
                    .into(),
            })
        }
        "syslog" => {
            check_keys(&["transport", "address", "facility", "hostname"])?;
            let transport = match r.transport.as_ref().map(|t| (t, t.get_ref().as_str())) {
                None | Some((_, "udp")) => Transport::Udp,
                Some((_, "tcp")) => Transport::Tcp,
                Some((t, other)) => {
                    return Err(here.at(t, format!("transport '{other}': expected udp or tcp")))
                }
            };
            let address = r
                .address
                .as_ref()
                .ok_or_else(|| here.at(s, "a syslog sink needs an address (host:port)"))?;
            check_address(address.get_ref()).map_err(|m| here.at(address, m))?;
            let facility = match &r.facility {
                None => 16,
                Some(f) => FACILITIES
                    .iter()
                    .find(|(n, _)| *n == f.get_ref())
                    .map(|(_, v)| *v)
                    .ok_or_else(|| {
                        here.at(
                            f,
                            format!(
                                "facility '{}': expected one of {}",
                                f.get_ref(),
                                FACILITIES.map(|(n, _)| n).join(", ")
                            ),
                        )
                    })?,
            };
            let hostname = match &r.hostname {
                // RFC 5424: 1 to 255 printable US-ASCII characters.
                Some(h)
                    if h.get_ref().is_empty()
                        || h.get_ref().len() > 255
                        || !h.get_ref().bytes().all(|b| (33..=126).contains(&b)) =>
                {
                    return Err(here.at(h, "hostname: 1 to 255 printable ASCII characters"))
                }
                h => h.as_ref().map(|h| h.get_ref().clone()),
            };
            Ok(SinkSpec::Syslog {
                transport,
                address: address.get_ref().clone(),
                facility,
                hostname,
            })
        }
        other => Err(here.at(
            &r.kind,
            format!("sink type '{other}': expected file, stdout, journald or syslog"),
        )),
    }
}

/// `192.0.2.50:514`, `[2001:db8::50]:514` or `siem.example.org:6514`.
fn check_address(text: &str) -> Result<(), String> {
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = || format!("'{text}': expected host:port");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p != 0 && !host.is_empty() && !host.contains(['[', ']', ':', ' ', '/']) => Ok(()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    const GROUPS: &str = "[sources.offices]\ncidrs = [\"198.51.100.0/25\"]\n[sources.salesforce]\ncidrs = [\"198.51.100.128/25\"]\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(
            Path::new("/etc/ewsgate/test.toml"),
            &format!("{GROUPS}{text}"),
        )
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn every_detection_is_on_by_default() {
        let c = parse("").unwrap();
        let d = &c.ops.detections;
        assert!(d.enabled);
        assert_eq!(d.rules.len(), DetectionKind::ALL.len());
        for (i, kind) in DetectionKind::ALL.into_iter().enumerate() {
            assert_eq!(d.rules[i].kind, kind);
            assert!(d.rules[i].enabled, "{kind:?}");
            assert_eq!(d.rules[i].action, ActionSpec::Alert);
        }
        assert_eq!(d.rule(DetectionKind::PasswordSpray).threshold, 10);
        assert_eq!(c.ops.audit.sinks, vec![SinkSpec::Stdout]);
        assert_eq!(d, &DetectionSettings::default());
    }

    #[test]
    fn detection_settings_parse() {
        let c = parse(
            "[detections]\nsite = \"hq\"\nblock_groups = [\"offices\"]\nutc_offset_minutes = 60\n\
             [detections.off_hours]\nhours = \"06:00-22:00\"\ndays = [\"mon-sat\"]\n\
             [detections.password_spray]\nthreshold = 5\nwindow_secs = 120\naction = \"block-source\"\naction_secs = 60\n\
             [detections.two_places]\nignore_groups = [\"salesforce\"]\naction = \"refuse-identity\"\n\
             [detections.items_read]\nenabled = false\n",
        )
        .unwrap();
        let d = &c.ops.detections;
        assert_eq!(d.site, "hq");
        assert_eq!(d.utc_offset_minutes, 60);
        assert_eq!(d.hours, (360, 1320));
        assert_eq!(d.days, 0b0011_1111);
        let spray = d.rule(DetectionKind::PasswordSpray);
        assert_eq!((spray.threshold, spray.window_secs), (5, 120));
        assert_eq!(spray.action, ActionSpec::BlockSource { secs: 60 });
        let two = d.rule(DetectionKind::TwoPlaces);
        assert_eq!(two.ignore_groups, vec!["salesforce".to_string()]);
        assert_eq!(two.action, ActionSpec::RefuseIdentity { secs: 900 });
        assert!(!d.rule(DetectionKind::ItemsRead).enabled);
    }

    #[test]
    fn detection_errors_name_their_line() {
        for (text, line, want) in [
            ("[detections]\nmax_users = 0\n", 6, "max_users = 0"),
            (
                "[detections]\nblock_groups = [\"nowhere\"]\n",
                6,
                "no source group named 'nowhere'",
            ),
            (
                "[detections.two_places]\nthreshold = 3\n",
                5,
                "has no threshold",
            ),
            (
                "[detections.export_or_impersonation]\nwindow_secs = 3\n",
                5,
                "has no window_secs",
            ),
            (
                "[detections.items_read]\nhours = \"07:00-19:00\"\n",
                5,
                "has no hours",
            ),
            (
                "[detections.off_hours]\nhours = \"7-19\"\n",
                6,
                "hours are HH:MM-HH:MM",
            ),
            (
                "[detections.password_spray]\naction = \"refuse-identity\"\n",
                6,
                "subject is a source",
            ),
            (
                "[detections.token_reuse]\naction = \"ban\"\n",
                6,
                "action 'ban'",
            ),
            (
                "[detections.token_reuse]\nthreshold = 1000\n",
                6,
                "must be 1..=256",
            ),
            (
                "[detections.items_read]\naction_secs = 10\n",
                5,
                "action_secs with action alert",
            ),
            ("[detections.items_read]\ntreshold = 10\n", 6, "treshold"),
        ] {
            let e = error_of(text);
            assert!(
                e.contains(&format!("test.toml:{line}:")) && e.contains(want),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn audit_sinks_parse_in_both_spellings() {
        let inline = parse(
            "[audit]\nbuffer_bytes = 1048576\nsinks = [\n  { type = \"file\", path = \"audit.jsonl\" },\n  { type = \"journald\" },\n  { type = \"syslog\", transport = \"tcp\", address = \"192.0.2.50:6514\", facility = \"authpriv\" },\n  { type = \"syslog\", address = \"siem.example.org:514\", hostname = \"gate-1\" },\n]\n",
        )
        .unwrap();
        let a = &inline.ops.audit;
        assert_eq!(a.buffer_bytes, 1 << 20);
        assert_eq!(
            a.sinks,
            vec![
                SinkSpec::File {
                    path: "/etc/ewsgate/audit.jsonl".into()
                },
                SinkSpec::Journald {
                    socket: DEFAULT_JOURNAL_SOCKET.into()
                },
                SinkSpec::Syslog {
                    transport: Transport::Tcp,
                    address: "192.0.2.50:6514".into(),
                    facility: 10,
                    hostname: None
                },
                SinkSpec::Syslog {
                    transport: Transport::Udp,
                    address: "siem.example.org:514".into(),
                    facility: 16,
                    hostname: Some("gate-1".into())
                },
            ]
        );
        let tables = parse(
            "[[audit.sinks]]\ntype = \"file\"\npath = \"audit.jsonl\"\n[[audit.sinks]]\ntype = \"journald\"\n",
        )
        .unwrap();
        assert_eq!(tables.ops.audit.sinks[..], a.sinks[..2]);
    }

    #[test]
    fn audit_errors_name_their_line() {
        for (text, line, want) in [
            ("[audit]\nsinks = [{ type = \"kafka\" }]\n", 6, "sink type 'kafka'"),
            ("[audit]\nsinks = [{ type = \"file\" }]\n", 6, "needs a path"),
            ("[audit]\nsinks = [{ type = \"journald\", path = \"x\" }]\n", 6, "has no 'path'"),
            ("[audit]\nsinks = [{ type = \"syslog\", address = \"siem\" }]\n", 6, "expected host:port"),
            ("[audit]\nsinks = [{ type = \"syslog\", address = \"192.0.2.5:514\", transport = \"tls\" }]\n", 6, "transport 'tls'"),
            ("[audit]\nsinks = [{ type = \"syslog\", address = \"192.0.2.5:514\", facility = \"kern\" }]\n", 6, "facility 'kern'"),
            ("[audit]\nsinks = [{ type = \"stdout\" }, { type = \"stdout\" }]\n", 6, "listed twice"),
            ("[audit]\nbuffer_bytes = 10\n", 6, "buffer_bytes = 10"),
        ] {
            let e = error_of(text);
            assert!(e.contains(&format!("test.toml:{line}:")) && e.contains(want), "{text}: {e}");
        }
    }
}
