//! The root agent: owns the XDP program and its maps, the control socket, reloads and the
//! failure feedback into the block set.

pub mod control;
pub mod daemon;
pub mod feedback;
