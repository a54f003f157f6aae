//! The request rules as data: ordered, first match wins, default deny. Judging them is
//! `policy::rules`; reading them from a file is `config`.

use std::sync::Arc;

use super::{
    auth::{AuthKind, TokenKind},
    ews::{DataSet, OpClass},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Shared with every decision that names the rule: a match costs no copy.
    pub name: Arc<str>,
    pub line: usize,
    /// Empty lists mean "any".
    pub groups: Vec<String>,
    pub auth: Vec<AuthKind>,
    pub token: Vec<TokenKind>,
    /// Normalised paths; a trailing `*` matches a prefix.
    pub paths: Vec<String>,
    /// Case-insensitive patterns with `*` wildcards.
    pub users: Vec<String>,
    /// Minutes after local midnight: [from, to). `from > to` spans midnight.
    pub hours: Option<(u16, u16)>,
    /// Bit 0 = Monday.
    pub days: u8,
    /// EWS operations by name or class; empty means every operation that is not
    /// restricted (export, eDiscovery, delegates, inbox rules, apps).
    pub operations: Vec<OpMatch>,
    /// Data types the request may touch; `None` means any.
    pub data: Option<DataSet>,
    pub scope: Option<Scope>,
    /// Acting on another mailbox: by `ExchangeImpersonation`, or as a delegate.
    pub impersonation: bool,
    pub delegate: bool,
    pub action: Action,
    /// `mode = "report"`: judged and audited as it would apply, never enforced.
    pub report: bool,
}

impl Rule {
    /// Conditions only a SOAP request can meet.
    pub fn judges_content(&self) -> bool {
        !self.operations.is_empty()
            || self.data.is_some()
            || self.scope.is_some()
            || self.impersonation
            || self.delegate
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpMatch {
    Name(String),
    Class(OpClass),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only the item an Exchange callback token names, and its attachments.
    TokenItem,
}

/// What the response must be checked for before the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspect {
    pub data: DataSet,
    pub token_item: Option<String>,
    /// Response messages that answer a `GetFolder` of a root folder: that folder's own
    /// metadata is neutral.
    pub roots: Vec<usize>,
}
