//! Range feeds: Salesforce's `ip-ranges.json` read from a file (`feed`) or fetched over HTTPS
//! (`feed_url`, see `agent::feeds`), the `[feeds]` section, and the last good copy of each
//! fetched feed that the daemon keeps on disk and starts from.

use super::bundle::Files;
use std::{
    fmt, fs,
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use http::Uri;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use toml::Spanned;

use super::{parse_cidr, ConfigError, Locator};
use crate::model::agent::{Copy, CopyMeta, FeedFilter, FeedSettings, Held};

/// Why a feed document was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedError {
    /// Not JSON, not the feed's shape, or a prefix that does not parse.
    Parse(String),
    /// No prefix left after the filters.
    Empty,
}

impl fmt::Display for FeedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeedError::Parse(m) => f.write_str(m),
            FeedError::Empty => f.write_str("the feed holds no prefixes (after the filters)"),
        }
    }
}

/// Whether `filter` keeps `entry`.
fn wants(filter: &FeedFilter, entry: &FeedEntry) -> bool {
    fn one(list: &[String], value: &Option<String>) -> bool {
        list.is_empty()
            || value
                .as_ref()
                .is_some_and(|v| list.iter().any(|w| w.eq_ignore_ascii_case(v)))
    }
    one(&filter.regions, &entry.region)
        && one(&filter.providers, &entry.provider)
        && one(&filter.directions, &entry.direction)
}

#[derive(Deserialize)]
struct Feed {
    #[serde(default)]
    prefixes: Vec<FeedEntry>,
    #[serde(default)]
    ipv6_prefixes: Vec<FeedEntry>,
}

#[derive(Deserialize)]
struct FeedEntry {
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    direction: Option<String>,
    #[serde(default)]
    ip_prefix: Option<OneOrMany>,
    #[serde(default)]
    ipv6_prefix: Option<OneOrMany>,
}

/// Salesforce's feed gives arrays where AWS's schema has strings; accept both.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The prefixes of a Salesforce `ip-ranges.json` document that pass `filter`, sorted and
/// without duplicates. `origin` names the document in errors (a path or a URL).
pub fn parse_feed(origin: &str, text: &str, filter: &FeedFilter) -> Result<Vec<IpNet>, FeedError> {
    let feed: Feed = serde_json::from_str(text).map_err(|e| {
        FeedError::Parse(format!(
            "{origin}:{}:{}: not a Salesforce ip-ranges feed: {e}",
            e.line(),
            e.column()
        ))
    })?;
    let mut nets = Vec::new();
    for entry in feed.prefixes.iter().chain(&feed.ipv6_prefixes) {
        if !wants(filter, entry) {
            continue;
        }
        for p in [&entry.ip_prefix, &entry.ipv6_prefix].into_iter().flatten() {
            let list = match p {
                OneOrMany::One(s) => std::slice::from_ref(s),
                OneOrMany::Many(v) => v.as_slice(),
            };
            for s in list {
                nets.push(parse_cidr(s).map_err(|m| FeedError::Parse(format!("{origin}: {m}")))?);
            }
        }
    }
    if nets.is_empty() {
        return Err(FeedError::Empty);
    }
    nets.sort();
    nets.dedup();
    Ok(nets)
}

/// A feed file named by `feed`.
pub(super) fn read_feed(
    path: &Path,
    bytes: &[u8],
    filter: &FeedFilter,
) -> Result<Vec<IpNet>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8", path.display()))?;
    parse_feed(&path.display().to_string(), text, filter).map_err(|e| match e {
        FeedError::Empty => format!("{}: {e}", path.display()),
        FeedError::Parse(m) => m,
    })
}

/// The on-disk envelope: the document exactly as served, with its metadata.
#[derive(Serialize, Deserialize)]
struct LastGood<'a> {
    #[serde(flatten)]
    meta: CopyMeta,
    #[serde(borrow)]
    document: &'a RawValue,
}

/// `<state_dir>/<group>.json`.
pub fn copy_path(state_dir: &Path, group: &str) -> PathBuf {
    state_dir.join(format!("{group}.json"))
}

/// Reads a group's last good copy and applies the group's filters to it. Read through
/// `files`, so that the copy in force is part of the config's bundle.
pub fn load_copy(files: &dyn Files, state_dir: &Path, group: &str, filter: &FeedFilter) -> Copy {
    let path = copy_path(state_dir, group);
    let text = match files.read(&path).map(String::from_utf8) {
        Ok(Ok(t)) => t,
        Ok(Err(_)) => return Copy::Unreadable(format!("{}: not UTF-8", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Copy::None,
        Err(e) => return Copy::Unreadable(format!("{}: {e}", path.display())),
    };
    let envelope: LastGood = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return Copy::Unreadable(format!("{}: {e}", path.display())),
    };
    match parse_feed(&path.display().to_string(), envelope.document.get(), filter) {
        Ok(nets) => Copy::Held(Held {
            nets,
            meta: envelope.meta,
        }),
        Err(e) => Copy::Unreadable(e.to_string()),
    }
}

/// The bytes of a last good copy: the document as served, with its metadata.
pub fn copy_bytes(meta: &CopyMeta, document: &str) -> std::io::Result<Vec<u8>> {
    let document: &RawValue = serde_json::from_str(document).map_err(std::io::Error::other)?;
    serde_json::to_vec(&LastGood {
        meta: meta.clone(),
        document,
    })
    .map_err(std::io::Error::other)
}

/// Writes a group's last good copy atomically: a temporary file in the same directory,
/// synced, then renamed over the old copy.
pub fn save_copy(
    state_dir: &Path,
    group: &str,
    meta: &CopyMeta,
    document: &str,
) -> std::io::Result<()> {
    let text = copy_bytes(meta, document)?;
    fs::create_dir_all(state_dir)?;
    let path = copy_path(state_dir, group);
    let tmp = state_dir.join(format!(".{group}.json.tmp"));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, &path)?;
    fs::File::open(state_dir)?.sync_all()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFeeds {
    state_dir: Option<String>,
    refresh_secs: Option<Spanned<u64>>,
    timeout_ms: Option<Spanned<u64>>,
    max_bytes: Option<Spanned<u64>>,
    max_shrink: Option<Spanned<f64>>,
}

impl RawFeeds {
    pub(super) fn validate(self, here: &Locator) -> Result<FeedSettings, ConfigError> {
        let d = FeedSettings::default();
        let within = |v: &Option<Spanned<u64>>, name: &str, min: u64, max: u64| match v {
            Some(s) if !(min..=max).contains(s.get_ref()) => Err(here.at(
                s,
                format!("{name} = {}: must be {min}..={max}", s.get_ref()),
            )),
            Some(s) => Ok(Some(*s.get_ref())),
            None => Ok(None),
        };
        let refresh = within(&self.refresh_secs, "refresh_secs", 1, 7 * 86400)?;
        let timeout = within(&self.timeout_ms, "timeout_ms", 100, 300_000)?;
        let max_bytes = within(&self.max_bytes, "max_bytes", 1024, 256 << 20)?;
        let max_shrink = match &self.max_shrink {
            Some(s) if !(0.0..=1.0).contains(s.get_ref()) => {
                return Err(here.at(s, "max_shrink must be between 0.0 and 1.0"))
            }
            Some(s) => *s.get_ref(),
            None => d.max_shrink,
        };
        Ok(FeedSettings {
            state_dir: self.state_dir.map_or(d.state_dir, PathBuf::from),
            refresh: refresh.map_or(d.refresh, Duration::from_secs),
            timeout: timeout.map_or(d.timeout, Duration::from_millis),
            max_bytes: max_bytes.map_or(d.max_bytes, |b| b as usize),
            max_shrink,
            live: Vec::new(),
        })
    }
}

/// A group fed from a URL gives its name to a file: letters, digits, `-`, `_` and `.`.
pub(super) fn check_group_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "source group '{name}' has a feed_url: its name must be letters, digits, '-', '_' or '.' (it names the feed's state file)"
        ))
    }
}

/// `feed_url` must be `https://HOST[:PORT]/PATH`.
pub(super) fn check_feed_url(url: &str) -> Result<(), String> {
    let uri: Uri = url
        .parse()
        .map_err(|_| format!("feed_url '{url}' is not a URL"))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
        return Err(format!(
            "feed_url '{url}': expected https://HOST/PATH (feeds are fetched over HTTPS only)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"syncToken":"1","prefixes":[
        {"region":"us-east-1","provider":"aws","direction":"outbound","ip_prefix":["198.51.100.128/26","198.51.100.192/26"]},
        {"region":"eu-west-1","provider":"AWS","direction":"inbound","ip_prefix":"203.0.113.0/24"},
        {"region":"eu-west-1","ip_prefix":"192.0.2.0/25"}],
        "ipv6_prefixes":[{"region":"us-east-1","provider":"aws","direction":"outbound","ipv6_prefix":["2001:db8:200::/48"]},
        {"region":"eu-west-1","ipv6_prefix":"2001:db8:300::/48"}]}"#;

    fn filter(regions: &[&str], providers: &[&str], directions: &[&str]) -> FeedFilter {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        FeedFilter {
            regions: v(regions),
            providers: v(providers),
            directions: v(directions),
        }
    }

    fn count(f: &FeedFilter) -> usize {
        parse_feed("t", DOC, f).map_or(0, |n| n.len())
    }

    #[test]
    fn filters_on_region_provider_and_direction() {
        assert_eq!(count(&FeedFilter::default()), 6);
        assert_eq!(count(&filter(&["us-east-1"], &[], &[])), 3);
        // Case does not matter; entries without the field are dropped once it is filtered.
        assert_eq!(count(&filter(&[], &["aws"], &[])), 4);
        assert_eq!(count(&filter(&[], &[], &["Outbound"])), 3);
        assert_eq!(count(&filter(&["eu-west-1"], &["aws"], &["inbound"])), 1);
        assert_eq!(
            parse_feed("t", DOC, &filter(&["ap-south-1"], &[], &[])),
            Err(FeedError::Empty)
        );
    }

    #[test]
    fn bad_documents_are_refused_with_their_place() {
        let e = parse_feed(
            "https://x/f.json",
            "{\"prefixes\": [",
            &FeedFilter::default(),
        );
        assert!(
            matches!(&e, Err(FeedError::Parse(m)) if m.starts_with("https://x/f.json:1:")),
            "{e:?}"
        );
        let e = parse_feed(
            "f",
            r#"{"prefixes":[{"ip_prefix":"198.51.100.7/24"}]}"#,
            &FeedFilter::default(),
        );
        assert!(
            matches!(&e, Err(FeedError::Parse(m)) if m.contains("198.51.100.0/24")),
            "{e:?}"
        );
        let e = parse_feed(
            "f",
            r#"{"prefixes":[{"ip_prefix":42}]}"#,
            &FeedFilter::default(),
        );
        assert!(matches!(e, Err(FeedError::Parse(_))));
        assert_eq!(
            parse_feed("f", "{}", &FeedFilter::default()),
            Err(FeedError::Empty)
        );
    }

    #[test]
    fn last_good_copies_round_trip() {
        let dir = std::env::temp_dir().join(format!("ewsgate-feedcopy-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(
            load_copy(
                &crate::config::Disk::default(),
                &dir,
                "sf",
                &FeedFilter::default()
            ),
            Copy::None
        );
        let meta = CopyMeta {
            url: "https://feeds.example/ip-ranges.json".into(),
            etag: Some("\"v1\"".into()),
            last_modified: None,
            fetched: 1_795_435_200,
        };
        save_copy(&dir, "sf", &meta, DOC).unwrap();
        match load_copy(
            &crate::config::Disk::default(),
            &dir,
            "sf",
            &filter(&["us-east-1"], &[], &[]),
        ) {
            Copy::Held(h) => {
                assert_eq!(h.nets.len(), 3);
                assert_eq!(h.meta, meta);
            }
            other => panic!("{other:?}"),
        }
        fs::write(copy_path(&dir, "sf"), "{\"url\":").unwrap();
        assert!(matches!(
            load_copy(
                &crate::config::Disk::default(),
                &dir,
                "sf",
                &FeedFilter::default()
            ),
            Copy::Unreadable(_)
        ));
        assert!(save_copy(&dir, "sf", &meta, "not json").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_and_urls() {
        assert!(check_group_name("salesforce-us.1").is_ok());
        for bad in ["", "../x", ".hidden", "a/b", "a b"] {
            assert!(check_group_name(bad).is_err(), "{bad}");
        }
        assert!(check_feed_url("https://ip-ranges.example.com/ip-ranges.json").is_ok());
        assert!(check_feed_url("http://ip-ranges.example.com/ip-ranges.json").is_err());
        assert!(check_feed_url("ip-ranges.json").is_err());
    }
}
