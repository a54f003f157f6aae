//! `Authorization: Negotiate` in the lab, with real TLS and HTTP: NTLM inside SPNEGO (legs
//! pyspnego wrote) authenticates the connection as its user; a Kerberos AP-REQ (built with
//! `der`, and one curl sent with MIT Kerberos) is the auth kind `kerberos`, which only a rule
//! naming it allows; SPNEGO that does not decode is refused with its reason and never
//! reaches Exchange.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use ewsgate::identity::spnego::{build, NTLMSSP};
use tests::{
    ews::wait_audit,
    gate::Gate,
    mailbox::{requests, TOKEN_ITEM},
};

const RULES: &str = r#"
[[rule]]
name = "office-windows"
groups = ["offices"]
auth = ["ntlm", "negotiate"]
action = "allow"

[[rule]]
name = "partner-kerberos"
groups = ["salesforce"]
auth = ["kerberos"]
action = "allow"
"#;

fn soap() -> String {
    requests::get_item(&[TOKEN_ITEM])
}

fn negotiate(blob: &[u8]) -> String {
    format!("Negotiate {}", STANDARD.encode(blob))
}

/// A leg pyspnego wrote (see filter-user/testdata/negotiate).
fn captured(name: &str) -> String {
    let path = format!(
        "{}/../filter-user/testdata/negotiate/{name}.b64",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(path).expect("fixture");
    format!("Negotiate {}", text.trim())
}

#[test]
fn negotiate_is_read_by_its_structure() {
    let g = Gate::start(0, RULES);

    // NTLM inside SPNEGO: the first leg gets Exchange's challenge, the answer authenticates
    // the connection as EXAMPLE\alice, and later requests on it run as her.
    let mut c = g.https("office");
    let first = c
        .ews(&[("Authorization", &captured("ntlm-init"))], b"")
        .expect("first leg");
    assert_eq!(first.status, 401, "{}", first.body);
    let answer = c
        .ews(
            &[("Authorization", &captured("ntlm-answer"))],
            soap().as_bytes(),
        )
        .expect("second leg");
    assert_eq!(answer.status, 200, "{}", answer.body);
    let later = c.ews(&[], soap().as_bytes()).expect("later request");
    assert_eq!(later.status, 200);
    assert_eq!(later.header("x-backend-user"), Some("EXAMPLE\\alice"));
    let line = wait_audit(&g.audit, |v| {
        v["auth"] == "negotiate" && v["user"] == "EXAMPLE\\alice"
    })
    .expect("negotiate audit");
    assert_eq!(line["rule"], "office-windows");

    // A Kerberos AP-REQ is `kerberos`: the office rule (ntlm, negotiate) does not allow it,
    // the partner rule that names it does.
    let kerberos = negotiate(&build::init_kerberos());
    let office = g
        .https("office")
        .ews(&[("Authorization", &kerberos)], soap().as_bytes())
        .expect("reply");
    assert_eq!(office.status, 403, "{}", office.body);
    assert!(wait_audit(&g.audit, |v| v["auth"] == "kerberos"
        && v["source_group"] == "offices"
        && v["decision"] == "deny")
    .is_some());
    let partner = g
        .https("sf")
        .ews(&[("Authorization", &kerberos)], soap().as_bytes())
        .expect("reply");
    assert_eq!(partner.status, 200, "{}", partner.body);
    let line = wait_audit(&g.audit, |v| {
        v["auth"] == "kerberos" && v["decision"] == "allow"
    })
    .expect("kerberos audit");
    assert_eq!(line["rule"], "partner-kerberos");
    // The same with the token curl sends with MIT Kerberos.
    let mit = g
        .https("sf")
        .ews(
            &[("Authorization", &captured("kerberos-init"))],
            soap().as_bytes(),
        )
        .expect("reply");
    assert_eq!(mit.status, 200, "{}", mit.body);

    // SPNEGO that does not decode, or offers nothing ewsgate can read, is refused with its
    // reason and never reaches Exchange.
    let t1 = ewsgate::identity::auth::ntlm_messages::negotiate();
    let mut truncated = build::init_ntlm(&t1);
    truncated.truncate(truncated.len() - 4);
    let mut buried = vec![0x30, 0x02, 0, 0];
    buried.extend(&t1);
    let seen = g.backend.requests().len();
    for (blob, reason) in [
        (truncated, "spnego_malformed"),
        (build::init(&[NTLMSSP], None), "spnego_no_token"),
        (buried, "negotiate_malformed"),
        (
            build::init(&[ewsgate::identity::spnego::NEGOEX], Some(&t1)),
            "spnego_mechanism_unsupported",
        ),
    ] {
        let reply = g
            .https("office")
            .ews(&[("Authorization", &negotiate(&blob))], soap().as_bytes())
            .expect("reply");
        assert_eq!(reply.status, 400, "{reason}: {}", reply.body);
        assert!(reply.body.contains(reason), "{reason}: {}", reply.body);
        assert!(
            wait_audit(&g.audit, |v| v["reason"] == reason).is_some(),
            "{reason} audited"
        );
    }
    assert_eq!(
        g.backend.requests().len(),
        seen,
        "nothing malformed reached Exchange"
    );
}
