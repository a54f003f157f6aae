//! The audit log: one JSON line per decision. A line is written when the exchange ends, so
//! it carries the bytes moved, Exchange's status and the duration. Tokens, passwords and
//! NTLM blobs are never part of a record: the record has no field that could hold them.
//!
//! No line is ever dropped. Request threads serialise records straight into a shared
//! buffer; one writer thread empties it. When the writer falls behind (a stalled disk or
//! pipe), the buffer's backlog grows and the proxy refuses new requests with 503 until it
//! drains, rather than deciding without a record.

use std::{
    fs::File,
    io::{self, Write},
    net::IpAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Serialize, Serializer};

/// How often the writer wakes when nobody signals it. Lines reach the file within this.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// One decision, borrowed from whatever made it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record<'a> {
    pub time: Time,
    /// `request`, or `connection` for refusals before any request.
    pub kind: &'static str,
    pub source: Option<IpAddr>,
    pub source_port: u16,
    pub source_group: Option<&'a str>,
    pub user: Option<&'a str>,
    pub auth: &'a str,
    pub token_family: Option<&'static str>,
    pub token_item: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub operation: Option<&'a str>,
    /// The data types an EWS request touches, or "unresolved".
    pub data: Option<&'a str>,
    /// The mailbox an EWS request acts on.
    pub mailbox: Option<&'a str>,
    /// Item and attachment IDs the request names.
    pub items: Option<usize>,
    /// Response messages replaced by an access-denied error.
    pub withheld: Option<usize>,
    pub rule: Option<&'a str>,
    /// `allow`, `deny`, or `would-deny` (a report-only rule would have refused).
    pub decision: &'a str,
    pub reason: &'a str,
    /// `protocol`, `credential` or `policy`: which kind of failure a refusal is.
    pub failure: Option<&'static str>,
    /// What the report-only rules said, when it differs from what was enforced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<Shadow<'a>>,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub upstream_ms: Option<f64>,
    pub user_agent: Option<&'a str>,
    pub connection: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Shadow<'a> {
    pub decision: &'a str,
    pub rule: Option<&'a str>,
    pub reason: &'a str,
}

/// The time a record is written, as RFC 3339 UTC with milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Time;

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let text = rfc3339(d.as_secs() as i64, d.subsec_millis());
        s.serialize_str(text.as_str())
    }
}

struct Buffer {
    lines: Mutex<Vec<u8>>,
    /// Bytes waiting for the writer.
    backlog: AtomicUsize,
    wake: Condvar,
    out: Mutex<Box<dyn Write + Send>>,
}

/// The audit log's writing end; clones share one buffer and one writer.
#[derive(Clone)]
pub struct Audit {
    shared: Arc<Buffer>,
}

impl Audit {
    /// Appends to an open file (the agent opens it and hands it over), or writes to
    /// standard output when `None`.
    pub fn new(file: Option<File>) -> io::Result<Audit> {
        let out: Box<dyn Write + Send> = match file {
            Some(f) => Box::new(f),
            None => Box::new(io::stdout()),
        };
        let shared = Arc::new(Buffer {
            lines: Mutex::new(Vec::new()),
            backlog: AtomicUsize::new(0),
            wake: Condvar::new(),
            out: Mutex::new(out),
        });
        let writer = Arc::downgrade(&shared);
        thread::Builder::new()
            .name("ewsgate-audit".into())
            .spawn(move || loop {
                let Some(b) = writer.upgrade() else { return };
                b.wait_for_lines();
                b.flush();
            })?;
        Ok(Audit { shared })
    }

    /// Serialises a record (or any audit event, such as a detection) into the buffer.
    /// Never drops it.
    pub fn log<T: Serialize + ?Sized>(&self, record: &T) {
        let Ok(mut buf) = self.shared.lines.lock() else {
            return;
        };
        let before = buf.len();
        if serde_json::to_writer(&mut *buf, record).is_err() {
            buf.truncate(before);
            return;
        }
        buf.push(b'\n');
        let added = buf.len() - before;
        self.shared.backlog.fetch_add(added, Ordering::Relaxed);
    }

    /// Bytes serialised but not yet written.
    pub fn backlog(&self) -> usize {
        self.shared.backlog.load(Ordering::Relaxed)
    }

    /// Replaces the file lines go to (after log rotation); what is buffered goes to the
    /// new one.
    pub fn reopen(&self, file: File) {
        if let Ok(mut out) = self.shared.out.lock() {
            let _ = out.flush();
            *out = Box::new(file);
        }
    }

    /// Writes out buffered lines now (at shutdown).
    pub fn flush(&self) {
        self.shared.flush();
    }
}

impl Buffer {
    fn wait_for_lines(&self) {
        if let Ok(lines) = self.lines.lock() {
            if lines.is_empty() {
                let _ = self.wake.wait_timeout(lines, FLUSH_EVERY);
            }
        }
    }

    /// Writes out what is buffered. The backlog falls only once the bytes are written, so
    /// a stalled writer shows as a growing backlog.
    fn flush(&self) {
        let pending = match self.lines.lock() {
            Ok(mut l) if !l.is_empty() => std::mem::take(&mut *l),
            _ => return,
        };
        let Ok(mut out) = self.out.lock() else {
            return;
        };
        let mut rest: &[u8] = &pending;
        while !rest.is_empty() {
            match out.write(rest) {
                Ok(0) => thread::sleep(FLUSH_EVERY),
                Ok(n) => {
                    rest = &rest[n..];
                    self.backlog.fetch_sub(n, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Keep the bytes: they are written when the sink recovers.
                    tracing::error!(error = %e, "writing the audit log");
                    thread::sleep(FLUSH_EVERY);
                }
            }
        }
        let _ = out.flush();
    }
}

/// Text of a fixed-size timestamp, with no allocation.
pub struct Stamp {
    bytes: [u8; 24],
}

impl Stamp {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes).unwrap_or("")
    }
}

/// UTC time with milliseconds, e.g. 2026-11-23T12:00:00.123Z.
pub fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_millis())
        .as_str()
        .to_string()
}

pub fn rfc3339(secs: i64, millis: u32) -> Stamp {
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
    let year = (yoe + era * 400 + i64::from(month <= 2)).clamp(0, 9999);
    let mut bytes = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut n: i64| {
        for i in (0..width).rev() {
            bytes[at + i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, rem / 3600);
    put(14, 2, rem % 3600 / 60);
    put(17, 2, rem % 60);
    put(20, 3, i64::from(millis));
    Stamp { bytes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0, 0).as_str(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_795_435_200, 5).as_str(),
            "2026-11-23T12:00:00.005Z"
        );
        assert_eq!(rfc3339(951_782_400, 0).as_str(), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn lines_reach_the_file() {
        let path = std::env::temp_dir().join(format!("ewsgate-audit-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let audit = Audit::new(Some(file)).unwrap();
        audit.log(&Record {
            kind: "request",
            decision: "deny",
            reason: "no_rule",
            ..Default::default()
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut text = String::new();
        while text.is_empty() && std::time::Instant::now() < deadline {
            thread::sleep(std::time::Duration::from_millis(10));
            text = std::fs::read_to_string(&path).unwrap_or_default();
        }
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["decision"], "deny");
        assert_eq!(v["reason"], "no_rule");
        assert_eq!(v["time"].as_str().unwrap().len(), 24);
        assert_eq!(audit.backlog(), 0);
        let _ = std::fs::remove_file(&path);
    }
}
