//! Strict HTTP/1.1 framing. hyper parses every request, but it quietly repairs what a
//! smuggler relies on: it drops a `Content-Length` sent beside `Transfer-Encoding` and
//! folds identical duplicate `Content-Length` headers into one. Exchange and the devices in
//! between may read such a request differently, so ewsgate refuses it instead.
//!
//! `Framing` wraps the client's stream and sees every byte before hyper does. It reads
//! each request head with httparse, checks it, and then follows the body's framing (a
//! length, or chunks) to the next head, queueing one `HeadCheck` per request. The proxy
//! takes the check for each request hyper hands it, in order; any refusal closes the
//! connection, so the two parsers never have to agree past a bad request.
//!
//! The wrapper also owns the connection's two clocks, because it knows where a head begins:
//! the head timeout runs from the first byte of a request head until its end (a slow head
//! is refused as `head_timeout`), and the idle timeout covers the rest: no byte either way
//! for that long closes the connection. hyper's own header timer would run while a
//! keep-alive connection waits for its next request, closing idle connections early.

use std::{
    collections::VecDeque,
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{sleep, Instant, Sleep},
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadCheck {
    Ok,
    Refused(&'static str),
}

pub type Checks = Arc<Mutex<VecDeque<HeadCheck>>>;

/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Fixed(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(u8),
    Trailer,
    /// After a refusal: bytes are no longer followed.
    Stopped,
}

/// The framing tracker alone, fed bytes in any split.
pub struct Tracker {
    state: State,
    line: Vec<u8>,
    max_head: usize,
    max_headers: usize,
    checks: Checks,
}

impl Tracker {
    pub fn new(max_head: usize, max_headers: usize, checks: Checks) -> Tracker {
        Tracker {
            state: State::Head,
            line: Vec::new(),
            max_head,
            max_headers,
            checks,
        }
    }

    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            bytes = match self.state {
                State::Stopped => return,
                State::Head => self.head(bytes),
                State::Fixed(n) => {
                    let take = n.min(bytes.len() as u64);
                    self.state = if take == n {
                        State::Head
                    } else {
                        State::Fixed(n - take)
                    };
                    &bytes[take as usize..]
                }
                State::ChunkData(n) => {
                    let take = n.min(bytes.len() as u64);
                    self.state = if take == n {
                        State::ChunkEnd(2)
                    } else {
                        State::ChunkData(n - take)
                    };
                    &bytes[take as usize..]
                }
                State::ChunkEnd(left) => {
                    let expect: &[u8] = if left == 2 { b"\r\n" } else { b"\n" };
                    if bytes[0] != expect[0] {
                        self.refuse("chunk_framing");
                        return;
                    }
                    self.state = if left == 1 {
                        State::ChunkSize
                    } else {
                        State::ChunkEnd(1)
                    };
                    &bytes[1..]
                }
                State::ChunkSize | State::Trailer => self.line_state(bytes),
            };
        }
    }

    /// True once part of a request head has arrived and its end has not.
    fn in_head(&self) -> bool {
        self.state == State::Head && !self.line.is_empty()
    }

    fn refuse(&mut self, reason: &'static str) {
        self.push(HeadCheck::Refused(reason));
        self.state = State::Stopped;
    }

    fn push(&self, check: HeadCheck) {
        if let Ok(mut q) = self.checks.lock() {
            q.push_back(check);
        }
    }

    fn head<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        // RFC 9112 §2.2: empty lines before a request line are ignored.
        let mut bytes = bytes;
        while self.line.is_empty() && matches!(bytes.first(), Some(b'\r' | b'\n')) {
            bytes = &bytes[1..];
        }
        let start = self.line.len().saturating_sub(3);
        let room = self.max_head + 4 - self.line.len().min(self.max_head + 4);
        let take = bytes.len().min(room.max(1));
        self.line.extend_from_slice(&bytes[..take]);
        let Some(end) = find_blank_line(&self.line[start..]).map(|i| start + i) else {
            if self.line.len() > self.max_head {
                self.refuse("head_too_large");
            }
            return &bytes[take..];
        };
        let leftover = self.line.len() - end;
        let head = std::mem::take(&mut self.line);
        match self.check(&head[..end]) {
            Ok(next) => {
                self.push(HeadCheck::Ok);
                self.state = next;
            }
            Err(reason) => self.refuse(reason),
        }
        // Bytes copied past the head's end belong to the body or the next request.
        &bytes[take - leftover..]
    }

    fn check(&self, head: &[u8]) -> Result<State, &'static str> {
        let mut headers = vec![httparse::EMPTY_HEADER; self.max_headers];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err("malformed_head"),
            Err(httparse::Error::TooManyHeaders) => return Err("too_many_headers"),
            Err(_) => return Err("malformed_head"),
        }
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut te_seen = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                if length.is_some() {
                    return Err("duplicate_content_length");
                }
                let text = std::str::from_utf8(h.value).map_err(|_| "bad_content_length")?;
                if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.len() > 15 {
                    return Err("bad_content_length");
                }
                length = Some(text.parse().map_err(|_| "bad_content_length")?);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                if te_seen {
                    return Err("duplicate_transfer_encoding");
                }
                te_seen = true;
                chunked = h.value.eq_ignore_ascii_case(b"chunked");
                if !chunked {
                    return Err("transfer_encoding_not_chunked");
                }
            }
        }
        if te_seen && length.is_some() {
            return Err("content_length_with_transfer_encoding");
        }
        if te_seen && req.version != Some(1) {
            return Err("transfer_encoding_in_http10");
        }
        Ok(match (chunked, length) {
            (true, _) => State::ChunkSize,
            (false, Some(0)) | (false, None) => State::Head,
            (false, Some(n)) => State::Fixed(n),
        })
    }

    /// Chunk-size lines and trailer lines.
    fn line_state<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let Some(nl) = bytes.iter().position(|&b| b == b'\n') else {
            self.line.extend_from_slice(bytes);
            if self.line.len() > MAX_LINE {
                self.refuse("chunk_line_too_long");
            }
            return &[];
        };
        self.line.extend_from_slice(&bytes[..=nl]);
        let line = std::mem::take(&mut self.line);
        let Some(text) = line.strip_suffix(b"\r\n") else {
            self.refuse("chunk_framing");
            return &[];
        };
        if self.state == State::Trailer {
            if text.is_empty() {
                self.state = State::Head;
            }
            return &bytes[nl + 1..];
        }
        let digits = text.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.is_empty() && d.len() <= 15)
            .and_then(|d| u64::from_str_radix(d, 16).ok());
        match size {
            Some(0) => self.state = State::Trailer,
            Some(n) => self.state = State::ChunkData(n),
            None => self.refuse("chunk_size"),
        }
        &bytes[nl + 1..]
    }
}

fn find_blank_line(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The client stream as hyper sees it: every byte read goes through the tracker.
pub struct Framing<IO> {
    io: IO,
    tracker: Tracker,
    idle: Duration,
    head_timeout: Duration,
    /// When the head being read began; `None` between heads.
    head_started: Option<Instant>,
    timer: Pin<Box<Sleep>>,
}

impl<IO> Framing<IO> {
    pub fn new(io: IO, tracker: Tracker, idle: Duration, head_timeout: Duration) -> Framing<IO> {
        Framing {
            io,
            tracker,
            idle,
            head_timeout,
            head_started: None,
            timer: Box::pin(sleep(idle)),
        }
    }

    /// Bytes moved: re-arm the clock that applies now.
    fn touch(&mut self) {
        let now = Instant::now();
        let deadline = if self.tracker.in_head() {
            let started = *self.head_started.get_or_insert(now);
            started + self.head_timeout
        } else {
            self.head_started = None;
            now + self.idle
        };
        self.timer.as_mut().reset(deadline);
    }

    fn timed_out(&mut self) -> io::Error {
        if self.tracker.in_head() {
            self.tracker.refuse("head_timeout");
            return io::Error::new(io::ErrorKind::TimedOut, "head timeout");
        }
        io::Error::new(io::ErrorKind::TimedOut, "idle timeout")
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Framing<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let this = &mut *self;
                this.tracker.feed(&buf.filled()[before..]);
                if buf.filled().len() > before {
                    this.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if self.timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(self.timed_out()));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Framing<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8], split: usize) -> Vec<HeadCheck> {
        let checks: Checks = Default::default();
        let mut t = Tracker::new(8192, 32, checks.clone());
        for part in input.chunks(split.max(1)) {
            t.feed(part);
        }
        let q = checks.lock().unwrap();
        q.iter().cloned().collect()
    }

    fn all_splits(input: &[u8]) -> Vec<HeadCheck> {
        let whole = run(input, input.len());
        for split in [1, 2, 3, 5, 7, 64] {
            assert_eq!(run(input, split), whole, "split {split}");
        }
        whole
    }

    #[test]
    fn follows_lengths_and_chunks_across_keep_alive() {
        let input = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n\
GET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(all_splits(input), vec![HeadCheck::Ok; 3]);
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let cases: [(&[u8], &str); 7] = [
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
                b"POST / HTTP/1.1\r\nContent-Length: +4\r\n\r\n",
                "bad_content_length",
            ),
            (
                b"POST / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
                "malformed_head",
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                "transfer_encoding_in_http10",
            ),
        ];
        for (input, reason) in cases {
            assert_eq!(
                all_splits(input),
                vec![HeadCheck::Refused(reason)],
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn a_refusal_stops_tracking() {
        let input = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nxGET / HTTP/1.1\r\n\r\n";
        assert_eq!(
            all_splits(input),
            vec![HeadCheck::Refused("duplicate_content_length")]
        );
    }

    #[test]
    fn oversized_heads_and_bad_chunks() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(vec![b'a'; 9000]);
        assert_eq!(run(&big, 100), vec![HeadCheck::Refused("head_too_large")]);
        let bad = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert_eq!(
            all_splits(bad),
            vec![HeadCheck::Ok, HeadCheck::Refused("chunk_size")]
        );
        let bad_end = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXY";
        assert_eq!(
            all_splits(bad_end),
            vec![HeadCheck::Ok, HeadCheck::Refused("chunk_framing")]
        );
    }
}
