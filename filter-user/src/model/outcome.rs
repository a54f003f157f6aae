//! What became of a request: the verdict, and which kind of failure a refusal was. The
//! failure class decides what a refusal may cost its source: protocol abuse and credential
//! failures may count toward blocking an address, policy denials never do.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    Allow,
    Deny,
    /// A report-only rule would have refused; the request was forwarded.
    WouldDeny,
}

impl Decision {
    pub fn name(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::WouldDeny => "would-deny",
        }
    }
}

/// Which kind of failure a refusal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureClass {
    /// Malformed or smuggling HTTP, failed TLS handshakes, oversized heads, slow clients.
    Protocol,
    /// Bad or forged tokens, Exchange's 401 to credentials.
    Credential,
    /// A rule or the content policy refused.
    Policy,
}

impl FailureClass {
    pub const ALL: [FailureClass; 3] = [
        FailureClass::Protocol,
        FailureClass::Credential,
        FailureClass::Policy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FailureClass::Protocol => "protocol",
            FailureClass::Credential => "credential",
            FailureClass::Policy => "policy",
        }
    }

    pub fn parse(text: &str) -> Option<FailureClass> {
        FailureClass::ALL.into_iter().find(|c| c.name() == text)
    }
}
