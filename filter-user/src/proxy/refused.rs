//! Identities refused at the request layer for a while: what the agent decides when an
//! identity keeps failing from an address that must not be blocked (a shared egress, an
//! office behind NAT). Bounded: past the cap the entry closest to lapsing goes first.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

const MAX_ENTRIES: usize = 100_000;

#[derive(Default)]
pub struct Refused {
    entries: Mutex<HashMap<String, (Instant, String)>>,
    /// Entries held, read without the lock: nearly always zero.
    count: AtomicUsize,
}

impl Refused {
    /// Why `identity` is refused, while it is.
    pub fn check(&self, identity: &str) -> Option<String> {
        let entries = self.entries.lock().ok()?;
        let (until, why) = entries.get(identity)?;
        (Instant::now() < *until).then(|| why.clone())
    }

    pub fn add(&self, identity: String, secs: u64, reason: String) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        let now = Instant::now();
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (until, _)| *until > now);
        }
        if entries.len() >= MAX_ENTRIES {
            let soonest = entries
                .iter()
                .min_by_key(|(_, (u, _))| *u)
                .map(|(k, _)| k.clone());
            if let Some(k) = soonest {
                entries.remove(&k);
            }
        }
        entries.insert(identity, (now + Duration::from_secs(secs), reason));
        self.count.store(entries.len(), Ordering::Relaxed);
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// True when no identity is refused: the request path skips the lookup.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_lapse() {
        let r = Refused::default();
        r.add("user:alice".into(), 60, "10 credential failures".into());
        r.add("user:bob".into(), 0, "lapsed".into());
        assert_eq!(
            r.check("user:alice").as_deref(),
            Some("10 credential failures")
        );
        assert_eq!(r.check("user:bob"), None);
        assert_eq!(r.check("user:carol"), None);
    }
}
