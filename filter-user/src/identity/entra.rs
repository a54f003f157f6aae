//! Entra ID (Azure AD) bearer tokens for hybrid set-ups: RS256 only, the key chosen by
//! `kid` from a configured JWKS file, `exp` and `nbf` required, exact `iss` and `aud`, and
//! the EWS permission itself (`scp` EWS.AccessAsUser.All, or the app role
//! full_access_as_app).

use std::{collections::HashMap, path::Path};

use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::identity::tokens::{
    claims_are_text, unverified_field, Audience, Family, TokenError, Verified,
};
use crate::model::settings::EntraSettings;

const DELEGATED_SCOPE: &str = "EWS.AccessAsUser.All";
const APP_ROLE: &str = "full_access_as_app";

pub struct EntraValidator {
    keys: HashMap<String, DecodingKey>,
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
    pub fn load(settings: &EntraSettings, leeway: u64) -> anyhow::Result<EntraValidator> {
        let text = std::fs::read_to_string(&settings.keys_file)?;
        let set: JwkSet = serde_json::from_str(&text)?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let (Some(kid), Ok(key)) = (jwk.common.key_id.clone(), DecodingKey::from_jwk(jwk))
            else {
                continue;
            };
            keys.insert(kid, key);
        }
        anyhow::ensure!(
            !keys.is_empty(),
            "{}: no keys with a kid",
            show(&settings.keys_file)
        );
        Ok(EntraValidator {
            keys,
            issuers: settings.issuers.clone(),
            audiences: settings.audiences.clone(),
            leeway,
        })
    }

    /// Whether the token names one of this tenant's issuers (unverified: routing only).
    pub fn claims_ours(&self, token: &str) -> bool {
        unverified_field(token, 1, "iss").is_some_and(|iss| self.issuers.contains(&iss))
    }

    pub fn verify(&self, token: &str, now: u64) -> Result<Verified, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(TokenError::NoKeyId)?;
        let key = self
            .keys
            .get(&kid)
            .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
                _ => TokenError::Malformed(e.to_string()),
            })?
            .claims;
        claims_are_text(token)?;
        let exp = claims.exp.ok_or(TokenError::MissingClaim("exp"))?;
        let nbf = claims.nbf.ok_or(TokenError::MissingClaim("nbf"))?;
        if now > exp.saturating_add(self.leeway) {
            return Err(TokenError::Expired { exp, now });
        }
        if now.saturating_add(self.leeway) < nbf {
            return Err(TokenError::NotYetValid { nbf, now });
        }
        let iss = claims.iss.clone().ok_or(TokenError::MissingClaim("iss"))?;
        if !self.issuers.contains(&iss) {
            return Err(TokenError::Issuer(iss));
        }
        let auds = claims
            .aud
            .as_ref()
            .ok_or(TokenError::MissingClaim("aud"))?
            .values();
        if !auds.iter().any(|a| self.audiences.contains(a)) {
            return Err(TokenError::Audience(auds.join(",")));
        }
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
            .map(|u| u.to_ascii_lowercase());
        Ok(Verified {
            family: Family::Entra,
            user,
            item: None,
            expires: exp,
            x5t: kid,
        })
    }
}

fn show(p: &Path) -> String {
    p.display().to_string()
}
