//! Live range feeds end to end: a real daemon in the namespace lab follows a feed an HTTPS
//! server in the gate namespace publishes (certificate minted by the test), and real TCP
//! connects show what XDP lets through after each version: growth, a shrink past the guard,
//! garbage, an empty feed, a stalled server, a 304, a redirect, and a restart with no
//! network that starts from the last good copy on disk.

use std::{fs, net::SocketAddr, path::Path, thread, time::Duration};

use tests::{
    ews::Pki,
    feedserver::{FeedServer, Serve},
    lab::{reach, tag, BpfFs, Daemon, Lab, GATE_V4, GATE_V6, INTERNET, OFFICE, SALESFORCE},
};

const FEED: &str = "127.0.0.1:8443";
const WAIT: Duration = Duration::from_millis(700);

/// Salesforce's shape: arrays and strings, regions, providers and directions.
fn doc(outbound_v4: &[&str], outbound_v6: &[&str]) -> String {
    let list = |l: &[&str]| {
        l.iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        r#"{{"syncToken":"1","createDate":"2026-12-01-10-00-00","prefixes":[
  {{"region":"us-east-1","provider":"aws","service":"Hyperforce","direction":"outbound","ip_prefix":[{}]}},
  {{"region":"us-east-1","provider":"aws","direction":"inbound","ip_prefix":"192.0.2.128/25"}}],
 "ipv6_prefixes":[{{"region":"us-east-1","provider":"aws","direction":"outbound","ipv6_prefix":[{}]}}]}}"#,
        list(outbound_v4),
        list(outbound_v6)
    )
}

fn config(dir: &Path, pins: &Path, socket: &Path, refresh: u64) -> String {
    format!(
        r#"{xdp}
[feeds]
state_dir = "{state}"
refresh_secs = {refresh}
timeout_ms = 1500
max_shrink = 0.2

[sources.offices]
cidrs = ["198.51.100.0/25", "2001:db8:100::/64"]

[sources.salesforce]
feed_url = "https://{FEED}/ip-ranges.json"
feed_ca = "ca.pem"
feed_directions = ["outbound"]
"#,
        xdp = tests::lab_xdp_config(pins, socket, "native"),
        state = dir.join("state").display(),
    )
}

fn feed_status(d: &Daemon) -> serde_json::Value {
    let json: serde_json::Value =
        serde_json::from_str(&d.cli(&["status", "--json"]).expect("status")).expect("json");
    json["feeds"][0].clone()
}

fn generation(d: &Daemon) -> u64 {
    let json: serde_json::Value =
        serde_json::from_str(&d.cli(&["status", "--json"]).expect("status")).expect("json");
    json["generation"].as_u64().expect("generation")
}

fn refresh(d: &Daemon) -> Result<String, String> {
    d.cli(&["feed", "refresh", "salesforce"])
        .map_err(|e| e.to_string())
}

/// (internet over IPv4, internet over IPv6, Salesforce over IPv4) reach the gate's tcp/443.
fn verdicts(lab: &Lab) -> (bool, bool, bool) {
    (
        reach(lab.client("inet"), GATE_V4, 443, WAIT),
        reach(lab.client("inet"), GATE_V6, 443, WAIT),
        reach(lab.client("sf"), GATE_V4, 443, WAIT),
    )
}

#[test]
fn a_live_feed_grows_and_refuses_what_it_should() {
    let fs_ = BpfFs::new().expect("bpffs");
    let mut lab = Lab::new(&[OFFICE, SALESFORCE, INTERNET]).expect("lab");
    lab.serve(443).expect("echo");
    let dir = std::env::temp_dir().join(format!("ewsgate-feeds-{}", tag()));
    let pki = Pki::new(&dir).expect("pki");
    pki.server_cert_for("feed", &["127.0.0.1"])
        .expect("feed cert");
    let addr: SocketAddr = FEED.parse().unwrap();
    let server = FeedServer::start(&lab.gate, addr, &dir, "feed").expect("feed server");
    let v1 = doc(&["198.51.100.128/25"], &["2001:db8:200::/64"]);
    server.set(Serve::Doc {
        body: v1,
        etag: "\"v1\"".into(),
    });
    let pins = fs_.dir.join("ewsgate");
    let socket = dir.join("ctl.sock");
    let path = dir.join("ewsgate.toml");
    fs::write(&path, config(&dir, &pins, &socket, 3600)).unwrap();
    let daemon = Daemon::start(&lab.gate, &path, &socket).expect("daemon");

    // Fetched at start: Salesforce passes, the inbound-only entry and the internet do not.
    let mut st = feed_status(&daemon);
    for _ in 0..50 {
        if st["state"] == "ok" {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        st = feed_status(&daemon);
    }
    assert_eq!(st["state"], "ok", "{st}");
    assert_eq!(st["prefixes"], 2, "{st}");
    assert_eq!(verdicts(&lab), (false, false, true));
    assert!(reach(lab.client("office"), GATE_V4, 443, WAIT));

    // Growth: the internet's ranges join the feed and pass XDP over both families.
    let v2 = doc(
        &["198.51.100.128/25", "203.0.113.0/24"],
        &["2001:db8:200::/64", "2001:db8:300::/64"],
    );
    server.set(Serve::Doc {
        body: v2.clone(),
        etag: "\"v2\"".into(),
    });
    let line = refresh(&daemon).expect("growth accepted");
    assert!(line.contains("changed: +2 -0 (4 prefixes)"), "{line}");
    assert_eq!(verdicts(&lab), (true, true, true));
    let log = daemon.log();
    assert!(
        log.contains("feed: prefixes changed")
            && log.contains(r#""added":["203.0.113.0/24","2001:db8:300::/64"]"#),
        "the change is audited: {log}"
    );
    let copy = dir.join("state/salesforce.json");
    let saved = fs::read_to_string(&copy).expect("last good copy");
    assert!(saved.contains("\"etag\":\"\\\"v2\\\"\""), "{saved}");
    let generation_v2 = generation(&daemon);

    // Each refused version leaves the last good copy in force: XDP, disk and generation.
    let refused = [
        (
            Serve::Doc {
                body: doc(&[], &["2001:db8:300::/64"]),
                etag: "\"v3\"".into(),
            },
            "refused: shrinks from 4 to 1 prefixes",
        ),
        (
            Serve::Doc {
                body: "<html>maintenance</html>".into(),
                etag: "\"v4\"".into(),
            },
            "refused: https://127.0.0.1:8443/ip-ranges.json:1:1: not a Salesforce ip-ranges feed",
        ),
        (
            Serve::Doc {
                body: r#"{"syncToken":"5","prefixes":[],"ipv6_prefixes":[]}"#.into(),
                etag: "\"v5\"".into(),
            },
            "refused: the feed holds no prefixes",
        ),
        (
            Serve::Stall,
            "stale: https://127.0.0.1:8443/ip-ranges.json: no answer within 1.5s",
        ),
        (
            Serve::Status(503),
            "stale: https://127.0.0.1:8443/ip-ranges.json: answered 503",
        ),
        (
            Serve::Redirect(format!("https://{FEED}/elsewhere.json")),
            "(redirects are not followed)",
        ),
    ];
    for (serve, want) in refused {
        server.set(serve);
        let started = std::time::Instant::now();
        let e = refresh(&daemon).expect_err("refused");
        assert!(e.contains(want), "want {want:?}: {e}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the deadline holds"
        );
        assert_eq!(verdicts(&lab), (true, true, true), "after {want}");
        assert_eq!(
            fs::read_to_string(&copy).unwrap(),
            saved,
            "the copy on disk stays"
        );
        assert_eq!(generation(&daemon), generation_v2, "no reload after {want}");
        let st = feed_status(&daemon);
        assert_eq!(st["prefixes"], 4);
        assert!(st["why"].as_str().unwrap_or("").len() > 10, "{st}");
    }
    assert!(
        !server
            .requests()
            .iter()
            .any(|r| r.path.contains("elsewhere")),
        "the redirect was not followed"
    );
    let st = feed_status(&daemon);
    assert_eq!(st["state"], "stale", "{st}");
    assert!(st["since"].as_u64().is_some(), "{st}");
    assert_eq!(st["counters"]["refused"], 3, "{st}");
    assert_eq!(st["counters"]["errors"], 3, "{st}");

    // The source comes back with the same version: a 304, nothing parsed or reloaded.
    server.set(Serve::Doc {
        body: v2,
        etag: "\"v2\"".into(),
    });
    let line = refresh(&daemon).expect("304");
    assert!(
        line.contains("not modified (4 prefixes in force)"),
        "{line}"
    );
    let last = server.requests().pop().expect("a request");
    assert_eq!(
        (last.if_none_match.as_deref(), last.answered),
        (Some("\"v2\""), 304)
    );
    assert_eq!(generation(&daemon), generation_v2);
    let st = feed_status(&daemon);
    assert_eq!(st["state"], "ok", "{st}");
    assert_eq!(st["counters"]["not_modified"], 1, "{st}");
    assert_eq!(st["counters"]["changes"], 2, "{st}");
    let text = daemon.cli(&["status"]).expect("status");
    assert!(
        text.contains("salesforce") && text.contains("4 prefixes, copy fetched"),
        "{text}"
    );

    // Restart with no network: the last good copy on disk is what XDP enforces, from
    // fresh maps. The feed then comes back and is picked up by the periodic refresh.
    daemon.cli(&["detach"]).expect("detach");
    drop(daemon);
    drop(server);
    fs::write(&path, config(&dir, &pins, &socket, 1)).unwrap();
    let daemon = Daemon::start(&lab.gate, &path, &socket).expect("daemon without its feed");
    assert_eq!(
        verdicts(&lab),
        (true, true, true),
        "the copy on disk is in force"
    );
    thread::sleep(Duration::from_millis(1500));
    let st = feed_status(&daemon);
    assert_eq!(st["state"], "stale", "{st}");
    assert_eq!(st["prefixes"], 4, "{st}");
    let server = FeedServer::start(&lab.gate, addr, &dir, "feed").expect("feed server again");
    server.set(Serve::Doc {
        body: doc(
            &["198.51.100.128/25", "203.0.113.0/24", "192.0.2.0/28"],
            &["2001:db8:200::/64", "2001:db8:300::/64"],
        ),
        etag: "\"v6\"".into(),
    });
    let mut st = feed_status(&daemon);
    for _ in 0..60 {
        if st["prefixes"] == 5 {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        st = feed_status(&daemon);
    }
    assert_eq!(
        (st["state"].as_str(), st["prefixes"].as_u64()),
        (Some("ok"), Some(5)),
        "{st}"
    );
    assert_eq!(verdicts(&lab), (true, true, true));
    daemon.cli(&["detach"]).expect("detach");
    drop(daemon);
    drop(server);
    let _ = fs::remove_dir_all(&dir);
}
