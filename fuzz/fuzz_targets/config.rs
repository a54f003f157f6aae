//! The configuration loader (`Config::parse_with`), on arbitrary text at a fixed path, with
//! the files it may name held in memory (a config bundle, as the proxy reads it): those of
//! `config/` beside this crate, under the fixed path's directory. Nothing is read from disk.
//!
//! Properties beyond "no panic": parsing is deterministic, and every error names the
//! fixed path and a line and column inside the text.
#![no_main]

use std::{collections::BTreeMap, path::Path, sync::LazyLock};

use ewsgate::config::{Bundle, Config, ConfigError};
use libfuzzer_sys::fuzz_target;

const PATH: &str = "/etc/ewsgate/ewsgate.toml";

static FILES: LazyLock<BTreeMap<std::path::PathBuf, Vec<u8>>> = LazyLock::new(|| {
    let dir = Path::new(PATH).parent().unwrap();
    let file = |name: &str, bytes: &[u8]| (dir.join(name), bytes.to_vec());
    BTreeMap::from([
        file("offices.txt", include_bytes!("../config/offices.txt")),
        file(
            "salesforce-ip-ranges.json",
            include_bytes!("../config/salesforce-ip-ranges.json"),
        ),
        file(
            "entra-jwks.json",
            include_bytes!("../config/entra-jwks.json"),
        ),
        file(
            "tls/mail.example.org.pem",
            include_bytes!("../keys/signer.pem"),
        ),
        file(
            "tls/mail.example.org.key",
            include_bytes!("../keys/signer.key"),
        ),
        file("tls/exchange-ca.pem", include_bytes!("../keys/signer.pem")),
        file(
            "tls/exchange-auth.pem",
            include_bytes!("../keys/signer.pem"),
        ),
        file("tls/phones-ca.pem", include_bytes!("../keys/signer.pem")),
    ])
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new(PATH);
    let bundle = Bundle {
        path: path.to_path_buf(),
        text: text.to_string(),
        files: FILES.clone(),
    };
    let first = Config::from_bundle(&bundle);
    let second = Config::parse_with(path, text, &bundle);
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
