//! The `Authorization` header (`identity::auth::classify`): Basic, NTLM, Negotiate (SPNEGO with NTLM
//! or Kerberos inside) and Bearer.
//!
//! The first byte chooses how the rest is sent, so that the binary parsers behind base64
//! are reached: 0 the rest is the header value as is; 1 `Basic`, 2 `NTLM`, 3 `Negotiate`,
//! each followed by the base64 of the rest.
//!
//! Properties beyond "no panic": the same header always classifies the same way; a user
//! name is never empty and holds no control character; Basic's password never reaches
//! the result; the scheme decides the kind.
#![no_main]

use base64::{engine::general_purpose::STANDARD, Engine as _};
use ewsgate::{
    identity::auth::{classify, Credential, NtlmStage},
    model::auth::AuthKind,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let scheme = match mode % 4 {
        0 => None,
        1 => Some("Basic"),
        2 => Some("NTLM"),
        _ => Some("Negotiate"),
    };
    let value = match scheme {
        None => rest.to_vec(),
        Some(s) => format!("{s} {}", STANDARD.encode(rest)).into_bytes(),
    };
    let c = classify(Some(&value));
    assert_eq!(classify(Some(&value)), c, "classify is not deterministic");
    match &c {
        Credential::Basic { user } => {
            assert!(
                !user.is_empty() && !user.contains(':'),
                "Basic user {user:?}"
            );
            if scheme == Some("Basic") {
                // Everything after the first colon is the password.
                let colon = rest.iter().position(|&b| b == b':').unwrap();
                assert_eq!(
                    user.as_bytes(),
                    &rest[..colon],
                    "Basic user is not the user"
                );
            }
        }
        Credential::Ntlm {
            stage: NtlmStage::Authenticate { user },
            ..
        } => assert!(
            !user.is_empty() && !user.chars().any(char::is_control),
            "NTLM user {user:?}"
        ),
        Credential::Bearer { token } => {
            assert!(!token.is_empty() && !token.contains(' '), "token {token:?}")
        }
        _ => {}
    }
    let expected = match scheme {
        Some("Basic") => [AuthKind::Basic, AuthKind::None],
        Some("NTLM") => [AuthKind::Ntlm, AuthKind::None],
        Some(_) => [AuthKind::Negotiate, AuthKind::None],
        None => return,
    };
    assert!(
        expected.contains(&c.kind()),
        "{scheme:?} classified as {c:?}"
    );
});
