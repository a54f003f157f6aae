//! Operations: what the gate tells the people who run it.
//!
//! - `audit`: the audit record, one JSON line per decision;
//! - `detections`: signals over the stream of decisions (the same user from two places,
//!   failure bursts, password spray, mailbox sweeps, ...), each with an optional action;
//! - `report`: a summary of audit files, as text, JSON or one self-contained HTML page;
//! - `sinks`: where the audit lines go (files that survive rotation, journald, syslog).
//!
//! Each takes plain inputs (an `Observation` per decision, audit lines, serialisable
//! records), so the request path's final logging phase feeds them without knowing more.

pub mod audit;
pub mod detections;
pub mod report;
mod report_html;
pub mod sinks;
mod window;

pub use detections::{Decision, Failure};
