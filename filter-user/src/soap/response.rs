//! Exchange's answers: which items, attachments and folders each response message holds,
//! with the byte span of each message so that a denied one can be replaced before the
//! client sees a byte of it.

use std::ops::Range;

use quick_xml::{events::Event, NsReader};

use super::{attr, bom_len, namespace, Ns, SoapError, MESSAGES_NS, TYPES_NS};
use crate::model::settings::SoapLimits as Limits;

/// An item as a response shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Item {
    pub id: Option<String>,
    /// `Message`, `CalendarItem`, ...
    pub element: String,
    pub class: Option<String>,
    /// IDs of the attachments the item lists.
    pub attachments: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attachment {
    pub id: Option<String>,
    /// The embedded item of an `ItemAttachment`.
    pub item: Option<Item>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FolderInfo {
    pub id: String,
    pub element: String,
    pub class: Option<String>,
}

/// One `m:*ResponseMessage`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub span: Range<usize>,
    pub name: String,
    pub items: Vec<Item>,
    /// Attachments returned by `GetAttachment` (not those an item lists).
    pub attachments: Vec<Attachment>,
    pub folders: Vec<FolderInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub messages: Vec<Message>,
    /// A `soap:Fault` rather than response messages.
    pub fault: bool,
}

const ITEMS: [&str; 11] = [
    "Message",
    "CalendarItem",
    "Contact",
    "DistributionList",
    "Task",
    "PostItem",
    "MeetingRequest",
    "MeetingResponse",
    "MeetingCancellation",
    "MeetingMessage",
    "Item",
];
const FOLDERS: [&str; 5] = [
    "Folder",
    "CalendarFolder",
    "ContactsFolder",
    "TasksFolder",
    "SearchFolder",
];

#[derive(Default)]
struct Walk<'i> {
    out: Response,
    /// Local names of the open elements (borrowed from the document), with their namespace.
    stack: Vec<(Ns, &'i str)>,
    message: Option<(usize, Message)>,
    items: Vec<(usize, Item)>,
    attachments: Vec<(usize, Attachment)>,
    folder: Option<(usize, FolderInfo)>,
    text: String,
    elements: usize,
}

/// Spans index `bytes` as given, a byte-order mark included.
pub fn parse_response(bytes: &[u8], limits: Limits) -> Result<Response, SoapError> {
    let bom = bom_len(bytes);
    let mut w = parse_document(&bytes[bom..], limits)?;
    for m in &mut w.messages {
        m.span = m.span.start + bom..m.span.end + bom;
    }
    Ok(w)
}

fn parse_document(bytes: &[u8], limits: Limits) -> Result<Response, SoapError> {
    let mut reader = NsReader::from_reader(bytes);
    reader.config_mut().check_end_names = true;
    let mut w = Walk::default();
    loop {
        let before = reader.buffer_position() as usize;
        let (ns, event) = reader
            .read_resolved_event()
            .map_err(|e| SoapError::Xml(e.to_string()))?;
        let ns = namespace(&ns);
        match event {
            Event::Start(e) | Event::Empty(e) if w.stack.len() >= limits.depth => {
                let _ = e;
                return Err(SoapError::TooDeep(limits.depth));
            }
            Event::Start(e) => {
                let local = local_of(&bytes[before..]);
                w.start(ns, &e, local, before, limits)?;
                w.stack.push((ns, local));
            }
            Event::Empty(e) => {
                let local = local_of(&bytes[before..]);
                w.start(ns, &e, local, before, limits)?;
                w.stack.push((ns, local));
                w.end(reader.buffer_position() as usize);
            }
            Event::End(_) => w.end(reader.buffer_position() as usize),
            // Only the classes' text matters.
            Event::Text(t) if w.wants_text() => w.text.push_str(&t.xml10_content()),
            Event::Text(_) => {}
            Event::GeneralRef(_) | Event::CData(_) | Event::Comment(_) | Event::Decl(_) => {}
            Event::PI(_) => return Err(SoapError::ProcessingInstruction),
            Event::DocType(_) => return Err(SoapError::Dtd),
            Event::Eof if w.stack.is_empty() => return Ok(w.out),
            Event::Eof => return Err(SoapError::Truncated),
        }
    }
}

fn local_of(at: &[u8]) -> &str {
    super::tag_name(at).1
}

impl<'i> Walk<'i> {
    fn wants_text(&self) -> bool {
        matches!(
            self.stack.last(),
            Some((Ns::Types, "ItemClass" | "FolderClass"))
        )
    }

    fn start(
        &mut self,
        ns: Ns,
        e: &quick_xml::events::BytesStart,
        local: &'i str,
        at: usize,
        limits: Limits,
    ) -> Result<(), SoapError> {
        self.elements += 1;
        if self.elements > limits.elements {
            return Err(SoapError::TooManyElements(limits.elements));
        }
        self.text.clear();
        let depth = self.stack.len();
        if depth == 0 && !(ns == Ns::Soap && local == "Envelope") {
            return Err(SoapError::NotEnvelope);
        }
        if ns == Ns::Soap && local == "Fault" {
            self.out.fault = true;
        }
        let parent = self.stack.last().map(|(_, l)| *l);
        if ns == Ns::Messages && parent == Some("ResponseMessages") && self.message.is_none() {
            let m = Message {
                span: at..at,
                name: local.to_string(),
                ..Default::default()
            };
            self.message = Some((depth, m));
            return Ok(());
        }
        if self.message.is_none() || ns != Ns::Types {
            return Ok(());
        }
        if ITEMS.contains(&local) && self.item_may_start(depth) {
            self.items.push((
                depth,
                Item {
                    element: local.to_string(),
                    ..Default::default()
                },
            ));
        } else if local == "FileAttachment" || local == "ItemAttachment" {
            self.attachments.push((depth, Attachment::default()));
        } else if FOLDERS.contains(&local) && self.folder.is_none() {
            self.folder = Some((
                depth,
                FolderInfo {
                    element: local.to_string(),
                    ..Default::default()
                },
            ));
        } else {
            self.id_element(local, e, depth)?;
        }
        Ok(())
    }

    /// An item starts at message level, or embedded in an item attachment.
    fn item_may_start(&self, depth: usize) -> bool {
        match (self.items.last(), self.attachments.last()) {
            (None, _) => true,
            (Some((i, _)), Some((a, _))) => a > i && depth > *a,
            (Some(_), None) => false,
        }
    }

    fn id_element(
        &mut self,
        local: &str,
        e: &quick_xml::events::BytesStart,
        depth: usize,
    ) -> Result<(), SoapError> {
        let direct = |owner: usize| depth == owner + 1;
        match local {
            "ItemId" => {
                if let Some((d, item)) = self.items.last_mut() {
                    if direct(*d) {
                        item.id = attr(e, "Id")?;
                    }
                }
            }
            "AttachmentId" => {
                if let Some((d, a)) = self.attachments.last_mut() {
                    if direct(*d) {
                        a.id = attr(e, "Id")?;
                    }
                }
            }
            "FolderId" => {
                if let Some((d, f)) = self.folder.as_mut() {
                    if direct(*d) {
                        f.id = attr(e, "Id")?.unwrap_or_default();
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn end(&mut self, at: usize) {
        let Some((ns, local)) = self.stack.pop() else {
            return;
        };
        let depth = self.stack.len();
        let text = std::mem::take(&mut self.text);
        if ns == Ns::Types && local == "ItemClass" {
            if let Some((d, item)) = self.items.last_mut() {
                if depth == *d + 1 {
                    item.class = Some(text.trim().to_string());
                }
            }
        }
        if ns == Ns::Types && local == "FolderClass" {
            if let Some((d, f)) = self.folder.as_mut() {
                if depth == *d + 1 {
                    f.class = Some(text.trim().to_string());
                }
            }
        }
        self.close_owner(depth, at);
    }

    /// The element at `depth` ended: if it was an item, attachment, folder or message,
    /// file it where it belongs.
    fn close_owner(&mut self, depth: usize, at: usize) {
        if self.items.last().is_some_and(|(d, _)| *d == depth) {
            let Some((_, item)) = self.items.pop() else {
                return;
            };
            match self.attachments.last_mut() {
                Some((d, a)) if self.items.last().is_none_or(|(i, _)| *d > *i) => {
                    a.item = Some(item)
                }
                _ => {
                    if let Some((_, m)) = self.message.as_mut() {
                        m.items.push(item);
                    }
                }
            }
        } else if self.attachments.last().is_some_and(|(d, _)| *d == depth) {
            let Some((_, a)) = self.attachments.pop() else {
                return;
            };
            match self.items.last_mut() {
                Some((_, item)) => item.attachments.extend(a.id),
                None => {
                    if let Some((_, m)) = self.message.as_mut() {
                        m.attachments.push(a);
                    }
                }
            }
        } else if self.folder.as_ref().is_some_and(|(d, _)| *d == depth) {
            if let (Some((_, f)), Some((_, m))) = (self.folder.take(), self.message.as_mut()) {
                m.folders.push(f);
            }
        } else if self.message.as_ref().is_some_and(|(d, _)| *d == depth) {
            if let Some((_, mut m)) = self.message.take() {
                m.span.end = at;
                self.out.messages.push(m);
            }
        }
    }
}

fn escape(text: &str) -> String {
    quick_xml::escape::escape(text).into_owned()
}

/// The response with the messages that have a reason replaced by an access-denied error
/// message of the same name.
pub fn rewrite(bytes: &[u8], response: &Response, denied: &[Option<String>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut from = 0;
    for (m, why) in response.messages.iter().zip(denied) {
        let Some(why) = why else { continue };
        out.extend_from_slice(&bytes[from..m.span.start]);
        out.extend_from_slice(
            format!(
                "<m:{name} xmlns:m=\"{MESSAGES_NS}\" ResponseClass=\"Error\">\
                 <m:MessageText>{text}</m:MessageText>\
                 <m:ResponseCode>ErrorAccessDenied</m:ResponseCode>\
                 <m:DescriptiveLinkKey>0</m:DescriptiveLinkKey></m:{name}>",
                name = m.name,
                text = escape(&format!("ewsgate: {why}")),
            )
            .as_bytes(),
        );
        from = m.span.end;
    }
    out.extend_from_slice(&bytes[from..]);
    out
}

/// A SOAP 1.1 fault shaped like Exchange's own, so EWS clients raise the named error.
pub fn fault(code: &str, text: &str) -> String {
    let text = escape(&format!("ewsgate: {text}"));
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\
         <s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body><s:Fault>\
         <faultcode xmlns:a=\"{TYPES_NS}\">a:{code}</faultcode>\
         <faultstring xml:lang=\"en-US\">{text}</faultstring><detail>\
         <e:ResponseCode xmlns:e=\"http://schemas.microsoft.com/exchange/services/2006/errors\">{code}</e:ResponseCode>\
         <e:Message xmlns:e=\"http://schemas.microsoft.com/exchange/services/2006/errors\">{text}</e:Message>\
         </detail></s:Fault></s:Body></s:Envelope>"
    )
}
