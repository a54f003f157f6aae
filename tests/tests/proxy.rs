//! The request layer in the lab, with real TLS, real HTTP and tokens signed by keys the
//! tests mint: what each client receives and what reaches the stand-in Exchange.

use std::{
    fs,
    io::Write,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use base64::{
    engine::general_purpose::STANDARD, engine::general_purpose::URL_SAFE_NO_PAD, Engine as _,
};
use ewsgate::identity::{auth::ntlm_messages, tokens::testkit};
use serde_json::{json, Value};
use tests::{
    ews::{audit_lines, now, wait_audit, Https, Pki},
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
name = "office-windows"
groups = ["offices"]
auth = ["ntlm", "negotiate"]
action = "allow"

[[rule]]
name = "office-basic"
groups = ["offices"]
auth = ["basic"]
users = ["*@example.org"]
action = "allow"

[[rule]]
name = "office-phones"
groups = ["offices"]
auth = ["client-cert"]
users = ["phone-*"]
action = "allow"
"#;

fn setup(failures: u32) -> Gate {
    Gate::start(failures, RULES)
}

fn gate4() -> SocketAddr {
    tests::gate::gate4()
}

fn gate6() -> SocketAddr {
    tests::gate::gate6()
}

trait Bearer {
    fn bearer(&self, role: &str, token: &str) -> tests::ews::Reply;
}

impl Bearer for Gate {
    fn bearer(&self, role: &str, token: &str) -> tests::ews::Reply {
        let auth = format!("Bearer {token}");
        self.https(role)
            .ews(&[("Authorization", &auth)], soap().as_bytes())
            .expect("reply")
    }
}

/// A request every rule in this lab allows: the callback token's own item.
fn soap() -> String {
    requests::get_item(&[TOKEN_ITEM])
}

fn body_has(reply: &tests::ews::Reply, what: &str) -> bool {
    reply.body.contains(what)
}

fn alg_none(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    format!("{header}.{}.", URL_SAFE_NO_PAD.encode(claims.to_string()))
}

fn hs256_with_public_cert(pki: &Pki, claims: &Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(pki.signer.pem_cert.as_bytes());
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.x5t = Some(ewsgate::identity::tokens::thumbprint(&pki.signer.der));
    jsonwebtoken::encode(&header, claims, &key).expect("hs256")
}

#[test]
fn callback_tokens_from_salesforce_pass_and_every_bad_token_is_denied_with_its_reason() {
    let s = setup(0);
    let token = s.pki.token(|c| c);
    // A valid token from the Salesforce range passes, over IPv4 and IPv6; forged forwarding
    // headers are replaced.
    let auth = format!("Bearer {token}");
    let reply = s
        .https("sf")
        .ews(
            &[
                ("Authorization", &auth),
                ("X-Forwarded-For", "203.0.113.99"),
                ("X-Original-URL", "/ecp/"),
                ("Connection", "X-Hop-Secret"),
                ("X-Hop-Secret", "1"),
            ],
            soap().as_bytes(),
        )
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let mut v6 = Https::connect(s.lab.client("sf"), gate6(), &s.pki, None).unwrap();
    assert_eq!(
        v6.ews(&[("Authorization", &auth)], soap().as_bytes())
            .unwrap()
            .status,
        200
    );
    let seen = s.backend.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].path, "/EWS/Exchange.asmx");
    assert_eq!(seen[0].header("x-forwarded-for"), vec!["198.51.100.140"]);
    assert_eq!(seen[1].header("x-forwarded-for"), vec!["2001:db8:200::10"]);
    assert!(seen[0].header("x-original-url").is_empty());
    assert!(
        seen[0].header("x-hop-secret").is_empty(),
        "a header named by Connection is hop-by-hop"
    );
    assert_eq!(seen[0].header("x-forwarded-proto"), vec!["https"]);
    let line = wait_audit(&s.audit, |v| v["decision"] == "allow").expect("audit line");
    assert_eq!(line["rule"], "salesforce-callback");
    assert_eq!(line["token_family"], "callback");
    assert_eq!(line["user"], "alice@example.org");
    assert_eq!(line["source_group"], "salesforce");
    assert_eq!(line["upstream_status"], 200);

    let t = now();
    let other = testkit::signer();
    let claims = testkit::callback_claims_at(t);
    let identity =
        json!({"version": "ExIdTok.V1", "amurl": testkit::AMURL, "msexchuid": "u-1"}).to_string();
    let cases: Vec<(&str, String)> = vec![
        ("token_expired", s.pki.token(|c| testkit::with(testkit::with(c, "nbf", json!((t - 900).to_string())), "exp", json!((t - 600).to_string())))),
        ("token_not_yet_valid", s.pki.token(|c| testkit::with(testkit::with(c, "nbf", json!(t + 600)), "exp", json!(t + 900)))),
        ("token_audience", s.pki.token(|c| testkit::with(c, "aud", json!("00000002-0000-0ff1-ce00-000000000000/evil.test@evil.test")))),
        ("token_issuer", s.pki.token(|c| testkit::with(c, "iss", json!("00000002-0000-0ff1-ce00-000000000000@evil.test")))),
        ("token_unknown_key", testkit::sign(&other, &claims)),
        ("token_identity_as_ews", s.pki.token(|c| testkit::with(testkit::with(c, "ver", Value::Null), "appctx", json!(identity)))),
        ("token_algorithm", alg_none(&claims)),
        ("token_algorithm", hs256_with_public_cert(&s.pki, &claims)),
        ("token_metadata_url", s.pki.token(|c| {
            let appctx = json!({"version": "Exchange.Callback.V1", "amurl": "https://evil.test/metadata/json/1", "scope": "ParentItemId:x"});
            testkit::with(c, "appctx", json!(appctx.to_string()))
        })),
        ("token_claims", s.pki.token(|c| testkit::with(c, "exp", Value::Null))),
        // Fail closed: an empty or partly foreign audience, and a missing amurl.
        ("token_audience", s.pki.token(|c| testkit::with(c, "aud", json!([])))),
        ("token_audience", s.pki.token(|c| testkit::with(c, "aud", json!([testkit::AUD, "00000002-0000-0ff1-ce00-000000000000/evil.test@evil.test"])))),
        ("token_claims", s.pki.token(|c| {
            let appctx = json!({"version": "Exchange.Callback.V1", "scope": format!("ParentItemId:{TOKEN_ITEM}")});
            testkit::with(c, "appctx", json!(appctx.to_string()))
        })),
    ];
    for (reason, bad) in &cases {
        let reply = s.bearer("sf", bad);
        assert_eq!(reply.status, 401, "{reason}: {}", reply.body);
        assert!(body_has(&reply, reason), "{reason}: {}", reply.body);
        assert!(
            wait_audit(&s.audit, |v| v["reason"] == *reason
                && v["decision"] == "deny")
            .is_some(),
            "{reason} audited"
        );
    }
    assert_eq!(
        s.backend.requests().len(),
        2,
        "no bad token reached Exchange"
    );

    // The same valid token from an office is not what the rules allow offices.
    let reply = s.bearer("office", &token);
    assert_eq!(reply.status, 403, "{}", reply.body);
    // Other paths under /EWS/ are denied unless a rule names them; spellings of the
    // endpoint are normalised before the decision and forwarded canonically.
    let mut c = s.https("sf");
    let wsdl = c
        .request(
            "GET",
            "/EWS/Services.wsdl",
            &[("Authorization", &auth)],
            b"",
        )
        .unwrap();
    assert_eq!(wsdl.status, 403);
    assert!(
        body_has(&wsdl, "ews_path_not_named_by_a_rule"),
        "{}",
        wsdl.body
    );
    let mut c = s.https("sf");
    let odd = c
        .request(
            "POST",
            "/ews/%45xchange.asmx.",
            &[("Authorization", &auth)],
            soap().as_bytes(),
        )
        .unwrap();
    assert_eq!(odd.status, 200, "{}", odd.body);
    assert_eq!(
        s.backend.requests().last().unwrap().path,
        "/EWS/Exchange.asmx"
    );
    let raw = fs::read_to_string(&s.audit).unwrap();
    assert!(!raw.contains(&token), "a token reached the audit log");
}

#[test]
fn office_basic_ntlm_and_client_certificates_follow_their_rules() {
    let s = setup(0);
    let basic = |user: &str| format!("Basic {}", STANDARD.encode(format!("{user}:s3cret-Pa55")));
    let ok = s
        .https("office")
        .ews(
            &[("Authorization", &basic("alice@example.org"))],
            soap().as_bytes(),
        )
        .unwrap();
    assert_eq!(ok.status, 200, "{}", ok.body);
    let no = s
        .https("office")
        .ews(
            &[("Authorization", &basic("mallory@evil.test"))],
            soap().as_bytes(),
        )
        .unwrap();
    assert_eq!(no.status, 403, "{}", no.body);
    let from_sf = s
        .https("sf")
        .ews(
            &[("Authorization", &basic("alice@example.org"))],
            soap().as_bytes(),
        )
        .unwrap();
    assert_eq!(from_sf.status, 403, "Basic is allowed from offices only");

    // Two NTLM clients from one office host, interleaved leg by leg.
    let ntlm = |m: Vec<u8>| format!("NTLM {}", STANDARD.encode(m));
    let mut a = s.https("office");
    let mut b = s.https("office");
    assert_eq!(
        a.ews(&[("Authorization", &ntlm(ntlm_messages::negotiate()))], b"")
            .unwrap()
            .status,
        401
    );
    assert_eq!(
        b.ews(&[("Authorization", &ntlm(ntlm_messages::negotiate()))], b"")
            .unwrap()
            .status,
        401
    );
    let a3 = a
        .ews(
            &[(
                "Authorization",
                &ntlm(ntlm_messages::authenticate("EXAMPLE", "alice")),
            )],
            soap().as_bytes(),
        )
        .unwrap();
    let b3 = b
        .ews(
            &[(
                "Authorization",
                &ntlm(ntlm_messages::authenticate("EXAMPLE", "bob")),
            )],
            soap().as_bytes(),
        )
        .unwrap();
    assert_eq!((a3.status, b3.status), (200, 200));
    for _ in 0..3 {
        let ra = a.ews(&[], soap().as_bytes()).unwrap();
        let rb = b.ews(&[], soap().as_bytes()).unwrap();
        assert_eq!(ra.header("x-backend-user"), Some("EXAMPLE\\alice"));
        assert_eq!(rb.header("x-backend-user"), Some("EXAMPLE\\bob"));
        assert_ne!(
            ra.header("x-backend-connection"),
            rb.header("x-backend-connection")
        );
        assert_eq!(
            ra.header("x-backend-connection"),
            a3.header("x-backend-connection")
        );
    }
    let line = wait_audit(&s.audit, |v| {
        v["auth"] == "ntlm" && v["user"] == "EXAMPLE\\bob"
    })
    .expect("ntlm audit");
    assert_eq!(line["rule"], "office-windows");

    // An office phone with a client certificate from the configured CA.
    let mut phone =
        Https::connect(s.lab.client("office"), gate4(), &s.pki, Some("phone-0042")).unwrap();
    let r = phone.ews(&[], soap().as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(wait_audit(&s.audit, |v| v["auth"] == "client-cert"
        && v["user"] == "phone-0042")
    .is_some());
    let anonymous = s.https("office").ews(&[], soap().as_bytes()).unwrap();
    assert_eq!(anonymous.status, 403);

    // Internet hosts never reach the TLS listener: XDP drops their SYNs.
    let inet = s.lab.client("inet");
    let to = gate4();
    let refused = inet.run(move || TcpStream::connect_timeout(&to, Duration::from_millis(400)));
    assert!(refused.is_err());
    assert!(Https::connect(s.lab.client("inet"), gate4(), &s.pki, None).is_err());

    // A new certificate is served after a reload; open connections carry on.
    let mut open =
        Https::connect(s.lab.client("office"), gate4(), &s.pki, Some("phone-0042")).unwrap();
    assert_eq!(open.ews(&[], soap().as_bytes()).unwrap().status, 200);
    let before = open.server_cert();
    s.pki.server_cert("gate").unwrap();
    s.daemon.cli(&["reload"]).unwrap();
    assert_eq!(
        open.ews(&[], soap().as_bytes()).unwrap().status,
        200,
        "open connection survives"
    );
    let fresh = s.https("office");
    assert_ne!(
        fresh.server_cert(),
        before,
        "new connections get the new certificate"
    );

    let raw = fs::read_to_string(&s.audit).unwrap();
    assert!(!raw.contains("s3cret"), "a password reached the audit log");
    assert!(
        !raw.contains("TlRMTVNTUA"),
        "an NTLM blob reached the audit log"
    );
}

#[test]
fn smuggling_slow_clients_and_large_bodies() {
    let s = setup(0);
    let token = s.pki.token(|c| c);
    let auth = format!("Authorization: Bearer {token}\r\n");
    let mut idle = s.https("sf");
    assert_eq!(
        idle.ews(
            &[("Authorization", &format!("Bearer {token}"))],
            soap().as_bytes()
        )
        .unwrap()
        .status,
        200
    );
    let idle_since = Instant::now();
    s.backend.clear();
    let cases = [
        (
            "content_length_with_transfer_encoding",
            "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "duplicate_content_length",
            "Content-Length: 6\r\nContent-Length: 6\r\n",
        ),
        (
            "upgrade",
            "Content-Length: 6\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        ),
    ];
    for (reason, headers) in cases {
        let mut c = s.https("sf");
        let raw = format!("POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: mail.example.org\r\n{auth}{headers}\r\n0\r\n\r\nGET /EWS/Exchange.asmx HTTP/1.1\r\nHost: mail.example.org\r\n\r\n");
        c.send(raw.as_bytes()).unwrap();
        let reply = c.read_reply().unwrap();
        assert_eq!(reply.status, 400, "{reason}: {}", reply.body);
        assert!(body_has(&reply, reason), "{reason}: {}", reply.body);
        assert!(
            c.closed_within(Duration::from_secs(2)),
            "{reason}: connection closed"
        );
    }
    let mut c = s.https("sf");
    c.send(
        format!("GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: mail.example.org\r\n{auth}X-Folded: a\r\n b\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    assert!(
        c.read_reply().map(|r| r.status == 400).unwrap_or(true),
        "obs-fold refused"
    );
    let mut c = s.https("sf");
    c.send(b"CONNECT 192.0.2.10:25 HTTP/1.1\r\nHost: 192.0.2.10:25\r\n\r\n")
        .unwrap();
    assert_eq!(c.read_reply().unwrap().status, 405);
    assert!(
        s.backend.requests().is_empty(),
        "nothing reached Exchange: {:?}",
        s.backend.requests()
    );

    // A head past the limit (64 KiB) is refused with its reason, never forwarded.
    let mut big = s.https("sf");
    let padding = "a".repeat(70 * 1024);
    big.send(format!("GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: mail.example.org\r\n{auth}X-Pad: {padding}\r\n\r\n").as_bytes())
        .unwrap();
    let reply = big.read_reply().unwrap();
    assert_eq!(reply.status, 431, "{}", reply.body);
    assert!(
        wait_audit(&s.audit, |v| v["reason"] == "head_too_large").is_some(),
        "audited"
    );
    assert!(s.backend.requests().is_empty(), "nothing reached Exchange");

    // A body trickling below the minimum rate is cut off after the grace time.
    let mut slow = s.https("sf");
    slow.send(format!("POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: mail.example.org\r\n{auth}Content-Length: 100000\r\n\r\n<soap>").as_bytes()).unwrap();
    let started = Instant::now();
    let reply = slow.read_reply().unwrap();
    assert_eq!(reply.status, 408, "{}", reply.body);
    assert!(started.elapsed() < Duration::from_secs(4));
    // A head that never ends is dropped at the head timeout.
    let mut loris = s.https("sf");
    loris
        .send(b"POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: mail.example.org\r\nX-A: 1\r\n")
        .unwrap();
    let started = Instant::now();
    assert!(loris.closed_within(Duration::from_secs(4)));
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "closed at {:?}",
        started.elapsed()
    );
    assert!(wait_audit(&s.audit, |v| v["reason"] == "head_timeout").is_some());

    // 50 MB streams through without being held: the proxy's peak memory barely moves.
    let hwm = |pid: u32| -> u64 {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .unwrap()
            .to_string();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let pid = s.daemon.proxy_pid().expect("the proxy runs");
    let before = hwm(pid);
    let size = 50 << 20;
    let (head, tail) = requests::create_attachment_head(TOKEN_ITEM);
    let total = head.len() + size + tail.len();
    let mut big = s.https("sf");
    big.send(
        format!(
            "POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: mail.example.org\r\n{auth}Content-Length: {total}\r\n\r\n{head}"
        )
        .as_bytes(),
    )
    .unwrap();
    let chunk = vec![b'Q'; 64 * 1024];
    for _ in 0..size / chunk.len() {
        big.send(&chunk).unwrap();
    }
    big.send(tail.as_bytes()).unwrap();
    let reply = big.read_reply().unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        s.backend.requests().last().unwrap().body_bytes,
        total as u64
    );
    let line = wait_audit(&s.audit, |v| v["bytes_in"] == total as u64)
        .expect("audit line with the body's size");
    assert_eq!(line["upstream_status"], 200);
    assert!(line["bytes_out"].as_u64().unwrap() > 0);
    let grew_kib = hwm(pid).saturating_sub(before);
    println!("50 MB upload: proxy peak RSS grew {grew_kib} KiB");
    assert!(
        grew_kib < 16 * 1024,
        "peak RSS grew {grew_kib} KiB for a 50 MB body"
    );
    // Other paths keep the 1 MiB default cap.
    let mut c = s.https("sf");
    c.send(
        format!(
            "POST /owa/ HTTP/1.1\r\nHost: mail.example.org\r\nContent-Length: {}\r\n\r\n",
            2 << 20
        )
        .as_bytes(),
    )
    .unwrap();
    let r = c.read_reply().unwrap();
    assert_eq!(r.status, 413, "{}", r.body);

    // At most 16 connections per source: the 17th is closed before its handshake ends.
    let held: Vec<Https> = (0..16).map(|_| s.https("office")).collect();
    assert!(
        Https::connect(s.lab.client("office"), gate4(), &s.pki, None)
            .and_then(|mut c| c.ews(&[], b"x"))
            .is_err()
    );
    drop(held);
    assert!(wait_audit(&s.audit, |v| v["reason"] == "too_many_connections").is_some());

    // The connection left idle at the start is closed at idle_timeout_ms (5 s), not before.
    let left = Duration::from_secs(7).saturating_sub(idle_since.elapsed());
    assert!(
        idle.closed_within(left),
        "idle connection still open after {:?}",
        idle_since.elapsed()
    );
    assert!(
        idle_since.elapsed() >= Duration::from_millis(4900),
        "closed early at {:?}",
        idle_since.elapsed()
    );
}

#[test]
fn a_source_that_keeps_failing_is_dropped_by_xdp() {
    let s = setup(5);
    let bad = s.pki.token(|c| testkit::with(c, "aud", json!("wrong")));
    let mut decided = Instant::now();
    for _ in 0..5 {
        // The clock starts as the deciding (fifth) request is sent.
        let mut c = s.https("office");
        decided = Instant::now();
        let reply = c
            .ews(
                &[("Authorization", &format!("Bearer {bad}"))],
                soap().as_bytes(),
            )
            .unwrap();
        assert_eq!(reply.status, 401);
    }
    let replied = decided.elapsed();
    // The first SYN that goes unanswered marks the block in force.
    let office = s.lab.client("office");
    let to = gate4();
    let mut first_drop = None;
    for _ in 0..200 {
        let at = Instant::now();
        let r = office.run(move || TcpStream::connect_timeout(&to, Duration::from_millis(20)));
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                first_drop = Some(at.duration_since(decided));
                break;
            }
            Ok(mut t) => {
                let _ = t.write_all(b"");
            }
            Err(_) => {}
        }
    }
    let took = first_drop.expect("the office host was never dropped");
    println!(
        "feedback: deciding reply after {:.1} ms, first dropped SYN sent {:.1} ms after the deciding request",
        replied.as_secs_f64() * 1000.0,
        took.as_secs_f64() * 1000.0
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let list = s.daemon.cli(&["block", "list"]).unwrap();
    assert!(
        list.contains("198.51.100.10") && list.contains("feedback"),
        "{list}"
    );
    assert!(s.daemon.counter("drop_blocked").unwrap() > 0);
    // Salesforce is untouched.
    let ok = s.bearer("sf", &s.pki.token(|c| c));
    assert_eq!(ok.status, 200);
    assert!(audit_lines(&s.audit)
        .iter()
        .any(|v| v["source"] == "198.51.100.10" && v["reason"] == "token_audience"));
}
