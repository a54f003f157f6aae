//! Logging: the last phase. The audit line and the failure report are written here, once,
//! from the request's context, so every consumer reads the same account of what happened.

use std::net::SocketAddr;

use crate::{
    ipc::Failure,
    model::outcome::{Decision, FailureClass},
    ops::audit::{Record, Shadow},
    proxy::{context::Ctx, Shared},
};

pub fn run(shared: &Shared, ctx: &Ctx) {
    let shadow = ctx.shadow.as_ref().map(|(d, rule, reason)| Shadow {
        decision: d.name(),
        rule: rule.as_deref(),
        reason,
    });
    let record = Record {
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
        duration_ms: ctx.started.elapsed().as_secs_f64() * 1000.0,
        upstream_ms: ctx.upstream_ms,
        user_agent: ctx.user_agent.as_deref(),
        connection: ctx.conn.id,
        ..Default::default()
    };
    shared.audit.log(&record);
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
    shared.audit.log(&Record {
        kind: "connection",
        source: Some(peer.ip()),
        source_port: peer.port(),
        source_group: group,
        auth: "none",
        decision: decision.name(),
        reason,
        failure: failure.map(FailureClass::name),
        ..Default::default()
    });
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
