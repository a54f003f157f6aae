//! The report as one self-contained HTML page: inline CSS, inline SVG charts drawn here, no
//! script, font or image from anywhere (a Content-Security-Policy says so to the browser).
//! Every number a test or a script may want carries a `data-*` attribute.

use std::fmt::Write as _;

use super::report::{ChartData, Summary};

/// Text for HTML, attribute values included.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const PALETTE: [&str; 12] = [
    "#4e79a7", "#f28e2b", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
    "#bab0ac", "#e15759", "#86bcb6", "#d37295",
];

fn colour(series: &str, i: usize) -> &'static str {
    match series {
        "allow" => "#59a14f",
        "deny" => "#e15759",
        "would-deny" => "#edc948",
        _ => PALETTE[i % PALETTE.len()],
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #eee}\
td.n{text-align:right;font-variant-numeric:tabular-nums}\
ul.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:12px}\
ul.legend span{display:inline-block;width:10px;height:10px;margin-right:4px}\
.note{color:#a33}svg text{font:11px sans-serif;fill:#555}";

/// The whole page.
pub fn html(s: &Summary) -> String {
    let mut o = String::new();
    o.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    o.push_str("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">");
    let _ = write!(
        o,
        "<title>ewsgate report</title><style>{STYLE}</style></head><body>\n<h1>ewsgate report</h1>\n"
    );
    let _ = writeln!(
        o,
        "<p id=\"span\" data-first=\"{}\" data-last=\"{}\">{} audit lines from {} file(s), {} to {}.</p>",
        esc(s.first.as_deref().unwrap_or("")),
        esc(s.last.as_deref().unwrap_or("")),
        s.lines,
        s.files.len(),
        esc(s.first.as_deref().unwrap_or("-")),
        esc(s.last.as_deref().unwrap_or("-"))
    );
    for n in &s.notes {
        let _ = writeln!(o, "<p class=\"note\">{}</p>", esc(n));
    }
    summary_table(&mut o, s);
    o.push_str("<h2>Requests over time</h2>\n");
    chart(&mut o, "verdict", "by verdict", &s.by_verdict);
    chart(&mut o, "group", "by source group", &s.by_group);
    chart(&mut o, "data", "by data type", &s.by_data);
    users(&mut o, s);
    refused(&mut o, s);
    detections(&mut o, s);
    garbage(&mut o, s);
    o.push_str("</body></html>\n");
    o
}

fn counts(o: &mut String, id: &str, title: &str, rows: &[(String, u64)]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(o, "<h2>{}</h2>\n<table id=\"{id}\">", esc(title));
    for (k, n) in rows {
        let _ = writeln!(
            o,
            "<tr data-key=\"{}\" data-count=\"{n}\"><td>{}</td><td class=\"n\">{n}</td></tr>",
            esc(k),
            esc(k)
        );
    }
    o.push_str("</table>\n");
}

fn sorted(m: &std::collections::BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = m.iter().map(|(k, n)| (k.clone(), *n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

fn summary_table(o: &mut String, s: &Summary) {
    o.push_str("<h2>Summary</h2>\n<table id=\"summary\">\n");
    let mut row = |id: &str, label: &str, n: u64| {
        let _ = writeln!(
            o,
            "<tr><td>{label}</td><td class=\"n\" id=\"{id}\" data-count=\"{n}\">{n}</td></tr>"
        );
    };
    row("total-lines", "audit lines", s.lines);
    row("requests", "requests and connection refusals", s.requests);
    for (d, label) in [
        ("allow", "allowed"),
        ("deny", "refused"),
        ("would-deny", "would be refused (report-only rules)"),
    ] {
        row(
            &format!("decision-{d}"),
            label,
            s.decisions.get(d).copied().unwrap_or(0),
        );
    }
    row("users", "distinct users", s.users as u64);
    row("sources", "distinct sources", s.sources as u64);
    row(
        "detections-total",
        "detections",
        s.detections.values().sum(),
    );
    row(
        "garbage-lines",
        "garbage lines (not audit lines)",
        s.garbage.lines,
    );
    row(
        "skipped-before-since",
        "lines before --since",
        s.skipped_before_since,
    );
    o.push_str("</table>\n");
    counts(
        o,
        "failures",
        "Refusals by failure class",
        &sorted(&s.failures),
    );
    counts(o, "groups", "Requests by source group", &sorted(&s.groups));
    counts(o, "auth", "Requests by authentication", &sorted(&s.auth));
    counts(o, "data", "Requests by data type", &sorted(&s.data));
    counts(o, "operations", "Top operations", &s.top_operations);
    counts(o, "reasons", "Top refusal reasons", &s.top_reasons);
}

/// A stacked bar chart: one bar per time bucket, one colour per series.
fn chart(o: &mut String, family: &str, title: &str, c: &ChartData) {
    let _ = writeln!(
        o,
        "<h3>{}</h3>\n<figure id=\"chart-{family}\" data-width-secs=\"{}\">",
        esc(title),
        c.width_secs
    );
    if c.buckets.is_empty() {
        o.push_str("<p>No requests.</p></figure>\n");
        return;
    }
    let (w, h, left, bottom, top) = (960.0, 240.0, 50.0, 30.0, 10.0);
    let plot_w = w - left - 10.0;
    let plot_h = h - bottom - top;
    let max = c
        .buckets
        .iter()
        .map(|(_, r)| r.iter().sum::<u64>())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let step = plot_w / c.buckets.len() as f64;
    let bar = (step * 0.85).max(1.0);
    let _ = writeln!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\">"
    );
    // Axes and three y ticks.
    let base = top + plot_h;
    let _ = writeln!(
        o,
        "<line x1=\"{left}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"#999\"/>",
        w - 10.0
    );
    for frac in [0.0, 0.5, 1.0] {
        let y = base - plot_h * frac;
        let _ = writeln!(
            o,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eee\"/>",
            left - 4.0,
            y + 4.0,
            (max * frac).round() as u64,
            w - 10.0
        );
    }
    for (b, (start, row)) in c.buckets.iter().enumerate() {
        let x = left + step * b as f64;
        let mut y = base;
        for (i, n) in row.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            let bh = plot_h * (*n as f64) / max;
            y -= bh;
            let name = &c.series[i];
            let _ = writeln!(
                o,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar:.1}\" height=\"{bh:.1}\" fill=\"{}\" data-chart=\"{family}\" data-series=\"{}\" data-bucket=\"{}\" data-count=\"{n}\"><title>{} {}: {n}</title></rect>",
                colour(name, i),
                esc(name),
                esc(start),
                esc(start),
                esc(name)
            );
        }
    }
    // First, middle and last bucket times under the axis.
    let n = c.buckets.len();
    let mut marks = vec![0, n / 2, n - 1];
    marks.dedup();
    for b in marks {
        let x = left + step * b as f64 + bar / 2.0;
        let anchor = if b == 0 {
            "start"
        } else if b == n - 1 {
            "end"
        } else {
            "middle"
        };
        let _ = writeln!(
            o,
            "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"{anchor}\">{}</text>",
            base + 16.0,
            esc(&c.buckets[b].0)
        );
    }
    o.push_str("</svg>\n<ul class=\"legend\">\n");
    for (i, name) in c.series.iter().enumerate() {
        let _ = writeln!(
            o,
            "<li data-chart=\"{family}\" data-series=\"{}\" data-total=\"{}\"><span style=\"background:{}\"></span>{} ({})</li>",
            esc(name),
            c.totals[i],
            colour(name, i),
            esc(name),
            c.totals[i]
        );
    }
    let _ = writeln!(
        o,
        "</ul><figcaption>{} bucket(s) of {} s</figcaption></figure>",
        c.buckets.len(),
        c.width_secs
    );
}

fn users(o: &mut String, s: &Summary) {
    if s.top_users.is_empty() {
        return;
    }
    o.push_str("<h2>Who used EWS, from where, for what</h2>\n<table id=\"top-users\">\n<tr><th>user</th><th>requests</th><th>refused</th><th>groups</th><th>sources</th><th>operations</th></tr>\n");
    for (u, r) in &s.top_users {
        let _ = writeln!(
            o,
            "<tr data-user=\"{}\" data-requests=\"{}\"><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(u),
            r.requests,
            esc(u),
            r.requests,
            r.refused,
            esc(&join(&r.groups.names, r.groups.more)),
            esc(&join(&r.sources.names, r.sources.more)),
            esc(&join(&r.operations.names, r.operations.more))
        );
    }
    o.push_str("</table>\n");
}

fn join(names: &[String], more: bool) -> String {
    let mut s = names.join(", ");
    if more {
        s.push_str(", …");
    }
    s
}

fn refused(o: &mut String, s: &Summary) {
    if !s.top_refused_users.is_empty() {
        o.push_str("<h2>Top refused users</h2>\n<table id=\"top-refused-users\">\n<tr><th>user</th><th>refused</th><th>of requests</th></tr>\n");
        for (u, r) in &s.top_refused_users {
            let _ = writeln!(
                o,
                "<tr data-user=\"{}\" data-refused=\"{}\"><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                esc(u),
                r.refused,
                esc(u),
                r.refused,
                r.requests
            );
        }
        o.push_str("</table>\n");
    }
    if !s.top_refused_sources.is_empty() {
        o.push_str("<h2>Top refused sources</h2>\n<table id=\"top-refused-sources\">\n<tr><th>source</th><th>group</th><th>refused</th><th>of requests</th><th>users</th></tr>\n");
        for (a, r) in &s.top_refused_sources {
            let _ = writeln!(
                o,
                "<tr data-source=\"{}\" data-refused=\"{}\"><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
                esc(a),
                r.refused,
                esc(a),
                esc(r.group.as_deref().unwrap_or("-")),
                r.refused,
                r.requests,
                esc(&join(&r.users.names, r.users.more))
            );
        }
        o.push_str("</table>\n");
    }
}

fn detections(o: &mut String, s: &Summary) {
    o.push_str("<h2>Detections</h2>\n");
    if s.detections.is_empty() {
        o.push_str("<p id=\"no-detections\">None fired.</p>\n");
        return;
    }
    o.push_str("<table id=\"detections\">\n");
    for (k, n) in sorted(&s.detections) {
        let _ = writeln!(
            o,
            "<tr data-detection=\"{}\" data-count=\"{n}\"><td>{}</td><td class=\"n\">{n}</td></tr>",
            esc(&k),
            esc(&k)
        );
    }
    o.push_str("</table>\n<h3>Most recent</h3>\n<table id=\"recent-detections\">\n<tr><th>time</th><th>detection</th><th>severity</th><th>subject</th><th>action</th></tr>\n");
    for d in &s.recent_detections {
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&d.time),
            esc(&d.detection),
            esc(&d.severity),
            esc(&d.subject),
            esc(&d.action)
        );
    }
    o.push_str("</table>\n");
}

fn garbage(o: &mut String, s: &Summary) {
    if s.garbage.lines == 0 {
        return;
    }
    o.push_str("<h2>Lines that are not audit lines</h2>\n<table id=\"garbage\">\n");
    for (why, n) in &s.garbage.by_reason {
        let _ = writeln!(
            o,
            "<tr data-key=\"{}\" data-count=\"{n}\"><td>{}</td><td class=\"n\">{n}</td></tr>",
            esc(why),
            esc(why)
        );
    }
    o.push_str("</table>\n<ul>\n");
    for e in &s.garbage.examples {
        let _ = writeln!(o, "<li>{}</li>", esc(e));
    }
    o.push_str("</ul>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::report::{Options, Report};

    #[test]
    fn hostile_names_stay_text() {
        let mut r = Report::new(Options::default());
        r.read(
            "t",
            br#"{"time":"2026-11-23T12:00:00Z","decision":"deny","user":"<script>alert(1)</script>\"'","source":"203.0.113.9","source_group":"<b>"}"#
                .as_slice(),
        )
        .unwrap();
        let page = html(&r.summary());
        assert!(!page.contains("<script"));
        assert!(!page.contains("<b>"));
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;"));
        // Nothing is loaded from anywhere: the SVG namespace is the only URL.
        for needle in ["src=", "href=", "url(", "@import", "<script", "<link"] {
            assert!(!page.contains(needle), "{needle}");
        }
        assert_eq!(
            page.matches("://").count(),
            page.matches("\"http://www.w3.org/2000/svg\"").count()
        );
    }
}
