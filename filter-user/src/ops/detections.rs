//! Detections over the decision stream. The request path's logging phase hands the engine
//! one `Observation` per decision; the engine keeps a little state per user, source address,
//! token item and folder, and returns the detections that fired, each with the action its
//! config asks for. Applying the action (refusing an identity, blocking a source) is the
//! agent's job; the engine only says which.
//!
//! Memory is strictly bounded: users, sources, tokens and folders each live in an LRU map
//! of a configured size, the least recently seen entry evicted first, and every entry has a
//! fixed size (or one capped by a threshold). `Engine::memory_bound` says what the caps cost.
//! An evicted subject starts afresh: its counts restart and it has no known sources.
//!
//! Time comes from the observations, never from the clock, so the engine is deterministic.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    net::IpAddr,
    num::NonZeroUsize,
};

use lru::LruCache;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use crate::model::ops::{
    ActionSpec, DetectionKind, DetectionRule, DetectionSettings, SubjectKind,
};
use crate::{
    model::ews::OpClass,
    ops::window::{in_hours, local_weekday_minute, Window},
};

/// The verdict and the failure class, as the request path names them.
pub use crate::model::outcome::{Decision, FailureClass as Failure};

/// Whether the request reached Exchange: access happened (allowed, or only a report-only
/// rule would have refused it).
fn accessed(d: Decision) -> bool {
    d != Decision::Deny
}

/// One decision, as the detections see it. Borrowed from the request's context.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    pub source: IpAddr,
    pub group: Option<&'a str>,
    /// The user the request authenticated (or claimed, when its credential was refused).
    pub user: Option<&'a str>,
    /// `basic`, `ntlm`, `bearer`, ... as in the audit line.
    pub auth: &'a str,
    /// A callback token's item.
    pub token_item: Option<&'a str>,
    pub operation: Option<&'a str>,
    pub op_class: Option<OpClass>,
    /// Item and attachment IDs the request names.
    pub items: u32,
    pub decision: Decision,
    /// `None` when the request was not refused (allow, would-deny).
    pub failure: Option<Failure>,
    pub reason: &'a str,
    /// The mailbox an EWS request acts on.
    pub mailbox: Option<&'a str>,
    /// The folder a FindItem searches (distinguished name or ID), for paging sweeps.
    pub folder: Option<&'a str>,
    /// The request carried an `ExchangeImpersonation` header.
    pub impersonation: bool,
}

impl<'a> Observation<'a> {
    /// An observation with only the always-present fields set.
    pub fn new(time_ms: u64, source: IpAddr, decision: Decision) -> Observation<'a> {
        Observation {
            time_ms,
            source,
            group: None,
            user: None,
            auth: "none",
            token_item: None,
            operation: None,
            op_class: None,
            items: 0,
            decision,
            failure: None,
            reason: "",
            mailbox: None,
            folder: None,
            impersonation: false,
        }
    }
}

/// Another gate saw this user (published by the fleet). Only `two-places` reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sighting {
    pub site: String,
    pub user: String,
    pub group: Option<String>,
    pub source: Option<IpAddr>,
    pub time_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
}

impl Severity {
    pub fn of(kind: DetectionKind) -> Severity {
        match kind {
            DetectionKind::OffHours | DetectionKind::FirstSeenSource => Severity::Low,
            DetectionKind::FailureBurstUser
            | DetectionKind::FailureBurstSource
            | DetectionKind::FindItemPaging
            | DetectionKind::TwoPlaces => Severity::Medium,
            DetectionKind::TokenReuse
            | DetectionKind::ItemsRead
            | DetectionKind::ExportOrImpersonation
            | DetectionKind::PasswordSpray => Severity::High,
        }
    }
}

/// What to refuse at the request layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    User(String),
    TokenItem(String),
}

/// What the agent should do, the block policy already applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Alert,
    RefuseIdentity { identity: Identity, secs: u32 },
    BlockSource { source: IpAddr, secs: u32 },
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Alert => "alert",
            Action::RefuseIdentity { .. } => "refuse-identity",
            Action::BlockSource { .. } => "block-source",
        }
    }

    fn secs(&self) -> Option<u32> {
        match self {
            Action::Alert => None,
            Action::RefuseIdentity { secs, .. } | Action::BlockSource { secs, .. } => Some(*secs),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Detection {
    pub kind: DetectionKind,
    pub severity: Severity,
    /// `user alice@example.org`, `source 203.0.113.9` or `token <item>`.
    pub subject: String,
    /// A small JSON object: the counts and values that made it fire.
    pub evidence: Value,
    pub action: Action,
    /// Context for the audit event.
    pub time_ms: u64,
    pub source: Option<IpAddr>,
    pub group: Option<String>,
    pub user: Option<String>,
    pub token_item: Option<String>,
}

impl Detection {
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// The audit event of kind `detection`: the audit line's fields, plus what fired.
    pub fn event(&self) -> DetectionEvent<'_> {
        let secs = self.time_ms / 1000;
        DetectionEvent {
            time: crate::ops::audit::rfc3339(secs as i64, (self.time_ms % 1000) as u32)
                .as_str()
                .to_string(),
            kind: "detection",
            source: self.source,
            source_group: self.group.as_deref(),
            user: self.user.as_deref(),
            token_item: self.token_item.as_deref(),
            decision: None,
            failure: None,
            reason: format!("{} ({})", self.kind.name(), self.subject),
            detection: self.kind.name(),
            severity: self.severity,
            subject: &self.subject,
            evidence: &self.evidence,
            action: self.action.name(),
            action_secs: self.action.secs(),
        }
    }
}

/// A detection as one audit line.
#[derive(Debug, Serialize)]
pub struct DetectionEvent<'a> {
    pub time: String,
    pub kind: &'static str,
    pub source: Option<IpAddr>,
    pub source_group: Option<&'a str>,
    pub user: Option<&'a str>,
    pub token_item: Option<&'a str>,
    pub decision: Option<&'static str>,
    pub failure: Option<&'static str>,
    pub reason: String,
    pub detection: &'static str,
    pub severity: Severity,
    pub subject: &'a str,
    pub evidence: &'a Value,
    pub action: &'static str,
    pub action_secs: Option<u32>,
}

const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Recent places per user for `two-places`.
const PLACES: usize = 4;
/// Known (group, /24 or /48) per user for `first-seen-source`.
const KNOWN: usize = 8;
const KINDS: usize = DetectionKind::ALL.len();

#[derive(Debug, Clone, Copy, Default)]
struct Place {
    /// Seconds; 0 = empty.
    secs: u32,
    site: u16,
    /// Interned group, 0 = none.
    group: u16,
    addr: Option<IpAddr>,
}

#[derive(Debug, Default)]
struct UserState {
    places: [Place; PLACES],
    /// Hashes of (group, prefix), and when each was last seen (seconds).
    known: [u64; KNOWN],
    known_secs: [u32; KNOWN],
    known_len: u8,
    failures: Window,
    items: Window,
    /// Seconds of the last firing per kind, 0 = never.
    fired: [u32; KINDS],
}

#[derive(Debug, Default)]
struct SourceState {
    failures: Window,
    /// Distinct users whose credentials failed: (user hash, seconds), at most the threshold.
    spray: Vec<(u64, u32)>,
    /// Last firing of failure-burst-source and password-spray.
    fired: [u32; 2],
}

#[derive(Debug, Default)]
struct TokenState {
    /// Distinct sources: (address, seconds), at most the threshold.
    sources: Vec<(IpAddr, u32)>,
    fired: u32,
}

#[derive(Debug, Default)]
struct FolderState {
    pages: Window,
    fired: u32,
}

/// Names (sites, groups) seen in observations and sightings, as small numbers.
struct Names {
    names: Vec<String>,
}

/// Names beyond this share one number (as an unknown name).
const MAX_NAMES: usize = 1024;

impl Names {
    /// 0 is "none"; 1.. are names.
    fn id(&mut self, name: Option<&str>) -> u16 {
        let Some(name) = name else { return 0 };
        if let Some(i) = self.names.iter().position(|n| n == name) {
            return i as u16 + 1;
        }
        if self.names.len() >= MAX_NAMES {
            return u16::MAX;
        }
        self.names.push(name.to_string());
        self.names.len() as u16
    }

    fn name(&self, id: u16) -> Option<&str> {
        match id {
            0 => None,
            u16::MAX => Some("(other)"),
            i => self.names.get(usize::from(i) - 1).map(String::as_str),
        }
    }
}

type BlockPolicy = Box<dyn Fn(Option<&str>) -> bool + Send + Sync>;

pub struct Engine {
    settings: DetectionSettings,
    hasher: RandomState,
    users: LruCache<u64, UserState>,
    sources: LruCache<IpAddr, SourceState>,
    tokens: LruCache<u64, TokenState>,
    folders: LruCache<u64, FolderState>,
    sites: Names,
    groups: Names,
    own_site: u16,
    block_policy: BlockPolicy,
    fired: [u64; KINDS],
}

/// How many entries each map holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tracked {
    pub users: usize,
    pub sources: usize,
    pub tokens: usize,
    pub folders: usize,
}

fn cap(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n.max(1)).unwrap_or(NonZeroUsize::MIN)
}

impl Engine {
    pub fn new(settings: DetectionSettings) -> Engine {
        let mut sites = Names { names: Vec::new() };
        let own_site = sites.id(Some(&settings.site));
        let blockable = settings.block_groups.clone();
        Engine {
            users: LruCache::new(cap(settings.max_users)),
            sources: LruCache::new(cap(settings.max_sources)),
            tokens: LruCache::new(cap(settings.max_tokens)),
            // Only FindItem callers have one; a quarter of the users at once is plenty.
            folders: LruCache::new(cap(settings.max_users / 4)),
            settings,
            hasher: RandomState::new(),
            sites,
            groups: Names { names: Vec::new() },
            own_site,
            // A source in no group may always be blocked; grouped ones where configured.
            block_policy: Box::new(move |g| g.is_none_or(|g| blockable.iter().any(|b| b == g))),
            fired: [0; KINDS],
        }
    }

    /// Replaces the rule for which sources a `block-source` action may block (by group).
    pub fn set_block_policy(
        &mut self,
        policy: impl Fn(Option<&str>) -> bool + Send + Sync + 'static,
    ) {
        self.block_policy = Box::new(policy);
    }

    pub fn settings(&self) -> &DetectionSettings {
        &self.settings
    }

    /// Detections fired so far, per kind (for metrics).
    pub fn fired(&self, kind: DetectionKind) -> u64 {
        self.fired[kind as usize]
    }

    pub fn tracked(&self) -> Tracked {
        Tracked {
            users: self.users.len(),
            sources: self.sources.len(),
            tokens: self.tokens.len(),
            folders: self.folders.len(),
        }
    }

    /// An upper estimate of the bytes the maps can reach at their caps: entries, their
    /// threshold-sized lists, the LRU links and the hash tables.
    pub fn memory_bound(&self) -> usize {
        // An LRU entry: the boxed node (key, value, two links) plus malloc's header, and a
        // hash-table slot (a pointer pair and a control byte at 7/8 load).
        let node = |k: usize, v: usize| k + v + 2 * 8 + 16 + (16 + 1) * 8 / 7;
        let s = &self.settings;
        let spray = s.rule(DetectionKind::PasswordSpray).threshold as usize;
        let token = s.rule(DetectionKind::TokenReuse).threshold as usize;
        // Vec buffers: the list itself plus malloc's header.
        s.max_users * node(8, size_of::<UserState>())
            + (s.max_users / 4).max(1) * node(8, size_of::<FolderState>())
            + s.max_sources
                * (node(size_of::<IpAddr>(), size_of::<SourceState>())
                    + 16
                    + spray * size_of::<(u64, u32)>())
            + s.max_tokens
                * (node(8, size_of::<TokenState>()) + 16 + token * size_of::<(IpAddr, u32)>())
    }

    /// Judges one decision. Returns what fired (usually nothing).
    pub fn observe(&mut self, o: &Observation) -> Vec<Detection> {
        let mut out = Vec::new();
        if self.settings.enabled {
            self.run(o, &mut out, true);
        }
        out
    }

    /// Updates the state as `observe` would, firing nothing: warms a fresh engine from
    /// yesterday's audit, so first-seen sources are not every user's first source.
    pub fn learn(&mut self, o: &Observation) {
        if self.settings.enabled {
            self.run(o, &mut Vec::new(), false);
        }
    }

    /// What this gate publishes for the fleet about an observation: a verified user's place.
    pub fn sighting(&self, o: &Observation) -> Option<Sighting> {
        let user = o.user?;
        (o.failure != Some(Failure::Credential)).then(|| Sighting {
            site: self.settings.site.clone(),
            user: user.to_string(),
            group: o.group.map(str::to_string),
            source: Some(o.source),
            time_ms: o.time_ms,
        })
    }

    /// Another gate saw a user: `two-places` compares it with what this gate saw.
    pub fn observe_remote(&mut self, s: &Sighting) -> Vec<Detection> {
        let mut out = Vec::new();
        let rule = self.settings.rule(DetectionKind::TwoPlaces);
        if !self.settings.enabled
            || !rule.enabled
            || s.group.as_deref().is_some_and(|g| ignored(rule, Some(g)))
        {
            return out;
        }
        let place = Place {
            secs: secs_of(s.time_ms),
            site: self.sites.id(Some(&s.site)),
            group: self.groups.id(s.group.as_deref()),
            addr: s.source,
        };
        let ctx = Context {
            time_ms: s.time_ms,
            source: s.source,
            group: s.group.as_deref(),
            user: Some(&s.user),
            token_item: None,
        };
        let key = self.key(&s.user);
        self.two_places(key, place, &ctx, &mut out, true);
        out
    }

    fn key(&self, text: &str) -> u64 {
        // Case-insensitive: ALICE@example.org is alice@example.org.
        let mut h = self.hasher.build_hasher();
        write_lowered(&mut h, text);
        h.finish()
    }

    fn run(&mut self, o: &Observation, out: &mut Vec<Detection>, fire: bool) {
        let ctx = Context {
            time_ms: o.time_ms,
            source: Some(o.source),
            group: o.group,
            user: o.user,
            token_item: o.token_item,
        };
        let mut pending = Vec::new();
        if let Some(user) = o.user {
            self.per_user(o, user, &ctx, &mut pending);
        }
        if o.failure.is_some() && o.decision == Decision::Deny {
            self.per_source(o, &ctx, &mut pending);
        }
        if let (Some(item), true) = (o.token_item, o.failure != Some(Failure::Credential)) {
            self.per_token(o, item, &ctx, &mut pending);
        }
        if fire {
            for d in &pending {
                self.fired[d.kind as usize] += 1;
            }
            out.extend(pending);
        }
    }

    fn active(&self, kind: DetectionKind, group: Option<&str>) -> Option<&DetectionRule> {
        let rule = self.settings.rule(kind);
        (rule.enabled && !ignored(rule, group)).then_some(rule)
    }

    fn per_user(
        &mut self,
        o: &Observation,
        user: &str,
        ctx: &Context<'_>,
        out: &mut Vec<Detection>,
    ) {
        let key = self.key(user);
        let secs = secs_of(o.time_ms);
        // A refused credential proves nothing about where the user is.
        let verified = o.failure != Some(Failure::Credential);
        if verified {
            let place = Place {
                secs,
                site: self.own_site,
                group: self.groups.id(o.group),
                addr: Some(o.source),
            };
            if self.active(DetectionKind::TwoPlaces, o.group).is_some() {
                self.two_places(key, place, ctx, out, false);
            }
        }
        if accessed(o.decision) {
            self.first_seen(key, o, ctx, out);
            self.off_hours(key, o, ctx, out);
            self.items_read(key, o, ctx, out);
            self.paging(o, user, ctx, out);
        }
        if o.op_class == Some(OpClass::Export) || o.impersonation {
            if let Some(rule) = self.active(DetectionKind::ExportOrImpersonation, o.group) {
                let rule = rule.clone();
                let state = self.users.get_or_insert_mut(key, UserState::default);
                if quiet_over(
                    &mut state.fired[rule.kind as usize],
                    secs,
                    self.settings.quiet_secs,
                ) {
                    let evidence = json!({
                        "operation": o.operation,
                        "impersonation": o.impersonation,
                        "mailbox": o.mailbox,
                        "decision": o.decision.name(),
                        "reason": o.reason,
                    });
                    out.push(self.detection(&rule, ctx, evidence));
                }
            }
        }
        if o.failure.is_some() && o.decision == Decision::Deny {
            if let Some(rule) = self.active(DetectionKind::FailureBurstUser, o.group) {
                let rule = rule.clone();
                let quiet = self.settings.quiet_secs;
                let state = self.users.get_or_insert_mut(key, UserState::default);
                let n = state.failures.add(u64::from(secs), rule.window_secs, 1);
                if n >= u64::from(rule.threshold)
                    && quiet_over(&mut state.fired[rule.kind as usize], secs, quiet)
                {
                    let evidence = json!({
                        "failures": n,
                        "window_secs": rule.window_secs,
                        "last_reason": o.reason,
                        "last_failure": o.failure.map(Failure::name),
                    });
                    out.push(self.detection(&rule, ctx, evidence));
                }
            }
        }
    }

    fn two_places(
        &mut self,
        key: u64,
        here: Place,
        ctx: &Context<'_>,
        out: &mut Vec<Detection>,
        remote: bool,
    ) {
        let rule = self.settings.rule(DetectionKind::TwoPlaces).clone();
        let quiet = self.settings.quiet_secs;
        let window = rule.window_secs;
        let state = self.users.get_or_insert_mut(key, UserState::default);
        let mut found = None;
        for p in state.places.iter().filter(|p| p.secs != 0) {
            if here.secs.abs_diff(p.secs) > window {
                continue;
            }
            if let Some(why) = apart(p, &here) {
                found = Some((*p, why));
                break;
            }
        }
        // Remember this place: refresh the same one, else replace the oldest.
        let slot = state
            .places
            .iter()
            .position(|p| p.secs != 0 && same_place(p, &here))
            .or_else(|| {
                state
                    .places
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, p)| p.secs)
                    .map(|(i, _)| i)
            });
        if let Some(i) = slot {
            if here.secs >= state.places[i].secs {
                state.places[i] = here;
            }
        }
        let Some((other, why)) = found else { return };
        if !quiet_over(&mut state.fired[rule.kind as usize], here.secs, quiet) {
            return;
        }
        let describe = |p: &Place, engine: &Engine| {
            json!({
                "site": engine.sites.name(p.site),
                "group": engine.groups.name(p.group),
                "address": p.addr,
            })
        };
        let evidence = json!({
            "why": why,
            "window_secs": rule.window_secs,
            "seconds_apart": here.secs.abs_diff(other.secs),
            "this": describe(&here, self),
            "other": describe(&other, self),
            "remote": remote,
        });
        out.push(self.detection(&rule, ctx, evidence));
    }

    fn first_seen(
        &mut self,
        key: u64,
        o: &Observation,
        ctx: &Context<'_>,
        out: &mut Vec<Detection>,
    ) {
        let Some(rule) = self.active(DetectionKind::FirstSeenSource, o.group) else {
            return;
        };
        let rule = rule.clone();
        let (prefix, len) = prefix_of(o.source);
        let place = {
            let mut h = self.hasher.build_hasher();
            h.write(o.group.unwrap_or("").as_bytes());
            h.write_u8(0xff);
            h.write_u128(prefix);
            h.write_u8(len);
            h.finish()
        };
        let secs = secs_of(o.time_ms);
        let quiet = self.settings.quiet_secs;
        let state = self.users.get_or_insert_mut(key, UserState::default);
        let len_known = usize::from(state.known_len);
        if let Some(i) = state.known[..len_known].iter().position(|k| *k == place) {
            state.known_secs[i] = secs;
            return;
        }
        // A user's very first place is not news: only a new one beside known ones is.
        let fire = len_known > 0;
        let slot = if len_known < KNOWN {
            state.known_len += 1;
            len_known
        } else {
            (0..KNOWN).min_by_key(|&i| state.known_secs[i]).unwrap_or(0)
        };
        state.known[slot] = place;
        state.known_secs[slot] = secs;
        if fire && quiet_over(&mut state.fired[rule.kind as usize], secs, quiet) {
            let evidence = json!({
                "group": o.group,
                "prefix": prefix_text(o.source),
                "known_sources": len_known,
            });
            out.push(self.detection(&rule, ctx, evidence));
        }
    }

    fn off_hours(
        &mut self,
        key: u64,
        o: &Observation,
        ctx: &Context<'_>,
        out: &mut Vec<Detection>,
    ) {
        let Some(rule) = self.active(DetectionKind::OffHours, o.group) else {
            return;
        };
        let s = &self.settings;
        let secs = secs_of(o.time_ms);
        let (weekday, minute) = local_weekday_minute(u64::from(secs), s.utc_offset_minutes);
        if s.days & (1 << weekday) != 0 && in_hours(minute, s.hours) {
            return;
        }
        let rule = rule.clone();
        let quiet = s.quiet_secs;
        let state = self.users.get_or_insert_mut(key, UserState::default);
        // Every request of a night is off hours: the evidence is built only when it fires.
        if !quiet_over(&mut state.fired[rule.kind as usize], secs, quiet) {
            return;
        }
        let s = &self.settings;
        let evidence = json!({
            "local_time": format!("{:02}:{:02}", minute / 60, minute % 60),
            "weekday": WEEKDAYS[usize::from(weekday)],
            "hours": format!("{:02}:{:02}-{:02}:{:02}", s.hours.0 / 60, s.hours.0 % 60, s.hours.1 / 60, s.hours.1 % 60),
            "utc_offset_minutes": s.utc_offset_minutes,
            "operation": o.operation,
        });
        out.push(self.detection(&rule, ctx, evidence));
    }

    fn items_read(
        &mut self,
        key: u64,
        o: &Observation,
        ctx: &Context<'_>,
        out: &mut Vec<Detection>,
    ) {
        if o.op_class != Some(OpClass::Read) || o.items == 0 {
            return;
        }
        let Some(rule) = self.active(DetectionKind::ItemsRead, o.group) else {
            return;
        };
        let rule = rule.clone();
        let secs = secs_of(o.time_ms);
        let quiet = self.settings.quiet_secs;
        let state = self.users.get_or_insert_mut(key, UserState::default);
        let n = state.items.add(u64::from(secs), rule.window_secs, o.items);
        if n >= u64::from(rule.threshold)
            && quiet_over(&mut state.fired[rule.kind as usize], secs, quiet)
        {
            let evidence = json!({
                "items": n,
                "window_secs": rule.window_secs,
                "operation": o.operation,
                "mailbox": o.mailbox,
            });
            out.push(self.detection(&rule, ctx, evidence));
        }
    }

    fn paging(&mut self, o: &Observation, user: &str, ctx: &Context<'_>, out: &mut Vec<Detection>) {
        if o.operation != Some("FindItem") {
            return;
        }
        let Some(rule) = self.active(DetectionKind::FindItemPaging, o.group) else {
            return;
        };
        let rule = rule.clone();
        let key = {
            let mut h = self.hasher.build_hasher();
            for part in [user, o.mailbox.unwrap_or(user), o.folder.unwrap_or("")] {
                write_lowered(&mut h, part);
            }
            h.finish()
        };
        let secs = secs_of(o.time_ms);
        let quiet = self.settings.quiet_secs;
        let state = self.folders.get_or_insert_mut(key, FolderState::default);
        let n = state.pages.add(u64::from(secs), rule.window_secs, 1);
        if n >= u64::from(rule.threshold) && quiet_over(&mut state.fired, secs, quiet) {
            let evidence = json!({
                "pages": n,
                "window_secs": rule.window_secs,
                "mailbox": o.mailbox,
                "folder": o.folder,
            });
            out.push(self.detection(&rule, ctx, evidence));
        }
    }

    fn per_source(&mut self, o: &Observation, ctx: &Context<'_>, out: &mut Vec<Detection>) {
        let secs = secs_of(o.time_ms);
        let quiet = self.settings.quiet_secs;
        if let Some(rule) = self.active(DetectionKind::FailureBurstSource, o.group) {
            let rule = rule.clone();
            let state = self
                .sources
                .get_or_insert_mut(o.source, SourceState::default);
            let n = state.failures.add(u64::from(secs), rule.window_secs, 1);
            if n >= u64::from(rule.threshold) && quiet_over(&mut state.fired[0], secs, quiet) {
                let evidence = json!({
                    "failures": n,
                    "window_secs": rule.window_secs,
                    "last_reason": o.reason,
                    "last_failure": o.failure.map(Failure::name),
                    "last_user": o.user,
                });
                out.push(self.detection(&rule, ctx, evidence));
            }
        }
        let (Some(user), Some(Failure::Credential)) = (o.user, o.failure) else {
            return;
        };
        let Some(rule) = self.active(DetectionKind::PasswordSpray, o.group) else {
            return;
        };
        let rule = rule.clone();
        let user_key = self.key(user);
        let window = rule.window_secs;
        let limit = rule.threshold as usize;
        let state = self
            .sources
            .get_or_insert_mut(o.source, SourceState::default);
        state
            .spray
            .retain(|(_, t)| secs.saturating_sub(*t) <= window);
        match state.spray.iter_mut().find(|(u, _)| *u == user_key) {
            Some(entry) => entry.1 = secs,
            None => {
                if state.spray.len() >= limit {
                    // Full: the oldest user makes room (the count stays at the threshold).
                    if let Some(i) = (0..state.spray.len()).min_by_key(|&i| state.spray[i].1) {
                        state.spray.swap_remove(i);
                    }
                }
                state.spray.push((user_key, secs));
            }
        }
        let n = state.spray.len();
        if n >= limit && quiet_over(&mut state.fired[1], secs, quiet) {
            let evidence = json!({
                "users": n,
                "window_secs": rule.window_secs,
                "last_user": user,
                "last_reason": o.reason,
            });
            out.push(self.detection(&rule, ctx, evidence));
        }
    }

    fn per_token(
        &mut self,
        o: &Observation,
        item: &str,
        ctx: &Context<'_>,
        out: &mut Vec<Detection>,
    ) {
        let Some(rule) = self.active(DetectionKind::TokenReuse, o.group) else {
            return;
        };
        let rule = rule.clone();
        let key = {
            let mut h = self.hasher.build_hasher();
            h.write(item.as_bytes());
            h.finish()
        };
        let secs = secs_of(o.time_ms);
        let window = rule.window_secs;
        let limit = rule.threshold as usize;
        let quiet = self.settings.quiet_secs;
        let state = self.tokens.get_or_insert_mut(key, TokenState::default);
        state
            .sources
            .retain(|(_, t)| secs.saturating_sub(*t) <= window);
        match state.sources.iter_mut().find(|(a, _)| *a == o.source) {
            Some(entry) => entry.1 = secs,
            None => {
                if state.sources.len() >= limit {
                    if let Some(i) = (0..state.sources.len()).min_by_key(|&i| state.sources[i].1) {
                        state.sources.swap_remove(i);
                    }
                }
                state.sources.push((o.source, secs));
            }
        }
        let n = state.sources.len();
        if n >= limit && quiet_over(&mut state.fired, secs, quiet) {
            let addresses: Vec<IpAddr> = state.sources.iter().map(|(a, _)| *a).collect();
            let evidence = json!({
                "sources": n,
                "window_secs": rule.window_secs,
                "addresses": addresses,
            });
            out.push(self.detection(&rule, ctx, evidence));
        }
    }

    fn detection(&self, rule: &DetectionRule, ctx: &Context<'_>, mut evidence: Value) -> Detection {
        let kind = rule.kind;
        let subject = match kind.subject() {
            SubjectKind::User => format!("user {}", ctx.user.unwrap_or("-")),
            SubjectKind::Source => match ctx.source {
                Some(s) => format!("source {s}"),
                None => "source -".into(),
            },
            SubjectKind::Token => format!("token {}", ctx.token_item.unwrap_or("-")),
        };
        let action = match rule.action {
            ActionSpec::Alert => Action::Alert,
            ActionSpec::RefuseIdentity { secs } => {
                let identity = match (kind.subject(), ctx.token_item, ctx.user) {
                    (SubjectKind::Token, Some(t), _) => Some(Identity::TokenItem(t.into())),
                    (_, _, Some(u)) => Some(Identity::User(u.into())),
                    _ => None,
                };
                identity.map_or(Action::Alert, |identity| Action::RefuseIdentity {
                    identity,
                    secs,
                })
            }
            ActionSpec::BlockSource { secs } => match ctx.source {
                Some(source) if (self.block_policy)(ctx.group) => {
                    Action::BlockSource { source, secs }
                }
                _ => {
                    if let Value::Object(m) = &mut evidence {
                        m.insert(
                            "block_refused".into(),
                            json!(match ctx.group {
                                Some(g) => format!("source group {g} does not allow blocks"),
                                None => "no source address".to_string(),
                            }),
                        );
                    }
                    Action::Alert
                }
            },
        };
        Detection {
            kind,
            severity: Severity::of(kind),
            subject,
            evidence,
            action,
            time_ms: ctx.time_ms,
            source: ctx.source,
            group: ctx.group.map(str::to_string),
            user: ctx.user.map(str::to_string),
            token_item: ctx.token_item.map(str::to_string),
        }
    }
}

/// The fields of the decision (or sighting) a detection reports: borrowed from it, and
/// copied only into a detection that fires.
struct Context<'a> {
    time_ms: u64,
    source: Option<IpAddr>,
    group: Option<&'a str>,
    user: Option<&'a str>,
    token_item: Option<&'a str>,
}

/// Hashes text as its ASCII lower case, then an end mark (0xff, never in UTF-8), so that
/// parts hashed one after another cannot run into each other. Lowered a block at a time:
/// SipHash costs per call, not per byte.
fn write_lowered(h: &mut impl Hasher, text: &str) {
    let mut block = [0u8; 64];
    for chunk in text.as_bytes().chunks(block.len()) {
        let lowered = &mut block[..chunk.len()];
        lowered.copy_from_slice(chunk);
        lowered.make_ascii_lowercase();
        h.write(lowered);
    }
    h.write_u8(0xff);
}

/// Seconds since the epoch, as the state keeps them (enough until 2106).
fn secs_of(time_ms: u64) -> u32 {
    (time_ms / 1000).min(u64::from(u32::MAX)) as u32
}

fn ignored(rule: &DetectionRule, group: Option<&str>) -> bool {
    group.is_some_and(|g| rule.ignore_groups.iter().any(|i| i == g))
}

/// True (and the time noted) when the subject's last firing of this kind is older than the
/// quiet time.
fn quiet_over(last: &mut u32, now: u32, quiet: u32) -> bool {
    if *last != 0 && now.saturating_sub(*last) < quiet {
        return false;
    }
    *last = now.max(1);
    true
}

fn same_place(a: &Place, b: &Place) -> bool {
    a.site == b.site && a.group == b.group && apart(a, b).is_none()
}

/// Why two places are different places, if they are.
fn apart(a: &Place, b: &Place) -> Option<&'static str> {
    if a.site != b.site {
        return Some("different sites");
    }
    if a.group != 0 && b.group != 0 && a.group != b.group {
        return Some("different source groups");
    }
    match (a.addr, b.addr) {
        (Some(x), Some(y)) if x.is_ipv4() == y.is_ipv4() && far_prefix(x) != far_prefix(y) => {
            Some(if x.is_ipv4() {
                "addresses in different /16s"
            } else {
                "addresses in different /48s"
            })
        }
        _ => None,
    }
}

/// The /16 (IPv4) or /48 (IPv6) an address is in: farther apart than one site's network.
fn far_prefix(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v4) => u128::from(u32::from(v4) >> 16),
        IpAddr::V6(v6) => u128::from(v6) >> 80,
    }
}

/// The /24 (IPv4) or /48 (IPv6) a source is in: what "a source" means for first-seen.
fn prefix_of(a: IpAddr) -> (u128, u8) {
    match a {
        IpAddr::V4(v4) => (u128::from(u32::from(v4) >> 8), 24),
        IpAddr::V6(v6) => (u128::from(v6) >> 80, 48),
    }
}

fn prefix_text(a: IpAddr) -> String {
    let (_, len) = prefix_of(a);
    ipnet::IpNet::new(a, len)
        .map(|n| n.trunc().to_string())
        .unwrap_or_else(|_| a.to_string())
}

#[cfg(test)]
mod tests;
