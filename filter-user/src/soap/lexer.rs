//! The SOAP parsers' tokenizer: quick-xml's reader, for a document held whole, giving the
//! same events with the same rules, without its cost per event.
//!
//! quick-xml checks each event's bytes for UTF-8 as it cuts them out, keeps the names of open
//! elements in a string of its own, and sets up a vector search for every tag however short:
//! about 600 instructions an event, half the price of reading a 1 KB request. Here the
//! document is checked for UTF-8 once, every event is a slice of that text (cut at `<`, `>`,
//! `&` or `;`, which never fall inside a character), open names are slices too, tags are
//! scanned sixteen bytes at a time with the bytes that matter found at once, one pass over a
//! start tag's name finds where it ends and where its colons are (for the namespace
//! reader), an end tag that repeats the open name is taken as it is, and the events are
//! quick-xml's own types, so the parsers above read them as before.
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
    /// The open elements, outermost first; on the stack up to EWS's usual depth.
    open: SmallVec<[Open<'i>; 16]>,
    /// The name of the element the last start or empty tag opened.
    tag: TagName<'i>,
}

/// An open element.
struct Open<'i> {
    name: &'i str,
    /// Its name holds a quote, which could hide a `>` in its end tag.
    quoted: bool,
}

/// The name of an element as its start tag writes it, borrowed from the document.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TagName<'i> {
    pub(crate) name: &'i str,
    /// Where its first and last `:` are.
    pub(crate) colons: Option<(usize, usize)>,
}

impl<'i> Lexer<'i> {
    /// A reader of `bytes`; a leading byte-order mark is skipped and not counted in positions,
    /// as quick-xml does.
    pub(crate) fn new(bytes: &'i [u8]) -> Lexer<'i> {
        let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
        let (text, bad) = match utf8(bytes) {
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
            tag: TagName::default(),
        }
    }

    /// Bytes read so far, the byte-order mark aside.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    // Inlined into the namespace reader, its one caller (see `NsReader::read_event`).
    #[inline(always)]
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

    /// Where the tag that starts at `start` ends: its `>`, outside quotes. Sixteen bytes at
    /// a time: the bytes that matter in a chunk are found at once (see [`stops`]) and only
    /// they are looked at, one after the other, so a quote costs a few instructions rather
    /// than a new search.
    fn tag_end(&mut self, start: usize) -> Result<usize, Error> {
        let rest = self.bytes.get(start..).unwrap_or_default();
        let mut quote = None;
        let mut at = 0;
        while at < rest.len() {
            let s = stops(&chunk16(rest, at));
            let mut left = s.gt | s.single | s.double;
            while left != 0 {
                let bit = left & left.wrapping_neg();
                left ^= bit;
                match quote {
                    None if s.gt & bit != 0 => {
                        return Ok(start + at + bit.trailing_zeros() as usize)
                    }
                    None if s.single & bit != 0 => quote = Some(b'\''),
                    None => quote = Some(b'"'),
                    Some(b'\'') if s.single & bit != 0 => quote = None,
                    Some(b'"') if s.double & bit != 0 => quote = None,
                    Some(_) => {}
                }
            }
            at += 16;
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
        let (content, empty) = match tag[1..].strip_suffix("/>") {
            Some(content) => (content, true),
            None => (&tag[1..tag.len() - 1], false),
        };
        let rest = self.bytes.get(start + 1..).unwrap_or_default();
        let scan = scan_name(rest, content.len());
        // The name ends at white space or where the content does: a character boundary.
        let name = content.get(..scan.len).unwrap_or(content);
        self.tag = TagName {
            name,
            colons: scan.colons,
        };
        if empty {
            return Ok(Event::Empty(BytesStart::from_content(content, scan.len)));
        }
        self.open.push(Open {
            name,
            quoted: scan.quoted,
        });
        Ok(Event::Start(BytesStart::from_content(content, scan.len)))
    }

    /// The name of the element the last start or empty tag opened.
    pub(crate) fn tag(&self) -> TagName<'i> {
        self.tag
    }

    /// The end tag of the open element written plainly, `</name>`: taken as it is, with no
    /// search for its end. A name with a quote in it could hide a `>`; it takes the long way.
    fn plain_end(&mut self, start: usize) -> Option<Event<'i>> {
        let open = self.open.last().filter(|o| !o.quoted)?;
        let from = start + 2;
        let to = from + open.name.len();
        let text = self.text.as_bytes();
        if text.get(to) != Some(&b'>') || !same(text.get(from..to)?, open.name.as_bytes()) {
            return None;
        }
        let name = self.text.get(from..to)?;
        self.open.pop();
        self.pos = to + 1;
        Some(Event::End(BytesEnd::new(name)))
    }

    fn end_tag(&mut self, start: usize) -> Result<Event<'i>, Error> {
        if let Some(event) = self.plain_end(start) {
            return Ok(event);
        }
        let end = self.tag_end(start)?;
        self.pos = end + 1;
        let tag = self.slice(start, end + 1)?;
        let name = trim_end(&tag[2..tag.len() - 1]);
        match self.open.pop() {
            Some(open) if open.name == name => Ok(Event::End(BytesEnd::new(name))),
            Some(open) => Err(Error::IllFormed(IllFormedError::MismatchedEndTag {
                expected: open.name.to_string(),
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

/// `bytes` as text. A document of ASCII alone, as EWS documents mostly are, is told so 64
/// bytes at a time (`from_utf8` took 0.5 instructions a byte); any other goes through
/// `from_utf8`, which finds where it stops being UTF-8.
fn utf8(bytes: &[u8]) -> Result<&str, Utf8Error> {
    if is_ascii(bytes) {
        // SAFETY: every byte is below 0x80, and each such byte is a UTF-8 character.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes)
}

/// Whether every byte of `bytes` is ASCII: four chunks of sixteen are OR-ed and their high
/// bits taken at once.
#[cfg(target_arch = "x86_64")]
fn is_ascii(bytes: &[u8]) -> bool {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128};
    let (blocks, rest) = bytes.as_chunks::<64>();
    let high = |block: &[u8; 64]| {
        let p = block.as_ptr().cast::<__m128i>();
        // SAFETY: SSE2 is part of the x86-64 baseline; the four unaligned loads read the
        // 64 bytes `block` borrows.
        unsafe {
            let a = _mm_or_si128(_mm_loadu_si128(p), _mm_loadu_si128(p.add(1)));
            let b = _mm_or_si128(_mm_loadu_si128(p.add(2)), _mm_loadu_si128(p.add(3)));
            _mm_movemask_epi8(_mm_or_si128(a, b))
        }
    };
    blocks.iter().all(|block| high(block) == 0) && rest.is_ascii()
}

#[cfg(not(target_arch = "x86_64"))]
fn is_ascii(bytes: &[u8]) -> bool {
    bytes.is_ascii()
}

/// The bytes of a sixteen-byte chunk that end a tag or open and close quotes in it: one
/// bit each, the first byte lowest.
struct Stops {
    gt: u32,
    single: u32,
    double: u32,
}

/// Sixteen bytes of `rest` from `at`, the chunk past its end filled with zeros (which are
/// none of the bytes sought).
fn chunk16(rest: &[u8], at: usize) -> [u8; 16] {
    let tail = rest.get(at..).unwrap_or_default();
    if let Some(chunk) = tail.first_chunk::<16>() {
        return *chunk;
    }
    let mut chunk = [0; 16];
    if let Some(to) = chunk.get_mut(..tail.len()) {
        to.copy_from_slice(tail);
    }
    chunk
}

fn stops(chunk: &[u8; 16]) -> Stops {
    Stops {
        gt: bits(chunk, b'>'),
        single: bits(chunk, b'\''),
        double: bits(chunk, b'"'),
    }
}

/// The bytes of `chunk` that are `b`, one bit each, the first byte lowest. With SSE2, part
/// of every x86-64: a compare and a mask.
#[cfg(target_arch = "x86_64")]
pub(crate) fn bits(chunk: &[u8; 16], b: u8) -> u32 {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8,
    };
    // SAFETY: SSE2 is part of the x86-64 baseline every build targets, so its instructions
    // exist on any machine this runs on; the one load reads the sixteen bytes `chunk`
    // borrows, unaligned loads allowed.
    unsafe {
        let v = _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>());
        _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b as i8))) as u32
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn bits(chunk: &[u8; 16], b: u8) -> u32 {
    bits_by_word(chunk, b)
}

/// [`bits`] with a word's arithmetic, for other machines (and the tests, which hold the
/// two equal).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn bits_by_word(chunk: &[u8; 16], b: u8) -> u32 {
    let (lo, hi) = chunk.split_at(8);
    let word = |half: &[u8]| u64::from_le_bytes(half.try_into().unwrap_or_default());
    gather(exact(word(lo), b)) | gather(exact(word(hi), b)) << 8
}

/// The flags of a word's bytes (their high bits, as [`exact`] sets them) as eight bits, the
/// first byte lowest: each flag lands on its own bit of the product's top byte.
fn gather(flags: u64) -> u32 {
    ((flags >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56) as u32
}

/// The bytes of `word` that are `b`, each flagged by its high bit and no other: as
/// [`matches`], with no false flag above the first (Hacker's Delight, 6-1, the exact form).
fn exact(word: u64, b: u8) -> u64 {
    const LOWS: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let x = word ^ (0x0101_0101_0101_0101 * u64::from(b));
    !(((x & LOWS) + LOWS) | x | LOWS)
}

/// What one pass over a start tag's content finds of its name.
#[derive(Debug, PartialEq, Eq)]
struct NameScan {
    /// Up to the first white space, or the whole content.
    len: usize,
    /// Where the name's first and last `:` are.
    colons: Option<(usize, usize)>,
    /// The name holds a quote.
    quoted: bool,
}

/// The name that starts a tag's content of `len` bytes at the start of `bytes`, sixteen
/// bytes at a time: where it ends, where its colons are, whether it holds a quote. The
/// bytes after the content are read but not counted: the document goes on there.
fn scan_name(bytes: &[u8], len: usize) -> NameScan {
    let mut colons: Option<(usize, usize)> = None;
    let mut quoted = false;
    let mut at = 0;
    loop {
        let chunk = chunk16(bytes, at);
        let ends = bits(&chunk, b' ')
            | bits(&chunk, b'\t')
            | bits(&chunk, b'\n')
            | bits(&chunk, b'\r')
            // Past the content, as at white space: the name ends.
            | u32::MAX
                .checked_shl(u32::try_from(len.saturating_sub(at)).unwrap_or(u32::MAX))
                .unwrap_or(0);
        // The bytes before the first end: all sixteen when there is none.
        let inside = (ends & ends.wrapping_neg()).wrapping_sub(1) & 0xffff;
        let found = bits(&chunk, b':') & inside;
        if found != 0 {
            let first = at + found.trailing_zeros() as usize;
            let last = at + 31 - found.leading_zeros() as usize;
            colons = Some((colons.map_or(first, |c| c.0), last));
        }
        quoted |= (bits(&chunk, b'\'') | bits(&chunk, b'"')) & inside != 0;
        if ends & 0xffff != 0 {
            return NameScan {
                len: at + ends.trailing_zeros() as usize,
                colons,
                quoted,
            };
        }
        at += 16;
    }
}

/// Two names the same, a word at a time: short, where a call to `memcmp` costs more.
fn same(a: &[u8], b: &[u8]) -> bool {
    let (aw, at) = a.as_chunks::<8>();
    let (bw, bt) = b.as_chunks::<8>();
    a.len() == b.len() && aw.iter().zip(bw).all(|(x, y)| x == y) && at.iter().eq(bt)
}

/// Where the first byte of `bytes` that `flag` marks is: sixteen bytes at a time, `flag`
/// giving a chunk's bytes as bits (from [`bits`]). For the short runs inside a tag, where
/// setting up `memchr` costs more than the search. The chunk past the end is zeros, which
/// no caller looks for; a flag there is not counted.
pub(crate) fn first_of(bytes: &[u8], flag: impl Fn(&[u8; 16]) -> u32) -> Option<usize> {
    let mut at = 0;
    while at < bytes.len() {
        let found = flag(&chunk16(bytes, at));
        if found != 0 {
            let i = at + found.trailing_zeros() as usize;
            return (i < bytes.len()).then_some(i);
        }
        at += 16;
    }
    None
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

    /// The 64-byte ASCII check answers as std's, with one byte of 0x80 or above at every
    /// place of documents up to three blocks long, and with none.
    #[test]
    fn a_document_is_ascii_as_std_tells_it() {
        for len in 0..200 {
            let plain = vec![b'a'; len];
            assert!(super::is_ascii(&plain));
            for at in 0..len {
                for high in [0x80, 0xc3, 0xff] {
                    let mut bytes = plain.clone();
                    bytes[at] = high;
                    assert!(!super::is_ascii(&bytes), "{high:#x} at {at} of {len}");
                }
            }
        }
    }

    /// The first flagged byte, sixteen bytes at a time, is the first a byte-at-a-time search
    /// finds: at every place of runs up to three chunks long, with the same byte later on,
    /// and none when the byte sought is zero, which pads the last chunk.
    #[test]
    fn first_of_finds_the_first_flagged_byte() {
        for len in 0..48 {
            for at in 0..=len {
                let mut bytes = vec![b'a'; len];
                if let Some(b) = bytes.get_mut(at) {
                    *b = b'"';
                }
                if let Some(b) = bytes.get_mut(at + 17) {
                    *b = b'"';
                }
                let expected = bytes.iter().position(|&b| b == b'"');
                assert_eq!(super::first_of(&bytes, |c| super::bits(c, b'"')), expected);
                assert_eq!(super::first_of(&bytes, |c| super::bits(c, 0)), None);
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

    /// Every byte at every place of a chunk: the word arithmetic flags what SSE2 flags.
    #[test]
    fn the_word_arithmetic_finds_what_the_vector_finds() {
        for at in 0..16 {
            for byte in 0..=255u8 {
                let mut chunk = [b'a'; 16];
                chunk[at] = byte;
                // The neighbours that could carry a false flag: one above, and zero.
                if at < 15 {
                    chunk[at + 1] = byte.wrapping_add(1);
                }
                if at > 0 {
                    chunk[at - 1] = 0;
                }
                for sought in [b'>', b'\'', b'"', b':', b' ', 0, 0x80, 0xff, byte] {
                    assert_eq!(
                        super::bits_by_word(&chunk, sought),
                        super::bits(&chunk, sought),
                        "{sought:#x} in {chunk:?}"
                    );
                }
            }
        }
    }

    /// A name of every length up to three chunks, with white space, colons and quotes at
    /// every place, and the content cut short of the bytes that follow: one pass finds what a
    /// byte at a time finds.
    #[test]
    fn a_name_is_scanned_as_a_byte_at_a_time_scans_it() {
        let plain = |content: &[u8]| {
            let len = content
                .iter()
                .position(|&b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
                .unwrap_or(content.len());
            let name = &content[..len];
            let first = name.iter().position(|&b| b == b':');
            let last = name.iter().rposition(|&b| b == b':');
            super::NameScan {
                len,
                colons: first.zip(last),
                quoted: name.iter().any(|&b| b == b'\'' || b == b'"'),
            }
        };
        for len in 0..48 {
            for at in 0..len {
                for b in [b' ', b'\t', b'\n', b'\r', b':', b'\'', b'"'] {
                    for second in [None, Some(b':'), Some(b' ')] {
                        // What follows the content looks like more name, and a colon.
                        let mut doc = vec![b'n'; len + 20];
                        doc[len + 3] = b':';
                        doc[at] = b;
                        if let Some(c) = second {
                            doc[(at + 7) % len] = c;
                        }
                        for cut in [len, len.saturating_sub(1)] {
                            assert_eq!(
                                super::scan_name(&doc, cut),
                                plain(&doc[..cut]),
                                "{:?} cut at {cut}",
                                String::from_utf8_lossy(&doc)
                            );
                        }
                    }
                }
            }
        }
        // Content that runs to the end of the document.
        for len in 0..40 {
            let doc = vec![b':'; len];
            assert_eq!(super::scan_name(&doc, len), plain(&doc));
        }
    }

    /// End tags written plainly or not: quotes in the open name, white space, a name that
    /// is one byte longer or shorter, at chunk lengths, cut short, or not UTF-8.
    #[test]
    fn end_tags_read_as_quick_xml_reads_them() {
        for len in [1, 7, 8, 15, 16, 17, 31, 32, 33] {
            let name = "n".repeat(len);
            for end in [
                format!("</{name}>"),
                format!("</{name} >"),
                format!("</{name}n>"),
                format!("</{}>", &name[1..]),
                format!("</{name}"),
                format!("</{name}\u{e9}>"),
                format!("</{name}\t>"),
            ] {
                agrees(format!("<{name}>t{end}").as_bytes());
                agrees(format!("<{name} a='1'><x/>{end}").as_bytes());
                agrees(format!("<p:{name}/><{name}>{end}").as_bytes());
            }
            let mut bad = format!("<{name}></{name}").into_bytes();
            bad.push(0xff);
            agrees(&bad);
        }
        for doc in [
            "<a'b c'>t</a'b>",
            "<a'b c'>t</a'b>c'>",
            "<a\"b>t</a\"b>\">",
            "<a'>'>t</a'>'>",
            "<a'>'>t</a'>",
            "<a\"x\" y>t</a\"x\">",
        ] {
            agrees(doc.as_bytes());
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
