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
}

/// folder id, distinguished name, class, display name.
pub const FOLDERS: [(&str, &str, &str, &str); 7] = [
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
];

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
    }
}

pub fn items() -> Vec<Item> {
    vec![
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
         <t:Subject>{subject}</t:Subject>{attachments}</t:{el}>",
        el = i.element,
        id = i.id,
        f = i.folder,
        class = i.class,
        subject = i.subject,
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
                    vec![ok(op, &format!("<m:RootFolder TotalItemsInView=\"{}\" IncludesLastItemInRange=\"true\"><t:Folders>{}</t:Folders></m:RootFolder>", FOLDERS.len(), list(FOLDERS.iter().collect())))]
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
