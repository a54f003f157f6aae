//! ewsgate: an EWS firewall filter. The XDP program drops packets bound for a protected
//! endpoint unless their source is allowed; this crate loads it, keeps its maps, and
//! offers the agent, the proxy and the CLI that drive it.
//!
//! Layers, each importing only those listed before it: `model` (plain data, no I/O),
//! `config` (file → model), `net` (TLS plumbing), `soap`, `identity`, `policy`, `packet`,
//! `ops`, `ipc` (agent ↔ proxy), `proxy`, `agent`.

pub mod agent;
pub mod config;
pub mod identity;
pub mod ipc;
pub mod model;
pub mod net;
pub mod ops;
pub mod packet;
pub mod policy;
pub mod proxy;
pub mod soap;
