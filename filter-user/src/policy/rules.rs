//! The request rules: ordered, first match wins, default deny. A rule names conditions on
//! the source group, the authentication, the token family, the path, the user and the time
//! of day; every empty condition means "any".

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use crate::{
    model::{
        auth::{AuthKind, TokenKind},
        ews::{DataSet, OpInfo, Shape},
        packet::{v4_prefixes, v6_prefixes},
        rules::{Action, Inspect, OpMatch, Rule, Scope},
        Config,
    },
    policy::content::{Access, Touch},
    soap,
};

/// What a request is judged on.
#[derive(Debug, Clone)]
pub struct Subject<'a> {
    pub group: Option<&'a str>,
    pub auth: AuthKind,
    pub token: Option<TokenKind>,
    pub path: &'a str,
    /// `POST /EWS/Exchange.asmx`: a rule without `paths` applies to this alone.
    pub ews: bool,
    pub user: Option<&'a str>,
    /// An NTLM or Negotiate leg that carries no user yet (Type 1): Exchange answers it
    /// with a challenge only, so a `users` condition is judged on the Type 3 leg instead.
    pub handshake: bool,
    pub when: LocalTime,
    /// What the SOAP body showed; `None` before it is read, and for other paths.
    pub content: Option<Content<'a>>,
}

/// An EWS request's content, as the rules judge it.
#[derive(Debug, Clone)]
pub struct Content<'a> {
    pub request: &'a soap::Request,
    pub info: Option<OpInfo>,
    pub touch: Touch,
    pub access: &'a Access,
    /// The item a verified callback token names.
    pub token_item: Option<&'a str>,
    /// The items the request's attachments belong to, where ewsgate knows them.
    pub roots: Vec<Option<&'a str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// 0 = Monday.
    pub weekday: u8,
    pub minute: u16,
}

impl LocalTime {
    pub fn at(unix_secs: i64, utc_offset_minutes: i32) -> LocalTime {
        let local = unix_secs + i64::from(utc_offset_minutes) * 60;
        let days = local.div_euclid(86_400);
        LocalTime {
            // 1970-01-01 was a Thursday.
            weekday: (days + 3).rem_euclid(7) as u8,
            minute: (local.rem_euclid(86_400) / 60) as u16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The rule that matched; `None` is the default deny.
    pub rule: Option<Arc<str>>,
    /// Set when the response must be inspected under the rule's data types and scope.
    pub inspect: Option<Inspect>,
}

/// Which rules take part in a judgment: the enforced ones, or every rule (report-only
/// rules included) for the report a rollout reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Enforced,
    Report,
}

/// The rules whose head conditions (group, auth, token, path, user, time) match, in order,
/// up to and including the first that decides without looking at content. Computed once
/// per request; the body, when it is read, is judged against these alone.
///
/// In the report pass, a report-only allow rule whose head matches decides too: it is the
/// rule being rolled out for these callers, and what it would not allow is what the report
/// must show, rather than falling through to the rule it is meant to replace.
pub fn candidates(rules: &[Rule], s: &Subject, pass: Pass) -> Vec<usize> {
    candidates_traced(rules, s, pass, &mut ())
}

/// `candidates`, telling `trace` what each rule it looked at did. The request path passes
/// `()`, whose notes compile to nothing: explain and the proxy share this one walk.
pub fn candidates_traced(
    rules: &[Rule],
    s: &Subject,
    pass: Pass,
    trace: &mut impl Trace,
) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        if pass == Pass::Enforced && r.report {
            trace.note(i, Step::ReportOnly);
            continue;
        }
        if let Some(miss) = head_miss(r, s) {
            trace.note(i, Step::Head(miss));
            continue;
        }
        trace.note(i, Step::Candidate);
        out.push(i);
        let rolled_out = pass == Pass::Report && r.report && r.action == Action::Allow;
        if !r.judges_content() || rolled_out {
            break;
        }
    }
    out
}

pub fn decide(rules: &[Rule], s: &Subject) -> Decision {
    decide_among(rules, &candidates(rules, s, Pass::Report), s)
}

/// The first candidate that matches `s` (its content too, when it has some) decides.
pub fn decide_among(rules: &[Rule], candidates: &[usize], s: &Subject) -> Decision {
    decide_among_traced(rules, candidates, s, &mut ())
}

/// `decide_among`, telling `trace` why each candidate it judged did or did not decide.
pub fn decide_among_traced(
    rules: &[Rule],
    candidates: &[usize],
    s: &Subject,
    trace: &mut impl Trace,
) -> Decision {
    for &i in candidates {
        let Some(r) = rules.get(i) else {
            continue;
        };
        let provisional = match &s.content {
            Some(c) => match content_fit(r, c) {
                Err(miss) => {
                    trace.note(i, Step::Content(miss));
                    continue;
                }
                Ok(fit) => fit == Fit::Provisional,
            },
            None if r.judges_content() => {
                trace.note(i, Step::NeedsContent);
                continue;
            }
            None => false,
        };
        trace.note(i, Step::Matched { provisional });
        let inspect = (r.action == Action::Allow)
            .then(|| inspection(r, s, provisional))
            .flatten();
        return Decision {
            action: r.action,
            rule: Some(r.name.clone()),
            inspect,
        };
    }
    Decision {
        action: Action::Deny,
        rule: None,
        inspect: None,
    }
}

/// Receives what the rule walk found for each rule it looked at, in order.
pub trait Trace {
    fn note(&mut self, rule: usize, step: Step);
}

/// The request path's trace: nothing.
impl Trace for () {
    #[inline(always)]
    fn note(&mut self, _rule: usize, _step: Step) {}
}

/// What one rule did in a judgment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A report-only rule, left out of the enforced judgment.
    ReportOnly,
    /// A head condition failed.
    Head(Miss),
    /// The head matched: the rule takes part in the judgment.
    Candidate,
    /// A content condition failed.
    Content(Miss),
    /// The rule judges content and there is none (not the EWS endpoint, or before the body).
    NeedsContent,
    /// The rule decided.
    Matched { provisional: bool },
}

/// The first condition of a rule that a request did not meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    Group,
    Auth,
    Token,
    Path,
    User,
    Day,
    Hours,
    Operation,
    Impersonation,
    Delegate,
    TokenScope,
    Data,
}

/// Before the body is read: could any rule allow this request? A deny rule that judges no
/// content ends the search, as it would after the body.
pub fn may_allow(rules: &[Rule], s: &Subject) -> bool {
    may_allow_among(rules, &candidates(rules, s, Pass::Report))
}

pub fn may_allow_among(rules: &[Rule], candidates: &[usize]) -> bool {
    candidates
        .iter()
        .filter_map(|&i| rules.get(i))
        .any(|r| r.action == Action::Allow)
}

/// Whether a rule matched for sure, or only once the response shows the data types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    Yes,
    Provisional,
}

fn content_fit(r: &Rule, c: &Content) -> Result<Fit, Miss> {
    let op = c.request.operation.as_str();
    let named = |class| {
        r.operations.iter().any(|m| match m {
            OpMatch::Name(n) => n == op,
            OpMatch::Class(k) => Some(*k) == class,
        })
    };
    let class = c.info.map(|i| i.class);
    let op_ok = if r.operations.is_empty() {
        class.is_some_and(|k| !k.restricted())
    } else {
        named(class)
    };
    if !op_ok {
        return Err(Miss::Operation);
    }
    if c.access.impersonation.is_some() && !r.impersonation {
        return Err(Miss::Impersonation);
    }
    if c.access.delegate.is_some() && !r.delegate {
        return Err(Miss::Delegate);
    }
    if r.scope == Some(Scope::TokenItem) && !in_token_scope(c) {
        return Err(Miss::TokenScope);
    }
    let Some(allowed) = r.data else {
        return Ok(Fit::Yes);
    };
    let reveals = c.info.is_some_and(|i| i.shape == Shape::Items);
    match (r.action, c.touch.unresolved) {
        // A deny rule for a type matches whatever might be of that type.
        (Action::Deny, true) => Ok(Fit::Yes),
        (Action::Deny, false) if c.touch.data.intersects(allowed) => Ok(Fit::Yes),
        (Action::Allow, true) if reveals => Ok(Fit::Provisional),
        (Action::Allow, false) if c.touch.data.within(allowed) => Ok(Fit::Yes),
        _ => Err(Miss::Data),
    }
}

/// Only the token's item and that item's attachments; no folders, no other mailbox.
fn in_token_scope(c: &Content) -> bool {
    let Some(item) = c.token_item else {
        return false;
    };
    c.request.folders.is_empty()
        && c.access == &Access::default()
        && c.request.items.iter().all(|i| i == item)
        && c.roots.iter().all(|r| *r == Some(item))
}

/// Items are inspected under a rule with data types or a token scope, or when the request
/// matched only provisionally; folder listings under a rule with data types.
fn inspection(r: &Rule, s: &Subject, provisional: bool) -> Option<Inspect> {
    let c = s.content.as_ref()?;
    let shape = c.info.map(|i| i.shape);
    let scoped = r.scope == Some(Scope::TokenItem);
    let inspect = match shape {
        Some(Shape::Items) => provisional || r.data.is_some() || scoped,
        Some(Shape::FolderList) => r.data.is_some(),
        _ => false,
    };
    inspect.then(|| Inspect {
        data: r.data.unwrap_or(DataSet::ALL),
        token_item: c.token_item.filter(|_| scoped).map(str::to_string),
        roots: super::content::root_answers(c.request),
    })
}

/// Why nothing allowed a request that no rule matched: the first thing ewsgate could not
/// grant by default.
pub fn default_deny_reason(c: &Content) -> String {
    let op = &c.request.operation;
    match c.info {
        None => format!("unknown operation {op}: only a rule that names it allows it"),
        Some(i) if i.class.restricted() => {
            format!("{op} is allowed only by a rule that names it")
        }
        _ if c.access.impersonation.is_some() => {
            "impersonation is allowed only by a rule with access = [\"impersonation\"]".into()
        }
        _ if c.access.delegate.is_some() => format!(
            "access to mailbox {} is allowed only by a rule with access = [\"delegate\"]",
            c.access.delegate.as_deref().unwrap_or("")
        ),
        _ if c.token_item.is_some() && !in_token_scope(c) => {
            format!("{op} names items outside the callback token's scope")
        }
        _ if c.touch.unresolved => format!("{op}: data type unresolved"),
        _ => format!("no rule allows {op} on {}", c.touch.data),
    }
}

/// The first head condition `s` does not meet, in the order the rule file lists them.
fn head_miss(r: &Rule, s: &Subject) -> Option<Miss> {
    let any_or = |empty: bool, hit: bool| empty || hit;
    if !any_or(
        r.groups.is_empty(),
        s.group.is_some_and(|g| r.groups.iter().any(|x| x == g)),
    ) {
        return Some(Miss::Group);
    }
    if !any_or(r.auth.is_empty(), r.auth.contains(&s.auth)) {
        return Some(Miss::Auth);
    }
    if !any_or(
        r.token.is_empty(),
        s.token.is_some_and(|t| r.token.contains(&t)),
    ) {
        return Some(Miss::Token);
    }
    if !paths_match(r, s) {
        return Some(Miss::Path);
    }
    if !users_match(r, s) {
        return Some(Miss::User);
    }
    if r.days & (1 << s.when.weekday) == 0 {
        return Some(Miss::Day);
    }
    if !r.hours.is_none_or(|h| in_hours(h, s.when.minute)) {
        return Some(Miss::Hours);
    }
    None
}

/// Any path other than the EWS SOAP endpoint must be named by the rule.
fn paths_match(r: &Rule, s: &Subject) -> bool {
    if r.judges_content() {
        return s.ews;
    }
    if r.paths.is_empty() {
        return s.ews;
    }
    r.paths
        .iter()
        .any(|p| crate::model::paths::matches(p, s.path))
}

fn users_match(r: &Rule, s: &Subject) -> bool {
    if r.users.is_empty() {
        return true;
    }
    match s.user {
        Some(u) => {
            let u = u.to_ascii_lowercase();
            r.users.iter().any(|p| glob(p, &u))
        }
        None => s.handshake,
    }
}

fn in_hours((from, to): (u16, u16), minute: u16) -> bool {
    if from < to {
        (from..to).contains(&minute)
    } else {
        minute >= from || minute < to
    }
}

/// `*` matches any run of characters; everything else is literal.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

/// Which source group an address is in: longest prefix first, as in the XDP tables.
pub struct SourceIndex {
    names: Vec<String>,
    v4: Vec<(u8, HashMap<u32, u32>)>,
    v6: Vec<(u8, HashMap<u128, u32>)>,
}

impl SourceIndex {
    /// Built from the same list as the XDP tables: a prefix two groups list is the first
    /// group's in both.
    pub fn new(config: &Config) -> SourceIndex {
        let mut v4: HashMap<u8, HashMap<u32, u32>> = HashMap::new();
        let mut v6: HashMap<u8, HashMap<u128, u32>> = HashMap::new();
        for (n, id) in v4_prefixes(&config.groups) {
            v4.entry(n.prefix_len())
                .or_default()
                .insert(u32::from(n.network()), id);
        }
        for (n, id) in v6_prefixes(&config.groups) {
            v6.entry(n.prefix_len())
                .or_default()
                .insert(u128::from(n.network()), id);
        }
        fn sorted<K>(m: HashMap<u8, HashMap<K, u32>>) -> Vec<(u8, HashMap<K, u32>)> {
            let mut v: Vec<_> = m.into_iter().collect();
            v.sort_by_key(|e| std::cmp::Reverse(e.0));
            v
        }
        SourceIndex {
            names: config.groups.iter().map(|g| g.name.clone()).collect(),
            v4: sorted(v4),
            v6: sorted(v6),
        }
    }

    pub fn group(&self, addr: IpAddr) -> Option<&str> {
        let id = self.id(addr)?;
        self.names.get(id as usize - 1).map(String::as_str)
    }

    /// The group's id as the XDP tables number it (1-based), longest prefix first.
    pub fn id(&self, addr: IpAddr) -> Option<u32> {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().find_map(|(len, m)| {
                    let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                    m.get(&(a & mask)).copied()
                })
            }
            IpAddr::V6(a) => {
                if let Some(v4) = a.to_ipv4_mapped() {
                    return self.id(IpAddr::V4(v4));
                }
                let a = u128::from(a);
                self.v6.iter().find_map(|(len, m)| {
                    let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                    m.get(&(a & mask)).copied()
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CONFIG: &str = r#"
[sources.offices]
cidrs = ["198.51.100.0/25", "2001:db8:100::/64"]
[sources.salesforce]
cidrs = ["198.51.100.128/25", "198.51.100.200/32", "2001:db8:200::/48"]
[sources.partner]
cidrs = ["198.51.100.200/32", "2001:db8:200::/48"]

[[rule]]
name = "salesforce-callback"
groups = ["salesforce"]
auth = ["bearer"]
token = ["callback"]
paths = ["/EWS/Exchange.asmx"]
action = "allow"

[[rule]]
name = "office-hours"
groups = ["offices"]
auth = ["ntlm", "basic"]
users = ["*@example.org", "EXAMPLE\\*"]
hours = "07:00-19:00"
days = ["mon-fri"]
action = "allow"

[[rule]]
name = "no-basic"
auth = ["basic"]
action = "deny"
"#;

    fn config() -> Config {
        Config::parse(Path::new("/etc/ewsgate/t.toml"), CONFIG).unwrap()
    }

    fn subject<'a>(group: &'a str, auth: AuthKind, user: Option<&'a str>) -> Subject<'a> {
        Subject {
            group: Some(group),
            auth,
            token: None,
            path: "/ews/exchange.asmx",
            ews: true,
            user,
            handshake: false,
            when: LocalTime {
                weekday: 1,
                minute: 600,
            },
            content: None,
        }
    }

    #[test]
    fn first_match_wins_and_default_is_deny() {
        let c = config();
        let mut s = subject("salesforce", AuthKind::Bearer, None);
        assert_eq!(decide(&c.rules, &s).action, Action::Deny);
        s.token = Some(TokenKind::Callback);
        assert_eq!(
            decide(&c.rules, &s).rule.as_deref(),
            Some("salesforce-callback")
        );
        s.path = "/ews/services.wsdl";
        s.ews = false;
        assert_eq!(
            decide(&c.rules, &s),
            Decision {
                action: Action::Deny,
                rule: None,
                inspect: None,
            }
        );
        let basic = subject("offices", AuthKind::Basic, Some("Alice@Example.org"));
        assert_eq!(
            decide(&c.rules, &basic).rule.as_deref(),
            Some("office-hours")
        );
        let outsider = subject("offices", AuthKind::Basic, Some("mallory@evil.test"));
        assert_eq!(
            decide(&c.rules, &outsider).rule.as_deref(),
            Some("no-basic")
        );
    }

    #[test]
    fn login_hours_and_days() {
        let c = config();
        let mut s = subject("offices", AuthKind::Ntlm, Some("EXAMPLE\\bob"));
        assert_eq!(decide(&c.rules, &s).action, Action::Allow);
        s.when.minute = 19 * 60;
        assert_eq!(decide(&c.rules, &s).action, Action::Deny);
        s.when = LocalTime {
            weekday: 5,
            minute: 600,
        };
        assert_eq!(decide(&c.rules, &s).action, Action::Deny);
        // 2026-11-23 12:00 UTC is a Monday; +60 minutes is 13:00 local.
        assert_eq!(
            LocalTime::at(1_795_435_200, 60),
            LocalTime {
                weekday: 0,
                minute: 780
            }
        );
    }

    #[test]
    fn ntlm_handshake_leg_passes_a_users_condition_only_without_a_user() {
        let c = config();
        let mut s = subject("offices", AuthKind::Ntlm, None);
        assert_eq!(decide(&c.rules, &s).action, Action::Deny);
        s.handshake = true;
        assert_eq!(decide(&c.rules, &s).action, Action::Allow);
    }

    #[test]
    fn groups_by_longest_prefix() {
        let idx = SourceIndex::new(&config());
        assert_eq!(idx.group("198.51.100.10".parse().unwrap()), Some("offices"));
        assert_eq!(
            idx.group("198.51.100.140".parse().unwrap()),
            Some("salesforce")
        );
        assert_eq!(
            idx.group("::ffff:198.51.100.140".parse().unwrap()),
            Some("salesforce")
        );
        assert_eq!(
            idx.group("2001:db8:100::7".parse().unwrap()),
            Some("offices")
        );
        assert_eq!(idx.group("203.0.113.50".parse().unwrap()), None);
        // Listed by two groups: the group whose name sorts first, as in the XDP tables.
        for a in ["198.51.100.200", "2001:db8:200::9"] {
            assert_eq!(idx.group(a.parse().unwrap()), Some("partner"), "{a}");
        }
    }

    #[test]
    fn every_address_is_in_the_group_the_xdp_tables_give() {
        use crate::packet::tables::{build_v4, build_v6, lookup_v4, lookup_v6, v6_bucket_count};
        use filter_common::{V6Bucket, TBL24_ENTRIES, TBL8_SIZE};
        let c = config();
        let idx = SourceIndex::new(&c);
        let mut tbl24 = vec![0u32; TBL24_ENTRIES as usize];
        let mut tbl8 = vec![0u32; 4 * TBL8_SIZE];
        build_v4(&c.groups, &mut tbl24, &mut tbl8).unwrap();
        for last in 0..=255u8 {
            let a = std::net::Ipv4Addr::new(198, 51, 100, last);
            let xdp = lookup_v4(&tbl24, &tbl8, u32::from(a));
            assert_eq!(idx.id(a.into()).unwrap_or(0), xdp, "{a}");
        }
        let mut buckets = vec![V6Bucket::default(); v6_bucket_count(16) as usize];
        let lengths = build_v6(&c.groups, 16, &mut buckets).unwrap();
        for a in [
            "2001:db8:100::7",
            "2001:db8:100:1::7",
            "2001:db8::1",
            "2001:db8:200::9",
        ] {
            let a: std::net::Ipv6Addr = a.parse().unwrap();
            let xdp = lookup_v6(&buckets, &lengths, a.octets());
            assert_eq!(idx.id(a.into()).unwrap_or(0), xdp, "{a}");
        }
    }

    /// Records every step, for the trace tests.
    struct Steps(Vec<(usize, Step)>);

    impl Trace for Steps {
        fn note(&mut self, rule: usize, step: Step) {
            self.0.push((rule, step));
        }
    }

    #[test]
    fn the_trace_names_the_failed_condition_and_the_traced_walk_decides_the_same() {
        let c = config();
        let mut s = subject("offices", AuthKind::Basic, Some("alice@example.org"));
        s.when.minute = 20 * 60;
        let mut t = Steps(Vec::new());
        let cands = candidates_traced(&c.rules, &s, Pass::Enforced, &mut t);
        assert_eq!(cands, candidates(&c.rules, &s, Pass::Enforced));
        let d = decide_among_traced(&c.rules, &cands, &s, &mut t);
        assert_eq!(d, decide_among(&c.rules, &cands, &s));
        assert_eq!(d.rule.as_deref(), Some("no-basic"));
        assert_eq!(
            t.0,
            vec![
                (0, Step::Head(Miss::Group)),
                (1, Step::Head(Miss::Hours)),
                (2, Step::Candidate),
                (2, Step::Matched { provisional: false }),
            ]
        );
        s.when = LocalTime {
            weekday: 6,
            minute: 600,
        };
        let mut t = Steps(Vec::new());
        candidates_traced(&c.rules, &s, Pass::Enforced, &mut t);
        assert_eq!(t.0[1], (1, Step::Head(Miss::Day)));
        s.user = Some("mallory@evil.test");
        let mut t = Steps(Vec::new());
        candidates_traced(&c.rules, &s, Pass::Enforced, &mut t);
        assert_eq!(t.0[1], (1, Step::Head(Miss::User)));
    }

    #[test]
    fn globs() {
        assert!(glob("*@example.org", "a@example.org"));
        assert!(!glob("*@example.org", "a@example.org.evil"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "ac"));
        assert!(glob("*", ""));
    }
}
