//! What operators read: the audit log.

pub mod audit;
