//! The packet layer's metrics, rendered by the agent (which owns the maps) when a scrape
//! asks for them over the proxy link. The per-CPU counters are summed at scrape time and
//! exposed as counters; the rest is read from the maps and the running config. Labels are
//! the program's own reason names, the config's group names and fixed map names.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use filter_common::Reason;
use prometheus_client::{
    encoding::{text::encode_registry, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    model::Config,
    packet::maps::{Maps, MapsError},
};

/// What the agent's reloads came to since it started.
#[derive(Debug, Clone, Default)]
pub struct ReloadStats {
    pub ok: u64,
    pub refused: u64,
    pub last_seconds: f64,
    /// Whether the last reload was applied (true before any reload: the start was).
    pub last_ok: Option<bool>,
    pub last_unix: u64,
}

impl ReloadStats {
    pub fn record(&mut self, ok: bool, took: Duration) {
        match ok {
            true => self.ok += 1,
            false => self.refused += 1,
        }
        self.last_seconds = took.as_secs_f64();
        self.last_ok = Some(ok);
        self.last_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    verdict: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListLabel {
    list: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The verdict a reason stands for. `fragment` and `monitor_passed` are counted beside the
/// verdict of the same packet, so they are `also`.
pub fn verdict(reason: &str) -> &'static str {
    if reason.starts_with("drop_") {
        "drop"
    } else if reason.starts_with("allow_") || reason == "not_bound" {
        "pass"
    } else {
        "also"
    }
}

fn gauge(v: f64) -> Gauge<f64, std::sync::atomic::AtomicU64> {
    let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    g.set(v);
    g
}

/// IPv4 /24s that hold a prefix longer than /24: one long-prefix block each.
fn long_prefix_blocks(config: &Config) -> usize {
    let mut slash24s: Vec<u32> = config
        .groups
        .iter()
        .flat_map(|g| &g.v4)
        .filter(|n| n.prefix_len() > 24)
        .map(|n| u32::from(n.network()) >> 8)
        .collect();
    slash24s.sort_unstable();
    slash24s.dedup();
    slash24s.len()
}

/// The packet layer's exposition, without `# EOF` (the proxy appends its own).
pub fn render(maps: &Maps, config: &Config, reloads: &ReloadStats) -> Result<String, MapsError> {
    let mut registry = Registry::default();
    let packets = Family::<PacketLabels, Counter>::default();
    for (reason, n) in maps.counters()? {
        let name = Reason::name(reason);
        packets
            .get_or_create(&PacketLabels {
                verdict: verdict(name),
                reason: name,
            })
            .inc_by(n);
    }
    registry.register(
        "ewsgate_packets",
        "Packets the XDP program judged, by verdict and reason (per-CPU counters summed)",
        packets,
    );
    let groups = Family::<GroupLabel, Counter>::default();
    let hits = maps.group_hits()?;
    for (i, g) in config.groups.iter().enumerate() {
        let n = hits.get(i + 1).copied().unwrap_or(0);
        groups
            .get_or_create(&GroupLabel {
                group: g.name.clone(),
            })
            .inc_by(n);
    }
    registry.register(
        "ewsgate_group_packets",
        "Packets passed by the XDP program, by source group",
        groups,
    );
    let settings = maps.settings()?;
    let cap = config.xdp.capacity;
    let fill = [
        (
            "block_exact",
            settings.block_exact as usize,
            cap.dynamic_entries,
        ),
        (
            "block_cidr",
            settings.block_cidr as usize,
            cap.dynamic_entries,
        ),
        (
            "allow_exact",
            settings.allow_exact as usize,
            cap.dynamic_entries,
        ),
        (
            "allow_cidr",
            settings.allow_cidr as usize,
            cap.dynamic_entries,
        ),
        (
            "ipv4_long_prefix_blocks",
            long_prefix_blocks(config),
            cap.long_prefix_blocks,
        ),
        (
            "ipv6_prefixes",
            config.groups.iter().map(|g| g.v6.len()).sum(),
            cap.ipv6_prefixes,
        ),
    ];
    let entries = Family::<MapLabel, Gauge>::default();
    let capacity = Family::<MapLabel, Gauge>::default();
    for (map, used, most) in fill {
        entries.get_or_create(&MapLabel { map }).set(used as i64);
        capacity
            .get_or_create(&MapLabel { map })
            .set(i64::from(most));
    }
    registry.register(
        "ewsgate_map_entries",
        "Entries in the packet layer's bounded tables",
        entries,
    );
    registry.register(
        "ewsgate_map_capacity",
        "Capacity of the packet layer's bounded tables ([xdp.capacity])",
        capacity,
    );
    let dynamic = Family::<ListLabel, Gauge>::default();
    dynamic
        .get_or_create(&ListLabel { list: "block" })
        .set(i64::from(settings.block_exact + settings.block_cidr));
    dynamic
        .get_or_create(&ListLabel { list: "allow" })
        .set(i64::from(settings.allow_exact + settings.allow_cidr));
    registry.register(
        "ewsgate_dynamic_entries",
        "Dynamic entries in the XDP block and allow sets, by list",
        dynamic,
    );
    let results = Family::<ResultLabel, Counter>::default();
    results
        .get_or_create(&ResultLabel { result: "ok" })
        .inc_by(reloads.ok);
    results
        .get_or_create(&ResultLabel { result: "refused" })
        .inc_by(reloads.refused);
    registry.register(
        "ewsgate_reloads",
        "Config reloads since the agent started, by result",
        results,
    );
    registry.register(
        "ewsgate_reload_duration_seconds",
        "How long the last reload took",
        gauge(reloads.last_seconds),
    );
    registry.register(
        "ewsgate_reload_last_success",
        "1 when the last reload was applied (or none was tried), 0 when it was refused",
        gauge(f64::from(u8::from(reloads.last_ok.unwrap_or(true)))),
    );
    registry.register(
        "ewsgate_reload_last_timestamp_seconds",
        "When the last reload was tried (Unix time; 0: never)",
        gauge(reloads.last_unix as f64),
    );
    registry.register(
        "ewsgate_generation",
        "The live generation of the XDP tables (0 or 1; flips on each applied reload)",
        gauge(f64::from(settings.generation)),
    );
    registry.register(
        "ewsgate_monitor_mode",
        "1 when the XDP program counts and drops nothing",
        gauge(f64::from(u8::from(settings.monitor != 0))),
    );
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode_registry(&mut out, &registry);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_a_verdict() {
        for r in Reason::ALL {
            let v = verdict(r.name());
            assert!(["pass", "drop", "also"].contains(&v));
        }
        assert_eq!(verdict("drop_blocked"), "drop");
        assert_eq!(verdict("allow_group"), "pass");
        assert_eq!(verdict("fragment"), "also");
    }
}
