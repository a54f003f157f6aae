//! A stand-in Exchange mailbox that answers EWS SOAP the way Exchange does (the shapes of
//! the documented responses, synthetic contents), and the requests the tests send.

use std::sync::Mutex;

use ewsgate::soap::{self, Folder};

pub const MESSAGES: &str = "http://schemas.microsoft.com/exchange/services/2006/messages";
pub const TYPES: &str = "http://schemas.microsoft.com/exchange/services/2006/types";

/// The item the testkit's callback tokens are issued for: an e-mail with an attachment.
pub const TOKEN_ITEM: &str = "AAMkAD-item-1=";

#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub folder: &'static str,
    pub element: &'static str,
    pub class: &'static str,
    pub subject: &'static str,
    pub attachments: Vec<&'static str>,
    /// More of the item, as Exchange writes it (raw XML after the subject).
    pub extra: &'static str,
}

/// folder id, distinguished name, class, display name.
pub const FOLDERS: [(&str, &str, &str, &str); 9] = [
    ("F-top", "root", "", "root"),
    ("F-inbox", "inbox", "IPF.Note", "Inbox"),
    ("F-calendar", "calendar", "IPF.Appointment", "Calendar"),
    ("F-contacts", "contacts", "IPF.Contact", "Contacts"),
    ("F-tasks", "tasks", "IPF.Task", "Tasks"),
    ("F-notes", "notes", "IPF.StickyNote", "Notes"),
    (
        "F-root",
        "msgfolderroot",
        "IPF.Note",
        "Top of Information Store",
    ),
    // Calendars no one names: only their opaque IDs reach them.
    ("F-links", "", "IPF.Appointment", "Shared plans"),
    ("F-future", "", "IPF.Appointment", "Offsite"),
];

/// A cloud file an item links to: EWS's `t:ReferenceAttachment`, which the gate does not
/// classify.
pub const REFERENCE_ATTACHMENT: &str = "<t:Attachments><t:ReferenceAttachment><t:AttachmentId Id=\"A-link-1\"/><t:Name>plan.docx</t:Name><t:AttachLongPathName>https://files.example.org/plan.docx</t:AttachLongPathName><t:ProviderType>OneDrivePro</t:ProviderType></t:ReferenceAttachment></t:Attachments>";

/// An element no EWS schema has (yet), carrying an e-mail inside a calendar item.
pub const UNKNOWN_ELEMENT: &str = "<t:Hologram><t:Message><t:ItemClass>IPM.Note</t:ItemClass><t:Subject>Salary review</t:Subject></t:Message></t:Hologram>";

fn item(
    id: &str,
    folder: &'static str,
    element: &'static str,
    class: &'static str,
    subject: &'static str,
    attachments: Vec<&'static str>,
) -> Item {
    Item {
        id: id.into(),
        folder,
        element,
        class,
        subject,
        attachments,
        extra: "",
    }
}

/// A calendar item whose answer is far larger than one read of the gate's (16 KB): its
/// text body, 128 KiB of it, ends with `LONG_END`.
pub const LONG_ITEM: &str = "C-long-1";
pub const LONG_END: &str = "end of the long agenda";

fn long_body() -> &'static str {
    static BODY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BODY.get_or_init(|| {
        let line = "Agenda point, with a note about it that goes on for a while.\n";
        format!(
            "<t:Body BodyType=\"Text\">{}{LONG_END}</t:Body>",
            line.repeat(128 * 1024 / line.len())
        )
    })
}

pub fn items() -> Vec<Item> {
    vec![
        // In a folder of its own, so that no listing of a known folder carries it.
        Item {
            extra: long_body(),
            ..item(
                LONG_ITEM,
                "F-long",
                "CalendarItem",
                "IPM.Appointment",
                "Long agenda",
                vec![],
            )
        },
        item(
            TOKEN_ITEM,
            "F-inbox",
            "Message",
            "IPM.Note",
            "Quote for ACME",
            vec!["A-mail-1"],
        ),
        item(
            "M-mail-2",
            "F-inbox",
            "Message",
            "IPM.Note",
            "Board minutes",
            vec!["A-mail-2"],
        ),
        item(
            "R-meet-1",
            "F-inbox",
            "MeetingRequest",
            "IPM.Schedule.Meeting.Request",
            "Planning",
            vec![],
        ),
        item(
            "C-cal-1",
            "F-calendar",
            "CalendarItem",
            "IPM.Appointment",
            "Dentist",
            vec!["A-cal-1"],
        ),
        item(
            "C-cal-2",
            "F-calendar",
            "CalendarItem",
            "IPM.Appointment",
            "Standup",
            vec![],
        ),
        item(
            "P-con-1",
            "F-contacts",
            "Contact",
            "IPM.Contact",
            "Bob Example",
            vec![],
        ),
        item(
            "T-task-1",
            "F-tasks",
            "Task",
            "IPM.Task",
            "File taxes",
            vec![],
        ),
        item(
            "N-note-1",
            "F-notes",
            "Message",
            "IPM.StickyNote",
            "Door code 4711",
            vec![],
        ),
        Item {
            extra: REFERENCE_ATTACHMENT,
            ..item(
                "C-link-1",
                "F-links",
                "CalendarItem",
                "IPM.Appointment",
                "Roadmap review",
                vec![],
            )
        },
        Item {
            extra: UNKNOWN_ELEMENT,
            ..item(
                "C-future-1",
                "F-future",
                "CalendarItem",
                "IPM.Appointment",
                "Offsite planning",
                vec![],
            )
        },
    ]
}

/// The mailbox: items move, so it changes.
pub struct Mailbox {
    items: Mutex<Vec<Item>>,
}

impl Default for Mailbox {
    fn default() -> Self {
        Mailbox {
            items: Mutex::new(items()),
        }
    }
}

fn folder_id(f: &Folder) -> Option<&'static str> {
    match f {
        Folder::Distinguished { id, .. } if id.is_empty() => None,
        Folder::Distinguished { id, .. } => FOLDERS.iter().find(|x| x.1 == id).map(|x| x.0),
        Folder::Opaque(id) => FOLDERS.iter().find(|x| x.0 == id).map(|x| x.0),
    }
}

pub fn envelope(body: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\">\
         <s:Header><h:ServerVersionInfo MajorVersion=\"15\" MinorVersion=\"1\" MajorBuildNumber=\"2507\" MinorBuildNumber=\"6\" Version=\"V2017_07_11\" \
         xmlns:h=\"{TYPES}\" xmlns=\"{TYPES}\"/></s:Header>\
         <s:Body xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\">{body}</s:Body></s:Envelope>"
    )
}

fn response(op: &str, messages: &[String]) -> String {
    envelope(&format!(
        "<m:{op}Response xmlns:m=\"{MESSAGES}\" xmlns:t=\"{TYPES}\"><m:ResponseMessages>{}</m:ResponseMessages></m:{op}Response>",
        messages.concat()
    ))
}

fn ok(op: &str, inner: &str) -> String {
    format!("<m:{op}ResponseMessage ResponseClass=\"Success\"><m:ResponseCode>NoError</m:ResponseCode>{inner}</m:{op}ResponseMessage>")
}

fn error(op: &str, code: &str) -> String {
    format!("<m:{op}ResponseMessage ResponseClass=\"Error\"><m:MessageText>{code}</m:MessageText><m:ResponseCode>{code}</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey></m:{op}ResponseMessage>")
}

fn item_xml(i: &Item) -> String {
    let attachments: String = i
        .attachments
        .iter()
        .map(|a| format!("<t:FileAttachment><t:AttachmentId Id=\"{a}\"/><t:Name>{a}.pdf</t:Name></t:FileAttachment>"))
        .collect();
    let attachments = if attachments.is_empty() {
        String::new()
    } else {
        format!("<t:Attachments>{attachments}</t:Attachments>")
    };
    format!(
        "<t:{el}><t:ItemId Id=\"{id}\" ChangeKey=\"CQAAAA==\"/><t:ParentFolderId Id=\"{f}\"/><t:ItemClass>{class}</t:ItemClass>\
         <t:Subject>{subject}</t:Subject>{attachments}{extra}</t:{el}>",
        el = i.element,
        id = i.id,
        f = i.folder,
        class = i.class,
        subject = i.subject,
        extra = i.extra,
    )
}

/// A `GetItem` answer: each item, or ErrorItemNotFound.
pub fn get_item_response(items: &[Option<&Item>]) -> String {
    let messages: Vec<String> = items
        .iter()
        .map(|i| match i {
            Some(i) => ok("GetItem", &format!("<m:Items>{}</m:Items>", item_xml(i))),
            None => error("GetItem", "ErrorItemNotFound"),
        })
        .collect();
    response("GetItem", &messages)
}

impl Mailbox {
    /// Exchange's answer to a SOAP request, or `None` for what is not SOAP.
    pub fn answer(&self, body: &[u8]) -> Option<String> {
        let req = soap::parse_request(body, true, Default::default()).ok()?;
        let items = self.items.lock().ok()?.clone();
        let find = |id: &str| items.iter().find(|i| i.id == id);
        let op = req.operation.as_str();
        if op == "GetItem" {
            let found: Vec<Option<&Item>> = req.items.iter().map(|id| find(id)).collect();
            return Some(get_item_response(&found));
        }
        let messages: Vec<String> = match op {
            "GetAttachment" => req
                .attachments
                .iter()
                .map(|a| match items.iter().find(|i| i.attachments.contains(&a.as_str())) {
                    Some(_) => ok(op, &format!("<m:Attachments><t:FileAttachment><t:AttachmentId Id=\"{a}\"/><t:Name>{a}.pdf</t:Name><t:Content>JVBERi0xLjQK</t:Content></t:FileAttachment></m:Attachments>")),
                    None => error(op, "ErrorInvalidIdMalformed"),
                })
                .collect(),
            "FindItem" => req
                .folders
                .iter()
                .map(|f| {
                    let fid = folder_id(f);
                    let found: String = items
                        .iter()
                        .filter(|i| Some(i.folder) == fid)
                        .map(item_xml)
                        .collect();
                    ok(op, &format!("<m:RootFolder TotalItemsInView=\"{n}\" IncludesLastItemInRange=\"true\"><t:Items>{found}</t:Items></m:RootFolder>",
                        n = items.iter().filter(|i| Some(i.folder) == fid).count()))
                })
                .collect(),
            "GetFolder" | "FindFolder" => {
                let list = |fs: Vec<&(&str, &str, &str, &str)>| -> String {
                    fs.iter()
                        .map(|(id, _, class, name)| {
                            let el = match *class {
                                "IPF.Appointment" => "CalendarFolder",
                                "IPF.Contact" => "ContactsFolder",
                                "IPF.Task" => "TasksFolder",
                                _ => "Folder",
                            };
                            let class = if class.is_empty() {
                                String::new()
                            } else {
                                format!("<t:FolderClass>{class}</t:FolderClass>")
                            };
                            format!("<t:{el}><t:FolderId Id=\"{id}\" ChangeKey=\"AQAAAA==\"/>{class}<t:DisplayName>{name}</t:DisplayName></t:{el}>")
                        })
                        .collect()
                };
                if op == "GetFolder" {
                    req.folders
                        .iter()
                        .map(|f| match FOLDERS.iter().find(|x| Some(x.0) == folder_id(f)) {
                            Some(x) => ok(op, &format!("<m:Folders>{}</m:Folders>", list(vec![x]))),
                            None => error(op, "ErrorFolderNotFound"),
                        })
                        .collect()
                } else {
                    // The folders under the top of the store (deep): not the roots themselves.
                    let under: Vec<_> = FOLDERS
                        .iter()
                        .filter(|x| !matches!(x.1, "root" | "msgfolderroot"))
                        .collect();
                    vec![ok(op, &format!("<m:RootFolder TotalItemsInView=\"{}\" IncludesLastItemInRange=\"true\"><t:Folders>{}</t:Folders></m:RootFolder>", under.len(), list(under)))]
                }
            }
            "MoveItem" | "CopyItem" => {
                let to = req.folders.last().and_then(folder_id).unwrap_or("F-inbox");
                let mut moved = Vec::new();
                if let Ok(mut all) = self.items.lock() {
                    for id in &req.items {
                        if let Some(i) = all.iter_mut().find(|i| &i.id == id) {
                            // A move is a copy and a delete: the item gets a new ID.
                            i.id = format!("{id}-moved");
                            i.folder = to;
                            moved.push(ok(op, &format!("<m:Items>{}</m:Items>", item_xml(i))));
                        }
                    }
                }
                moved
            }
            _ => vec![ok(op, "")],
        };
        Some(response(op, &messages))
    }
}

/// EWS requests as clients send them.
pub mod requests {
    use super::{MESSAGES, TYPES};

    pub fn envelope(header: &str, body: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\
             <soap:Envelope xmlns:soap=\"http://schemas.xmlsoap.org/soap/envelope/\" xmlns:m=\"{MESSAGES}\" xmlns:t=\"{TYPES}\">\
             <soap:Header><t:RequestServerVersion Version=\"Exchange2013_SP1\"/>{header}</soap:Header>\
             <soap:Body>{body}</soap:Body></soap:Envelope>"
        )
    }

    const SHAPE: &str = "<m:ItemShape><t:BaseShape>IdOnly</t:BaseShape><t:AdditionalProperties><t:FieldURI FieldURI=\"item:ItemClass\"/></t:AdditionalProperties></m:ItemShape>";

    pub fn get_item(ids: &[&str]) -> String {
        let ids: String = ids
            .iter()
            .map(|i| format!("<t:ItemId Id=\"{i}\"/>"))
            .collect();
        envelope(
            "",
            &format!("<m:GetItem>{SHAPE}<m:ItemIds>{ids}</m:ItemIds></m:GetItem>"),
        )
    }

    pub fn get_attachment(ids: &[&str]) -> String {
        let ids: String = ids
            .iter()
            .map(|i| format!("<t:AttachmentId Id=\"{i}\"/>"))
            .collect();
        envelope(
            "",
            &format!("<m:GetAttachment><m:AttachmentIds>{ids}</m:AttachmentIds></m:GetAttachment>"),
        )
    }

    /// `FindItem` in a distinguished folder (or an opaque one: `folder` starting with `F-`),
    /// optionally as a calendar view, optionally in another mailbox.
    pub fn find_item(folder: &str, calendar_view: bool, mailbox: Option<&str>) -> String {
        let mb = mailbox.map_or(String::new(), |m| {
            format!("<t:Mailbox><t:EmailAddress>{m}</t:EmailAddress></t:Mailbox>")
        });
        let f = if folder.starts_with("F-") {
            format!("<t:FolderId Id=\"{folder}\"/>")
        } else {
            format!("<t:DistinguishedFolderId Id=\"{folder}\">{mb}</t:DistinguishedFolderId>")
        };
        let view = if calendar_view {
            "<m:CalendarView StartDate=\"2026-11-01T00:00:00Z\" EndDate=\"2026-12-01T00:00:00Z\"/>"
        } else {
            "<m:IndexedPageItemView MaxEntriesReturned=\"100\" Offset=\"0\" BasePoint=\"Beginning\"/>"
        };
        envelope(
            "",
            &format!("<m:FindItem Traversal=\"Shallow\">{SHAPE}{view}<m:ParentFolderIds>{f}</m:ParentFolderIds></m:FindItem>"),
        )
    }

    pub fn move_item(id: &str, to: &str) -> String {
        envelope("", &format!("<m:MoveItem><m:ToFolderId><t:DistinguishedFolderId Id=\"{to}\"/></m:ToFolderId><m:ItemIds><t:ItemId Id=\"{id}\"/></m:ItemIds></m:MoveItem>"))
    }

    pub fn impersonating(who: &str, body: &str) -> String {
        let inner = body
            .split_once("<soap:Body>")
            .and_then(|(_, b)| b.split_once("</soap:Body>"))
            .map_or("", |(b, _)| b);
        envelope(
            &format!("<t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>{who}</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>"),
            inner,
        )
    }

    pub fn sync_folder_items(folder: &str) -> String {
        envelope("", &format!("<m:SyncFolderItems><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape><m:SyncFolderId><t:DistinguishedFolderId Id=\"{folder}\"/></m:SyncFolderId><m:MaxChangesReturned>100</m:MaxChangesReturned></m:SyncFolderItems>"))
    }

    /// `CreateItem` of a new e-mail that is sent, or of a calendar item.
    pub fn create_item(send_mail: bool) -> String {
        let body = if send_mail {
            "<m:CreateItem MessageDisposition=\"SendAndSaveCopy\"><m:Items><t:Message><t:Subject>Invoice</t:Subject><t:ToRecipients><t:Mailbox><t:EmailAddress>x@example.net</t:EmailAddress></t:Mailbox></t:ToRecipients></t:Message></m:Items></m:CreateItem>"
        } else {
            "<m:CreateItem SendMeetingInvitations=\"SendToNone\"><m:SavedItemFolderId><t:DistinguishedFolderId Id=\"calendar\"/></m:SavedItemFolderId><m:Items><t:CalendarItem><t:Subject>Lunch</t:Subject></t:CalendarItem></m:Items></m:CreateItem>"
        };
        envelope("", body)
    }

    /// `CreateItem` of a meeting, with `SendMeetingInvitations` as given.
    pub fn create_meeting(send: &str) -> String {
        envelope("", &format!("<m:CreateItem SendMeetingInvitations=\"{send}\"><m:SavedItemFolderId><t:DistinguishedFolderId Id=\"calendar\"/></m:SavedItemFolderId><m:Items><t:CalendarItem><t:Subject>Kick-off</t:Subject><t:RequiredAttendees><t:Attendee><t:Mailbox><t:EmailAddress>partner@example.net</t:EmailAddress></t:Mailbox></t:Attendee></t:RequiredAttendees></t:CalendarItem></m:Items></m:CreateItem>"))
    }

    /// `DeleteItem` of calendar items, with `SendMeetingCancellations` as given.
    pub fn delete_meeting(id: &str, send: &str) -> String {
        envelope("", &format!("<m:DeleteItem DeleteType=\"MoveToDeletedItems\" SendMeetingCancellations=\"{send}\"><m:ItemIds><t:ItemId Id=\"{id}\"/></m:ItemIds></m:DeleteItem>"))
    }

    /// `FindFolder` under a distinguished folder, deep.
    pub fn find_folder(parent: &str) -> String {
        envelope("", &format!("<m:FindFolder Traversal=\"Deep\"><m:FolderShape><t:BaseShape>Default</t:BaseShape><t:AdditionalProperties><t:FieldURI FieldURI=\"folder:FolderClass\"/></t:AdditionalProperties></m:FolderShape><m:ParentFolderIds><t:DistinguishedFolderId Id=\"{parent}\"/></m:ParentFolderIds></m:FindFolder>"))
    }

    /// `GetFolder` of a distinguished folder or, for an `F-` name, an opaque one.
    pub fn get_folder(folder: &str) -> String {
        let f = if folder.starts_with("F-") {
            format!("<t:FolderId Id=\"{folder}\"/>")
        } else {
            format!("<t:DistinguishedFolderId Id=\"{folder}\"/>")
        };
        envelope("", &format!("<m:GetFolder><m:FolderShape><t:BaseShape>AllProperties</t:BaseShape></m:FolderShape><m:FolderIds>{f}</m:FolderIds></m:GetFolder>"))
    }

    /// `ConvertId` of one ID that belongs to `mailbox`.
    pub fn convert_id(id: &str, mailbox: &str) -> String {
        envelope("", &format!("<m:ConvertId DestinationFormat=\"EwsId\"><m:SourceIds><t:AlternateId Format=\"EwsLegacyId\" Id=\"{id}\" Mailbox=\"{mailbox}\"/></m:SourceIds></m:ConvertId>"))
    }

    pub fn export_items(id: &str) -> String {
        envelope(
            "",
            &format!(
                "<m:ExportItems><m:ItemIds><t:ItemId Id=\"{id}\"/></m:ItemIds></m:ExportItems>"
            ),
        )
    }

    /// `CreateAttachment` whose content is `size` bytes of base64.
    pub fn create_attachment_head(parent: &str) -> (String, String) {
        let head = envelope(
            "",
            &format!("<m:CreateAttachment><m:ParentItemId Id=\"{parent}\"/><m:Attachments><t:FileAttachment><t:Name>big.bin</t:Name><t:Content>"),
        );
        let head = head
            .split_once("</soap:Body>")
            .map_or(head.clone(), |(h, _)| h.to_string());
        let tail = "</t:Content></t:FileAttachment></m:Attachments></m:CreateAttachment></soap:Body></soap:Envelope>".to_string();
        (head, tail)
    }
}
