//! `[fleet]`: the etcd cluster this gate shares blocks, allows, failure counts and config
//! revisions with (see `model::fleet` and `agent::fleet`).

use std::{path::Path, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Locator};
use crate::model::fleet::{valid_gate, FleetSettings, FleetTls, DEFAULT_PREFIX};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    endpoints: Spanned<Vec<String>>,
    gate: Spanned<String>,
    prefix: Option<Spanned<String>>,
    ca: Option<Spanned<String>>,
    certificate: Option<Spanned<String>>,
    private_key: Option<Spanned<String>>,
    timeout_ms: Option<Spanned<u64>>,
    session_ttl_secs: Option<Spanned<u64>>,
}

impl RawFleet {
    pub(super) fn validate(
        self,
        here: &Locator,
        base: &Path,
    ) -> Result<FleetSettings, ConfigError> {
        if self.endpoints.get_ref().is_empty() {
            return Err(here.at(&self.endpoints, "endpoints is empty: name the etcd members"));
        }
        let tls = self.tls(here, base)?;
        for e in self.endpoints.get_ref() {
            check_endpoint(e, tls.is_some()).map_err(|m| here.at(&self.endpoints, m))?;
        }
        valid_gate(self.gate.get_ref()).map_err(|m| here.at(&self.gate, m))?;
        let prefix = match &self.prefix {
            Some(p) => {
                let v = p.get_ref().trim_end_matches('/');
                if !v.starts_with('/') || v.len() < 2 || v.contains("//") {
                    return Err(here.at(
                        p,
                        "prefix must start with '/' and name something, like \"/ewsgate\"",
                    ));
                }
                v.to_string()
            }
            None => DEFAULT_PREFIX.into(),
        };
        let within =
            |v: &Option<Spanned<u64>>, name: &str, min: u64, max: u64, default: u64| match v {
                Some(s) if !(min..=max).contains(s.get_ref()) => Err(here.at(
                    s,
                    format!("{name} = {}: must be {min}..={max}", s.get_ref()),
                )),
                Some(s) => Ok(*s.get_ref()),
                None => Ok(default),
            };
        Ok(FleetSettings {
            endpoints: self.endpoints.get_ref().clone(),
            tls,
            prefix,
            gate: self.gate.into_inner(),
            timeout: Duration::from_millis(within(
                &self.timeout_ms,
                "timeout_ms",
                100,
                60_000,
                2_000,
            )?),
            session_ttl: Duration::from_secs(within(
                &self.session_ttl_secs,
                "session_ttl_secs",
                2,
                600,
                10,
            )?),
        })
    }

    fn tls(&self, here: &Locator, base: &Path) -> Result<Option<FleetTls>, ConfigError> {
        match (&self.ca, &self.certificate, &self.private_key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => {
                let (ca, _) = here.file(base, ca)?;
                let (certificate, _) = here.file(base, cert)?;
                let (private_key, _) = here.file(base, key)?;
                Ok(Some(FleetTls {
                    ca,
                    certificate,
                    private_key,
                }))
            }
            _ => {
                let at = [&self.ca, &self.certificate, &self.private_key]
                    .into_iter()
                    .flatten()
                    .next()
                    .map_or(0, |s| s.span().start);
                Err(here.error(
                    at,
                    "[fleet] TLS needs all of ca, certificate and private_key",
                ))
            }
        }
    }
}

/// `http://HOST:PORT` without TLS settings, `https://HOST:PORT` with them: a fleet never
/// mixes, and never sends its keys in clear to a member that was meant to be TLS.
fn check_endpoint(e: &str, tls: bool) -> Result<(), String> {
    let uri: http::Uri = e
        .parse()
        .map_err(|_| format!("endpoint '{e}' is not a URL"))?;
    if uri.host().is_none_or(str::is_empty) || uri.port_u16().is_none() {
        return Err(format!("endpoint '{e}': expected http(s)://HOST:PORT"));
    }
    if uri
        .path_and_query()
        .is_some_and(|p| !matches!(p.as_str(), "" | "/"))
    {
        return Err(format!("endpoint '{e}': no path, just http(s)://HOST:PORT"));
    }
    match (uri.scheme_str(), tls) {
        (Some("https"), true) | (Some("http"), false) => Ok(()),
        (Some("https"), false) => Err(format!(
            "endpoint '{e}' is https: set ca, certificate and private_key"
        )),
        (Some("http"), true) => Err(format!(
            "endpoint '{e}' is plain http, but TLS is set: use https://"
        )),
        _ => Err(format!("endpoint '{e}': expected http:// or https://")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;

    fn parse(fleet: &str) -> Result<Config, String> {
        let text = format!("[xdp]\ninterfaces = [\"lo\"]\n\n{fleet}");
        Config::parse(Path::new("/nonexistent/ewsgate.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_fleet_section_is_read_and_checked_with_its_place() {
        let c =
            parse("[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\ngate = \"gw-1\"\n").unwrap();
        let f = c.fleet.unwrap();
        assert_eq!((f.prefix.as_str(), f.gate.as_str()), ("/ewsgate", "gw-1"));
        assert_eq!(f.timeout, Duration::from_secs(2));
        assert!(
            parse("").unwrap().fleet.is_none(),
            "no [fleet]: a standalone gate"
        );
        let e = parse("[fleet]\nendpoints = [\"https://127.0.0.1:2379\"]\ngate = \"gw-1\"\n")
            .unwrap_err();
        assert!(
            e.starts_with("/nonexistent/ewsgate.toml:5:13: ") && e.contains("set ca"),
            "{e}"
        );
        let e = parse("[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\ngate = \"a/b\"\n")
            .unwrap_err();
        assert!(e.contains(":6:8: gate name 'a/b'"), "{e}");
        let e = parse("[fleet]\nendpoints = []\ngate = \"g\"\n").unwrap_err();
        assert!(e.contains("endpoints is empty"), "{e}");
        let e = parse(
            "[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\ngate = \"g\"\nca = \"ca.pem\"\n",
        )
        .unwrap_err();
        assert!(e.contains(":7:6: [fleet] TLS needs all"), "{e}");
        let e = parse(
            "[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\ngate = \"g\"\ntimeout_ms = 5\n",
        )
        .unwrap_err();
        assert!(e.contains("timeout_ms = 5: must be 100..=60000"), "{e}");
        let e =
            parse("[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\ngate = \"g\"\nsurprise = 1\n")
                .unwrap_err();
        assert!(e.contains("unknown field `surprise`"), "{e}");
    }
}
