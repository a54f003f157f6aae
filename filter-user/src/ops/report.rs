//! `ewsgate report`: who used EWS from where, for what, what was refused and what fired,
//! from audit files. Files are streamed line by line with a cap on line length, and every
//! table has a cap on distinct keys, so memory stays bounded however large the input. A line
//! that is not an audit line is counted, with its reason and a few examples, never fatal.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, VecDeque},
    fmt::Write as _,
    io::{self, BufRead},
};

use serde::{Deserialize, Serialize};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

/// Longer lines are skipped (counted as garbage) without being held whole.
pub const MAX_LINE: usize = 1 << 20;
/// Time buckets per chart at most; the bucket width grows to stay under it.
const MAX_BUCKETS: usize = 240;
/// Bucket widths in seconds: each divides the next, so merging buckets is exact.
const WIDTHS: [i64; 10] = [
    60,
    300,
    900,
    3600,
    3 * 3600,
    6 * 3600,
    86_400,
    7 * 86_400,
    28 * 86_400,
    364 * 86_400,
];
/// Series per chart family before the rest is "(other)".
const MAX_SERIES: usize = 24;
/// Examples of garbage lines kept.
const EXAMPLES: usize = 5;
/// Detections listed one by one (the most recent).
const RECENT_DETECTIONS: usize = 100;
/// Rows in each top list.
const TOP: usize = 15;

#[derive(Debug, Clone)]
pub struct Options {
    /// Lines before this time (Unix seconds) are skipped.
    pub since: Option<i64>,
    /// Distinct users and sources tracked; more are counted under "(others)".
    pub max_keys: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            since: None,
            max_keys: 100_000,
        }
    }
}

/// The fields of an audit line the report reads; the rest is ignored.
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    source: Option<Cow<'a, str>>,
    #[serde(borrow)]
    source_group: Option<Cow<'a, str>>,
    #[serde(borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow)]
    auth: Option<Cow<'a, str>>,
    #[serde(borrow)]
    operation: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<Cow<'a, str>>,
    #[serde(borrow)]
    decision: Option<Cow<'a, str>>,
    #[serde(borrow)]
    failure: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reason: Option<Cow<'a, str>>,
    #[serde(borrow)]
    detection: Option<Cow<'a, str>>,
    #[serde(borrow)]
    severity: Option<Cow<'a, str>>,
    #[serde(borrow)]
    subject: Option<Cow<'a, str>>,
    #[serde(borrow)]
    action: Option<Cow<'a, str>>,
}

/// Counts by name, with at most `cap` names; the rest under "(other)".
#[derive(Debug, Clone, Default, Serialize)]
#[serde(transparent)]
struct Counter {
    map: BTreeMap<String, u64>,
    #[serde(skip)]
    cap: usize,
}

impl Counter {
    fn new(cap: usize) -> Counter {
        Counter {
            map: BTreeMap::new(),
            cap,
        }
    }

    fn add(&mut self, name: &str, n: u64) {
        if let Some(c) = self.map.get_mut(name) {
            *c += n;
        } else if self.map.len() < self.cap {
            self.map.insert(name.to_string(), n);
        } else {
            *self.map.entry("(other)".into()).or_default() += n;
        }
    }

    fn top(&self, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.map.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

/// A small set of names, at most `SMALL` kept; `more` says some were left out.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Few {
    pub names: Vec<String>,
    pub more: bool,
}

const SMALL: usize = 8;

impl Few {
    fn add(&mut self, name: &str) {
        if self.names.iter().any(|n| n == name) {
            return;
        }
        if self.names.len() < SMALL {
            self.names.push(name.to_string());
        } else {
            self.more = true;
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct UserRow {
    pub requests: u64,
    pub refused: u64,
    pub would_deny: u64,
    pub groups: Few,
    pub sources: Few,
    pub operations: Few,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceRow {
    pub requests: u64,
    pub refused: u64,
    pub group: Option<String>,
    pub users: Few,
}

#[derive(Debug, Clone, Serialize)]
pub struct DetectionRow {
    pub time: String,
    pub detection: String,
    pub severity: String,
    pub subject: String,
    pub action: String,
}

/// Per-bucket counts of named series (verdicts, groups, data types).
#[derive(Debug, Clone, Default)]
struct Chart {
    series: Vec<String>,
    buckets: BTreeMap<i64, Vec<u64>>,
}

impl Chart {
    fn add(&mut self, at: i64, series: &str, width: i64) {
        let i = match self.series.iter().position(|s| s == series) {
            Some(i) => i,
            None if self.series.len() < MAX_SERIES => {
                self.series.push(series.to_string());
                self.series.len() - 1
            }
            None => match self.series.iter().position(|s| s == "(other)") {
                Some(i) => i,
                None => {
                    // The last slot becomes "(other)" and keeps its counts there.
                    let last = self.series.len() - 1;
                    self.series[last] = "(other)".into();
                    last
                }
            },
        };
        let row = self
            .buckets
            .entry(at.div_euclid(width) * width)
            .or_default();
        if row.len() <= i {
            row.resize(i + 1, 0);
        }
        row[i] += 1;
    }

    fn regroup(&mut self, width: i64) {
        let old = std::mem::take(&mut self.buckets);
        for (start, row) in old {
            let merged = self
                .buckets
                .entry(start.div_euclid(width) * width)
                .or_default();
            if merged.len() < row.len() {
                merged.resize(row.len(), 0);
            }
            for (m, c) in merged.iter_mut().zip(row) {
                *m += c;
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChartData {
    pub width_secs: i64,
    pub series: Vec<String>,
    /// (bucket start as RFC 3339, counts per series).
    pub buckets: Vec<(String, Vec<u64>)>,
    pub totals: Vec<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Garbage {
    pub lines: u64,
    pub by_reason: BTreeMap<String, u64>,
    /// "file:line: reason".
    pub examples: Vec<String>,
}

/// What the report says: built by `Report::summary`, printed as text, JSON or HTML.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub files: Vec<String>,
    pub notes: Vec<String>,
    pub lines: u64,
    pub skipped_before_since: u64,
    pub garbage: Garbage,
    pub first: Option<String>,
    pub last: Option<String>,
    pub kinds: BTreeMap<String, u64>,
    /// Requests and connection refusals.
    pub requests: u64,
    pub decisions: BTreeMap<String, u64>,
    pub failures: BTreeMap<String, u64>,
    pub groups: BTreeMap<String, u64>,
    pub auth: BTreeMap<String, u64>,
    pub data: BTreeMap<String, u64>,
    pub top_operations: Vec<(String, u64)>,
    pub top_reasons: Vec<(String, u64)>,
    pub users: usize,
    pub sources: usize,
    pub top_users: Vec<(String, UserRow)>,
    pub top_refused_users: Vec<(String, UserRow)>,
    pub top_refused_sources: Vec<(String, SourceRow)>,
    pub detections: BTreeMap<String, u64>,
    pub detection_severities: BTreeMap<String, u64>,
    pub recent_detections: Vec<DetectionRow>,
    pub by_verdict: ChartData,
    pub by_group: ChartData,
    pub by_data: ChartData,
}

pub struct Report {
    options: Options,
    files: Vec<String>,
    notes: Vec<String>,
    lines: u64,
    skipped: u64,
    garbage: u64,
    garbage_reasons: BTreeMap<String, u64>,
    examples: Vec<String>,
    first: Option<i64>,
    last: Option<i64>,
    kinds: Counter,
    requests: u64,
    decisions: Counter,
    failures: Counter,
    groups: Counter,
    auth: Counter,
    data: Counter,
    operations: Counter,
    reasons: Counter,
    users: HashMap<String, UserRow>,
    other_users: UserRow,
    sources: HashMap<String, SourceRow>,
    other_sources: SourceRow,
    detections: Counter,
    severities: Counter,
    recent: VecDeque<DetectionRow>,
    width: usize,
    by_verdict: Chart,
    by_group: Chart,
    by_data: Chart,
}

/// Why a line is not an audit line.
enum Bad {
    NotJson,
    FieldTypes,
    NoTime,
    NoKind,
}

impl Bad {
    fn text(&self) -> &'static str {
        match self {
            Bad::NotJson => "not a JSON object",
            Bad::FieldTypes => "a field of the wrong type",
            Bad::NoTime => "no valid time",
            Bad::NoKind => "neither kind nor decision",
        }
    }
}

impl Report {
    pub fn new(options: Options) -> Report {
        let small = Counter::new;
        Report {
            options,
            files: Vec::new(),
            notes: Vec::new(),
            lines: 0,
            skipped: 0,
            garbage: 0,
            garbage_reasons: BTreeMap::new(),
            examples: Vec::new(),
            first: None,
            last: None,
            kinds: small(32),
            requests: 0,
            decisions: small(16),
            failures: small(16),
            groups: small(256),
            auth: small(32),
            data: small(64),
            operations: small(512),
            reasons: small(4096),
            users: HashMap::new(),
            other_users: UserRow::default(),
            sources: HashMap::new(),
            other_sources: SourceRow::default(),
            detections: small(64),
            severities: small(16),
            recent: VecDeque::new(),
            width: 0,
            by_verdict: Chart::default(),
            by_group: Chart::default(),
            by_data: Chart::default(),
        }
    }

    /// Reads one audit file (or standard input) to its end.
    pub fn read(&mut self, name: &str, mut input: impl BufRead) -> io::Result<()> {
        self.files.push(name.to_string());
        if input.fill_buf()?.starts_with(&[0x1f, 0x8b]) {
            self.notes.push(format!(
                "{name}: gzip-compressed, skipped (zcat {name} | ewsgate report -)"
            ));
            return Ok(());
        }
        let mut line = Vec::new();
        let mut number = 0u64;
        loop {
            line.clear();
            let (read, too_long) = read_capped(&mut input, &mut line, MAX_LINE)?;
            if read == 0 {
                return Ok(());
            }
            number += 1;
            if too_long {
                self.bad(name, number, "longer than 1 MiB");
                continue;
            }
            let text = trim_newline(&line);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            self.feed(name, number, text);
        }
    }

    fn bad(&mut self, file: &str, number: u64, why: &str) {
        self.lines += 1;
        self.garbage += 1;
        *self.garbage_reasons.entry(why.to_string()).or_default() += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(format!("{file}:{number}: {why}"));
        }
    }

    /// One line (without its newline).
    pub fn feed(&mut self, file: &str, number: u64, text: &[u8]) {
        match self.parse(text) {
            Ok(()) => {}
            Err(b) => self.bad(file, number, b.text()),
        }
    }

    fn parse(&mut self, text: &[u8]) -> Result<(), Bad> {
        // One parse: an object that is not JSON all through is a syntax error, one whose
        // fields have the wrong types a data error.
        if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(Bad::NotJson);
        }
        let l: Line = serde_json::from_slice(text).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => Bad::FieldTypes,
            _ => Bad::NotJson,
        })?;
        let at = l.time.as_deref().and_then(parse_time).ok_or(Bad::NoTime)?;
        let kind = match (&l.kind, &l.decision) {
            (Some(k), _) => k.as_ref(),
            (None, Some(_)) => "request",
            (None, None) => return Err(Bad::NoKind),
        };
        self.lines += 1;
        if self.options.since.is_some_and(|s| at < s) {
            self.skipped += 1;
            return Ok(());
        }
        self.first = Some(self.first.map_or(at, |f| f.min(at)));
        self.last = Some(self.last.map_or(at, |f| f.max(at)));
        self.kinds.add(kind, 1);
        match kind {
            "request" | "connection" => self.request(&l, at),
            "detection" => self.detection(&l, at),
            _ => {}
        }
        Ok(())
    }

    fn request(&mut self, l: &Line, at: i64) {
        self.requests += 1;
        let decision = l.decision.as_deref().unwrap_or("unknown");
        let refused = decision == "deny";
        let group = l.source_group.as_deref().unwrap_or("(none)");
        self.decisions.add(decision, 1);
        // A would-deny may name the class it would have had; only refusals count here.
        if let (Some(f), true) = (&l.failure, refused) {
            self.failures.add(f, 1);
        }
        self.groups.add(group, 1);
        self.auth.add(l.auth.as_deref().unwrap_or("(none)"), 1);
        if let Some(op) = &l.operation {
            self.operations.add(op, 1);
        }
        if refused || decision == "would-deny" {
            self.reasons.add(l.reason.as_deref().unwrap_or("(none)"), 1);
        }
        let types: Vec<&str> = match l.data.as_deref() {
            Some(d) if !d.is_empty() => d.split(',').map(str::trim).collect(),
            _ => vec!["(none)"],
        };
        for t in &types {
            self.data.add(t, 1);
        }
        let cap = self.options.max_keys;
        if let Some(user) = &l.user {
            let row = row_of(&mut self.users, &mut self.other_users, user, cap);
            row.requests += 1;
            row.refused += u64::from(refused);
            row.would_deny += u64::from(decision == "would-deny");
            row.groups.add(group);
            if let Some(s) = &l.source {
                row.sources.add(s);
            }
            if let Some(op) = &l.operation {
                row.operations.add(op);
            }
        }
        if let Some(source) = &l.source {
            let row = row_of(&mut self.sources, &mut self.other_sources, source, cap);
            row.requests += 1;
            row.refused += u64::from(refused);
            if row.group.is_none() {
                row.group = l.source_group.as_deref().map(str::to_string);
            }
            if let Some(u) = &l.user {
                row.users.add(u);
            }
        }
        let w = width_of(self.width);
        self.by_verdict.add(at, decision, w);
        self.by_group.add(at, group, w);
        for t in &types {
            self.by_data.add(at, t, w);
        }
        self.widen();
    }

    fn widen(&mut self) {
        // Too many buckets: widen all charts alike, merging buckets.
        while self.width + 1 < WIDTHS.len()
            && [&self.by_verdict, &self.by_group, &self.by_data]
                .iter()
                .any(|c| c.buckets.len() > MAX_BUCKETS)
        {
            self.width += 1;
            let w = width_of(self.width);
            for c in [&mut self.by_verdict, &mut self.by_group, &mut self.by_data] {
                c.regroup(w);
            }
        }
    }

    fn detection(&mut self, l: &Line, at: i64) {
        let name = l.detection.as_deref().unwrap_or("(unnamed)");
        self.detections.add(name, 1);
        self.severities
            .add(l.severity.as_deref().unwrap_or("(none)"), 1);
        if self.recent.len() == RECENT_DETECTIONS {
            self.recent.pop_front();
        }
        self.recent.push_back(DetectionRow {
            time: format_time(at),
            detection: name.to_string(),
            severity: l.severity.as_deref().unwrap_or("-").to_string(),
            subject: l.subject.as_deref().unwrap_or("-").to_string(),
            action: l.action.as_deref().unwrap_or("-").to_string(),
        });
    }

    pub fn summary(&self) -> Summary {
        let mut users: Vec<(&String, &UserRow)> = self.users.iter().collect();
        users.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then_with(|| a.0.cmp(b.0)));
        let top_users = users
            .iter()
            .take(TOP)
            .map(|(k, v)| ((*k).clone(), (*v).clone()))
            .collect();
        users.sort_by(|a, b| b.1.refused.cmp(&a.1.refused).then_with(|| a.0.cmp(b.0)));
        let top_refused_users = users
            .iter()
            .filter(|(_, v)| v.refused > 0)
            .take(TOP)
            .map(|(k, v)| ((*k).clone(), (*v).clone()))
            .collect();
        let mut sources: Vec<(&String, &SourceRow)> = self.sources.iter().collect();
        sources.sort_by(|a, b| b.1.refused.cmp(&a.1.refused).then_with(|| a.0.cmp(b.0)));
        let top_refused_sources = sources
            .iter()
            .filter(|(_, v)| v.refused > 0)
            .take(TOP)
            .map(|(k, v)| ((*k).clone(), (*v).clone()))
            .collect();
        let mut notes = self.notes.clone();
        if self.other_users.requests > 0 {
            notes.push(format!(
                "more than {} users: {} requests of the others are not listed per user",
                self.options.max_keys, self.other_users.requests
            ));
        }
        if self.other_sources.requests > 0 {
            notes.push(format!(
                "more than {} sources: {} requests of the others are not listed per source",
                self.options.max_keys, self.other_sources.requests
            ));
        }
        Summary {
            files: self.files.clone(),
            notes,
            lines: self.lines,
            skipped_before_since: self.skipped,
            garbage: Garbage {
                lines: self.garbage,
                by_reason: self.garbage_reasons.clone(),
                examples: self.examples.clone(),
            },
            first: self.first.map(format_time),
            last: self.last.map(format_time),
            kinds: self.kinds.map.clone(),
            requests: self.requests,
            decisions: self.decisions.map.clone(),
            failures: self.failures.map.clone(),
            groups: self.groups.map.clone(),
            auth: self.auth.map.clone(),
            data: self.data.map.clone(),
            top_operations: self.operations.top(TOP),
            top_reasons: self.reasons.top(TOP),
            users: self.users.len(),
            sources: self.sources.len(),
            top_users,
            top_refused_users,
            top_refused_sources,
            detections: self.detections.map.clone(),
            detection_severities: self.severities.map.clone(),
            recent_detections: self.recent.iter().rev().cloned().collect(),
            by_verdict: chart_data(&self.by_verdict, self.width),
            by_group: chart_data(&self.by_group, self.width),
            by_data: chart_data(&self.by_data, self.width),
        }
    }
}

/// The row of `key`, a new one while under `cap` keys, else the shared overflow row.
fn row_of<'m, V: Default>(
    map: &'m mut HashMap<String, V>,
    other: &'m mut V,
    key: &str,
    cap: usize,
) -> &'m mut V {
    if map.contains_key(key) {
        match map.get_mut(key) {
            Some(r) => r,
            None => other,
        }
    } else if map.len() < cap {
        map.entry(key.to_string()).or_default()
    } else {
        other
    }
}

fn width_of(i: usize) -> i64 {
    WIDTHS[i.min(WIDTHS.len() - 1)]
}

fn chart_data(c: &Chart, width: usize) -> ChartData {
    let n = c.series.len();
    let mut totals = vec![0; n];
    let buckets = c
        .buckets
        .iter()
        .map(|(start, row)| {
            let mut r = row.clone();
            r.resize(n, 0);
            for (t, v) in totals.iter_mut().zip(&r) {
                *t += v;
            }
            (format_time(*start), r)
        })
        .collect();
    ChartData {
        width_secs: width_of(width),
        series: c.series.clone(),
        buckets,
        totals,
    }
}

/// Reads up to and including the next newline; past `cap` bytes the rest of the line is
/// read and dropped. Returns (bytes consumed, too long).
fn read_capped(
    input: &mut impl BufRead,
    out: &mut Vec<u8>,
    cap: usize,
) -> io::Result<(usize, bool)> {
    let mut consumed = 0;
    let mut too_long = false;
    loop {
        let buf = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok((consumed, too_long));
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        if !too_long && out.len() + chunk.len() <= cap + 1 {
            out.extend_from_slice(chunk);
        } else {
            too_long = true;
            out.clear();
        }
        let n = chunk.len();
        input.consume(n);
        consumed += n;
        if done {
            return Ok((consumed, too_long));
        }
    }
}

fn trim_newline(l: &[u8]) -> &[u8] {
    let l = l.strip_suffix(b"\n").unwrap_or(l);
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// RFC 3339 to Unix seconds.
pub fn parse_time(t: &str) -> Option<i64> {
    OffsetDateTime::parse(t, &Rfc3339)
        .ok()
        .map(|d| d.unix_timestamp())
}

pub fn format_time(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

/// `--since`: RFC 3339, `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM` (UTC), or a time ago such as
/// `90m`, `24h` or `7d`.
pub fn parse_since(text: &str, now: i64) -> Result<i64, String> {
    let t = text.trim();
    if let Some(secs) = parse_time(t) {
        return Ok(secs);
    }
    for (suffix, scale) in [("s", 1), ("m", 60), ("h", 3600), ("d", 86_400)] {
        let ago = t
            .strip_suffix(suffix)
            .and_then(|n| n.parse::<i64>().ok())
            .and_then(|n| n.checked_mul(scale))
            .filter(|s| (1..=100 * 365 * 86_400).contains(s));
        if let Some(ago) = ago {
            return Ok(now - ago);
        }
    }
    let padded = match t.len() {
        10 => format!("{t}T00:00:00Z"),
        16 => format!("{t}:00Z"),
        _ => String::new(),
    };
    parse_time(&padded).ok_or_else(|| {
        format!(
            "--since {t}: expected 2026-12-01, 2026-12-01T08:00, an RFC 3339 time, or 90m, 24h, 7d"
        )
    })
}

/// The summary as text for a terminal.
pub fn text(s: &Summary) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "ewsgate report: {} lines from {} file(s), {} to {}",
        s.lines,
        s.files.len(),
        s.first.as_deref().unwrap_or("-"),
        s.last.as_deref().unwrap_or("-")
    );
    if s.garbage.lines > 0 {
        let _ = writeln!(o, "garbage lines: {} (counted, not used)", s.garbage.lines);
        for (why, n) in &s.garbage.by_reason {
            let _ = writeln!(o, "  {n:>8}  {why}");
        }
        for e in &s.garbage.examples {
            let _ = writeln!(o, "  e.g. {e}");
        }
    }
    if s.skipped_before_since > 0 {
        let _ = writeln!(
            o,
            "before --since: {} lines skipped",
            s.skipped_before_since
        );
    }
    for n in &s.notes {
        let _ = writeln!(o, "note: {n}");
    }
    let table = |o: &mut String, title: &str, m: &BTreeMap<String, u64>| {
        if m.is_empty() {
            return;
        }
        let _ = writeln!(o, "\n{title}");
        let mut v: Vec<_> = m.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        for (k, n) in v {
            let _ = writeln!(o, "  {n:>8}  {k}");
        }
    };
    let _ = writeln!(
        o,
        "\nrequests: {} (users: {}, sources: {})",
        s.requests, s.users, s.sources
    );
    table(&mut o, "by decision", &s.decisions);
    table(&mut o, "refusals by failure class", &s.failures);
    table(&mut o, "by source group", &s.groups);
    table(&mut o, "by authentication", &s.auth);
    table(&mut o, "by data type", &s.data);
    let list = |o: &mut String, title: &str, v: &[(String, u64)]| {
        if v.is_empty() {
            return;
        }
        let _ = writeln!(o, "\n{title}");
        for (k, n) in v {
            let _ = writeln!(o, "  {n:>8}  {k}");
        }
    };
    list(&mut o, "top operations", &s.top_operations);
    list(&mut o, "top refusal reasons", &s.top_reasons);
    if !s.top_users.is_empty() {
        let _ = writeln!(o, "\nwho used EWS, from where, for what");
        for (u, r) in &s.top_users {
            let _ = writeln!(
                o,
                "  {:>8}  {u}  refused {}  groups {}  sources {}  ops {}",
                r.requests,
                r.refused,
                few(&r.groups),
                few(&r.sources),
                few(&r.operations)
            );
        }
    }
    if !s.top_refused_users.is_empty() {
        let _ = writeln!(o, "\ntop refused users");
        for (u, r) in &s.top_refused_users {
            let _ = writeln!(o, "  {:>8}  {u}  (of {})", r.refused, r.requests);
        }
    }
    if !s.top_refused_sources.is_empty() {
        let _ = writeln!(o, "\ntop refused sources");
        for (a, r) in &s.top_refused_sources {
            let _ = writeln!(
                o,
                "  {:>8}  {a}  group {}  (of {})  users {}",
                r.refused,
                r.group.as_deref().unwrap_or("-"),
                r.requests,
                few(&r.users)
            );
        }
    }
    table(&mut o, "detections", &s.detections);
    if !s.recent_detections.is_empty() {
        let _ = writeln!(o, "\nmost recent detections");
        for d in s.recent_detections.iter().take(20) {
            let _ = writeln!(
                o,
                "  {}  {:<24} {:<6} {}  -> {}",
                d.time, d.detection, d.severity, d.subject, d.action
            );
        }
    }
    o
}

fn few(f: &Few) -> String {
    let mut s = f.names.join(",");
    if f.more {
        s.push_str(",…");
    }
    if s.is_empty() {
        s.push('-');
    }
    s
}

pub use super::report_html::html;

#[cfg(test)]
mod tests {
    use super::*;

    fn report(text: &str) -> Summary {
        report_bytes(text.as_bytes())
    }

    fn report_bytes(bytes: &[u8]) -> Summary {
        let mut r = Report::new(Options::default());
        r.read("t.jsonl", bytes).unwrap();
        r.summary()
    }

    #[test]
    fn counts_requests_refusals_and_detections() {
        let s = report(concat!(
            r#"{"time":"2026-11-23T12:00:00.000Z","source":"198.51.100.10","source_group":"offices","user":"alice","auth":"basic","operation":"FindItem","data":"calendar,contacts","decision":"allow","reason":"forwarded"}"#,
            "\n",
            r#"{"time":"2026-11-23T12:01:00.000Z","kind":"request","source":"203.0.113.9","user":"bob","auth":"basic","operation":"FindItem","data":"email","decision":"deny","failure":"policy","reason":"no rule"}"#,
            "\n",
            r#"{"time":"2026-11-23T12:02:00.000Z","kind":"connection","source":"203.0.113.9","decision":"deny","failure":"protocol","reason":"tls handshake failed"}"#,
            "\n",
            r#"{"time":"2026-11-23T12:03:00.000Z","kind":"detection","detection":"password-spray","severity":"high","subject":"source 203.0.113.9","action":"alert"}"#,
            "\n",
        ));
        assert_eq!(s.lines, 4);
        assert_eq!(s.requests, 3);
        assert_eq!(s.decisions["allow"], 1);
        assert_eq!(s.decisions["deny"], 2);
        assert_eq!(s.failures["protocol"], 1);
        assert_eq!(s.data["calendar"], 1);
        assert_eq!(s.data["(none)"], 1);
        assert_eq!(s.detections["password-spray"], 1);
        assert_eq!(s.top_refused_sources[0].0, "203.0.113.9");
        assert_eq!(s.top_refused_sources[0].1.refused, 2);
        assert_eq!(s.top_refused_users[0].0, "bob");
        assert_eq!(s.by_verdict.totals.iter().sum::<u64>(), 3);
        assert_eq!(s.first.as_deref(), Some("2026-11-23T12:00:00Z"));
    }

    #[test]
    fn garbage_is_counted_never_fatal() {
        let long = "x".repeat(MAX_LINE + 10);
        let text = format!(
            "not json\n[1,2]\n{{\"time\":5,\"decision\":\"allow\"}}\n{{\"decision\":\"allow\"}}\n{{\"time\":\"2026-11-23T12:00:00Z\"}}\n{long}\nINVALID\n\n{}\n",
            r#"{"time":"2026-11-23T12:00:00Z","decision":"allow","user":"ok"}"#
        );
        // Bytes that are not UTF-8 at all.
        let bytes = text.replace("INVALID", "\u{1}").into_bytes();
        let bytes: Vec<u8> = bytes
            .into_iter()
            .map(|b| if b == 1 { 0xff } else { b })
            .collect();
        let s = report_bytes(&bytes);
        assert_eq!(s.garbage.lines, 7);
        assert_eq!(s.garbage.by_reason["not a JSON object"], 3);
        assert_eq!(s.garbage.by_reason["a field of the wrong type"], 1);
        assert_eq!(s.garbage.by_reason["no valid time"], 1);
        assert_eq!(s.garbage.by_reason["neither kind nor decision"], 1);
        assert_eq!(s.garbage.by_reason["longer than 1 MiB"], 1);
        assert_eq!(s.garbage.examples[0], "t.jsonl:1: not a JSON object");
        assert_eq!(s.requests, 1);
    }

    #[test]
    fn since_skips_and_parses() {
        let now = 1_795_435_200;
        assert_eq!(parse_since("2026-11-23", now), Ok(1_795_392_000));
        assert_eq!(parse_since("2026-11-23T12:00", now), Ok(now));
        assert_eq!(parse_since("2026-11-23T13:00:00+01:00", now), Ok(now));
        assert_eq!(parse_since("2h", now), Ok(now - 7200));
        assert!(parse_since("yesterday", now).is_err());
        let mut r = Report::new(Options {
            since: Some(now),
            ..Options::default()
        });
        r.read(
            "t",
            concat!(
                r#"{"time":"2026-11-23T11:59:59Z","decision":"allow"}"#,
                "\n",
                r#"{"time":"2026-11-23T12:00:00Z","decision":"deny"}"#,
                "\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let s = r.summary();
        assert_eq!((s.lines, s.skipped_before_since, s.requests), (2, 1, 1));
    }

    #[test]
    fn buckets_widen_and_keep_every_count() {
        let mut r = Report::new(Options::default());
        let mut text = String::new();
        // 2,000 requests one a minute: 2,000 one-minute buckets would be too many.
        for i in 0..2000 {
            let t = format_time(1_795_435_200 + i * 60);
            text.push_str(&format!(
                "{{\"time\":\"{t}\",\"decision\":\"allow\",\"source_group\":\"g{}\"}}\n",
                i % 40
            ));
        }
        r.read("t", text.as_bytes()).unwrap();
        let s = r.summary();
        assert!(s.by_verdict.buckets.len() <= MAX_BUCKETS);
        assert_eq!(s.by_verdict.width_secs, 900);
        assert_eq!(s.by_verdict.totals, vec![2000]);
        // 40 groups: 23 named series and "(other)".
        assert_eq!(s.by_group.series.len(), MAX_SERIES);
        assert_eq!(s.by_group.totals.iter().sum::<u64>(), 2000);
    }

    #[test]
    fn gzip_is_noted_and_skipped() {
        let mut r = Report::new(Options::default());
        r.read("a.gz", &[0x1f, 0x8b, 8, 0, 1, 2, 3][..]).unwrap();
        let s = r.summary();
        assert_eq!(s.lines, 0);
        assert!(s.notes[0].contains("gzip"));
    }
}
