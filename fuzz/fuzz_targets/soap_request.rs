//! The EWS SOAP request parser (`soap::parse_request`) and the check of a long request's
//! rest (`soap::Tail`).
//!
//! The first two bytes choose where the classification buffer ends (little-endian, modulo
//! the document's length plus one); the rest is the request body. The document is parsed
//! whole, and its start up to that cut is parsed as the proxy parses a long body; when the
//! start passes, the rest is fed to its `Tail` in random pieces.
//!
//! Properties beyond "no panic": a whole parse never leaves a tail and always names an
//! operation; a cut parse that passes always leaves one; and when the start and the tail
//! both pass, the document as a whole is accepted and says exactly what the start said:
//! nothing the policy has not read can follow the buffer. The tokenizer under the parser
//! reads the document event for event as quick-xml's reader does.
#![no_main]

use ewsgate::{
    model::settings::SoapLimits as Limits,
    soap::{agrees_with_quick_xml, parse_request},
};
use ewsgate_fuzz::{random_splits, Rng};
use libfuzzer_sys::fuzz_target;

/// Small enough for the fuzzer to reach both limits.
const LIMITS: Limits = Limits {
    depth: 24,
    elements: 400,
};

fuzz_target!(|data: &[u8]| {
    let Some((cut, doc)) = data.split_first_chunk::<2>() else {
        return;
    };
    if let Err(e) = agrees_with_quick_xml(doc) {
        panic!("the tokenizer parts from quick-xml: {e}");
    }
    let whole = parse_request(doc, true, LIMITS);
    if let Ok(r) = &whole {
        assert!(r.tail.is_none() && !r.operation.is_empty(), "{r:?}");
    }
    let cut = usize::from(u16::from_le_bytes(*cut)) % (doc.len() + 1);
    let (start, rest) = doc.split_at(cut);
    let Ok(mut read) = parse_request(start, false, LIMITS) else {
        return;
    };
    let mut tail = read
        .tail
        .take()
        .expect("a cut request that passes has a tail");
    let mut rng = Rng::from_input(data);
    let fed = random_splits(rest, &mut rng)
        .into_iter()
        .try_for_each(|part| tail.feed(part))
        .and_then(|()| tail.finish());
    if fed.is_ok() {
        match whole {
            Ok(whole) => assert_eq!(read, whole, "the start says other than the whole"),
            Err(e) => panic!("start and tail pass, but the whole document is refused: {e}"),
        }
    }
});
