//! Token trust as the proxy holds it: the Exchange and Entra ID validators, their key
//! sources, and a cache in front of them. An RS256 check costs about 16 µs, and an EWS
//! client sends the same callback token on every request of its short life.
//!
//! The cache is quick_cache's sharded concurrent cache: a lookup or insert holds one
//! shard's lock for a moment, and a signature check runs outside any lock, so
//! verifications of different tokens never wait on one another. Entries are keyed by the
//! SHA-256 of the token, never the token itself. A verified token is kept until its own
//! expiry (plus the leeway) and is checked against the clock on every hit, so the cache can
//! never extend a token's life. Refusals are kept briefly (a negative cache), never past the
//! token's own `exp`, never past the moment a not-yet-valid token becomes valid, and a
//! refusal for an unknown key not at all (the key may be fetched a moment later). Each half
//! is bounded; lapsed entries are never served, and a sweep drops them every `SWEEP_SECS`.
//!
//! Key material arrives as bytes ([`KeyMaterial`]): the process that verifies tokens need not
//! read files.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use quick_cache::sync::Cache;

use crate::{
    identity::{
        entra::EntraValidator,
        jwt::{unverified_json, KeyError, KeyRing, TokenError, Verified, MAX_TOKEN_BYTES},
        metadata::{Documents, KeySource},
        stats,
        tokens::Validator,
    },
    model::settings::{EntraKeys, EntraSettings, FetchSettings, TokenSettings},
    net::http::HttpError,
};

/// How long a refusal is remembered, in seconds.
pub const NEGATIVE_TTL: u64 = 10;
/// How often lapsed entries are swept out, in seconds.
pub const SWEEP_SECS: u64 = 30;

/// The bytes behind every file `[tokens]` names, gathered by whoever holds them (the config
/// bundle, in the proxy).
#[derive(Clone, Default)]
pub struct KeyMaterial {
    /// Pinned Exchange certificates: (file name for messages, PEM).
    pub certificates: Vec<(String, Vec<u8>)>,
    /// CA (PEM) for https auth metadata URLs.
    pub metadata_ca: Option<Vec<u8>>,
    /// The Entra ID JWKS file.
    pub entra_jwks: Option<Vec<u8>>,
    /// CA (PEM) for the Entra ID discovery and JWKS fetches.
    pub entra_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.certificates.iter().map(|c| c.0.as_str()).collect();
        f.debug_struct("KeyMaterial")
            .field("certificates", &names)
            .field("metadata_ca", &self.metadata_ca.as_ref().map(Vec::len))
            .field("entra_jwks", &self.entra_jwks.as_ref().map(Vec::len))
            .field("entra_ca", &self.entra_ca.as_ref().map(Vec::len))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{name}: {error}")]
    Key { name: String, error: KeyError },
    #[error("{name}: {error}")]
    Ca { name: String, error: HttpError },
    #[error("{0} is configured but its bytes were not handed over")]
    Missing(&'static str),
}

impl KeyMaterial {
    /// The bytes of every file the settings name, from `read` (the config bundle's files).
    pub fn gather(
        settings: &TokenSettings,
        read: impl Fn(&Path) -> std::io::Result<Vec<u8>>,
    ) -> Result<KeyMaterial, TrustError> {
        let read = |path: &Path| {
            read(path).map_err(|error| TrustError::Read {
                path: path.display().to_string(),
                error,
            })
        };
        let mut m = KeyMaterial::default();
        for path in &settings.certificates {
            m.certificates
                .push((path.display().to_string(), read(path)?));
        }
        if let Some(ca) = settings.fetch.as_ref().and_then(|f| f.ca.as_ref()) {
            m.metadata_ca = Some(read(ca)?);
        }
        match settings.entra.as_ref().map(|e| &e.keys) {
            Some(EntraKeys::File(path)) => m.entra_jwks = Some(read(path)?),
            Some(EntraKeys::Discovery { fetch, .. }) => {
                m.entra_ca = fetch.ca.as_deref().map(read).transpose()?;
            }
            None => {}
        }
        Ok(m)
    }
}

type Key = [u8; 32];

struct Entry<T> {
    value: T,
    /// Unix seconds after which the entry is never served.
    until: u64,
}

type Half<T> = Arc<Cache<Key, Arc<Entry<T>>>>;

fn half<T>(capacity: usize) -> Half<T> {
    Arc::new(Cache::new(capacity.max(1)))
}

pub struct TokenCache {
    exchange: Validator,
    entra: Option<EntraValidator>,
    verified: Half<Verified>,
    refused: Half<TokenError>,
    /// Set once the sweeper runs (`keep_fresh` is idempotent).
    sweeping: AtomicBool,
}

impl TokenCache {
    /// `capacity` bounds each of the verified and the refused half.
    pub fn new(exchange: Validator, entra: Option<EntraValidator>, capacity: usize) -> TokenCache {
        TokenCache {
            exchange,
            entra,
            verified: half(capacity),
            refused: half(capacity),
            sweeping: AtomicBool::new(false),
        }
    }

    /// The validators and key sources `settings` ask for, from `material`; `None` when no
    /// token can be trusted at all. Key sources of `previous` (the running policy) are kept
    /// when their settings are unchanged, and otherwise hand their keys over per URL, so a
    /// reload never drops fetched keys. Nothing is fetched here.
    pub fn build(
        settings: &TokenSettings,
        material: &KeyMaterial,
        previous: Option<&TokenCache>,
    ) -> Result<Option<TokenCache>, TrustError> {
        if settings.certificates.is_empty() && settings.fetch.is_none() && settings.entra.is_none()
        {
            return Ok(None);
        }
        let mut keys = KeyRing::default();
        for (name, pem) in &material.certificates {
            keys.add_pem(pem).map_err(|error| TrustError::Key {
                name: name.clone(),
                error,
            })?;
        }
        if material.certificates.len() < settings.certificates.len() {
            return Err(TrustError::Missing("tokens.certificates"));
        }
        let fetched = settings
            .fetch
            .as_ref()
            .map(|f| {
                source(
                    Documents::ExchangeMetadata,
                    f,
                    material.metadata_ca.as_deref(),
                    previous.and_then(|p| p.exchange.fetched.as_ref()),
                )
            })
            .transpose()?;
        let exchange = Validator {
            keys,
            fetched,
            expect: settings.expect.clone(),
        };
        let entra = settings
            .entra
            .as_ref()
            .map(|e| {
                entra(
                    e,
                    settings.expect.leeway,
                    material,
                    previous.and_then(|p| p.entra.as_ref()?.fetched()),
                )
            })
            .transpose()?;
        Ok(Some(TokenCache::new(
            exchange,
            entra,
            settings.cache_entries,
        )))
    }

    /// Exchange callback tokens and Entra ID tokens with the EWS permission pass; identity
    /// tokens and everything else are refused with a reason. Cached.
    pub fn verify_for_ews(&self, token: &str, now: u64) -> Result<Verified, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let key = hash(token);
        if let Some(e) = self.verified.get(&key) {
            if now <= e.until {
                stats::count(&stats::TOKEN_CACHE_HITS);
                return Ok(e.value.clone());
            }
            // Fall through: the validator names the expiry as the reason.
            self.verified.remove(&key);
        }
        if let Some(e) = self.refused.get(&key) {
            if now < e.until {
                stats::count(&stats::TOKEN_CACHE_HITS);
                return Err(e.value.clone());
            }
            self.refused.remove(&key);
        }
        stats::count(&stats::TOKEN_CACHE_MISSES);
        let result = self.verify_uncached(token, now);
        match &result {
            Ok(v) => {
                let until = v.expires.saturating_add(self.leeway());
                insert(&self.verified, key, v.clone(), until, now);
            }
            // An unknown key may be fetched a moment later: never remember that refusal.
            Err(TokenError::UnknownKey(_)) => {}
            Err(e) => {
                let until = self.refusal_until(token, e, now);
                insert(&self.refused, key, e.clone(), until, now);
            }
        }
        result
    }

    fn verify_uncached(&self, token: &str, now: u64) -> Result<Verified, TokenError> {
        match self.entra.as_ref().filter(|e| e.claims_ours(token)) {
            Some(e) => e.verify(token, now),
            None => self.exchange.verify_for_ews(token, now),
        }
    }

    fn leeway(&self) -> u64 {
        self.exchange.expect.leeway
    }

    /// A refusal is remembered for `NEGATIVE_TTL`, but never past the token's own `exp`
    /// (read unverified: it only shortens the stay) nor past the moment it becomes valid.
    fn refusal_until(&self, token: &str, error: &TokenError, now: u64) -> u64 {
        let mut until = now + NEGATIVE_TTL;
        if let Some(exp) = unverified_seconds(token, "exp") {
            until = until.min(exp.saturating_add(self.leeway()));
        }
        if let TokenError::NotYetValid { nbf, .. } = error {
            until = until.min(nbf.saturating_sub(self.leeway()));
        }
        until
    }

    /// `verify_for_ews`, and for a token signed by a key not known yet, one refetch of the
    /// allow-listed URL it belongs to (its `amurl`, or the Entra discovery document; rate
    /// limited per URL) and a second look. A cached token costs one lookup, no more.
    pub async fn verify_for_ews_fresh(
        &self,
        token: &str,
        now: u64,
    ) -> Result<Verified, TokenError> {
        match self.verify_for_ews(token, now) {
            Err(TokenError::UnknownKey(_)) if self.refetch_unknown(token).await => {
                self.verify_for_ews(token, now)
            }
            result => result,
        }
    }

    /// Refetches the URL an unknown key's token belongs to; false when nothing may be
    /// fetched for it (no key source, the key is known, or its URL is not on the list).
    pub async fn refetch_unknown(&self, token: &str) -> bool {
        if token.len() > MAX_TOKEN_BYTES {
            return false;
        }
        let (source, url) = match self.entra.as_ref().filter(|e| e.claims_ours(token)) {
            Some(e) => (e.fetched(), e.refetch_url(token)),
            None => (
                self.exchange.fetched.as_ref(),
                self.exchange.refetch_url(token),
            ),
        };
        match (source, url) {
            (Some(source), Some(url)) => {
                source.refetch(&url).await;
                true
            }
            _ => false,
        }
    }

    /// Starts the refresh loops of the key sources that have none yet, and the sweeper that
    /// drops lapsed entries until this cache is dropped.
    pub fn keep_fresh(&self, runtime: &tokio::runtime::Handle) {
        for s in self.sources().into_iter().flatten() {
            s.keep_fresh(runtime);
        }
        if self.sweeping.swap(true, Ordering::SeqCst) {
            return;
        }
        let (verified, refused) = (
            Arc::downgrade(&self.verified),
            Arc::downgrade(&self.refused),
        );
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(SWEEP_SECS)).await;
                let (Some(v), Some(r)) = (verified.upgrade(), refused.upgrade()) else {
                    return;
                };
                let now = unix_now();
                v.retain(|_, e| e.until > now);
                r.retain(|_, e| e.until > now);
            }
        });
    }

    /// Drops every entry that has lapsed at `now`.
    pub fn sweep(&self, now: u64) {
        self.verified.retain(|_, e| e.until > now);
        self.refused.retain(|_, e| e.until > now);
    }

    /// The Exchange auth metadata source and the Entra ID discovery source, when configured.
    pub fn sources(&self) -> [Option<&Arc<KeySource>>; 2] {
        [
            self.exchange.fetched.as_ref(),
            self.entra.as_ref().and_then(|e| e.fetched()),
        ]
    }

    /// Entries in the verified and the refused half.
    pub fn len(&self) -> (usize, usize) {
        (self.verified.len(), self.refused.len())
    }
}

fn source(
    documents: Documents,
    settings: &FetchSettings,
    ca: Option<&[u8]>,
    previous: Option<&Arc<KeySource>>,
) -> Result<Arc<KeySource>, TrustError> {
    if let Some(p) = previous.filter(|p| p.same(&documents, settings, ca)) {
        return Ok(p.clone());
    }
    let name = settings.urls.join(", ");
    KeySource::new(
        documents,
        settings.clone(),
        ca.map(<[u8]>::to_vec),
        previous.map(|p| &**p),
    )
    .map(Arc::new)
    .map_err(|error| TrustError::Ca { name, error })
}

fn entra(
    settings: &EntraSettings,
    leeway: u64,
    material: &KeyMaterial,
    previous: Option<&Arc<KeySource>>,
) -> Result<EntraValidator, TrustError> {
    let mut pinned = KeyRing::default();
    let mut fetched = None;
    match &settings.keys {
        EntraKeys::File(path) => {
            let jwks = material
                .entra_jwks
                .as_ref()
                .ok_or(TrustError::Missing("tokens.entra.keys_file"))?;
            pinned.add_jwks(jwks).map_err(|error| TrustError::Key {
                name: path.display().to_string(),
                error,
            })?;
        }
        EntraKeys::Discovery { fetch, jwks_hosts } => {
            let documents = Documents::OpenIdDiscovery {
                jwks_hosts: jwks_hosts.clone(),
            };
            let ca = material.entra_ca.as_deref();
            fetched = Some(source(documents, fetch, ca, previous)?);
        }
    }
    Ok(EntraValidator::new(
        settings.issuers.clone(),
        settings.audiences.clone(),
        leeway,
        pinned,
        fetched,
    ))
}

fn hash(token: &str) -> Key {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(d.as_ref());
    key
}

/// A time claim as a number or a numeric string, unverified.
fn unverified_seconds(token: &str, claim: &str) -> Option<u64> {
    let v = unverified_json(token, 1)?;
    let v = v.get(claim)?;
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

fn insert<T>(cache: &Cache<Key, Arc<Entry<T>>>, key: Key, value: T, until: u64, now: u64) {
    if until > now {
        cache.insert(key, Arc::new(Entry { value, until }));
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tokens::{testkit::*, Expectations, KeyRing};
    use serde_json::json;

    fn cache(v: Validator, capacity: usize) -> TokenCache {
        TokenCache::new(v, None, capacity)
    }

    #[test]
    fn a_verified_token_is_served_from_the_cache_until_it_expires() {
        let s = signer();
        let token = sign(&s, &callback_claims());
        let cache = cache(validator(&[&s]), 100);
        let v = cache.verify_for_ews(&token, NOW).unwrap();
        assert_eq!(cache.len(), (1, 0));
        assert_eq!(cache.verify_for_ews(&token, NOW + 200).unwrap(), v);
        // Past exp + leeway the cached entry is dropped and the expiry is the answer; the
        // refusal is not remembered, as the token is past its exp.
        let late = NOW + 290 + 61;
        assert_eq!(
            cache.verify_for_ews(&token, late),
            Err(TokenError::Expired {
                exp: NOW + 290,
                now: late
            })
        );
        assert_eq!(cache.len(), (0, 0));
    }

    #[test]
    fn different_tokens_are_different_entries() {
        let s = signer();
        let cache = cache(validator(&[&s]), 100);
        let a = sign(&s, &callback_claims());
        let b = sign(
            &s,
            &with(callback_claims(), "nameid", json!("bob@example.org")),
        );
        assert_eq!(
            cache.verify_for_ews(&a, NOW).unwrap().user.as_deref(),
            Some("alice@example.org")
        );
        assert_eq!(
            cache.verify_for_ews(&b, NOW).unwrap().user.as_deref(),
            Some("bob@example.org")
        );
        assert_eq!(cache.len(), (2, 0));
        // An identity token is refused, and the refusal is cached like any other.
        let identity = json!({"iss": ISS, "nbf": NOW, "exp": NOW + 100,
            "appctx": json!({"version": crate::identity::tokens::IDENTITY_VERSION, "amurl": AMURL}).to_string()});
        let id = sign(&s, &identity);
        assert_eq!(
            cache.verify_for_ews(&id, NOW),
            Err(TokenError::IdentityToken)
        );
        assert_eq!(
            cache.verify_for_ews(&id, NOW + 1),
            Err(TokenError::IdentityToken)
        );
        assert_eq!(cache.len(), (2, 1));
    }

    /// A validator with no keys refuses everything; enough to exercise the negative half.
    fn empty_validator() -> Validator {
        Validator {
            fetched: None,
            keys: KeyRing::default(),
            expect: Expectations {
                leeway: 60,
                ..Default::default()
            },
        }
    }

    #[test]
    fn refusals_are_remembered_briefly_and_bounded() {
        let cache = cache(empty_validator(), 4);
        let first = cache.verify_for_ews("a.b.c", 1000).unwrap_err();
        assert_eq!(cache.len(), (0, 1));
        assert_eq!(
            cache
                .verify_for_ews("a.b.c", 1000 + NEGATIVE_TTL - 1)
                .unwrap_err(),
            first
        );
        assert_eq!(cache.len(), (0, 1), "served from the cache");
        for i in 0..50 {
            let _ = cache.verify_for_ews(&format!("junk{i}"), 1001 + i);
        }
        assert!(cache.len().1 <= 4, "bounded: {:?}", cache.len());
    }

    #[test]
    fn a_refusal_never_outlives_the_tokens_exp_nor_its_nbf() {
        let s = signer();
        let cache = cache(validator(&[&s]), 100);
        // Refused for its audience, 3 s before exp + leeway: remembered for those 3 s only.
        let bad = with(
            callback_claims(),
            "aud",
            json!("00000002-0000-0ff1-ce00-000000000000/evil.example@example.org"),
        );
        let token = sign(&s, &bad);
        let at = NOW + 290 + 60 - 3;
        assert!(matches!(
            cache.verify_for_ews(&token, at),
            Err(TokenError::Audience(_))
        ));
        let e = cache.refused.get(&hash(&token)).expect("remembered");
        assert_eq!(e.until, NOW + 290 + 60);
        // Not yet valid: remembered only until it becomes valid, then it passes.
        let early = sign(&s, &callback_claims_at(NOW + 100));
        let at = NOW + 90 - 60 - 5;
        assert!(matches!(
            cache.verify_for_ews(&early, at),
            Err(TokenError::NotYetValid { .. })
        ));
        assert!(cache.verify_for_ews(&early, at + 5).is_ok());
    }

    #[test]
    fn a_sweep_drops_what_has_lapsed_and_nothing_else() {
        let s = signer();
        let cache = cache(validator(&[&s]), 100);
        let early = sign(&s, &callback_claims());
        let late = sign(&s, &callback_claims_at(NOW + 1000));
        assert!(cache.verify_for_ews(&early, NOW).is_ok());
        assert!(cache.verify_for_ews(&late, NOW + 1000).is_ok());
        let _ = cache.verify_for_ews("a.b.c", NOW);
        assert_eq!(cache.len(), (2, 1));
        // At exp + leeway of the first token: it and the refusal have lapsed.
        cache.sweep(NOW + 290 + 60);
        assert_eq!(cache.len(), (1, 0));
        assert!(cache.verify_for_ews(&late, NOW + 1000).is_ok());
    }

    #[test]
    fn a_refusal_for_an_unknown_key_is_not_remembered() {
        let (s, stranger) = (signer(), signer());
        let cache = cache(validator(&[&s]), 100);
        let token = sign(&stranger, &callback_claims());
        assert!(matches!(
            cache.verify_for_ews(&token, NOW),
            Err(TokenError::UnknownKey(_))
        ));
        assert_eq!(cache.len(), (0, 0));
    }

    #[test]
    fn concurrent_verifications_share_the_cache() {
        let s = signer();
        let cache = Arc::new(cache(validator(&[&s]), 1000));
        let tokens: Vec<String> = (0..8)
            .map(|i| {
                sign(
                    &s,
                    &with(
                        callback_claims(),
                        "nameid",
                        json!(format!("u{i}@example.org")),
                    ),
                )
            })
            .collect();
        let tokens = Arc::new(tokens);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (cache, tokens) = (cache.clone(), tokens.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        for t in tokens.iter() {
                            assert!(cache.verify_for_ews(t, NOW).is_ok());
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(cache.len(), (8, 0));
    }

    #[test]
    fn oversized_tokens_are_refused_before_hashing_or_routing() {
        let cache = cache(empty_validator(), 4);
        let big = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(cache.verify_for_ews(&big, 1000), Err(TokenError::TooLarge));
    }
}
