//! Body filter: `POST /EWS/Exchange.asmx` is read and judged before Exchange sees a byte of
//! it. The SOAP body shows the operation, the mailbox, folders, items and data types; the
//! policy phase's candidates are judged against it. A body longer than the buffer goes on
//! only as bulk content (checked as it streams); anything else cuts it off.

use std::{borrow::Cow, sync::Arc};

use bytes::Bytes;

use crate::{
    model::{
        ews::{self, DataSet, OpClass, OpInfo},
        rules::Action,
    },
    policy::{
        content::{self, Touch},
        rules::{self, Content},
    },
    proxy::{
        body::BodyIn,
        context::{Ctx, Refusal},
        phases::{
            policy::{enforce, note_shadow, subject, Plan},
            request_filter::Req,
        },
        session::Conn,
        state::State,
        Shared,
    },
    soap::{self, Tail},
};

/// The body as it goes upstream.
pub enum BodyOut {
    /// Read whole (or none): sent with its length.
    Whole(Bytes),
    /// The part read, then the rest streamed from the client; a SOAP body's rest must be
    /// bulk content.
    Stream {
        prefix: Bytes,
        body: BodyIn,
        tail: Option<Tail>,
    },
}

/// What the request showed, kept for the response filter.
pub struct Judged {
    pub mailbox: String,
}

pub async fn run(
    shared: &Shared,
    state: &State,
    conn: &mut Conn,
    req: &Req,
    plan: &Plan,
    ctx: &mut Ctx,
) -> Result<(BodyOut, Judged), Refusal> {
    let limits = &state.settings.limits;
    let mut body = BodyIn::new(
        req.framing,
        plan.body_cap,
        limits.body_min_rate,
        limits.body_grace,
    );
    let none = Judged {
        mailbox: String::new(),
    };
    if !ctx.ews {
        return Ok((stream_rest(Bytes::new(), body, None), none));
    }
    let (head, ended) = body.read_upto(conn, state.content.request_buffer).await?;
    ctx.bytes_in = body.bytes;
    // An NTLM or Negotiate Type 1 leg with no body: Exchange answers it with a challenge.
    if ctx.handshake && head.is_empty() && ended {
        ctx.rule = first_allow(state, &plan.enforced);
        return Ok((BodyOut::Whole(head), none));
    }
    let (judged, tail) = judge(shared, state, &head, ended, req, plan, ctx).map_err(|mut r| {
        // Read whole, the request leaves the connection in a known state (and an NTLM
        // session on it intact).
        r.keep_alive = ended;
        r
    })?;
    if ended {
        return Ok((BodyOut::Whole(head), judged));
    }
    Ok((stream_rest(head, body, tail), judged))
}

fn stream_rest(prefix: Bytes, body: BodyIn, tail: Option<Tail>) -> BodyOut {
    if body.is_done() {
        return BodyOut::Whole(prefix);
    }
    BodyOut::Stream { prefix, body, tail }
}

fn first_allow(state: &State, candidates: &[usize]) -> Option<Arc<str>> {
    candidates
        .iter()
        .filter_map(|&i| state.rules.get(i))
        .find(|r| r.action == Action::Allow)
        .map(|r| r.name.clone())
}

fn judge(
    shared: &Shared,
    state: &State,
    head: &[u8],
    ended: bool,
    req: &Req,
    plan: &Plan,
    ctx: &mut Ctx,
) -> Result<(Judged, Option<Tail>), Refusal> {
    let settings = &state.content;
    ctx.inspected_request = head.len() as u64;
    let mut request = soap::parse_request(head, ended, settings.limits)
        .map_err(|e| Refusal::protocol(400, format!("{}: {e}", e.reason())))?;
    let tail = request.tail.take();
    let info = operation(&request);
    // A known operation's name is the table's: no copy.
    ctx.operation = Some(match info {
        Some(i) => Cow::Borrowed(i.name),
        None => Cow::Owned(request.operation.clone()),
    });
    ctx.op_class = info.map(|i| i.class);
    ctx.items = Some(request.item_count());
    let anchor = req
        .head
        .fields
        .text("x-anchormailbox")
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let access = content::access(&request, anchor, ctx.user.as_deref());
    let mailbox = access.mailbox(ctx.user.as_deref());
    ctx.mailbox = Some(mailbox.clone()).filter(|m| !m.is_empty());
    let (touch, roots) = {
        let cache = shared
            .ids
            .lock()
            .map_err(|_| Refusal::service(500, "id_cache_poisoned"))?;
        let touch = match info {
            Some(i) => content::touched(&request, &i, &cache, &mailbox, settings.meetings),
            None => Touch {
                data: DataSet::ALL,
                unresolved: true,
            },
        };
        let roots: Vec<Option<String>> = request
            .attachments
            .iter()
            .map(|a| cache.attachment(&mailbox, a).and_then(|k| k.root.clone()))
            .collect();
        (touch, roots)
    };
    ctx.data = Some(data_text(&touch));
    // The rules read the context where it stands; it changes only once they have spoken.
    let (decision, shadow, deny_why) = {
        let c = Content {
            request: &request,
            info,
            touch,
            access: &access,
            token_item: ctx.token_item.as_deref(),
            roots: roots.iter().map(Option::as_deref).collect(),
        };
        let reason = |rule: Option<&str>| match rule {
            Some(name) => format!("denied by rule {name}"),
            None => rules::default_deny_reason(&c),
        };
        let mut s = subject(state, ctx);
        s.content = Some(c.clone());
        let decision = rules::decide_among(&state.rules, &plan.enforced, &s);
        let shadow = plan.report.as_ref().map(|r| {
            let d = rules::decide_among(&state.rules, r, &s);
            let why = reason(d.rule.as_deref());
            (d, why)
        });
        // The reason is written only for a refusal: most requests pass.
        let deny_why = (decision.action == Action::Deny).then(|| reason(decision.rule.as_deref()));
        (decision, shadow, deny_why)
    };
    if let Some((d, shadow_why)) = shadow {
        note_shadow(
            ctx,
            d.action,
            d.rule.as_deref(),
            shadow_why,
            decision.action,
        );
    }
    ctx.rule = decision.rule;
    ctx.inspect = decision.inspect;
    if let Some(why) = deny_why {
        enforce(state, ctx, Refusal::policy(500, why))?;
    }
    if content::changes_ids(&request, info.as_ref()) {
        if let Ok(mut cache) = shared.ids.lock() {
            content::forget_changed(&mut cache, &mailbox, &request);
        }
    }
    Ok((Judged { mailbox }, tail))
}

/// The data types as the audit line and the metrics name them. One type, the usual case,
/// is its constant name (what `DataSet`'s `Display` writes for it): nothing to allocate.
fn data_text(touch: &Touch) -> Cow<'static, str> {
    if touch.unresolved {
        return Cow::Borrowed("unresolved");
    }
    match DataSet::NAMES.iter().find(|(_, d)| *d == touch.data) {
        Some((name, _)) => Cow::Borrowed(name),
        None => Cow::Owned(touch.data.to_string()),
    }
}

/// The operation, with one that sends mail (`MessageDisposition`, a meeting attribute)
/// counted as a send.
fn operation(request: &soap::Request) -> Option<OpInfo> {
    ews::operation(&request.operation).map(|mut i| {
        if request.sends() {
            i.class = OpClass::Send;
        }
        i
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_named_as_the_set_writes_itself() {
        for bits in 0..32u8 {
            let data = DataSet::NAMES
                .iter()
                .enumerate()
                .filter(|(i, _)| bits & (1 << i) != 0)
                .fold(DataSet::NONE, |set, (_, (_, d))| set.union(*d));
            let touch = Touch {
                data,
                unresolved: false,
            };
            assert_eq!(data_text(&touch), data.to_string());
        }
        let unresolved = Touch {
            data: DataSet::ALL,
            unresolved: true,
        };
        assert_eq!(data_text(&unresolved), "unresolved");
    }
}
