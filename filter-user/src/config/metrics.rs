//! `[metrics]`: the scrape address. The proxy serves it, so a config without `[proxy]` has
//! nobody to serve it and is refused rather than silently left without metrics.

use std::net::SocketAddr;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Locator};
use crate::model::{
    metrics::{MetricsSettings, DEFAULT_LISTEN},
    settings::ProxySettings,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    listen: Option<Spanned<String>>,
}

impl RawMetrics {
    pub(super) fn validate(
        self,
        here: &Locator,
        at: usize,
        proxy: Option<&ProxySettings>,
    ) -> Result<MetricsSettings, ConfigError> {
        let listen = match &self.listen {
            Some(l) => l.get_ref().parse::<SocketAddr>().map_err(|_| {
                here.at(
                    l,
                    format!(
                        "listen = \"{}\": not an address and port (such as \"{DEFAULT_LISTEN}\")",
                        l.get_ref()
                    ),
                )
            })?,
            None => DEFAULT_LISTEN.parse().expect("the default metrics address"),
        };
        let err_at = |message: String| match &self.listen {
            Some(l) => here.at(l, message),
            None => here.error(at, message),
        };
        let Some(proxy) = proxy else {
            return Err(err_at(
                "[metrics] needs [proxy]: the proxy serves /metrics".into(),
            ));
        };
        if listen.port() == 0 {
            return Err(err_at(format!("listen = \"{listen}\": port 0")));
        }
        if proxy.listen.contains(&listen) {
            return Err(err_at(format!(
                "listen = \"{listen}\" is also a [proxy] listen address"
            )));
        }
        Ok(MetricsSettings { listen })
    }
}
