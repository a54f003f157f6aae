//! Upstream connections: pooled for requests that authenticate themselves, bound to their
//! client for NTLM and Kerberos, so that no client ever rides on another's session.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use ewsgate::identity::{auth::ntlm_messages, spnego::build};
use tests::{
    ews::{audit_lines, Reply, CLOSE_AFTER, KERBEROS_USER},
    gate::Gate,
    mailbox::{requests, TOKEN_ITEM},
};

const RULES: &str = r#"
[[rule]]
name = "salesforce-callback"
groups = ["salesforce"]
auth = ["bearer"]
token = ["callback"]
action = "allow"

[[rule]]
name = "office"
groups = ["offices"]
auth = ["ntlm", "basic", "kerberos"]
action = "allow"
"#;

fn backend_connection(r: &Reply) -> String {
    r.header("x-backend-connection")
        .unwrap_or_default()
        .to_string()
}

#[test]
fn interleaved_basic_bearer_and_ntlm_clients_never_see_each_others_session() {
    let g = Gate::start(0, RULES);
    let soap = requests::get_item(&[TOKEN_ITEM]);
    let ntlm = |m: Vec<u8>| format!("NTLM {}", STANDARD.encode(m));
    let basic = format!("Basic {}", STANDARD.encode("bob@example.org:s3cret"));
    let bearer = format!("Bearer {}", g.pki.token(|c| c));
    let mut alice = g.https("office");
    let mut carol = g.https("office");
    let mut shared = Vec::new();
    let mut self_authenticating = |g: &Gate| {
        let b = g
            .https("office")
            .ews(&[("Authorization", &basic)], soap.as_bytes())
            .unwrap();
        let t = g
            .https("sf")
            .ews(&[("Authorization", &bearer)], soap.as_bytes())
            .unwrap();
        for r in [&b, &t] {
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(
                r.header("x-backend-user"),
                None,
                "a pooled request saw a session"
            );
        }
        shared.push(backend_connection(&b));
        shared.push(backend_connection(&t));
    };
    let challenge = alice
        .ews(&[("Authorization", &ntlm(ntlm_messages::negotiate()))], b"")
        .unwrap();
    assert_eq!(challenge.status, 401);
    self_authenticating(&g);
    let a3 = alice
        .ews(
            &[(
                "Authorization",
                &ntlm(ntlm_messages::authenticate("EXAMPLE", "alice")),
            )],
            soap.as_bytes(),
        )
        .unwrap();
    assert_eq!(a3.status, 200);
    self_authenticating(&g);
    assert_eq!(
        carol
            .ews(&[("Authorization", &ntlm(ntlm_messages::negotiate()))], b"")
            .unwrap()
            .status,
        401
    );
    let c3 = carol
        .ews(
            &[(
                "Authorization",
                &ntlm(ntlm_messages::authenticate("EXAMPLE", "carol")),
            )],
            soap.as_bytes(),
        )
        .unwrap();
    let mut bound = vec![backend_connection(&a3), backend_connection(&c3)];
    for _ in 0..3 {
        self_authenticating(&g);
        let a = alice.ews(&[], soap.as_bytes()).unwrap();
        let c = carol.ews(&[], soap.as_bytes()).unwrap();
        assert_eq!(a.header("x-backend-user"), Some("EXAMPLE\\alice"));
        assert_eq!(c.header("x-backend-user"), Some("EXAMPLE\\carol"));
        assert_eq!(
            backend_connection(&a),
            bound[0],
            "alice keeps her own connection"
        );
        assert_eq!(backend_connection(&c), bound[1], "carol keeps hers");
    }
    assert_ne!(bound[0], bound[1]);
    // A connection that carried NTLM is never pooled; the pool is reused by the others.
    bound.push(backend_connection(&challenge));
    for s in &shared {
        assert!(
            !bound.contains(s),
            "a Basic or Bearer request rode on NTLM connection {s}"
        );
    }
    let mut distinct = shared.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() < shared.len(),
        "{} requests on {} connections: nothing was reused",
        shared.len(),
        distinct.len()
    );
    drop(alice);
    gone_with_its_client(&g, &basic, &soap, &bound[0]);
}

/// Once a client with a bound connection goes, its upstream connection goes with it, never
/// to the pool: requests after it neither land on it nor see its user.
fn gone_with_its_client(g: &Gate, basic: &str, soap: &str, bound: &str) {
    std::thread::sleep(std::time::Duration::from_millis(300));
    for _ in 0..4 {
        let r = g
            .https("office")
            .ews(&[("Authorization", basic)], soap.as_bytes())
            .unwrap();
        assert_ne!(backend_connection(&r), bound);
        assert_eq!(r.header("x-backend-user"), None);
    }
}

#[test]
fn a_kerberos_client_keeps_its_connection_and_no_pooled_request_rides_on_it() {
    let g = Gate::start(0, RULES);
    let soap = requests::get_item(&[TOKEN_ITEM]);
    let kerberos = format!("Negotiate {}", STANDARD.encode(build::init_kerberos()));
    let basic = format!("Basic {}", STANDARD.encode("bob@example.org:s3cret"));
    let mut dave = g.https("office");
    let first = dave
        .ews(&[("Authorization", &kerberos)], soap.as_bytes())
        .unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.header("x-backend-user"), Some(KERBEROS_USER));
    let bound = backend_connection(&first);
    for _ in 0..3 {
        // Requests that authenticate themselves, on pooled connections: never the one
        // Exchange holds dave's ticket on.
        for _ in 0..2 {
            let b = g
                .https("office")
                .ews(&[("Authorization", &basic)], soap.as_bytes())
                .unwrap();
            assert_eq!(b.status, 200, "{}", b.body);
            assert_ne!(
                backend_connection(&b),
                bound,
                "a Basic request rode on the Kerberos connection"
            );
            assert_eq!(b.header("x-backend-user"), None);
        }
        // dave's next requests carry no header, as a Windows client's do: they go on his
        // own connection and are judged as Kerberos.
        let later = dave.ews(&[], soap.as_bytes()).unwrap();
        assert_eq!(later.status, 200, "{}", later.body);
        assert_eq!(backend_connection(&later), bound);
        assert_eq!(later.header("x-backend-user"), Some(KERBEROS_USER));
    }
    // All four of dave's requests are audited as Kerberos under the office rule.
    let kerberos = || {
        audit_lines(&g.audit)
            .iter()
            .filter(|v| v["auth"] == "kerberos" && v["rule"] == "office")
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while kerberos() < 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(kerberos(), 4);
    drop(dave);
    gone_with_its_client(&g, &basic, &soap, &bound);
}

#[test]
fn a_session_ends_with_the_upstream_connection_exchange_held_it_on() {
    let g = Gate::start(0, RULES);
    let soap = requests::get_item(&[TOKEN_ITEM]);
    let kerberos = format!("Negotiate {}", STANDARD.encode(build::init_kerberos()));
    let mut erin = g.https("office");
    let first = erin
        .ews(&[("Authorization", &kerberos)], soap.as_bytes())
        .unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    // Exchange closes the connection that held erin's ticket.
    let closing = erin.ews(&[(CLOSE_AFTER, "1")], soap.as_bytes()).unwrap();
    assert_eq!(closing.status, 200, "{}", closing.body);
    assert_eq!(closing.header("x-backend-user"), Some(KERBEROS_USER));
    // Her next request without credentials reaches Exchange on a new connection as
    // nobody: ewsgate judges it as that, and the office rule wants a credential.
    let seen = g.backend.requests().len();
    let after = erin.ews(&[], soap.as_bytes()).unwrap();
    assert_ne!(after.status, 200, "{}", after.body);
    assert_eq!(g.backend.requests().len(), seen, "it reached Exchange");
}
