//! Path normalisation before any decision. IIS in front of Exchange decodes percent
//! escapes, ignores case, maps `\` to `/`, folds dot segments and strips trailing dots and
//! spaces from names, so ewsgate judges the path the way IIS will read it, and forwards
//! that normalised path rather than the client's spelling.

use percent_encoding::percent_decode_str;

/// The one path that is EWS SOAP.
pub const EWS: &str = "/ews/exchange.asmx";
/// The path forwarded for it (IIS is case-insensitive; Exchange's own spelling).
pub const EWS_CANONICAL: &str = "/EWS/Exchange.asmx";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path does not start with /")]
    NotAbsolute,
    #[error("path has an invalid or double percent escape")]
    BadEscape,
    #[error("path holds a control character, ':', '?' or '#'")]
    BadCharacter,
    #[error("path climbs above the root")]
    AboveRoot,
}

/// Decodes, lower-cases and folds a request path (without its query).
pub fn normalise(raw: &str) -> Result<String, PathError> {
    match plain(raw) {
        Some(path) => Ok(path),
        None => fold(raw),
    }
}

/// A path with nothing to decode or fold (`/EWS/Exchange.asmx`, as every client sends it)
/// only needs lower-casing: segments of letters, digits, `-`, `_` and inner dots, none
/// empty and none ending in a dot. Anything else takes the full walk in `fold`.
fn plain(raw: &str) -> Option<String> {
    let rest = raw.strip_prefix('/')?;
    let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    let plain = rest
        .split('/')
        .all(|s| !s.is_empty() && !s.ends_with('.') && s.bytes().all(ok));
    plain.then(|| raw.to_ascii_lowercase())
}

fn fold(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| PathError::BadEscape)?;
    // IIS refuses double escaping by default; so does ewsgate, rather than guess.
    if has_escape(&decoded) || (decoded.contains('%') && raw.contains("%25")) {
        return Err(PathError::BadEscape);
    }
    // A decoded `?` or `#` would end the forwarded path early: what is judged must be
    // what is forwarded.
    if decoded
        .chars()
        .any(|c| c.is_control() || matches!(c, ':' | '?' | '#'))
    {
        return Err(PathError::BadCharacter);
    }
    let lowered = decoded.replace('\\', "/").to_lowercase();
    let mut folded: Vec<&str> = Vec::new();
    for segment in lowered.split('/') {
        match segment.trim_end_matches(' ') {
            "" | "." => {}
            ".." => {
                if folded.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            // Windows ignores trailing dots and spaces: "exchange.asmx." is the same file.
            s => match s.trim_end_matches(['.', ' ']) {
                "" => {}
                name => folded.push(name),
            },
        }
    }
    let mut path = String::with_capacity(lowered.len());
    for s in &folded {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() || (lowered.ends_with('/') && !folded.is_empty()) {
        path.push('/');
    }
    Ok(path)
}

fn has_escape(s: &str) -> bool {
    let b = s.as_bytes();
    b.windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
}

/// A rule or limit path: exact, or a prefix when it ends with `*`.
pub fn matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => pattern == path,
    }
}

/// Paths under /ews/ other than the SOAP endpoint: REST photo, odata, mrsproxy, WSDL files.
pub fn under_ews(path: &str) -> bool {
    path == "/ews" || path == "/ews/" || path.starts_with("/ews/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_the_ews_endpoint_normalise_to_one() {
        for raw in [
            "/EWS/Exchange.asmx",
            "/ews/exchange.asmx",
            "/EWS/%45xchange.asmx",
            "//EWS///Exchange.asmx",
            "/EWS/./Exchange.asmx",
            "/OWA/../EWS/Exchange.asmx",
            "/EWS\\Exchange.asmx",
            "/EWS/Exchange.asmx.",
            "/EWS/Exchange.asmx. .",
            "/x/y/../../EWS/Exchange.asmx",
        ] {
            assert_eq!(normalise(raw).as_deref(), Ok(EWS), "{raw}");
        }
    }

    #[test]
    fn hostile_paths_are_refused() {
        assert_eq!(normalise("EWS/Exchange.asmx"), Err(PathError::NotAbsolute));
        assert_eq!(
            normalise("/EWS/%2545xchange.asmx"),
            Err(PathError::BadEscape)
        );
        assert_eq!(
            normalise("/EWS/Exchange.asmx%00"),
            Err(PathError::BadCharacter)
        );
        assert_eq!(
            normalise("/EWS/Exchange.asmx::$DATA"),
            Err(PathError::BadCharacter)
        );
        assert_eq!(
            normalise("/../EWS/Exchange.asmx"),
            Err(PathError::AboveRoot)
        );
        assert_eq!(normalise("/EWS/%ff"), Err(PathError::BadEscape));
    }

    // Found by fuzzing (paths): a decoded `?` or `#` made the forwarded path read back as a
    // shorter path and a query, not the path that was judged.
    #[test]
    fn escaped_query_and_fragment_marks_are_refused() {
        for raw in [
            "/ews%3f/exchange.asmx",
            "/EWS%3F",
            "/owa/%23/x",
            "/x/ews/exchange.a%3Fsmx",
        ] {
            assert_eq!(normalise(raw), Err(PathError::BadCharacter), "{raw}");
        }
    }

    #[test]
    fn other_paths_keep_their_shape() {
        assert_eq!(normalise("/").as_deref(), Ok("/"));
        assert_eq!(normalise("/owa/").as_deref(), Ok("/owa/"));
        assert_eq!(
            normalise("/EWS/Services.wsdl").as_deref(),
            Ok("/ews/services.wsdl")
        );
        assert!(under_ews("/ews/services.wsdl"));
        assert!(!under_ews("/ewsx"));
        assert!(matches("/ews/*", "/ews/odata"));
        assert!(!matches("/ews/exchange.asmx", "/ews/exchange.asmx2"));
    }

    #[test]
    fn the_plain_path_shortcut_agrees_with_the_full_walk() {
        // Every path over a small alphabet that holds each kind of trouble, up to 5 long.
        let alphabet = ['/', 'a', 'E', '.', '-', '_', ' ', '%', '2', 'e', '\\', ':'];
        let mut level = vec![String::new()];
        let mut paths = Vec::new();
        for _ in 0..5 {
            level = level
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            paths.extend(level.iter().cloned());
        }
        let mut shortcut = 0;
        for p in &paths {
            let raw = format!("/{p}");
            if let Some(fast) = plain(&raw) {
                shortcut += 1;
                assert_eq!(Ok(fast), fold(&raw), "{raw:?}");
            }
        }
        assert!(shortcut > 1000, "{shortcut}");
    }
}
