//! The root agent: owns the XDP program and its maps, the control socket, reloads, the
//! failure feedback into the block set, and the proxy process it starts and supervises;
//! follows live range feeds and a CrowdSec Local API, and records who holds each block
//! entry; shares blocks, allows, failure counts and config with a fleet through etcd.

pub mod claims;
pub mod control;
pub mod crowdsec;
pub mod daemon;
pub mod feedback;
pub mod feeds;
pub mod metrics;
pub mod fleet;
pub mod supervisor;
pub mod tasks;
pub mod worker;
