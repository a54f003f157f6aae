//! Who a request is from: the `Authorization` header (Negotiate read by its DER structure),
//! client certificates, Exchange callback tokens, Entra ID tokens, their signing keys and the
//! cache of verified tokens.

pub mod auth;
pub mod entra;
pub mod jwt;
pub mod metadata;
pub mod spnego;
pub mod stats;
pub mod token_cache;
pub mod tokens;
