//! The root agent: owns the XDP program and its maps, the control socket, reloads, the
//! failure feedback into the block set, and the proxy process it starts and supervises.

pub mod control;
pub mod daemon;
pub mod feedback;
pub mod supervisor;
pub mod worker;
