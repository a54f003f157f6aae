//! Identity: who the request is from. Basic and NTLM name their user; an NTLM, Negotiate or
//! Kerberos session on the connection bound to this client carries on; a client
//! certificate names its subject; a bearer token must verify (signing keys fetched again first when it names an unknown one). An
//! identity the agent has refused for repeated failures is refused here.

use std::sync::Arc;

use crate::{
    identity::{
        auth::{Credential, NtlmStage},
        tokens::{Family, Verified},
    },
    model::auth::{AuthKind, TokenKind},
    proxy::{
        context::{Ctx, Refusal, Session},
        phases::request_filter::Req,
        session::Conn,
        state::State,
        Shared,
    },
};

pub async fn run(
    shared: &Shared,
    state: &State,
    conn: &mut Conn,
    req: &Req,
    ctx: &mut Ctx,
) -> Result<(), Refusal> {
    match &req.credential {
        Credential::None | Credential::Invalid(_) => {
            if let Some(s) = conn.bound.as_ref().and_then(|up| up.session.as_ref()) {
                ctx.auth = s.kind;
                ctx.user = s.user.clone();
            } else if let Some(cert) = &conn.info.client_cert {
                ctx.auth = AuthKind::ClientCert;
                ctx.user = Some(cert.clone());
            }
        }
        Credential::Basic { user } => ctx.user = Some(user.as_str().into()),
        Credential::Ntlm { stage, .. } => match stage {
            NtlmStage::Authenticate { user } => {
                let user: Arc<str> = user.as_str().into();
                ctx.user = Some(user.clone());
                ctx.pending_session = Some(Session {
                    kind: ctx.auth,
                    user: Some(user),
                });
            }
            NtlmStage::Negotiate | NtlmStage::Other => ctx.handshake = true,
        },
        // Exchange keeps the ticket's user on the connection (IIS persists Kerberos
        // authentication by default): the requests after it without a header are Kerberos
        // too, and are judged as such.
        Credential::Kerberos => {
            ctx.pending_session = Some(Session {
                kind: AuthKind::Kerberos,
                user: None,
            })
        }
        Credential::Bearer { token } => {
            // A token that keeps failing is refused before its signature is checked again.
            if !shared.refused.is_empty() {
                ctx.failed_token = Some(token_tag(token));
                refused_identity(shared, ctx)?;
                ctx.failed_token = None;
            }
            bearer(state, conn, token, ctx).await?;
        }
    }
    refused_identity(shared, ctx)
}

async fn bearer(state: &State, conn: &mut Conn, token: &str, ctx: &mut Ctx) -> Result<(), Refusal> {
    let Some(cache) = &state.tokens else {
        return Err(Refusal::credential(401, "token_no_pinned_keys"));
    };
    let now = ctx.unix_secs();
    let leeway = state.config.tokens.expect.leeway;
    if let Some((policy, last, v)) = &conn.last_token {
        // The same token under the same policy, still within its life: as the cache would
        // answer, without hashing it again. A new policy (new keys, say) verifies anew.
        if *policy == state.id && **last == *token && now <= v.expires.saturating_add(leeway) {
            accept(v, ctx);
            return Ok(());
        }
    }
    // A key ewsgate has not seen is fetched again (rate limited) before the token is refused,
    // as Exchange's or Entra's signing key may just have rotated.
    // Boxed: a verification that may fetch signing keys is kilobytes of future, and every
    // request's future would carry that room though most reuse the connection's last token.
    let verified = Box::pin(cache.verify_for_ews_fresh(token, now)).await;
    match verified {
        Ok(v) => {
            accept(&v, ctx);
            conn.last_token = Some((state.id, token.into(), v));
            Ok(())
        }
        Err(e) => {
            // What a failure counts against: this token alone. Its claims are unverified
            // and could name anyone, so they are never held against that someone.
            ctx.token_item = None;
            ctx.failed_token = Some(token_tag(token));
            Err(Refusal::credential(401, e.reason()))
        }
    }
}

fn accept(v: &Verified, ctx: &mut Ctx) {
    ctx.token = Some(match v.family {
        Family::Entra => TokenKind::Entra,
        _ => TokenKind::Callback,
    });
    ctx.token_item.clone_from(&v.item);
    ctx.user.clone_from(&v.user);
}

/// A short, stable tag of a token that failed: the first 16 hex digits of its SHA-256.
fn token_tag(token: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn refused_identity(shared: &Shared, ctx: &Ctx) -> Result<(), Refusal> {
    if shared.refused.is_empty() {
        return Ok(());
    }
    let Some(identity) = ctx.identity() else {
        return Ok(());
    };
    match shared.refused.check(&identity) {
        Some(why) => Err(Refusal::service(403, format!("identity_refused: {why}"))),
        None => Ok(()),
    }
}
