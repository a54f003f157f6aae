//! Bearer tokens: the unverified header and claim readers (`identity::jwt::unverified_field`,
//! both validators' `refetch_url`), and both validators (Exchange callback tokens, Entra ID)
//! behind the token cache the proxy uses, with a fixed key ring: the certificate and JWKS under
//! `keys/`, made for fuzzing only.
//!
//! The first byte chooses the input's shape:
//! - 0: the rest is a token as a client sends it;
//! - 1: the rest is a header and a claims JSON text separated by a NUL byte, signed here
//!   with the fixed key, so that the claim checks behind the signature are reached;
//! - 2: the rest is a claims JSON text, signed under a fixed RS256 header naming the key.
//!
//! Properties beyond "no panic", for every token the cache's `verify_for_ews` accepts: it is not an
//! identity token; it was signed by the fixed key; its issuer is a configured one; its
//! time claims hold the clock within the leeway and `expires` is its `exp`; a callback
//! token's every audience is the configured one, an Entra token's some audience is.
#![no_main]

use std::sync::LazyLock;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use ewsgate::{
    identity::{
        entra::EntraValidator,
        jwt::{unverified_field, Family, KeyRing},
        token_cache::TokenCache,
        tokens::Validator,
    },
    model::settings::Expectations,
};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const NOW: u64 = 1_800_000_000;
const LEEWAY: u64 = 60;
const AUD: &str = "00000002-0000-0ff1-ce00-000000000000/mail.example.org@example.org";
const ISS: &str = "00000002-0000-0ff1-ce00-000000000000@example.org";
const AMURL: &str = "https://mail.example.org:443/autodiscover/metadata/json/1";
const ENTRA_ISS: &str = "https://sts.windows.net/00000000-0000-0000-0000-000000000001/";
const ENTRA_AUD: &str = "https://outlook.office365.com";
const KID: &str = "fuzz-entra-key";

struct Fixture {
    exchange: Validator,
    entra: EntraValidator,
    cache: TokenCache,
    key: EncodingKey,
    x5t: String,
}

fn exchange() -> (Validator, String) {
    let mut keys = KeyRing::default();
    let x5t = keys
        .add_pem(include_bytes!("../keys/signer.pem"))
        .expect("the fixed certificate")
        .remove(0);
    let validator = Validator {
        keys,
        fetched: None,
        expect: Expectations {
            audiences: vec![AUD.into()],
            issuers: vec![ISS.into()],
            metadata_urls: vec![AMURL.into()],
            leeway: LEEWAY,
        },
    };
    (validator, x5t)
}

fn entra() -> EntraValidator {
    let mut keys = KeyRing::default();
    keys.add_jwks(include_bytes!("../keys/entra-jwks.json"))
        .expect("the fixed JWKS");
    EntraValidator::new(
        vec![ENTRA_ISS.into()],
        vec![ENTRA_AUD.into()],
        LEEWAY,
        keys,
        None,
    )
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let (exchange, x5t) = self::exchange();
    let cache = TokenCache::new(self::exchange().0, Some(entra()), 1024);
    let key = EncodingKey::from_rsa_pem(include_bytes!("../keys/signer.key")).expect("the key");
    Fixture {
        exchange,
        entra: entra(),
        cache,
        key,
        x5t,
    }
});

fuzz_target!(|data: &[u8]| {
    let f = &*FIXTURE;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = match mode % 3 {
        0 => String::from_utf8_lossy(rest).into_owned(),
        1 => {
            let at = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let claims = rest.get(at + 1..).unwrap_or_default();
            sign(f, &rest[..at], claims)
        }
        _ => {
            let header = format!(
                r#"{{"alg":"RS256","typ":"JWT","x5t":"{}","kid":"{KID}"}}"#,
                f.x5t
            );
            sign(f, header.as_bytes(), rest)
        }
    };
    // The unverified readers only route; they must not fail on anything.
    let _ = unverified_field(&token, 0, "x5t");
    let _ = unverified_field(&token, 1, "iss");
    let _ = f.exchange.refetch_url(&token);
    let _ = f.entra.refetch_url(&token);
    let _ = f.exchange.verify(&token, NOW);
    let _ = f.entra.verify(&token, NOW);
    let Ok(v) = f.cache.verify_for_ews(&token, NOW) else {
        return;
    };
    assert_ne!(
        v.family,
        Family::Identity,
        "an identity token passed for EWS"
    );
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p.trim_end_matches('=')).ok())
        .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
        .expect("an accepted token has JSON claims");
    let seconds = |name: &str| -> u64 {
        match &claims[name] {
            Value::Number(n) => n.as_u64(),
            Value::String(s) if v.family == Family::Callback => s.trim().parse().ok(),
            _ => None,
        }
        .unwrap_or_else(|| panic!("accepted with {name} = {}", claims[name]))
    };
    let (exp, nbf) = (seconds("exp"), seconds("nbf"));
    assert!(
        NOW <= exp.saturating_add(LEEWAY),
        "accepted after exp {exp}"
    );
    assert!(nbf <= NOW + LEEWAY, "accepted before nbf {nbf}");
    assert_eq!(v.expires, exp);
    let audiences: Vec<&str> = match &claims["aud"] {
        Value::String(a) => vec![a.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        other => panic!("accepted with aud = {other}"),
    };
    match v.family {
        Family::Callback => {
            assert_eq!(claims["iss"], ISS);
            assert_eq!(v.x5t, f.x5t);
            assert!(audiences.iter().all(|a| *a == AUD), "aud {audiences:?}");
        }
        Family::Entra => {
            assert_eq!(claims["iss"], ENTRA_ISS);
            assert_eq!(v.x5t, KID);
            assert!(audiences.contains(&ENTRA_AUD), "aud {audiences:?}");
        }
        Family::Identity => unreachable!(),
    }
});

/// A compact JWS of `header` and `claims`, signed RS256 with the fixed key.
fn sign(f: &Fixture, header: &[u8], claims: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &f.key, Algorithm::RS256)
        .expect("RS256 signing");
    format!("{input}.{sig}")
}
