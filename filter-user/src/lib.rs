//! ewsgate: an EWS firewall filter. The XDP program drops packets bound for a protected
//! endpoint unless their source is allowed; this crate loads it, keeps its maps, and
//! offers the daemon and the CLI that drive it.

pub mod audit;
pub mod auth;
pub mod config;
pub mod content;
pub mod control;
pub mod daemon;
pub mod entra;
pub mod feedback;
pub mod fetch;
pub mod jwt;
pub mod maps;
pub mod metadata;
pub mod paths;
pub mod policy;
pub mod proxy;
pub mod soap;
pub mod spnego;
pub mod strict;
pub mod tables;
pub mod tls;
pub mod token_cache;
pub mod tokens;
pub mod xdp;
