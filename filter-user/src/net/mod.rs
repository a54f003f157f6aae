//! Plumbing for the layers that open connections of their own.

pub mod http;
pub mod sock;
pub mod tls;
