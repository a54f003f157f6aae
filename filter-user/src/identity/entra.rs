//! Entra ID (Azure AD) bearer tokens for hybrid set-ups: RS256 only, the key chosen by
//! `kid` from a configured JWKS file or from the JWKS that the tenant's OpenID discovery
//! document names, `exp` and `nbf` required, exact `iss`, every `aud` value accepted, and
//! the EWS permission itself (`scp` EWS.AccessAsUser.All, or the app role
//! full_access_as_app).

use std::sync::Arc;

use serde::Deserialize;

use crate::identity::{
    jwt::{
        check_times, rs256_claims, rs256_header, unverified_field, Audience, Family, KeyRing,
        TokenError, Verified, MAX_TOKEN_BYTES,
    },
    metadata::KeySource,
};

const DELEGATED_SCOPE: &str = "EWS.AccessAsUser.All";
const APP_ROLE: &str = "full_access_as_app";

pub struct EntraValidator {
    /// Keys from a JWKS file.
    pinned: KeyRing,
    /// Keys from the discovery document's JWKS.
    fetched: Option<Arc<KeySource>>,
    issuers: Vec<String>,
    audiences: Vec<String>,
    leeway: u64,
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    aud: Option<Audience>,
    exp: Option<u64>,
    nbf: Option<u64>,
    scp: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    upn: Option<String>,
    preferred_username: Option<String>,
    unique_name: Option<String>,
    appid: Option<String>,
    azp: Option<String>,
}

impl EntraValidator {
    pub fn new(
        issuers: Vec<String>,
        audiences: Vec<String>,
        leeway: u64,
        pinned: KeyRing,
        fetched: Option<Arc<KeySource>>,
    ) -> EntraValidator {
        EntraValidator {
            pinned,
            fetched,
            issuers,
            audiences,
            leeway,
        }
    }

    pub fn fetched(&self) -> Option<&Arc<KeySource>> {
        self.fetched.as_ref()
    }

    /// Whether the token names one of this tenant's issuers (unverified: routing only).
    pub fn claims_ours(&self, token: &str) -> bool {
        unverified_field(token, 1, "iss").is_some_and(|iss| self.issuers.contains(&iss))
    }

    /// The discovery URL to refetch for a token whose `kid` is not known yet.
    pub fn refetch_url(&self, token: &str) -> Option<String> {
        let fetched = self.fetched.as_ref()?;
        let kid = unverified_field(token, 0, "kid")?;
        if self.pinned.contains(&kid) || fetched.ring_with(&kid).is_some() {
            return None;
        }
        fetched.urls().next().map(str::to_string)
    }

    pub fn verify(&self, token: &str, now: u64) -> Result<Verified, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let header = rs256_header(token)?;
        let kid = header.kid.ok_or(TokenError::NoKeyId)?;
        let fetched = self.fetched.as_ref().and_then(|f| f.ring_with(&kid));
        let key = self
            .pinned
            .get(&kid)
            .or_else(|| fetched.as_ref().and_then(|r| r.get(&kid)))
            .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
        let claims: Claims = rs256_claims(token, key)?;
        let exp = claims.exp.ok_or(TokenError::MissingClaim("exp"))?;
        let nbf = claims.nbf.ok_or(TokenError::MissingClaim("nbf"))?;
        check_times(exp, nbf, now, self.leeway)?;
        let iss = claims.iss.clone().ok_or(TokenError::MissingClaim("iss"))?;
        if !self.issuers.contains(&iss) {
            return Err(TokenError::Issuer(iss));
        }
        Audience::check(claims.aud.as_ref(), &self.audiences)?;
        let delegated = claims
            .scp
            .as_deref()
            .is_some_and(|s| s.split(' ').any(|x| x == DELEGATED_SCOPE));
        if !delegated && !claims.roles.iter().any(|r| r == APP_ROLE) {
            return Err(TokenError::Family(
                "entra token without EWS permission".into(),
            ));
        }
        let user = claims
            .upn
            .or(claims.preferred_username)
            .or(claims.unique_name)
            .or(claims.appid)
            .or(claims.azp)
            .map(|u| u.to_ascii_lowercase().into());
        Ok(Verified {
            family: Family::Entra,
            user,
            item: None,
            expires: exp,
            x5t: kid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tokens::testkit::{signer, with, Signer, NOW};
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::{json, Value};

    const TENANT: &str = "https://sts.windows.net/0d7b2d1d-0000-4000-8000-000000000000/";
    const OUTLOOK: &str = "https://outlook.office365.com";

    fn jwks(s: &Signer, kid: &str) -> Vec<u8> {
        let key = EncodingKey::from_rsa_pem(s.pem_key.as_bytes()).unwrap();
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
        jwk.common.key_id = Some(kid.into());
        json!({"keys": [jwk]}).to_string().into_bytes()
    }

    fn validator(s: &Signer) -> EntraValidator {
        let mut ring = KeyRing::default();
        ring.add_jwks(&jwks(s, "k1")).unwrap();
        EntraValidator::new(vec![TENANT.into()], vec![OUTLOOK.into()], 60, ring, None)
    }

    fn claims() -> Value {
        json!({"iss": TENANT, "aud": OUTLOOK, "nbf": NOW - 10, "exp": NOW + 300,
               "scp": "EWS.AccessAsUser.All", "upn": "Carol@example.org"})
    }

    fn token(s: &Signer, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("k1".into());
        let key = EncodingKey::from_rsa_pem(s.pem_key.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    #[test]
    fn a_token_with_the_ews_permission_passes() {
        let s = signer();
        let v = validator(&s).verify(&token(&s, &claims()), NOW).unwrap();
        assert_eq!(v.family, Family::Entra);
        assert_eq!(v.user.as_deref(), Some("carol@example.org"));
        assert_eq!(v.x5t, "k1");
    }

    #[test]
    fn every_audience_must_be_accepted() {
        let s = signer();
        let v = validator(&s);
        let t = |aud: Value| v.verify(&token(&s, &with(claims(), "aud", aud)), NOW);
        assert!(t(json!([OUTLOOK])).is_ok());
        assert_eq!(
            t(json!([OUTLOOK, "https://graph.microsoft.com"])),
            Err(TokenError::Audience("https://graph.microsoft.com".into()))
        );
        assert!(matches!(t(json!([])), Err(TokenError::Audience(_))));
        assert_eq!(t(Value::Null), Err(TokenError::MissingClaim("aud")));
    }

    #[test]
    fn the_size_cap_is_the_exchange_one() {
        let s = signer();
        let big = with(claims(), "pad", json!("x".repeat(MAX_TOKEN_BYTES)));
        assert_eq!(
            validator(&s).verify(&token(&s, &big), NOW),
            Err(TokenError::TooLarge)
        );
    }

    #[test]
    fn jwks_keys_need_rsa_signing_and_a_kid() {
        let s = signer();
        let good = jwks(&s, "k1");
        let mut doc: Value = serde_json::from_slice(&good).unwrap();
        let jwk = doc["keys"][0].clone();
        let variant = |edit: &dyn Fn(&mut Value)| {
            let mut k = jwk.clone();
            edit(&mut k);
            k
        };
        doc["keys"] = json!([
            variant(&|k| k["use"] = json!("enc")),
            variant(&|k| k["alg"] = json!("RS512")),
            variant(&|k| {
                k.as_object_mut().unwrap().remove("kid");
            }),
            variant(&|k| k["kty"] = json!("EC")),
            variant(&|k| k["kid"] = json!("k2")),
        ]);
        let mut ring = KeyRing::default();
        assert_eq!(
            ring.add_jwks(doc.to_string().as_bytes()).unwrap(),
            vec!["k2".to_string()]
        );
        assert!(KeyRing::default().add_jwks(b"{\"keys\": []}").is_err());
        assert!(KeyRing::default().add_jwks(b"not json").is_err());
    }
}
