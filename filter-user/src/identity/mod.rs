//! Who a request is from: the `Authorization` header, client certificates, Exchange callback
//! tokens, Entra ID tokens, their signing keys and the cache of verified tokens.

pub mod auth;
pub mod entra;
pub mod metadata;
pub mod token_cache;
pub mod tokens;
