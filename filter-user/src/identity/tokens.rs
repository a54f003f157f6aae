//! Exchange add-in tokens: the EWS callback token (item-scoped, minutes long) and the user
//! identity token (`ExIdTok.V1`, meant for an add-in's own back end, never for EWS).
//!
//! What is trusted comes from configuration only:
//! - signing certificates pinned by the admin, each keyed by an `x5t` that ewsgate computes
//!   from the certificate itself (base64url SHA-1 of the DER), several at once for rotation;
//! - the exact audiences, issuers and auth-metadata URLs the deployment expects.
//!
//! Nothing in a token chooses a key or a URL: `x5t` is only a lookup key into the pinned and
//! fetched sets, `x5c`, `jku` and `x5u` are ignored, and `appctx.amurl` is required and must
//! be on the configured list exactly; a fetched key counts only for the URL that listed it.
//! The signature is checked by jsonwebtoken with RS256 alone; the claims are parsed and
//! checked here, because Exchange writes `nbf` and `exp` as strings (which jsonwebtoken
//! refuses) and jsonwebtoken does not check `nbf` by default.

use std::sync::Arc;

use serde::Deserialize;

pub use crate::identity::jwt::{
    thumbprint, unverified_field, Family, KeyError, KeyRing, TokenError, Verified, MAX_TOKEN_BYTES,
};
use crate::identity::{
    jwt::{check_times, rs256_claims, rs256_header, Audience},
    metadata::KeySource,
};
pub use crate::model::settings::Expectations;

/// `appctx.version` of an identity token.
pub const IDENTITY_VERSION: &str = "ExIdTok.V1";
/// Token version of an EWS callback token.
pub const CALLBACK_VERSION: &str = "Exchange.Callback.V1";

/// Exchange callback and identity tokens.
pub struct Validator {
    /// Certificates pinned by the admin.
    pub keys: KeyRing,
    /// Keys fetched from the allow-listed auth metadata URLs, kept per URL.
    pub fetched: Option<Arc<KeySource>>,
    pub expect: Expectations,
}

/// A claim holding seconds, as a number or a numeric string.
#[derive(Deserialize)]
#[serde(untagged)]
enum Seconds {
    Number(u64),
    Text(String),
}

/// `appctx` is a JSON-encoded string on the wire; accept an object too.
#[derive(Deserialize)]
#[serde(untagged)]
enum AppCtxField {
    Text(String),
    Object(AppCtx),
}

#[derive(Deserialize, Default)]
struct AppCtx {
    version: Option<String>,
    amurl: Option<String>,
    msexchuid: Option<String>,
    scope: Option<String>,
}

/// The claims read. Derived structs reject duplicate fields, so `{"exp":1,"exp":9}` fails.
#[derive(Deserialize)]
struct Claims {
    aud: Option<Audience>,
    iss: Option<String>,
    nbf: Option<Seconds>,
    exp: Option<Seconds>,
    ver: Option<String>,
    nameid: Option<String>,
    smtp: Option<String>,
    appctx: Option<AppCtxField>,
}

fn seconds(value: Option<Seconds>, name: &'static str) -> Result<u64, TokenError> {
    match value {
        None => Err(TokenError::MissingClaim(name)),
        Some(Seconds::Number(n)) => Ok(n),
        Some(Seconds::Text(t)) => t.trim().parse().map_err(|_| TokenError::BadTime(name)),
    }
}

/// The `appctx.amurl` a token names, unverified: only to choose which allow-listed URL to
/// refetch for an unknown key.
pub fn unverified_amurl(token: &str) -> Option<String> {
    let claims = crate::identity::jwt::unverified_json(token, 1)?;
    let appctx = claims.get("appctx")?;
    let appctx = match appctx.as_str() {
        Some(text) => serde_json::from_str(text).ok()?,
        None => appctx.clone(),
    };
    appctx.get("amurl")?.as_str().map(str::to_string)
}

impl Validator {
    /// The allow-listed metadata URL to refetch for a token signed by a certificate ewsgate
    /// has neither pinned nor fetched; `None` when the key is known or nothing may be fetched.
    pub fn refetch_url(&self, token: &str) -> Option<String> {
        let fetched = self.fetched.as_ref()?;
        let x5t = unverified_field(token, 0, "x5t")?;
        if self.keys.contains(&x5t) || fetched.ring_with(&x5t).is_some() {
            return None;
        }
        unverified_amurl(token).filter(|u| fetched.urls().any(|f| f == u))
    }

    /// Verifies a token and says what it is. An identity token verifies here; only
    /// `verify_for_ews` refuses it.
    pub fn verify(&self, token: &str, now: u64) -> Result<Verified, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let (x5t, claims) = self.signed_claims(token)?;
        let exp = seconds(claims.exp, "exp")?;
        let nbf = seconds(claims.nbf, "nbf")?;
        check_times(exp, nbf, now, self.expect.leeway)?;
        let iss = claims.iss.ok_or(TokenError::MissingClaim("iss"))?;
        if !self.expect.issuers.contains(&iss) {
            return Err(TokenError::Issuer(iss));
        }
        let appctx = match claims.appctx {
            None => AppCtx::default(),
            Some(AppCtxField::Object(a)) => a,
            Some(AppCtxField::Text(t)) => serde_json::from_str(&t)
                .map_err(|e| TokenError::Malformed(format!("appctx: {e}")))?,
        };
        let amurl = appctx
            .amurl
            .as_deref()
            .ok_or(TokenError::MissingClaim("appctx.amurl"))?;
        self.check_amurl(amurl, &x5t)?;
        let family = family(claims.ver.as_deref(), appctx.version.as_deref())?;
        if family == Family::Callback {
            Audience::check(claims.aud.as_ref(), &self.expect.audiences)?;
        }
        let item = appctx
            .scope
            .as_deref()
            .and_then(|s| s.strip_prefix("ParentItemId:"))
            .map(Arc::from);
        Ok(Verified {
            family,
            user: claims
                .smtp
                .or(claims.nameid)
                .or(appctx.msexchuid)
                .map(Arc::from),
            item,
            expires: exp,
            x5t,
        })
    }

    /// `amurl` must be on the allow list, exactly; a key that is not pinned must have come
    /// from that very URL's document.
    fn check_amurl(&self, amurl: &str, x5t: &str) -> Result<(), TokenError> {
        let listed = self.expect.metadata_urls.iter().any(|u| u == amurl);
        let vouched = self.keys.contains(x5t)
            || self
                .fetched
                .as_ref()
                .and_then(|f| f.ring_of(amurl))
                .is_some_and(|r| r.contains(x5t));
        if listed && vouched {
            Ok(())
        } else {
            Err(TokenError::MetadataUrl(amurl.to_string()))
        }
    }

    /// `verify`, then refuse anything that is not a callback token.
    pub fn verify_for_ews(&self, token: &str, now: u64) -> Result<Verified, TokenError> {
        let v = self.verify(token, now)?;
        match v.family {
            Family::Callback => Ok(v),
            Family::Identity => Err(TokenError::IdentityToken),
            Family::Entra => Err(TokenError::Family("entra".into())),
        }
    }

    /// Checks the header, picks the pinned or fetched key by x5t and verifies the RS256
    /// signature.
    fn signed_claims(&self, token: &str) -> Result<(String, Claims), TokenError> {
        let header = rs256_header(token)?;
        let x5t = header.x5t.ok_or(TokenError::NoKeyId)?;
        if let Some(key) = self.keys.get(&x5t) {
            return Ok((x5t.clone(), rs256_claims(token, key)?));
        }
        let ring = self
            .fetched
            .as_ref()
            .and_then(|f| f.ring_with(&x5t))
            .ok_or_else(|| TokenError::UnknownKey(x5t.clone()))?;
        let key = ring
            .get(&x5t)
            .ok_or_else(|| TokenError::UnknownKey(x5t.clone()))?;
        Ok((x5t.clone(), rs256_claims(token, key)?))
    }
}

/// Callback and identity tokens are told apart by their version claims, and a token may
/// not claim to be both (RFC 8725 §3.12: mutually exclusive validation rules).
fn family(ver: Option<&str>, appctx_version: Option<&str>) -> Result<Family, TokenError> {
    let callback = ver == Some(CALLBACK_VERSION) || appctx_version == Some(CALLBACK_VERSION);
    let identity = appctx_version == Some(IDENTITY_VERSION) || ver == Some(IDENTITY_VERSION);
    match (callback, identity) {
        (true, false) => Ok(Family::Callback),
        (false, true) => Ok(Family::Identity),
        (true, true) => Err(TokenError::Family("both callback and identity".into())),
        (false, false) => Err(TokenError::Family(
            ver.or(appctx_version).unwrap_or("(none)").to_string(),
        )),
    }
}

/// Certificates, keys and tokens minted by the tests themselves (unit tests here, and the
/// lab tests through the `testkit` feature).
#[cfg(any(test, feature = "testkit"))]
pub mod testkit {
    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::{json, Value};

    pub const NOW: u64 = 1_800_000_000;
    pub const AUD: &str = "00000002-0000-0ff1-ce00-000000000000/mail.example.org@example.org";
    pub const ISS: &str = "00000002-0000-0ff1-ce00-000000000000@example.org";
    pub const AMURL: &str = "https://mail.example.org:443/autodiscover/metadata/json/1";

    /// A signing identity minted for the test: RSA-2048 key and self-signed certificate.
    pub struct Signer {
        pub pem_key: String,
        pub der: Vec<u8>,
        pub pem_cert: String,
    }

    pub fn signer() -> Signer {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let params =
            rcgen::CertificateParams::new(
                vec!["Microsoft Exchange Server Auth Certificate".into()],
            )
            .unwrap();
        let cert = params.self_signed(&key).unwrap();
        Signer {
            pem_key: key.serialize_pem(),
            der: cert.der().to_vec(),
            pem_cert: cert.pem(),
        }
    }

    pub fn validator(signers: &[&Signer]) -> Validator {
        let mut keys = KeyRing::default();
        for s in signers {
            keys.add_pem(s.pem_cert.as_bytes()).unwrap();
        }
        Validator {
            keys,
            fetched: None,
            expect: Expectations {
                audiences: vec![AUD.into()],
                issuers: vec![ISS.into()],
                metadata_urls: vec![AMURL.into()],
                leeway: 60,
            },
        }
    }

    /// Synthetic callback token claims after the reported shape (the real claims are
    /// undocumented; see exchange-ews.md §1.6).
    pub fn callback_claims() -> Value {
        callback_claims_at(NOW)
    }

    /// Callback claims valid around `now`, naming `item`.
    pub fn callback_claims_at(now: u64) -> Value {
        callback_claims_for(now, "AAMkAD-item-1=")
    }

    pub fn callback_claims_for(now: u64, item: &str) -> Value {
        let scope = format!("ParentItemId:{item}");
        let appctx = json!({"version": CALLBACK_VERSION, "amurl": AMURL, "scope": scope});
        json!({
            "aud": AUD, "iss": ISS, "nbf": (now - 10).to_string(), "exp": (now + 290).to_string(),
            "ver": CALLBACK_VERSION, "nameid": "alice@example.org",
            "appctx": appctx.to_string(),
        })
    }

    pub fn sign(s: &Signer, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.x5t = Some(thumbprint(&s.der));
        let key = EncodingKey::from_rsa_pem(s.pem_key.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    pub fn with(mut claims: Value, key: &str, value: Value) -> Value {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(key);
        } else {
            claims[key] = value;
        }
        claims
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::*;
    use super::*;
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::{json, Value};

    #[test]
    fn a_valid_callback_token_passes_with_its_claims() {
        let s = signer();
        let v = validator(&[&s])
            .verify_for_ews(&sign(&s, &callback_claims()), NOW)
            .unwrap();
        assert_eq!(v.family, Family::Callback);
        assert_eq!(v.item.as_deref(), Some("AAMkAD-item-1="));
        assert_eq!(v.user.as_deref(), Some("alice@example.org"));
        assert_eq!(v.expires, NOW + 290);
        assert_eq!(v.x5t, thumbprint(&s.der));
        // Numbers instead of numeric strings are fine too.
        let numeric = with(
            with(callback_claims(), "exp", json!(NOW + 290)),
            "nbf",
            json!(NOW - 10),
        );
        assert!(validator(&[&s])
            .verify_for_ews(&sign(&s, &numeric), NOW)
            .is_ok());
    }

    #[test]
    fn time_claims_are_required_and_enforced_with_leeway() {
        let s = signer();
        let v = validator(&[&s]);
        let t = |c: Value, now| v.verify_for_ews(&sign(&s, &c), now);
        assert_eq!(
            t(callback_claims(), NOW + 290 + 61),
            Err(TokenError::Expired {
                exp: NOW + 290,
                now: NOW + 351
            })
        );
        assert!(
            t(callback_claims(), NOW + 290 + 60).is_ok(),
            "within the leeway"
        );
        assert_eq!(
            t(callback_claims(), NOW - 71),
            Err(TokenError::NotYetValid {
                nbf: NOW - 10,
                now: NOW - 71
            })
        );
        assert_eq!(
            t(with(callback_claims(), "exp", Value::Null), NOW),
            Err(TokenError::MissingClaim("exp"))
        );
        assert_eq!(
            t(with(callback_claims(), "nbf", Value::Null), NOW),
            Err(TokenError::MissingClaim("nbf"))
        );
        assert_eq!(
            t(with(callback_claims(), "exp", json!("soon")), NOW),
            Err(TokenError::BadTime("exp"))
        );
    }

    #[test]
    fn audience_issuer_and_metadata_url_must_match_exactly() {
        let s = signer();
        let v = validator(&[&s]);
        let t = |c: Value| v.verify_for_ews(&sign(&s, &c), NOW);
        let other = "00000002-0000-0ff1-ce00-000000000000/evil.example@example.org";
        assert_eq!(
            t(with(callback_claims(), "aud", json!(other))),
            Err(TokenError::Audience(other.into()))
        );
        assert_eq!(
            t(with(callback_claims(), "aud", json!([AUD, other]))),
            Err(TokenError::Audience(other.into()))
        );
        assert_eq!(
            t(with(callback_claims(), "aud", Value::Null)),
            Err(TokenError::MissingClaim("aud"))
        );
        let iss = "00000002-0000-0ff1-ce00-000000000000@evil.example";
        assert_eq!(
            t(with(callback_claims(), "iss", json!(iss))),
            Err(TokenError::Issuer(iss.into()))
        );
        let elsewhere = "https://evil.example/autodiscover/metadata/json/1";
        let appctx = json!({"version": CALLBACK_VERSION, "amurl": elsewhere}).to_string();
        assert_eq!(
            t(with(callback_claims(), "appctx", json!(appctx))),
            Err(TokenError::MetadataUrl(elsewhere.into()))
        );
        // Without the explicit :443 it is another URL.
        let no_port = "https://mail.example.org/autodiscover/metadata/json/1";
        let appctx = json!({"version": CALLBACK_VERSION, "amurl": no_port}).to_string();
        assert_eq!(
            t(with(callback_claims(), "appctx", json!(appctx))),
            Err(TokenError::MetadataUrl(no_port.into()))
        );
    }

    #[test]
    fn every_audience_value_must_be_accepted_and_there_must_be_one() {
        let s = signer();
        let v = validator(&[&s]);
        let t = |aud: Value| v.verify_for_ews(&sign(&s, &with(callback_claims(), "aud", aud)), NOW);
        assert!(t(json!([AUD])).is_ok());
        assert!(matches!(t(json!([])), Err(TokenError::Audience(_))));
        assert_eq!(t(json!("")), Err(TokenError::Audience(String::new())));
        assert_eq!(
            t(json!([AUD, ""])),
            Err(TokenError::Audience(String::new()))
        );
        assert!(matches!(t(json!(7)), Err(TokenError::Malformed(_))));
        assert_eq!(
            TokenError::Audience(String::new()).reason(),
            "token_audience"
        );
    }

    #[test]
    fn the_metadata_url_is_required() {
        let s = signer();
        let v = validator(&[&s]);
        let t = |appctx: Value| {
            v.verify_for_ews(
                &sign(
                    &s,
                    &with(callback_claims(), "appctx", json!(appctx.to_string())),
                ),
                NOW,
            )
        };
        let scope = "ParentItemId:AAMkAD-item-1=";
        assert_eq!(
            t(json!({"version": CALLBACK_VERSION, "scope": scope})),
            Err(TokenError::MissingClaim("appctx.amurl"))
        );
        assert_eq!(
            t(json!({"version": CALLBACK_VERSION, "scope": scope, "amurl": ""})),
            Err(TokenError::MetadataUrl(String::new()))
        );
        // `ver` alone names the family, but the amurl is still required.
        let no_appctx = with(callback_claims(), "appctx", Value::Null);
        assert_eq!(
            v.verify_for_ews(&sign(&s, &no_appctx), NOW),
            Err(TokenError::MissingClaim("appctx.amurl"))
        );
        assert_eq!(
            TokenError::MissingClaim("appctx.amurl").reason(),
            "token_claims"
        );
    }

    #[test]
    fn an_identity_token_never_authorizes_ews() {
        let s = signer();
        let appctx = json!({"msexchuid": "53e925fa@example.org", "version": IDENTITY_VERSION, "amurl": AMURL}).to_string();
        let identity = json!({
            "aud": "https://addin.example.org/IdentityTest.html", "iss": ISS,
            "nbf": (NOW - 10).to_string(), "exp": (NOW + 28_790).to_string(), "appctx": appctx,
        });
        let v = validator(&[&s]);
        let token = sign(&s, &identity);
        assert_eq!(v.verify(&token, NOW).unwrap().family, Family::Identity);
        assert_eq!(
            v.verify_for_ews(&token, NOW),
            Err(TokenError::IdentityToken)
        );
        // A token claiming both families, or neither, is refused.
        let both = with(identity.clone(), "ver", json!(CALLBACK_VERSION));
        assert!(matches!(
            v.verify(&sign(&s, &both), NOW),
            Err(TokenError::Family(_))
        ));
        let neither = with(
            callback_claims(),
            "appctx",
            json!(json!({"amurl": AMURL}).to_string()),
        );
        let neither = with(neither, "ver", Value::Null);
        assert!(matches!(
            v.verify(&sign(&s, &neither), NOW),
            Err(TokenError::Family(_))
        ));
    }

    #[test]
    fn keys_come_from_pinned_certificates_only() {
        let (s, stranger) = (signer(), signer());
        let v = validator(&[&s]);
        // Signed by a key that is not pinned, naming its own thumbprint.
        let x5t = thumbprint(&stranger.der);
        assert_eq!(
            v.verify_for_ews(&sign(&stranger, &callback_claims()), NOW),
            Err(TokenError::UnknownKey(x5t))
        );
        // Signed by a stranger but naming the pinned certificate's thumbprint.
        let mut header = Header::new(Algorithm::RS256);
        header.x5t = Some(thumbprint(&s.der));
        let key = EncodingKey::from_rsa_pem(stranger.pem_key.as_bytes()).unwrap();
        let forged = jsonwebtoken::encode(&header, &callback_claims(), &key).unwrap();
        assert_eq!(
            v.verify_for_ews(&forged, NOW),
            Err(TokenError::BadSignature)
        );
        // No x5t at all.
        let key = EncodingKey::from_rsa_pem(s.pem_key.as_bytes()).unwrap();
        let bare =
            jsonwebtoken::encode(&Header::new(Algorithm::RS256), &callback_claims(), &key).unwrap();
        assert_eq!(v.verify_for_ews(&bare, NOW), Err(TokenError::NoKeyId));
        // Two pinned certificates during a rotation: both verify.
        let both = validator(&[&s, &stranger]);
        assert_eq!(both.keys.len(), 2);
        assert!(both
            .verify_for_ews(&sign(&stranger, &callback_claims()), NOW)
            .is_ok());
    }

    #[test]
    fn algorithm_attacks_are_refused() {
        let s = signer();
        let v = validator(&[&s]);
        let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let x5t = thumbprint(&s.der);
        // alg: none, no signature.
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT", "x5t": x5t})),
            b64(&callback_claims())
        );
        assert_eq!(
            v.verify_for_ews(&none, NOW),
            Err(TokenError::Algorithm("none".into()))
        );
        // HS256 keyed with the public certificate (RS/HS confusion).
        let mut header = Header::new(Algorithm::HS256);
        header.x5t = Some(x5t.clone());
        for secret in [s.pem_cert.as_bytes(), s.der.as_slice()] {
            let token = jsonwebtoken::encode(
                &header,
                &callback_claims(),
                &EncodingKey::from_secret(secret),
            )
            .unwrap();
            assert_eq!(
                v.verify_for_ews(&token, NOW),
                Err(TokenError::Algorithm("HS256".into()))
            );
        }
        // RS512 is RSA too, but not what Exchange signs with.
        let mut header = Header::new(Algorithm::RS512);
        header.x5t = Some(x5t);
        let key = EncodingKey::from_rsa_pem(s.pem_key.as_bytes()).unwrap();
        let rs512 = jsonwebtoken::encode(&header, &callback_claims(), &key).unwrap();
        assert_eq!(
            v.verify_for_ews(&rs512, NOW),
            Err(TokenError::Algorithm("RS512".into()))
        );
    }

    #[test]
    fn malformed_and_oversized_tokens_are_refused() {
        let s = signer();
        let v = validator(&[&s]);
        for junk in ["", "a", "a.b", "a.b.c", "...."] {
            assert!(
                matches!(v.verify_for_ews(junk, NOW), Err(TokenError::Malformed(_))),
                "{junk:?}"
            );
        }
        // The signature is checked before the payload is parsed at all.
        let header = json!({"alg": "RS256", "x5t": thumbprint(&s.der)});
        let header = URL_SAFE_NO_PAD.encode(header.to_string());
        let unsigned = format!("{header}.%%%.c2ln");
        assert_eq!(
            v.verify_for_ews(&unsigned, NOW),
            Err(TokenError::BadSignature)
        );
        // A correctly signed payload that is not JSON.
        let input = format!("{header}.{}", URL_SAFE_NO_PAD.encode("not json"));
        let key = EncodingKey::from_rsa_pem(s.pem_key.as_bytes()).unwrap();
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::RS256).unwrap();
        let signed_junk = format!("{input}.{sig}");
        assert!(matches!(
            v.verify_for_ews(&signed_junk, NOW),
            Err(TokenError::Malformed(_))
        ));
        let no_kid = format!("{}.e30.sig", URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#));
        assert_eq!(v.verify_for_ews(&no_kid, NOW), Err(TokenError::NoKeyId));
        assert_eq!(
            v.verify_for_ews(&"a".repeat(MAX_TOKEN_BYTES + 1), NOW),
            Err(TokenError::TooLarge)
        );
        // A tampered payload breaks the signature.
        let token = sign(&s, &callback_claims());
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        parts[1] = URL_SAFE_NO_PAD
            .encode(with(callback_claims(), "nameid", json!("mallory@example.org")).to_string());
        assert_eq!(
            v.verify_for_ews(&parts.join("."), NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn duplicate_claims_are_refused() {
        let s = signer();
        let v = validator(&[&s]);
        // {"exp": <valid>, ..., "exp": <far future>}: the struct refuses the second one.
        let body = callback_claims().to_string();
        let dup = format!("{},\"exp\":\"99999999999\"}}", &body[..body.len() - 1]);
        let header = json!({"alg": "RS256", "typ": "JWT", "x5t": thumbprint(&s.der)});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(&dup)
        );
        let key = EncodingKey::from_rsa_pem(s.pem_key.as_bytes()).unwrap();
        let sig =
            jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key, Algorithm::RS256).unwrap();
        let token = format!("{signing_input}.{sig}");
        assert!(
            matches!(v.verify_for_ews(&token, NOW), Err(TokenError::Malformed(m)) if m.contains("duplicate")),
            "{:?}",
            v.verify_for_ews(&token, NOW)
        );
    }

    // Found by fuzzing (tokens): an unknown claim whose string is not UTF-8 was skipped by
    // serde unchecked, so claims that are not JSON passed.
    #[test]
    fn claims_that_are_not_utf8_are_refused() {
        let s = signer();
        let v = validator(&[&s]);
        let body = callback_claims().to_string();
        let mut claims = body.as_bytes()[..body.len() - 1].to_vec();
        claims.extend_from_slice(b",\"x\":\"Excha\xff\xffnge\"}");
        let header = json!({"alg": "RS256", "typ": "JWT", "x5t": thumbprint(&s.der)});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(&claims)
        );
        let key = EncodingKey::from_rsa_pem(s.pem_key.as_bytes()).unwrap();
        let sig =
            jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key, Algorithm::RS256).unwrap();
        let token = format!("{signing_input}.{sig}");
        assert!(
            matches!(v.verify_for_ews(&token, NOW), Err(TokenError::Malformed(_))),
            "{:?}",
            v.verify_for_ews(&token, NOW)
        );
    }

    #[test]
    fn certificates_must_be_rsa() {
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["ec".into()])
            .unwrap()
            .self_signed(&ec)
            .unwrap();
        let mut ring = KeyRing::default();
        assert!(matches!(ring.add_der(cert.der()), Err(KeyError::NotRsa)));
        assert!(matches!(
            ring.add_pem(b"no certificate here"),
            Err(KeyError::Empty)
        ));
        assert!(ring.is_empty());
    }
}
