//! The strict HTTP/1.1 framing tracker (`strict::Tracker`), fed a client's byte stream.
//!
//! Properties beyond "no panic":
//! - the checks do not depend on how the stream is split into reads;
//! - every head the tracker passes is a head hyper reads the same way: httparse parses it
//!   complete, ending on the same byte, and hyper's own body framing (lengths and chunks,
//!   modelled here after hyper 1.x) puts the next head where the tracker does;
//! - hyper never reads a request head the tracker has not judged, unless the tracker
//!   refused the connection first.
#![no_main]

use ewsgate::strict::{Checks, HeadCheck, Tracker};
use ewsgate_fuzz::{random_splits, Rng};
use libfuzzer_sys::fuzz_target;

/// As the proxy's header_count; the reference parses with the same limit.
const MAX_HEADERS: usize = 32;
/// Larger than any input: the differential run never refuses on size.
const LARGE_HEAD: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut rng = Rng::from_input(data);
    // Small limits too, so that the size refusals are split-tested.
    for (max_head, max_headers) in [(LARGE_HEAD, MAX_HEADERS), (200, 4)] {
        let whole = run(&[data], max_head, max_headers);
        let parts = random_splits(data, &mut rng);
        assert_eq!(
            run(&parts, max_head, max_headers),
            whole,
            "the checks depend on how the stream is split"
        );
    }
    compare_with_hyper(data);
});

fn run(parts: &[&[u8]], max_head: usize, max_headers: usize) -> Vec<HeadCheck> {
    let checks: Checks = Default::default();
    let mut t = Tracker::new(max_head, max_headers, checks.clone());
    for p in parts {
        t.feed(p);
    }
    let q = checks.lock().unwrap();
    q.iter().cloned().collect()
}

/// Byte at a time: each check is pushed by the byte that completes its head.
fn checks_with_ends(data: &[u8]) -> Vec<(HeadCheck, usize)> {
    let checks: Checks = Default::default();
    let mut t = Tracker::new(LARGE_HEAD, MAX_HEADERS, checks.clone());
    let mut out = Vec::new();
    for i in 0..data.len() {
        t.feed(&data[i..=i]);
        let mut q = checks.lock().unwrap();
        while let Some(c) = q.pop_front() {
            out.push((c, i + 1));
        }
    }
    out
}

fn compare_with_hyper(data: &[u8]) {
    let tracked = checks_with_ends(data);
    let hyper = Hyper::read(data);
    for (k, (check, end)) in tracked.iter().enumerate() {
        if let HeadCheck::Refused(_) = check {
            // The proxy closes the connection on a refusal: nothing after it is read.
            return;
        }
        match hyper.heads.get(k) {
            Some(&head_end) => assert_eq!(
                head_end, *end,
                "head {k}: the tracker and hyper disagree on where it ends"
            ),
            None => {
                assert!(
                    hyper.stop != Stop::Partial,
                    "head {k}: the tracker passed a head hyper has not finished reading"
                );
                // hyper refused or closed before this head: it never reads it.
                return;
            }
        }
    }
    assert!(
        hyper.heads.len() <= tracked.len(),
        "hyper reads {} request heads, the tracker judged {}",
        hyper.heads.len(),
        tracked.len()
    );
}

#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// hyper waits for more bytes.
    Partial,
    /// hyper refused the stream or closes after the last request.
    Closed,
}

/// hyper's reading of a request stream: where each head ends.
struct Hyper {
    heads: Vec<usize>,
    stop: Stop,
}

enum Body {
    Length(u64),
    Chunked,
}

impl Hyper {
    fn read(data: &[u8]) -> Hyper {
        let mut heads = Vec::new();
        let mut at = 0;
        let stop = loop {
            if at == data.len() {
                break Stop::Partial;
            }
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            let n = match req.parse(&data[at..]) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => break Stop::Partial,
                Err(_) => break Stop::Closed,
            };
            at += n;
            heads.push(at);
            let Some((body, keep_alive)) = framing(&req) else {
                break Stop::Closed;
            };
            let len = match body {
                Body::Length(len) => usize::try_from(len)
                    .ok()
                    .filter(|l| at.checked_add(*l).is_some_and(|end| end <= data.len())),
                Body::Chunked => match chunked_len(&data[at..]) {
                    Ok(n) => Some(n),
                    Err(stop) => break stop,
                },
            };
            let Some(len) = len else {
                break Stop::Partial;
            };
            at += len;
            if !keep_alive {
                break Stop::Closed;
            }
        };
        Hyper { heads, stop }
    }
}

/// hyper 1.x `role::Server::parse`: the body's framing and whether the connection stays
/// open; `None` where hyper refuses the head.
fn framing(req: &httparse::Request) -> Option<(Body, bool)> {
    let http11 = req.version? == 1;
    let method = http::Method::from_bytes(req.method?.as_bytes()).ok()?;
    http::Uri::try_from(req.path?).ok()?;
    // The proxy refuses CONNECT and upgrades with `Connection: close`.
    let upgrade = req
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("upgrade"));
    let refused = method == http::Method::CONNECT || upgrade;
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
