use std::{
    io::Read,
    net::TcpListener,
    os::unix::net::UnixDatagram,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::json;

use super::*;
use crate::model::ops::{AuditSettings, SinkSpec};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ewsgate-sinks-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn settings(sinks: Vec<SinkSpec>, buffer_bytes: usize) -> AuditSettings {
    AuditSettings {
        sinks,
        buffer_bytes,
    }
}

#[test]
fn file_sink_reopens_after_a_rename_and_loses_nothing() {
    let dir = temp_dir("rename");
    let path = dir.join("audit.jsonl");
    let sinks = Sinks::open(&settings(
        vec![SinkSpec::File { path: path.clone() }],
        1 << 20,
    ))
    .unwrap();
    for i in 0..100 {
        sinks.write(&json!({ "n": i })).unwrap();
    }
    assert!(sinks.flush(Duration::from_secs(5)));
    std::fs::rename(&path, dir.join("audit.jsonl.1")).unwrap();
    // Until the check (at most a second later) lines still go to the renamed file.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut i = 100;
    while !path.exists() && Instant::now() < deadline {
        sinks.write(&json!({ "n": i })).unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..50 {
        sinks.write(&json!({ "n": i })).unwrap();
        i += 1;
    }
    assert!(sinks.flush(Duration::from_secs(5)));
    let mut seen = Vec::new();
    for f in ["audit.jsonl.1", "audit.jsonl"] {
        for line in std::fs::read_to_string(dir.join(f)).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            seen.push(v["n"].as_u64().unwrap());
        }
    }
    assert_eq!(seen, (0..i).collect::<Vec<_>>());
    // SIGHUP's reopen: the next line goes to a file created at the path.
    std::fs::rename(&path, dir.join("audit.jsonl.2")).unwrap();
    sinks.reopen();
    std::thread::sleep(Duration::from_millis(100));
    sinks.write(&json!({ "n": i })).unwrap();
    assert!(sinks.flush(Duration::from_secs(5)));
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("{{\"n\":{i}}}\n")
    );
    let mode = std::fs::metadata(&path).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o640
    );
    drop(sinks);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stalled_sink_reports_lag_and_refuses_without_holding_up_the_others() {
    let dir = temp_dir("stall");
    let path = dir.join("audit.jsonl");
    // A syslog TCP peer that accepts and never reads: the sink fills its queue.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let capacity = 64 << 10;
    let sinks = Sinks::open(&settings(
        vec![
            SinkSpec::File { path: path.clone() },
            SinkSpec::Syslog {
                transport: Transport::Tcp,
                address: addr.to_string(),
                facility: 16,
                hostname: None,
            },
        ],
        capacity,
    ))
    .unwrap();
    // The sink connects when it has a line to send.
    sinks.write(&json!({ "n": 0 })).unwrap();
    let (_held, _) = listener.accept().unwrap();
    let pad = "x".repeat(1000);
    let mut refused = 0u64;
    // The fullest the stalled sink's queue was seen just after a refusal. Its worker may
    // still move a line into the kernel between a refusal and the look (a socket's send
    // buffer grows as it fills), so the first look alone can fall just short of full.
    let mut refusal_fill: f64 = 0.0;
    let mut total = 1u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Write until the stalled sink has refused 100 lines (its queue and the kernel's buffers
    // full), pacing on the file sink only, which must keep up.
    while refused < 100 {
        assert!(
            total < 200_000 && Instant::now() < deadline,
            "never refused"
        );
        while sinks.status()[0].queued_bytes > capacity / 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Err(r) = sinks.write(&json!({ "n": total, "pad": pad })) {
            assert_eq!(r.sinks, vec![format!("syslog-tcp:{addr}")]);
            refused += 1;
            refusal_fill = refusal_fill.max(sinks.lag().fill);
        }
        total += 1;
    }
    assert!(refusal_fill > 0.98, "{refusal_fill}");
    let status = sinks.status();
    assert_eq!(status[1].refused, refused);
    assert_eq!(status[0].refused, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sinks.status()[0].written < total && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The file got every line.
    assert_eq!(sinks.status()[0].written, total);
    let lines = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
    assert_eq!(lines, total);
    drop(sinks);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn journald_datagrams_reach_a_bound_socket() {
    let dir = temp_dir("journal");
    let socket = dir.join("socket");
    let rx = UnixDatagram::bind(&socket).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let sinks = Sinks::open(&settings(
        vec![SinkSpec::Journald {
            socket: socket.clone(),
        }],
        1 << 20,
    ))
    .unwrap();
    sinks
        .write(&json!({ "kind": "detection", "detection": "password-spray", "severity": "high", "subject": "source 203.0.113.9", "action": "alert", "evidence": { "users": 10 } }))
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let n = rx.recv(&mut buf).unwrap();
    let fields = journald::tests::decode(&buf[..n]);
    let get = |k: &str| {
        fields
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
    };
    assert_eq!(get("PRIORITY").as_deref(), Some("3"));
    assert_eq!(get("EWSGATE_DETECTION").as_deref(), Some("password-spray"));
    assert_eq!(get("EWSGATE_EVIDENCE").as_deref(), Some(r#"{"users":10}"#));
    assert_eq!(
        get("MESSAGE").as_deref(),
        Some("detection password-spray (high): source 203.0.113.9, action alert")
    );
    drop(sinks);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_journal_keeps_lines_until_it_appears() {
    let dir = temp_dir("late");
    let socket = dir.join("socket");
    let sinks = Sinks::open(&settings(
        vec![SinkSpec::Journald {
            socket: socket.clone(),
        }],
        1 << 20,
    ))
    .unwrap();
    for i in 0..5 {
        sinks.write(&json!({ "n": i })).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let s = &sinks.status()[0];
    assert_eq!((s.written, s.queued_lines), (0, 5));
    assert!(s.errors > 0 && s.last_error.is_some());
    assert!(sinks.lag().oldest >= Duration::from_millis(250));
    let rx = UnixDatagram::bind(&socket).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    for _ in 0..5 {
        let n = rx.recv(&mut buf).unwrap();
        let f = journald::tests::decode(&buf[..n]);
        got.push(f.iter().find(|(k, _)| k == "EWSGATE_N").unwrap().1.clone());
    }
    assert_eq!(got, [b"0", b"1", b"2", b"3", b"4"]);
    drop(sinks);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tcp_sink_reconnects_and_resends_what_was_not_sent() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sinks = Sinks::open(&settings(
        vec![SinkSpec::Syslog {
            transport: Transport::Tcp,
            address: addr.to_string(),
            facility: 16,
            hostname: Some("gate".into()),
        }],
        1 << 20,
    ))
    .unwrap();
    sinks.write(&json!({ "n": 0 })).unwrap();
    let (mut c, _) = listener.accept().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = c.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let (len, msg) = text.split_once(' ').unwrap();
    assert_eq!(len.parse::<usize>().unwrap(), msg.len());
    assert!(msg.ends_with(r#"{"n":0}"#), "{msg}");
    drop(c);
    // The peer is gone: the next writes fail, the sink reconnects and sends them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 1;
    listener.set_nonblocking(true).unwrap();
    let mut c = loop {
        sinks.write(&json!({ "n": i })).unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(50));
        if let Ok((c, _)) = listener.accept() {
            break c;
        }
        assert!(Instant::now() < deadline, "no reconnect");
    };
    assert!(sinks.flush(Duration::from_secs(5)));
    drop(sinks);
    c.set_nonblocking(false).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    // The lines after the break arrive on the new connection, in order, each once: some
    // may have been lost in the first connection's buffers, none is duplicated here.
    let mut ns = Vec::new();
    let mut d = &rest[..];
    while !d.is_empty() {
        let sp = d.iter().position(|&b| b == b' ').unwrap();
        let len: usize = std::str::from_utf8(&d[..sp]).unwrap().parse().unwrap();
        let msg = &d[sp + 1..sp + 1 + len];
        let json_start = msg.iter().position(|&b| b == b'{').unwrap();
        let v: serde_json::Value = serde_json::from_slice(&msg[json_start..]).unwrap();
        ns.push(v["n"].as_u64().unwrap());
        d = &d[sp + 1 + len..];
    }
    assert!(!ns.is_empty());
    assert!(ns.windows(2).all(|w| w[1] == w[0] + 1), "{ns:?}");
    assert_eq!(*ns.last().unwrap(), i - 1);
}
