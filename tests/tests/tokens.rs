//! Token trust in the lab. Signing keys fetched from an allow-listed Exchange auth metadata
//! URL: a rotated key is picked up on its first token, refetches are rate limited, a
//! failed, redirected or oversized fetch keeps the last good keys, and a token's own `amurl`
//! is never fetched. Entra ID tokens: the EWS permission, audience, issuer and key checked.

use std::{thread, time::Duration};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use ewsgate::identity::tokens::{testkit, CALLBACK_VERSION};
use serde_json::json;
use tests::{
    ews::{now, wait_audit},
    gate::Gate,
    mailbox::{requests, TOKEN_ITEM},
};

const URL: &str = "http://127.0.0.1:8080/autodiscover/metadata/json/1";
const EVIL: &str = "http://127.0.0.1:8080/autodiscover/metadata/json/evil";

const RULES: &str = r#"
[[rule]]
name = "salesforce-callback"
groups = ["salesforce"]
auth = ["bearer"]
token = ["callback"]
action = "allow"
"#;

fn document(signers: &[&testkit::Signer]) -> String {
    let keys: Vec<_> = signers
        .iter()
        .map(|s| {
            json!({"usage": "signing", "keyinfo": {"x5t": "not-trusted"},
                   "keyvalue": {"type": "x509Certificate", "value": STANDARD.encode(&s.der)}})
        })
        .collect();
    json!({"id": "_synthetic", "version": "1.0", "name": "Exchange", "realm": "*", "keys": keys})
        .to_string()
}

fn token(signer: &testkit::Signer, amurl: &str) -> String {
    let appctx = json!({"version": CALLBACK_VERSION, "amurl": amurl,
                        "scope": format!("ParentItemId:{TOKEN_ITEM}")});
    let claims = testkit::with(
        testkit::callback_claims_at(now()),
        "appctx",
        json!(appctx.to_string()),
    );
    testkit::sign(signer, &claims)
}

fn status(g: &Gate, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    g.https("sf")
        .ews(
            &[("Authorization", &auth)],
            requests::get_item(&[TOKEN_ITEM]).as_bytes(),
        )
        .expect("reply")
        .status
}

fn fetches(g: &Gate) -> usize {
    g.backend
        .requests()
        .iter()
        .filter(|s| s.path.starts_with("/autodiscover/metadata/"))
        .count()
}

fn serve(g: &Gate, status: u16, body: String, location: Option<&str>) {
    *g.backend.metadata.lock().unwrap() = (status, body, location.map(str::to_string));
}

#[test]
fn keys_come_from_the_allow_listed_metadata_url_only() {
    let tokens = format!(
        "metadata_urls = [\"{URL}\"]\nmetadata_fetch = true\nmetadata_refetch_min_secs = 2\nmetadata_timeout_ms = 1000\nmetadata_max_bytes = 65536\n"
    );
    let g = Gate::start_with(0, &tokens, RULES);
    let (b, c, d) = (testkit::signer(), testkit::signer(), testkit::signer());
    serve(&g, 200, document(&[&b]), None);
    let rate = Duration::from_millis(2300);
    thread::sleep(rate);

    // B is only in the document: its first token fetches it.
    assert_eq!(status(&g, &token(&b, URL)), 200);
    let after_b = fetches(&g);
    assert!(after_b >= 1);
    // C is unknown: refused, and within the rate limit nothing more is fetched.
    assert_eq!(status(&g, &token(&c, URL)), 401);
    assert_eq!(status(&g, &token(&c, URL)), 401);
    assert_eq!(fetches(&g), after_b, "refetches are rate limited");
    assert!(wait_audit(&g.audit, |v| v["reason"] == "token_unknown_key").is_some());

    // Rotation: the document now lists C; after the rate limit, C's token fetches it.
    serve(&g, 200, document(&[&c]), None);
    thread::sleep(rate);
    assert_eq!(status(&g, &token(&c, URL)), 200);

    // A failing, a redirecting and an oversized document keep the last good keys.
    let huge = document(&[&d]) + &" ".repeat(100_000);
    for (code, body, location) in [
        (500, String::new(), None),
        (302, String::new(), Some(EVIL)),
        (200, huge, None),
        (200, "{\"keys\": \"nope\"}".to_string(), None),
    ] {
        serve(&g, code, body, location);
        thread::sleep(rate);
        let before = fetches(&g);
        assert_eq!(status(&g, &token(&d, URL)), 401, "D never loads ({code})");
        assert_eq!(fetches(&g), before + 1, "one refetch for the unknown key");
        assert_eq!(
            status(&g, &token(&c, URL)),
            200,
            "C kept after a bad fetch ({code})"
        );
    }
    // A token naming another metadata URL is refused, and that URL is never fetched.
    serve(&g, 200, document(&[&d]), None);
    assert_eq!(status(&g, &token(&c, EVIL)), 401);
    assert!(g
        .backend
        .requests()
        .iter()
        .all(|s| !s.path.contains("evil")));
}

const TENANT: &str = "https://sts.windows.net/0d7b2d1d-0000-4000-8000-000000000000/";
const OUTLOOK: &str = "https://outlook.office365.com";

fn entra_token(
    signer: &testkit::Signer,
    kid: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> String {
    let n = now();
    let mut claims = json!({"iss": TENANT, "aud": OUTLOOK, "nbf": n - 10, "exp": n + 300,
        "scp": "EWS.AccessAsUser.All", "upn": "Carol@example.org"});
    edit(&mut claims);
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.to_string());
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(signer.pem_key.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[test]
fn entra_tokens_with_the_ews_permission_pass_their_rule() {
    let entra = testkit::signer();
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(entra.pem_key.as_bytes()).unwrap();
    let mut jwk =
        jsonwebtoken::jwk::Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("kid-1".into());
    let jwks = std::env::temp_dir().join(format!("ewsgate-jwks-{}.json", tests::lab::tag()));
    std::fs::write(&jwks, json!({"keys": [jwk]}).to_string()).unwrap();
    let tokens = format!(
        "metadata_urls = [\"{}\"]\n[tokens.entra]\nissuers = [\"{TENANT}\"]\naudiences = [\"{OUTLOOK}\"]\nkeys_file = \"{}\"\n",
        testkit::AMURL,
        jwks.display()
    );
    let rules = format!(
        "{RULES}\n[[rule]]\nname = \"hybrid-entra\"\ngroups = [\"salesforce\"]\nauth = [\"bearer\"]\ntoken = [\"entra\"]\naction = \"allow\"\n"
    );
    let g = Gate::start_with(0, &tokens, &rules);
    assert_eq!(status(&g, &entra_token(&entra, "kid-1", |_| {})), 200);
    let line = wait_audit(&g.audit, |v| v["token_family"] == "entra").expect("audit");
    assert_eq!(line["rule"], "hybrid-entra");
    assert_eq!(line["user"], "carol@example.org");
    let other = testkit::signer();
    let cases: Vec<(String, &str)> = vec![
        (
            entra_token(&entra, "kid-1", |c| {
                c["aud"] = json!("https://graph.microsoft.com")
            }),
            "token_audience",
        ),
        (
            entra_token(&entra, "kid-1", |c| c["scp"] = json!("Mail.Read")),
            "token_family",
        ),
        (
            entra_token(&entra, "kid-1", |c| c["exp"] = json!(now() - 3600)),
            "token_expired",
        ),
        (
            entra_token(&entra, "kid-1", |c| {
                c.as_object_mut().unwrap().remove("nbf");
            }),
            "token_claims",
        ),
        (entra_token(&entra, "kid-2", |_| {}), "token_unknown_key"),
        (entra_token(&other, "kid-1", |_| {}), "token_bad_signature"),
    ];
    for (t, reason) in cases {
        assert_eq!(status(&g, &t), 401, "{reason}");
        assert!(
            wait_audit(&g.audit, |v| v["reason"] == reason).is_some(),
            "{reason}"
        );
    }
    // An app with the application role passes too.
    let app = entra_token(&entra, "kid-1", |c| {
        let o = c.as_object_mut().unwrap();
        o.remove("scp");
        o.remove("upn");
        o.insert("roles".into(), json!(["full_access_as_app"]));
        o.insert(
            "appid".into(),
            json!("11111111-2222-3333-4444-555555555555"),
        );
    });
    assert_eq!(status(&g, &app), 200);
    let _ = std::fs::remove_file(&jwks);
}
