//! Plumbing for the layers that open connections of their own.

pub mod tls;
