//! The audit log: one JSON line per decision. A line is written when the exchange ends, so
//! it carries the bytes moved, Exchange's status and the duration. Tokens, passwords and
//! NTLM blobs are never part of a record: the record has no field that could hold them.

use std::{
    io,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use super::{
    detections::{Decision, Engine, Failure, Observation},
    sinks::{Lag, Sinks},
};
use crate::model::{
    ews::operation,
    ops::{AuditSettings, DetectionSettings},
};

#[derive(Debug, Clone, Serialize, Default)]
pub struct Record {
    pub time: String,
    pub source: Option<IpAddr>,
    pub source_port: u16,
    pub source_group: Option<String>,
    pub user: Option<String>,
    pub auth: &'static str,
    pub token_family: Option<&'static str>,
    pub token_item: Option<String>,
    pub method: String,
    pub path: String,
    pub operation: Option<String>,
    /// The data types an EWS request touches, or "unresolved".
    pub data: Option<String>,
    /// The mailbox an EWS request acts on.
    pub mailbox: Option<String>,
    /// Item and attachment IDs the request names.
    pub items: Option<usize>,
    /// Response messages replaced by an access-denied error.
    pub withheld: Option<usize>,
    pub rule: Option<String>,
    pub decision: &'static str,
    pub reason: String,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub user_agent: Option<String>,
    pub connection: u64,
}

/// The audit log: each record goes to every configured sink (`ops::sinks`), and through the
/// detection engine, whose detections are audited in turn. Cheap to clone.
///
/// Until the request path hands the engine its own `Observation`s (with the failure class
/// it knows), `observation_of` derives one from the record.
#[derive(Clone)]
pub struct Audit {
    shared: Arc<Shared>,
}

struct Shared {
    sinks: Sinks,
    detections: Mutex<Engine>,
    lost: AtomicU64,
}

impl Audit {
    pub fn open(settings: &AuditSettings, detections: &DetectionSettings) -> io::Result<Audit> {
        Ok(Audit {
            shared: Arc::new(Shared {
                sinks: Sinks::open(settings)?,
                detections: Mutex::new(Engine::new(detections.clone())),
                lost: AtomicU64::new(0),
            }),
        })
    }

    pub fn log(&self, mut record: Record) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        record.time = rfc3339(now.as_secs() as i64, now.subsec_millis());
        self.write(&record);
        let fired = match self.shared.detections.lock() {
            Ok(mut engine) => engine.observe(&observation_of(&record, now.as_millis() as u64)),
            Err(_) => Vec::new(),
        };
        for d in fired {
            tracing::warn!(detection = d.name(), subject = %d.subject, action = d.action.name(), "detection fired");
            self.write(&d.event());
        }
    }

    fn write<T: Serialize>(&self, record: &T) {
        if let Err(refused) = self.shared.sinks.write(record) {
            let n = self.shared.lost.fetch_add(1, Ordering::Relaxed);
            if n.is_multiple_of(10_000) {
                tracing::error!(%refused, lost = n + 1, "audit lines refused by full sinks");
            }
        }
    }

    /// Writes out queued lines now (at shutdown), waiting at most a few seconds.
    pub fn flush(&self) {
        self.shared.sinks.flush(Duration::from_secs(5));
    }

    /// Reopens file sinks (SIGHUP after a log rotation).
    pub fn reopen(&self) {
        self.shared.sinks.reopen();
    }

    /// How far behind the slowest sink is.
    pub fn lag(&self) -> Lag {
        self.shared.sinks.lag()
    }

    /// New detection settings on a reload: the engine starts afresh if they changed.
    pub fn set_detections(&self, settings: &DetectionSettings) {
        if let Ok(mut engine) = self.shared.detections.lock() {
            if engine.settings() != settings {
                *engine = Engine::new(settings.clone());
            }
        }
    }
}

/// The detections' view of a record. The failure class is read from the status the client
/// got: 401 a refused credential, 400/408/413/431 and refused connections (no status) the
/// protocol, anything else refused the policy.
fn observation_of(r: &Record, time_ms: u64) -> Observation<'_> {
    let decision = match r.decision {
        "allow" => Decision::Allow,
        "would-deny" => Decision::WouldDeny,
        _ => Decision::Deny,
    };
    let failure = (decision == Decision::Deny).then_some(match r.status {
        401 => Failure::Credential,
        0 | 400 | 408 | 413 | 431 => Failure::Protocol,
        _ => Failure::Policy,
    });
    let op = r.operation.as_deref();
    Observation {
        group: r.source_group.as_deref(),
        user: r.user.as_deref(),
        auth: r.auth,
        token_item: r.token_item.as_deref(),
        operation: op,
        op_class: op.and_then(operation).map(|o| o.class),
        items: r.items.unwrap_or(0).min(u32::MAX as usize) as u32,
        failure,
        reason: &r.reason,
        mailbox: r.mailbox.as_deref(),
        // The record has no impersonation field yet; a refused attempt says so in its reason.
        impersonation: r.reason.starts_with("impersonation "),
        ..Observation::new(
            time_ms,
            r.source
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            decision,
        )
    }
}

/// UTC time with milliseconds, e.g. 2026-11-23T12:00:00.123Z.
pub fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_435_200, 5), "2026-11-23T12:00:00.005Z");
        assert_eq!(rfc3339(951_782_400, 0), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn lines_and_detections_reach_the_file() {
        let path = std::env::temp_dir().join(format!("ewsgate-audit-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let audit = Audit::open(
            &AuditSettings::legacy(Some(path.clone())),
            &DetectionSettings::default(),
        )
        .unwrap();
        audit.log(Record {
            decision: "deny",
            reason: "no_rule".into(),
            ..Default::default()
        });
        audit.log(Record {
            source: Some("198.51.100.10".parse().unwrap()),
            user: Some("alice@example.org".into()),
            operation: Some("ExportItems".into()),
            decision: "deny",
            status: 500,
            reason: "ExportItems is not allowed".into(),
            ..Default::default()
        });
        audit.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["decision"], "deny");
        assert_eq!(lines[0]["reason"], "no_rule");
        assert_eq!(lines[2]["kind"], "detection");
        assert_eq!(lines[2]["detection"], "export-or-impersonation");
        assert_eq!(lines[2]["evidence"]["decision"], "deny");
        let _ = std::fs::remove_file(&path);
    }
}
