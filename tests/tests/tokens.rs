//! Token trust in the lab. Signing keys fetched from an allow-listed Exchange auth metadata
//! URL: a rotated key is picked up on its first token (whatever the case of `Bearer`),
//! refetches are rate limited, a failed, redirected or oversized fetch keeps the last good
//! keys, and a token's own `amurl` is never fetched. With two metadata URLs, each keeps its
//! own keys, a key counts only for the URL that listed it, and fetched keys survive reloads.
//! Entra ID tokens: the EWS permission, audience, issuer and key checked; keys from a JWKS
//! file or from the tenant's discovery document over HTTPS (rotation, one refetch for an
//! unknown kid, redirects, foreign hosts, oversized and slow answers refused).

use std::{thread, time::Duration};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use ewsgate::identity::tokens::{testkit, CALLBACK_VERSION};
use serde_json::json;
use tests::{
    docs::{Answer, DocServer},
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
    status_as(g, "Bearer", token)
}

/// The same with the scheme spelt `scheme` (RFC 9110: case-insensitive).
fn status_as(g: &Gate, scheme: &str, token: &str) -> u16 {
    let auth = format!("{scheme} {token}");
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

    // Rotation: the document now lists C; after the rate limit, C's token fetches it, even
    // when the client spells the scheme `bearer`.
    serve(&g, 200, document(&[&c]), None);
    thread::sleep(rate);
    let before = fetches(&g);
    assert_eq!(status_as(&g, "bearer", &token(&c, URL)), 200);
    assert_eq!(fetches(&g), before + 1, "a lower-case bearer refetches too");
    assert_eq!(status_as(&g, "BEARER", &token(&c, URL)), 200);

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

const META_A: &str = "http://127.0.0.1:8081/autodiscover/metadata/json/1";
const META_B: &str = "http://127.0.0.1:8082/autodiscover/metadata/json/1";
const META_PATH: &str = "/autodiscover/metadata/json/1";

/// Rewrites the gate's config with `edit` and reloads it.
fn reload(g: &Gate, edit: impl FnOnce(String) -> String) {
    let path = g.dir.join("ewsgate.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, edit(text)).expect("config");
    g.daemon.cli(&["reload"]).expect("reload");
}

#[test]
fn each_metadata_url_keeps_its_own_keys_and_fetched_keys_survive_reloads() {
    let tokens = format!(
        "metadata_urls = [\"{META_A}\", \"{META_B}\"]\nmetadata_fetch = true\nmetadata_refetch_min_secs = 2\nmetadata_timeout_ms = 1000\n"
    );
    let rules = format!("{RULES}\n[[rule]]\nname = \"spare\"\naction = \"deny\"\n");
    let g = Gate::start_with(0, &tokens, &rules);
    let a = DocServer::start(&g.lab.gate, "127.0.0.1:8081", None).expect("server A");
    let b = DocServer::start(&g.lab.gate, "127.0.0.1:8082", None).expect("server B");
    let (ka, kb, kb2) = (testkit::signer(), testkit::signer(), testkit::signer());
    a.answer(META_PATH, Answer::ok(document(&[&ka])));
    b.answer(META_PATH, Answer::ok(document(&[&kb])));
    let rate = Duration::from_millis(2300);
    thread::sleep(rate);

    // Each URL's key passes with its own amurl, after one fetch of that URL only.
    assert_eq!(status(&g, &token(&ka, META_A)), 200);
    assert_eq!(status(&g, &token(&kb, META_B)), 200);
    // A key counts only for the URL that listed it.
    assert_eq!(status(&g, &token(&ka, META_B)), 401);
    assert!(wait_audit(&g.audit, |v| v["reason"] == "token_metadata_url").is_some());

    // A fails from now on; B rotates to KB2. A reload that leaves the metadata settings
    // alone keeps the running key source: A's keys are still there, nothing is refetched.
    a.answer(META_PATH, Answer::status(500));
    b.answer(META_PATH, Answer::ok(document(&[&kb2])));
    let (a_hits, b_hits) = (a.hits(META_PATH), b.hits(META_PATH));
    reload(&g, |t| t.replace("name = \"spare\"", "name = \"spare-2\""));
    assert_eq!(
        status(&g, &token(&ka, META_A)),
        200,
        "A's keys survive a reload"
    );
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        (a.hits(META_PATH), b.hits(META_PATH)),
        (a_hits, b_hits),
        "the running source was kept"
    );

    // B's new key is fetched from B alone, while A keeps its last good keys.
    thread::sleep(rate);
    assert_eq!(status(&g, &token(&kb2, META_B)), 200);
    assert_eq!(b.hits(META_PATH), b_hits + 1);
    assert_eq!(
        a.hits(META_PATH),
        a_hits,
        "an unknown key on B never fetches A"
    );
    assert_eq!(status(&g, &token(&ka, META_A)), 200);
    assert_eq!(status(&g, &token(&kb, META_B)), 401, "B's old key is gone");

    // Changed metadata settings: a new source, which starts with the keys of the old one
    // per URL and refreshes both at once; A fails again and keeps its keys.
    reload(&g, |t| {
        t.replace("metadata_timeout_ms = 1000", "metadata_timeout_ms = 1500")
    });
    assert!(
        a.wait_hits(META_PATH, a_hits + 1),
        "the new source fetched A"
    );
    assert!(
        b.wait_hits(META_PATH, b_hits + 2),
        "the new source fetched B"
    );
    assert_eq!(
        status(&g, &token(&ka, META_A)),
        200,
        "A kept across new settings"
    );
    assert_eq!(status(&g, &token(&kb2, META_B)), 200);
}

const DISCOVERY_PATH: &str = "/tenant/v2.0/.well-known/openid-configuration";
const ENTRA_HOST: &str = "127.0.0.1:8443";

fn jwk(signer: &testkit::Signer, kid: &str) -> serde_json::Value {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(signer.pem_key.as_bytes()).unwrap();
    let mut jwk =
        jsonwebtoken::jwk::Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.into());
    serde_json::to_value(jwk).unwrap()
}

fn jwks(keys: &[(&testkit::Signer, &str)]) -> Answer {
    let keys: Vec<_> = keys.iter().map(|(s, kid)| jwk(s, kid)).collect();
    Answer::ok(json!({"keys": keys}).to_string())
}

fn discovery(jwks_uri: &str) -> Answer {
    Answer::ok(
        json!({"issuer": "https://login.microsoftonline.com/tenant/v2.0",
               "authorization_endpoint": "https://login.microsoftonline.com/tenant/oauth2/v2.0/authorize",
               "jwks_uri": jwks_uri, "id_token_signing_alg_values_supported": ["RS256"]})
        .to_string(),
    )
}

#[test]
fn entra_keys_come_from_the_tenants_discovery_document() {
    let tokens = format!(
        "metadata_urls = [\"{}\"]\n[tokens.entra]\nissuers = [\"{TENANT}\"]\naudiences = [\"{OUTLOOK}\"]\ndiscovery_url = \"https://{ENTRA_HOST}{DISCOVERY_PATH}\"\njwks_hosts = [\"{ENTRA_HOST}\"]\nca = \"ca.pem\"\ntimeout_ms = 1000\nmax_bytes = 65536\nrefetch_min_secs = 2\n",
        testkit::AMURL
    );
    let rules = format!(
        "{RULES}\n[[rule]]\nname = \"hybrid-entra\"\ngroups = [\"salesforce\"]\nauth = [\"bearer\"]\ntoken = [\"entra\"]\naction = \"allow\"\n"
    );
    let g = Gate::start_with(0, &tokens, &rules);
    let (chain, key) = g.pki.leaf(&["127.0.0.1"]).expect("server certificate");
    let server = DocServer::start(&g.lab.gate, ENTRA_HOST, Some((&chain, &key))).expect("server");
    let keys_uri = format!("https://{ENTRA_HOST}/tenant/discovery/v2.0/keys");
    let (k1, k2, k3) = (testkit::signer(), testkit::signer(), testkit::signer());
    // The proxy's first refresh finds nothing (404) and its rate limit runs out.
    let rate = Duration::from_millis(2300);
    thread::sleep(rate);
    server.answer(DISCOVERY_PATH, discovery(&keys_uri));
    server.answer("/tenant/discovery/v2.0/keys", jwks(&[(&k1, "kid-1")]));
    let found = |n: usize| server.hits(DISCOVERY_PATH) == n;

    // Served: kid-1 passes after one fetch of the discovery document and its JWKS.
    let before = server.hits(DISCOVERY_PATH);
    let keys_before = server.hits("/tenant/discovery/v2.0/keys");
    assert_eq!(status(&g, &entra_token(&k1, "kid-1", |_| {})), 200);
    assert!(found(before + 1), "one fetch for the unknown kid");
    assert_eq!(server.hits("/tenant/discovery/v2.0/keys"), keys_before + 1);
    let line = wait_audit(&g.audit, |v| v["token_family"] == "entra").expect("audit");
    assert_eq!(line["rule"], "hybrid-entra");
    // Within the rate limit an unknown kid is refused without a fetch.
    assert_eq!(status(&g, &entra_token(&k2, "kid-2", |_| {})), 401);
    assert!(found(before + 1), "rate limited");
    assert!(wait_audit(&g.audit, |v| v["reason"] == "token_unknown_key").is_some());

    // Rotated: the JWKS now lists kid-2; its first token triggers exactly one refetch.
    server.answer(
        "/tenant/discovery/v2.0/keys",
        jwks(&[(&k1, "kid-1"), (&k2, "kid-2")]),
    );
    thread::sleep(rate);
    let before = server.hits(DISCOVERY_PATH);
    assert_eq!(status(&g, &entra_token(&k2, "kid-2", |_| {})), 200);
    assert_eq!(
        status(
            &g,
            &entra_token(&k2, "kid-2", |c| c["upn"] = json!("dan@example.org"))
        ),
        200
    );
    assert!(found(before + 1), "one refetch for kid-2");

    // Bad answers: each is refused, kid-3 never loads, and the last good keys stay.
    let evil_keys = "/evil/keys";
    server.answer(evil_keys, jwks(&[(&k3, "kid-3")]));
    let mut redirect = Answer::status(302);
    redirect.location = Some(format!("https://{ENTRA_HOST}/evil/discovery"));
    server.answer(
        "/evil/discovery",
        discovery(&format!("https://{ENTRA_HOST}{evil_keys}")),
    );
    let mut slow = discovery(&format!("https://{ENTRA_HOST}{evil_keys}"));
    slow.delay = Duration::from_millis(2500);
    let huge = json!({"jwks_uri": format!("https://{ENTRA_HOST}{evil_keys}"),
                      "padding": "x".repeat(100_000)})
    .to_string();
    let bad: Vec<(&str, Answer)> = vec![
        ("a redirect", redirect),
        (
            "a foreign jwks host",
            discovery("https://127.0.0.2:8443/evil/keys"),
        ),
        (
            "a plain-http jwks_uri",
            discovery(&format!("http://{ENTRA_HOST}{evil_keys}")),
        ),
        ("an oversized answer", Answer::ok(huge)),
        ("a slow answer", slow),
        ("a failure", Answer::status(500)),
        ("no jwks_uri", Answer::ok("{\"issuer\": \"x\"}")),
    ];
    for (what, answer) in bad {
        server.answer(DISCOVERY_PATH, answer);
        thread::sleep(rate);
        let before = server.hits(DISCOVERY_PATH);
        assert_eq!(
            status(&g, &entra_token(&k3, "kid-3", |_| {})),
            401,
            "{what}"
        );
        assert!(found(before + 1), "{what}: one refetch");
        assert_eq!(
            status(&g, &entra_token(&k2, "kid-2", |_| {})),
            200,
            "{what}: the last good keys stay"
        );
    }
    assert_eq!(
        server.hits("/evil/discovery"),
        0,
        "redirects are not followed"
    );
    assert_eq!(
        server.hits(evil_keys),
        0,
        "no bad answer led to a JWKS fetch"
    );

    // An oversized JWKS behind a good discovery document is refused too.
    server.answer(DISCOVERY_PATH, discovery(&keys_uri));
    let mut big = jwks(&[(&k3, "kid-3")]);
    big.body = big.body.replacen(
        '{',
        &format!("{{\"padding\":\"{}\",", "x".repeat(100_000)),
        1,
    );
    server.answer("/tenant/discovery/v2.0/keys", big);
    thread::sleep(rate);
    assert_eq!(status(&g, &entra_token(&k3, "kid-3", |_| {})), 401);
    assert_eq!(status(&g, &entra_token(&k1, "kid-1", |_| {})), 200);
}
