//! The audit log: one JSON line per decision. A line is written when the exchange ends, so
//! it carries the bytes moved, Exchange's status and the duration. Tokens, passwords and
//! NTLM blobs are never part of a record: the record has no field that could hold them.

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    net::IpAddr,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

/// Bytes buffered before lines are counted as lost (the writer is far behind).
const MAX_BUFFERED: usize = 64 << 20;
/// How often the writer thread empties the buffer. Lines reach the file within this.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

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

/// Request threads append serialized lines to a buffer; one writer thread empties it on a
/// timer. A line costs a serialization and an uncontended lock, never a wake-up or a write.
#[derive(Clone)]
pub struct Audit {
    shared: Arc<Buffer>,
}

struct Buffer {
    lines: Mutex<Vec<u8>>,
    lost: AtomicU64,
    out: Mutex<BufWriter<Box<dyn Write + Send>>>,
}

impl Buffer {
    /// Writes out what is buffered.
    fn flush(&self) {
        let pending = match self.lines.lock() {
            Ok(mut l) => std::mem::take(&mut *l),
            Err(_) => return,
        };
        if let Ok(mut out) = self.out.lock() {
            let result = out.write_all(&pending).and_then(|()| out.flush());
            if let Err(e) = result {
                tracing::error!(error = %e, "writing the audit log");
            }
        }
    }
}

impl Audit {
    /// Appends to `path`, or writes to standard output when `None`.
    pub fn open(path: Option<&Path>) -> io::Result<Audit> {
        let out: Box<dyn Write + Send> = match path {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                Box::new(OpenOptions::new().create(true).append(true).open(p)?)
            }
            None => Box::new(io::stdout()),
        };
        let shared = Arc::new(Buffer {
            lines: Mutex::new(Vec::new()),
            lost: AtomicU64::new(0),
            out: Mutex::new(BufWriter::new(out)),
        });
        let writer = Arc::downgrade(&shared);
        thread::Builder::new()
            .name("ewsgate-audit".into())
            .spawn(move || loop {
                thread::sleep(FLUSH_EVERY);
                match writer.upgrade() {
                    Some(b) => b.flush(),
                    None => return,
                }
            })?;
        Ok(Audit { shared })
    }

    pub fn log(&self, mut record: Record) {
        record.time = rfc3339_now();
        let Ok(mut line) = serde_json::to_vec(&record) else {
            return;
        };
        line.push(b'\n');
        let kept = match self.shared.lines.lock() {
            Ok(mut buf) if buf.len() + line.len() <= MAX_BUFFERED => {
                buf.extend_from_slice(&line);
                true
            }
            _ => false,
        };
        if !kept
            && self
                .shared
                .lost
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(10_000)
        {
            tracing::error!("audit writer behind: lines lost");
        }
    }

    /// Writes out buffered lines now (at shutdown).
    pub fn flush(&self) {
        self.shared.flush();
    }
}

/// UTC time with milliseconds, e.g. 2026-11-23T12:00:00.123Z.
pub fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_millis())
}

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
    fn lines_reach_the_file() {
        let path = std::env::temp_dir().join(format!("ewsgate-audit-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let audit = Audit::open(Some(&path)).unwrap();
        audit.log(Record {
            decision: "deny",
            reason: "no_rule".into(),
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
        let _ = std::fs::remove_file(&path);
    }
}
