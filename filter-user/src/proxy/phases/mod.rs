//! A request's life, in the order it meets the phases. Each phase is a function of the
//! request's context ([`Ctx`](crate::proxy::context::Ctx)) and writes what it learns there:
//!
//! 1. `request_filter`: the head (framing, `Host`, target, path, query, `Authorization`);
//! 2. `identity`: who it is from (sessions, certificates, tokens, refused identities);
//! 3. `policy`: the rules, judged once;
//! 4. `body_filter`: the EWS SOAP body and the content rules;
//! 5. `upstream`: the connection to Exchange (pooled or bound) and the request sent;
//! 6. `response_filter`: Exchange's answer, inspected or streamed to the client;
//! 7. `logging`: the audit line and the failure report, from the context, once.
//!
//! Accepting the connection and its TLS handshake come before these (`accept`,
//! `handshake`).

pub mod body_filter;
pub mod identity;
pub mod logging;
pub mod policy;
pub mod request_filter;
pub mod response_filter;
pub mod upstream;
