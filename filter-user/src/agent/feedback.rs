//! Feedback into XDP: failures per source (bad or expired tokens, denied requests, failed TLS
//! handshakes, malformed HTTP) are counted in a sliding window. Past the threshold the source
//! earns a block: the daemon puts it in the XDP block set with a TTL and a reason, so its
//! next packets never reach user space.
//!
//! The window is split into `BUCKETS` sub-intervals, so memory per source is fixed and old
//! failures slide out in steps of window/BUCKETS. The number of sources tracked is bounded:
//! a flood of spoofed sources evicts the quietest first, never grows without end.

use std::{collections::HashMap, net::IpAddr};

const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Length of the sliding window, in milliseconds.
    pub window_ms: u64,
    /// Failures within the window that earn a block.
    pub threshold: u32,
    /// Lifetime of the block, in seconds.
    pub block_ttl_secs: u64,
    /// Sources tracked at most.
    pub max_sources: usize,
}

/// A block the daemon should apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub source: IpAddr,
    pub ttl_secs: u64,
    pub reason: String,
}

struct Window {
    counts: [u32; BUCKETS],
    /// Index of the sub-interval that `counts` ends at.
    head: u64,
    last_ms: u64,
}

impl Window {
    fn advance(&mut self, tick: u64) {
        let gap = tick.saturating_sub(self.head);
        for i in 1..=gap.min(BUCKETS as u64) {
            self.counts[((self.head + i) % BUCKETS as u64) as usize] = 0;
        }
        self.head = self.head.max(tick);
    }

    fn total(&self) -> u32 {
        self.counts.iter().sum()
    }
}

pub struct Failures {
    settings: Settings,
    sources: HashMap<IpAddr, Window>,
}

impl Failures {
    pub fn new(settings: Settings) -> Failures {
        Failures {
            settings,
            sources: HashMap::new(),
        }
    }

    fn tick(&self, now_ms: u64) -> u64 {
        now_ms / (self.settings.window_ms / BUCKETS as u64).max(1)
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Records one failure; returns the block to apply when this one crosses the threshold.
    /// A threshold of 0 turns blocking off.
    pub fn record(&mut self, source: IpAddr, reason: &str, now_ms: u64) -> Option<Block> {
        if self.settings.threshold == 0 {
            return None;
        }
        let tick = self.tick(now_ms);
        if !self.sources.contains_key(&source) {
            self.make_room(now_ms);
        }
        let w = self.sources.entry(source).or_insert(Window {
            counts: [0; BUCKETS],
            head: tick,
            last_ms: now_ms,
        });
        w.advance(tick);
        w.counts[(tick % BUCKETS as u64) as usize] += 1;
        w.last_ms = now_ms;
        let total = w.total();
        if total < self.settings.threshold {
            return None;
        }
        // Blocked from here on; a source that comes back after the TTL starts afresh.
        self.sources.remove(&source);
        Some(Block {
            source,
            ttl_secs: self.settings.block_ttl_secs,
            reason: format!(
                "{total} failures within {} s, last: {reason}",
                self.settings.window_ms / 1000
            ),
        })
    }

    /// Failures currently counted for a source.
    pub fn count(&self, source: IpAddr, now_ms: u64) -> u32 {
        let tick = self.tick(now_ms);
        self.sources.get(&source).map_or(0, |w| {
            let mut copy = Window {
                counts: w.counts,
                head: w.head,
                last_ms: w.last_ms,
            };
            copy.advance(tick);
            copy.total()
        })
    }

    pub fn tracked(&self) -> usize {
        self.sources.len()
    }

    fn make_room(&mut self, now_ms: u64) {
        if self.sources.len() < self.settings.max_sources {
            return;
        }
        let window = self.settings.window_ms;
        self.sources
            .retain(|_, w| now_ms.saturating_sub(w.last_ms) < window);
        if self.sources.len() >= self.settings.max_sources {
            // All recent: drop the eighth seen longest ago.
            let mut seen: Vec<u64> = self.sources.values().map(|w| w.last_ms).collect();
            seen.sort_unstable();
            let cutoff = seen[(seen.len() / 8).min(seen.len() - 1)];
            self.sources.retain(|_, w| w.last_ms > cutoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            window_ms: 10_000,
            threshold: 5,
            block_ttl_secs: 600,
            max_sources: 100,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_threshold_failure_earns_one_block() {
        let mut f = Failures::new(settings());
        let src = ip("203.0.113.9");
        for i in 0..4 {
            assert_eq!(f.record(src, "token_expired", i * 100), None);
        }
        let block = f
            .record(src, "token_bad_signature", 500)
            .expect("fifth failure blocks");
        assert_eq!(block.source, src);
        assert_eq!(block.ttl_secs, 600);
        assert_eq!(
            block.reason,
            "5 failures within 10 s, last: token_bad_signature"
        );
        assert_eq!(
            f.count(src, 600),
            0,
            "the source starts afresh once blocked"
        );
    }

    #[test]
    fn old_failures_slide_out_of_the_window() {
        let mut f = Failures::new(settings());
        let src = ip("2001:db8:300::9");
        for i in 0..4 {
            assert_eq!(f.record(src, "denied", i * 1000), None);
        }
        assert_eq!(f.count(src, 3_500), 4);
        // 11 s after the first: the first two have slid out.
        assert_eq!(f.count(src, 11_000), 2);
        assert_eq!(
            f.record(src, "denied", 11_000),
            None,
            "3 in the window, below 5"
        );
        assert_eq!(f.count(src, 30_000), 0);
    }

    #[test]
    fn sources_are_counted_apart() {
        let mut f = Failures::new(settings());
        for i in 0..4 {
            assert_eq!(f.record(ip("203.0.113.1"), "denied", i), None);
            assert_eq!(f.record(ip("203.0.113.2"), "denied", i), None);
        }
        assert!(f.record(ip("203.0.113.1"), "denied", 10).is_some());
        assert_eq!(f.count(ip("203.0.113.2"), 10), 4);
    }

    #[test]
    fn tracked_sources_are_bounded() {
        let mut f = Failures::new(settings());
        for i in 0..1000u32 {
            let src = IpAddr::from([203, 0, 113, (i % 250) as u8]);
            let src = if i < 250 {
                src
            } else {
                IpAddr::from(std::net::Ipv6Addr::from(
                    0x2001_0db8_0300_0000_0000_0000_0000_0000u128 + i as u128,
                ))
            };
            f.record(src, "denied", i as u64);
        }
        assert!(f.tracked() <= 100, "{}", f.tracked());
    }
}
