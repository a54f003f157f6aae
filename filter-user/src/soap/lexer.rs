//! The SOAP parsers' tokenizer: quick-xml's reader, for a document held whole, giving the
//! same events with the same rules, without its cost per event.
//!
//! quick-xml checks each event's bytes for UTF-8 as it cuts them out, keeps the names of open
//! elements in a string of its own, and sets up a vector search for every tag however short:
//! about 600 instructions an event, half the price of reading a 1 KB request. Here the
//! document is checked for UTF-8 once, every event is a slice of that text (cut at `<`, `>`,
//! `&` or `;`, which never fall inside a character), open names are slices too, tags are
//! scanned eight bytes at a time, and the events
//! are quick-xml's own types, so the parsers above read them as before.
//!
//! The rules are quick-xml 0.42's with its default configuration, which the parsers used:
//! end tags must match the open element (trailing white space trimmed), no end tag without
//! a start, a `&` must end in `;` before the next `<` or `&`, quotes hide `>` inside a tag,
//! a comment ends at `-->` at least six bytes in, CDATA at `]]>`, a processing instruction at
//! `?>`. One difference, on the refusing side: `<!D` and `<!d` are a document type
//! declaration at once, whatever follows, where quick-xml reads to its end first (or fails);
//! the parsers refuse both. An event that holds a byte that is not UTF-8 is an error, as in
//! quick-xml. The tests and a fuzz target hold the two equal event by event.

use std::str::Utf8Error;

use memchr::{memchr2, memchr3, memchr_iter};
use quick_xml::{
    errors::{IllFormedError, SyntaxError},
    events::{BytesCData, BytesDecl, BytesEnd, BytesPI, BytesRef, BytesStart, BytesText, Event},
    Error,
};
use smallvec::SmallVec;

const BOM: &[u8] = b"\xef\xbb\xbf";

/// What the next byte starts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Text,
    Markup,
    Reference,
    Done,
}

pub(crate) struct Lexer<'i> {
    bytes: &'i [u8],
    /// The longest prefix of `bytes` that is UTF-8: every event is cut from it.
    text: &'i str,
    /// Why `text` ends before `bytes` does.
    bad: Option<Utf8Error>,
    /// Bytes read so far.
    pos: usize,
    state: State,
    /// Names of the open elements, outermost first; on the stack up to EWS's usual depth.
    open: SmallVec<[&'i str; 16]>,
}

impl<'i> Lexer<'i> {
    /// A reader of `bytes`; a leading byte-order mark is skipped and not counted in positions,
    /// as quick-xml does.
    pub(crate) fn new(bytes: &'i [u8]) -> Lexer<'i> {
        let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
        let (text, bad) = match std::str::from_utf8(bytes) {
            Ok(text) => (text, None),
            Err(e) => {
                let valid = bytes.get(..e.valid_up_to()).unwrap_or_default();
                (std::str::from_utf8(valid).unwrap_or_default(), Some(e))
            }
        };
        Lexer {
            bytes,
            text,
            bad,
            pos: 0,
            state: State::Text,
            open: SmallVec::new(),
        }
    }

    /// Bytes read so far, the byte-order mark aside.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    /// The document as text, from where positions count, up to its first byte that is not
    /// UTF-8: every element's tag lies inside it.
    pub(crate) fn text(&self) -> &'i str {
        self.text
    }

    pub(crate) fn read_event(&mut self) -> Result<Event<'i>, Error> {
        match self.state {
            State::Done => Ok(Event::Eof),
            State::Reference => self.reference(),
            State::Markup => self.markup(),
            State::Text => self.text_run(),
        }
    }

    /// The text `start..end`, or the UTF-8 error inside it.
    fn slice(&self, start: usize, end: usize) -> Result<&'i str, Error> {
        match self.text.get(start..end) {
            Some(s) => Ok(s),
            None => Err(match self.bad {
                Some(e) => Error::from(e),
                // Unreachable: cuts fall on ASCII bytes of the valid prefix.
                None => Error::Syntax(SyntaxError::UnclosedTag),
            }),
        }
    }

    fn text_run(&mut self) -> Result<Event<'i>, Error> {
        let start = self.pos;
        let rest = self.bytes.get(start..).unwrap_or_default();
        // Most tags follow one another with no text between: no search to set up.
        if rest.first() == Some(&b'<') {
            return self.markup();
        }
        let Some(i) = memchr2(b'<', b'&', rest) else {
            self.state = State::Done;
            self.pos = self.bytes.len();
            if rest.is_empty() {
                return Ok(Event::Eof);
            }
            return Ok(Event::Text(BytesText::from_escaped(
                self.slice(start, self.bytes.len())?,
            )));
        };
        self.state = match rest[i] {
            b'<' => State::Markup,
            _ => State::Reference,
        };
        if i == 0 {
            return self.read_event();
        }
        self.pos = start + i;
        Ok(Event::Text(BytesText::from_escaped(
            self.slice(start, start + i)?,
        )))
    }

    /// At `&`: a reference up to `;`, which must come before any `<` or `&`.
    fn reference(&mut self) -> Result<Event<'i>, Error> {
        let start = self.pos;
        let rest = self.bytes.get(start + 1..).unwrap_or_default();
        match memchr3(b';', b'&', b'<', rest) {
            Some(i) if rest[i] == b';' => {
                let end = start + i + 2;
                self.pos = end;
                self.state = State::Text;
                let r = self.slice(start, end)?;
                Ok(Event::GeneralRef(BytesRef::new(&r[1..r.len() - 1])))
            }
            Some(i) => {
                self.pos = start + i + 1;
                self.state = match rest[i] {
                    b'<' => State::Markup,
                    _ => State::Reference,
                };
                Err(Error::IllFormed(IllFormedError::UnclosedReference))
            }
            None => {
                self.pos = self.bytes.len();
                self.state = State::Done;
                Err(Error::IllFormed(IllFormedError::UnclosedReference))
            }
        }
    }

    /// At `<`.
    fn markup(&mut self) -> Result<Event<'i>, Error> {
        self.state = State::Text;
        let start = self.pos;
        match self.bytes.get(start + 1) {
            None => {
                self.pos = self.bytes.len();
                Err(Error::Syntax(SyntaxError::UnclosedTag))
            }
            Some(b'!') => self.bang(start),
            Some(b'?') => self.question_mark(start),
            Some(b'/') => self.end_tag(start),
            Some(_) => self.start_tag(start),
        }
    }

    /// Where the tag that starts at `start` ends: its `>`, outside quotes. Sixteen or eight
    /// bytes at a time (see [`skip`]), from one byte that matters to the next: a vector search
    /// set up again at every quote costs more on tags this short, a plain byte loop more on
    /// long ones.
    fn tag_end(&mut self, start: usize) -> Result<usize, Error> {
        let rest = self.bytes.get(start..).unwrap_or_default();
        let mut quote = None;
        let mut i = 0;
        while let Some(&byte) = rest.get(i) {
            match skip(&rest[i..], quote) {
                Skip::Clear(n) => {
                    i += n;
                    continue;
                }
                Skip::To(n) => i += n,
                Skip::Short => {}
            }
            match (quote, rest.get(i).copied().unwrap_or(byte)) {
                (None, b'>') => return Ok(start + i),
                (None, q @ (b'\'' | b'"')) => quote = Some(q),
                (Some(q), b) if q == b => quote = None,
                _ => {}
            }
            i += 1;
        }
        self.pos = self.bytes.len();
        Err(Error::Syntax(match quote {
            None => SyntaxError::UnclosedTag,
            Some(b'\'') => SyntaxError::UnclosedSingleQuotedAttributeValue,
            Some(_) => SyntaxError::UnclosedDoubleQuotedAttributeValue,
        }))
    }

    fn start_tag(&mut self, start: usize) -> Result<Event<'i>, Error> {
        let end = self.tag_end(start)?;
        self.pos = end + 1;
        let tag = self.slice(start, end + 1)?;
        if let Some(content) = tag[1..].strip_suffix("/>") {
            return Ok(Event::Empty(BytesStart::from_content(
                content,
                name_len(content),
            )));
        }
        let content = &tag[1..tag.len() - 1];
        let len = name_len(content);
        self.open.push(&content[..len]);
        Ok(Event::Start(BytesStart::from_content(content, len)))
    }

    fn end_tag(&mut self, start: usize) -> Result<Event<'i>, Error> {
        let end = self.tag_end(start)?;
        self.pos = end + 1;
        let tag = self.slice(start, end + 1)?;
        let name = trim_end(&tag[2..tag.len() - 1]);
        match self.open.pop() {
            Some(open) if open == name => Ok(Event::End(BytesEnd::new(name))),
            Some(open) => Err(Error::IllFormed(IllFormedError::MismatchedEndTag {
                expected: open.to_string(),
                found: name.to_string(),
            })),
            None => Err(Error::IllFormed(IllFormedError::UnmatchedEndTag(
                name.to_string(),
            ))),
        }
    }

    /// At `<!`: a comment, CDATA, or a document type declaration.
    fn bang(&mut self, start: usize) -> Result<Event<'i>, Error> {
        let rest = self.bytes.get(start..).unwrap_or_default();
        let (closing, unclosed, opening) = match rest.get(2) {
            Some(b'-') => (&b"--"[..], SyntaxError::UnclosedComment, "<!--"),
            Some(b'[') => (&b"]]"[..], SyntaxError::UnclosedCData, "<![CDATA["),
            Some(b'D' | b'd') => {
                // Refused by every parser above: what follows is not read.
                self.pos = self.bytes.len();
                self.state = State::Done;
                return Ok(Event::DocType(BytesText::from_escaped("")));
            }
            _ => {
                self.pos = self.bytes.len();
                return Err(Error::Syntax(SyntaxError::InvalidBangMarkup));
            }
        };
        // A comment's `>` counts from the seventh byte on (`<!---->` is the shortest).
        let shortest = if opening == "<!--" { 6 } else { 0 };
        let Some(i) =
            memchr_iter(b'>', rest).find(|&i| i >= shortest && rest[..i].ends_with(closing))
        else {
            self.pos = self.bytes.len();
            return Err(Error::Syntax(unclosed));
        };
        self.pos = start + i + 1;
        let markup = self.slice(start, start + i + 1)?;
        if !markup.starts_with(opening) {
            return Err(Error::Syntax(unclosed));
        }
        let inner = &markup[opening.len()..markup.len() - 3];
        Ok(match opening {
            "<!--" => Event::Comment(BytesText::from_escaped(inner)),
            _ => Event::CData(BytesCData::new(inner)),
        })
    }

    /// At `<?`: the XML declaration or a processing instruction, up to `?>`.
    fn question_mark(&mut self, start: usize) -> Result<Event<'i>, Error> {
        let rest = self.bytes.get(start..).unwrap_or_default();
        let unclosed = || {
            let decl = rest.starts_with(b"<?xml")
                && rest.get(5).is_none_or(|&b| is_space_byte(b) || b == b'?');
            Error::Syntax(if decl {
                SyntaxError::UnclosedXmlDecl
            } else {
                SyntaxError::UnclosedPI
            })
        };
        let Some(i) = memchr_iter(b'>', rest).find(|&i| i > 0 && rest[i - 1] == b'?') else {
            self.pos = self.bytes.len();
            return Err(unclosed());
        };
        self.pos = start + i + 1;
        let markup = self.slice(start, start + i + 1)?;
        // `<?>`: the `?` that opens cannot also close.
        if markup.len() <= 3 {
            return Err(Error::Syntax(SyntaxError::UnclosedPI));
        }
        let content = &markup[2..markup.len() - 2];
        let b = content.as_bytes();
        if b.starts_with(b"xml") && b.get(3).is_none_or(|&c| is_space_byte(c)) {
            return Ok(Event::Decl(BytesDecl::from_start(
                BytesStart::from_content(content, 3),
            )));
        }
        Ok(Event::PI(BytesPI::new(content)))
    }
}

/// What the next bytes of a tag hold, as far as the tag's end is concerned.
enum Skip {
    /// None of the next `n` bytes is `>` or a quote (or, inside quotes, the closing one).
    Clear(usize),
    /// The first such byte is `n` bytes on.
    To(usize),
    /// Fewer than eight bytes are left: the caller reads them one at a time.
    Short,
}

/// The first byte of `rest` that matters inside a tag: outside quotes `>`, `'` or `"`, inside
/// them the closing quote. Sixteen bytes at a time with SSE2 (part of every x86-64), eight
/// with a word's arithmetic elsewhere or near the end.
fn skip(rest: &[u8], quote: Option<u8>) -> Skip {
    #[cfg(target_arch = "x86_64")]
    if let Some(chunk) = rest.first_chunk::<16>() {
        let stops = stops16(chunk, quote);
        return match stops {
            0 => Skip::Clear(16),
            _ => Skip::To(stops.trailing_zeros() as usize),
        };
    }
    let Some(word) = rest.first_chunk::<8>() else {
        return Skip::Short;
    };
    let word = u64::from_le_bytes(*word);
    let stops = match quote {
        None => matches(word, b'>') | matches(word, b'\'') | matches(word, b'"'),
        Some(q) => matches(word, q),
    };
    match stops {
        0 => Skip::Clear(8),
        // The lowest flag is exact: the first byte that matters.
        _ => Skip::To(stops.trailing_zeros() as usize / 8),
    }
}

/// One bit per byte of `chunk` that matters (see [`skip`]), the first byte lowest.
#[cfg(target_arch = "x86_64")]
fn stops16(chunk: &[u8; 16], quote: Option<u8>) -> u32 {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };
    // SAFETY: SSE2 is part of the x86-64 baseline every build targets, so its instructions
    // exist on any machine this runs on; the one load reads the sixteen bytes `chunk`
    // borrows, unaligned loads allowed.
    unsafe {
        let v = _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>());
        let is = |b: u8| _mm_cmpeq_epi8(v, _mm_set1_epi8(b as i8));
        let hits = match quote {
            None => _mm_or_si128(_mm_or_si128(is(b'>'), is(b'\'')), is(b'"')),
            Some(q) => is(q),
        };
        _mm_movemask_epi8(hits) as u32
    }
}

/// The bytes of `word` (read little-endian) that are `b`, each flagged by its high bit: the
/// zero-byte test (Hacker's Delight, 6-1) on the word with `b` cleared. Flags above the
/// lowest may be false; the lowest never is.
pub(crate) fn matches(word: u64, b: u8) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let x = word ^ (ONES * u64::from(b));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// Where the first byte of `bytes` that `stop` flags is: eight bytes at a time through `word`
/// (the flags of a word read little-endian, as [`matches`] gives them), the last few one at a
/// time. For the short runs inside a tag, where a vector search costs more to set up.
pub(crate) fn first_of(
    bytes: &[u8],
    word: impl Fn(u64) -> u64,
    stop: impl Fn(u8) -> bool,
) -> Option<usize> {
    let (words, rest) = bytes.as_chunks::<8>();
    for (i, w) in words.iter().enumerate() {
        let flags = word(u64::from_le_bytes(*w));
        if flags != 0 {
            // The lowest flag is exact.
            return Some(i * 8 + flags.trailing_zeros() as usize / 8);
        }
    }
    let i = rest.iter().position(|&b| stop(b))?;
    Some(words.len() * 8 + i)
}

fn is_space_byte(b: u8) -> bool {
    matches!(b, b' ' | b'\r' | b'\n' | b'\t')
}

/// An end tag's name without the white space after it; a name of white space alone is
/// kept whole, as quick-xml keeps it.
fn trim_end(name: &str) -> &str {
    match name.bytes().rposition(|b| !is_space_byte(b)) {
        Some(last) => &name[..=last],
        None => name,
    }
}

/// A tag's name: up to its first white space.
fn name_len(content: &str) -> usize {
    content
        .bytes()
        .position(is_space_byte)
        .unwrap_or(content.len())
}

/// Whether `doc` reads the same with this lexer as with quick-xml's reader: event for event,
/// to the end, and where one refuses (an error, a document type, a processing instruction),
/// the other refuses there too. For the tests and the fuzz target; `Err` says where they part.
pub fn agrees_with_quick_xml(doc: &[u8]) -> Result<(), String> {
    let mut theirs = quick_xml::Reader::from_reader(doc);
    theirs.config_mut().check_end_names = true;
    let mut ours = Lexer::new(doc);
    let refuses =
        |e: &Result<Event, Error>| matches!(e, Err(_) | Ok(Event::DocType(_)) | Ok(Event::PI(_)));
    loop {
        let a = theirs.read_event();
        let b = ours.read_event();
        match (refuses(&a), refuses(&b)) {
            (true, true) => return Ok(()),
            (false, false) => {}
            _ => return Err(format!("quick-xml read {a:?}, the lexer {b:?}")),
        }
        let (Ok(a), Ok(b)) = (a, b) else {
            return Ok(());
        };
        if a != b {
            return Err(format!("quick-xml read {a:?}, the lexer {b:?}"));
        }
        if theirs.buffer_position() != ours.position() as u64 {
            return Err(format!(
                "after {a:?}: quick-xml at {}, the lexer at {}",
                theirs.buffer_position(),
                ours.position()
            ));
        }
        if a == Event::Eof {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::agrees_with_quick_xml;

    fn agrees(doc: &[u8]) {
        if let Err(e) = agrees_with_quick_xml(doc) {
            panic!("{e} in {:?}", String::from_utf8_lossy(doc));
        }
    }

    #[test]
    fn the_lowest_flag_of_a_word_is_the_first_match() {
        for at in 0..8 {
            for b in [0u8, b'>', b'"', 0x7f, 0x80, 0x81, 0xff] {
                let mut bytes = [b'a'; 8];
                bytes[at] = b;
                // A byte one above the one sought, after it: the case that could flag falsely.
                if at < 7 {
                    bytes[at + 1] = b.wrapping_add(1);
                }
                let flags = super::matches(u64::from_le_bytes(bytes), b);
                assert_eq!(flags.trailing_zeros() as usize / 8, at, "{b:#x} at {at}");
                let none = super::matches(u64::from_le_bytes([b'a'; 8]), b);
                assert_eq!(none, 0, "{b:#x}");
            }
        }
    }

    /// Tags of every length up to four vectors, with the end, a quote or a quoted `>` at every
    /// place: sixteen bytes at a time, eight, or one, the end is where quick-xml finds it.
    #[test]
    fn a_tag_ends_where_quick_xml_ends_it_at_any_length_and_place() {
        for len in 1..64 {
            for at in 0..len {
                for inner in ["", "'", "\"", "'>'", "\">\"", "'\"'"] {
                    let mut name = vec![b'a'; len];
                    name.splice(at..at, inner.bytes());
                    let name = String::from_utf8(name).unwrap_or_default();
                    agrees(format!("<x y={name}>t</x>").as_bytes());
                    agrees(format!("<x y='{name}'>t</x>").as_bytes());
                    agrees(format!("<x y=\"{name}\"/>").as_bytes());
                    agrees(format!("<x y='{name}").as_bytes());
                }
            }
        }
    }

    #[test]
    fn reads_as_quick_xml_reads() {
        let docs: &[&[u8]] = &[
            b"",
            b"   ",
            b"\xef\xbb\xbf<a/>",
            b"\xef\xbb\xbf\xef\xbb\xbf<a/>",
            b"<?xml version='1.0'?><a x='1' y=\"2\">t&amp;u&#x41;v<b/><![CDATA[<c>]]><!-- c --></a>",
            b"<a>&unclosed</a>",
            b"<a>&a&b;</a>",
            b"<a>&</a>",
            b"<a>text&",
            b"<a x='>'>",
            b"<abcdefghijklmnop x='abcdefgh>ijklmnop' y=\"abcdefgh'>\">text</abcdefghijklmnop>",
            b"<abcdefghijklmnop x='abcdefghijklmnop",
            b"<a x='",
            b"<a x=\"",
            b"<a",
            b"<",
            b"<a></b>",
            b"<a></a >",
            b"<a></a\t\n>",
            b"</a>",
            b"<a b='</a>'></a>",
            b"<>",
            b"</>",
            b"< ></ >",
            b"<a></ >",
            b"<a/ >",
            b"<!-->",
            b"<!--->",
            b"<!---->",
            b"<!-- a -- b -->",
            b"<!-a-->",
            b"<!--",
            b"<![CDATA[",
            b"<![]]>",
            b"<![CDATA]]>",
            b"<![cdata[x]]>",
            b"<![CDATA[]]>",
            b"<!x>",
            b"<!",
            b"<!DOCTYPE a [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><a>&e;</a>",
            b"<!doctype>",
            b"<?>",
            b"<??>",
            b"<?xml?>",
            b"<?xml",
            b"<?xml-stylesheet href='x'?><a/>",
            b"<?xmlx?>",
            b"<?pi",
            b"<a>\xff</a>",
            b"<a \xff/>",
            b"<a>\xc3</a>",
            b"<a>\xc3",
            b"<a x='\xc3",
            b"<a>caf\xc3\xa9</a>",
            b"<\xc3\xa9/>",
            b"<a></a>\xff",
            b"<a>&\xff;</a>",
            b"<!--\xff-->",
        ];
        for doc in docs {
            agrees(doc);
        }
    }

    /// Every seed of the SOAP fuzz targets, cut at every byte, and with each byte replaced by
    /// one of the bytes that steer a tokenizer.
    #[test]
    fn fuzz_seeds_and_their_variants_read_as_quick_xml_reads() {
        for seed in crate::soap::fuzz_seeds() {
            check_variants(&seed);
        }
    }

    fn check_variants(doc: &[u8]) {
        agrees(doc);
        for cut in 0..doc.len() {
            agrees(&doc[..cut]);
        }
        let steering = b"<>&;'\"/!?-][ \xff\xc3";
        // Every seventh byte, each steering byte: enough to reach every branch.
        for at in (0..doc.len()).step_by(7) {
            for &b in steering {
                let mut v = doc.to_vec();
                v[at] = b;
                agrees(&v);
            }
        }
    }
}
