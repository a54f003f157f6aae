//! The EWS content policy in the lab: real TLS, real SOAP, a stand-in Exchange mailbox
//! that answers like Exchange. Each case asserts what the client received and what
//! reached Exchange.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use ewsgate::identity::{auth::ntlm_messages, tokens::testkit};
use tests::{
    ews::{now, wait_audit, Https, Reply},
    gate::Gate,
    mailbox::{requests, LONG_END, LONG_ITEM, TOKEN_ITEM},
};

/// The audit line of a forwarded request with `op` whose answer lost something, for the
/// reason that `says`.
fn withheld_line(g: &Gate, op: &str, says: &str) -> serde_json::Value {
    wait_audit(&g.audit, |v| {
        v["operation"] == op
            && v["decision"] == "allow"
            && v["withheld"].is_number()
            && v["reason"].as_str().is_some_and(|r| r.contains(says))
    })
    .unwrap_or_else(|| panic!("no audit line for {op} withholding {says:?}"))
}

const RULES: &str = r#"
[[rule]]
name = "salesforce-token-item"
groups = ["salesforce"]
auth = ["bearer"]
token = ["callback"]
operations = ["GetItem", "GetAttachment"]
scope = "token-item"
action = "allow"

[[rule]]
name = "phones-calendar-contacts"
groups = ["offices"]
auth = ["client-cert", "basic"]
operations = ["read", "sync", "write"]
data = ["calendar", "contacts"]
action = "allow"

[[rule]]
name = "assistants"
groups = ["offices"]
auth = ["ntlm"]
users = ["example\\assistant"]
access = ["delegate"]
action = "allow"

[[rule]]
name = "office-windows"
groups = ["offices"]
auth = ["ntlm"]
action = "allow"
"#;

fn post(c: &mut Https, body: &str) -> Reply {
    c.ews(&[], body.as_bytes()).expect("reply")
}

/// A refusal the way an EWS client sees it: a SOAP fault with Exchange's error code.
fn assert_fault(r: &Reply, status: u16, code: &str, says: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert!(r.body.contains("<s:Fault>"), "{}", r.body);
    assert!(r.body.contains(&format!("a:{code}")), "{}", r.body);
    assert!(r.body.contains(says), "expected {says:?} in {}", r.body);
}

/// How many requests with `op` reached the stand-in Exchange.
fn reached(g: &Gate, op: &str) -> usize {
    g.backend
        .requests()
        .iter()
        .filter(|s| s.operation.as_deref() == Some(op))
        .count()
}

fn ntlm_client(g: &Gate, user: &str) -> Https {
    let ntlm = |m: Vec<u8>| format!("NTLM {}", STANDARD.encode(m));
    let mut c = g.https("office");
    let r = c
        .ews(&[("Authorization", &ntlm(ntlm_messages::negotiate()))], b"")
        .expect("type 1");
    assert_eq!(r.status, 401);
    let r = c
        .ews(
            &[(
                "Authorization",
                &ntlm(ntlm_messages::authenticate("EXAMPLE", user)),
            )],
            requests::find_item("calendar", true, None).as_bytes(),
        )
        .expect("type 3");
    assert_eq!(r.status, 200, "{}", r.body);
    c
}

#[test]
fn a_calendar_and_contacts_rule_reads_the_calendar_and_never_sees_mail_or_notes() {
    let g = Gate::start(0, RULES);
    let mut phone = g.https_with_cert("office", "phone-0042");

    let r = post(&mut phone, &requests::find_item("calendar", true, None));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("Dentist") && r.body.contains("Standup"));

    // The inbox and notes: refused before Exchange sees them.
    for folder in ["inbox", "notes", "sentitems"] {
        let r = post(&mut phone, &requests::find_item(folder, false, None));
        assert_fault(&r, 500, "ErrorAccessDenied", "no rule allows FindItem");
    }
    assert_eq!(reached(&g, "FindItem"), 1);
    let line = wait_audit(&g.audit, |v| {
        v["operation"] == "FindItem" && v["data"] == "notes"
    })
    .expect("audit of the notes denial");
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["mailbox"], "phone-0042");

    // The other classes: sync of the calendar and a new calendar item pass; sending mail
    // is refused before Exchange.
    let r = post(&mut phone, &requests::sync_folder_items("calendar"));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(&mut phone, &requests::create_item(false));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(&mut phone, &requests::create_item(true));
    assert_fault(
        &r,
        500,
        "ErrorAccessDenied",
        "no rule allows CreateItem on email",
    );
    assert_eq!(reached(&g, "CreateItem"), 1);

    // One GetItem for a calendar item and an e-mail, both unknown to the gate: Exchange
    // answers both, the client gets the calendar item and an error for the e-mail.
    let r = post(&mut phone, &requests::get_item(&["C-cal-1", "M-mail-2"]));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("Dentist"), "{}", r.body);
    assert!(!r.body.contains("Board minutes"), "{}", r.body);
    assert!(r.body.contains("ErrorAccessDenied"));
    let line = wait_audit(&g.audit, |v| v["withheld"] == 1).expect("withheld audit");
    assert_eq!(line["items"], 2);
    assert_eq!(line["data"], "unresolved");

    // Now the gate knows M-mail-2 is e-mail: refused before Exchange.
    let before = reached(&g, "GetItem");
    let r = post(&mut phone, &requests::get_item(&["M-mail-2"]));
    assert_fault(&r, 500, "ErrorAccessDenied", "on email");
    assert_eq!(reached(&g, "GetItem"), before);

    // A note is a t:Message with IPM.StickyNote; a meeting request lives in the Inbox but
    // is calendar data.
    let r = post(&mut phone, &requests::get_item(&["N-note-1"]));
    assert!(!r.body.contains("Door code"), "{}", r.body);
    assert!(r.body.contains("ErrorAccessDenied"));
    let r = post(&mut phone, &requests::get_item(&["R-meet-1"]));
    assert!(r.body.contains("Planning"), "{}", r.body);
    assert!(!r.body.contains("ErrorAccessDenied"), "{}", r.body);

    // An e-mail's attachment under the calendar-only rule; a calendar item's attachment.
    let r = post(&mut phone, &requests::get_attachment(&["A-mail-2"]));
    assert_fault(&r, 500, "ErrorAccessDenied", "on email");
    let r = post(&mut phone, &requests::get_attachment(&["A-mail-1"]));
    assert!(!r.body.contains("JVBERi0xLjQK"), "{}", r.body);
    assert!(r.body.contains("data type unresolved"), "{}", r.body);
    let r = post(&mut phone, &requests::get_attachment(&["A-cal-1"]));
    assert!(r.body.contains("JVBERi0xLjQK"), "{}", r.body);

    // Moves: a known calendar item may move; its old ID is forgotten, its new one is
    // judged on its class wherever it now lives. Unknown and e-mail items may not move.
    post(&mut phone, &requests::get_item(&["C-cal-2"]));
    let r = post(&mut phone, &requests::move_item("C-cal-2", "contacts"));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(&mut phone, &requests::move_item("M-mail-2", "calendar"));
    assert_fault(&r, 500, "ErrorAccessDenied", "on email");
    let r = post(&mut phone, &requests::move_item("X-unknown", "calendar"));
    assert_fault(&r, 500, "ErrorAccessDenied", "data type unresolved");
    assert_eq!(reached(&g, "MoveItem"), 1);
    let r = post(&mut phone, &requests::get_item(&["C-cal-2-moved"]));
    assert!(r.body.contains("Standup"), "{}", r.body);
    let gone = wait_audit(&g.audit, |v| {
        v["operation"] == "MoveItem" && v["decision"] == "allow"
    });
    assert!(gone.is_some());
}

#[test]
fn a_callback_token_reads_its_own_item_and_nothing_else() {
    let g = Gate::start(0, RULES);
    let token = g.pki.token(|_| testkit::callback_claims_at(now()));
    let auth = format!("Bearer {token}");
    let send = |body: String| {
        g.https("sf")
            .ews(&[("Authorization", &auth)], body.as_bytes())
            .expect("reply")
    };
    let r = send(requests::get_item(&[TOKEN_ITEM]));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("Quote for ACME"));
    // Its attachment, learnt from that answer.
    let r = send(requests::get_attachment(&["A-mail-1"]));
    assert!(r.body.contains("JVBERi0xLjQK"), "{}", r.body);
    let before = (reached(&g, "GetItem"), reached(&g, "GetAttachment"));
    // Another item, alone or with its own; another item's attachment; a folder.
    for body in [
        requests::get_item(&["M-mail-2"]),
        requests::get_item(&[TOKEN_ITEM, "M-mail-2"]),
        requests::get_attachment(&["A-mail-2"]),
        requests::find_item("inbox", false, None),
    ] {
        let r = send(body);
        assert_fault(&r, 500, "ErrorAccessDenied", "request refused");
    }
    assert_eq!(
        (
            reached(&g, "GetItem"),
            reached(&g, "GetAttachment"),
            reached(&g, "FindItem")
        ),
        (before.0, before.1, 0)
    );
    let line =
        wait_audit(&g.audit, |v| v["operation"] == "GetItem" && v["items"] == 2).expect("audit");
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["mailbox"], "alice@example.org");
}

#[test]
fn impersonation_delegates_export_and_non_soap_paths_need_a_rule_that_names_them() {
    let g = Gate::start(0, RULES);
    let cal = requests::find_item("calendar", true, None);
    let cases = [
        (
            requests::impersonating("ceo@example.org", &cal),
            "impersonation is allowed only by a rule",
        ),
        (
            requests::find_item("calendar", true, Some("ceo@example.org")),
            "access to mailbox ceo@example.org",
        ),
        (requests::export_items("C-cal-1"), "ExportItems is allowed only by a rule"),
        (
            requests::envelope("", "<m:GetDelegate IncludePermissions=\"true\"><m:Mailbox><t:EmailAddress>bob@example.org</t:EmailAddress></m:Mailbox></m:GetDelegate>"),
            "GetDelegate is allowed only by a rule",
        ),
        (
            requests::envelope("", "<m:GetSearchableMailboxes/>"),
            "GetSearchableMailboxes is allowed only by a rule",
        ),
        (
            requests::envelope("", "<m:GetInboxRules/>"),
            "GetInboxRules is allowed only by a rule",
        ),
        (
            requests::envelope("", "<m:FrobnicateItem/>"),
            "unknown operation FrobnicateItem",
        ),
    ];
    for (body, says) in &cases {
        // A refusal closes the connection: a fresh NTLM session each time.
        let mut bob = ntlm_client(&g, "bob");
        let before = g.backend.requests().len();
        let r = post(&mut bob, body);
        assert_fault(&r, 500, "ErrorAccessDenied", says);
        assert_eq!(
            g.backend.requests().len(),
            before,
            "reached Exchange: {body}"
        );
    }
    let mut bob = ntlm_client(&g, "bob");
    // Bob's own mailbox named explicitly is not delegate access.
    let r = post(
        &mut bob,
        &requests::find_item("calendar", true, Some("bob@example.org")),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    let mut c = g.https("office");
    for path in [
        "/EWS/Exchange.asmx/s/GetUserPhoto?email=bob@example.org&size=HR48x48",
        "/ews/odata/me/messages",
        "/EWS/mrsproxy.svc",
        "/EWS/Services.wsdl",
    ] {
        let r = c.request("GET", path, &[], b"").expect("reply");
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        c = g.https("office");
    }
}

#[test]
fn hostile_xml_is_refused_before_exchange_sees_it() {
    let g = Gate::start(0, RULES);
    let get = requests::get_item(&["C-cal-1"]);
    let lol = format!(
        "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \"&lol;&lol;&lol;&lol;\">]>{}",
        get.trim_start_matches("<?xml version=\"1.0\" encoding=\"utf-8\"?>")
    );
    let deep = get.replace(
        "<m:ItemIds>",
        &format!("{}<m:ItemIds>", "<t:X>".repeat(200)),
    );
    let op = "<m:GetItem><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape><m:ItemIds><t:ItemId Id=\"C-cal-1\"/></m:ItemIds></m:GetItem>";
    let two = requests::envelope(
        "",
        &format!(
            "{op}<m:ExportItems><m:ItemIds><t:ItemId Id=\"M-mail-2\"/></m:ItemIds></m:ExportItems>"
        ),
    );
    let huge = requests::envelope(
        "",
        &format!(
            "<m:GetItem><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape><m:ItemIds>{}</m:ItemIds></m:GetItem>",
            "<t:ItemId Id=\"C-cal-1\"/>".repeat(60_000)
        ),
    );
    let entity = get.replace("IdOnly", "&xxe;");
    let cases = [
        (lol, "soap_dtd"),
        (deep, "soap_too_deep"),
        (two, "soap_two_operations"),
        (huge, "soap_too_large"),
        (entity, "soap_entity"),
        ("<soap/>".to_string(), "soap_not_envelope"),
    ];
    for (body, reason) in cases {
        let mut phone = g.https_with_cert("office", "phone-0042");
        let r = post(&mut phone, &body);
        assert_fault(&r, 400, "ErrorInvalidRequest", reason);
    }
    assert_eq!(g.backend.requests().len(), 0, "nothing reached Exchange");
}

/// exchangelib (from PyPI), the client many scripts and tools use, through the gate.
#[test]
fn exchangelib_lists_the_calendar_and_contacts_and_is_refused_the_inbox() {
    let g = Gate::start(0, RULES);
    let python = std::env::var("EWSGATE_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/py/bin/python3").to_string()
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/ews_client.py");
    let url = format!("https://{}/EWS/Exchange.asmx", tests::lab::GATE_V4);
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &g.lab.client("office").name,
            &python,
            script,
            &url,
        ])
        .args(["alice@example.org", "not-logged"])
        .arg(&g.pki.ca)
        .output()
        .expect("run exchangelib (cargo xtask setup installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("exchangelib: {stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(v["calendar"], serde_json::json!(["Dentist", "Standup"]));
    assert_eq!(v["contacts"], serde_json::json!(["Bob Example"]));
    assert!(v.get("inbox").is_none(), "{v}");
    let err = v["inbox_error"].as_str().expect("inbox error");
    assert!(err.starts_with("ErrorAccessDenied"), "{err}");
    assert!(err.contains("ewsgate"), "{err}");
    let line = wait_audit(&g.audit, |v| {
        v["decision"] == "deny" && v["data"] == "email"
    })
    .expect("audit of the inbox denial");
    assert_eq!(line["auth"], "basic");
    assert_eq!(line["user"], "alice@example.org");
    assert!(!std::fs::read_to_string(&g.audit)
        .unwrap_or_default()
        .contains("not-logged"));
    let inbox = g
        .backend
        .requests()
        .iter()
        .filter(|s| s.items.is_empty() && s.operation.is_some())
        .count();
    assert!(inbox > 0);
}

/// Exchange answers with what the gate's walk of the schema does not know: a cloud-file
/// link (`t:ReferenceAttachment`) and an element no schema has, hiding an e-mail inside a
/// calendar item. Neither passes.
#[test]
fn an_answer_with_elements_the_gate_cannot_classify_is_withheld() {
    let g = Gate::start(0, RULES);
    let mut phone = g.https_with_cert("office", "phone-0042");
    let cases = [
        (
            "F-links",
            "plan.docx",
            "unclassified element t:ReferenceAttachment",
        ),
        (
            "F-future",
            "Salary review",
            "unclassified element t:Hologram",
        ),
    ];
    for (folder, secret, says) in cases {
        let before = reached(&g, "FindItem");
        let r = post(&mut phone, &requests::find_item(folder, false, None));
        assert_eq!(r.status, 200, "{}", r.body);
        // Exchange was asked (the folder's type was unknown), its answer was withheld.
        assert_eq!(reached(&g, "FindItem"), before + 1);
        assert!(!r.body.contains(secret), "{}", r.body);
        assert!(r.body.contains("ErrorAccessDenied"), "{}", r.body);
        assert!(r.body.contains(says), "{}", r.body);
        let line = withheld_line(&g, "FindItem", says);
        assert_eq!(line["withheld"], 1, "{line}");
    }
    // The same item by ID: withheld too.
    let r = post(&mut phone, &requests::get_item(&["C-link-1"]));
    assert!(!r.body.contains("plan.docx"), "{}", r.body);
    assert!(r.body.contains("unclassified element"), "{}", r.body);
}

/// A meeting created or cancelled with invitations sends mail: the send class, which a rule
/// allowing write does not grant.
#[test]
fn meeting_invitations_and_cancellations_that_send_mail_are_sends() {
    let g = Gate::start(0, RULES);
    let mut phone = g.https_with_cert("office", "phone-0042");
    let r = post(&mut phone, &requests::create_meeting("SendToNone"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(reached(&g, "CreateItem"), 1);
    for send in ["SendToAllAndSaveCopy", "SendOnlyToAll"] {
        let mut phone = g.https_with_cert("office", "phone-0042");
        let r = post(&mut phone, &requests::create_meeting(send));
        assert_fault(&r, 500, "ErrorAccessDenied", "no rule allows CreateItem");
    }
    assert_eq!(
        reached(&g, "CreateItem"),
        1,
        "an invitation reached Exchange"
    );
    // Cancelling a known meeting with cancellations sent.
    let mut phone = g.https_with_cert("office", "phone-0042");
    post(&mut phone, &requests::get_item(&["C-cal-2"]));
    let r = post(
        &mut phone,
        &requests::delete_meeting("C-cal-2", "SendToAllAndSaveCopy"),
    );
    assert_fault(&r, 500, "ErrorAccessDenied", "no rule allows DeleteItem");
    assert_eq!(reached(&g, "DeleteItem"), 0);
}

/// Folder listings under a calendar-and-contacts rule: folders of other types are withheld
/// from `GetFolder` and cut from `FindFolder`, the roots are neutral, and a folder the gate
/// has seen to be of a denied type is refused before Exchange sees the request.
#[test]
fn folder_answers_lose_denied_folders_and_a_learnt_denied_folder_is_refused_early() {
    let g = Gate::start(0, RULES);
    let mut phone = g.https_with_cert("office", "phone-0042");
    // A folder the gate has not seen, by its opaque ID: Exchange is asked, the answer
    // withheld; the second time the gate knows it.
    let r = post(&mut phone, &requests::get_folder("F-tasks"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("a folder of tasks is not allowed"),
        "{}",
        r.body
    );
    assert!(
        !r.body.contains("IPF.Task") && !r.body.contains("F-tasks"),
        "{}",
        r.body
    );
    let r = post(&mut phone, &requests::get_folder("F-tasks"));
    assert_fault(
        &r,
        500,
        "ErrorAccessDenied",
        "no rule allows GetFolder on tasks",
    );
    assert_eq!(reached(&g, "GetFolder"), 1);

    // The roots: GetFolder shows the root itself, FindFolder lists what is allowed.
    for root in ["root", "msgfolderroot"] {
        let r = post(&mut phone, &requests::get_folder(root));
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(!r.body.contains("ErrorAccessDenied"), "{}", r.body);
    }
    let r = post(&mut phone, &requests::find_folder("msgfolderroot"));
    assert_eq!(r.status, 200, "{}", r.body);
    for shown in ["F-calendar", "F-contacts", "F-links"] {
        assert!(r.body.contains(shown), "{shown} missing: {}", r.body);
    }
    for cut in ["F-inbox", "F-notes", "F-tasks", "Inbox", "Notes"] {
        assert!(!r.body.contains(cut), "{cut} listed: {}", r.body);
    }
    // Still one success message, listing fewer folders.
    assert!(r.body.contains("NoError") && !r.body.contains("ErrorAccessDenied"));
    let line = withheld_line(&g, "FindFolder", "3 folder(s) withheld");
    assert_eq!(line["withheld"], 3, "{line}");

    // Folders learnt from that answer: denied ones are refused before Exchange.
    for (folder, data) in [("F-notes", "notes"), ("F-inbox", "email")] {
        let r = post(&mut phone, &requests::find_item(folder, false, None));
        assert_fault(
            &r,
            500,
            "ErrorAccessDenied",
            &format!("no rule allows FindItem on {data}"),
        );
    }
    assert_eq!(
        reached(&g, "FindItem"),
        0,
        "a denied folder reached Exchange"
    );
    // An allowed one is read, its items judged as ever.
    let r = post(&mut phone, &requests::find_item("F-calendar", false, None));
    assert!(r.body.contains("Dentist"), "{}", r.body);
    let line = wait_audit(&g.audit, |v| {
        v["operation"] == "FindItem" && v["decision"] == "allow"
    })
    .expect("audit");
    assert_eq!(line["data"], "calendar");
}

/// `ConvertId` names the mailbox each ID belongs to: another user's is delegate access,
/// refused unless a rule grants it, and audited with that mailbox either way.
#[test]
fn convert_id_naming_another_mailbox_is_delegate_access() {
    let g = Gate::start(0, RULES);
    let mut bob = ntlm_client(&g, "bob");
    let r = post(
        &mut bob,
        &requests::convert_id("AAMk-ceo-1", "CEO@example.org"),
    );
    assert_fault(
        &r,
        500,
        "ErrorAccessDenied",
        "access to mailbox ceo@example.org is allowed only by a rule with access = [&quot;delegate&quot;]",
    );
    assert_eq!(reached(&g, "ConvertId"), 0);
    let line = wait_audit(&g.audit, |v| v["operation"] == "ConvertId").expect("audit");
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["mailbox"], "ceo@example.org");
    assert_eq!(line["user"], "EXAMPLE\\bob");

    // Bob's own mailbox is his to convert.
    let mut bob = ntlm_client(&g, "bob");
    let r = post(
        &mut bob,
        &requests::convert_id("AAMk-bob-1", "bob@example.org"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(reached(&g, "ConvertId"), 1);

    // An assistant with delegate access: allowed, and the audit line names the mailbox.
    let mut assistant = ntlm_client(&g, "assistant");
    let r = post(
        &mut assistant,
        &requests::convert_id("AAMk-ceo-1", "ceo@example.org"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(reached(&g, "ConvertId"), 2);
    let line = wait_audit(&g.audit, |v| {
        v["operation"] == "ConvertId" && v["decision"] == "allow" && v["rule"] == "assistants"
    })
    .expect("audit of the delegate");
    assert_eq!(line["mailbox"], "ceo@example.org");
}

#[test]
fn an_answer_larger_than_one_read_is_judged_whole_and_passed_whole() {
    let g = Gate::start(0, RULES);
    let mut phone = g.https_with_cert("office", "phone-0042");
    // A calendar item of 128 KiB: read in many pieces, judged, and sent on byte for byte.
    let r = post(&mut phone, &requests::get_item(&[LONG_ITEM]));
    assert_eq!(r.status, 200, "{}", r.body.len());
    assert!(r.body.len() > 128 * 1024, "{}", r.body.len());
    assert!(r.body.contains(LONG_END), "the answer was cut");
    assert!(!r.body.contains("ErrorAccessDenied"));
    // Beside an e-mail: the e-mail's message is replaced, the long item stays whole.
    let r = post(&mut phone, &requests::get_item(&[LONG_ITEM, "M-mail-2"]));
    assert_eq!(r.status, 200, "{}", r.body.len());
    assert!(r.body.contains(LONG_END), "the answer was cut");
    assert!(!r.body.contains("Board minutes"));
    assert!(r.body.contains("ErrorAccessDenied"));
    let line = withheld_line(&g, "GetItem", "email");
    assert_eq!(line["items"], 2);
    assert!(line["bytes_out"].as_u64().is_some_and(|n| n > 128 * 1024));
}
