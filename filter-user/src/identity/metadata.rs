//! Signing keys fetched from documents at configured URLs: Exchange's auth metadata
//! documents, or an Entra ID tenant's OpenID discovery document and the JWKS it names.
//!
//! Only URLs on the configured exact allow list are ever fetched (never a URL a token
//! names), with no redirects, a size cap and a deadline (`net::http`), TLS trusting only the
//! CA bytes the source is built with. Each URL keeps its own
//! keys: a failed fetch keeps that URL's last good keys while the others refresh, and a
//! reload hands the running keys to the new policy. An unknown key triggers a refetch of
//! the one URL the token belongs to, at most once per `refetch_min` for that URL.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use base64::{engine::general_purpose::STANDARD, Engine as _};
use http::StatusCode;
use serde::Deserialize;

pub use crate::model::settings::FetchSettings;
use crate::{
    identity::jwt::KeyRing,
    net::http::{Client, HttpError},
};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{0}: answered {1}, not 200")]
    Status(String, StatusCode),
    #[error("{0}: {1}")]
    Document(String, String),
}

/// What the documents at the URLs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Documents {
    /// Exchange auth metadata: `keys[].keyvalue.value`, base64 DER certificates.
    ExchangeMetadata,
    /// OpenID Connect discovery: `jwks_uri`, which must be `https` on one of these hosts
    /// (`host` for port 443, `host:port` otherwise), then the JWKS there.
    OpenIdDiscovery { jwks_hosts: Vec<String> },
}

#[derive(Deserialize)]
struct Metadata {
    keys: Vec<MetadataKey>,
}

#[derive(Deserialize)]
struct MetadataKey {
    usage: Option<String>,
    keyvalue: KeyValue,
}

#[derive(Deserialize)]
struct KeyValue {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: String,
}

/// The signing certificates (DER) an Exchange auth metadata document lists. Thumbprints
/// are computed from the certificates later; the document's own `x5t` strings are never
/// trusted.
pub fn certificates(url: &str, json: &[u8]) -> Result<Vec<Vec<u8>>, FetchError> {
    let bad = |m: String| FetchError::Document(url.into(), format!("auth metadata: {m}"));
    let doc: Metadata = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for k in doc.keys {
        let signing = k.usage.as_deref().is_none_or(|u| u == "signing");
        let cert = k
            .keyvalue
            .kind
            .as_deref()
            .is_none_or(|t| t == "x509Certificate");
        if signing && cert {
            let der = STANDARD
                .decode(k.keyvalue.value.trim())
                .map_err(|e| bad(format!("key value: {e}")))?;
            out.push(der);
        }
    }
    if out.is_empty() {
        return Err(bad("no signing certificate".into()));
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Discovery {
    jwks_uri: String,
}

/// The `jwks_uri` of an OpenID discovery document, if it is `https` on an allowed host.
pub fn jwks_uri(url: &str, json: &[u8], hosts: &[String]) -> Result<String, FetchError> {
    let bad = |m: String| FetchError::Document(url.into(), format!("OpenID discovery: {m}"));
    let doc: Discovery = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    let uri: http::Uri = doc
        .jwks_uri
        .parse()
        .map_err(|_| bad(format!("jwks_uri {} is not a URL", doc.jwks_uri)))?;
    let authority = uri.authority().map(|a| a.as_str().to_ascii_lowercase());
    let allowed = uri.scheme_str() == Some("https")
        && authority.as_deref().is_some_and(|a| {
            // `host` means port 443; `user@` never matches.
            let bare = a.strip_suffix(":443").unwrap_or(a);
            hosts.iter().any(|h| h.eq_ignore_ascii_case(bare))
        });
    if !allowed {
        return Err(bad(format!(
            "jwks_uri {} is not https on an allowed host ({})",
            doc.jwks_uri,
            hosts.join(", ")
        )));
    }
    Ok(doc.jwks_uri)
}

/// One allow-listed URL and the keys it last gave.
struct Slot {
    url: String,
    ring: ArcSwap<KeyRing>,
    last_attempt: Mutex<Option<Instant>>,
    /// Serialises fetches of this URL: a burst of unknown keys costs one.
    fetching: tokio::sync::Mutex<()>,
}

/// Keys from allow-listed URLs, each URL's kept apart.
pub struct KeySource {
    documents: Documents,
    settings: FetchSettings,
    ca: Option<Vec<u8>>,
    client: Client,
    slots: Vec<Slot>,
    /// Set once a refresh loop runs for this source (`keep_fresh` is idempotent).
    fresh: AtomicBool,
}

impl KeySource {
    /// A source for `settings.urls`, trusting `ca` (PEM bytes) for https. Each URL starts
    /// with the keys `previous` holds for it, so a reload never loses fetched keys.
    pub fn new(
        documents: Documents,
        settings: FetchSettings,
        ca: Option<Vec<u8>>,
        previous: Option<&KeySource>,
    ) -> Result<KeySource, HttpError> {
        let client = Client::from_pem(ca.as_deref(), settings.timeout, settings.max_bytes)?;
        let slots = settings
            .urls
            .iter()
            .map(|url| Slot {
                url: url.clone(),
                ring: ArcSwap::new(
                    previous
                        .and_then(|p| p.ring_of(url))
                        .unwrap_or_else(|| Arc::new(KeyRing::default())),
                ),
                last_attempt: Mutex::new(None),
                fetching: tokio::sync::Mutex::new(()),
            })
            .collect();
        Ok(KeySource {
            documents,
            settings,
            ca,
            client,
            slots,
            fresh: AtomicBool::new(false),
        })
    }

    /// Whether a new policy asks for exactly this source (then it keeps running as is).
    pub fn same(&self, documents: &Documents, settings: &FetchSettings, ca: Option<&[u8]>) -> bool {
        &self.documents == documents && &self.settings == settings && self.ca.as_deref() == ca
    }

    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.url.as_str())
    }

    /// The keys `url` last gave, if it is on the list.
    pub fn ring_of(&self, url: &str) -> Option<Arc<KeyRing>> {
        self.slots
            .iter()
            .find(|s| s.url == url)
            .map(|s| s.ring.load_full())
    }

    /// A ring holding key `id`, from whichever URL listed it.
    pub fn ring_with(&self, id: &str) -> Option<Arc<KeyRing>> {
        self.slots
            .iter()
            .map(|s| s.ring.load_full())
            .find(|r| r.contains(id))
    }

    /// Key ids per URL, for logs and tests.
    pub fn summary(&self) -> Vec<(String, usize)> {
        self.slots
            .iter()
            .map(|s| (s.url.clone(), s.ring.load().len()))
            .collect()
    }

    /// Refetches `url` for an unknown key, unless it is not on the list or was tried
    /// within `refetch_min`.
    pub async fn refetch(&self, url: &str) {
        let Some(slot) = self.slots.iter().find(|s| s.url == url) else {
            return;
        };
        let _one = slot.fetching.lock().await;
        let recent = slot
            .last_attempt
            .lock()
            .ok()
            .and_then(|l| *l)
            .is_some_and(|t| t.elapsed() < self.settings.refetch_min);
        if !recent {
            self.refresh_slot(slot).await;
        }
    }

    /// Fetches every URL. Each URL's keys are replaced only by a good answer from it.
    pub async fn refresh(&self) {
        for slot in &self.slots {
            let _one = slot.fetching.lock().await;
            self.refresh_slot(slot).await;
        }
    }

    async fn refresh_slot(&self, slot: &Slot) {
        if let Ok(mut l) = slot.last_attempt.lock() {
            *l = Some(Instant::now());
        }
        match self.fetch_ring(&slot.url).await {
            Ok(ring) => {
                super::stats::count(&super::stats::KEY_FETCHES_OK);
                tracing::info!(url = slot.url, keys = ring.len(), "signing keys loaded");
                slot.ring.store(Arc::new(ring));
            }
            Err(e) => {
                super::stats::count(&super::stats::KEY_FETCHES_FAILED);
                tracing::warn!(
                    error = %e,
                    kept = slot.ring.load().len(),
                    "signing key fetch failed; the last good keys stay"
                )
            }
        }
    }

    /// The body of a 200 answer (a 304 to a request that asked for none is refused too).
    async fn get(&self, url: &str) -> Result<bytes::Bytes, FetchError> {
        let fetched = self.client.get(url, &[]).await?;
        if fetched.status != StatusCode::OK {
            return Err(FetchError::Status(url.into(), fetched.status));
        }
        Ok(fetched.body)
    }

    async fn fetch_ring(&self, url: &str) -> Result<KeyRing, FetchError> {
        let body = self.get(url).await?;
        let mut ring = KeyRing::default();
        match &self.documents {
            Documents::ExchangeMetadata => {
                for der in certificates(url, &body)? {
                    if let Err(e) = ring.add_der(&der) {
                        tracing::warn!(url, error = %e, "auth metadata: certificate skipped");
                    }
                }
            }
            Documents::OpenIdDiscovery { jwks_hosts } => {
                let jwks = jwks_uri(url, &body, jwks_hosts)?;
                let keys = self.get(&jwks).await?;
                ring.add_jwks(&keys)
                    .map_err(|e| FetchError::Document(jwks.clone(), e.to_string()))?;
            }
        }
        if ring.is_empty() {
            return Err(FetchError::Document(url.into(), "no usable key".into()));
        }
        Ok(ring)
    }

    /// Keeps the source fresh until the last policy holding it is dropped. A second call
    /// (the same source kept across a reload) starts nothing new.
    pub fn keep_fresh(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        if self.fresh.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                let Some(s) = weak.upgrade() else { return };
                s.refresh().await;
                let every = s.settings.refresh;
                drop(s);
                tokio::time::sleep(every).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_uri_must_be_https_on_an_allowed_host() {
        let hosts = vec![
            "login.microsoftonline.com".to_string(),
            "127.0.0.1:8443".into(),
        ];
        let doc = |u: &str| serde_json::json!({"issuer": "x", "jwks_uri": u}).to_string();
        let ok = |u: &str| jwks_uri("d", doc(u).as_bytes(), &hosts);
        assert!(ok("https://login.microsoftonline.com/t/discovery/v2.0/keys").is_ok());
        assert!(ok("https://LOGIN.microsoftonline.com:443/t/discovery/v2.0/keys").is_ok());
        assert!(ok("https://127.0.0.1:8443/keys").is_ok());
        for bad in [
            "http://login.microsoftonline.com/t/discovery/v2.0/keys",
            "https://login.microsoftonline.com.evil.example/keys",
            "https://login.microsoftonline.com:8443/keys",
            "https://evil@login.microsoftonline.com/keys",
            "https://127.0.0.1/keys",
            "/relative/keys",
            "",
        ] {
            assert!(ok(bad).is_err(), "{bad}");
        }
        assert!(jwks_uri("d", b"{}", &hosts).is_err());
        assert!(jwks_uri("d", b"[]", &hosts).is_err());
    }
}
