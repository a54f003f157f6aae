//! The audit log: one JSON line per decision. A line is written when the exchange ends, so
//! it carries the bytes moved, Exchange's status and the duration. Tokens, passwords and
//! NTLM blobs are never part of a record: the record has no field that could hold them.
//!
//! No line is ever dropped. Request threads serialise records straight into a shared
//! buffer; one writer thread empties it. When the writer falls behind (a stalled disk or
//! pipe), the buffer's backlog grows and the proxy refuses new requests with 503 until it
//! drains, rather than deciding without a record.

use std::{
    cell::Cell,
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

/// How long the writer gathers lines after the first one of a batch: lines reach the file
/// within this. Short, because the write stops the proxy's thread when both share a CPU:
/// batches of 50 ms under load were over a megabyte, 0.3 ms to write twenty times a second,
/// long enough to show in the requests' 99th percentile.
const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// How long a writer whose sink refuses waits before it tries again.
const RETRY_EVERY: Duration = Duration::from_millis(50);
/// How long an idle writer sleeps if no line wakes it.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// The largest written-out buffer kept for reuse; a bigger one (after a stall) is freed.
const SPARE_MAX: usize = 1 << 20;

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

/// A member's name with what goes before and after it (`,"name":`), as one constant: a
/// line has some twenty members, and copying each name as one fixed-size slice costs a
/// few moves where pushing separator, quotes and name one by one cost a call each.
macro_rules! key {
    (first $name:literal) => {
        concat!("\"", $name, "\":").as_bytes()
    };
    ($name:literal) => {
        concat!(",\"", $name, "\":").as_bytes()
    };
}

impl Record<'_> {
    /// The record as one JSON object, fields in declaration order, as serde writes it.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut w = JsonObject::new(out);
        w.stamp(key!(first "time"), &stamp(self.time.since_epoch()));
        w.str(key!("kind"), Some(self.kind));
        match self.source {
            Some(ip) => w.ip(key!("source"), ip),
            None => w.null(key!("source")),
        }
        w.num(key!("source_port"), Some(u64::from(self.source_port)));
        w.str(key!("source_group"), self.source_group);
        w.str(key!("user"), self.user);
        w.str(key!("auth"), Some(self.auth));
        w.str(key!("token_family"), self.token_family);
        w.str(key!("token_item"), self.token_item);
        w.str(key!("method"), Some(self.method));
        w.str(key!("path"), Some(self.path));
        w.str(key!("operation"), self.operation);
        w.str(key!("data"), self.data);
        w.str(key!("mailbox"), self.mailbox);
        w.num(key!("items"), self.items.map(|n| n as u64));
        w.num(key!("withheld"), self.withheld.map(|n| n as u64));
        w.str(key!("rule"), self.rule);
        w.str(key!("decision"), Some(self.decision));
        w.str(key!("reason"), Some(self.reason));
        w.str(key!("failure"), self.failure);
        if let Some(r) = &self.report {
            w.raw(key!("report"));
            let mut inner = JsonObject::new(w.out);
            inner.str(key!(first "decision"), Some(r.decision));
            inner.str(key!("rule"), r.rule);
            inner.str(key!("reason"), Some(r.reason));
            inner.end();
        }
        w.num(key!("status"), Some(u64::from(self.status)));
        w.num(key!("upstream_status"), self.upstream_status.map(u64::from));
        w.num(key!("bytes_in"), Some(self.bytes_in));
        w.num(key!("bytes_out"), Some(self.bytes_out));
        w.float(key!("duration_ms"), Some(self.duration_ms));
        w.float(key!("upstream_ms"), self.upstream_ms);
        w.str(key!("user_agent"), self.user_agent);
        w.num(key!("connection"), Some(self.connection));
        w.end();
    }
}

/// Writes one JSON object's members into a buffer. Each member is given its key as
/// written by `key!`, separator included; the first one by `key!(first ...)`.
struct JsonObject<'o> {
    out: &'o mut Vec<u8>,
}

impl<'o> JsonObject<'o> {
    fn new(out: &'o mut Vec<u8>) -> JsonObject<'o> {
        out.push(b'{');
        JsonObject { out }
    }

    /// Inlined so that each key, a constant at its call, is copied at a known length.
    #[inline(always)]
    fn raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    #[inline(always)]
    fn null(&mut self, key: &[u8]) {
        self.raw(key);
        self.raw(b"null");
    }

    #[inline(always)]
    fn str(&mut self, key: &[u8], value: Option<&str>) {
        self.raw(key);
        match value {
            Some(v) => escape_into(self.out, v),
            None => self.raw(b"null"),
        }
    }

    #[inline(always)]
    fn num(&mut self, key: &[u8], value: Option<u64>) {
        self.raw(key);
        match value {
            Some(n) => decimal(self.out, n),
            None => self.raw(b"null"),
        }
    }

    /// The time as a string: its characters need no escaping.
    #[inline(always)]
    fn stamp(&mut self, key: &[u8], stamp: &Stamp) {
        self.raw(key);
        self.out.push(b'"');
        self.raw(&stamp.bytes);
        self.out.push(b'"');
    }

    /// An IPv4 address written by hand (formatting one costs as much as the rest of
    /// the line); IPv6, rarer, as `Display` writes it.
    fn ip(&mut self, key: &[u8], ip: IpAddr) {
        self.raw(key);
        self.out.push(b'"');
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                decimal(self.out, u64::from(a));
                for octet in [b, c, d] {
                    self.out.push(b'.');
                    decimal(self.out, u64::from(octet));
                }
            }
            IpAddr::V6(v6) => {
                let _ = write!(self.out, "{v6}");
            }
        }
        self.out.push(b'"');
    }

    /// Milliseconds to the microsecond (three decimals), written without float formatting.
    fn float(&mut self, key: &[u8], value: Option<f64>) {
        match value {
            Some(f) if f.is_finite() && (0.0..1e12).contains(&f) => {
                let micros = (f * 1000.0).round() as u64;
                self.num(key, Some(micros / 1000));
                let frac = (micros % 1000) as usize;
                self.out.push(b'.');
                self.out.push(b'0' + (frac / 100) as u8);
                self.raw(&PAIRS[frac % 100]);
            }
            _ => self.null(key),
        }
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// The two digits of every number below 100, for writing numbers two digits at a time.
const PAIRS: [[u8; 2]; 100] = {
    let mut pairs = [[0; 2]; 100];
    let mut i = 0;
    while i < 100 {
        pairs[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    pairs
};

/// A number in decimal. Most numbers of a line are short (ports, statuses, octets), and
/// those are written without a loop.
fn decimal(out: &mut Vec<u8>, n: u64) {
    if n < 10 {
        out.push(b'0' + n as u8);
    } else if n < 100 {
        out.extend_from_slice(&PAIRS[n as usize]);
    } else {
        long_decimal(out, n);
    }
}

fn long_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    while n >= 100 {
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[(n % 100) as usize]);
        n /= 100;
    }
    if n >= 10 {
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[n as usize]);
    } else {
        i -= 1;
        digits[i] = b'0' + n as u8;
    }
    out.extend_from_slice(&digits[i..]);
}

const ONES: u64 = u64::from_ne_bytes([1; 8]);
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);

/// Whether any of a word's eight bytes is below `n` (at most 128). Exact, not a
/// heuristic: a borrow reaches a byte's high bit only from a byte that is below `n`.
const fn any_below(w: u64, n: u8) -> bool {
    w.wrapping_sub(ONES * n as u64) & !w & HIGHS != 0
}

/// Whether any of a word's eight bytes is `b`.
const fn any_is(w: u64, b: u8) -> bool {
    any_below(w ^ (ONES * b as u64), 1)
}

/// Whether none of a word's eight bytes needs escaping.
const fn plain_word(w: u64) -> bool {
    !(any_below(w, 0x20) || any_is(w, b'"') || any_is(w, b'\\'))
}

const fn plain_byte(b: u8) -> bool {
    !(b < 0x20 || b == b'"' || b == b'\\')
}

/// Four to eight bytes as one word: the first four and the last four, which overlap
/// when there are fewer than eight. Whether a byte needs escaping does not depend on
/// where it sits in the word.
fn short_word(bytes: &[u8]) -> Option<u64> {
    let first = u32::from_ne_bytes(*bytes.first_chunk::<4>()?);
    let last = u32::from_ne_bytes(*bytes.last_chunk::<4>()?);
    Some(u64::from(first) | u64::from(last) << 32)
}

/// Whether a value needs no escaping: no control character, quote or backslash. Eight
/// bytes at a time; the bytes after the last whole word are read again as the last eight
/// bytes (overlapping the word before), so that no value ends in a byte-by-byte loop.
fn plain(bytes: &[u8]) -> bool {
    let (words, rest) = bytes.as_chunks::<8>();
    if !words.iter().all(|w| plain_word(u64::from_ne_bytes(*w))) {
        return false;
    }
    match bytes.last_chunk::<8>() {
        Some(last) if !rest.is_empty() => plain_word(u64::from_ne_bytes(*last)),
        Some(_) => true,
        None => match short_word(bytes) {
            Some(w) => plain_word(w),
            None => bytes.iter().all(|&b| plain_byte(b)),
        },
    }
}

/// A JSON string, escaped as serde_json escapes it: quotes, backslashes and control
/// characters; everything else (UTF-8 included) as it is.
fn escape_into(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Most values need no escaping at all: one scan, one copy.
    if plain(bytes) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    escape_slowly(out, bytes);
    out.push(b'"');
}

/// Copies runs of plain bytes whole and escapes the bytes between them.
fn escape_slowly(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if short.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 15)]);
        } else {
            out.extend_from_slice(short);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

fn stamp(d: Duration) -> Stamp {
    same_second_stamp(d.as_secs() as i64, d.subsec_millis())
}

thread_local! {
    /// The second last stamped on this thread and its stamp: requests within one second
    /// differ only in their milliseconds, so the calendar is worked out once a second.
    static LAST_SECOND: Cell<(i64, [u8; 24])> = const { Cell::new((i64::MIN, [0; 24])) };
}

/// `rfc3339`, with the date and time of day reused from the last call in the same second.
fn same_second_stamp(secs: i64, millis: u32) -> Stamp {
    let (last, bytes) = LAST_SECOND.get();
    if last != secs {
        let stamp = rfc3339(secs, millis);
        LAST_SECOND.set((secs, stamp.bytes));
        return stamp;
    }
    let mut bytes = bytes;
    let millis = (millis % 1000) as usize;
    bytes[20] = b'0' + (millis / 100) as u8;
    bytes[21..23].copy_from_slice(&PAIRS[millis % 100]);
    Stamp { bytes }
}

/// The time of a record, as RFC 3339 UTC with milliseconds: when it is written, or the
/// moment its maker read the clock for it (a request's end, worked out from the clock
/// readings the request already took).
#[derive(Debug, Clone, Copy, Default)]
pub struct Time(Option<Duration>);

impl Time {
    /// This long after the Unix epoch.
    pub fn at(since_epoch: Duration) -> Time {
        Time(Some(since_epoch))
    }

    fn since_epoch(self) -> Duration {
        self.0.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
        })
    }
}

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = self.since_epoch();
        let text = rfc3339(d.as_secs() as i64, d.subsec_millis());
        s.serialize_str(text.as_str())
    }
}

struct Buffer {
    lines: Mutex<Vec<u8>>,
    /// The buffer last written out, emptied: it takes the lines' place at the next flush,
    /// so that requests write into memory already grown rather than growing a new buffer
    /// from nothing (a few reallocations, and their copies, every flush).
    spare: Mutex<Vec<u8>>,
    /// Bytes waiting for the writer.
    backlog: AtomicUsize,
    wake: Condvar,
    /// How long an idle writer sleeps if no line wakes it ([`IDLE_WAIT`]).
    idle_wait: Duration,
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
        Audit::with_idle_wait(file, IDLE_WAIT)
    }

    fn with_idle_wait(file: Option<File>, idle_wait: Duration) -> io::Result<Audit> {
        let out: Box<dyn Write + Send> = match file {
            Some(f) => Box::new(f),
            None => Box::new(io::stdout()),
        };
        let shared = Arc::new(Buffer {
            lines: Mutex::new(Vec::new()),
            spare: Mutex::new(Vec::new()),
            backlog: AtomicUsize::new(0),
            wake: Condvar::new(),
            idle_wait,
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
        if before == 0 {
            self.shared.wake.notify_one();
        }
    }

    /// Writes a decision's record into the buffer, by hand: the same JSON `log` would write
    /// (a test holds them equal), at a fraction of serde's cost on the request path.
    pub fn log_record(&self, record: &Record<'_>) {
        let Ok(mut buf) = self.shared.lines.lock() else {
            return;
        };
        let before = buf.len();
        record.write_json(&mut buf);
        buf.push(b'\n');
        let added = buf.len() - before;
        self.shared.backlog.fetch_add(added, Ordering::Relaxed);
        if before == 0 {
            self.shared.wake.notify_one();
        }
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
    /// Sleeps until there are lines (the first line into an empty buffer wakes it), then
    /// a little longer, so that lines are written in batches and an idle proxy's writer
    /// does not wake at all.
    fn wait_for_lines(&self) {
        if let Ok(lines) = self.lines.lock() {
            if lines.is_empty() {
                let _ = self.wake.wait_timeout(lines, self.idle_wait);
            }
        }
        thread::sleep(FLUSH_EVERY);
    }

    /// Writes out what is buffered. The backlog falls only once the bytes are written, so
    /// a stalled writer shows as a growing backlog.
    fn flush(&self) {
        let mut pending = match self.lines.lock() {
            Ok(mut l) if !l.is_empty() => std::mem::replace(&mut *l, self.take_spare()),
            _ => return,
        };
        let Ok(mut out) = self.out.lock() else {
            return;
        };
        let mut rest: &[u8] = &pending;
        while !rest.is_empty() {
            match out.write(rest) {
                Ok(0) => thread::sleep(RETRY_EVERY),
                Ok(n) => {
                    rest = &rest[n..];
                    self.backlog.fetch_sub(n, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Keep the bytes: they are written when the sink recovers.
                    tracing::error!(error = %e, "writing the audit log");
                    thread::sleep(RETRY_EVERY);
                }
            }
        }
        let _ = out.flush();
        drop(out);
        pending.clear();
        if pending.capacity() <= SPARE_MAX {
            if let Ok(mut spare) = self.spare.lock() {
                *spare = pending;
            }
        }
    }

    fn take_spare(&self) -> Vec<u8> {
        self.spare
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
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
    fn the_hand_written_line_is_the_serde_line() {
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let records = [
            Record::default(),
            Record {
                kind: "request",
                source: Some(ip),
                source_port: 443,
                source_group: Some("offices"),
                user: Some("EXAMPLE\\bob \"the\" \u{1}builder\u{7f}é"),
                auth: "ntlm",
                token_family: Some("callback"),
                method: "POST",
                path: "/EWS/Exchange.asmx?a=\t",
                items: Some(3),
                rule: Some("r"),
                decision: "would-deny",
                reason: "denied by rule \n x",
                failure: Some("policy"),
                report: Some(Shadow {
                    decision: "deny",
                    rule: None,
                    reason: "no rule allows FindItem on email",
                }),
                status: 200,
                upstream_status: Some(200),
                bytes_in: 1 << 40,
                duration_ms: 7.431913,
                upstream_ms: Some(0.0001),
                connection: u64::MAX,
                ..Default::default()
            },
        ];
        for r in &records {
            let mut mine = Vec::new();
            r.write_json(&mut mine);
            let mut a: serde_json::Value = serde_json::from_slice(&mine).unwrap();
            let mut b = serde_json::to_value(r).unwrap();
            // The clock moves between the two; durations are kept to the microsecond.
            for v in [&mut a, &mut b] {
                v["time"] = serde_json::Value::Null;
                for k in ["duration_ms", "upstream_ms"] {
                    if let Some(f) = v[k].as_f64() {
                        v[k] = serde_json::json!((f * 1000.0).round() / 1000.0);
                    }
                }
            }
            assert_eq!(a, b, "{}", String::from_utf8_lossy(&mine));
            let keys =
                |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
            assert_eq!(keys(&a), keys(&b), "the same fields");
        }
    }

    #[test]
    fn values_are_escaped_as_serde_escapes_them_wherever_the_byte_sits() {
        let odd = [
            '"', '\\', '\n', '\u{0}', '\u{1f}', '\u{7f}', ' ', '!', '#', '[', ']', 'é',
        ];
        for len in 0..20 {
            for at in 0..len {
                for c in odd {
                    let mut s: String = "abcdefghijklmnopqrstu"[..len].into();
                    s.replace_range(at..at + 1, c.encode_utf8(&mut [0; 4]));
                    let mut mine = Vec::new();
                    escape_into(&mut mine, &s);
                    let theirs = serde_json::to_vec(&s).unwrap();
                    assert_eq!(
                        String::from_utf8_lossy(&mine),
                        String::from_utf8_lossy(&theirs)
                    );
                }
            }
        }
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "192.0.2.1",
            "203.0.113.255",
            "2001:db8::1",
            "::ffff:1.2.3.4",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            JsonObject::new(&mut out).ip(key!(first "source"), ip);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("{{\"source\":\"{ip}\"")
            );
        }
    }

    #[test]
    fn stamps_within_a_second_are_the_second_s_stamp_with_their_milliseconds() {
        for secs in [0, 951_782_399, 951_782_400, 1_795_435_200] {
            for millis in [0, 5, 99, 100, 999, 7, 420] {
                assert_eq!(
                    same_second_stamp(secs, millis).as_str(),
                    rfc3339(secs, millis).as_str()
                );
            }
        }
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0, 0).as_str(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_795_435_200, 5).as_str(),
            "2026-11-23T12:00:00.005Z"
        );
        assert_eq!(rfc3339(951_782_400, 0).as_str(), "2000-02-29T00:00:00.000Z");
    }

    fn audit_file(name: &str) -> (std::path::PathBuf, File) {
        let path =
            std::env::temp_dir().join(format!("ewsgate-audit-{name}-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    /// The file's lines once it has `n`, or what it has after five seconds.
    fn wait_for_lines(path: &std::path::Path, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.len() >= n || std::time::Instant::now() > deadline {
                return lines;
            }
            thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn an_idle_writer_wakes_for_the_first_line() {
        // A writer that would otherwise sleep for a minute: only the line's signal can
        // bring its lines out within the five seconds the test waits.
        let (path, file) = audit_file("idle");
        let audit = Audit::with_idle_wait(Some(file), Duration::from_secs(60)).unwrap();
        let record = |reason| Record {
            kind: "request",
            decision: "deny",
            reason,
            ..Default::default()
        };
        audit.log_record(&record("first"));
        assert_eq!(wait_for_lines(&path, 1).len(), 1);
        // Asleep again, with nothing to write.
        thread::sleep(FLUSH_EVERY * 5);
        audit.log_record(&record("after_idle"));
        let lines = wait_for_lines(&path, 2);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].contains("after_idle"), "{}", lines[1]);
        assert_eq!(audit.backlog(), 0);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn lines_reach_the_file() {
        let (path, file) = audit_file("reach");
        let audit = Audit::new(Some(file)).unwrap();
        audit.log(&Record {
            kind: "request",
            decision: "deny",
            reason: "no_rule",
            ..Default::default()
        });
        let lines = wait_for_lines(&path, 1);
        let v: serde_json::Value = serde_json::from_str(&lines.concat()).unwrap();
        assert_eq!(v["decision"], "deny");
        assert_eq!(v["reason"], "no_rule");
        assert_eq!(v["time"].as_str().unwrap().len(), 24);
        assert_eq!(audit.backlog(), 0);
        let _ = std::fs::remove_file(&path);
    }
}
