//! The domain model: rules, authentication kinds, EWS data types and operation classes,
//! settings. Plain data and pure functions, no I/O; every other layer builds on it.

pub mod agent;
pub mod auth;
pub mod config;
pub mod ews;
pub mod metrics;
pub mod fleet;
pub mod ops;
pub mod outcome;
pub mod packet;
pub mod paths;
pub mod rules;
pub mod settings;

pub use config::Config;
