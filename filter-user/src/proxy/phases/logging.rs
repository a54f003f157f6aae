//! Logging: the last phase. The audit line and the failure report are written here, once,
//! from the request's context, so every consumer reads the same account of what happened.

use std::net::SocketAddr;

use crate::{
    ipc::{Detected, Failure, Seen},
    model::outcome::{Decision, FailureClass},
    ops::{
        audit::{Record, Shadow, Time},
        detections::{Action, Identity, Observation},
    },
    proxy::{context::Ctx, Shared},
};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs a decision through the detections; each firing is an audit event of its own, and
/// its action goes to the agent (an identity refusal also applies here at once).
fn detections(shared: &Shared, o: &Observation) {
    fire(shared, shared.ops.observe(o));
    if let Some(s) = shared.ops.sighting(o) {
        shared.link.seen(Seen {
            site: s.site,
            user: s.user,
            group: s.group,
            source: s.source,
            time_ms: s.time_ms,
        });
    }
}

/// Detections that fired (here, or on another gate's sighting): each an audit event, its
/// action sent to the agent.
pub fn fire(shared: &Shared, fired: Vec<crate::ops::detections::Detection>) {
    for d in fired {
        shared.metrics.detection(d.name());
        tracing::warn!(detection = d.name(), subject = %d.subject, action = d.action.name(), "detection fired");
        let event = d.event();
        shared.audit.log(&event);
        shared.ops.record(&event);
        let detection = d.name().to_string();
        let asked = match d.action {
            Action::Alert => continue,
            Action::RefuseIdentity { identity, secs } => {
                let identity = match identity {
                    Identity::User(u) => format!("user:{}", u.to_ascii_lowercase()),
                    Identity::TokenItem(i) => format!("token-item:{i}"),
                };
                let why = format!("detection {detection}");
                shared.refused.add(identity.clone(), u64::from(secs), why);
                Detected::RefuseIdentity {
                    detection,
                    identity,
                    secs,
                }
            }
            Action::BlockSource { source, secs } => Detected::BlockSource {
                detection,
                source,
                secs,
            },
        };
        shared.link.detected(asked);
    }
}

pub fn run(shared: &Shared, ctx: &Ctx) {
    // The request's one clock reading at its end: its duration, and with the wall clock
    // read at its start, the time of the audit line and of the detections' observation.
    let elapsed = ctx.started.elapsed();
    let ended = ctx.wall + elapsed;
    let shadow = ctx.shadow.as_ref().map(|(d, rule, reason)| Shadow {
        decision: d.name(),
        rule: rule.as_deref(),
        reason,
    });
    let record = Record {
        time: Time::at(ended),
        kind: "request",
        source: Some(ctx.conn.peer.ip()),
        source_port: ctx.conn.peer.port(),
        source_group: ctx.conn.group.as_deref(),
        user: ctx.user.as_deref(),
        auth: ctx.auth.name(),
        token_family: ctx.token.map(|t| t.name()),
        token_item: ctx.token_item.as_deref(),
        method: &ctx.method,
        path: ctx.forwarded.as_deref().unwrap_or(&ctx.path),
        operation: ctx.operation.as_deref(),
        data: ctx.data.as_deref(),
        mailbox: ctx.mailbox.as_deref(),
        items: ctx.items,
        withheld: ctx.withheld,
        rule: ctx.rule.as_deref(),
        decision: ctx.decision.name(),
        reason: &ctx.reason,
        failure: ctx.failure.map(FailureClass::name),
        report: shadow,
        status: ctx.status,
        upstream_status: ctx.upstream_status,
        bytes_in: ctx.bytes_in,
        bytes_out: ctx.bytes_out,
        duration_ms: elapsed.as_secs_f64() * 1000.0,
        upstream_ms: ctx.upstream_ms,
        user_agent: ctx.user_agent.as_deref(),
        connection: ctx.conn.id,
    };
    shared.audit.log_record(&record);
    shared.ops.record(&record);
    shared.metrics.record(ctx, elapsed);
    let observation = Observation {
        group: ctx.conn.group.as_deref(),
        user: ctx.user.as_deref(),
        auth: ctx.auth.name(),
        token_item: ctx.token_item.as_deref(),
        operation: ctx.operation.as_deref(),
        op_class: ctx.op_class,
        items: ctx.items.map_or(0, |n| n.min(u32::MAX as usize) as u32),
        failure: ctx.failure,
        reason: &ctx.reason,
        mailbox: ctx.mailbox.as_deref(),
        // The context has neither yet: paging counts per mailbox, and impersonation is seen
        // when its refusal says so.
        folder: None,
        impersonation: ctx.reason.starts_with("impersonation "),
        ..Observation::new(ended.as_millis() as u64, ctx.conn.peer.ip(), ctx.decision)
    };
    detections(shared, &observation);
    if let Some(class) = ctx.failure {
        shared.link.report(Failure {
            source: ctx.conn.peer.ip(),
            group: ctx.conn.group.as_deref().map(str::to_string),
            class,
            reason: ctx.reason.chars().take(256).collect(),
            identity: ctx.identity(),
        });
    }
}

/// A connection refused before any request: at accept, or in the TLS handshake.
pub fn connection(
    shared: &Shared,
    peer: SocketAddr,
    group: Option<&str>,
    decision: Decision,
    reason: &str,
    failure: Option<FailureClass>,
) {
    let record = Record {
        kind: "connection",
        source: Some(peer.ip()),
        source_port: peer.port(),
        source_group: group,
        auth: "none",
        decision: decision.name(),
        reason,
        failure: failure.map(FailureClass::name),
        ..Default::default()
    };
    shared.audit.log_record(&record);
    shared.ops.record(&record);
    if decision == Decision::Deny {
        shared.metrics.refusal(reason, failure);
    }
    detections(
        shared,
        &Observation {
            group,
            failure,
            reason,
            ..Observation::new(now_ms(), peer.ip(), decision)
        },
    );
    if let Some(class) = failure {
        shared.link.report(Failure {
            source: peer.ip(),
            group: group.map(str::to_string),
            class,
            reason: reason.into(),
            identity: None,
        });
    }
}
