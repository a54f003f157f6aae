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

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use crate::config::{Bundle, Config};

    /// A config with `[proxy]` (its files as placeholder bytes: only their presence is
    /// checked here) followed by `tail`.
    fn parse(proxy: bool, tail: &str) -> Result<Config, String> {
        let dir = Path::new("/etc/ewsgate");
        let head = match proxy {
            true => "[proxy]\nlisten = [\"192.0.2.10:443\"]\ncertificate = \"gate.pem\"\nprivate_key = \"gate.key\"\nupstream = \"http://127.0.0.1:8080\"\n",
            false => "",
        };
        let mut bundle = Bundle {
            path: dir.join("ewsgate.toml"),
            text: format!("{head}{tail}"),
            ..Default::default()
        };
        for f in ["gate.pem", "gate.key"] {
            bundle
                .files
                .insert(PathBuf::from(dir).join(f), b"x".to_vec());
        }
        Config::from_bundle(&bundle).map_err(|e| e.to_string())
    }

    #[test]
    fn the_listen_address_defaults_to_loopback_and_is_checked() {
        let c = parse(true, "[metrics]\n").unwrap();
        assert_eq!(c.metrics.unwrap().listen.to_string(), "127.0.0.1:9464");
        let c = parse(true, "[metrics]\nlisten = \"[::1]:9100\"\n").unwrap();
        assert_eq!(c.metrics.unwrap().listen.to_string(), "[::1]:9100");
        assert!(parse(true, "").unwrap().metrics.is_none());
    }

    #[test]
    fn bad_metrics_settings_name_their_line_and_column() {
        let e = parse(false, "[metrics]\nlisten = \"localhost:9464\"\n").unwrap_err();
        assert!(
            e.contains("ewsgate.toml:2:10") && e.contains("not an address"),
            "{e}"
        );
        let e = parse(false, "\n[metrics]\n").unwrap_err();
        assert!(
            e.contains("ewsgate.toml:2:1") && e.contains("needs [proxy]"),
            "{e}"
        );
        let e = parse(true, "[metrics]\nlisten = \"192.0.2.10:443\"\n").unwrap_err();
        assert!(
            e.contains(":7:10") && e.contains("also a [proxy] listen"),
            "{e}"
        );
        let e = parse(true, "[metrics]\nlisten = \"127.0.0.1:0\"\n").unwrap_err();
        assert!(e.contains("port 0"), "{e}");
        let e = parse(true, "[metrics]\nport = 9464\n").unwrap_err();
        assert!(e.contains(":7:1") && e.contains("unknown field"), "{e}");
    }
}
