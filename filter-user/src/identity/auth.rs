//! What a request says about who sent it. The `Authorization` header is classified, the
//! user name is taken where the scheme carries one (Basic, an NTLM Type 3 message, bare or
//! inside SPNEGO), and secrets are dropped here: a password or an NTLM response never
//! leaves this module. Negotiate tokens are read by their DER structure (`spnego`).

use base64::{engine::general_purpose::STANDARD, Engine as _};

use crate::model::auth::AuthKind;

/// Longest Authorization header value looked at (Kerberos tickets can be large).
pub const MAX_AUTHORIZATION: usize = 48 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    None,
    Basic {
        user: String,
    },
    /// An NTLM message, bare (`NTLM`) or inside SPNEGO (`Negotiate`).
    Ntlm {
        negotiate: bool,
        stage: NtlmStage,
    },
    /// `Negotiate` with a Kerberos AP-REQ: the user is not readable here.
    Kerberos,
    Bearer {
        token: String,
    },
    /// A header ewsgate cannot read; refused with this reason.
    Invalid(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NtlmStage {
    /// Type 1: the client asks for a challenge.
    Negotiate,
    /// Type 3: the client answers, naming its user.
    Authenticate { user: String },
    /// Any other message type.
    Other,
}

impl Credential {
    pub fn kind(&self) -> AuthKind {
        match self {
            Credential::None | Credential::Invalid(_) => AuthKind::None,
            Credential::Basic { .. } => AuthKind::Basic,
            Credential::Ntlm {
                negotiate: false, ..
            } => AuthKind::Ntlm,
            Credential::Ntlm {
                negotiate: true, ..
            } => AuthKind::Negotiate,
            Credential::Kerberos => AuthKind::Kerberos,
            Credential::Bearer { .. } => AuthKind::Bearer,
        }
    }
}

/// Classifies one `Authorization` header value.
pub fn classify(value: Option<&[u8]>) -> Credential {
    let Some(value) = value else {
        return Credential::None;
    };
    if value.len() > MAX_AUTHORIZATION {
        return Credential::Invalid("authorization_too_large");
    }
    let Ok(text) = std::str::from_utf8(value) else {
        return Credential::Invalid("authorization_not_text");
    };
    let (scheme, rest) = split_scheme(text);
    let is = |name: &str| scheme.eq_ignore_ascii_case(name);
    if is("bearer") && one_token(rest) {
        Credential::Bearer {
            token: rest.to_string(),
        }
    } else if is("basic") {
        basic(rest)
    } else if is("ntlm") {
        ntlm(rest)
    } else if is("negotiate") {
        negotiate(rest)
    } else {
        Credential::Invalid("authorization_scheme")
    }
}

/// The scheme (compared case-insensitively by callers, RFC 9110 §11.1) and its parameter.
fn split_scheme(text: &str) -> (&str, &str) {
    let (scheme, rest) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
    (scheme, rest.trim())
}

/// The token of a `Bearer` header value, whatever the scheme's case (`bearer`, `BEARER`);
/// `None` for any other scheme or a malformed value. The one reader of Bearer tokens.
pub fn bearer_token(value: &[u8]) -> Option<&str> {
    if value.len() > MAX_AUTHORIZATION {
        return None;
    }
    let (scheme, token) = split_scheme(std::str::from_utf8(value).ok()?);
    let ok = scheme.eq_ignore_ascii_case("bearer") && one_token(token);
    ok.then_some(token)
}

/// A Bearer parameter is one token: not empty, no space. A token runs to a kilobyte or
/// more; `memchr` scans it a vector at a time where `str::contains(char)` goes slower.
fn one_token(token: &str) -> bool {
    !token.is_empty() && memchr::memchr(b' ', token.as_bytes()).is_none()
}

fn basic(b64: &str) -> Credential {
    let Ok(raw) = STANDARD.decode(b64) else {
        return Credential::Invalid("basic_not_base64");
    };
    let Some(colon) = raw.iter().position(|&b| b == b':') else {
        return Credential::Invalid("basic_no_colon");
    };
    match String::from_utf8(raw[..colon].to_vec()) {
        Ok(user) if !user.is_empty() => Credential::Basic { user },
        _ => Credential::Invalid("basic_user"),
    }
}

/// `NTLM`: a bare NTLMSSP message, signature first.
fn ntlm(b64: &str) -> Credential {
    let Ok(blob) = STANDARD.decode(b64) else {
        return Credential::Invalid("ntlm_not_base64");
    };
    if !blob.starts_with(b"NTLMSSP\0") {
        return Credential::Invalid("ntlm_no_signature");
    }
    ntlm_message(&blob, false)
}

/// `Negotiate`: SPNEGO (or a bare NTLMSSP or Kerberos token), read by its structure.
fn negotiate(b64: &str) -> Credential {
    let Ok(blob) = STANDARD.decode(b64) else {
        return Credential::Invalid("negotiate_not_base64");
    };
    match crate::identity::spnego::mechanism(&blob) {
        Ok(crate::identity::spnego::Mechanism::Ntlm(message)) => ntlm_message(&message, true),
        Ok(crate::identity::spnego::Mechanism::Kerberos) => Credential::Kerberos,
        Err(reason) => Credential::Invalid(reason),
    }
}

fn ntlm_message(message: &[u8], negotiate: bool) -> Credential {
    match ntlm_stage(message) {
        Some(stage) => Credential::Ntlm { negotiate, stage },
        None => Credential::Invalid("ntlm_malformed"),
    }
}

fn u16_at(m: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(m.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(m: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(m.get(at..at + 4)?.try_into().ok()?))
}

/// A security buffer (length, max length, offset) at `at`, bounds-checked.
fn field(m: &[u8], at: usize) -> Option<&[u8]> {
    let len = u16_at(m, at)? as usize;
    let offset = u32_at(m, at + 4)? as usize;
    m.get(offset..offset.checked_add(len)?)
}

/// MS-NLMP 2.2.1: the message type at offset 8; a Type 3 names domain (28) and user (36).
fn ntlm_stage(m: &[u8]) -> Option<NtlmStage> {
    match u32_at(m, 8)? {
        1 => Some(NtlmStage::Negotiate),
        3 => {
            let flags = u32_at(m, 60).unwrap_or(1);
            let text = |b: &[u8]| -> Option<String> {
                if flags & 1 != 0 {
                    let units: Vec<u16> = b
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect();
                    String::from_utf16(&units).ok()
                } else {
                    Some(b.iter().map(|&c| c as char).collect())
                }
            };
            let domain = text(field(m, 28)?)?;
            let user = text(field(m, 36)?)?;
            let control = |s: &str| s.chars().any(char::is_control);
            if user.is_empty() || control(&user) || control(&domain) {
                return None;
            }
            let user = if domain.is_empty() {
                user
            } else {
                format!("{domain}\\{user}")
            };
            Some(NtlmStage::Authenticate { user })
        }
        _ => Some(NtlmStage::Other),
    }
}

/// Builds NTLM messages for tests (here and in the lab): Type 1 and a Type 3 for a user.
pub mod ntlm_messages {
    pub fn negotiate() -> Vec<u8> {
        let mut m = b"NTLMSSP\0".to_vec();
        m.extend(1u32.to_le_bytes());
        m.extend(0x0000_8201u32.to_le_bytes());
        m
    }

    pub fn authenticate(domain: &str, user: &str) -> Vec<u8> {
        let utf16 = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
        let (d, u) = (utf16(domain), utf16(user));
        let mut m = b"NTLMSSP\0".to_vec();
        m.extend(3u32.to_le_bytes());
        let base = 64u32;
        let buffer = |len: usize, offset: u32| {
            let mut b = Vec::new();
            b.extend((len as u16).to_le_bytes());
            b.extend((len as u16).to_le_bytes());
            b.extend(offset.to_le_bytes());
            b
        };
        // LM and NT responses (empty), domain, user, workstation, session key.
        let fields = [
            buffer(0, base),
            buffer(0, base),
            buffer(d.len(), base),
            buffer(u.len(), base + d.len() as u32),
            buffer(0, base + (d.len() + u.len()) as u32),
            buffer(0, base + (d.len() + u.len()) as u32),
        ];
        for f in fields {
            m.extend(f);
        }
        m.extend(1u32.to_le_bytes()); // NTLMSSP_NEGOTIATE_UNICODE
        m.extend(d);
        m.extend(u);
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::spnego::build;

    fn header(scheme: &str, blob: &[u8]) -> Vec<u8> {
        format!("{scheme} {}", STANDARD.encode(blob)).into_bytes()
    }

    #[test]
    fn basic_keeps_the_user_and_drops_the_password() {
        let c = classify(Some(&header("Basic", b"alice@example.org:s3cret")));
        assert_eq!(
            c,
            Credential::Basic {
                user: "alice@example.org".into()
            }
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(
            classify(Some(&header("Basic", b"nocolon"))),
            Credential::Invalid("basic_no_colon")
        );
        assert_eq!(
            classify(Some(b"Basic !!!")),
            Credential::Invalid("basic_not_base64")
        );
    }

    #[test]
    fn ntlm_type3_names_domain_and_user() {
        let t3 = ntlm_messages::authenticate("EXAMPLE", "bob");
        let c = classify(Some(&header("NTLM", &t3)));
        assert_eq!(
            c,
            Credential::Ntlm {
                negotiate: false,
                stage: NtlmStage::Authenticate {
                    user: "EXAMPLE\\bob".into()
                }
            }
        );
        assert_eq!(c.kind(), AuthKind::Ntlm);
        let t1 = classify(Some(&header("NTLM", &ntlm_messages::negotiate())));
        assert_eq!(
            t1,
            Credential::Ntlm {
                negotiate: false,
                stage: NtlmStage::Negotiate
            }
        );
    }

    fn negotiate(blob: &[u8]) -> Credential {
        classify(Some(&header("Negotiate", blob)))
    }

    #[test]
    fn negotiate_reads_ntlm_from_spnego_by_its_structure() {
        let t1 = negotiate(&build::init_ntlm(&ntlm_messages::negotiate()));
        assert_eq!(
            t1,
            Credential::Ntlm {
                negotiate: true,
                stage: NtlmStage::Negotiate
            }
        );
        assert_eq!(t1.kind(), AuthKind::Negotiate);
        let t3 = negotiate(&build::resp(&ntlm_messages::authenticate("", "carol")));
        assert!(
            matches!(t3, Credential::Ntlm { negotiate: true, stage: NtlmStage::Authenticate { ref user } } if user == "carol"),
            "{t3:?}"
        );
        // Bare NTLMSSP inside Negotiate is read as NTLM too.
        let bare = negotiate(&ntlm_messages::authenticate("EXAMPLE", "dave"));
        assert!(
            matches!(bare, Credential::Ntlm { negotiate: true, stage: NtlmStage::Authenticate { ref user } } if user == "EXAMPLE\\dave")
        );
    }

    /// Tokens real implementations wrote (pyspnego; curl with MIT Kerberos; see
    /// testdata/negotiate).
    #[test]
    fn negotiate_reads_captured_legs() {
        let fixture = |name: &str| {
            let path = format!(
                "{}/testdata/negotiate/{name}.b64",
                env!("CARGO_MANIFEST_DIR")
            );
            let text = std::fs::read_to_string(path).unwrap();
            format!("Negotiate {}", text.trim()).into_bytes()
        };
        assert_eq!(
            classify(Some(&fixture("ntlm-init"))),
            Credential::Ntlm {
                negotiate: true,
                stage: NtlmStage::Negotiate
            }
        );
        assert_eq!(
            classify(Some(&fixture("ntlm-answer"))),
            Credential::Ntlm {
                negotiate: true,
                stage: NtlmStage::Authenticate {
                    user: "EXAMPLE\\alice".into()
                }
            }
        );
        // curl with MIT Kerberos: a NegTokenInit offering krb5, with its AP-REQ.
        assert_eq!(
            classify(Some(&fixture("kerberos-init"))),
            Credential::Kerberos
        );
        // The server's challenge leg parses as NTLM too (a Type 2 is `Other`).
        assert!(matches!(
            classify(Some(&fixture("ntlm-challenge"))),
            Credential::Ntlm {
                stage: NtlmStage::Other,
                ..
            }
        ));
    }

    #[test]
    fn negotiate_classifies_a_kerberos_ap_req_as_kerberos() {
        let k = negotiate(&build::init_kerberos());
        assert_eq!(k, Credential::Kerberos);
        assert_eq!(k.kind(), AuthKind::Kerberos);
        assert_eq!(k.kind().name(), "kerberos");
        // A bare GSS Kerberos token (no SPNEGO), with either krb5 OID.
        for oid in [
            crate::identity::spnego::KRB5,
            crate::identity::spnego::MS_KRB5,
        ] {
            assert_eq!(
                negotiate(&build::kerberos_ap_req(oid)),
                Credential::Kerberos
            );
        }
        // An NTLMSSP signature buried in a Kerberos token is not NTLM.
        let mut init = build::init_kerberos();
        let at = init.len() - 20;
        init[at..at + 8].copy_from_slice(b"NTLMSSP\0");
        assert_eq!(negotiate(&init), Credential::Kerberos);
    }

    #[test]
    fn malformed_spnego_is_refused_with_a_reason() {
        use crate::identity::spnego::{KRB5, NEGOEX, NTLMSSP};
        let t1 = ntlm_messages::negotiate();
        let good = build::init_ntlm(&t1);
        let mut trailing = good.clone();
        trailing.push(0);
        let mut lying = good.clone();
        lying[1] = 0x7f; // the outer length runs past the end
        let ap_req = build::kerberos_ap_req(KRB5);
        let mut pvno4 = ap_req.clone();
        let at = pvno4
            .windows(3)
            .position(|w| w == [0x02, 0x01, 0x05])
            .unwrap();
        pvno4[at + 2] = 4;
        let mut junk_around_ntlm = vec![0x30, 0x03, 1, 2, 3];
        junk_around_ntlm.extend(ntlm_messages::authenticate("", "eve"));
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "truncated",
                good[..good.len() - 3].to_vec(),
                "spnego_malformed",
            ),
            ("trailing bytes", trailing, "spnego_malformed"),
            ("lying length", lying, "spnego_malformed"),
            (
                "no mechToken",
                build::init(&[NTLMSSP], None),
                "spnego_no_token",
            ),
            (
                "no mechanism",
                build::init(&[], Some(&t1)),
                "spnego_no_mechanism",
            ),
            (
                "NEGOEX first",
                build::init(&[NEGOEX, NTLMSSP], Some(&t1)),
                "spnego_mechanism_unsupported",
            ),
            (
                "NTLM named, Kerberos sent",
                build::init(&[NTLMSSP], Some(&ap_req)),
                "spnego_ntlm_malformed",
            ),
            (
                "Kerberos named, NTLM sent",
                build::init(&[KRB5], Some(&t1)),
                "kerberos_malformed",
            ),
            (
                "pvno 4",
                build::init(&[KRB5], Some(&pvno4)),
                "kerberos_malformed",
            ),
            (
                "the old byte-search shape",
                [&[0xa1, 0x81, 0x90, 0x30][..], &t1].concat(),
                "spnego_malformed",
            ),
            (
                "a bare 0x60 header",
                vec![0x60, 0x82, 1, 2],
                "spnego_malformed",
            ),
            (
                "NTLMSSP after junk",
                junk_around_ntlm,
                "negotiate_malformed",
            ),
            ("empty", vec![], "negotiate_malformed"),
            (
                "resp without token",
                build::tlv(
                    der::Tag::ContextSpecific {
                        constructed: true,
                        number: der::TagNumber(1),
                    },
                    &[0x30, 0x00],
                ),
                "spnego_no_token",
            ),
        ];
        for (what, blob, reason) in cases {
            assert_eq!(negotiate(&blob), Credential::Invalid(reason), "{what}");
        }
        assert_eq!(
            classify(Some(b"Negotiate !!!")),
            Credential::Invalid("negotiate_not_base64")
        );
        // The NTLM scheme takes a bare NTLMSSP message only.
        assert_eq!(
            classify(Some(&header("NTLM", &good))),
            Credential::Invalid("ntlm_no_signature")
        );
    }

    #[test]
    fn truncated_and_lying_ntlm_messages_are_invalid() {
        let mut t3 = ntlm_messages::authenticate("D", "u");
        // The user buffer claims to run far past the message.
        t3[36] = 0xff;
        t3[37] = 0x7f;
        assert_eq!(
            classify(Some(&header("NTLM", &t3))),
            Credential::Invalid("ntlm_malformed")
        );
        assert_eq!(
            classify(Some(&header("NTLM", b"NTLMSSP\0\x03"))),
            Credential::Invalid("ntlm_malformed")
        );
        assert_eq!(
            classify(Some(&header("NTLM", b"garbage"))),
            Credential::Invalid("ntlm_no_signature")
        );
    }

    // Found by fuzzing (auth): only the user part was checked for control characters, so a
    // NUL or a newline in the domain reached the user-name rules and the audit log.
    #[test]
    fn control_characters_in_the_ntlm_domain_are_refused() {
        for domain in ["EX\0AMPLE", "EXAMPLE\n", "\u{1b}[31m"] {
            let t3 = ntlm_messages::authenticate(domain, "bob");
            assert_eq!(
                classify(Some(&header("NTLM", &t3))),
                Credential::Invalid("ntlm_malformed"),
                "{domain:?}"
            );
        }
    }

    #[test]
    fn bearer_and_unknown_schemes() {
        for value in [
            &b"Bearer abc.def.ghi"[..],
            b"bearer abc.def.ghi",
            b"BEARER  abc.def.ghi ",
        ] {
            assert_eq!(
                classify(Some(value)),
                Credential::Bearer {
                    token: "abc.def.ghi".into()
                }
            );
            assert_eq!(bearer_token(value), Some("abc.def.ghi"));
        }
        for value in [
            &b"Bearer "[..],
            b"Bearer a b",
            b"Basic abc",
            b"Bearerabc",
            b"",
        ] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
        assert_eq!(
            classify(Some(b"Bearer ")),
            Credential::Invalid("authorization_scheme")
        );
        assert_eq!(
            classify(Some(b"Digest x")),
            Credential::Invalid("authorization_scheme")
        );
        assert_eq!(classify(None), Credential::None);
    }
}
