//! Where the audit lines go: several sinks at once, each with its own bounded queue and
//! writer thread, so a slow SIEM never holds up a file or the request path.
//!
//! `Sinks::write` serialises a record once and queues the same bytes on every sink; it never
//! blocks. A sink whose queue is full refuses the line, counts it and says so in the result:
//! the caller reads `lag()` before that happens and slows down or refuses requests (503), so
//! that no decision goes unaudited. A sink whose destination fails keeps its lines queued and
//! retries; nothing is dropped while the queue has room.

mod file;
mod journald;
mod syslog;

use std::{
    collections::VecDeque,
    fmt, io,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::model::ops::{AuditSettings, SinkSpec, Transport};

/// One audit line: JSON, no trailing newline.
pub type Line = Arc<[u8]>;

/// A destination. Its writer thread hands it batches; whatever it has not written is
/// handed again after a pause.
trait Output: Send {
    /// Writes lines from the start of `lines`; returns how many were written whole. An
    /// error after some lines returns `Ok(n)` with those; the rest come again.
    fn write(&mut self, lines: &[Line]) -> io::Result<usize>;
    /// Called before each batch and at least once a second: a file checks for rotation.
    fn tick(&mut self, _reopen: bool) -> io::Result<()> {
        Ok(())
    }
}

/// How far behind the sinks are: the worst sink's share of its queue in use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// 0.0 (empty) to 1.0 (full: lines are being refused).
    pub fill: f64,
    /// The oldest queued line's age in the worst sink.
    pub oldest: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct SinkStatus {
    pub sink: String,
    pub queued_lines: usize,
    pub queued_bytes: usize,
    pub capacity_bytes: usize,
    pub written: u64,
    /// Lines refused because the queue was full.
    pub refused: u64,
    /// Failed attempts to write (each retried).
    pub errors: u64,
    pub last_error: Option<String>,
}

/// The sinks that refused a line (their queues were full).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub sinks: Vec<String>,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "audit sinks full: {}", self.sinks.join(", "))
    }
}

impl std::error::Error for Refused {}

struct Queue {
    lines: VecDeque<(Instant, Line)>,
    bytes: usize,
}

struct Shared {
    label: String,
    capacity: usize,
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Signalled when the queue empties (for `flush`).
    drained: Condvar,
    reopen: AtomicBool,
    stop: AtomicBool,
    written: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // A writer that panicked leaves a consistent queue: keep using it.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, line: &Line) -> bool {
        let mut q = self.queue();
        if q.bytes + line.len() > self.capacity {
            drop(q);
            let n = self.refused.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::error!(sink = %self.label, refused = n + 1, "audit sink full: lines refused");
            }
            return false;
        }
        q.bytes += line.len();
        q.lines.push_back((Instant::now(), line.clone()));
        // The writer wakes on its own every FLUSH_EVERY; only a backlog wakes it sooner, so
        // a line costs the request path no wake-up.
        let backlog = q.bytes >= WAKE_BYTES;
        drop(q);
        if backlog {
            self.ready.notify_one();
        }
        true
    }

    fn note_error(&self, e: &io::Error) {
        let n = self.errors.fetch_add(1, Ordering::Relaxed);
        let text = e.to_string();
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        // Log the first error, a change of error, and then every 100th.
        if last.as_deref() != Some(&text) || n.is_multiple_of(100) {
            tracing::warn!(sink = %self.label, error = %text, "audit sink: write failed, retrying");
        }
        *last = Some(text);
    }
}

struct Worker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

pub struct Sinks {
    workers: Vec<Worker>,
}

/// Longest pause between retries of a failing destination.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Lines handed to a destination at once.
const BATCH: usize = 512;
/// How long a line may wait for its writer: lines reach their sink within this.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Queued bytes that wake the writer before its time.
const WAKE_BYTES: usize = 256 << 10;

impl Sinks {
    /// Opens every sink. A file that cannot be opened is an error; a network or journald
    /// destination that is not there yet is retried in the background.
    pub fn open(settings: &AuditSettings) -> io::Result<Sinks> {
        let mut workers = Vec::new();
        for spec in &settings.sinks {
            let output: Box<dyn Output> = match spec {
                SinkSpec::File { path } => Box::new(file::FileOutput::open(path)?),
                SinkSpec::Stdout => Box::new(file::StdoutOutput),
                SinkSpec::Journald { socket } => Box::new(journald::JournalOutput::new(socket)),
                SinkSpec::Syslog {
                    transport,
                    address,
                    facility,
                    hostname,
                } => {
                    let format = syslog::Format::new(*facility, hostname.clone());
                    match transport {
                        Transport::Udp => Box::new(syslog::UdpOutput::new(address, format)),
                        Transport::Tcp => Box::new(syslog::TcpOutput::new(address, format)),
                    }
                }
            };
            workers.push(Worker::start(spec.label(), settings.buffer_bytes, output)?);
        }
        Ok(Sinks { workers })
    }

    /// Serialises `record` once and queues it on every sink.
    pub fn write<T: Serialize + ?Sized>(&self, record: &T) -> Result<(), Refused> {
        match serde_json::to_vec(record) {
            Ok(v) => self.write_line(v.into()),
            // A record that does not serialise is a bug; say so rather than vanish.
            Err(e) => {
                tracing::error!(error = %e, "audit record does not serialise");
                Err(Refused {
                    sinks: vec!["(serialisation)".into()],
                })
            }
        }
    }

    /// Queues one JSON line (without its newline) on every sink.
    pub fn write_line(&self, line: Line) -> Result<(), Refused> {
        let refused: Vec<String> = self
            .workers
            .iter()
            .filter(|w| !w.shared.push(&line))
            .map(|w| w.shared.label.clone())
            .collect();
        if refused.is_empty() {
            Ok(())
        } else {
            Err(Refused { sinks: refused })
        }
    }

    /// Reopens files now (SIGHUP after a rotation).
    pub fn reopen(&self) {
        for w in &self.workers {
            w.shared.reopen.store(true, Ordering::Relaxed);
            w.shared.ready.notify_one();
        }
    }

    /// The worst sink's fill and oldest line.
    pub fn lag(&self) -> Lag {
        let mut lag = Lag {
            fill: 0.0,
            oldest: Duration::ZERO,
        };
        for w in &self.workers {
            let q = w.shared.queue();
            let fill = q.bytes as f64 / w.shared.capacity as f64;
            if fill >= lag.fill {
                lag.fill = fill.min(1.0);
                lag.oldest = lag
                    .oldest
                    .max(q.lines.front().map_or(Duration::ZERO, |(t, _)| t.elapsed()));
            }
        }
        lag
    }

    pub fn status(&self) -> Vec<SinkStatus> {
        self.workers
            .iter()
            .map(|w| {
                let s = &w.shared;
                let (lines, bytes) = {
                    let q = s.queue();
                    (q.lines.len(), q.bytes)
                };
                SinkStatus {
                    sink: s.label.clone(),
                    queued_lines: lines,
                    queued_bytes: bytes,
                    capacity_bytes: s.capacity,
                    written: s.written.load(Ordering::Relaxed),
                    refused: s.refused.load(Ordering::Relaxed),
                    errors: s.errors.load(Ordering::Relaxed),
                    last_error: s.last_error.lock().map(|l| l.clone()).unwrap_or(None),
                }
            })
            .collect()
    }

    /// Waits until every queue is empty or `timeout` passes; true when all drained.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        for w in &self.workers {
            let mut q = w.shared.queue();
            while !q.lines.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                w.shared.ready.notify_one();
                q = w
                    .shared
                    .drained
                    .wait_timeout(q, left)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        }
        true
    }
}

impl Drop for Sinks {
    /// Gives each writer a moment to empty its queue, then stops it; what could not be
    /// written is logged with its count.
    fn drop(&mut self) {
        self.flush(Duration::from_secs(2));
        for w in &mut self.workers {
            w.shared.stop.store(true, Ordering::Relaxed);
            w.shared.ready.notify_one();
            // A writer stuck on a dead peer is left behind after a second, not waited for.
            if let Some(t) = w.thread.take() {
                let deadline = Instant::now() + Duration::from_secs(1);
                while !t.is_finished() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(10));
                }
                if t.is_finished() {
                    let _ = t.join();
                }
            }
            let left = w.shared.queue().lines.len();
            if left > 0 {
                tracing::error!(sink = %w.shared.label, lines = left, "audit lines not written at shutdown");
            }
        }
    }
}

impl Worker {
    fn start(label: String, capacity: usize, output: Box<dyn Output>) -> io::Result<Worker> {
        let shared = Arc::new(Shared {
            label,
            capacity,
            queue: Mutex::new(Queue {
                lines: VecDeque::new(),
                bytes: 0,
            }),
            ready: Condvar::new(),
            drained: Condvar::new(),
            reopen: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            written: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        let s = shared.clone();
        let thread = thread::Builder::new()
            .name("ewsgate-sink".into())
            .spawn(move || run(&s, output))?;
        Ok(Worker {
            shared,
            thread: Some(thread),
        })
    }
}

/// The writer thread: every FLUSH_EVERY (or sooner for a backlog) takes a batch off the
/// queue, writes it, and keeps what failed for the next try.
fn run(s: &Shared, mut output: Box<dyn Output>) {
    let mut backoff = Duration::from_millis(50);
    let mut batch: Vec<Line> = Vec::with_capacity(BATCH);
    loop {
        {
            let mut q = s.queue();
            let busy = q.lines.len() >= BATCH || q.bytes >= WAKE_BYTES;
            if !busy && !s.stop.load(Ordering::Relaxed) && !s.reopen.load(Ordering::Relaxed) {
                q = s
                    .ready
                    .wait_timeout(q, FLUSH_EVERY)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            if q.lines.is_empty() {
                drop(q);
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                // Idle: still look for rotation (a file checks at most once a second).
                if let Err(e) = output.tick(s.reopen.swap(false, Ordering::Relaxed)) {
                    s.note_error(&e);
                }
                continue;
            }
            batch.clear();
            batch.extend(q.lines.iter().take(BATCH).map(|(_, l)| l.clone()));
        }
        let result = output
            .tick(s.reopen.swap(false, Ordering::Relaxed))
            .and_then(|()| output.write(&batch));
        let done = match result {
            Ok(n) => n,
            Err(e) => {
                s.note_error(&e);
                0
            }
        };
        if done > 0 {
            let mut q = s.queue();
            for _ in 0..done {
                if let Some((_, l)) = q.lines.pop_front() {
                    q.bytes -= l.len();
                }
            }
            if q.lines.is_empty() {
                s.drained.notify_all();
            }
            s.written.fetch_add(done as u64, Ordering::Relaxed);
        }
        if done < batch.len() {
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        } else {
            backoff = Duration::from_millis(50);
        }
    }
}

/// The syslog/journald severity of an audit line: 0 emergency .. 7 debug.
fn severity(v: &serde_json::Value) -> u8 {
    match (
        v.get("kind").and_then(|k| k.as_str()),
        v.get("decision").and_then(|d| d.as_str()),
    ) {
        (Some("detection"), _) => match v.get("severity").and_then(|s| s.as_str()) {
            Some("high") => 3,
            Some("medium") => 4,
            _ => 5,
        },
        (_, Some("allow")) => 6,
        _ => 5,
    }
}

/// A one-line summary of an audit line for people (journald's MESSAGE).
fn summary(v: &serde_json::Value) -> String {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("-");
    let source = v.get("source").and_then(|x| x.as_str()).unwrap_or("-");
    match v.get("kind").and_then(|k| k.as_str()) {
        Some("detection") => format!(
            "detection {} ({}): {}, action {}",
            s("detection"),
            s("severity"),
            s("subject"),
            s("action")
        ),
        _ => format!(
            "{} {} from {} ({}): {} {}",
            s("decision"),
            s("user"),
            source,
            s("source_group"),
            v.get("operation")
                .and_then(|x| x.as_str())
                .unwrap_or_else(|| s("path")),
            s("reason")
        ),
    }
}

#[cfg(test)]
mod tests;
