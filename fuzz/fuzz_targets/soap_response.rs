//! The SOAP response walker (`soap::parse_response`) and the rewrite that withholds
//! denied messages (`soap::rewrite`).
//!
//! Properties beyond "no panic", for every response that parses: message spans are in
//! order and inside the document; a rewrite that denies nothing returns the bytes
//! unchanged; a rewrite that denies some messages (chosen from the input) parses again,
//! with the same messages in the same order, the denied ones holding no item, attachment
//! or folder any more and the others unchanged.
#![no_main]

use ewsgate::{
    model::settings::SoapLimits as Limits,
    soap::{parse_response, rewrite, Verdict},
};
use ewsgate_fuzz::Rng;
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    depth: 24,
    elements: 400,
};
/// A denied message's replacement is one level deeper and a few elements longer.
const REPARSE: Limits = Limits {
    depth: LIMITS.depth + 2,
    elements: usize::MAX,
};

fuzz_target!(|data: &[u8]| {
    let Ok(r) = parse_response(data, LIMITS) else {
        return;
    };
    let mut last = 0;
    for m in &r.messages {
        assert!(
            last <= m.span.start && m.span.start <= m.span.end && m.span.end <= data.len(),
            "span {:?} after {last}",
            m.span
        );
        last = m.span.end;
    }
    let none = vec![Verdict::default(); r.messages.len()];
    assert_eq!(
        rewrite(data, &r, &none),
        data,
        "denying nothing changed the response"
    );
    let mut rng = Rng::from_input(data);
    let denied: Vec<Verdict> = r
        .messages
        .iter()
        .map(|_| Verdict {
            withhold: (rng.next() % 2 == 0).then(|| "rule <r&d> \"x\"".to_string()),
            cut: Vec::new(),
        })
        .collect();
    let out = rewrite(data, &r, &denied);
    let again = match parse_response(&out, REPARSE) {
        Ok(a) => a,
        Err(e) => panic!(
            "the rewritten response does not parse: {e}\n{}",
            String::from_utf8_lossy(&out)
        ),
    };
    assert_eq!(
        again.messages.len(),
        r.messages.len(),
        "messages lost or added"
    );
    for ((after, before), why) in again.messages.iter().zip(&r.messages).zip(&denied) {
        assert_eq!(after.name, before.name);
        if why.withhold.is_some() {
            assert!(
                after.items.is_empty() && after.attachments.is_empty() && after.folders.is_empty(),
                "a denied message still holds {after:?}"
            );
        } else {
            assert_eq!(
                (&after.items, &after.attachments, &after.folders),
                (&before.items, &before.attachments, &before.folders)
            );
        }
    }
    assert!(r.fault || !again.fault, "the rewrite made a fault");
});
