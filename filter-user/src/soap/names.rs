//! Namespace resolution for the SOAP parsers: the [`Lexer`]'s events, with each prefix a
//! document declares resolved to one of the three EWS namespaces (or to none of them) once,
//! where it is declared.
//!
//! quick-xml's `NsReader` keeps every binding's text, scans the attributes of every element
//! for declarations and compares the namespace text again wherever it is used; it was a
//! seventh of a request's cost. The rules are the same here (the tests hold the two equal
//! element by element): the nearest declaration wins, `xmlns:p=""` and undeclared prefixes
//! bind to nothing, `xml` and `xmlns` cannot be rebound, at most 128 bindings in scope.
//! Only the answer differs: an [`Ns`], compared once, and a tag that does not contain
//! `xmlns` at all is not scanned for declarations.

use quick_xml::{
    events::{BytesStart, Event},
    name::NamespaceError,
};

use smallvec::SmallVec;

use super::{
    lexer::{bits, first_of, Lexer, TagName},
    Ns, MESSAGES_NS, SOAP_NS, TYPES_NS,
};

/// As many bindings in scope as quick-xml allows by default.
const MAX_BINDINGS: usize = 128;
const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";
const XMLNS_NS: &str = "http://www.w3.org/2000/xmlns/";

/// A reader of a document held whole, giving each element's namespace with it.
pub(crate) struct NsReader<'i> {
    reader: Lexer<'i>,
    /// Declarations in scope, innermost last; an empty prefix is the default namespace.
    /// An EWS document declares three or four, on its first elements: they stay on the
    /// stack, as do their prefixes.
    bindings: SmallVec<[Binding; 8]>,
    /// The bindings' prefixes, one after the other.
    prefixes: SmallVec<[u8; 32]>,
    /// Elements open, the one just read included.
    level: u16,
    /// The last event closed an element (an end tag, or an empty one): its scope ends
    /// before the next event is read.
    pending_pop: bool,
    /// The name of the element the last start or empty tag opened, as written and as its
    /// local part, borrowed from the document.
    name: (&'i str, &'i str),
    /// The namespace of the element the last event opened.
    ns: Ns,
}

struct Binding {
    /// Where its prefix is in `prefixes`.
    start: usize,
    len: usize,
    ns: Ns,
    level: u16,
}

fn ews_namespace(value: &[u8]) -> Ns {
    match value {
        v if v == SOAP_NS.as_bytes() => Ns::Soap,
        v if v == MESSAGES_NS.as_bytes() => Ns::Messages,
        v if v == TYPES_NS.as_bytes() => Ns::Types,
        _ => Ns::Other,
    }
}

impl<'i> NsReader<'i> {
    pub(crate) fn new(bytes: &'i [u8]) -> NsReader<'i> {
        NsReader {
            reader: Lexer::new(bytes),
            bindings: SmallVec::new(),
            prefixes: SmallVec::new(),
            level: 0,
            pending_pop: false,
            name: ("", ""),
            ns: Ns::Other,
        }
    }

    /// Bytes read so far.
    pub(crate) fn buffer_position(&self) -> u64 {
        self.reader.position() as u64
    }

    /// The next event; [`NsReader::ns`] gives the namespace of the element a start or empty
    /// tag opens. Inlined into the parsers' loops, as the lexer's step is into it: each
    /// event is then built where the loop reads it, instead of being copied out of two
    /// frames, the namespace beside it (`perf annotate` showed the loads of those copies
    /// stalling on the stores just made to them).
    #[inline(always)]
    pub(crate) fn read_event(&mut self) -> quick_xml::Result<Event<'i>> {
        if self.pending_pop {
            self.pop();
        }
        let event = self.reader.read_event()?;
        self.ns = match &event {
            Event::Start(e) => {
                self.push(e)?;
                self.resolve()
            }
            Event::Empty(e) => {
                self.push(e)?;
                self.pending_pop = true;
                self.resolve()
            }
            // No parser asks an end tag's namespace: it closes what the start opened.
            Event::End(_) => {
                self.pending_pop = true;
                Ns::Other
            }
            _ => Ns::Other,
        };
        Ok(event)
    }

    /// The namespace of the element the last event opened (`Ns::Other` after any other
    /// event).
    pub(crate) fn ns(&self) -> Ns {
        self.ns
    }

    /// The name of the element the last start or empty tag opened: as written, and its
    /// local part (after the last `:`).
    pub(crate) fn tag_name(&self) -> (&'i str, &'i str) {
        self.name
    }

    fn pop(&mut self) {
        self.pending_pop = false;
        self.level = self.level.saturating_sub(1);
        let level = self.level;
        while let Some(b) = self.bindings.last() {
            if b.level <= level {
                break;
            }
            self.prefixes.truncate(b.start);
            self.bindings.pop();
        }
    }

    /// An element opens a scope with the declarations among its attributes.
    fn push(&mut self, e: &BytesStart<'i>) -> Result<(), NamespaceError> {
        self.level = self
            .level
            .checked_add(1)
            .ok_or(NamespaceError::TooDeeplyNested(usize::from(u16::MAX)))?;
        let raw = e.attributes_raw().as_bytes();
        if !declares(raw) {
            return Ok(());
        }
        for (key, value) in attributes(raw) {
            let prefix = match key.strip_prefix(XMLNS) {
                Some([]) => &[][..],
                Some([b':', prefix @ ..]) => prefix,
                _ => continue,
            };
            self.declare(prefix, value)?;
        }
        Ok(())
    }

    /// Read as bytes: the tag's text is UTF-8 and every cut falls on an ASCII byte, so only
    /// an error's message needs the text back.
    fn declare(&mut self, prefix: &[u8], value: &[u8]) -> Result<(), NamespaceError> {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let reserved = |ns: &str| value == ns.as_bytes();
        match prefix {
            b"xml" if reserved(XML_NS) => return Ok(()),
            b"xml" => return Err(NamespaceError::InvalidXmlPrefixBind(text(value))),
            b"xmlns" => return Err(NamespaceError::InvalidXmlnsPrefixBind(text(value))),
            p if !p.is_empty() && reserved(XML_NS) => {
                return Err(NamespaceError::InvalidPrefixForXml(text(p)))
            }
            p if !p.is_empty() && reserved(XMLNS_NS) => {
                return Err(NamespaceError::InvalidPrefixForXmlns(text(p)))
            }
            _ => {}
        }
        if self.bindings.len() >= MAX_BINDINGS {
            return Err(NamespaceError::TooManyBindings(MAX_BINDINGS));
        }
        let start = self.prefixes.len();
        self.prefixes.extend_from_slice(prefix);
        self.bindings.push(Binding {
            start,
            len: prefix.len(),
            ns: ews_namespace(value),
            level: self.level,
        });
        Ok(())
    }

    /// The namespace of the element the lexer just read a start or empty tag of: its
    /// prefix's nearest binding, or the default namespace's when it has none. `:name` (an
    /// empty prefix) binds to nothing. The name is kept for [`NsReader::tag_name`], its local
    /// part after the last colon; the lexer found the colons as it read the tag.
    fn resolve(&mut self) -> Ns {
        let TagName { name, colons } = self.reader.tag();
        let local = colons.and_then(|(_, last)| name.get(last + 1..));
        self.name = (name, local.unwrap_or(name));
        let prefix = match colons {
            Some((0, _)) => return Ns::Other,
            Some((first, _)) => name.as_bytes().get(..first).unwrap_or_default(),
            None => &[][..],
        };
        let prefixes = &self.prefixes[..];
        self.bindings
            .iter()
            .rev()
            // Compared byte by byte: prefixes are a byte or a few, where a call to `memcmp`
            // costs more than the comparison.
            .find(|b| {
                prefixes
                    .get(b.start..b.start + b.len)
                    .is_some_and(|p| p.iter().eq(prefix))
            })
            .map_or(Ns::Other, |b| b.ns)
    }
}

/// A tag's attributes as raw keys and values, up to the first malformed one: as quick-xml's
/// attribute iterator reads them with its checks off, which is how it reads declarations,
/// at a tenth of its cost (about 500 instructions an attribute). A key is its first byte and
/// what follows up to `=` or white space; white space may surround the `=`; the value is
/// quoted.
fn attributes(b: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut at = 0;
    let skip_space = |at: &mut usize| {
        while b.get(*at).is_some_and(|&c| is_space(c)) {
            *at += 1;
        }
    };
    std::iter::from_fn(move || {
        skip_space(&mut at);
        let key = at;
        if key == b.len() {
            return None;
        }
        // The first byte belongs to the key whatever it is, `=` too.
        at += 1;
        let key_rest = b.get(at..).unwrap_or_default();
        at += first_of(key_rest, key_ends).unwrap_or(key_rest.len());
        let key_end = at;
        skip_space(&mut at);
        if b.get(at) != Some(&b'=') {
            at = b.len();
            return None;
        }
        at += 1;
        skip_space(&mut at);
        let quote = match b.get(at) {
            Some(&q @ (b'"' | b'\'')) => q,
            _ => {
                at = b.len();
                return None;
            }
        };
        let value = at + 1;
        let found = b.get(value..).and_then(|v| first_of(v, |c| bits(c, quote)));
        let Some(len) = found else {
            at = b.len();
            return None;
        };
        at = value + len + 1;
        Some((b.get(key..key_end)?, b.get(value..value + len)?))
    })
}

/// The bytes of a chunk that end an attribute's key: `=` or white space.
fn key_ends(c: &[u8; 16]) -> u32 {
    bits(c, b'=') | bits(c, b' ') | bits(c, b'\t') | bits(c, b'\r') | bits(c, b'\n')
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

/// Whether a tag's attributes may declare a namespace: `xmlns` appears in them. Each `x` is
/// found sixteen bytes at a time and what follows it looked at: `memchr` costs more in
/// setting up than these few bytes take, and a byte at a time cost 300 instructions on an
/// item's 150-byte ID.
fn declares(attributes: &[u8]) -> bool {
    let mut at = 0;
    while let Some(rest) = attributes.get(at..).filter(|r| r.len() >= XMLNS.len()) {
        let Some(x) = first_of(rest, |c| bits(c, b'x')) else {
            return false;
        };
        if rest[x..].starts_with(XMLNS) {
            return true;
        }
        at += x + 1;
    }
    false
}

const XMLNS: &[u8] = b"xmlns";

#[cfg(test)]
mod tests {
    use quick_xml::events::Event;

    use super::NsReader;
    use crate::soap::{namespace, Ns};

    /// Reads `doc` with quick-xml's `NsReader` and with ours side by side: the same events,
    /// the same namespaces, the same errors, to the same end. A document type declaration
    /// is read no further by ours (the parsers refuse it), and a UTF-8 error names its
    /// place in the document rather than in the event: those refuse on both sides alike.
    fn same_as_quick_xml(doc: &[u8]) {
        let mut theirs = quick_xml::NsReader::from_reader(doc);
        theirs.config_mut().check_end_names = true;
        let mut ours = NsReader::new(doc);
        for _ in 0..100_000 {
            let a = theirs
                .read_resolved_event()
                .map(|(ns, e)| (namespace(&ns), e));
            let b = ours.read_event().map(|e| (ours.ns(), e));
            let shown = String::from_utf8_lossy(doc);
            match (a, b) {
                (Ok((_, Event::DocType(_))), Ok((_, Event::DocType(_))))
                | (Err(_), Ok((_, Event::DocType(_)))) => return,
                (Err(quick_xml::Error::Encoding(_)), Err(quick_xml::Error::Encoding(_))) => return,
                (Ok((ns_a, a)), Ok((ns_b, b))) => {
                    let ns_a = if matches!(a, Event::Start(_) | Event::Empty(_)) {
                        ns_a
                    } else {
                        Ns::Other
                    };
                    assert_eq!((ns_a, &a), (ns_b, &b), "in {shown}");
                    // The name kept for the parsers is the element's whole, and its local
                    // part follows the last colon (quick-xml's `local_name` the first).
                    if let Event::Start(e) | Event::Empty(e) = &a {
                        let (name, local) = ours.tag_name();
                        let after_last = name.rsplit(':').next().unwrap_or_default();
                        assert_eq!(name, e.name().into_inner(), "in {shown}");
                        assert_eq!(local, after_last, "in {shown}");
                    }
                    if a == Event::Eof {
                        return;
                    }
                }
                (Err(a), Err(b)) => {
                    assert_eq!(a.to_string(), b.to_string(), "in {shown}");
                    return;
                }
                (a, b) => panic!("{a:?} against {b:?} in {shown}"),
            }
        }
        panic!("no end");
    }

    const EWS: &str = r#"xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types""#;

    #[test]
    fn namespaces_resolve_as_quick_xml_resolves_them() {
        let docs = [
            format!("<s:Envelope {EWS}><s:Body><m:GetItem><t:ItemId Id='a'/></m:GetItem></s:Body></s:Envelope>"),
            // Redeclared inside, and back outside.
            format!("<s:Envelope {EWS}><s:Body><m:GetItem xmlns:m='urn:x'/><m:GetItem/><t:A xmlns:t='urn:y'><t:B/></t:A><t:C/></s:Body></s:Envelope>"),
            // A default namespace, set and reset.
            format!("<Envelope xmlns='{}'><Body xmlns=''><a/></Body><Body/></Envelope>", crate::soap::SOAP_NS),
            // A prefix unbound, an undeclared prefix, an empty prefix, the reserved ones.
            format!("<s:Envelope {EWS}><x:A/><t:A xmlns:t=''><t:B/></t:A><:C/><xml:D/><xmlns:E/></s:Envelope>"),
            // `xmlns:` with nothing after the colon: quick-xml binds it as the default.
            format!("<A xmlns:='{}'><B/></A>", crate::soap::TYPES_NS),
            // Declarations after a malformed attribute are not read; spaces around `=` and
            // none between attributes are not malformed.
            format!("<A x='1'xmlns:t = '{}'><t:B/></A>", crate::soap::TYPES_NS),
            format!("<A x=1 xmlns:t='{}'><t:B/></A>", crate::soap::TYPES_NS),
            format!("<A a b xmlns:t='{}'><t:B/></A>", crate::soap::TYPES_NS),
            format!("<A xmlns:t='{}' xmlns:t='{}'><t:B/></A>", crate::soap::TYPES_NS, crate::soap::SOAP_NS),
            // Escaped namespace text is not the namespace.
            "<t:A xmlns:t='http://schemas.microsoft.com/exchange/services/2006/type&#115;'/>".into(),
            // Reserved prefixes and namespaces.
            "<A xmlns:xml='http://www.w3.org/XML/1998/namespace'/>".into(),
            "<A xmlns:xml='urn:x'/>".into(),
            "<A xmlns:xmlns='http://www.w3.org/2000/xmlns/'/>".into(),
            "<A xmlns:p='http://www.w3.org/XML/1998/namespace'/>".into(),
            "<A xmlns:p='http://www.w3.org/2000/xmlns/'/>".into(),
            "<A xmlns='http://www.w3.org/2000/xmlns/'><B/></A>".into(),
            // Attributes named like declarations that are not.
            format!("<A xmlnsx='{}' x:xmlns='{}'><B/></A>", crate::soap::SOAP_NS, crate::soap::SOAP_NS),
            // Names with two colons, or nothing after one: the local part follows the last.
            format!("<s:Envelope {EWS}><t:a:b/><t:c:d:e></t:c:d:e><t:/></s:Envelope>"),
            // Mismatched and stray end tags.
            format!("<s:Envelope {EWS}></t:Envelope>"),
            "</a>".into(),
            "<a><b></a>".into(),
        ];
        for doc in &docs {
            same_as_quick_xml(doc.as_bytes());
        }
        // The bindings' bound: 128 in scope, not one more.
        let many = |n: usize| {
            let attrs: String = (0..n).map(|i| format!(" xmlns:p{i}='urn:{i}'")).collect();
            format!("<A{attrs}><p3:B/></A>")
        };
        same_as_quick_xml(many(128).as_bytes());
        same_as_quick_xml(many(129).as_bytes());
        let nested: String = (0..130)
            .map(|i| format!("<A xmlns:p{i}='urn:{i}'>"))
            .collect();
        same_as_quick_xml(nested.as_bytes());
    }

    /// The attribute reader stops where quick-xml's (checks off) first fails, and reads the
    /// same keys and values before it.
    #[test]
    fn attributes_read_as_quick_xml_reads_them() {
        let tags = [
            "a",
            "a x='1' y=\"2\"",
            "a x = '1'\ty\n=\r\"2\" ",
            "a x='1'y='2'",
            "a x='1' y",
            "a x='1' y z='3'",
            "a x='1' y=",
            "a x='1' y=2 z='3'",
            "a x='1 y='2'",
            "a x=\"1' y='2'",
            "a ='1' y='2'",
            "a ==='1'",
            "a = ='1'",
            "a x='\u{e9}>' y='&amp;'",
            "a x='1' x='2'",
            "a \"x\"='1'",
            "a x=='1'",
            "a  ",
            // Keys and values longer than a word, their ends at every place in one.
            "a MajorBuildNumber=\"2507\" Version='V2017_07_11' xmlns:h='urn:a-long-namespace'",
            "a k1234567=\"v123456\" k12345678 = 'v1234567''",
            "a k123456789\t=\r'v12345678' k1234567890\n='v123456789 with space'",
            "a k12345678901234567='v\"12345678901234567'k='\"'",
            "a k1234567890123456789012345678901234567890='unclosed value that runs on",
        ];
        for tag in tags {
            let e = quick_xml::events::BytesStart::from_content(tag, 1);
            let mut theirs = Vec::new();
            for a in e.attributes().with_checks(false) {
                let Ok(a) = a else { break };
                theirs.push((a.key.into_inner().to_string(), a.value.to_string()));
            }
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let ours: Vec<(String, String)> = super::attributes(e.attributes_raw().as_bytes())
                .map(|(k, v)| (text(k), text(v)))
                .collect();
            assert_eq!(ours, theirs, "in <{tag}>");
        }
    }

    /// The scan finds `xmlns` wherever it starts, among other `x`s and partial matches,
    /// and at the very end, as a plain search does.
    #[test]
    fn a_declaration_is_seen_at_any_place() {
        for len in 0..40 {
            for at in 0..len {
                for filler in [b'a', b'x'] {
                    let mut tag = vec![filler; len];
                    let plain = |t: &[u8]| t.windows(5).any(|w| w == b"xmlns");
                    assert_eq!(super::declares(&tag), plain(&tag), "{tag:?}");
                    for (i, b) in b"xmlns".iter().enumerate() {
                        if let Some(slot) = tag.get_mut(at + i) {
                            *slot = *b;
                        }
                    }
                    assert_eq!(super::declares(&tag), plain(&tag), "{tag:?}");
                    // One byte short of a declaration is not one.
                    if let Some(slot) = tag.get_mut(at + 4) {
                        *slot = b'x';
                    }
                    assert_eq!(super::declares(&tag), plain(&tag), "{tag:?}");
                }
            }
        }
    }

    #[test]
    fn fuzz_seeds_resolve_as_quick_xml_resolves_them() {
        for seed in crate::soap::fuzz_seeds() {
            // The request seeds start with two bytes that choose a cut.
            same_as_quick_xml(&seed);
            same_as_quick_xml(seed.get(2..).unwrap_or_default());
        }
    }
}
