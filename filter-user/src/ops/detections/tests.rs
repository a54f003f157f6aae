//! Each detection with synthetic observations: it fires exactly at its threshold and not
//! below, says why in its evidence, and asks for the configured action.

use std::net::IpAddr;

use super::*;
use crate::model::ops::DetectionSettings;

/// Monday 2026-11-23 12:00:00 UTC, in milliseconds.
const NOON: u64 = 1_795_435_200_000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Settings with every detection on at its defaults, no quiet time, and `edit` applied.
fn engine(edit: impl FnOnce(&mut DetectionSettings)) -> Engine {
    let mut s = DetectionSettings {
        quiet_secs: 0,
        ..Default::default()
    };
    edit(&mut s);
    Engine::new(s)
}

fn only(s: &mut DetectionSettings, kind: DetectionKind) -> &mut DetectionRule {
    for r in &mut s.rules {
        r.enabled = r.kind == kind;
    }
    &mut s.rules[kind as usize]
}

fn obs<'a>(t_ms: u64, source: &str, user: &'a str) -> Observation<'a> {
    Observation {
        user: Some(user),
        auth: "basic",
        group: Some("offices"),
        ..Observation::new(t_ms, ip(source), Decision::Allow)
    }
}

fn failed<'a>(t_ms: u64, source: &str, user: &'a str, failure: Failure) -> Observation<'a> {
    Observation {
        decision: Decision::Deny,
        failure: Some(failure),
        reason: "refused",
        ..obs(t_ms, source, user)
    }
}

fn names(d: &[Detection]) -> Vec<&'static str> {
    d.iter().map(Detection::name).collect()
}

#[test]
fn two_places_by_group_address_and_site() {
    let mut e = engine(|s| {
        only(s, DetectionKind::TwoPlaces).window_secs = 600;
    });
    // Same group, same /16: one place.
    assert!(e
        .observe(&obs(NOON, "198.51.100.10", "alice@example.org"))
        .is_empty());
    assert!(e
        .observe(&obs(NOON + 1000, "198.51.7.7", "alice@example.org"))
        .is_empty());
    // Another group within the window: fires.
    let d = e.observe(&Observation {
        group: Some("vpn"),
        ..obs(NOON + 60_000, "198.51.100.200", "ALICE@example.org")
    });
    assert_eq!(names(&d), ["two-places"]);
    assert_eq!(d[0].evidence["why"], "different source groups");
    assert_eq!(d[0].evidence["other"]["group"], "offices");
    assert_eq!(d[0].subject, "user ALICE@example.org");
    assert_eq!(d[0].severity, Severity::Medium);
    // Far-apart addresses in one group: fires; the same group 601 s after the last sighting
    // in another /16 does not.
    let mut e = engine(|s| {
        only(s, DetectionKind::TwoPlaces).window_secs = 600;
    });
    e.observe(&obs(NOON, "198.51.100.10", "bob"));
    let d = e.observe(&obs(NOON + 600_000, "203.0.113.9", "bob"));
    assert_eq!(d[0].evidence["why"], "addresses in different /16s");
    let mut e = engine(|s| {
        only(s, DetectionKind::TwoPlaces).window_secs = 600;
    });
    e.observe(&obs(NOON, "198.51.100.10", "bob"));
    assert!(e
        .observe(&obs(NOON + 601_000, "203.0.113.9", "bob"))
        .is_empty());
    // IPv6 /48s.
    let mut e = engine(|s| {
        only(s, DetectionKind::TwoPlaces);
    });
    e.observe(&obs(NOON, "2001:db8:100::1", "carol"));
    assert!(e
        .observe(&obs(NOON, "2001:db8:100:ffff::1", "carol"))
        .is_empty());
    let d = e.observe(&obs(NOON, "2001:db8:300::1", "carol"));
    assert_eq!(d[0].evidence["why"], "addresses in different /48s");
    // A refused credential is no sighting: an attacker typing alice's name proves nothing.
    let mut e = engine(|s| {
        only(s, DetectionKind::TwoPlaces);
    });
    e.observe(&obs(NOON, "198.51.100.10", "dave"));
    assert!(e
        .observe(&failed(NOON, "203.0.113.9", "dave", Failure::Credential))
        .is_empty());
    // Ignored groups are not looked at.
    let mut e = engine(|s| {
        only(s, DetectionKind::TwoPlaces).ignore_groups = vec!["salesforce".into()];
    });
    e.observe(&obs(NOON, "198.51.100.10", "erin"));
    assert!(e
        .observe(&Observation {
            group: Some("salesforce"),
            ..obs(NOON, "198.51.100.130", "erin")
        })
        .is_empty());
}

#[test]
fn two_places_from_a_remote_sighting() {
    let mut e = engine(|s| {
        only(s, DetectionKind::TwoPlaces);
        s.site = "london".into();
    });
    let local = obs(NOON, "198.51.100.10", "alice@example.org");
    assert!(e.observe(&local).is_empty());
    let published = e.sighting(&local).unwrap();
    assert_eq!(published.site, "london");
    // The same site and group seen by a twin gate: nothing.
    assert!(e.observe_remote(&published).is_empty());
    let d = e.observe_remote(&Sighting {
        site: "sydney".into(),
        user: "alice@example.org".into(),
        group: Some("offices".into()),
        source: Some(ip("198.51.100.10")),
        time_ms: NOON + 120_000,
    });
    assert_eq!(names(&d), ["two-places"]);
    assert_eq!(d[0].evidence["why"], "different sites");
    assert_eq!(d[0].evidence["remote"], true);
    assert_eq!(d[0].evidence["other"]["site"], "london");
    // A sighting of a credential failure is never published.
    assert!(e
        .sighting(&failed(NOON, "203.0.113.9", "x", Failure::Credential))
        .is_none());
}

#[test]
fn off_hours_outside_hours_and_days() {
    let mut e = engine(|s| {
        only(s, DetectionKind::OffHours);
        s.hours = (7 * 60, 20 * 60);
        s.days = 0b1_1111;
        s.utc_offset_minutes = 60;
    });
    let minute = 60_000;
    // 18:59 UTC is 19:59 local on Monday: inside. 19:00 UTC is 20:00 local: outside.
    assert!(e
        .observe(&obs(NOON + 419 * minute, "198.51.100.10", "a"))
        .is_empty());
    let d = e.observe(&obs(NOON + 420 * minute, "198.51.100.10", "a"));
    assert_eq!(names(&d), ["off-hours"]);
    assert_eq!(d[0].evidence["local_time"], "20:00");
    assert_eq!(d[0].evidence["weekday"], "mon");
    // 06:00 UTC is 07:00 local: inside; 05:59 UTC outside.
    assert!(e
        .observe(&obs(NOON - 360 * minute, "198.51.100.10", "b"))
        .is_empty());
    assert_eq!(
        e.observe(&obs(NOON - 361 * minute, "198.51.100.10", "b"))
            .len(),
        1
    );
    // Saturday noon: outside the days.
    let saturday = NOON + 5 * 86_400_000;
    assert_eq!(e.observe(&obs(saturday, "198.51.100.10", "c")).len(), 1);
    // A denied request is no access.
    assert!(e
        .observe(&failed(saturday, "198.51.100.10", "d", Failure::Policy))
        .is_empty());
}

#[test]
fn failure_burst_per_user_and_per_source() {
    let mut e = engine(|s| {
        let r = only(s, DetectionKind::FailureBurstUser);
        r.threshold = 5;
        r.window_secs = 300;
    });
    for i in 0..4 {
        // Different sources: only the user's count can reach the threshold.
        let src = format!("203.0.113.{}", i + 1);
        assert!(e
            .observe(&failed(NOON + i * 1000, &src, "alice", Failure::Credential))
            .is_empty());
    }
    let d = e.observe(&failed(
        NOON + 5000,
        "203.0.113.9",
        "alice",
        Failure::Policy,
    ));
    assert_eq!(names(&d), ["failure-burst-user"]);
    assert_eq!(d[0].evidence["failures"], 5);
    assert_eq!(d[0].evidence["last_failure"], "policy");
    // A would-deny is forwarded: not a failure.
    let mut e = engine(|s| {
        only(s, DetectionKind::FailureBurstUser).threshold = 1;
    });
    assert!(e
        .observe(&Observation {
            decision: Decision::WouldDeny,
            ..failed(NOON, "198.51.100.1", "bob", Failure::Policy)
        })
        .is_empty());

    let mut e = engine(|s| {
        let r = only(s, DetectionKind::FailureBurstSource);
        r.threshold = 20;
        r.window_secs = 60;
    });
    for i in 0..19 {
        let user = format!("u{i}");
        assert!(e
            .observe(&failed(
                NOON + i * 100,
                "203.0.113.7",
                &user,
                Failure::Protocol
            ))
            .is_empty());
    }
    // The 20th, with no user at all (a failed TLS handshake), makes it fire.
    let d = e.observe(&Observation {
        decision: Decision::Deny,
        failure: Some(Failure::Protocol),
        reason: "tls handshake failed",
        ..Observation::new(NOON + 2000, ip("203.0.113.7"), Decision::Deny)
    });
    assert_eq!(names(&d), ["failure-burst-source"]);
    assert_eq!(d[0].subject, "source 203.0.113.7");
    // Failures spread past the window do not add up.
    let mut e = engine(|s| {
        let r = only(s, DetectionKind::FailureBurstSource);
        r.threshold = 3;
        r.window_secs = 80;
    });
    for i in 0..6 {
        assert!(e
            .observe(&failed(
                NOON + i * 50_000,
                "203.0.113.8",
                "x",
                Failure::Protocol
            ))
            .is_empty());
    }
}

#[test]
fn first_seen_source_by_group_and_prefix() {
    let mut e = engine(|s| {
        only(s, DetectionKind::FirstSeenSource);
    });
    // The very first place is not news; another host in the same /24 is the same place.
    assert!(e.observe(&obs(NOON, "198.51.100.10", "alice")).is_empty());
    assert!(e
        .observe(&obs(NOON + 1, "198.51.100.99", "alice"))
        .is_empty());
    let d = e.observe(&obs(NOON + 2, "198.51.101.10", "alice"));
    assert_eq!(names(&d), ["first-seen-source"]);
    assert_eq!(d[0].evidence["prefix"], "198.51.101.0/24");
    assert_eq!(d[0].evidence["known_sources"], 1);
    assert_eq!(d[0].severity, Severity::Low);
    // Once seen, known.
    assert!(e
        .observe(&obs(NOON + 3, "198.51.101.11", "alice"))
        .is_empty());
    // The same prefix in another group is another place.
    let d = e.observe(&Observation {
        group: Some("vpn"),
        ..obs(NOON + 4, "198.51.101.11", "alice")
    });
    assert_eq!(d.len(), 1);
    // learn() warms the state and fires nothing.
    let mut e = engine(|s| {
        only(s, DetectionKind::FirstSeenSource);
    });
    e.learn(&obs(NOON, "198.51.100.10", "bob"));
    e.learn(&obs(NOON, "2001:db8:100::1", "bob"));
    assert!(e.observe(&obs(NOON, "2001:db8:100:1::1", "bob")).is_empty());
    assert_eq!(e.observe(&obs(NOON, "2001:db8:101::1", "bob")).len(), 1);
    assert_eq!(e.fired(DetectionKind::FirstSeenSource), 1);
}

#[test]
fn token_reuse_from_more_than_one_source() {
    let mut e = engine(|s| {
        let r = only(s, DetectionKind::TokenReuse);
        r.threshold = 3;
        r.action = ActionSpec::RefuseIdentity { secs: 300 };
    });
    let item = "AAMkAD-item-1=";
    let call = |t: u64, src: &str| Observation {
        user: Some("alice@example.org"),
        auth: "bearer",
        group: Some("salesforce"),
        token_item: Some(item),
        ..Observation::new(t, ip(src), Decision::Allow)
    };
    assert!(e.observe(&call(NOON, "198.51.100.130")).is_empty());
    assert!(e.observe(&call(NOON + 1, "198.51.100.130")).is_empty());
    assert!(e.observe(&call(NOON + 2, "198.51.100.131")).is_empty());
    let d = e.observe(&call(NOON + 3, "203.0.113.50"));
    assert_eq!(names(&d), ["token-reuse"]);
    assert_eq!(d[0].evidence["sources"], 3);
    assert_eq!(d[0].subject, format!("token {item}"));
    assert_eq!(
        d[0].action,
        Action::RefuseIdentity {
            identity: Identity::TokenItem(item.into()),
            secs: 300
        }
    );
    // A refused token's item is the attacker's word: not counted.
    let mut e = engine(|s| {
        only(s, DetectionKind::TokenReuse).threshold = 2;
    });
    e.observe(&call(NOON, "198.51.100.130"));
    assert!(e
        .observe(&Observation {
            decision: Decision::Deny,
            failure: Some(Failure::Credential),
            ..call(NOON, "203.0.113.50")
        })
        .is_empty());
}

#[test]
fn items_read_per_minute() {
    let mut e = engine(|s| {
        let r = only(s, DetectionKind::ItemsRead);
        r.threshold = 100;
        r.window_secs = 60;
    });
    let read = |t: u64, items: u32| Observation {
        operation: Some("GetItem"),
        op_class: Some(OpClass::Read),
        items,
        mailbox: Some("alice@example.org"),
        ..obs(t, "198.51.100.10", "alice@example.org")
    };
    assert!(e.observe(&read(NOON, 60)).is_empty());
    assert!(e.observe(&read(NOON + 10_000, 39)).is_empty());
    // Writes are not reads.
    assert!(e
        .observe(&Observation {
            op_class: Some(OpClass::Write),
            ..read(NOON + 10_000, 50)
        })
        .is_empty());
    let d = e.observe(&read(NOON + 20_000, 1));
    assert_eq!(names(&d), ["items-read"]);
    assert_eq!(d[0].evidence["items"], 100);
    assert_eq!(d[0].evidence["mailbox"], "alice@example.org");
}

#[test]
fn finditem_paging_through_a_folder() {
    let mut e = engine(|s| {
        let r = only(s, DetectionKind::FindItemPaging);
        r.threshold = 10;
        r.window_secs = 300;
    });
    let page = |t: u64, folder: &'static str| Observation {
        operation: Some("FindItem"),
        op_class: Some(OpClass::Read),
        folder: Some(folder),
        ..obs(t, "198.51.100.10", "alice")
    };
    for i in 0..9 {
        assert!(e.observe(&page(NOON + i * 1000, "inbox")).is_empty());
        // Other folders count on their own.
        assert!(e.observe(&page(NOON + i * 1000, "calendar")).is_empty());
    }
    let d = e.observe(&page(NOON + 9000, "inbox"));
    assert_eq!(names(&d), ["finditem-paging"]);
    assert_eq!(d[0].evidence["pages"], 10);
    assert_eq!(d[0].evidence["folder"], "inbox");
}

#[test]
fn export_and_impersonation_fire_on_the_first_attempt() {
    let mut e = engine(|s| {
        only(s, DetectionKind::ExportOrImpersonation);
    });
    assert!(e
        .observe(&Observation {
            operation: Some("GetItem"),
            op_class: Some(OpClass::Read),
            ..obs(NOON, "198.51.100.10", "alice")
        })
        .is_empty());
    let d = e.observe(&Observation {
        operation: Some("ExportItems"),
        op_class: Some(OpClass::Export),
        ..failed(NOON, "198.51.100.10", "alice", Failure::Policy)
    });
    assert_eq!(names(&d), ["export-or-impersonation"]);
    assert_eq!(d[0].evidence["decision"], "deny");
    assert_eq!(d[0].severity, Severity::High);
    let d = e.observe(&Observation {
        operation: Some("FindItem"),
        op_class: Some(OpClass::Read),
        impersonation: true,
        mailbox: Some("ceo@example.org"),
        ..obs(NOON, "198.51.100.10", "bob")
    });
    assert_eq!(d[0].evidence["impersonation"], true);
    assert_eq!(d[0].evidence["mailbox"], "ceo@example.org");
}

#[test]
fn password_spray_counts_distinct_users_from_one_source() {
    let mut e = engine(|s| {
        let r = only(s, DetectionKind::PasswordSpray);
        r.threshold = 10;
        r.window_secs = 600;
        r.action = ActionSpec::BlockSource { secs: 3600 };
    });
    let users: Vec<String> = (0..10).map(|i| format!("user{i}@example.org")).collect();
    for u in &users[..9] {
        let o = Observation {
            group: None,
            ..failed(NOON, "203.0.113.66", u, Failure::Credential)
        };
        assert!(e.observe(&o).is_empty());
        // The same user again is not another user.
        assert!(e.observe(&o).is_empty());
    }
    // Policy refusals of other users are no spray.
    assert!(e
        .observe(&Observation {
            group: None,
            ..failed(NOON, "203.0.113.66", "x@example.org", Failure::Policy)
        })
        .is_empty());
    let d = e.observe(&Observation {
        group: None,
        ..failed(NOON + 1000, "203.0.113.66", &users[9], Failure::Credential)
    });
    assert_eq!(names(&d), ["password-spray"]);
    assert_eq!(d[0].evidence["users"], 10);
    assert_eq!(
        d[0].action,
        Action::BlockSource {
            source: ip("203.0.113.66"),
            secs: 3600
        }
    );
    // From a group that does not allow blocks, the block becomes an alert, and says why.
    let mut e = engine(|s| {
        let r = only(s, DetectionKind::PasswordSpray);
        r.threshold = 2;
        r.action = ActionSpec::BlockSource { secs: 3600 };
    });
    e.observe(&failed(NOON, "198.51.100.10", "a", Failure::Credential));
    let d = e.observe(&failed(NOON, "198.51.100.10", "b", Failure::Credential));
    assert_eq!(d[0].action, Action::Alert);
    assert_eq!(
        d[0].evidence["block_refused"],
        "source group offices does not allow blocks"
    );
    e.set_block_policy(|g| g == Some("offices"));
    let d = e.observe(&failed(NOON, "198.51.100.10", "c", Failure::Credential));
    assert_eq!(d[0].action.name(), "block-source");
}

#[test]
fn quiet_time_holds_back_repeats() {
    let mut e = engine(|s| {
        only(s, DetectionKind::FailureBurstSource).threshold = 2;
        s.quiet_secs = 60;
    });
    let f = |t| failed(t, "203.0.113.7", "x", Failure::Protocol);
    assert!(e.observe(&f(NOON)).is_empty());
    assert_eq!(e.observe(&f(NOON + 1000)).len(), 1);
    assert!(e.observe(&f(NOON + 2000)).is_empty());
    assert!(e.observe(&f(NOON + 59_000)).is_empty());
    assert_eq!(e.observe(&f(NOON + 61_000)).len(), 1);
    assert_eq!(e.fired(DetectionKind::FailureBurstSource), 2);
}

#[test]
fn a_detection_is_an_audit_event() {
    let mut e = engine(|s| {
        only(s, DetectionKind::ExportOrImpersonation);
    });
    let d = e.observe(&Observation {
        operation: Some("ExportItems"),
        op_class: Some(OpClass::Export),
        ..failed(NOON + 5, "198.51.100.10", "alice", Failure::Policy)
    });
    let line = serde_json::to_value(d[0].event()).unwrap();
    assert_eq!(line["kind"], "detection");
    assert_eq!(line["time"], "2026-11-23T12:00:00.005Z");
    assert_eq!(line["detection"], "export-or-impersonation");
    assert_eq!(line["severity"], "high");
    assert_eq!(line["source"], "198.51.100.10");
    assert_eq!(line["source_group"], "offices");
    assert_eq!(line["user"], "alice");
    assert_eq!(line["action"], "alert");
    assert_eq!(line["evidence"]["operation"], "ExportItems");
    assert!(line["decision"].is_null());
}

#[test]
fn disabled_engine_and_disabled_detections_fire_nothing() {
    let mut e = engine(|s| s.enabled = false);
    let o = Observation {
        op_class: Some(OpClass::Export),
        ..obs(NOON, "198.51.100.10", "a")
    };
    assert!(e.observe(&o).is_empty());
    let mut e = engine(|s| {
        only(s, DetectionKind::TwoPlaces);
    });
    assert!(e.observe(&o).is_empty());
}

#[test]
fn memory_stays_capped_under_a_flood_of_distinct_subjects() {
    let mut e = engine(|s| {
        s.max_users = 1000;
        s.max_sources = 500;
        s.max_tokens = 200;
    });
    let bound = e.memory_bound();
    for i in 0..50_000u32 {
        let user = format!("user{i}@example.org");
        let item = format!("item-{i}");
        let src = IpAddr::from([203, 0, (i >> 8) as u8, i as u8]);
        let o = Observation {
            token_item: Some(&item),
            operation: Some("FindItem"),
            folder: Some("inbox"),
            op_class: Some(OpClass::Read),
            items: 3,
            ..failed(
                NOON + u64::from(i),
                &src.to_string(),
                &user,
                Failure::Credential,
            )
        };
        e.observe(&o);
        e.observe(&Observation {
            decision: Decision::Allow,
            failure: None,
            ..o
        });
    }
    let t = e.tracked();
    assert_eq!(
        t,
        Tracked {
            users: 1000,
            sources: 500,
            tokens: 200,
            folders: 250
        }
    );
    // The caps' cost does not depend on what came in.
    assert_eq!(e.memory_bound(), bound);
    // The most recent subjects are the ones kept: the last user still has its known place.
    let last = "user49999@example.org";
    assert!(e
        .observe(&obs(NOON + 60_000, "203.0.195.79", last))
        .iter()
        .all(|d| d.kind != DetectionKind::FirstSeenSource));
}

#[test]
fn default_caps_cost_is_stated() {
    let e = Engine::new(DetectionSettings::default());
    let mib = e.memory_bound() as f64 / f64::from(1 << 20);
    // The README states this figure; keep them in step.
    assert!((25.0..35.0).contains(&mib), "{mib:.1} MiB");
}

#[test]
fn off_hours_fires_once_per_quiet_time_with_its_evidence() {
    let mut e = engine(|s| {
        only(s, DetectionKind::OffHours);
        s.hours = (7 * 60, 20 * 60);
        s.utc_offset_minutes = 0;
        s.quiet_secs = 600;
    });
    let minute = 60_000;
    let night = NOON + 10 * 60 * minute;
    let d = e.observe(&obs(night, "198.51.100.10", "a"));
    assert_eq!(names(&d), ["off-hours"]);
    assert_eq!(d[0].evidence["local_time"], "22:00");
    assert_eq!(d[0].evidence["hours"], "07:00-20:00");
    // Every request of the night is off hours; within the quiet time none fires again.
    for m in 1..10 {
        assert!(e
            .observe(&obs(night + m * minute, "198.51.100.10", "a"))
            .is_empty());
    }
    let d = e.observe(&obs(night + 10 * minute, "198.51.100.10", "a"));
    assert_eq!(names(&d), ["off-hours"]);
    assert_eq!(d[0].evidence["local_time"], "22:10");
}
