//! HTTP/1.1 on both sides of the proxy, each head parsed once. A request head from a client
//! and a response head from Exchange are read with httparse, and the same pass applies the
//! framing rules that request smuggling relies on breaking (RFC 9112 §6): a
//! `Content-Length` beside `Transfer-Encoding`, duplicate or signed lengths, a transfer
//! coding other than `chunked`, `Transfer-Encoding` in HTTP/1.0, obsolete line folding.
//! Parsers that quietly repair such a head (hyper drops the length, folds duplicates) let
//! Exchange and the devices in between read a different request than the one judged here,
//! so every one of them is refused. Bodies are followed by their framing only, never by
//! guesswork; chunked bodies are decoded and re-encoded, so chunk extensions and trailers
//! never reach the other side.

use std::{io, mem::MaybeUninit, ops::Range};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::proxy::buffers;

/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 4096;
/// What a single read asks for: one TLS record's worth.
pub(crate) const READ_CHUNK: usize = 16 * 1024;
/// Header slots parsed on the stack, uninitialised until httparse fills them; a limit above
/// this takes a heap buffer.
const STACK_HEADERS: usize = 128;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// Why a head was refused; the text is the audit line's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HeadError(pub &'static str);

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Head(#[from] HeadError),
    #[error("connection closed inside a message")]
    Truncated,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Name and value of one header, as ranges into the head's bytes.
type Field = (Range<usize>, Range<usize>);

/// The fields shared by request and response heads.
#[derive(Debug, Clone)]
pub struct Fields {
    raw: Bytes,
    fields: Vec<Field>,
}

impl Fields {
    fn new(raw: Bytes, parsed: &[httparse::Header<'_>]) -> Fields {
        let base = raw.as_ptr() as usize;
        let range = |s: &[u8]| {
            let start = s.as_ptr() as usize - base;
            start..start + s.len()
        };
        let fields = parsed
            .iter()
            .map(|h| (range(h.name.as_bytes()), range(h.value)))
            .collect();
        Fields { raw, fields }
    }

    /// Every header, in order: name (a token, ASCII, as httparse checked it) and value.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|(n, v)| (&self.raw[n.clone()], &self.raw[v.clone()]))
    }

    /// Every value of a header, in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The first value of a header.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The header names `Connection` lists: hop-by-hop too, for this message. Names that
    /// are hop-by-hop whatever it says (`keep-alive`, `te`, ...) are left out: listing them
    /// changes nothing, and the usual `Connection: keep-alive` then allocates no list.
    pub fn connection_named(&self) -> Vec<&[u8]> {
        self.all("connection")
            .flat_map(|v| v.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty() && !always_hop_by_hop(t))
            .collect()
    }

    /// The first value of a header, when it is text.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn count(&self, name: &str) -> usize {
        self.iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .count()
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Bytes the head holds (the limits count these).
    pub fn head_bytes(&self) -> usize {
        self.raw.len()
    }
}

/// A client's request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub fields: Fields,
    method: Range<usize>,
    target: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// The body's framing, or why it is refused. Kept apart from the parse so that a
    /// refusal can still answer in the form the request's path calls for.
    pub framing: Result<Framing, HeadError>,
}

impl RequestHead {
    /// Parses a complete head (ending in CRLF CRLF); its framing is checked in the same
    /// pass.
    pub fn parse(raw: Bytes, max_headers: usize) -> Result<RequestHead, HeadError> {
        let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        let mut heap = Vec::new();
        let storage = if max_headers <= STACK_HEADERS {
            &mut stack[..max_headers]
        } else {
            heap.resize_with(max_headers, MaybeUninit::uninit);
            &mut heap[..]
        };
        let mut req = httparse::Request::new(&mut []);
        let raw_ref: &[u8] = &raw;
        match req.parse_with_uninit_headers(raw_ref, storage) {
            Ok(httparse::Status::Complete(n)) if n == raw.len() => {}
            Ok(_) => return Err(HeadError("malformed_head")),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError("too_many_headers")),
            Err(_) => return Err(HeadError("malformed_head")),
        }
        let minor = req.version.ok_or(HeadError("malformed_head"))?;
        let base = raw.as_ptr() as usize;
        let span = |s: &str| {
            let start = s.as_ptr() as usize - base;
            start..start + s.len()
        };
        let method = span(req.method.ok_or(HeadError("malformed_head"))?);
        let target = span(req.path.ok_or(HeadError("malformed_head"))?);
        let framing = request_framing(
            req.headers.iter().map(|h| (h.name.as_bytes(), h.value)),
            minor,
        );
        let fields = Fields::new(raw.clone(), req.headers);
        Ok(RequestHead {
            fields,
            method,
            target,
            minor,
            framing,
        })
    }

    pub fn method(&self) -> &str {
        std::str::from_utf8(&self.fields.raw[self.method.clone()]).unwrap_or("")
    }

    /// The request-target as sent: origin form, absolute form, or `*`.
    pub fn target(&self) -> &str {
        std::str::from_utf8(&self.fields.raw[self.target.clone()]).unwrap_or("")
    }
}

/// RFC 9112 §6.3, strictly: anything a lenient parser would repair is refused.
fn request_framing<'h>(
    headers: impl Iterator<Item = (&'h [u8], &'h [u8])>,
    minor: u8,
) -> Result<Framing, HeadError> {
    let (length, chunked) = length_and_coding(headers)?;
    if chunked && minor == 0 {
        return Err(HeadError("transfer_encoding_in_http10"));
    }
    Ok(match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(0)) | (false, None) => Framing::Empty,
        (false, Some(n)) => Framing::Length(n),
    })
}

/// The declared length and whether the body is chunked, refusing every ambiguity.
fn length_and_coding<'h>(
    headers: impl Iterator<Item = (&'h [u8], &'h [u8])>,
) -> Result<(Option<u64>, bool), HeadError> {
    let mut length: Option<u64> = None;
    let mut coding_seen = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(b"content-length") {
            if length.is_some() {
                return Err(HeadError("duplicate_content_length"));
            }
            length = Some(parse_length(value)?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if coding_seen {
                return Err(HeadError("duplicate_transfer_encoding"));
            }
            coding_seen = true;
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err(HeadError("transfer_encoding_not_chunked"));
            }
        }
    }
    if coding_seen && length.is_some() {
        return Err(HeadError("content_length_with_transfer_encoding"));
    }
    Ok((length, coding_seen))
}

/// Digits only: `+4`, ` 4`, `0x4` and `4, 4` are all refused.
fn parse_length(value: &[u8]) -> Result<u64, HeadError> {
    if value.is_empty() || value.len() > 15 || !value.iter().all(u8::is_ascii_digit) {
        return Err(HeadError("bad_content_length"));
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or(HeadError("bad_content_length"))
}

/// Exchange's response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub fields: Fields,
    pub status: u16,
    pub minor: u8,
    /// The reason phrase as sent.
    reason: Range<usize>,
}

impl ResponseHead {
    pub fn parse(raw: Bytes, max_headers: usize) -> Result<ResponseHead, HeadError> {
        let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
        let mut heap = Vec::new();
        let storage = if max_headers <= STACK_HEADERS {
            &mut stack[..max_headers]
        } else {
            heap.resize(max_headers, httparse::EMPTY_HEADER);
            &mut heap[..]
        };
        let mut resp = httparse::Response::new(storage);
        let raw_ref: &[u8] = &raw;
        match resp.parse(raw_ref) {
            Ok(httparse::Status::Complete(n)) if n == raw.len() => {}
            Ok(_) => return Err(HeadError("upstream_malformed_head")),
            Err(_) => return Err(HeadError("upstream_malformed_head")),
        }
        let status = resp.code.ok_or(HeadError("upstream_malformed_head"))?;
        let minor = resp.version.ok_or(HeadError("upstream_malformed_head"))?;
        let base = raw.as_ptr() as usize;
        let text = resp.reason.unwrap_or("");
        let start = if text.is_empty() {
            0
        } else {
            text.as_ptr() as usize - base
        };
        let reason = start..start + text.len();
        let fields = Fields::new(raw.clone(), resp.headers);
        Ok(ResponseHead {
            fields,
            status,
            minor,
            reason,
        })
    }

    pub fn reason(&self) -> &str {
        std::str::from_utf8(&self.fields.raw[self.reason.clone()]).unwrap_or("")
    }

    /// How the body is delimited, given the request it answers (RFC 9112 §6.3).
    pub fn framing(&self, head_request: bool) -> Result<Framing, HeadError> {
        if head_request || (100..200).contains(&self.status) || matches!(self.status, 204 | 304) {
            return Ok(Framing::Empty);
        }
        let (length, chunked) =
            length_and_coding(self.fields.iter()).map_err(|e| HeadError(upstream_reason(e.0)))?;
        Ok(match (chunked, length) {
            (true, _) => Framing::Chunked,
            (false, Some(0)) => Framing::Empty,
            (false, Some(n)) => Framing::Length(n),
            (false, None) => Framing::Close,
        })
    }

    /// Whether the connection may carry another request after this response.
    pub fn keeps_alive(&self) -> bool {
        let close = self
            .fields
            .all("connection")
            .any(|v| has_token(v, b"close"));
        match self.minor {
            0 => {
                !close
                    && self
                        .fields
                        .all("connection")
                        .any(|v| has_token(v, b"keep-alive"))
            }
            _ => !close,
        }
    }
}

fn upstream_reason(reason: &'static str) -> &'static str {
    match reason {
        "duplicate_content_length" => "upstream_duplicate_content_length",
        "bad_content_length" => "upstream_bad_content_length",
        "content_length_with_transfer_encoding" => "upstream_content_length_with_coding",
        "transfer_encoding_not_chunked" => "upstream_transfer_encoding",
        _ => "upstream_malformed_head",
    }
}

/// Whether a comma-separated header value holds `token` (ASCII case-insensitive).
pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Reads bytes into `buf` until it holds a complete head, and splits the head off.
/// `Ok(None)`: the peer closed cleanly before a head began. Empty lines before a request
/// line are skipped (RFC 9112 §2.2).
pub async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    max_head: usize,
) -> Result<Option<Bytes>, ReadError> {
    let mut scanned: usize = 0;
    loop {
        if let Some(head) = take_head(buf, scanned, max_head)? {
            return Ok(Some(head));
        }
        scanned = buf.len();
        if fill(io, buf).await? == 0 {
            return match buf.is_empty() {
                true => Ok(None),
                false => Err(ReadError::Truncated),
            };
        }
    }
}

/// A whole head from the front of `buf`, if it holds one (blank lines before it skipped):
/// no read, so a caller whose last read brought the whole head, as a client's usually does,
/// needs no timer for it. `scanned`: bytes already searched for the blank line.
pub fn take_head(
    buf: &mut BytesMut,
    scanned: usize,
    max_head: usize,
) -> Result<Option<Bytes>, HeadError> {
    while buf.first().is_some_and(|b| matches!(b, b'\r' | b'\n')) {
        buf.advance(1);
    }
    let start = scanned.saturating_sub(3);
    if let Some(end) = find_blank_line(&buf[start.min(buf.len())..]) {
        // The limit holds however the head arrived, in one read or many.
        if start + end > max_head {
            return Err(HeadError("head_too_large"));
        }
        return Ok(Some(buf.split_to(start + end).freeze()));
    }
    if buf.len() > max_head {
        return Err(HeadError("head_too_large"));
    }
    Ok(None)
}

fn find_blank_line(b: &[u8]) -> Option<usize> {
    // memchr's vectorised search: a head with a JSON Web Token is a kilobyte, and a
    // byte-at-a-time window cost more than parsing it.
    memchr::memmem::find(b, b"\r\n\r\n").map(|i| i + 4)
}

/// One read into the spare capacity of `buf`.
pub async fn fill<R: AsyncRead + Unpin>(io: &mut R, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 1024 {
        buffers::reserve(buf, READ_CHUNK);
    }
    io.read_buf(buf).await
}

/// Where a body decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Fixed(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailer,
    UntilClose,
    Done,
}

/// Follows a body's framing over bytes read into a shared buffer (the connection's), and
/// hands out its data. What follows the body stays in the buffer.
#[derive(Debug)]
pub struct BodyDecoder {
    state: BodyState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("chunk_size")]
    ChunkSize,
    #[error("chunk_framing")]
    ChunkFraming,
    #[error("chunk_line_too_long")]
    LineTooLong,
}

impl BodyError {
    pub fn reason(self) -> &'static str {
        match self {
            BodyError::ChunkSize => "chunk_size",
            BodyError::ChunkFraming => "chunk_framing",
            BodyError::LineTooLong => "chunk_line_too_long",
        }
    }
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> BodyDecoder {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Fixed(n),
            Framing::Chunked => BodyState::ChunkSize,
            Framing::Close => BodyState::UntilClose,
        };
        BodyDecoder { state }
    }

    pub fn is_done(&self) -> bool {
        self.state == BodyState::Done
    }

    /// The next piece of body data from `buf`, or `None` when more bytes are needed (or the
    /// body is done: see [`is_done`](Self::is_done)). Consumes framing bytes as it goes.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, BodyError> {
        loop {
            match self.state {
                BodyState::Done => return Ok(None),
                BodyState::Fixed(n) | BodyState::ChunkData(n) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = n.min(buf.len() as u64);
                    let data = buf.split_to(take as usize).freeze();
                    let left = n - take;
                    self.state = match (self.state, left) {
                        (BodyState::Fixed(_), 0) => BodyState::Done,
                        (BodyState::Fixed(_), l) => BodyState::Fixed(l),
                        (_, 0) => BodyState::ChunkEnd,
                        (_, l) => BodyState::ChunkData(l),
                    };
                    return Ok(Some(data));
                }
                BodyState::UntilClose => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(buf.split().freeze()));
                }
                BodyState::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BodyError::ChunkFraming);
                    }
                    buf.advance(2);
                    self.state = BodyState::ChunkSize;
                }
                BodyState::ChunkSize => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    self.state = match chunk_size(&line)? {
                        0 => BodyState::Trailer,
                        n => BodyState::ChunkData(n),
                    };
                }
                BodyState::Trailer => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    if line.is_empty() {
                        self.state = BodyState::Done;
                    }
                }
            }
        }
    }

    /// The end of input was reached: fine only for a close-delimited body.
    pub fn finish_at_eof(&mut self) -> Result<(), ReadError> {
        match self.state {
            BodyState::UntilClose | BodyState::Done => {
                self.state = BodyState::Done;
                Ok(())
            }
            _ => Err(ReadError::Truncated),
        }
    }
}

/// A CRLF-terminated line without its CRLF; `None` when the line is not complete yet.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, BodyError> {
    match buf.iter().position(|&b| b == b'\n') {
        None if buf.len() > MAX_LINE => Err(BodyError::LineTooLong),
        None => Ok(None),
        Some(nl) if nl > MAX_LINE => Err(BodyError::LineTooLong),
        Some(nl) => {
            let mut line = buf.split_to(nl + 1);
            if !line.ends_with(b"\r\n") {
                return Err(BodyError::ChunkFraming);
            }
            line.truncate(nl - 1);
            Ok(Some(line))
        }
    }
}

fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    std::str::from_utf8(digits)
        .ok()
        .filter(|d| !d.is_empty() && d.len() <= 15 && d.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|d| u64::from_str_radix(d, 16).ok())
        .ok_or(BodyError::ChunkSize)
}

/// Headers that belong to one hop (RFC 9110 §7.6.1) and are never passed on; `Connection`
/// may name more.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

fn always_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Whether a header must not be passed on: hop-by-hop, or named by `Connection` (`named`,
/// from [`Fields::connection_named`]), which may never remove what the proxy relies on.
pub fn is_hop_by_hop(name: &[u8], named: &[&[u8]]) -> bool {
    if always_hop_by_hop(name) {
        return true;
    }
    let protected: [&[u8]; 3] = [b"host", b"authorization", b"content-length"];
    !protected.iter().any(|p| name.eq_ignore_ascii_case(p))
        && named.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Appends `name: value\r\n`.
pub fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends a decimal number without allocating.
pub fn put_number(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends an address as `Display` writes it. IPv4, by far the usual client, is written
/// octet by octet: the formatting machinery costs a thousand instructions a request.
pub fn put_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    use std::io::Write as _;
    match ip {
        std::net::IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            put_number(out, u64::from(a));
            for octet in [b, c, d] {
                out.push(b'.');
                put_number(out, u64::from(octet));
            }
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends the header of one chunk of a chunked body.
pub fn put_chunk_size(out: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &[u8]) -> Result<RequestHead, HeadError> {
        RequestHead::parse(Bytes::copy_from_slice(text), 32)
    }

    /// A head is taken from what is buffered only when it is whole; what follows it stays;
    /// blank lines before it go; the size limit holds whether the head is whole or not.
    #[test]
    fn a_buffered_head_is_taken_whole_or_not_at_all() {
        let take = |text: &[u8], scanned: usize, max: usize| {
            let mut buf = BytesMut::from(text);
            let head = take_head(&mut buf, scanned, max);
            (head, buf)
        };
        let (head, rest) = take(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nBODY", 0, 64);
        assert_eq!(
            head.unwrap().as_deref(),
            Some(&b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..])
        );
        assert_eq!(&rest[..], b"BODY");
        // Not whole yet: nothing taken, nothing lost.
        let (head, rest) = take(b"GET / HTTP/1.1\r\nHost: a\r\n", 0, 64);
        assert_eq!(head.unwrap(), None);
        assert_eq!(&rest[..], b"GET / HTTP/1.1\r\nHost: a\r\n");
        // A blank line that straddles what was already searched is still found.
        let text = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let (head, _) = take(text, text.len() - 2, 64);
        assert_eq!(head.unwrap().map(|h| h.len()), Some(text.len()));
        // Over the limit, whole or still arriving.
        let (head, _) = take(text, 0, text.len() - 1);
        assert_eq!(head.unwrap_err().0, "head_too_large");
        let (head, _) = take(&[b'a'; 65], 0, 64);
        assert_eq!(head.unwrap_err().0, "head_too_large");
    }

    #[test]
    fn connection_lists_only_what_it_adds_to_the_hop_by_hop_headers() {
        let h = parse(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret ,TE\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let named = h.fields.connection_named();
        assert_eq!(named, [&b"X-Secret"[..], b"close"]);
        for (name, hop) in [
            (&b"x-secret"[..], true),
            (b"Keep-Alive", true),
            (b"te", true),
            (b"close", true),
            (b"host", false),
            (b"x-other", false),
        ] {
            assert_eq!(is_hop_by_hop(name, &named), hop, "{name:?}");
        }
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "198.51.100.255",
            "192.0.2.1",
            "2001:db8::1",
            "::ffff:203.0.113.4",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            put_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn a_plain_request_parses_once_with_its_framing() {
        let h = parse(b"POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\n").unwrap();
        assert_eq!(h.method(), "POST");
        assert_eq!(h.target(), "/EWS/Exchange.asmx");
        assert_eq!(h.minor, 1);
        assert_eq!(h.framing, Ok(Framing::Length(5)));
        assert_eq!(h.fields.all("X-A").collect::<Vec<_>>(), vec![b"1", b"2"]);
        assert_eq!(h.fields.text("host"), Some("x"));
        let chunked = parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap();
        assert_eq!(chunked.framing, Ok(Framing::Chunked));
        assert_eq!(
            parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().framing,
            Ok(Framing::Empty)
        );
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let cases: [(&[u8], &str); 10] = [
            (
                b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
                "content_length_with_transfer_encoding",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
                "content_length_with_transfer_encoding",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
                "duplicate_content_length",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                "transfer_encoding_not_chunked",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                "duplicate_transfer_encoding",
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: +4\r\n\r\n", "bad_content_length"),
            (b"POST / HTTP/1.1\r\nContent-Length: 4, 4\r\n\r\n", "bad_content_length"),
            (b"POST / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n", "malformed_head"),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                "transfer_encoding_in_http10",
            ),
            (b"POST / HTTP/1.1\r\nContent Length: 4\r\n\r\n", "malformed_head"),
        ];
        for (input, reason) in cases {
            assert_eq!(
                parse(input).and_then(|h| h.framing).unwrap_err(),
                HeadError(reason),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        let many: String = (0..40).map(|i| format!("X-{i}: 1\r\n")).collect();
        let e = parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).unwrap_err();
        assert_eq!(e, HeadError("too_many_headers"));
    }

    fn decode_all(
        framing: Framing,
        input: &[u8],
        split: usize,
    ) -> Result<(Vec<u8>, Vec<u8>), BodyError> {
        let mut d = BodyDecoder::new(framing);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for part in input.chunks(split.max(1)) {
            buf.extend_from_slice(part);
            while let Some(data) = d.decode(&mut buf)? {
                out.extend_from_slice(&data);
            }
            if d.is_done() {
                break;
            }
        }
        assert!(d.is_done(), "body not done");
        let rest = buf.to_vec();
        Ok((out, rest))
    }

    #[test]
    fn chunked_bodies_decode_in_any_split_and_leave_the_next_request() {
        let input = b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\nGET /next";
        for split in [1, 2, 3, 5, 7, 64] {
            let (body, rest) = decode_all(Framing::Chunked, input, split).unwrap();
            assert_eq!(body, b"abcde", "split {split}");
            // What follows the body is the next request's, whole once all bytes arrived.
            if split >= input.len() {
                assert_eq!(rest, b"GET /next");
            }
        }
        let (body, rest) = decode_all(Framing::Length(5), b"helloGET", 64).unwrap();
        assert_eq!(
            (body.as_slice(), rest.as_slice()),
            (&b"hello"[..], &b"GET"[..])
        );
    }

    #[test]
    fn bad_chunks_are_refused() {
        assert_eq!(
            decode_all(Framing::Chunked, b"zz\r\n", 64),
            Err(BodyError::ChunkSize)
        );
        assert_eq!(
            decode_all(Framing::Chunked, b"-1\r\n", 64),
            Err(BodyError::ChunkSize)
        );
        assert_eq!(
            decode_all(Framing::Chunked, b"1\r\naXY", 64),
            Err(BodyError::ChunkFraming)
        );
        assert_eq!(
            decode_all(Framing::Chunked, b"1\naXY", 64),
            Err(BodyError::ChunkFraming)
        );
        let long = format!("1;{}\r\n", "x".repeat(5000));
        assert_eq!(
            decode_all(Framing::Chunked, long.as_bytes(), 64),
            Err(BodyError::LineTooLong)
        );
    }

    #[test]
    fn responses_know_their_framing() {
        let r = |t: &[u8]| ResponseHead::parse(Bytes::copy_from_slice(t), 32).unwrap();
        assert_eq!(
            r(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n").framing(false),
            Ok(Framing::Length(3))
        );
        assert_eq!(
            r(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n").framing(true),
            Ok(Framing::Empty)
        );
        assert_eq!(
            r(b"HTTP/1.1 204 No Content\r\n\r\n").framing(false),
            Ok(Framing::Empty)
        );
        assert_eq!(
            r(b"HTTP/1.1 200 OK\r\n\r\n").framing(false),
            Ok(Framing::Close)
        );
        assert_eq!(
            r(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n").framing(false),
            Err(HeadError("upstream_duplicate_content_length"))
        );
        assert!(r(b"HTTP/1.1 200 OK\r\n\r\n").keeps_alive());
        assert!(!r(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").keeps_alive());
        assert!(!r(b"HTTP/1.0 200 OK\r\n\r\n").keeps_alive());
        assert_eq!(
            r(b"HTTP/1.1 401 Unauthorized\r\n\r\n").reason(),
            "Unauthorized"
        );
    }

    #[test]
    fn numbers_are_written_without_allocating() {
        let mut out = Vec::new();
        put_number(&mut out, 0);
        out.push(b' ');
        put_number(&mut out, 1_048_576);
        out.push(b' ');
        put_chunk_size(&mut out, 0x1f3);
        assert_eq!(out, b"0 1048576 1f3\r\n");
    }

    #[tokio::test]
    async fn heads_are_read_across_reads_and_limited() {
        let input: &[u8] = b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\nrest";
        let mut io = input;
        let mut buf = BytesMut::new();
        let head = read_head(&mut io, &mut buf, 1024).await.unwrap().unwrap();
        assert_eq!(&head[..], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(&buf[..], b"rest");
        let mut big: &[u8] = &[b'a'; 5000];
        let e = read_head(&mut big, &mut BytesMut::new(), 1024)
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Head(HeadError("head_too_large"))));
        let mut cut: &[u8] = b"GET / HTTP/1.1\r\n";
        assert!(matches!(
            read_head(&mut cut, &mut BytesMut::new(), 1024).await,
            Err(ReadError::Truncated)
        ));
        let mut none: &[u8] = b"";
        assert!(read_head(&mut none, &mut BytesMut::new(), 1024)
            .await
            .unwrap()
            .is_none());
    }

    // Found with the h1 fuzz target (its reads-do-not-matter property): a head over the
    // limit passed when it arrived in one read, and was refused when it came in several.
    #[tokio::test]
    async fn the_head_limit_does_not_depend_on_the_reads() {
        let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        head.resize(1100, b'a');
        head.extend_from_slice(b"\r\n\r\n");
        let mut one_read: &[u8] = &head;
        let r = read_head(&mut one_read, &mut BytesMut::new(), 1024).await;
        assert!(
            matches!(r, Err(ReadError::Head(HeadError("head_too_large")))),
            "{r:?}"
        );
    }
}
