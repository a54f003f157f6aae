//! `[metrics]`: where `GET /metrics` is served (see `proxy::metrics` and `agent::metrics`).

use std::net::SocketAddr;

/// The default scrape address: loopback, Prometheus' port range for exporters.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    /// Bound by the agent, served by the proxy.
    pub listen: SocketAddr,
}
