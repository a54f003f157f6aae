//! `[crowdsec]`: the CrowdSec Local API ewsgate follows as a bouncer (see `agent::crowdsec`).

use std::{net::IpAddr, path::Path, time::Duration};

use http::Uri;
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Locator};
use crate::model::agent::{CrowdSecSettings, Secret};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCrowdSec {
    lapi_url: Spanned<String>,
    api_key: Option<Spanned<String>>,
    api_key_file: Option<Spanned<String>>,
    lapi_ca: Option<String>,
    poll_secs: Option<Spanned<u64>>,
    timeout_ms: Option<Spanned<u64>>,
    max_bytes: Option<Spanned<u64>>,
    scopes: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    origins: Vec<String>,
    #[serde(default)]
    scenarios_containing: Vec<String>,
    #[serde(default)]
    scenarios_not_containing: Vec<String>,
}

impl RawCrowdSec {
    pub(super) fn validate(
        self,
        here: &Locator,
        base: &Path,
    ) -> Result<CrowdSecSettings, ConfigError> {
        let url = self.lapi_url.get_ref().trim_end_matches('/').to_string();
        check_lapi_url(&url).map_err(|m| here.at(&self.lapi_url, m))?;
        let api_key = match (&self.api_key, &self.api_key_file) {
            (Some(k), None) => k.get_ref().trim().to_string(),
            (None, Some(f)) => {
                let path = base.join(f.get_ref());
                std::fs::read_to_string(&path)
                    .map_err(|e| here.at(f, format!("cannot read {}: {e}", path.display())))?
                    .trim()
                    .to_string()
            }
            _ => {
                return Err(here.at(
                    &self.lapi_url,
                    "[crowdsec] needs exactly one of api_key and api_key_file",
                ))
            }
        };
        let key_at = self.api_key.as_ref().or(self.api_key_file.as_ref());
        if api_key.is_empty() || !api_key.bytes().all(|b| b.is_ascii_graphic()) {
            let at = key_at.map_or(0, |s| s.span().start);
            return Err(here.error(
                at,
                "the CrowdSec API key must be printable ASCII without spaces",
            ));
        }
        let within =
            |v: &Option<Spanned<u64>>, name: &str, min: u64, max: u64, default: u64| match v {
                Some(s) if !(min..=max).contains(s.get_ref()) => Err(here.at(
                    s,
                    format!("{name} = {}: must be {min}..={max}", s.get_ref()),
                )),
                Some(s) => Ok(*s.get_ref()),
                None => Ok(default),
            };
        let scopes = match &self.scopes {
            Some(s) => {
                let mut out = Vec::new();
                for scope in s.get_ref() {
                    match scope.to_ascii_lowercase().as_str() {
                        v @ ("ip" | "range") if !out.iter().any(|o| o == v) => out.push(v.to_string()),
                        "ip" | "range" => {}
                        _ => {
                            return Err(here.at(
                                s,
                                format!("scope '{scope}': the XDP block set holds ip and range decisions only"),
                            ))
                        }
                    }
                }
                if out.is_empty() {
                    return Err(here.at(s, "scopes is empty: nothing would be asked for"));
                }
                out
            }
            None => vec!["ip".into(), "range".into()],
        };
        Ok(CrowdSecSettings {
            lapi_url: url,
            api_key: Secret(api_key),
            lapi_ca: self.lapi_ca.map(|c| base.join(c)),
            poll: Duration::from_secs(within(&self.poll_secs, "poll_secs", 1, 3600, 10)?),
            timeout: Duration::from_millis(within(
                &self.timeout_ms,
                "timeout_ms",
                100,
                300_000,
                10_000,
            )?),
            max_bytes: within(&self.max_bytes, "max_bytes", 1024, 1 << 30, 64 << 20)? as usize,
            scopes,
            origins: self.origins,
            scenarios_containing: self.scenarios_containing,
            scenarios_not_containing: self.scenarios_not_containing,
        })
    }
}

/// `https://HOST[:PORT]`, or `http://` to a loopback address: the API key travels with every
/// request, so it never crosses a network in clear.
fn check_lapi_url(url: &str) -> Result<(), String> {
    let uri: Uri = url
        .parse()
        .map_err(|_| format!("lapi_url '{url}' is not a URL"))?;
    let host = uri.host().unwrap_or("").trim_matches(['[', ']']);
    if host.is_empty()
        || uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Err(format!(
            "lapi_url '{url}': expected http(s)://HOST[:PORT] without a path"
        ));
    }
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if host == "localhost" || host.parse::<IpAddr>().is_ok_and(|a| a.is_loopback()) => Ok(()),
        Some("http") => Err(format!(
            "lapi_url '{url}': plain http only to a loopback address (the API key would cross the network in clear); use https://"
        )),
        _ => Err(format!("lapi_url '{url}': expected http:// or https://")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapi_urls() {
        assert!(check_lapi_url("http://127.0.0.1:8080").is_ok());
        assert!(check_lapi_url("http://[::1]:8080").is_ok());
        assert!(check_lapi_url("https://lapi.example.org:8443").is_ok());
        assert!(check_lapi_url("http://192.0.2.7:8080").is_err());
        assert!(check_lapi_url("https://lapi.example.org/v1/decisions").is_err());
        assert!(check_lapi_url("ftp://127.0.0.1").is_err());
    }
}
