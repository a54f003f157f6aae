//! Request filter: the head, read once. Framing, `Host` and the request-target, the path
//! as IIS reads it, the query string, and the `Authorization` header's scheme. Nothing here
//! waits on anything: a request that fails here is refused before any other phase.

use std::borrow::Cow;

use bytes::Bytes;

use crate::{
    identity::auth::{self, Credential},
    model::paths,
    proxy::{
        context::{Ctx, Refusal},
        h1::{has_token, Framing, HeadError, RequestHead},
        state::State,
    },
};

/// What the later phases need of the head.
pub struct Req {
    pub head: RequestHead,
    pub framing: Framing,
    pub credential: Credential,
    /// The client asked to close after this request.
    pub close: bool,
}

pub fn run(state: &State, raw: Bytes, ctx: &mut Ctx) -> Result<Req, Refusal> {
    let limits = &state.settings.limits;
    let head = RequestHead::parse(raw, limits.header_count).map_err(protocol)?;
    ctx.method = method_text(head.method());
    ctx.user_agent = head.fields.text("user-agent").map(|s| first_chars(s, 256));
    check_method_and_upgrade(&head)?;
    let target = Target::read(head.target()).inspect_err(|_| {
        ctx.path = head.target().chars().take(512).collect();
    })?;
    let path = paths::normalise(target.path).map_err(|e| {
        ctx.path = target.path.chars().take(512).collect();
        Refusal::protocol(400, format!("path: {e}"))
    })?;
    ctx.ews = ctx.method == "POST" && path == paths::EWS;
    ctx.path = path;
    // From here a refusal on the EWS path is a SOAP fault: framing refusals too.
    let framing = head.framing.map_err(protocol)?;
    check_host(&head, target.authority, state)?;
    ctx.forwarded = Some(forwarded(ctx, target.query, state)?);
    let credential = authorization(&head)?;
    ctx.auth = credential.kind();
    let close = wants_close(&head);
    Ok(Req {
        head,
        framing,
        credential,
        close,
    })
}

/// The first `n` characters of a text. One of at most `n` bytes has at most `n`
/// characters: it is copied whole, without walking its characters one by one.
fn first_chars(text: &str, n: usize) -> String {
    match text.len() <= n {
        true => text.to_string(),
        false => text.chars().take(n).collect(),
    }
}

/// The method as the audit line and Exchange see it. The common ones are constants, so
/// that a request's method costs no allocation.
fn method_text(method: &str) -> Cow<'static, str> {
    const KNOWN: [&str; 7] = ["POST", "GET", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"];
    match KNOWN.iter().find(|k| **k == method) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(method.to_string()),
    }
}

fn protocol(e: HeadError) -> Refusal {
    Refusal::protocol(400, e.0)
}

/// The request-target split: an absolute form's authority, the path, the query.
struct Target<'a> {
    authority: Option<&'a str>,
    path: &'a str,
    query: Option<&'a str>,
}

impl<'a> Target<'a> {
    fn read(target: &'a str) -> Result<Target<'a>, Refusal> {
        if target.contains('#') {
            return Err(Refusal::protocol(400, "fragment_in_target"));
        }
        let (authority, rest) = match scheme_rest(target) {
            Some(rest) => {
                let end = rest.find(['/', '?']).unwrap_or(rest.len());
                let (authority, rest) = rest.split_at(end);
                (Some(authority), if rest.is_empty() { "/" } else { rest })
            }
            None => (None, target),
        };
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        Ok(Target {
            authority,
            path,
            query,
        })
    }
}

/// `http://` or `https://` (any case): the rest of an absolute-form target.
fn scheme_rest(target: &str) -> Option<&str> {
    for scheme in ["http://", "https://"] {
        if target.len() >= scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Some(&target[scheme.len()..]);
        }
    }
    None
}

fn check_method_and_upgrade(head: &RequestHead) -> Result<(), Refusal> {
    if head.method() == "CONNECT" {
        return Err(Refusal::protocol(405, "connect_method"));
    }
    if head.fields.get("upgrade").is_some() {
        return Err(Refusal::protocol(400, "upgrade"));
    }
    Ok(())
}

/// RFC 9112 §3.2: exactly one `Host`; it, and an absolute-form authority, must name the
/// gate, so that a request meant for another site behind the same address is not judged
/// here as if it were EWS.
fn check_host(head: &RequestHead, authority: Option<&str>, state: &State) -> Result<(), Refusal> {
    let Some(host) = only(head, "host", "duplicate_host")? else {
        return Err(Refusal::protocol(400, "missing_host"));
    };
    let host = std::str::from_utf8(host).unwrap_or("");
    if !names_gate(host, state) {
        return Err(Refusal::protocol(400, "host_not_this_gate"));
    }
    if let Some(a) = authority {
        if !names_gate(a, state) {
            return Err(Refusal::protocol(400, "target_not_this_gate"));
        }
    }
    Ok(())
}

/// `name` or `name:port`, where the name is one the gate answers to and the port (if any)
/// one it listens on.
fn names_gate(authority: &str, state: &State) -> bool {
    if authority.contains('@') || authority.is_empty() {
        return false;
    }
    let (name, port) = split_port(authority);
    let port_ok = match port {
        None => true,
        Some(p) => p
            .parse::<u16>()
            .is_ok_and(|p| state.settings.listen.iter().any(|l| l.port() == p)),
    };
    port_ok && state.names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

fn split_port(authority: &str) -> (&str, Option<&str>) {
    if let Some(end) = authority.strip_prefix('[').and_then(|r| r.find(']')) {
        let end = end + 1;
        let rest = &authority[end + 1..];
        return (&authority[..=end], rest.strip_prefix(':'));
    }
    match authority.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (authority, None),
    }
}

/// What Exchange is sent as the request-target: the EWS endpoint in its canonical
/// spelling, other paths as normalised; the query only where it is allowed.
fn forwarded(ctx: &Ctx, query: Option<&str>, state: &State) -> Result<Cow<'static, str>, Refusal> {
    let path = if ctx.ews {
        paths::EWS_CANONICAL
    } else {
        ctx.path.as_str()
    };
    let Some(q) = query else {
        return Ok(match ctx.ews {
            true => Cow::Borrowed(paths::EWS_CANONICAL),
            false => Cow::Owned(path.to_string()),
        });
    };
    if ctx.ews && !state.settings.ews_query {
        return Err(Refusal::protocol(400, "ews_query_string"));
    }
    Ok(Cow::Owned(format!("{path}?{q}")))
}

/// The value of a header that may appear at most once, found in one pass over the fields
/// (it stops at a second one, which is refused with `duplicate`).
fn only<'h>(
    head: &'h RequestHead,
    name: &'h str,
    duplicate: &'static str,
) -> Result<Option<&'h [u8]>, Refusal> {
    let mut values = head.fields.all(name);
    let first = values.next();
    match values.next() {
        Some(_) => Err(Refusal::protocol(400, duplicate)),
        None => Ok(first),
    }
}

fn authorization(head: &RequestHead) -> Result<Credential, Refusal> {
    match auth::classify(only(head, "authorization", "duplicate_authorization")?) {
        Credential::Invalid(reason) => Err(Refusal::protocol(400, reason)),
        c => Ok(c),
    }
}

fn wants_close(head: &RequestHead) -> bool {
    let connection = |token: &[u8]| head.fields.all("connection").any(|v| has_token(v, token));
    match head.minor {
        0 => !connection(b"keep-alive"),
        _ => connection(b"close"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_split_their_port() {
        assert_eq!(split_port("mail.example.org"), ("mail.example.org", None));
        assert_eq!(
            split_port("mail.example.org:443"),
            ("mail.example.org", Some("443"))
        );
        assert_eq!(
            split_port("[2001:db8::1]:443"),
            ("[2001:db8::1]", Some("443"))
        );
        assert_eq!(split_port("[2001:db8::1]"), ("[2001:db8::1]", None));
        assert_eq!(scheme_rest("HTTPS://a/b"), Some("a/b"));
        assert_eq!(scheme_rest("/a"), None);
    }

    #[test]
    fn texts_are_cut_to_their_first_characters() {
        let long = "é".repeat(300);
        for (text, n) in [("", 3), ("abc", 3), ("abcd", 3), ("éé", 3), ("ééé", 2)] {
            assert_eq!(
                first_chars(text, n),
                text.chars().take(n).collect::<String>()
            );
        }
        assert_eq!(first_chars(&long, 256), "é".repeat(256));
    }

    #[test]
    fn methods_are_kept_as_sent() {
        for m in ["POST", "GET", "HEAD", "PROPFIND", "post", ""] {
            assert_eq!(method_text(m), m);
        }
        assert!(matches!(method_text("POST"), Cow::Borrowed(_)));
    }
}
