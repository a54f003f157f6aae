//! The configuration loader (`Config::parse`), on arbitrary text at a fixed path whose
//! directory (`config/` beside this crate) holds the files an example configuration names.
//!
//! Properties beyond "no panic": parsing is deterministic, and every error names the
//! fixed path and a line and column inside the text.
#![no_main]

use std::path::{Component, Path};

use ewsgate::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/ewsgate.toml");

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if reads_outside(text) {
        return;
    }
    let path = Path::new(PATH);
    let first = Config::parse(path, text);
    let second = Config::parse(path, text);
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "parsing is not deterministic"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("parsing is not deterministic"),
    }
    match first {
        Ok(c) => assert_eq!(c.path, path),
        Err(ConfigError::At {
            path: p,
            line,
            column,
            ..
        }) => {
            assert_eq!(p, PATH);
            let lines = text.split('\n').count();
            assert!((1..=lines).contains(&line), "line {line} of {lines}");
            let width = text.split('\n').nth(line - 1).map_or(0, str::len);
            assert!(
                (1..=width + 1).contains(&column),
                "column {column} of {width}"
            );
        }
        Err(e @ ConfigError::Read { .. }) => panic!("parse read its own file: {e}"),
    }
});

/// Whether the text names a CIDR file or feed outside the fixed directory (the loader
/// reads those; `/dev/zero` would never end). Text that is not TOML reads nothing.
fn reads_outside(text: &str) -> bool {
    let Ok(doc) = text.parse::<toml::Table>() else {
        return false;
    };
    let Some(sources) = doc.get("sources").and_then(|s| s.as_table()) else {
        return false;
    };
    let outside = |v: &toml::Value| {
        v.as_str().is_some_and(|f| {
            Path::new(f)
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        })
    };
    sources.values().filter_map(|s| s.as_table()).any(|s| {
        s.get("feed").is_some_and(outside)
            || s.get("files")
                .and_then(|f| f.as_array())
                .is_some_and(|f| f.iter().any(outside))
    })
}
