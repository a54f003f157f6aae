//! A cache in front of the token validator: an RS256 check costs about 16 µs, and an EWS
//! client sends the same callback token on every request of its short life.
//!
//! Entries are keyed by the SHA-256 of the token, never the token itself. A verified token is
//! kept until its own expiry (plus the leeway) and is checked against the clock on every
//! hit, so the cache can never extend a token's life. Refusals are kept briefly (a negative
//! cache), so a flood of one bad token costs one signature check per `NEGATIVE_TTL`. Both
//! halves are bounded; a full half first drops what has lapsed, then the oldest entries.

use std::collections::HashMap;

use crate::identity::tokens::{TokenError, Validator, Verified};

/// How long a refusal is remembered, in seconds.
pub const NEGATIVE_TTL: u64 = 10;

type Key = [u8; 32];

struct Entry<T> {
    value: T,
    /// Seconds after which the entry is dropped.
    until: u64,
    inserted: u64,
}

pub struct TokenCache {
    validator: Validator,
    verified: HashMap<Key, Entry<Verified>>,
    refused: HashMap<Key, Entry<TokenError>>,
    capacity: usize,
}

impl TokenCache {
    /// `capacity` bounds each of the positive and the negative half.
    pub fn new(validator: Validator, capacity: usize) -> TokenCache {
        TokenCache {
            validator,
            verified: HashMap::new(),
            refused: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// `Validator::verify_for_ews`, cached.
    pub fn verify_for_ews(&mut self, token: &str, now: u64) -> Result<Verified, TokenError> {
        let key = hash(token);
        let leeway = self.validator.expect.leeway;
        if let Some(e) = self.verified.get(&key) {
            if now <= e.value.expires.saturating_add(leeway) {
                return Ok(e.value.clone());
            }
            self.verified.remove(&key);
            // Fall through: the validator names the expiry as the reason.
        }
        if let Some(e) = self.refused.get(&key) {
            if now < e.until {
                return Err(e.value.clone());
            }
            self.refused.remove(&key);
        }
        let result = self.validator.verify_for_ews(token, now);
        match &result {
            Ok(v) => {
                let until = v.expires.saturating_add(leeway);
                insert(
                    &mut self.verified,
                    self.capacity,
                    key,
                    v.clone(),
                    until,
                    now,
                );
            }
            // An unknown key may be fetched a moment later: never remember that refusal.
            Err(TokenError::UnknownKey(_)) => {}
            Err(e) => {
                let until = now + NEGATIVE_TTL;
                insert(&mut self.refused, self.capacity, key, e.clone(), until, now);
            }
        }
        result
    }

    pub fn unknown_key(&self, token: &str) -> Option<String> {
        self.validator.unknown_key(token)
    }

    pub fn len(&self) -> (usize, usize) {
        (self.verified.len(), self.refused.len())
    }
}

fn hash(token: &str) -> Key {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(d.as_ref());
    key
}

fn insert<T>(
    map: &mut HashMap<Key, Entry<T>>,
    capacity: usize,
    key: Key,
    value: T,
    until: u64,
    now: u64,
) {
    if map.len() >= capacity && !map.contains_key(&key) {
        map.retain(|_, e| e.until > now);
        if map.len() >= capacity {
            // Still full of live entries: drop the oldest eighth in one pass, so a full
            // cache does not pay a scan on every insert.
            let mut ages: Vec<u64> = map.values().map(|e| e.inserted).collect();
            ages.sort_unstable();
            let cutoff = ages[(ages.len() / 8).min(ages.len() - 1)];
            map.retain(|_, e| e.inserted > cutoff);
        }
    }
    map.insert(
        key,
        Entry {
            value,
            until,
            inserted: now,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        identity::tokens::{testkit::*, KeyRing},
        model::settings::Expectations,
    };
    use serde_json::json;

    #[test]
    fn a_verified_token_is_served_from_the_cache_until_it_expires() {
        let s = signer();
        let token = sign(&s, &callback_claims());
        let mut cache = TokenCache::new(validator(&[&s]), 100);
        let v = cache.verify_for_ews(&token, NOW).unwrap();
        assert_eq!(cache.len(), (1, 0));
        assert_eq!(cache.verify_for_ews(&token, NOW + 200).unwrap(), v);
        // Past exp + leeway the cached entry is dropped and the expiry is the answer.
        let late = NOW + 290 + 61;
        assert_eq!(
            cache.verify_for_ews(&token, late),
            Err(TokenError::Expired {
                exp: NOW + 290,
                now: late
            })
        );
        assert_eq!(cache.len(), (0, 1));
    }

    #[test]
    fn different_tokens_are_different_entries() {
        let s = signer();
        let mut cache = TokenCache::new(validator(&[&s]), 100);
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
            "appctx": json!({"version": crate::identity::tokens::IDENTITY_VERSION}).to_string()});
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
            entra: None,
            keys: KeyRing::default(),
            expect: Expectations {
                leeway: 60,
                ..Default::default()
            },
        }
    }

    #[test]
    fn refusals_are_remembered_briefly_and_bounded() {
        let mut cache = TokenCache::new(empty_validator(), 4);
        let first = cache.verify_for_ews("a.b.c", 1000).unwrap_err();
        assert_eq!(cache.len(), (0, 1));
        assert_eq!(
            cache
                .verify_for_ews("a.b.c", 1000 + NEGATIVE_TTL - 1)
                .unwrap_err(),
            first
        );
        assert_eq!(cache.len(), (0, 1), "served from the cache");
        for i in 0..10 {
            let _ = cache.verify_for_ews(&format!("junk{i}"), 1001 + i);
        }
        assert!(cache.len().1 <= 4, "bounded: {:?}", cache.len());
    }
}
