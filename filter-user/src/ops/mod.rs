//! Operations: what the gate tells the people who run it.
//!
//! - `audit`: the audit record, one JSON line per decision;
//! - `detections`: signals over the stream of decisions (the same user from two places,
//!   failure bursts, password spray, mailbox sweeps, ...), each with an optional action;
//! - `manual`: the man pages and shell completions, generated from the CLI;
//! - `report`: a summary of audit files, as text, JSON or one self-contained HTML page;
//! - `sinks`: where the audit lines go (files that survive rotation, journald, syslog).
//!
//! Each takes plain inputs (an `Observation` per decision, audit lines, serialisable
//! records), so the request path's final logging phase feeds them without knowing more.

pub mod audit;
pub mod detections;
pub mod explain;
pub mod manual;
pub mod report;
mod report_html;
pub mod sinks;
mod window;

pub use detections::{Decision, Failure};

use std::{
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
};

use serde::Serialize;

use crate::model::ops::{AuditSettings, DetectionSettings, OpsSettings};
use detections::{Detection, Engine, Observation};
use sinks::{Lag, Sinks};

/// What each decision goes through besides the audit file: the other sinks of `[audit]`
/// (journald, syslog) and the detection engine. The proxy's logging phase feeds it.
pub struct Pipeline {
    audit: AuditSettings,
    sinks: Option<Sinks>,
    engine: Mutex<Engine>,
    /// In a fleet: only then are sightings worth making, on every verified request.
    fleet: AtomicBool,
}

impl Pipeline {
    pub fn open(ops: &OpsSettings) -> io::Result<Pipeline> {
        let network = ops.audit.network();
        let sinks = match network.is_empty() {
            true => None,
            false => Some(Sinks::open(&AuditSettings {
                sinks: network,
                buffer_bytes: ops.audit.buffer_bytes,
            })?),
        };
        Ok(Pipeline {
            audit: ops.audit.clone(),
            sinks,
            engine: Mutex::new(Engine::new(ops.detections.clone())),
            fleet: AtomicBool::new(false),
        })
    }

    /// Queues an audit line (a record or a detection) on the sinks. A full sink's refusal is
    /// counted and logged by the sink.
    pub fn record<T: Serialize + ?Sized>(&self, line: &T) {
        if let Some(s) = &self.sinks {
            let _ = s.write(line);
        }
    }

    /// Runs one decision through the detections.
    pub fn observe(&self, o: &Observation) -> Vec<Detection> {
        match self.engine.lock() {
            Ok(mut e) => e.observe(o),
            Err(_) => Vec::new(),
        }
    }

    /// What this gate publishes to the fleet about a decision: a verified user's place.
    pub fn sighting(&self, o: &Observation) -> Option<detections::Sighting> {
        if !self.fleet.load(Ordering::Relaxed) {
            return None;
        }
        self.engine.lock().ok()?.sighting(o)
    }

    /// Another gate's sighting, compared with what this gate saw (`two-places`).
    pub fn observe_remote(&self, s: &detections::Sighting) -> Vec<Detection> {
        match self.engine.lock() {
            Ok(mut e) => e.observe_remote(s),
            Err(_) => Vec::new(),
        }
    }

    /// The worst sink's lag, when there are sinks.
    pub fn lag(&self) -> Option<Lag> {
        self.sinks.as_ref().map(Sinks::lag)
    }

    /// Whether a new config can be taken without a restart: sinks are opened once.
    pub fn check(&self, ops: &OpsSettings) -> Result<(), String> {
        match ops.audit == self.audit {
            true => Ok(()),
            false => Err("[audit] sinks change only with a restart".into()),
        }
    }

    /// Whether the gate is in a fleet, so that its sightings go anywhere.
    pub fn set_fleet(&self, on: bool) {
        self.fleet.store(on, Ordering::Relaxed);
    }

    /// New detection settings: the engine starts afresh when they changed.
    pub fn set_detections(&self, settings: &DetectionSettings) {
        if let Ok(mut e) = self.engine.lock() {
            if e.settings() != settings {
                *e = Engine::new(settings.clone());
            }
        }
    }

    /// Waits a moment for the sinks to empty (at shutdown).
    pub fn flush(&self) {
        if let Some(s) = &self.sinks {
            s.flush(std::time::Duration::from_secs(2));
        }
    }
}
