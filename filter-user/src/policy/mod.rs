//! Judging a request: the ordered rules, the source groups, and what an EWS request touches
//! (operation, data types, mailbox) with what Exchange's answers taught of opaque IDs.

pub mod content;
pub mod rules;
