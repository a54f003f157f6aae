//! What a client's `Authorization: Negotiate` token holds, read by its structure with the
//! `der` crate: the GSS-API framing (RFC 2743 §3.1), SPNEGO's NegTokenInit and NegTokenResp
//! (RFC 4178 §4.2), and a Kerberos AP-REQ (RFC 4120 §5.5.1). The mechanism token is taken
//! from where the structure puts it, never found by searching the bytes:
//!
//! - a NegTokenInit's optimistic `mechToken` belongs to the first of its `mechTypes`: NTLM
//!   (an NTLMSSP message) or Kerberos (a GSS-framed AP-REQ); any other first mechanism
//!   (NEGOEX, for one) is refused;
//! - a NegTokenResp's `responseToken` is an NTLMSSP message or a GSS-framed Kerberos token;
//! - bare NTLMSSP or a bare GSS Kerberos token inside `Negotiate` is read as such.
//!
//! Anything else, and any DER that does not decode whole, is refused with a reason.

use der::{
    asn1::{AnyRef, ObjectIdentifier, OctetString},
    Decode, Reader, Sequence, SliceReader, Tag, TagNumber, Tagged,
};

/// SPNEGO, 1.3.6.1.5.5.2.
pub const SPNEGO: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.2");
/// Kerberos V5, 1.2.840.113554.1.2.2.
pub const KRB5: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113554.1.2.2");
/// Kerberos V5 as Windows has long named it, 1.2.840.48018.1.2.2.
pub const MS_KRB5: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.48018.1.2.2");
/// NTLMSSP, 1.3.6.1.4.1.311.2.2.10.
pub const NTLMSSP: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.2.10");
/// NEGOEX, 1.3.6.1.4.1.311.2.2.30.
pub const NEGOEX: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.2.30");

const NTLM_SIGNATURE: &[u8] = b"NTLMSSP\0";
/// RFC 4121 §4.1: TOK_ID of a KRB_AP_REQ inside the GSS framing.
const KRB_AP_REQ_TOK_ID: [u8; 2] = [0x01, 0x00];

/// The mechanism a Negotiate token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    /// An NTLMSSP message, starting with its signature.
    Ntlm(Vec<u8>),
    /// A well-formed Kerberos AP-REQ; its user is inside the encrypted authenticator.
    Kerberos,
}

/// NegTokenInit ::= SEQUENCE { mechTypes [0], reqFlags [1], mechToken [2], mechListMIC [3] }
/// (the SPNEGO module uses explicit tags).
#[derive(Sequence)]
pub struct NegTokenInit<'a> {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    pub mech_types: Vec<ObjectIdentifier>,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", optional = "true")]
    pub req_flags: Option<AnyRef<'a>>,
    #[asn1(context_specific = "2", tag_mode = "EXPLICIT", optional = "true")]
    pub mech_token: Option<OctetString>,
    #[asn1(context_specific = "3", tag_mode = "EXPLICIT", optional = "true")]
    pub mech_list_mic: Option<OctetString>,
}

/// NegTokenResp ::= SEQUENCE { negState [0], supportedMech [1], responseToken [2],
/// mechListMIC [3] }.
#[derive(Sequence)]
pub struct NegTokenResp<'a> {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    pub neg_state: Option<AnyRef<'a>>,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", optional = "true")]
    pub supported_mech: Option<ObjectIdentifier>,
    #[asn1(context_specific = "2", tag_mode = "EXPLICIT", optional = "true")]
    pub response_token: Option<OctetString>,
    #[asn1(context_specific = "3", tag_mode = "EXPLICIT", optional = "true")]
    pub mech_list_mic: Option<OctetString>,
}

/// The body of AP-REQ ::= [APPLICATION 14] SEQUENCE { pvno [0], msg-type [1],
/// ap-options [2], ticket [3], authenticator [4] }.
#[derive(Sequence)]
struct ApReq<'a> {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    pvno: u8,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT")]
    msg_type: u8,
    #[asn1(context_specific = "2", tag_mode = "EXPLICIT")]
    ap_options: AnyRef<'a>,
    #[asn1(context_specific = "3", tag_mode = "EXPLICIT")]
    ticket: AnyRef<'a>,
    #[asn1(context_specific = "4", tag_mode = "EXPLICIT")]
    authenticator: AnyRef<'a>,
}

fn application(number: u32) -> Tag {
    Tag::Application {
        constructed: true,
        number: TagNumber(number),
    }
}

fn context(number: u32) -> Tag {
    Tag::ContextSpecific {
        constructed: true,
        number: TagNumber(number),
    }
}

/// One whole DER element with tag `tag`: its contents. Trailing bytes are refused.
fn element(bytes: &[u8], tag: Tag) -> Option<&[u8]> {
    let any = AnyRef::from_der(bytes).ok()?;
    (any.tag() == tag).then(|| any.value())
}

/// GSS-API InitialContextToken ::= [APPLICATION 0] IMPLICIT SEQUENCE { thisMech OID,
/// innerContextToken ANY }: the mechanism and the bytes after it.
fn gss_framing(bytes: &[u8]) -> Option<(ObjectIdentifier, &[u8])> {
    let body = element(bytes, application(0))?;
    let mut reader = SliceReader::new(body).ok()?;
    let oid = ObjectIdentifier::decode(&mut reader).ok()?;
    let rest = reader.read_slice(reader.remaining_len()).ok()?;
    Some((oid, rest))
}

/// A Kerberos token as GSS frames it: the krb5 OID, TOK_ID 01 00, then an AP-REQ.
fn kerberos(bytes: &[u8]) -> Result<Mechanism, &'static str> {
    let (oid, rest) = gss_framing(bytes).ok_or("kerberos_malformed")?;
    if oid != KRB5 && oid != MS_KRB5 {
        return Err("negotiate_mechanism_unsupported");
    }
    match rest.split_at_checked(2) {
        Some((tok_id, ap_req)) if tok_id == KRB_AP_REQ_TOK_ID && is_ap_req(ap_req) => {
            Ok(Mechanism::Kerberos)
        }
        _ => Err("kerberos_malformed"),
    }
}

fn is_ap_req(bytes: &[u8]) -> bool {
    let Some(body) = element(bytes, application(14)) else {
        return false;
    };
    let Ok(req) = ApReq::from_der(body) else {
        return false;
    };
    // Ticket ::= [APPLICATION 1] SEQUENCE; APOptions is a BIT STRING; the authenticator is
    // EncryptedData, a SEQUENCE.
    req.pvno == 5
        && req.msg_type == 14
        && req.ap_options.tag() == Tag::BitString
        && req.ticket.tag() == application(1)
        && req.authenticator.tag() == Tag::Sequence
}

fn ntlm(bytes: Vec<u8>) -> Result<Mechanism, &'static str> {
    if bytes.starts_with(NTLM_SIGNATURE) {
        Ok(Mechanism::Ntlm(bytes))
    } else {
        Err("spnego_ntlm_malformed")
    }
}

/// The mechanism token of a decoded `Negotiate` blob, or the reason it is refused.
pub fn mechanism(blob: &[u8]) -> Result<Mechanism, &'static str> {
    if blob.starts_with(NTLM_SIGNATURE) {
        return Ok(Mechanism::Ntlm(blob.to_vec()));
    }
    match blob.first() {
        Some(0x60) => initial(blob),
        Some(0xa1) => response(blob),
        _ => Err("negotiate_malformed"),
    }
}

/// A first leg: SPNEGO's NegTokenInit in GSS framing, or a bare Kerberos token.
fn initial(blob: &[u8]) -> Result<Mechanism, &'static str> {
    let (oid, rest) = gss_framing(blob).ok_or("spnego_malformed")?;
    if oid == KRB5 || oid == MS_KRB5 {
        return kerberos(blob);
    }
    if oid != SPNEGO {
        return Err("negotiate_mechanism_unsupported");
    }
    let body = element(rest, context(0)).ok_or("spnego_malformed")?;
    let init = NegTokenInit::from_der(body).map_err(|_| "spnego_malformed")?;
    let first = *init.mech_types.first().ok_or("spnego_no_mechanism")?;
    let token = init
        .mech_token
        .ok_or("spnego_no_token")?
        .into_bytes()
        .into_vec();
    if first == NTLMSSP {
        ntlm(token)
    } else if first == KRB5 || first == MS_KRB5 {
        kerberos(&token)
    } else {
        Err("spnego_mechanism_unsupported")
    }
}

/// A later leg: SPNEGO's NegTokenResp, bare (`[1]`, as RFC 4178 sends it).
fn response(blob: &[u8]) -> Result<Mechanism, &'static str> {
    let body = element(blob, context(1)).ok_or("spnego_malformed")?;
    let resp = NegTokenResp::from_der(body).map_err(|_| "spnego_malformed")?;
    let token = resp
        .response_token
        .ok_or("spnego_no_token")?
        .into_bytes()
        .into_vec();
    match token.first() {
        Some(0x60) => kerberos(&token),
        _ => ntlm(token),
    }
}

/// Builds Negotiate tokens with the `der` crate, for tests (here and in the lab).
pub mod build {
    use der::{
        asn1::{AnyRef, ObjectIdentifier, OctetString},
        Encode, Header, Length, Tag, TagNumber,
    };

    use super::{NegTokenInit, NegTokenResp, KRB5, KRB_AP_REQ_TOK_ID, NTLMSSP, SPNEGO};

    /// One DER element with `tag` around `contents`.
    pub fn tlv(tag: Tag, contents: &[u8]) -> Vec<u8> {
        let len = Length::try_from(contents.len()).expect("length");
        let mut out = Header::new(tag, len).to_der().expect("header");
        out.extend_from_slice(contents);
        out
    }

    fn app(number: u32) -> Tag {
        Tag::Application {
            constructed: true,
            number: TagNumber(number),
        }
    }

    fn ctx(number: u32) -> Tag {
        Tag::ContextSpecific {
            constructed: true,
            number: TagNumber(number),
        }
    }

    /// GSS framing: [APPLICATION 0] { OID, inner }.
    pub fn gss(oid: ObjectIdentifier, inner: &[u8]) -> Vec<u8> {
        let mut body = oid.to_der().expect("oid");
        body.extend_from_slice(inner);
        tlv(app(0), &body)
    }

    /// A first leg: NegTokenInit offering `mechs`, with `token` for the first.
    pub fn init(mechs: &[ObjectIdentifier], token: Option<&[u8]>) -> Vec<u8> {
        let init = NegTokenInit {
            mech_types: mechs.to_vec(),
            req_flags: None,
            mech_token: token.map(|t| OctetString::new(t).expect("octets")),
            mech_list_mic: None,
        };
        gss(SPNEGO, &tlv(ctx(0), &init.to_der().expect("init")))
    }

    /// The usual NTLM first leg: NegTokenInit offering NTLMSSP, with its Type 1 message.
    pub fn init_ntlm(message: &[u8]) -> Vec<u8> {
        init(&[NTLMSSP], Some(message))
    }

    /// A later leg: NegTokenResp carrying `token` (an NTLM Type 3, say) and a MIC.
    pub fn resp(token: &[u8]) -> Vec<u8> {
        let accept_incomplete = [0x0a, 0x01, 0x01];
        let resp = NegTokenResp {
            neg_state: Some(AnyRef::from_der_slice(&accept_incomplete)),
            supported_mech: None,
            response_token: Some(OctetString::new(token).expect("octets")),
            mech_list_mic: Some(OctetString::new([1u8; 16].as_slice()).expect("mic")),
        };
        tlv(ctx(1), &resp.to_der().expect("resp"))
    }

    /// A Kerberos AP-REQ with a ticket and an authenticator of filler cipher text, in its
    /// GSS framing (krb5 OID, TOK_ID 01 00). Real DER, as MIT and Windows lay it out.
    pub fn kerberos_ap_req(oid: ObjectIdentifier) -> Vec<u8> {
        let int = |v: u8| tlv(Tag::Integer, &[v]);
        let explicit = |n: u32, inner: Vec<u8>| tlv(ctx(n), &inner);
        let seq = |parts: Vec<Vec<u8>>| tlv(Tag::Sequence, &parts.concat());
        let text = |s: &str| tlv(Tag::GeneralString, s.as_bytes());
        let encrypted = seq(vec![
            explicit(0, int(18)),
            explicit(2, tlv(Tag::OctetString, &[0x5a; 96])),
        ]);
        let sname = seq(vec![
            explicit(0, int(2)),
            explicit(1, seq(vec![text("HTTP"), text("mail.example.org")])),
        ]);
        let ticket = tlv(
            app(1),
            &seq(vec![
                explicit(0, int(5)),
                explicit(1, text("EXAMPLE.ORG")),
                explicit(2, sname),
                explicit(3, encrypted.clone()),
            ]),
        );
        let ap_req = tlv(
            app(14),
            &seq(vec![
                explicit(0, int(5)),
                explicit(1, int(14)),
                explicit(2, tlv(Tag::BitString, &[0, 0x20, 0, 0, 0])),
                explicit(3, ticket),
                explicit(4, encrypted),
            ]),
        );
        let mut inner = KRB_AP_REQ_TOK_ID.to_vec();
        inner.extend(ap_req);
        gss(oid, &inner)
    }

    /// The usual Kerberos first leg from Windows: NegTokenInit offering MS-KRB5, KRB5 and
    /// NTLMSSP, with the AP-REQ as the optimistic token.
    pub fn init_kerberos() -> Vec<u8> {
        init(
            &[super::MS_KRB5, KRB5, super::NEGOEX, NTLMSSP],
            Some(&kerberos_ap_req(super::MS_KRB5)),
        )
    }

    trait FromDerSlice<'a> {
        fn from_der_slice(bytes: &'a [u8]) -> Self;
    }

    impl<'a> FromDerSlice<'a> for AnyRef<'a> {
        fn from_der_slice(bytes: &'a [u8]) -> Self {
            <AnyRef<'a> as der::Decode<'a>>::from_der(bytes).expect("any")
        }
    }
}
