//! EWS SOAP, read with a streaming XML parser (quick-xml) under strict limits: exact
//! namespaces, no DTDs, no entities beyond XML's five and character references, bounded
//! depth and element count, exactly one operation in `soap:Body`.
//!
//! A request is read whole when it fits in the classification buffer. A larger one is read
//! up to the buffer and must then be inside bulk content (`t:Content`, `t:MimeContent`,
//! `m:Data`): the rest of the stream is checked by [`Tail`], which admits only base64 and
//! the closing tags of what is open, so nothing the policy has not read can follow.

use quick_xml::events::{BytesStart, Event};
use smallvec::SmallVec;
use thiserror::Error;

use crate::model::settings::SoapLimits as Limits;

mod lexer;
mod names;
mod response;
mod schema;
#[doc(hidden)]
pub use lexer::agrees_with_quick_xml;
pub use response::{
    fault, parse_response, rewrite, Attachment, FolderInfo, Item, Message, Response, Verdict,
};

pub const SOAP_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
pub const MESSAGES_NS: &str = "http://schemas.microsoft.com/exchange/services/2006/messages";
pub const TYPES_NS: &str = "http://schemas.microsoft.com/exchange/services/2006/types";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SoapError {
    #[error("not well-formed XML: {0}")]
    Xml(String),
    #[error("a DTD is not accepted")]
    Dtd,
    #[error("a processing instruction is not accepted")]
    ProcessingInstruction,
    #[error("entity reference &{0}; is not accepted")]
    Entity(String),
    #[error("nesting deeper than {0}")]
    TooDeep(usize),
    #[error("more than {0} elements")]
    TooManyElements(usize),
    #[error("the document is not a SOAP 1.1 envelope")]
    NotEnvelope,
    #[error("unexpected element {0}")]
    Unexpected(String),
    #[error("element {0} is in no EWS namespace")]
    Namespace(String),
    #[error("soap:Body holds no operation")]
    NoOperation,
    #[error("soap:Body holds more than one operation")]
    TwoOperations,
    #[error("text where only elements belong")]
    StrayText,
    #[error("the document ends early")]
    Truncated,
    #[error("the request is larger than the classification buffer outside bulk content")]
    TooLarge,
    #[error("bulk content holds more than base64")]
    BulkContent,
    #[error("something follows bulk content other than the closing tags")]
    AfterBulk,
}

impl SoapError {
    /// A short audit reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SoapError::Xml(_) => "soap_malformed",
            SoapError::Dtd => "soap_dtd",
            SoapError::ProcessingInstruction => "soap_processing_instruction",
            SoapError::Entity(_) => "soap_entity",
            SoapError::TooDeep(_) => "soap_too_deep",
            SoapError::TooManyElements(_) => "soap_too_many_elements",
            SoapError::NotEnvelope => "soap_not_envelope",
            SoapError::Unexpected(_) => "soap_unexpected_element",
            SoapError::Namespace(_) => "soap_namespace",
            SoapError::NoOperation => "soap_no_operation",
            SoapError::TwoOperations => "soap_two_operations",
            SoapError::StrayText => "soap_stray_text",
            SoapError::Truncated => "soap_truncated",
            SoapError::TooLarge => "soap_too_large",
            SoapError::BulkContent | SoapError::AfterBulk => "soap_bulk_content",
        }
    }
}

/// A folder a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Folder {
    /// `t:DistinguishedFolderId@Id`, with the `t:Mailbox` it names (delegate access).
    Distinguished { id: String, mailbox: Option<String> },
    /// `t:FolderId@Id`: opaque.
    Opaque(String),
}

/// What an EWS request shows about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub operation: String,
    /// `t:ExchangeImpersonation/t:ConnectingSID`'s value.
    pub impersonation: Option<String>,
    pub folders: Vec<Folder>,
    /// Item IDs: `ItemId`, `ParentItemId`, `ReferenceItemId`, occurrence and master IDs.
    pub items: Vec<String>,
    pub attachments: Vec<String>,
    /// Elements that show a data type: `CalendarView`, `ContactsView`, occurrence IDs, and
    /// the item elements a `CreateItem` or `UpdateItem` carries.
    pub shown: Vec<String>,
    /// `t:ItemClass` values the request itself carries.
    pub item_classes: Vec<String>,
    /// The operation's `MessageDisposition` sends mail.
    pub sends_mail: bool,
    /// A meeting attribute (`SendMeetingInvitations`, `SendMeetingInvitationsOrCancellations`,
    /// `SendMeetingCancellations`) sends meeting requests or cancellations.
    pub sends_meetings: bool,
    /// Mailboxes the request names as the one to act on, lower-case: a distinguished
    /// folder's `t:Mailbox`, `t:AlternateId@Mailbox`, the mailbox of a delegate, out-of-office
    /// or inbox-rules operation. [`UNNAMED`] stands for a `t:Mailbox` without an address.
    pub mailboxes: Vec<String>,
    /// The request was longer than the buffer; the rest is bulk content for [`Tail`].
    pub tail: Option<Tail>,
}

impl Request {
    /// Whether the operation sends mail of any kind.
    pub fn sends(&self) -> bool {
        self.sends_mail || self.sends_meetings
    }

    /// IDs that name items, the ones attachments hang from included.
    pub fn item_count(&self) -> usize {
        self.items.len() + self.attachments.len()
    }
}

/// Where in the envelope the parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ns {
    Soap,
    Messages,
    Types,
    Other,
}

struct Open<'i> {
    ns: Ns,
    local: &'i str,
    /// The name as written, for the closing tags a [`Tail`] expects.
    raw: &'i str,
}

/// Elements whose text is bulk base64 and may run past the buffer.
fn is_bulk(ns: Ns, local: &str) -> bool {
    matches!(
        (ns, local),
        (Ns::Types, "Content") | (Ns::Types, "MimeContent") | (Ns::Messages, "Data")
    )
}

#[cfg(test)]
pub(crate) fn namespace(r: &quick_xml::name::ResolveResult) -> Ns {
    use quick_xml::name::ResolveResult;
    match r {
        ResolveResult::Bound(n) if n.as_ref() == SOAP_NS => Ns::Soap,
        ResolveResult::Bound(n) if n.as_ref() == MESSAGES_NS => Ns::Messages,
        ResolveResult::Bound(n) if n.as_ref() == TYPES_NS => Ns::Types,
        _ => Ns::Other,
    }
}

pub(crate) fn attr(e: &BytesStart, name: &str) -> Result<Option<String>, SoapError> {
    match first_attribute(e.attributes_raw(), name) {
        Some(value) => Ok(Some(value.to_owned())),
        None => checked_attr(e, name),
    }
}

/// quick-xml's lookup: duplicates refused, the value normalised.
fn checked_attr(e: &BytesStart, name: &str) -> Result<Option<String>, SoapError> {
    match e.try_get_attribute(name) {
        Ok(Some(a)) => a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map(|v| Some(v.into_owned()))
            .map_err(|e| SoapError::Xml(e.to_string())),
        Ok(None) => Ok(None),
        Err(e) => Err(SoapError::Xml(e.to_string())),
    }
}

/// The value of attribute `name` when it comes first in a tag, written `name="value"` (or
/// with single quotes), and needs no normalisation (no reference, no tab or line end), as
/// Exchange and its clients write an ID: quick-xml reads it so, with nothing before it that
/// could be malformed or a duplicate, and it costs a fraction of quick-xml's checked
/// iterator. `None` sends the caller the long way, which gives quick-xml's answer.
fn first_attribute<'a>(raw: &'a str, name: &str) -> Option<&'a str> {
    let rest = raw
        .trim_start_matches([' ', '\t', '\r', '\n'])
        .strip_prefix(name)?
        .strip_prefix('=')?;
    let (quote, value) = match rest.as_bytes().first()? {
        q @ (b'"' | b'\'') => (*q, rest.get(1..)?),
        _ => return None,
    };
    // The value ends at its quote; a reference, tab or line end before it takes the long way.
    let stop = lexer::first_of(value.as_bytes(), |c| {
        lexer::bits(c, quote)
            | lexer::bits(c, b'&')
            | lexer::bits(c, b'\t')
            | lexer::bits(c, b'\r')
            | lexer::bits(c, b'\n')
    })?;
    (value.as_bytes().get(stop) == Some(&quote)).then(|| value.get(..stop))?
}

/// A UTF-8 byte-order mark's length. quick-xml skips one without counting it in its
/// positions, so the parsers skip it themselves: positions then index the document.
pub(crate) fn bom_len(bytes: &[u8]) -> usize {
    if bytes.starts_with(b"\xef\xbb\xbf") {
        3
    } else {
        0
    }
}

/// A reader error that only says the document stops inside markup.
fn cut_in_markup(e: &quick_xml::Error) -> bool {
    use quick_xml::errors::SyntaxError as S;
    matches!(
        e,
        quick_xml::Error::Syntax(
            S::UnclosedTag
                | S::UnclosedComment
                | S::UnclosedCData
                | S::UnclosedPI
                | S::UnclosedXmlDecl
                | S::UnclosedDoctype
                | S::UnclosedSingleQuotedAttributeValue
                | S::UnclosedDoubleQuotedAttributeValue
                | S::InvalidBangMarkup
        )
    )
}

/// Parses a request. `complete` is false when `bytes` is only the start of a longer body.
pub fn parse_request(bytes: &[u8], complete: bool, limits: Limits) -> Result<Request, SoapError> {
    let mut p = RequestParser {
        out: Request::default(),
        stack: SmallVec::new(),
        target: None,
        text: String::new(),
        elements: 0,
        seen_header: false,
        seen_body: false,
        limits,
    };
    // The reader skips a byte-order mark; its positions start after it.
    let mut reader = names::NsReader::new(bytes);
    loop {
        let event = match reader.read_event() {
            Ok(event) => event,
            // Cut inside markup: a longer body, and markup is never bulk content. Any other
            // error is one, wherever it is: the bytes after it would go unread.
            Err(e) if !complete && cut_in_markup(&e) => return Err(SoapError::TooLarge),
            Err(e) => return Err(SoapError::Xml(e.to_string())),
        };
        match event {
            Event::Start(e) => p.start(reader.ns(), &e, reader.tag_name(), false)?,
            Event::Empty(e) => p.start(reader.ns(), &e, reader.tag_name(), true)?,
            Event::End(_) => p.end()?,
            // Blank text is skipped before its line ends are normalised: mostly it is
            // indentation, and it stays blank either way.
            Event::Text(t) if is_blank(t.as_bytes()) => {}
            Event::Text(t) => p.text(&t.xml10_content())?,
            Event::CData(t) => p.text(&t)?,
            Event::GeneralRef(r) => p.reference(&r)?,
            Event::Comment(_) | Event::Decl(_) => {}
            Event::PI(_) => return Err(SoapError::ProcessingInstruction),
            Event::DocType(_) => return Err(SoapError::Dtd),
            Event::Eof if !complete => return p.cut(),
            Event::Eof => return p.finish(),
        }
    }
}

/// Text of XML white space alone (these four bytes; much cheaper than trimming Unicode
/// white space). Runs of spaces, most of a pretty-printed or padded request's text, are
/// compared eight bytes at a time.
pub(crate) fn is_blank(t: &[u8]) -> bool {
    let blank = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let (words, rest) = t.as_chunks::<8>();
    words
        .iter()
        .all(|w| u64::from_ne_bytes(*w) == SPACES || w.iter().all(blank))
        && rest.iter().all(blank)
}

/// Eight spaces as one word: padding and indentation are checked a word at a time.
const SPACES: u64 = u64::from_ne_bytes([b' '; 8]);

/// What a mailbox element that gives no address is recorded as.
pub const UNNAMED: &str = "(mailbox without an address)";

/// Whether an operation's attributes send mail. `MessageDisposition` (messages and response
/// objects) sends unless `SaveOnly`; the meeting attributes send unless `SendToNone`. A value
/// that is not one of the documented ones counts as sending: Exchange refuses it anyway.
fn sends(e: &BytesStart) -> Result<(bool, bool), SoapError> {
    // Most operations carry no attributes: four lookups would each set up an iterator.
    if is_blank(e.attributes_raw().as_bytes()) {
        return Ok((false, false));
    }
    let sends_unless = |name: &str, quiet: &str| -> Result<bool, SoapError> {
        match e.try_get_attribute(name) {
            Ok(Some(a)) => Ok(a.value != quiet),
            Ok(None) => Ok(false),
            Err(err) => Err(SoapError::Xml(err.to_string())),
        }
    };
    let mail = sends_unless("MessageDisposition", "SaveOnly")?;
    let mut meetings = false;
    for name in [
        "SendMeetingInvitations",
        "SendMeetingInvitationsOrCancellations",
        "SendMeetingCancellations",
    ] {
        meetings |= sends_unless(name, "SendToNone")?;
    }
    Ok((mail, meetings))
}

/// The three operations whose body element is named `<operation>Request`.
fn operation_name(element: &str) -> &str {
    match element {
        "GetUserAvailabilityRequest"
        | "GetUserOofSettingsRequest"
        | "SetUserOofSettingsRequest" => element.trim_end_matches("Request"),
        _ => element,
    }
}

struct RequestParser<'i> {
    out: Request,
    /// Open elements; on the stack up to EWS's usual depth, about eight.
    stack: SmallVec<[Open<'i>; 16]>,
    /// An open element that names the mailbox to act on: its depth, and the address
    /// read from it so far.
    target: Option<(usize, Option<String>)>,
    /// Text of the innermost element, for the few whose text matters.
    text: String,
    elements: usize,
    seen_header: bool,
    seen_body: bool,
    limits: Limits,
}

impl<'i> RequestParser<'i> {
    fn in_bulk(&self) -> bool {
        self.stack.last().is_some_and(|o| is_bulk(o.ns, o.local))
    }

    fn start(
        &mut self,
        ns: Ns,
        e: &BytesStart,
        (raw, local): (&'i str, &'i str),
        empty: bool,
    ) -> Result<(), SoapError> {
        self.elements += 1;
        if self.elements > self.limits.elements {
            return Err(SoapError::TooManyElements(self.limits.elements));
        }
        if self.stack.len() >= self.limits.depth {
            return Err(SoapError::TooDeep(self.limits.depth));
        }
        let shown = || e.name().into_inner().to_string();
        match self.stack.len() {
            0 if ns == Ns::Soap && local == "Envelope" => {}
            0 => return Err(SoapError::NotEnvelope),
            1 if ns == Ns::Soap && local == "Header" && !self.seen_header && !self.seen_body => {
                self.seen_header = true
            }
            1 if ns == Ns::Soap && local == "Body" && !self.seen_body => self.seen_body = true,
            1 => return Err(SoapError::Unexpected(shown())),
            2 if self.section() == "Body" => {
                if !self.out.operation.is_empty() {
                    return Err(SoapError::TwoOperations);
                }
                if ns != Ns::Messages {
                    return Err(SoapError::Namespace(shown()));
                }
                self.out.operation = operation_name(local).to_string();
                (self.out.sends_mail, self.out.sends_meetings) = sends(e)?;
            }
            _ if self.section() == "Body" => {
                if ns != Ns::Messages && ns != Ns::Types {
                    return Err(SoapError::Namespace(shown()));
                }
                if self.names_mailbox(ns, local) {
                    self.target = Some((self.stack.len(), None));
                }
                self.operation_element(ns, local, e)?;
            }
            _ => {}
        }
        self.text.clear();
        if !empty {
            self.stack.push(Open { ns, local, raw });
        } else {
            self.closed(ns, local);
        }
        Ok(())
    }

    /// `Header` or `Body`, when inside one.
    fn section(&self) -> &str {
        self.stack.get(1).map_or("", |o| o.local)
    }

    fn parent(&self) -> Option<&str> {
        self.stack.last().map(|o| o.local)
    }

    /// A `Mailbox` that says whose mailbox to act on: inside a distinguished folder ID, or
    /// right inside the operation (the delegate and out-of-office operations), except
    /// `ExpandDL`'s, which names the list to expand.
    fn names_mailbox(&self, ns: Ns, local: &str) -> bool {
        if local != "Mailbox" || self.target.is_some() {
            return false;
        }
        match self.stack.last() {
            Some(p) if p.ns == Ns::Types && p.local == "DistinguishedFolderId" => ns == Ns::Types,
            Some(_) if self.stack.len() == 3 => self.out.operation != "ExpandDL",
            _ => false,
        }
    }

    fn operation_element(&mut self, ns: Ns, local: &str, e: &BytesStart) -> Result<(), SoapError> {
        let out = &mut self.out;
        match local {
            "DistinguishedFolderId" => {
                let id = attr(e, "Id")?.unwrap_or_default();
                out.folders
                    .push(Folder::Distinguished { id, mailbox: None });
            }
            "FolderId" => out
                .folders
                .push(Folder::Opaque(attr(e, "Id")?.unwrap_or_default())),
            "ItemId" | "ParentItemId" | "ReferenceItemId" => {
                out.items.push(attr(e, "Id")?.unwrap_or_default())
            }
            "OccurrenceItemId" => {
                out.items
                    .push(attr(e, "RecurringMasterId")?.unwrap_or_default());
                out.shown.push(local.into());
            }
            "RecurringMasterItemId" => {
                out.items.push(attr(e, "OccurrenceId")?.unwrap_or_default());
                out.shown.push(local.into());
            }
            "AttachmentId" => out.attachments.push(attr(e, "Id")?.unwrap_or_default()),
            // `ConvertId` names the mailbox each ID belongs to.
            "AlternateId" if ns == Ns::Types => {
                if let Some(m) = attr(e, "Mailbox")? {
                    out.mailboxes.push(m.trim().to_ascii_lowercase());
                }
            }
            "CalendarView" | "ContactsView" if ns == Ns::Messages => out.shown.push(local.into()),
            _ => {}
        }
        // Item elements (and response objects) under `Items` or an item change.
        if ns == Ns::Types && matches!(self.parent(), Some("Items" | "ItemChange" | "Updates")) {
            self.out.shown.push(local.into());
        }
        if ns == Ns::Types && self.parent() == Some("SetItemField") {
            self.out.shown.push(local.into());
        }
        Ok(())
    }

    fn end(&mut self) -> Result<(), SoapError> {
        let Some(open) = self.stack.pop() else {
            return Err(SoapError::Xml("unmatched end tag".into()));
        };
        self.closed(open.ns, open.local);
        self.text.clear();
        Ok(())
    }

    /// An element ended: keep the text of the few that matter.
    fn closed(&mut self, ns: Ns, local: &str) {
        let text = self.text.trim();
        let depth = self.stack.len();
        if let Some((at, address)) = self.target.as_mut() {
            if depth == *at + 1 && matches!(local, "EmailAddress" | "Address") && !text.is_empty() {
                *address = Some(text.to_ascii_lowercase());
            } else if depth == *at {
                let mailbox = address.take().unwrap_or_else(|| UNNAMED.to_string());
                self.target = None;
                self.named_mailbox(mailbox);
                return;
            }
        }
        // The inbox-rules operations name their mailbox by address alone.
        if ns == Ns::Messages && local == "MailboxSmtpAddress" && depth == 3 {
            let mailbox = if text.is_empty() {
                UNNAMED.to_string()
            } else {
                text.to_ascii_lowercase()
            };
            self.out.mailboxes.push(mailbox);
            return;
        }
        if ns != Ns::Types || text.is_empty() {
            return;
        }
        let under = |name: &str| self.stack.iter().any(|o| o.local == name);
        match local {
            "PrimarySmtpAddress" | "SmtpAddress" | "PrincipalName" | "SID"
                if self.section() == "Header" && under("ExchangeImpersonation") =>
            {
                self.out.impersonation = Some(text.to_string());
            }
            "ItemClass" if self.section() == "Body" => {
                self.out.item_classes.push(text.to_string());
            }
            _ => {}
        }
    }

    /// A mailbox element ended: the mailbox it names, and the folder it belongs to.
    fn named_mailbox(&mut self, mailbox: String) {
        if self.parent() == Some("DistinguishedFolderId") {
            if let Some(Folder::Distinguished { mailbox: m, .. }) = self.out.folders.last_mut() {
                *m = Some(mailbox.clone());
            }
        }
        self.out.mailboxes.push(mailbox);
    }

    fn text(&mut self, t: &str) -> Result<(), SoapError> {
        if is_blank(t.as_bytes()) {
            return Ok(());
        }
        // Only elements inside the operation or a header may hold text.
        if self.stack.len() < 3 {
            return Err(SoapError::StrayText);
        }
        if self.text.len() < 1024 && !self.in_bulk() {
            self.text.push_str(t);
        }
        Ok(())
    }

    fn reference(&mut self, r: &quick_xml::events::BytesRef) -> Result<(), SoapError> {
        let c = match r.as_ref() {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "apos" => '\'',
            "quot" => '"',
            _ => match r.resolve_char_ref() {
                Ok(Some(c)) => c,
                _ => return Err(SoapError::Entity(r.to_string())),
            },
        };
        self.text(c.encode_utf8(&mut [0; 4]))
    }

    fn finish(mut self) -> Result<Request, SoapError> {
        if !self.stack.is_empty() {
            return Err(SoapError::Truncated);
        }
        if self.out.operation.is_empty() {
            return Err(if self.seen_body {
                SoapError::NoOperation
            } else {
                SoapError::NotEnvelope
            });
        }
        self.out.tail = None;
        Ok(self.out)
    }

    /// The buffer ended before the body did: acceptable only inside bulk content.
    fn cut(mut self) -> Result<Request, SoapError> {
        if !self.in_bulk() || self.out.operation.is_empty() {
            return Err(SoapError::TooLarge);
        }
        let closing = self
            .stack
            .iter()
            .rev()
            .map(|o| [b"</".as_slice(), o.raw.as_bytes(), b">"].concat())
            .collect();
        self.out.tail = Some(Tail::new(closing));
        Ok(self.out)
    }
}

/// Checks the part of a request body past the classification buffer: base64 (and white
/// space) to the end of the bulk element, then exactly the closing tags of every open
/// element, then nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    closing: Vec<Vec<u8>>,
    /// Which closing tag, and how far into it; `None` while still in base64.
    at: Option<(usize, usize)>,
}

impl Tail {
    fn new(closing: Vec<Vec<u8>>) -> Tail {
        Tail { closing, at: None }
    }

    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), SoapError> {
        for &b in bytes {
            self.step(b)?;
        }
        Ok(())
    }

    fn step(&mut self, b: u8) -> Result<(), SoapError> {
        let space = matches!(b, b' ' | b'\t' | b'\r' | b'\n');
        match self.at {
            None if b == b'<' => self.at = Some((0, 1)),
            None if space || b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=') => {}
            None => return Err(SoapError::BulkContent),
            Some((_, 0)) if space => {}
            Some((tag, pos)) => {
                let want = self.closing.get(tag).ok_or(SoapError::AfterBulk)?;
                if want.get(pos) != Some(&b) {
                    return Err(SoapError::AfterBulk);
                }
                self.at = Some(if pos + 1 == want.len() {
                    (tag + 1, 0)
                } else {
                    (tag, pos + 1)
                });
            }
        }
        Ok(())
    }

    /// The body ended: every closing tag must have been seen.
    pub fn finish(&self) -> Result<(), SoapError> {
        match self.at {
            Some((tag, 0)) if tag == self.closing.len() => Ok(()),
            _ => Err(SoapError::Truncated),
        }
    }
}

/// The seeds of both SOAP fuzz targets, for the tests that hold a reader to quick-xml's.
#[cfg(test)]
pub(crate) fn fuzz_seeds() -> Vec<Vec<u8>> {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut seeds = Vec::new();
    for target in ["soap_request", "soap_response"] {
        let Ok(dir) = std::fs::read_dir(corpus.join(target)) else {
            continue;
        };
        seeds.extend(dir.flatten().filter_map(|e| std::fs::read(e.path()).ok()));
    }
    assert!(seeds.len() > 20, "only {} seeds found", seeds.len());
    seeds
}

#[cfg(test)]
mod tests;
