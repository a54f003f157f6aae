//! The proxy's HTTP/1.1 reader (`proxy::h1`): request heads (`read_head`,
//! `RequestHead::parse`) and bodies (`BodyDecoder`), driven over a client's byte stream the
//! way a connection reads it, one request after another.
//!
//! Properties beyond "no panic":
//! - what is read (heads, refusals, bodies) does not depend on how the stream is split into
//!   reads: whole, in random pieces, or a byte at a time;
//! - no body piece is empty (forwarded as a chunk, an empty piece would end the body);
//! - a length-delimited body is exactly its length;
//! - what the proxy forwards reads back the same: the head as the upstream phase writes it
//!   (request line, the fields that are not hop-by-hop, its own framing header) parses to
//!   the same fields and framing, both by `RequestHead::parse` and by an independent
//!   reader (httparse with hyper 1.x's framing rules), and the body re-chunked as the
//!   upstream phase chunks it reads back, by both, as the same bytes with nothing after.
#![no_main]

use std::{
    collections::VecDeque,
    future::Future,
    io,
    pin::{pin, Pin},
    task::{Context, Poll, Waker},
};

use bytes::{Bytes, BytesMut};
use ewsgate::proxy::h1::{
    fill, is_hop_by_hop, put_chunk_size, put_header, read_head, BodyDecoder, Framing, ReadError,
    RequestHead,
};
use ewsgate_fuzz::{random_splits, Rng};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// As the proxy's defaults are scaled down, so that the limits are reached.
const MAX_HEAD: usize = 1024;
const MAX_HEADERS: usize = 16;

fuzz_target!(|data: &[u8]| {
    let mut rng = Rng::from_input(data);
    let whole = serve(vec![data]);
    let pieces = random_splits(data, &mut rng);
    assert_eq!(serve(pieces), whole, "what is read depends on the reads");
    let bytes: Vec<&[u8]> = data.chunks(1).collect();
    assert_eq!(
        serve(bytes),
        whole,
        "read a byte at a time, it reads otherwise"
    );
});

#[derive(Debug, PartialEq)]
enum Event {
    Head {
        method: String,
        target: String,
        minor: u8,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        framing: Result<Framing, &'static str>,
    },
    Refused(&'static str),
    Body(Vec<u8>),
    Truncated,
}

/// A client stream handed over in the given pieces, one per read.
struct Reads<'a>(VecDeque<&'a [u8]>);

impl AsyncRead for Reads<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(p) = self.0.pop_front() {
            let n = p.len().min(buf.remaining());
            buf.put_slice(&p[..n]);
            if n < p.len() {
                self.0.push_front(&p[n..]);
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Runs a future whose I/O never waits.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

/// The connection loop of `proxy::session`, without the phases: what it reads.
fn serve(pieces: Vec<&[u8]>) -> Vec<Event> {
    block_on(async {
        let mut io = Reads(pieces.into_iter().filter(|p| !p.is_empty()).collect());
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        loop {
            if buf.is_empty() && fill(&mut io, &mut buf).await.unwrap() == 0 {
                return out;
            }
            let raw = match read_head(&mut io, &mut buf, MAX_HEAD).await {
                Ok(Some(raw)) => raw,
                Ok(None) => return out,
                Err(ReadError::Head(e)) => {
                    out.push(Event::Refused(e.0));
                    return out;
                }
                Err(_) => {
                    out.push(Event::Truncated);
                    return out;
                }
            };
            let head = match RequestHead::parse(raw, MAX_HEADERS) {
                Ok(h) => h,
                Err(e) => {
                    out.push(Event::Refused(e.0));
                    return out;
                }
            };
            out.push(describe(&head));
            let Ok(framing) = head.framing else {
                return out;
            };
            let mut decoder = BodyDecoder::new(framing);
            let mut pieces: Vec<Bytes> = Vec::new();
            loop {
                match decoder.decode(&mut buf) {
                    Err(e) => {
                        out.push(Event::Refused(e.reason()));
                        return out;
                    }
                    Ok(Some(piece)) => {
                        assert!(!piece.is_empty(), "an empty body piece");
                        pieces.push(piece);
                    }
                    Ok(None) if decoder.is_done() => break,
                    Ok(None) => {
                        if fill(&mut io, &mut buf).await.unwrap() == 0 {
                            if decoder.finish_at_eof().is_err() {
                                out.push(Event::Truncated);
                                return out;
                            }
                            break;
                        }
                    }
                }
            }
            let body: Vec<u8> = pieces.concat();
            if let Framing::Length(n) = framing {
                assert_eq!(body.len() as u64, n, "a body is not its length");
            }
            forwarded_reads_back(&head, framing, &pieces);
            out.push(Event::Body(body));
        }
    })
}

fn describe(head: &RequestHead) -> Event {
    Event::Head {
        method: head.method().to_string(),
        target: head.target().to_string(),
        minor: head.minor,
        fields: head
            .fields
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect(),
        framing: head.framing.map_err(|e| e.0),
    }
}

/// The request as the upstream phase writes it, read back.
fn forwarded_reads_back(head: &RequestHead, framing: Framing, pieces: &[Bytes]) {
    let chunked = framing == Framing::Chunked;
    let mut out = Vec::new();
    out.extend_from_slice(head.method().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let named = head.fields.connection_named();
    let kept: Vec<(&[u8], &[u8])> = head
        .fields
        .iter()
        .filter(|(n, _)| !is_hop_by_hop(n, &named))
        .collect();
    for (n, v) in &kept {
        put_header(&mut out, n, v);
    }
    match framing {
        Framing::Length(n) => put_header(&mut out, b"Content-Length", n.to_string().as_bytes()),
        Framing::Chunked => put_header(&mut out, b"Transfer-Encoding", b"chunked"),
        Framing::Empty | Framing::Close => {}
    }
    out.extend_from_slice(b"\r\n");
    let head_len = out.len();
    for piece in pieces {
        if chunked {
            put_chunk_size(&mut out, piece.len());
        }
        out.extend_from_slice(piece);
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    let body: Vec<u8> = pieces.concat();

    // Read back by the proxy's own reader.
    let again = RequestHead::parse(Bytes::copy_from_slice(&out[..head_len]), MAX_HEADERS + 4)
        .expect("the forwarded head parses");
    assert_eq!(
        (again.method(), again.target()),
        (head.method(), head.target())
    );
    assert_eq!(again.framing, Ok(framing), "forwarded framing");
    let mut rest = BytesMut::from(&out[head_len..]);
    let mut decoder = BodyDecoder::new(framing);
    let mut read = Vec::new();
    while let Some(p) = decoder
        .decode(&mut rest)
        .expect("the forwarded body decodes")
    {
        read.extend_from_slice(&p);
    }
    assert!(
        decoder.is_done() && rest.is_empty(),
        "the forwarded body ends early or late"
    );
    assert_eq!(read, body);

    // Read back by another reader: httparse and hyper's framing.
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 4];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(&out) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("httparse reads the forwarded head as {other:?}"),
    };
    assert_eq!(n, head_len, "httparse ends the forwarded head elsewhere");
    let fields: Vec<(&[u8], &[u8])> = req
        .headers
        .iter()
        .map(|h| (h.name.as_bytes(), h.value))
        .collect();
    assert_eq!(
        fields[..kept.len()],
        kept[..],
        "httparse reads other fields"
    );
    let (model, _) = framing_of(&req).expect("hyper would refuse the forwarded head");
    let len = match (model, framing) {
        (Body::Chunked, Framing::Chunked) => chunked_len(&out[n..]).expect("hyper's chunk reader"),
        (Body::Length(m), Framing::Length(l)) if m == l => m as usize,
        (Body::Length(0), Framing::Empty) => 0,
        _ => panic!("hyper reads another framing than {framing:?}"),
    };
    assert_eq!(
        n + len,
        out.len(),
        "hyper reads the forwarded body to another end"
    );
}

#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The reader waits for more bytes.
    Partial,
    /// The reader refuses the stream or closes after the request.
    Closed,
}

enum Body {
    Length(u64),
    Chunked,
}

/// hyper 1.x `role::Server::parse`: the body's framing and whether the connection stays
/// open; `None` where hyper refuses the head's framing.
fn framing_of(req: &httparse::Request) -> Option<(Body, bool)> {
    let http11 = req.version? == 1;
    // The proxy refuses CONNECT and upgrades with `Connection: close`.
    let upgrade = req
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("upgrade"));
    let refused = req.method == Some("CONNECT") || upgrade;
    let mut keep_alive = http11;
    let (mut length, mut is_cl, mut is_te, mut chunked) = (None, false, false, false);
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let value = std::str::from_utf8(h.value).ok();
        match name.as_str() {
            "transfer-encoding" => {
                if !http11 {
                    return None;
                }
                is_te = true;
                if is_cl {
                    length = None;
                }
                chunked = value
                    .filter(|v| v.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t'))
                    .and_then(|v| v.rsplit(',').next())
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            }
            "content-length" => {
                is_cl = true;
                if is_te {
                    continue;
                }
                let mut this = None;
                for v in value?.split(',') {
                    let v = v.trim();
                    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    let n: u64 = v.parse().ok()?;
                    if this.is_some_and(|p| p != n) {
                        return None;
                    }
                    this = Some(n);
                }
                let n = this?;
                if length.is_some_and(|p| p != n) {
                    return None;
                }
                length = Some(n);
            }
            "connection" => {
                let v = value.unwrap_or("").to_ascii_lowercase();
                let tokens = || v.split(',').map(str::trim);
                if tokens().any(|t| t == "close") {
                    keep_alive = false;
                } else if !http11 && tokens().any(|t| t == "keep-alive") {
                    keep_alive = true;
                }
            }
            _ => {}
        }
    }
    if is_te && !chunked {
        return None;
    }
    if is_te && is_cl {
        keep_alive = false;
    }
    let body = if chunked {
        Body::Chunked
    } else {
        Body::Length(length.unwrap_or(0))
    };
    Some((body, keep_alive && !refused))
}

/// hyper 1.x `decode::ChunkedState`: the length of a chunked body with its trailers.
fn chunked_len(data: &[u8]) -> Result<usize, Stop> {
    #[derive(Clone, Copy)]
    enum S {
        Start,
        Size,
        SizeLws,
        Extension,
        SizeLf,
        BodyCr,
        BodyLf,
        EndCr,
        Trailer,
        TrailerLf,
        EndLf,
    }
    let mut s = S::Start;
    let mut size: u64 = 0;
    let mut at = 0;
    loop {
        let Some(&b) = data.get(at) else {
            return Err(Stop::Partial);
        };
        at += 1;
        let digit = (b as char).to_digit(16).map(u64::from);
        s = match (s, b, digit) {
            (S::Start | S::Size, _, Some(d)) => {
                size = size
                    .checked_mul(16)
                    .and_then(|x| x.checked_add(d))
                    .ok_or(Stop::Closed)?;
                S::Size
            }
            (S::Start, ..) => return Err(Stop::Closed),
            (S::Size | S::SizeLws, b'\t' | b' ', _) => S::SizeLws,
            (S::Size | S::SizeLws, b';', _) => S::Extension,
            (S::Size | S::SizeLws | S::Extension, b'\r', _) => S::SizeLf,
            (S::Size | S::SizeLws, ..) => return Err(Stop::Closed),
            (S::Extension, b'\n', _) => return Err(Stop::Closed),
            (S::Extension, ..) => S::Extension,
            (S::SizeLf, b'\n', _) if size == 0 => S::EndCr,
            (S::SizeLf, b'\n', _) => {
                let n = usize::try_from(size).map_err(|_| Stop::Partial)?;
                if data.len() - at < n {
                    return Err(Stop::Partial);
                }
                at += n;
                size = 0;
                S::BodyCr
            }
            (S::SizeLf, ..) => return Err(Stop::Closed),
            (S::BodyCr, b'\r', _) => S::BodyLf,
            (S::BodyLf, b'\n', _) => S::Start,
            (S::BodyCr | S::BodyLf, ..) => return Err(Stop::Closed),
            (S::EndCr, b'\r', _) => S::EndLf,
            (S::EndCr, ..) => S::Trailer,
            (S::Trailer, b'\r', _) => S::TrailerLf,
            (S::Trailer, ..) => S::Trailer,
            (S::TrailerLf, b'\n', _) => S::EndCr,
            (S::TrailerLf, ..) => return Err(Stop::Closed),
            (S::EndLf, b'\n', _) => return Ok(at),
            (S::EndLf, ..) => return Err(Stop::Closed),
        };
    }
}
