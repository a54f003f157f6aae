//! What a request says about who sent it. The `Authorization` header is classified, the
//! user name is taken where the scheme carries one (Basic, an NTLM Type 3 message), and
//! secrets are dropped here: a password or an NTLM response never leaves this module.

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
    /// `Negotiate` with a Kerberos ticket: the user is not readable here.
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
            }
            | Credential::Kerberos => AuthKind::Negotiate,
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
    let (scheme, rest) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
    let rest = rest.trim();
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => basic(rest),
        "ntlm" => ntlm(rest, false),
        "negotiate" => ntlm(rest, true),
        "bearer" if !rest.is_empty() && !rest.contains(' ') => Credential::Bearer {
            token: rest.to_string(),
        },
        _ => Credential::Invalid("authorization_scheme"),
    }
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

fn ntlm(b64: &str, negotiate: bool) -> Credential {
    let Ok(blob) = STANDARD.decode(b64) else {
        return Credential::Invalid("ntlm_not_base64");
    };
    // SPNEGO wraps the raw NTLMSSP message; Kerberos has none.
    let Some(at) = find(&blob, b"NTLMSSP\0") else {
        return if negotiate {
            Credential::Kerberos
        } else {
            Credential::Invalid("ntlm_no_signature")
        };
    };
    match ntlm_stage(&blob[at..]) {
        Some(stage) => Credential::Ntlm { negotiate, stage },
        None => Credential::Invalid("ntlm_malformed"),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
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

    #[test]
    fn negotiate_unwraps_spnego_and_tells_kerberos_apart() {
        let mut spnego = vec![0xa1, 0x81, 0x90, 0x30];
        spnego.extend(ntlm_messages::authenticate("", "carol"));
        let c = classify(Some(&header("Negotiate", &spnego)));
        assert_eq!(c.kind(), AuthKind::Negotiate);
        assert!(
            matches!(c, Credential::Ntlm { stage: NtlmStage::Authenticate { ref user }, .. } if user == "carol")
        );
        assert_eq!(
            classify(Some(&header("Negotiate", &[0x60, 0x82, 1, 2]))),
            Credential::Kerberos
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
        assert_eq!(
            classify(Some(b"Bearer abc.def.ghi")),
            Credential::Bearer {
                token: "abc.def.ghi".into()
            }
        );
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
