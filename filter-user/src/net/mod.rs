//! Plumbing for the layers that open connections of their own.

pub mod http;
pub mod tls;
