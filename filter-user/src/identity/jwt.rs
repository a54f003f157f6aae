//! What both token validators share: the refusal reasons, what a verified token says, the
//! signing keys by id, and the RS256 check itself. The Exchange validator (`tokens`) and
//! the Entra ID validator (`entra`) build on this and not on each other.

use std::{collections::HashMap, sync::Arc};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::{de::DeserializeOwned, Deserialize};

/// Longest token accepted, Exchange or Entra; Exchange's are well under 4 KiB.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("algorithm {0} refused: only RS256 is accepted")]
    Algorithm(String),
    #[error("token names no signing key (x5t or kid)")]
    NoKeyId,
    #[error("no trusted signing key has id {0}")]
    UnknownKey(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("claim {0} is missing")]
    MissingClaim(&'static str),
    #[error("claim {0} is not a number of seconds")]
    BadTime(&'static str),
    #[error("token expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("token is not valid before {nbf} (now {now})")]
    NotYetValid { nbf: u64, now: u64 },
    #[error("audience {0} is not accepted")]
    Audience(String),
    #[error("issuer {0} is not accepted")]
    Issuer(String),
    #[error("auth metadata URL {0} is not on the allow list, or did not list the signing key")]
    MetadataUrl(String),
    #[error("an identity token (ExIdTok.V1) never authorizes an EWS call")]
    IdentityToken,
    #[error("unknown token family {0}")]
    Family(String),
}

impl TokenError {
    /// A short stable name for audit lines and counters.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "token_malformed",
            TokenError::TooLarge => "token_too_large",
            TokenError::Algorithm(_) => "token_algorithm",
            TokenError::NoKeyId | TokenError::UnknownKey(_) => "token_unknown_key",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::MissingClaim(_) | TokenError::BadTime(_) => "token_claims",
            TokenError::Expired { .. } => "token_expired",
            TokenError::NotYetValid { .. } => "token_not_yet_valid",
            TokenError::Audience(_) => "token_audience",
            TokenError::Issuer(_) => "token_issuer",
            TokenError::MetadataUrl(_) => "token_metadata_url",
            TokenError::IdentityToken => "token_identity_as_ews",
            TokenError::Family(_) => "token_family",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not an X.509 certificate: {0}")]
    Certificate(String),
    #[error("the certificate's key is not RSA")]
    NotRsa,
    #[error("no certificate found in the PEM text")]
    Empty,
    #[error("not a JWKS document: {0}")]
    Jwks(String),
    #[error("the JWKS document holds no RSA signing key with a kid")]
    NoJwk,
}

/// The token families ewsgate tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Callback,
    Identity,
    /// An Entra ID access token with the EWS permission (hybrid set-ups).
    Entra,
}

/// What a verified token says, for rules and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub family: Family,
    /// nameid, smtp or msexchuid (Exchange); upn, preferred_username, unique_name, appid or
    /// azp (Entra), whichever the token carries.
    /// Shared, as `item` is, with every request that presents the token: no copy each time.
    pub user: Option<Arc<str>>,
    /// The item a callback token was issued for (`ParentItemId:<id>` in its scope).
    pub item: Option<Arc<str>>,
    pub expires: u64,
    /// Id of the key that signed it: the certificate's `x5t`, or the JWK's `kid`.
    pub x5t: String,
}

/// Signing keys by id: an `x5t` that ewsgate computes from each certificate, or a JWK's
/// `kid`. Several at once for rotation.
#[derive(Default, Clone)]
pub struct KeyRing {
    keys: HashMap<String, DecodingKey>,
}

impl KeyRing {
    /// Adds a DER certificate; returns its x5t.
    pub fn add_der(&mut self, der: &[u8]) -> Result<String, KeyError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| KeyError::Certificate(e.to_string()))?;
        let spki = cert.public_key();
        if spki.algorithm.algorithm != x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION {
            return Err(KeyError::NotRsa);
        }
        // The BIT STRING of an RSA SubjectPublicKeyInfo is the PKCS#1 RSAPublicKey.
        let key = DecodingKey::from_rsa_der(&spki.subject_public_key.data);
        let x5t = thumbprint(der);
        self.keys.insert(x5t.clone(), key);
        Ok(x5t)
    }

    /// Adds every certificate of a PEM text; returns their x5t values.
    pub fn add_pem(&mut self, pem: &[u8]) -> Result<Vec<String>, KeyError> {
        let mut added = Vec::new();
        for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
            let block = block.map_err(|e| KeyError::Certificate(e.to_string()))?;
            if block.label == "CERTIFICATE" {
                added.push(self.add_der(&block.contents)?);
            }
        }
        if added.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(added)
    }

    /// Adds the RSA signing keys of a JWKS document (RFC 7517) by `kid`; returns the kids.
    /// Keys of other types, for encryption, or for another algorithm are skipped.
    pub fn add_jwks(&mut self, json: &[u8]) -> Result<Vec<String>, KeyError> {
        #[derive(Deserialize)]
        struct Set {
            keys: Vec<serde_json::Value>,
        }
        let set: Set = serde_json::from_slice(json).map_err(|e| KeyError::Jwks(e.to_string()))?;
        let mut added = Vec::new();
        for jwk in &set.keys {
            let text = |f: &str| jwk.get(f).and_then(|v| v.as_str());
            let usable = text("kty") == Some("RSA")
                && text("use").is_none_or(|u| u == "sig")
                && text("alg").is_none_or(|a| a == "RS256");
            let (Some(kid), Some(n), Some(e)) = (text("kid"), text("n"), text("e")) else {
                continue;
            };
            if !usable || kid.is_empty() {
                continue;
            }
            if let Ok(key) = DecodingKey::from_rsa_components(n, e) {
                self.keys.insert(kid.to_string(), key);
                added.push(kid.to_string());
            }
        }
        if added.is_empty() {
            return Err(KeyError::NoJwk);
        }
        Ok(added)
    }

    pub fn get(&self, id: &str) -> Option<&DecodingKey> {
        self.keys.get(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// JOSE `x5t`: base64url of the SHA-1 of the certificate's DER.
pub fn thumbprint(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, der);
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// A string field of a token's header (`part` 0) or claims (`part` 1), read without
/// verifying anything: for routing a token to its validator and choosing what to refetch,
/// never for trusting it.
pub fn unverified_field(token: &str, part: usize, field: &str) -> Option<String> {
    let v = unverified_json(token, part)?;
    v.get(field)?.as_str().map(str::to_string)
}

pub(crate) fn unverified_json(token: &str, part: usize) -> Option<serde_json::Value> {
    let text = token.split('.').nth(part)?;
    let bytes = URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// `aud` may be one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    /// Present, not empty, and every value accepted: a token meant for several parties, one
    /// of them foreign, is not ours alone.
    pub(crate) fn check(aud: Option<&Audience>, accepted: &[String]) -> Result<(), TokenError> {
        let values: &[String] = match aud.ok_or(TokenError::MissingClaim("aud"))? {
            Audience::One(a) => std::slice::from_ref(a),
            Audience::Many(v) => v,
        };
        if values.is_empty() {
            return Err(TokenError::Audience("[] (empty)".into()));
        }
        match values.iter().find(|a| !accepted.contains(a)) {
            Some(bad) => Err(TokenError::Audience(bad.clone())),
            None => Ok(()),
        }
    }
}

/// `exp` and `nbf`, required, with the leeway on both.
pub(crate) fn check_times(exp: u64, nbf: u64, now: u64, leeway: u64) -> Result<(), TokenError> {
    if now > exp.saturating_add(leeway) {
        return Err(TokenError::Expired { exp, now });
    }
    if now.saturating_add(leeway) < nbf {
        return Err(TokenError::NotYetValid { nbf, now });
    }
    Ok(())
}

/// The header, refused unless it asks for RS256 (and `typ`, when present, is JWT).
pub(crate) fn rs256_header(token: &str) -> Result<Header, TokenError> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
        // `none` and other unknown algorithms fail to parse as a header at all.
        jsonwebtoken::errors::ErrorKind::Json(_) => header_algorithm(token),
        _ => TokenError::Malformed(e.to_string()),
    })?;
    if header.alg != Algorithm::RS256 {
        return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
    }
    if header
        .typ
        .as_deref()
        .is_some_and(|t| !t.eq_ignore_ascii_case("JWT"))
    {
        return Err(TokenError::Malformed("typ is not JWT".into()));
    }
    Ok(header)
}

/// Verifies the RS256 signature with `key`, then parses the claims as `T`. Time, audience
/// and issuer checks are the caller's: Exchange writes times as strings, which jsonwebtoken
/// refuses, and jsonwebtoken does not check `nbf` by default.
pub(crate) fn rs256_claims<T: DeserializeOwned>(
    token: &str,
    key: &DecodingKey,
) -> Result<T, TokenError> {
    let mut validation = Validation::new(Algorithm::RS256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let claims = jsonwebtoken::decode::<T>(token, key, &validation)
        .map(|d| d.claims)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
            _ => TokenError::Malformed(e.to_string()),
        })?;
    claims_are_text(token)?;
    Ok(claims)
}

/// Claims that decode to anything but UTF-8 are not JSON. serde skips an unknown claim's
/// string without checking its UTF-8, so the check is made here, once the signature holds.
fn claims_are_text(token: &str) -> Result<(), TokenError> {
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p.trim_end_matches('=')).ok());
    match claims {
        Some(c) if std::str::from_utf8(&c).is_ok() => Ok(()),
        _ => Err(TokenError::Malformed("claims are not UTF-8 JSON".into())),
    }
}

/// For a header jsonwebtoken cannot parse: name the algorithm if that is why.
fn header_algorithm(token: &str) -> TokenError {
    let alg = unverified_json(token, 0)
        .and_then(|h| h.get("alg").and_then(|a| a.as_str()).map(str::to_string));
    match alg {
        Some(a) if a != "RS256" => TokenError::Algorithm(a),
        _ => TokenError::Malformed("header is not valid JSON".into()),
    }
}
