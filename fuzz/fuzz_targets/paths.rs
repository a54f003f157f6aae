//! Path normalisation (`model::paths::normalise`), on request paths as a client writes them.
//!
//! Properties beyond "no panic", for every path that normalises:
//! - normalising is idempotent: the normalised path normalises to itself;
//! - it is absolute, lower case, has no empty, `.` or `..` segment, no `\`, no control
//!   character or `:`, and no name ending in a dot or a space (IIS would strip them);
//! - what the proxy forwards is what it judged: as a request target, the normalised path
//!   is refused or reads back as the same path, with no query or fragment split off.
#![no_main]

use ewsgate::model::paths::{normalise, under_ews, EWS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(path) = normalise(raw) else {
        return;
    };
    assert!(path.starts_with('/'), "{path:?} is not absolute");
    assert_eq!(
        normalise(&path).as_deref(),
        Ok(path.as_str()),
        "normalising {raw:?} is not idempotent"
    );
    assert_eq!(path, path.to_lowercase(), "{path:?} is not lower case");
    assert!(
        !path.contains('\\') && !path.chars().any(|c| c.is_control() || c == ':'),
        "{path:?} holds a character normalise refuses"
    );
    let inner = path.strip_suffix('/').unwrap_or(&path);
    if !inner.is_empty() {
        for segment in inner[1..].split('/') {
            assert!(
                !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && !segment.ends_with(['.', ' ']),
                "{path:?} has segment {segment:?}"
            );
        }
    }
    if let Ok(uri) = path.parse::<http::Uri>() {
        assert_eq!(
            (uri.path(), uri.query()),
            (path.as_str(), None),
            "{raw:?} is judged as {path:?} but forwarded as {uri}"
        );
    }
    // The EWS endpoint is under /ews/ however it is spelt.
    if path == EWS {
        assert!(under_ews(&path));
    }
});
