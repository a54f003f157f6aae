//! Exchange's answers: which items, attachments and folders each response message holds,
//! with the byte span of each message (and of each listed folder) so that what is denied can
//! be replaced before the client sees a byte of it.
//!
//! The walk follows the response schema: every element at a place where items,
//! attachments or folders can appear must be one the walker knows (see [`super::schema`]).
//! An element it does not know there, such as `t:ReferenceAttachment` or one a later
//! Exchange adds, cannot be judged: the message that holds it is marked
//! [`Message::unclassified`] and withheld. Outside the response messages an unknown element
//! refuses the whole response.

use std::ops::Range;

use quick_xml::events::{BytesRef, BytesStart, Event};
use smallvec::SmallVec;

use super::{
    attr, bom_len,
    names::NsReader,
    schema::{self, Known, Lists},
    Ns, SoapError, MESSAGES_NS, TYPES_NS,
};
use crate::model::settings::SoapLimits as Limits;

/// An item as a response shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Item {
    pub id: Option<String>,
    /// `Message`, `CalendarItem`, ...
    pub element: &'static str,
    pub class: Option<String>,
    /// IDs of the attachments the item lists.
    pub attachments: Vec<String>,
    /// Items inside this one: the item of an item attachment, and the calendar items a
    /// meeting request lists as conflicting or adjacent.
    pub embedded: Vec<Item>,
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
    /// `Folder`, `CalendarFolder`, ...
    pub element: &'static str,
    pub class: Option<String>,
    /// The bytes to cut when the folder is withheld from a listing: the folder element, or
    /// the sync change that holds it.
    pub span: Range<usize>,
    /// Listed by `FindFolder` or a hierarchy sync, so it can be cut from the list; a folder
    /// `GetFolder` was asked for is withheld with its message instead.
    pub listed: bool,
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
    /// The first element the walker found where it knows every element and did not know
    /// this one, as written (`t:ReferenceAttachment`).
    pub unclassified: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub messages: Vec<Message>,
    /// A `soap:Fault` rather than response messages.
    pub fault: bool,
}

/// What an open element is, as far as classification goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Envelope,
    Body,
    /// The operation's response element (`m:GetItemResponse`).
    Operation,
    ResponseMessages,
    Message,
    RootFolder,
    Groups,
    GroupedItems,
    Conversation,
    ConversationNodes,
    ConversationNode,
    Changes,
    /// A sync change that holds one item or folder (`t:Create`, `t:Update`).
    Change,
    /// A sync change that holds only IDs (`t:Delete`, `t:ReadFlagChange`).
    Removal,
    /// Item elements only: `Items`, `AdjacentMeetings`, `ConflictingMeetings`.
    Items,
    Item,
    ItemClass,
    ResponseObjects,
    /// A response object marker: nothing may be inside.
    Empty,
    Attachments,
    FileAttachment,
    ItemAttachment,
    Folders {
        listed: bool,
    },
    Folder,
    FolderClass,
    /// The header, a fault, and the content of known properties: not walked.
    Opaque,
}

/// The context of an element named `local` in `ns` inside `parent`, which the schema lists
/// hold as `known`; `None` when the schema has no such element there.
fn child(parent: Ctx, ns: Ns, local: &str, known: Known) -> Option<Ctx> {
    use Ctx::*;
    let types = ns == Ns::Types;
    let is = |list| known.lists.has(list);
    Some(match parent {
        Opaque => Opaque,
        Envelope => match (ns, local) {
            (Ns::Soap, "Header") => Opaque,
            (Ns::Soap, "Body") => Body,
            _ => return None,
        },
        Body => match ns {
            Ns::Soap if local == "Fault" => Opaque,
            Ns::Messages => Operation,
            _ => return None,
        },
        Operation if ns == Ns::Messages && local == "ResponseMessages" => ResponseMessages,
        ResponseMessages if ns == Ns::Messages => Message,
        Message if ns == Ns::Messages => match local {
            "MessageText"
            | "ResponseCode"
            | "DescriptiveLinkKey"
            | "MessageXml"
            | "SyncState"
            | "IncludesLastItemInRange"
            | "IncludesLastFolderInRange"
            | "HighlightTerms" => Opaque,
            "Items" => Items,
            "RootFolder" => RootFolder,
            "Attachments" => Attachments,
            "Folders" => Folders { listed: false },
            "Changes" => Changes,
            "Conversation" => Conversation,
            _ => return None,
        },
        _ if !types => return None,
        RootFolder => match local {
            "Items" => Items,
            "Groups" => Groups,
            "Folders" => Folders { listed: true },
            _ => return None,
        },
        Groups if local == "GroupedItems" => GroupedItems,
        GroupedItems => match local {
            "GroupIndex" | "GroupSummary" => Opaque,
            "Items" => Items,
            _ => return None,
        },
        Conversation => match local {
            "ConversationId" | "SyncState" | "CanDelete" => Opaque,
            "ConversationNodes" => ConversationNodes,
            _ => return None,
        },
        ConversationNodes if local == "ConversationNode" => ConversationNode,
        ConversationNode => match local {
            "InternetMessageId" | "ParentInternetMessageId" => Opaque,
            "Items" => Items,
            _ => return None,
        },
        Changes => match local {
            "Create" | "Update" => Change,
            "Delete" | "ReadFlagChange" => Removal,
            _ => return None,
        },
        Removal => match local {
            "ItemId" | "FolderId" | "IsRead" => Opaque,
            _ => return None,
        },
        Change if is(Lists::FOLDERS) => Folder,
        Change | Items | ItemAttachment if is(Lists::ITEMS) => Item,
        Item => match local {
            "ItemClass" => ItemClass,
            "Attachments" => Attachments,
            "AdjacentMeetings" | "ConflictingMeetings" => Items,
            "ResponseObjects" => ResponseObjects,
            _ if is(Lists::ITEM_PROPERTIES) => Opaque,
            _ => return None,
        },
        ResponseObjects if is(Lists::RESPONSE_OBJECTS) => Empty,
        Attachments => match local {
            "FileAttachment" => FileAttachment,
            "ItemAttachment" => ItemAttachment,
            _ => return None,
        },
        FileAttachment
            if is(Lists::ATTACHMENT_PROPERTIES) || is(Lists::FILE_ATTACHMENT_PROPERTIES) =>
        {
            Opaque
        }
        ItemAttachment if is(Lists::ATTACHMENT_PROPERTIES) => Opaque,
        Folders { .. } if is(Lists::FOLDERS) => Folder,
        Folder => match local {
            "FolderClass" => FolderClass,
            _ if is(Lists::FOLDER_PROPERTIES) => Opaque,
            _ => return None,
        },
        _ => return None,
    })
}

/// An item or attachment being read; items and attachments nest in each other.
enum Owner {
    Item(Item),
    Attachment(Attachment),
}

struct Open {
    ctx: Ctx,
    /// Where the element's start tag begins.
    start: usize,
}

#[derive(Default)]
struct Walk {
    out: Response,
    stack: SmallVec<[Open; 16]>,
    message: Option<Message>,
    owners: SmallVec<[Owner; 4]>,
    folder: Option<FolderInfo>,
    /// The last folder filed sits in a sync change whose end is its span's end.
    folder_in_change: bool,
    text: String,
    elements: usize,
}

/// Spans index `bytes` as given, a byte-order mark included.
pub fn parse_response(bytes: &[u8], limits: Limits) -> Result<Response, SoapError> {
    // The reader skips the mark: its positions count from after it.
    let bom = bom_len(bytes);
    let mut w = parse_document(bytes, limits)?;
    for m in &mut w.messages {
        m.span = m.span.start + bom..m.span.end + bom;
    }
    Ok(w)
}

fn parse_document(bytes: &[u8], limits: Limits) -> Result<Response, SoapError> {
    let mut reader = NsReader::new(bytes);
    // The stacks are on the stack up to a usual answer's depth: no allocation.
    let mut w = Walk::default();
    loop {
        let before = reader.buffer_position() as usize;
        let event = reader
            .read_event()
            .map_err(|e| SoapError::Xml(e.to_string()))?;
        match event {
            Event::Start(e) | Event::Empty(e) if w.stack.len() >= limits.depth => {
                let _ = e;
                return Err(SoapError::TooDeep(limits.depth));
            }
            Event::Start(e) => w.start(reader.ns(), &e, reader.tag_name(), before, limits)?,
            Event::Empty(e) => {
                w.start(reader.ns(), &e, reader.tag_name(), before, limits)?;
                w.end(reader.buffer_position() as usize);
            }
            Event::End(_) => w.end(reader.buffer_position() as usize),
            // Only the classes' text matters.
            Event::Text(t) if w.wants_text() => w.push_text(&t.xml10_content()),
            Event::CData(t) if w.wants_text() => w.push_text(&t),
            Event::GeneralRef(r) if w.wants_text() => w.push_text(&reference(&r)),
            Event::Text(_) | Event::CData(_) | Event::GeneralRef(_) => {}
            Event::Comment(_) | Event::Decl(_) => {}
            Event::PI(_) => return Err(SoapError::ProcessingInstruction),
            Event::DocType(_) => return Err(SoapError::Dtd),
            Event::Eof if w.stack.is_empty() => return Ok(w.out),
            Event::Eof => return Err(SoapError::Truncated),
        }
    }
}

/// The character a reference stands for; one that is not XML's own makes the text
/// unrecognisable rather than shorter.
fn reference(r: &BytesRef) -> String {
    let c = match r.as_ref() {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "apos" => '\'',
        "quot" => '"',
        _ => r.resolve_char_ref().ok().flatten().unwrap_or('\u{fffd}'),
    };
    c.to_string()
}

impl Walk {
    fn wants_text(&self) -> bool {
        matches!(
            self.stack.last().map(|o| o.ctx),
            Some(Ctx::ItemClass | Ctx::FolderClass)
        )
    }

    fn push_text(&mut self, t: &str) {
        if self.text.len() < 1024 {
            self.text.push_str(t);
        }
    }

    fn start(
        &mut self,
        ns: Ns,
        e: &BytesStart,
        (raw, local): (&str, &str),
        at: usize,
        limits: Limits,
    ) -> Result<(), SoapError> {
        self.elements += 1;
        if self.elements > limits.elements {
            return Err(SoapError::TooManyElements(limits.elements));
        }
        let parent = match self.stack.last() {
            Some(o) => o.ctx,
            None if ns == Ns::Soap && local == "Envelope" => {
                self.stack.push(Open {
                    ctx: Ctx::Envelope,
                    start: at,
                });
                return Ok(());
            }
            None => return Err(SoapError::NotEnvelope),
        };
        // Most elements are property content: no names to look at.
        if parent == Ctx::Opaque {
            self.stack.push(Open {
                ctx: Ctx::Opaque,
                start: at,
            });
            return Ok(());
        }
        // One lookup for every list an element of the types namespace could be in.
        let known = if ns == Ns::Types {
            schema::lookup(local)
        } else {
            Known::default()
        };
        let ctx = match child(parent, ns, local, known) {
            Some(ctx) => ctx,
            None if self.message.is_some() => {
                self.unclassified(raw);
                Ctx::Opaque
            }
            None => return Err(SoapError::Unexpected(shown(raw))),
        };
        self.opened(parent, ctx, local, known.name, e, at)?;
        self.text.clear();
        self.stack.push(Open { ctx, start: at });
        Ok(())
    }

    fn unclassified(&mut self, raw: &str) {
        if let Some(m) = self.message.as_mut() {
            m.unclassified.get_or_insert_with(|| shown(raw));
        }
    }

    /// Records what an element that starts in `ctx` (inside `parent`) begins or names;
    /// `element` is its name as the schema lists spell it, for items and folders.
    fn opened(
        &mut self,
        parent: Ctx,
        ctx: Ctx,
        local: &str,
        element: &'static str,
        e: &BytesStart,
        at: usize,
    ) -> Result<(), SoapError> {
        match ctx {
            Ctx::Opaque if parent == Ctx::Body => self.out.fault = true,
            Ctx::Message => {
                self.message = Some(Message {
                    span: at..at,
                    name: local.to_string(),
                    ..Default::default()
                })
            }
            Ctx::Item => self.owners.push(Owner::Item(Item {
                element,
                ..Default::default()
            })),
            Ctx::FileAttachment | Ctx::ItemAttachment => {
                self.owners.push(Owner::Attachment(Attachment::default()))
            }
            Ctx::Folder => {
                let (start, listed) = match (parent, self.stack.last()) {
                    (Ctx::Change, Some(change)) => (change.start, true),
                    (Ctx::Folders { listed }, _) => (at, listed),
                    _ => (at, false),
                };
                self.folder = Some(FolderInfo {
                    element,
                    span: start..start,
                    listed,
                    ..Default::default()
                });
            }
            Ctx::Opaque => self.id_element(parent, local, e)?,
            _ => {}
        }
        Ok(())
    }

    /// The ID of the item, attachment or folder the element belongs to directly.
    fn id_element(&mut self, parent: Ctx, local: &str, e: &BytesStart) -> Result<(), SoapError> {
        match (parent, local, self.owners.last_mut()) {
            (Ctx::Item, "ItemId", Some(Owner::Item(item))) => item.id = attr(e, "Id")?,
            (
                Ctx::FileAttachment | Ctx::ItemAttachment,
                "AttachmentId",
                Some(Owner::Attachment(a)),
            ) => a.id = attr(e, "Id")?,
            (Ctx::Folder, "FolderId", _) => {
                if let Some(f) = self.folder.as_mut() {
                    f.id = attr(e, "Id")?.unwrap_or_default();
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn end(&mut self, at: usize) {
        let Some(open) = self.stack.pop() else {
            return;
        };
        let text = || self.text.trim().to_string();
        match open.ctx {
            Ctx::ItemClass => {
                let class = text();
                if let Some(Owner::Item(item)) = self.owners.last_mut() {
                    item.class = Some(class);
                }
            }
            Ctx::FolderClass => {
                let class = text();
                if let Some(f) = self.folder.as_mut() {
                    f.class = Some(class);
                }
            }
            Ctx::Item | Ctx::FileAttachment | Ctx::ItemAttachment => self.file_owner(),
            Ctx::Folder => self.file_folder(at),
            Ctx::Change if self.folder_in_change => {
                self.folder_in_change = false;
                if let Some(f) = self.message.as_mut().and_then(|m| m.folders.last_mut()) {
                    f.span.end = at;
                }
            }
            Ctx::Message => {
                if let Some(mut m) = self.message.take() {
                    m.span.end = at;
                    self.out.messages.push(m);
                }
            }
            _ => {}
        }
        self.text.clear();
    }

    /// An item or attachment ended: it belongs to the one it is in, or to the message.
    fn file_owner(&mut self) {
        let Some(done) = self.owners.pop() else {
            return;
        };
        let into = self.owners.last_mut();
        match (done, into) {
            (Owner::Item(item), Some(Owner::Attachment(a))) => a.item = Some(item),
            (Owner::Item(item), Some(Owner::Item(parent))) => parent.embedded.push(item),
            (Owner::Attachment(a), Some(Owner::Item(parent))) => {
                parent.attachments.extend(a.id);
                parent.embedded.extend(a.item);
            }
            (Owner::Item(item), _) => {
                if let Some(m) = self.message.as_mut() {
                    m.items.push(item);
                }
            }
            (Owner::Attachment(a), _) => {
                if let Some(m) = self.message.as_mut() {
                    m.attachments.push(a);
                }
            }
        }
    }

    fn file_folder(&mut self, at: usize) {
        let Some(mut f) = self.folder.take() else {
            return;
        };
        // Inside a sync change the change is cut whole, when it ends.
        self.folder_in_change = self.stack.last().map(|o| o.ctx) == Some(Ctx::Change);
        if !self.folder_in_change {
            f.span.end = at;
        }
        if let Some(m) = self.message.as_mut() {
            m.folders.push(f);
        }
    }
}

/// An element's name as written, for a reason a person reads.
/// A name for a message: its first 100 bytes, a character cut there shown as U+FFFD.
fn shown(raw: &str) -> String {
    let raw = &raw.as_bytes()[..raw.len().min(100)];
    String::from_utf8_lossy(raw).into_owned()
}

fn escape(text: &str) -> String {
    quick_xml::escape::escape(text).into_owned()
}

/// What to do with one response message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Replace the message with an access-denied error that gives this reason.
    pub withhold: Option<String>,
    /// Folders (positions in the message's `folders`) to cut from its listing.
    pub cut: Vec<usize>,
}

impl Verdict {
    pub fn passes(&self) -> bool {
        self.withhold.is_none() && self.cut.is_empty()
    }
}

/// The response with each withheld message replaced by an access-denied error message of
/// the same name, and the folders cut from listings removed.
pub fn rewrite(bytes: &[u8], response: &Response, verdicts: &[Verdict]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut from = 0;
    for (m, v) in response.messages.iter().zip(verdicts) {
        let cuts: Option<Vec<Range<usize>>> = v
            .cut
            .iter()
            .map(|&i| m.folders.get(i).map(|f| f.span.clone()))
            .collect();
        // Cuts that do not nest in order inside the message withhold it whole instead.
        let cuts = cuts.filter(|c| in_order(c, &m.span));
        match (&v.withhold, cuts) {
            (None, Some(cuts)) => {
                for c in cuts {
                    out.extend_from_slice(&bytes[from..c.start]);
                    from = c.end;
                }
            }
            (why, _) => {
                let why = why
                    .as_deref()
                    .unwrap_or("a folder listing could not be cut");
                out.extend_from_slice(&bytes[from..m.span.start]);
                out.extend_from_slice(denied_message(&m.name, why).as_bytes());
                from = m.span.end;
            }
        }
    }
    out.extend_from_slice(&bytes[from..]);
    out
}

fn in_order(cuts: &[Range<usize>], within: &Range<usize>) -> bool {
    let mut at = within.start;
    cuts.iter().all(|c| {
        let ok = c.start >= at && c.end >= c.start && c.end <= within.end;
        at = c.end;
        ok
    })
}

fn denied_message(name: &str, why: &str) -> String {
    format!(
        "<m:{name} xmlns:m=\"{MESSAGES_NS}\" ResponseClass=\"Error\">\
         <m:MessageText>{text}</m:MessageText>\
         <m:ResponseCode>ErrorAccessDenied</m:ResponseCode>\
         <m:DescriptiveLinkKey>0</m:DescriptiveLinkKey></m:{name}>",
        text = escape(&format!("ewsgate: {why}")),
    )
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
