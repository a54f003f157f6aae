//! Policy: the ordered rules, judged once. The rules whose head conditions match are found
//! here; for any path but the EWS endpoint they decide now. For the EWS endpoint the body
//! decides (the body filter judges it against these same candidates), but a request that
//! no candidate could allow is refused before its body is read.
//!
//! Report-only rules (and `mode = "report"` for the whole layer) are judged beside the
//! enforced ones: the audit line says what they would have done, the request goes on.

use std::sync::Arc;

use crate::{
    model::{outcome::Decision, paths, rules::Action, settings::OtherPaths},
    policy::rules::{self, LocalTime, Pass, Subject},
    proxy::{
        context::{Ctx, Refusal},
        h1::Framing,
        phases::request_filter::Req,
        state::State,
    },
};

/// What the policy phase hands on.
pub struct Plan {
    /// Candidates of the enforced judgment (empty when no rule applies: other paths pass).
    pub enforced: Vec<usize>,
    /// Candidates of the report judgment, when report-only rules exist.
    pub report: Option<Vec<usize>>,
    pub body_cap: u64,
}

pub fn run(state: &State, req: &Req, ctx: &mut Ctx) -> Result<Plan, Refusal> {
    let body_cap = state.settings.limits.body_cap(&ctx.path);
    if matches!(req.framing, Framing::Length(n) if n > body_cap) {
        return Err(Refusal::protocol(413, "body_too_large"));
    }
    let plan = |enforced, report| Plan {
        enforced,
        report,
        body_cap,
    };
    if !ctx.ews && !paths::under_ews(&ctx.path) && state.settings.other_paths == OtherPaths::Pass {
        ctx.rule = Some(Arc::from("(other_paths = pass)"));
        return Ok(plan(Vec::new(), None));
    }
    // The candidates are found once; only a request that is not EWS is decided now.
    let ews = ctx.ews;
    let (enforced, report, decided) = {
        let subject = subject(state, ctx);
        let enforced = rules::candidates(&state.rules, &subject, Pass::Enforced);
        let report = state
            .reporting
            .then(|| rules::candidates(&state.rules, &subject, Pass::Report));
        let decided = (!ews).then(|| {
            let decide = |c: &[usize]| rules::decide_among(&state.rules, c, &subject);
            (decide(&enforced), report.as_deref().map(decide))
        });
        (enforced, report, decided)
    };
    let Some((decision, shadow)) = decided else {
        head_only_ews(state, ctx, &enforced, report.as_deref())?;
        return Ok(plan(enforced, report));
    };
    if let Some(shadow) = shadow {
        let why = other_path_reason(ctx, shadow.rule.as_deref());
        note_shadow(
            ctx,
            shadow.action,
            shadow.rule.as_deref(),
            why,
            decision.action,
        );
    }
    ctx.rule = decision.rule.clone();
    if decision.action == Action::Deny {
        let reason = other_path_reason(ctx, decision.rule.as_deref());
        enforce(state, ctx, Refusal::policy(403, reason))?;
    }
    Ok(plan(enforced, report))
}

/// The EWS endpoint before its body: refused only when no candidate could allow it.
fn head_only_ews(
    state: &State,
    ctx: &mut Ctx,
    enforced: &[usize],
    report: Option<&[usize]>,
) -> Result<(), Refusal> {
    let allows = |c: &[usize]| rules::may_allow_among(&state.rules, c);
    if let Some(r) = report {
        let (shadow, now) = (allows(r), allows(enforced));
        if !shadow && now {
            ctx.shadow = Some((Decision::Deny, None, "no report rule could allow it".into()));
            ctx.decision = Decision::WouldDeny;
        }
    }
    if allows(enforced) {
        return Ok(());
    }
    let rule = enforced
        .last()
        .and_then(|&i| state.rules.get(i))
        .filter(|r| r.action == Action::Deny && !r.judges_content());
    ctx.rule = rule.map(|r| r.name.clone());
    let reason = match rule {
        Some(r) => format!("denied by rule {}", r.name),
        None => "no_rule_matched".into(),
    };
    enforce(state, ctx, Refusal::policy(403, reason))
}

/// A refusal, unless the whole layer only reports: then it is audited as `would-deny`
/// and the request goes on.
pub fn enforce(state: &State, ctx: &mut Ctx, refusal: Refusal) -> Result<(), Refusal> {
    if state.settings.report_only {
        ctx.decision = Decision::WouldDeny;
        ctx.shadow = Some((Decision::Deny, ctx.rule.clone(), refusal.reason.to_string()));
        return Ok(());
    }
    Err(refusal)
}

/// Records what the report judgment said when it differs from the enforced one.
pub fn note_shadow(
    ctx: &mut Ctx,
    shadow: Action,
    rule: Option<&str>,
    reason: String,
    enforced: Action,
) {
    if shadow == enforced {
        return;
    }
    let decision = match shadow {
        Action::Allow => Decision::Allow,
        Action::Deny => Decision::Deny,
    };
    if shadow == Action::Deny {
        ctx.decision = Decision::WouldDeny;
    }
    ctx.shadow = Some((decision, rule.map(Arc::from), reason));
}

fn other_path_reason(ctx: &Ctx, rule: Option<&str>) -> String {
    match rule {
        Some(name) => format!("denied by rule {name}"),
        None if !ctx.ews && paths::under_ews(&ctx.path) => "ews_path_not_named_by_a_rule".into(),
        None => "no_rule_matched".into(),
    }
}

pub fn subject<'a>(state: &State, ctx: &'a Ctx) -> Subject<'a> {
    Subject {
        group: ctx.conn.group.as_deref(),
        auth: ctx.auth,
        token: ctx.token,
        path: &ctx.path,
        ews: ctx.ews,
        user: ctx.user.as_deref(),
        handshake: ctx.handshake,
        when: LocalTime::at(ctx.unix_secs() as i64, state.settings.utc_offset_minutes),
        content: None,
    }
}
